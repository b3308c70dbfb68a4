"""The floor of each packet format on this machine: the cryptography a command cannot avoid.

Per page of one command of ``batch`` pages, each primitive called the cheapest way it can
be (vectorised over the command's pages where the format allows it, one call per page
where the format demands one), reused keys and contexts, best of several runs:

- every format: the memory cipher over the command's pages (SEND decrypts under the guest's
  key, RECEIVE encrypts under the new one), one vectorised call;
- page / contig: AES-128-CTR over the command's data, one call; HMAC-SHA-256 over it, one
  MAC per command;
- sg: AES-128-CTR over the data, one call; HMAC-SHA-256 over each 4 KiB page (one MAC per
  page is the format);
- aead: AES-128-GCM over each page, one call per page (one tag per page is the format).

Copies, the import measurement and the firmware's bookkeeping are not in the floor: they
are what an implementation adds, and `cvmig bench psp` shows how close it comes.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cvmig.psp.api import PAGE_SIZE, Batching
from cvmig.psp.memcrypt import MemoryCipher


def _best(f: Callable[[], None], reps: int) -> float:
    f()  # warm: first-touch faults and lazy set-up are not the floor
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def primitives(batch: int, reps: int = 20) -> dict[str, float]:
    """Seconds of each primitive for one command of ``batch`` pages."""
    rng = np.random.default_rng(0)
    pt = rng.integers(0, 256, (batch, PAGE_SIZE), dtype=np.uint8)
    out = np.empty_like(pt)
    flat, oflat = pt.reshape(-1), out.reshape(-1)
    mem = MemoryCipher(os.urandom(32))
    pfns = np.arange(batch, dtype=np.int64) * 3  # scattered: the costlier tweak path
    ctr = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(bytes(16))).encryptor()
    key = os.urandom(32)
    mac = hmac.new(key, digestmod="sha256")
    base = getattr(mac, "_hmac", None) or mac
    gcm = AESGCM(os.urandom(16))
    sealed = bytearray(PAGE_SIZE + 16)
    sv = memoryview(sealed)
    src = memoryview(flat)  # type: ignore[arg-type]
    nonce = bytes(12)

    def memcrypt() -> None:
        mem.encrypt_pages(pfns, pt, out)

    def ctr_all() -> None:
        ctr.reset_nonce(bytes(16))
        ctr.update_into(flat, oflat)  # type: ignore[arg-type]

    def hmac_command() -> None:
        h = base.copy()
        h.update(src)
        h.digest()

    def hmac_pages() -> None:
        for i in range(batch):
            h = base.copy()
            h.update(src[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            h.digest()

    def gcm_pages() -> None:
        for i in range(batch):
            gcm.encrypt_into(nonce, src[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], b"", sv)

    fns = {"memcrypt": memcrypt, "ctr": ctr_all, "hmac_command": hmac_command,
           "hmac_pages": hmac_pages, "gcm_pages": gcm_pages}
    return {name: _best(f, reps) for name, f in fns.items()}


def floor_us_per_page(mode: Batching, batch: int, prims: dict[str, float]) -> float:
    """µs per page a command of ``batch`` pages in ``mode`` cannot go below here (SEND and
    RECEIVE do the same work in mirror image)."""
    parts = {
        Batching.PAGE: ("memcrypt", "ctr", "hmac_command"),
        Batching.CONTIG: ("memcrypt", "ctr", "hmac_command"),
        Batching.SG: ("memcrypt", "ctr", "hmac_pages"),
        Batching.AEAD: ("memcrypt", "gcm_pages"),
    }[mode]
    return sum(prims[p] for p in parts) / batch * 1e6
