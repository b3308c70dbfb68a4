"""Guest workloads: deterministic programs whose whole state is guest memory plus a small
vCPU state blob (exported into the VMSA page at pause, imported on restore).

This module holds the workload *specs* (parsed from text such as
``dirtier:rate=20000,pattern=hotcold,hot=0.1,skew=0.9``) and the ``idle`` and ``dirtier``
workloads; ``sqlite`` lives in `cvmig.guest.sqlitewl`. Workload code runs only inside vCPU
processes, through a `VcpuContext` that reads and writes private pages with the VEK.

Dirtier page format (private pages), as little-endian u64 words::

    [0] MAGIC   [1] pfn   [2] version (global write sequence number + 1)   [3] vCPU
    [4..511]    body = mix64(pfn, version) + i * STEP

so a torn page (header of one version, body of another), a page at the wrong address or a
stale page are all caught by `check`, which replays the counter-based index stream and so
knows which version every page must hold. An all-zero page is one never written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cvmig.guest.vcpu import VcpuContext

PAGE_SIZE = 4096
WORDS = PAGE_SIZE // 8

# Plaintext markers; tests search guest ciphertext for them (they must never appear there).
MAGIC_PRIVATE = int.from_bytes(b"CVMIG-PG", "little")
MAGIC_IO = int.from_bytes(b"CVMIG-IO", "little")

_U = np.uint64
_GOLDEN = _U(0x9E3779B97F4A7C15)
_M1 = _U(0xBF58476D1CE4E5B9)
_M2 = _U(0x94D049BB133111EB)
_C_PFN = _U(0xD6E8FEB86659FD93)
_STEP = np.arange(WORDS, dtype=np.uint64) * _U(0xA24BAED4963EE407)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 in, uint64 out; wraps mod 2**64)."""
    x = x ^ (x >> _U(30))
    x = x * _M1
    x = x ^ (x >> _U(27))
    x = x * _M2
    return x ^ (x >> _U(31))


def make_pages(magic: int, pfns: np.ndarray, versions: np.ndarray, vcpu: int, out: np.ndarray) -> None:
    """Fill ``out`` (n, 4096) uint8 with the self-checking page image of each (pfn, version)."""
    w = out.view(np.uint64)
    p = pfns.astype(np.uint64)
    v = versions.astype(np.uint64)
    w[:, 0] = _U(magic)
    w[:, 1] = p
    w[:, 2] = v
    w[:, 3] = _U(vcpu)
    base = mix64(p * _C_PFN ^ v * _GOLDEN)
    np.add(base[:, None], _STEP[None, 4:], out=w[:, 4:])


def bad_pages(magic: int, pfns: np.ndarray, versions: np.ndarray, vcpu: int, plain: np.ndarray) -> np.ndarray:
    """Mask of pages whose plaintext differs from what (pfn, version) must hold;
    version 0 means "never written": the page must be all zero."""
    expect = np.empty_like(plain)
    make_pages(magic, pfns, versions, vcpu, expect)
    expect[versions == 0] = 0
    return np.any(expect != plain, axis=1)


# --------------------------------------------------------------------------- specs

_PATTERNS = ("uniform", "hotcold", "sequential")


