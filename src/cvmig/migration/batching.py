"""Planning firmware commands over a set of pages: which pages share one UPDATE_DATA.

Pure numpy, no per-page Python loop: runs of contiguous frames are found with one diff,
then cut at the cap. The plan is a ``bounds`` array: command i covers
``pfns[bounds[i]:bounds[i+1]]``.
"""

from __future__ import annotations

import numpy as np

from cvmig.psp.api import PAGE_SIZE, SPEC_MAX_LENGTH, Batching

SPEC_CAP_PAGES = SPEC_MAX_LENGTH // PAGE_SIZE  # 4 pages: what the SEV spec allows
DEFAULT_SG_PAGES = 256
SCATTERED = frozenset({Batching.SG, Batching.AEAD})  # modes whose packets take any pages
MAX_SG_PAGES = 512


def default_cap(mode: Batching) -> int:
    """Pages per command when the user names no cap."""
    if mode is Batching.PAGE:
        return 1
    if mode is Batching.CONTIG:
        return SPEC_CAP_PAGES
    return DEFAULT_SG_PAGES  # sg and aead: scattered pages, one sequenced packet


def validate_cap(mode: Batching, cap: int) -> None:
    """Raise ValueError if ``cap`` pages per command is not allowed for ``mode``."""
    if cap < 1:
        raise ValueError(f"batch cap must be at least 1 page, got {cap}")
    if mode is Batching.PAGE and cap != 1:
        raise ValueError("batching mode 'page' sends exactly one page per command (cap 1)")
    if mode in SCATTERED and cap > MAX_SG_PAGES:
        raise ValueError(f"{mode} batch cap {cap} pages is over the {MAX_SG_PAGES}-page limit "
                         "(one GPA-list page, as TDX)")
    if cap > 4096:
        raise ValueError(f"batch cap {cap} pages is over the 4096-page (16 MiB) limit")


def plan_batches(pfns: np.ndarray, mode: Batching, cap: int) -> np.ndarray:
    """Command boundaries for sending ``pfns`` (sorted, unique) in ``mode``.

    page: one command per page. contig: one per run of consecutive frames, each run cut
    into pieces of at most ``cap`` pages. sg: any pages, ``cap`` per command.
    """
    n = len(pfns)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    if mode is Batching.PAGE or cap == 1:
        return np.arange(n + 1, dtype=np.int64)
    if mode in SCATTERED:
        return np.append(np.arange(0, n, cap, dtype=np.int64), np.int64(n))
    # contig: run starts where the frame number jumps
    jumps = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = np.concatenate(([0], jumps)).astype(np.int64)
    ends = np.append(jumps, n).astype(np.int64)
    lengths = ends - starts
    pieces = (lengths + cap - 1) // cap
    # each run contributes starts, starts+cap, starts+2cap, ...
    run_of_piece = np.repeat(np.arange(len(starts)), pieces)
    first_piece = np.cumsum(pieces) - pieces
    k = np.arange(int(pieces.sum()), dtype=np.int64) - np.repeat(first_piece, pieces)
    cuts = starts[run_of_piece] + k * cap
    return np.append(cuts, np.int64(n))
