"""A confidential guest as the hypervisor drives it: vCPU processes, dirty log, throttle.

Memory layout (page frame numbers)::

    [0, ram_end)                          private RAM, split into one contiguous part per vCPU
    [ram_end, ram_end + shared_pages)     shared pages (plaintext I/O buffers)
    [npages - vcpus, npages)              one VMSA page per vCPU (private, encrypted)

Everything here runs in the hypervisor's process and never holds the VEK or plaintext of a
private page: digest and check are computed by vCPU processes and only their results
cross back.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, cast

import numpy as np

from cvmig.guest import control as ctl
from cvmig.guest.memory import PAGE_SIZE, GuestMemory, check_size
from cvmig.guest.pool import VcpuPool, spawn_vcpu
from cvmig.guest.vcpu import VcpuSpec, share
from cvmig.guest.workloads import WorkloadSpec, parse_workload

TRACKERS = ("auto", "uffd", "dmap")
MAX_VCPUS = 64
_START_TIMEOUT = 60.0
_CMD_TIMEOUT = 8.0  # commands whose work does not grow with memory (pause, resume, ...)
LIVENESS = 5.0  # a vCPU doing long work that neither heartbeats nor stamps progress this long is hung
_POLL = 0.1
_MIN_RAM_PER_VCPU = 256  # pages


def _idle() -> WorkloadSpec:
    return parse_workload("idle")


_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class GuestConfig:
    memory: int  # bytes
    vcpus: int = 2
    workload: WorkloadSpec = field(default_factory=_idle)
    tracker: str = "auto"  # "auto" (uffd where it works) | "uffd" | "dmap"
    shared_pages: int = 16

    @property
    def npages(self) -> int:
        return self.memory // PAGE_SIZE

    @property
    def ram_pages(self) -> int:
        return self.npages - self.vcpus - self.shared_pages

    def validate(self) -> None:
        """Raise ValueError saying what is wrong, before anything starts."""
        if not isinstance(self.workload, WorkloadSpec):
            raise ValueError(f"workload must be a WorkloadSpec (use parse_workload), got {self.workload!r}")
        if self.tracker not in TRACKERS:
            raise ValueError(f"unknown tracker {self.tracker!r}; allowed: {', '.join(TRACKERS)}")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ValueError(f"vcpus must be in [1, {MAX_VCPUS}], got {self.vcpus}")
        if self.shared_pages < 0:
            raise ValueError(f"shared_pages must be >= 0, got {self.shared_pages}")
        check_size(self.memory)
        if self.ram_pages < _MIN_RAM_PER_VCPU * self.vcpus:
            raise ValueError(
                f"{self.memory} bytes leave {self.ram_pages} RAM pages for {self.vcpus} vCPUs; "
                f"each needs at least {_MIN_RAM_PER_VCPU}"
            )
        if self.shared_pages > self.npages // 4:
            raise ValueError(f"shared_pages={self.shared_pages} is more than a quarter of guest memory")
        if self.workload.kind == "sqlite":
            from cvmig.guest.sqlitewl import pages_needed

            need = pages_needed(int(self.workload.get("accounts")))
            per = self.ram_pages // self.vcpus
            if per < need:
                raise ValueError(
                    f"sqlite:accounts={self.workload.get('accounts')} needs about {need} pages per "
                    f"vCPU for its database; {self.vcpus} vCPUs get {per} each: add memory"
                )


@dataclass(frozen=True)
class VcpuStats:
    index: int
    pid: int
    state: str
    ops: int
    pages_written: int
    heartbeat: float  # CLOCK_MONOTONIC (time.monotonic) of the last slice's start
    heartbeats: int  # slices begun (ring entries written)
    throttle: float
    dirty_limit: float | None
    run_time: float
    throttle_time: float
    failed: bool


def _release(control: ctl.ControlBlock, procs: list[subprocess.Popen[bytes]], conns: list[Connection]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5.0)
    for c in conns:
        c.close()
    control.close()


def _cpu_seconds(pid: int) -> float | None:
    """CPU time process ``pid`` has used (None if it is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat", "rb") as f:
            # after the command name's closing parenthesis: utime is field 14
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return None


def choose_tracker(requested: str) -> str:
    """Resolve "auto"; raise RuntimeError if "uffd" was asked for and cannot work here."""
    if requested == "dmap":
        return "dmap"
    from cvmig.guest.uffd import probe

    why = probe()
    if why is None:
        return "uffd"
    if requested == "uffd":
        raise RuntimeError(why)
    return "dmap"


class Guest:
    """One guest: its vCPU processes over ``memory``, keyed by PSP guest ``handle``."""

    def __init__(self, config: GuestConfig, memory: GuestMemory, psp_socket: str, handle: int,
                 pool: VcpuPool | None = None) -> None:
        """``pool``: where to take warm vCPU processes from (a destination's, started
        before the migration); without one, or when it runs dry, they are started here."""
        config.validate()
        if memory.npages != config.npages:
            raise ValueError(f"memory has {memory.npages} pages, config says {config.npages}")
        self.config = config
        self.memory = memory
        self.psp_socket = psp_socket
        self.handle = handle
        self.tracker_kind = choose_tracker(config.tracker)
        n, v = config.npages, config.vcpus
        self._ram_end = config.ram_pages
        self.control = ctl.ControlBlock.create(memory.name, v, n)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[Connection] = []
        self._maps: list[tuple[int, int, int]] = []  # (pid, addr, len) per vCPU
        self._scanners: list[Any] = []
        self._logging = False
        self._paused = False
        self._owed: list[int] = []  # answers each vCPU still owes (a wait that gave up leaves one)
        # seconds a vCPU doing long work may go without a heartbeat or a progress stamp
        self.liveness = LIVENESS
        # a Guest dropped without shutdown() still kills its vCPUs and unlinks its control shm
        self._finalizer = weakref.finalize(self, _release, self.control, self._procs, self._conns)
        self._standby = False
        self._pool = pool
        self._cpu_before: dict[int, float] = {}  # CPU-s each pooled vCPU had used when taken

    # -- layout
    @property
    def vmsa_pfns(self) -> np.ndarray:
        n = self.config.npages
        return np.arange(n - self.config.vcpus, n, dtype=np.int64)

    @property
    def ram_pfns(self) -> np.ndarray:
        return np.arange(0, self._ram_end, dtype=np.int64)

    @property
    def shared_pfns(self) -> np.ndarray:
        return np.arange(self._ram_end, self._ram_end + self.config.shared_pages, dtype=np.int64)

    def _spec(self, i: int, mode: str) -> VcpuSpec:
        c = self.config
        per = self._ram_end // c.vcpus
        start = i * per
        count = per if i < c.vcpus - 1 else self._ram_end - start
        return VcpuSpec(
            index=i,
            nvcpus=c.vcpus,
            mem_name=self.memory.name,
            npages=c.npages,
            ctl_name=self.control.name,
            psp_socket=self.psp_socket,
            handle=self.handle,
            tracker=self.tracker_kind,
            mode=mode,
            workload=c.workload,
            ram_start=start,
            ram_count=count,
            io_pfns=tuple(int(p) for p in self.shared_pfns[i :: c.vcpus]),
            vmsa_pfn=int(self.vmsa_pfns[i]),
        )

    # -- lifecycle
    def _start(self, mode: str) -> None:
        if self._procs:
            raise RuntimeError("vCPUs already started")
        try:
            fresh = []
            for i in range(self.config.vcpus):
                v = self._pool.take() if self._pool is not None else spawn_vcpu()
                try:
                    v.conn.send(self._spec(i, mode))
                except OSError:
                    v.kill()
                    if not v.warm:
                        raise
                    v = spawn_vcpu()  # the pooled one died since it was taken: a fresh one
                    v.conn.send(self._spec(i, mode))
                self._procs.append(v.proc)
                self._conns.append(v.conn)
                self._owed.append(0)
                if v.warm:  # its start (the imports) was before us: not ours to count
                    self._cpu_before[v.proc.pid] = _cpu_seconds(v.proc.pid) or 0.0
                else:
                    fresh.append(i)
            for i in fresh:
                kind, info = self._recv(i, self._conns[i], _START_TIMEOUT)
                if kind != "warm":
                    raise RuntimeError(str(info))
            if mode == "standby":
                for i, conn in enumerate(self._conns):
                    kind, info = self._recv(i, conn, _START_TIMEOUT)
                    if kind != "standby":
                        raise RuntimeError(str(info))
                self.control.unlink()  # every vCPU has it mapped
                return
            self._await_ready()
        except BaseException:
            self._kill()
            raise
        self._paused = mode == "restore"

    def _await_ready(self) -> None:
        for i, conn in enumerate(self._conns):
            kind, info = self._recv(i, conn, _START_TIMEOUT)
            if kind != "ready":
                raise RuntimeError(str(info))
            self._maps.append((int(info["pid"]), int(info["addr"]), int(info["len"])))
        self.control.unlink()  # every vCPU has it mapped

    def boot(self) -> None:
        """Fresh start: vCPUs fetch the VEK, the workload initialises and runs."""
        self._start("boot")

    def prepare(self) -> None:
        """Start the vCPU processes in standby, memory attached but no key, while a
        migration's pages still arrive; `restore` then only has to import the VMSAs."""
        self._start("standby")
        self._standby = True

    def restore(self) -> None:
        """Start the vCPUs PAUSED from the state in their VMSA pages (after a migration)."""
        if not self._standby:
            self._start("restore")
            return
        self._standby = False
        try:
            for conn in self._conns:
                conn.send(("go",))
            self._await_ready()
        except BaseException:
            self._kill()
            raise
        self._paused = True

    def _exited(self, i: int) -> RuntimeError:
        p = self._procs[i]
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(1.0)  # the pipe closes a moment before the exit status is there
        rc = p.poll()
        if rc is None:
            how = "closed its connection"
        elif rc < 0:
            how = f"was killed by {signal.Signals(-rc).name}"
        else:
            how = f"exited with code {rc}"
        return RuntimeError(f"vCPU {i} (pid {p.pid}) {how}")

    def _recv(self, i: int, conn: Connection, timeout: float) -> tuple[str, Any]:
        if not conn.poll(timeout):
            raise TimeoutError(f"vCPU {i} did not answer within {timeout:.0f} s")
        try:
            msg: tuple[str, Any] = conn.recv()
        except EOFError:
            raise self._exited(i) from None
        return msg

    def _exchange(self, msgs: dict[int, tuple[Any, ...]], long: bool = False) -> dict[int, Any]:
        """Send each vCPU its message and wait for every answer, all vCPUs at once.

        A short command must be answered within _CMD_TIMEOUT. ``long`` work (it grows with
        memory) is waited for as long as the vCPU lives and shows signs of it: a heartbeat
        or a progress stamp no older than ``self.liveness`` seconds. A vCPU that dies fails
        the wait at once."""
        if not self._conns:
            raise RuntimeError("the guest is not running (boot() or restore() first)")
        op = next(iter(msgs.values()))[0]
        for i, m in msgs.items():
            self._conns[i].send(m)
            self._owed[i] += 1
        pending = {self._conns[i]: i for i in msgs}
        out: dict[int, Any] = {}
        t0 = time.monotonic()
        # progress is a change seen on our own clock: a restored vCPU's heartbeat can come
        # from the source host's clock
        last = {i: (self._signs(i), t0) for i in msgs}
        while pending:
            for c in cast("list[Connection]", wait(list(pending), _POLL)):
                i = pending[c]
                try:
                    kind, val = c.recv()
                except EOFError:
                    raise RuntimeError(f"{self._exited(i)} during {op}") from None
                self._owed[i] -= 1
                if self._owed[i]:
                    continue  # the late answer to a command whose wait gave up
                del pending[c]
                if kind == "error":
                    raise RuntimeError(f"vCPU {i}: {val}")
                out[i] = val
            now = time.monotonic()
            for i in pending.values():
                if self._procs[i].poll() is not None:
                    raise RuntimeError(f"{self._exited(i)} during {op}")
                if not long:
                    if now - t0 > _CMD_TIMEOUT:
                        raise TimeoutError(f"vCPU {i} did not answer {op} within {_CMD_TIMEOUT:.0f} s")
                    continue
                signs, seen = last[i]
                if self._signs(i) != signs:
                    last[i] = (self._signs(i), now)
                elif now - seen > self.liveness:
                    raise TimeoutError(
                        f"vCPU {i} (pid {self._procs[i].pid}) is alive but showed no progress "
                        f"for {now - seen:.1f} s during {op} (liveness window {self.liveness:g} s)"
                    )
        return out

    def _signs(self, i: int) -> tuple[int, float]:
        r = self.control.vcpu[i]
        return int(r["hb_count"]), float(r["busy"])

    def _command(self, op: str, vcpus: list[int] | None = None, long: bool = False) -> list[Any]:
        """Send ``op`` to vCPUs (all by default) and wait for every answer."""
        idx = list(range(len(self._conns))) if vcpus is None else vcpus
        res = self._exchange({i: (op,) for i in idx}, long)
        return [res[i] for i in idx]

    def pause(self) -> None:
        """Returns once every vCPU is paused at a slice boundary, no write in flight, with
        its state blob saved (encrypted) in its VMSA page."""
        self._command("pause")
        self._paused = True

    def resume(self) -> None:
        self._command("resume")
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def shutdown(self) -> None:
        """Stop the vCPUs (after the final harvest: uffd dirty state dies with them)."""
        self._close_scanners()
        for i, conn in enumerate(self._conns):
            with contextlib.suppress(OSError):
                conn.send(("stop",))
            with contextlib.suppress(Exception):
                self._recv(i, conn, 10.0)
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10.0)
        self._kill()
        self.control.close()

    def _kill(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                p.wait(5.0)
        for c in self._conns:
            c.close()
        # cleared in place: the finalizer holds these lists
        self._procs.clear()
        self._conns.clear()
        self._owed.clear()
        self._maps.clear()
        self._cpu_before.clear()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- throttle and dirty limit (read by the vCPUs every slice)
    def _targets(self, vcpu: int | None) -> slice:
        if vcpu is None:
            return slice(None)
        if not 0 <= vcpu < self.config.vcpus:
            raise ValueError(f"no vCPU {vcpu}; this guest has {self.config.vcpus}")
        return slice(vcpu, vcpu + 1)

    def set_throttle(self, pct: float, vcpu: int | None = None) -> None:
        """Throttle p as a fraction in [0, 0.99] (QEMU's 20 % is 0.2): each vCPU sleeps
        p/(1-p) x 10 ms per 10 ms slice."""
        if not 0.0 <= pct <= 0.99:
            raise ValueError(f"throttle must be a fraction in [0, 0.99], got {pct}")
        self.control.vcpu["throttle"][self._targets(vcpu)] = pct

    def set_dirty_limit(self, pages_per_s: float | None, vcpu: int | None = None) -> None:
        """Per-vCPU dirty-page quota in pages/s of wall time (None lifts it)."""
        if pages_per_s is not None and not pages_per_s >= 0:
            raise ValueError(f"dirty limit must be >= 0 pages/s or None, got {pages_per_s}")
        val = ctl.NO_LIMIT if pages_per_s is None else float(pages_per_s)
        self.control.vcpu["dirty_limit"][self._targets(vcpu)] = val

    # -- dirty log (KVM semantics: get-and-clear)
    def start_dirty_log(self) -> None:
        """Begin logging: the next harvest returns the pages written from now on."""
        self._close_scanners()
        if self.tracker_kind == "uffd":
            from cvmig.guest.uffd import PagemapScanner

            if not self._maps:
                raise RuntimeError("the guest is not running (boot() or restore() first)")
            self._scanners = [PagemapScanner(pid, addr, ln) for pid, addr, ln in self._maps]
            for s in self._scanners:
                s.scan()  # the first get-and-clear arms write-protection
        else:
            self.control.dmap[:] = 0
        self._logging = True

    def harvest_dirty(self) -> np.ndarray:
        """Sorted unique int64 pfns written since the last harvest (or start_dirty_log);
        clears them. Covers every page: RAM, shared and VMSA pages."""
        if not self._logging:
            raise RuntimeError("dirty logging is off (start_dirty_log() first)")
        if self.tracker_kind == "uffd":
            parts = [s.scan() for s in self._scanners]
            if len(parts) == 1:
                return parts[0]
            return np.unique(np.concatenate(parts))
        d = self.control.dmap
        # snapshot first: vCPUs keep marking while we look. A mark set again between the
        # snapshot and the clear is safe to drop: its write finished before it was marked,
        # so the caller's copy, which follows the clear, sees it.
        idx = np.flatnonzero(d.copy())
        d[idx] = 0  # clear before the caller reads the pages; writers mark after writing
        return idx.astype(np.int64)

    def stop_dirty_log(self) -> None:
        if self.tracker_kind == "uffd" and self._conns:
            self._command("unprotect")
        self._close_scanners()
        self._logging = False

    def _close_scanners(self) -> None:
        for s in self._scanners:
            s.close()
        self._scanners = []

    # -- observation
    def stats(self) -> list[VcpuStats]:
        out = []
        for i, r in enumerate(self.control.vcpu):
            lim = float(r["dirty_limit"])
            out.append(
                VcpuStats(
                    index=i,
                    pid=int(r["pid"]),
                    state=ctl.STATE_NAMES.get(int(r["state"]), "?"),
                    ops=int(r["ops"]),
                    pages_written=int(r["pages_written"]),
                    heartbeat=float(r["heartbeat"]),
                    heartbeats=int(r["hb_count"]),
                    throttle=float(r["throttle"]),
                    dirty_limit=None if lim < 0 else lim,
                    run_time=float(r["run_time"]),
                    throttle_time=float(r["throttle_time"]),
                    failed=bool(r["failed"]),
                )
            )
        return out

    def cpu_seconds(self) -> float:
        """CPU time the vCPU processes have used so far (the kernel's count): what the
        guest takes from the host's cores, which a small host shares with the migration.
        A pooled vCPU's start, before this guest took it, is not counted."""
        total = 0.0
        for p in self._procs:
            used = _cpu_seconds(p.pid)
            if used is not None:
                total += used - self._cpu_before.get(p.pid, 0.0)
        return total

    def heartbeats(self, vcpu: int) -> np.ndarray:
        """The last (up to ctl.RING) heartbeat times of one vCPU, oldest first."""
        r = self.control.vcpu[vcpu]
        n = int(r["hb_count"])
        ring = self.control.ring[vcpu]
        if n <= ctl.RING:
            return ring[:n].copy()
        k = n % ctl.RING
        return np.concatenate((ring[k:], ring[:k]))

    def max_heartbeat_gap(self, since: float, until: float | None = None) -> float:
        """Largest interval (s) between consecutive heartbeats of any vCPU that overlaps
        [since, until] (until defaults to now; a gap still open at ``until`` counts up to
        it). After restore() the first gap starts at the source's last heartbeat, so this
        is the pause the guest itself observed across a migration."""
        end = time.monotonic() if until is None else until
        worst = 0.0
        for i in range(self.config.vcpus):
            t = self.heartbeats(i)
            if len(t) == 0:
                continue
            t = np.append(t, end) if t[-1] < end else t
            gaps_end = t[1:]
            gaps_start = t[:-1]
            m = (gaps_end >= since) & (gaps_start <= end)
            if m.any():
                worst = max(worst, float((np.minimum(gaps_end[m], end) - gaps_start[m]).max()))
        return worst

    # -- inside the trust boundary (computed by vCPU processes)
    def digest(self) -> str:
        """SHA-256 of the whole plaintext memory and page states (`cvmig.psp.measure`):
        every vCPU measures an even share of the frames in parallel; one of them hashes
        the shares' values, which reach it sealed (this process never sees them)."""
        v, n = len(self._conns), self.config.npages
        tag = secrets.token_bytes(16)  # binds the parts to this digest: no replays
        ranges = [share(n, v, k) for k in range(v)]
        sealed = self._exchange({k: ("measure", lo, hi, tag) for k, (lo, hi) in enumerate(ranges)}, long=True)
        parts = [(lo, hi, sealed[k]) for k, (lo, hi) in enumerate(ranges)]
        return str(self._exchange({0: ("digest", tag, parts)}, long=True)[0])

    def check(self) -> dict[str, Any]:
        """Each vCPU checks its own part with the workload's own check."""
        res = self._command("check", long=True)
        return {"ok": all(r["ok"] for r in res), "workload": str(self.config.workload), "vcpus": res}