@dataclass(frozen=True)
class WorkloadSpec:
    """A parsed, validated workload: ``kind`` plus normalised parameters."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, name: str) -> Any:
        for k, v in self.params:
            if k == name:
                return v
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def __str__(self) -> str:
        if not self.params:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return str(v)


def _number(name: str, text: str) -> float:
    mult = 1.0
    t = text.strip()
    if t and t[-1] in "kKmM":
        mult = 1e3 if t[-1] in "kK" else 1e6
        t = t[:-1]
    try:
        return float(t) * mult
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None


def _p_rate(name: str, text: str) -> float:
    if text in ("max", "0"):
        return 0.0
    v = _number(name, text)
    if v <= 0 or v != v or v == float("inf"):
        raise ValueError(f"{name}={text!r}: must be a positive number or 'max'")
    return v


def _p_fraction(lo_open: bool) -> Any:
    def parse(name: str, text: str) -> float:
        v = _number(name, text)
        ok = (0 < v <= 1) if lo_open else (0 <= v <= 1)
        if not ok:
            raise ValueError(f"{name}={text!r}: must be in {'(0, 1]' if lo_open else '[0, 1]'}")
        return v

    return parse


def _p_hot(name: str, text: str) -> float:
    v = _number(name, text)
    if not 0 < v < 1:
        raise ValueError(f"{name}={text!r}: the hot fraction must be in (0, 1)")
    return v


def _p_int(lo: int, hi: int) -> Any:
    def parse(name: str, text: str) -> int:
        v = _number(name, text)
        if v != int(v) or not lo <= v <= hi:
            raise ValueError(f"{name}={text!r}: must be an integer in [{lo}, {hi}]")
        return int(v)

    return parse


def _p_pattern(name: str, text: str) -> str:
    if text not in _PATTERNS:
        raise ValueError(f"{name}={text!r}: unknown pattern; allowed: {', '.join(_PATTERNS)}")
    return text


# kind -> {param: (parser, default)}; order here is the canonical order in str(spec)
_SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "idle": {},
    "dirtier": {
        "rate": (_p_rate, 0.0),  # pages/s of vCPU run time, whole guest; 0 = as fast as it can
        "pattern": (_p_pattern, "uniform"),
        "hot": (_p_hot, 0.1),  # hotcold: fraction of the working set that is hot
        "skew": (_p_fraction(False), 0.9),  # hotcold: fraction of writes that go to the hot set
        "ws": (_p_fraction(True), 1.0),  # working set, fraction of guest RAM
        "batch": (_p_int(1, 65536), 256),  # pages per vectorised write
        "seed": (_p_int(0, 2**62), 1),
    },
    "sqlite": {
        "accounts": (_p_int(10, 10_000_000), 1000),
        "rate": (_p_rate, 0.0),  # transactions/s of vCPU run time, whole guest; 0 = max
        "keep": (_p_int(100, 10_000_000), 10000),  # history rows kept before folding into the ledger hash
        "seed": (_p_int(0, 2**62), 1),
    },
}


def parse_workload(text: str) -> WorkloadSpec:
    """Parse ``kind[:name=value,...]``; raise ValueError naming what is wrong and what is allowed."""
    text = text.strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind not in _SCHEMA:
        raise ValueError(f"unknown workload {kind!r}; allowed: {', '.join(_SCHEMA)}")
    schema = _SCHEMA[kind]
    given: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if name not in schema:
            allowed = ", ".join(schema) or "none"
            raise ValueError(f"workload {kind!r} has no parameter {name!r}; allowed: {allowed}")
        if not eq or not value.strip():
            raise ValueError(f"workload {kind!r}: parameter {name!r} needs a value ({name}=...)")
        if name in given:
            raise ValueError(f"workload {kind!r}: parameter {name!r} given twice")
        given[name] = schema[name][0](name, value.strip())
    if kind == "dirtier" and given.get("pattern", "uniform") != "hotcold":
        for name in ("hot", "skew"):
            if name in given:
                raise ValueError(f"dirtier: {name}= applies only to pattern=hotcold")
    params = tuple((name, given.get(name, default)) for name, (_, default) in schema.items())
    if kind == "dirtier" and params[1][1] != "hotcold":
        params = tuple(p for p in params if p[0] not in ("hot", "skew"))
    return WorkloadSpec(kind, params)


# --------------------------------------------------------------------------- workloads


class Workload:
    """What a vCPU runs. Subclasses keep every bit of state either in guest memory or in
    the dict returned by `export_state` (the VMSA blob)."""

    def __init__(self, spec: WorkloadSpec, ctx: VcpuContext) -> None:
        self.spec = spec
        self.ctx = ctx

    def boot(self) -> None:
        """Fresh start: initialise the workload's state in guest memory."""

    def step(self, vtime: float, deadline: float, quota: int | None) -> None:
        """Run until ``deadline`` (time.monotonic) or until out of work for this slice.
        ``vtime`` is the vCPU's run time so far (rates are per second of run time);
        ``quota`` caps the pages this slice may write (dirty limit), None = no cap."""

    def export_state(self) -> dict[str, Any]:
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        """Resume from an exported state over memory that holds the workload's pages."""

    def check(self) -> dict[str, Any]:
        return {"ok": True}

    def close(self) -> None:
        pass


class Idle(Workload):
    """Writes nothing; one operation per slice (a timer tick), so progress is visible.
    Its check: its RAM still decrypts to zeros."""

    def step(self, vtime: float, deadline: float, quota: int | None) -> None:
        self.ctx.ops += 1

    def check(self) -> dict[str, Any]:
        ctx = self.ctx
        bad = 0
        for _pfns, plain in ctx.iter_private(ctx.ram):
            bad += int(np.count_nonzero(np.any(plain != 0, axis=1)))
        return {"ok": bad == 0, "bad_pages": bad, "pages_checked": len(ctx.ram)}


class Dirtier(Workload):
    """Writes whole pages at a target rate over a working set, in a pattern.

    Write number j (0, 1, 2, ... for this vCPU) goes to working-set index ``f(j)``, a pure
    function of j (counter-based), so the state is just the counter and `check` can replay
    exactly which version every page must hold.
    """

    def __init__(self, spec: WorkloadSpec, ctx: VcpuContext) -> None:
        super().__init__(spec, ctx)
        p = spec.as_dict()
        self.rate = float(p["rate"]) / ctx.nvcpus  # this vCPU's share
        self.pattern = str(p["pattern"])
        self.batch = int(p["batch"])
        self.seed = _U((int(p["seed"]) * 0x100000001B3 + ctx.index * 0x9E37) % 2**64)
        self.ws = max(1, int(len(ctx.ram) * float(p["ws"])))
        self.nhot = 0
        self.hot_threshold = _U(0)
        if self.pattern == "hotcold":
            self.nhot = min(self.ws - 1, max(1, int(self.ws * float(p["hot"]))))
            self.hot_threshold = _U(int(float(p["skew"]) * 2**32))
        self.count = 0  # writes done; the only state besides memory
        self._plain = np.empty((self.batch, PAGE_SIZE), dtype=np.uint8)

    def indices(self, j0: int, n: int) -> np.ndarray:
        """Working-set indices (int64) of writes j0 .. j0+n-1."""
        j = np.arange(j0, j0 + n, dtype=np.uint64)
        if self.pattern == "sequential":
            return (j % _U(self.ws)).astype(np.int64)
        u = mix64(j * _GOLDEN + self.seed)
        if self.pattern == "uniform":
            return ((u >> _U(11)) % _U(self.ws)).astype(np.int64)
        r = u >> _U(32)
        hot = (u & _U(0xFFFFFFFF)) < self.hot_threshold
        cold = self.ws - self.nhot
        return np.where(hot, r % _U(self.nhot), _U(self.nhot) + r % _U(cold)).astype(np.int64)

    def _write(self, n: int) -> None:
        j0 = self.count
        idx = self.indices(j0, n)
        # A page hit twice in one batch keeps only its last write (highest version), which
        # is what the replay in check() expects.
        rev_unique, rev_first = np.unique(idx[::-1], return_index=True)
        keep = n - 1 - rev_first
        pfns = self.ctx.ram[rev_unique]
        versions = (j0 + 1 + keep).astype(np.uint64)
        plain = self._plain[: len(pfns)]
        make_pages(MAGIC_PRIVATE, pfns, versions, self.ctx.index, plain)
        self.ctx.write_private(pfns, plain)
        self.count += n
        self.ctx.ops += n

    def step(self, vtime: float, deadline: float, quota: int | None) -> None:
        if self.rate > 0:
            # token budget over run time; a slice may catch up at most one more slice
            want = int(self.rate * (vtime + 0.010)) - self.count
            budget = max(0, min(want, int(self.rate * 0.020) + 1))
        else:
            budget = 1 << 62
        if quota is not None:
            budget = min(budget, quota)
        while budget > 0:
            n = min(self.batch, budget)
            self._write(n)
            budget -= n
            if time.monotonic() >= deadline:
                break
        self.ctx.io_write()

    def export_state(self) -> dict[str, Any]:
        return {"count": self.count}

    def import_state(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])

    def expected_versions(self) -> np.ndarray:
        """Replay: the version each working-set page must hold now (0 = never written)."""
        last = np.zeros(self.ws, dtype=np.int64)
        chunk = 1 << 20
        for j0 in range(0, self.count, chunk):
            n = min(chunk, self.count - j0)
            idx = self.indices(j0, n)
            np.maximum.at(last, idx, np.arange(j0 + 1, j0 + n + 1, dtype=np.int64))
            self.ctx.tick()
        return last

    def check(self) -> dict[str, Any]:
        ctx = self.ctx
        expect = np.zeros(len(ctx.ram), dtype=np.int64)
        expect[: self.ws] = self.expected_versions()
        bad: list[int] = []
        nbad = 0
        off = 0
        for pfns, plain in ctx.iter_private(ctx.ram):
            mask = bad_pages(MAGIC_PRIVATE, pfns, expect[off : off + len(pfns)], ctx.index, plain)
            off += len(pfns)
            nbad += int(mask.sum())
            if len(bad) < 8:
                bad.extend(int(p) for p in pfns[mask][: 8 - len(bad)])
        return {
            "ok": nbad == 0,
            "writes": self.count,
            "pages_checked": len(ctx.ram),
            "bad_pages": nbad,
            "first_bad_pfns": bad,
        }


def make_workload(spec: WorkloadSpec, ctx: VcpuContext) -> Workload:
    if spec.kind == "idle":
        return Idle(spec, ctx)
    if spec.kind == "dirtier":
        return Dirtier(spec, ctx)
    if spec.kind == "sqlite":
        from cvmig.guest.sqlitewl import SqliteWorkload

        return SqliteWorkload(spec, ctx)
    raise ValueError(f"unknown workload {spec.kind!r}")


def with_params(spec: WorkloadSpec, **changes: Any) -> WorkloadSpec:
    """A copy of ``spec`` with some parameters replaced (validated by re-parsing)."""
    p = spec.as_dict()
    p.update(changes)
    return parse_workload(spec.kind + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in p.items()))


__all__ = [
    "WorkloadSpec",
    "parse_workload",
    "with_params",
    "make_workload",
    "Workload",
    "Idle",
    "Dirtier",
    "mix64",
    "make_pages",
    "bad_pages",
    "MAGIC_PRIVATE",
    "MAGIC_IO",
]
