"""The pre-copy driver: every decision of a migration, as pure logic over a small world.

What to send next, how to batch it, when to throttle, when to stop and copy. The real
engine binds `World` to the guest, the secure processor and the wire; a model binds it to
a simulated clock. One driver, two worlds.

The algorithm is QEMU's, by rounds: a bulk round over every page, then iterative rounds
over the dirty set; after each dirty-log sync, switch over when the remaining bytes fit in
bandwidth x downtime-limit (``migration_iteration_run``), the bandwidth being what the last
round actually achieved, firmware time included.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cvmig.migration.batching import default_cap, plan_batches, validate_cap
from cvmig.migration.throttle import (
    Sync,
    ThrottleKind,
    ThrottleParams,
    ThrottlePolicy,
    make_policy,
)
from cvmig.psp.api import PAGE_SIZE, Batching

# Pages handed to the world per send: sized so one send takes about CHUNK_TARGET_S at the
# rate measured so far, so that cancel, rate-limit and flow-control checks stay frequent
# whether a page costs 5 µs (sg here) or 2.5 ms (2020 SEV hardware); short sends also keep
# the two frames in flight at the switch short.
CHUNK_TARGET_S = 0.025
MIN_CHUNK_PAGES = 16
MAX_CHUNK_PAGES = 1024  # what one PAGES frame carries (cvmig.wire.protocol)
RATE_WINDOW_S = 0.1  # QEMU's BUFFER_DELAY: the max-bandwidth budget is per 100 ms


class TimeoutAction(enum.StrEnum):
    CANCEL = "cancel"
    FORCE = "force"


class Switchover(enum.StrEnum):
    """How the driver predicts the stop-and-copy time it compares with downtime-limit."""

    QEMU = "qemu"  # remaining bytes / the last round's bandwidth (QEMU's rule)
    FIRMWARE = "firmware"  # the commands the dirty set needs x measured cost per command,
    # plus its bytes x measured cost per byte: a scattered dirty set batches worse than the
    # bulk round did, and the firmware's per-command cost is what dominates SEV migration


@dataclass(frozen=True)
class MigrationParams:
    """Everything a user can set; QEMU's names and defaults where QEMU has them."""

    downtime_limit_ms: int = 300
    max_bandwidth: int = 0  # bytes/s; 0 = unlimited (QEMU's 128 MiB/s would hide the PSP)
    batching: Batching = Batching.PAGE
    batch_cap: int = 0  # pages per command; 0 = the mode's default
    queue: bool = False  # many commands behind one mailbox doorbell
    throttle: ThrottleKind = ThrottleKind.NONE
    throttle_params: ThrottleParams = field(default_factory=ThrottleParams)
    max_rounds: int = 0  # iterative rounds; 0 = no cap (as QEMU)
    timeout_s: float = 0.0  # 0 = none
    timeout_action: TimeoutAction = TimeoutAction.CANCEL
    switchover: Switchover = Switchover.QEMU
    # firmware estimate only: what stopping costs besides the pages (pause, VMSAs, frames
    # still in flight, starting the vCPUs at the destination), not measurable before the
    # first switch; ~100 ms on this machine (a migration's downtime less its last transfer)
    switchover_fixed_ms: int = 100

    @property
    def cap(self) -> int:
        return self.batch_cap or default_cap(self.batching)

    def validate(self) -> None:
        """Raise ValueError naming what is wrong and what is allowed."""
        if not 0 <= self.downtime_limit_ms <= 2_000_000:
            raise ValueError(f"downtime-limit must be 0..2000000 ms, got {self.downtime_limit_ms}")
        if self.max_bandwidth < 0:
            raise ValueError("max-bandwidth must be >= 0 bytes/s (0 = unlimited)")
        validate_cap(self.batching, self.cap)
        if self.switchover_fixed_ms < 0:
            raise ValueError("switchover fixed cost must be >= 0 ms")
        if self.max_rounds < 0:
            raise ValueError("max-rounds must be >= 0 (0 = no cap)")
        if self.timeout_s < 0:
            raise ValueError("timeout must be >= 0 s (0 = none)")
        self.throttle_params.validate()


@dataclass
class Sent:
    """What one send achieved, as the world reports it."""

    pages: int = 0
    bytes: int = 0
    commands: int = 0  # firmware commands
    doorbells: int = 0  # mailbox round trips
    psp_seconds: float = 0.0  # time spent in firmware commands

    def add(self, other: Sent) -> None:
        self.pages += other.pages
        self.bytes += other.bytes
        self.commands += other.commands
        self.doorbells += other.doorbells
        self.psp_seconds += other.psp_seconds


class World(Protocol):
    """What the driver needs from a host pair (real) or a simulation (model)."""

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def all_pages(self) -> np.ndarray:
        """Every page the bulk round sends, sorted (int64 pfns)."""
        ...

    def shared_mask(self, pfns: np.ndarray) -> np.ndarray:
        """True where a page is shared (plaintext; sent without the firmware)."""
        ...

    def start_dirty_log(self) -> None: ...

    def harvest(self) -> np.ndarray:
        """Get-and-clear the dirty log: sorted unique pfns written since the last harvest."""
        ...

    def send_private(self, pfns: np.ndarray, bounds: np.ndarray, queue: bool) -> Sent:
        """Send private pages through the firmware, one command per ``bounds`` slice."""
        ...

    def send_shared(self, pfns: np.ndarray) -> Sent: ...

    def set_throttle(self, pct: int) -> None: ...

    def set_dirty_limit(self, pages_per_s: float | None) -> None: ...

    def pause_guest(self) -> None:
        """Stop the vCPUs (acknowledged: no write in flight). Downtime starts here."""
        ...

    def send_vcpu_state(self) -> Sent:
        """Send the vCPU state (SEND_UPDATE_VMSA) of the paused guest."""
        ...

    def complete(self) -> float:
        """Finish the stream and wait until the destination confirms the guest runs.
        Returns the time (world clock) the destination confirmed: the end of downtime."""
        ...


class MigrationCancelled(Exception):
    """The user (or the timeout, with action cancel) stopped the migration."""


@dataclass
class Round:
    """One pass: the bulk pass, an iterative pass over a dirty set, or stop-and-copy."""

    index: int
    kind: str  # "bulk" | "iterative" | "stop-and-copy"
    start: float  # seconds since the migration began
    duration: float = 0.0
    dirty_pages: int = 0  # harvested by the sync that opened this round
    pages: int = 0
    bytes: int = 0
    commands: int = 0
    doorbells: int = 0
    psp_seconds: float = 0.0
    bandwidth: float = 0.0  # bytes/s achieved in this round
    throttle_pct: int = 0
    threshold_bytes: float = 0.0  # bandwidth x downtime-limit after this round


@dataclass
class Progress:
    """The live state, read by progress bars and query-migrate while the driver runs."""

    status: str = "setup"  # QEMU's MigrationStatus values
    start: float = 0.0
    setup_time: float = 0.0
    total_pages: int = 0
    transferred: int = 0
    pages_sent: int = 0
    remaining_pages: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: float = 0.0  # pages/s over the last sync period
    bandwidth: float = 0.0  # bytes/s, last round
    pages_per_second: float = 0.0
    expected_downtime_ms: float = 0.0
    throttle_pct: int = 0
    psp_commands: int = 0
    psp_doorbells: int = 0
    psp_seconds: float = 0.0
    rounds: list[Round] = field(default_factory=list)
    downtime: float = 0.0
    total_time: float = 0.0
    pause_time: float = 0.0  # world clock at pause (downtime start)
    switchover: str = ""  # why pre-copy ended: converged | max-rounds | timeout
    error: str = ""


Observer = Callable[[str, Progress], None]  # (event, progress): "round", "chunk", "status"


def _noop(event: str, progress: Progress) -> None:
    pass


class Driver:
    """Runs one pre-copy migration against a world. Not reusable."""

    def __init__(
        self,
        world: World,
        params: MigrationParams,
        observer: Observer = _noop,
        should_cancel: Callable[[], bool] = lambda: False,
        chunk_target_s: float = CHUNK_TARGET_S,
    ) -> None:
        params.validate()
        self.chunk_target_s = chunk_target_s  # a model, on a simulated clock, wants it large
        self.world = world
        self.params = params
        self.policy: ThrottlePolicy = make_policy(params.throttle, params.throttle_params)
        self.observe = observer
        self.should_cancel = should_cancel
        self.progress = Progress()
        self._window_start = 0.0
        self._window_bytes = 0
        self._chunk = 256
        self._costs: list[tuple[int, int, float]] = []  # (commands, bytes, seconds) per send

    # -- throttle control, as the policy sees it ----------------------------------------
    def set_throttle(self, pct: int) -> None:
        self.world.set_throttle(pct)
        self.progress.throttle_pct = pct

    def set_dirty_limit(self, pages_per_s: float | None) -> None:
        self.world.set_dirty_limit(pages_per_s)

    # -- the algorithm ------------------------------------------------------------------
    def run(self) -> Progress:
        w, p, prog = self.world, self.params, self.progress
        prog.start = w.now()
        self._status("setup")
        w.start_dirty_log()
        pages = w.all_pages()
        prog.total_pages = len(pages)
        prog.remaining_pages = len(pages)
        prog.setup_time = w.now() - prog.start
        self._status("active")
        self.policy.start(self, w.now(), prog.transferred)

        rnd = self._send_round(0, "bulk", pages, dirty=len(pages))
        while True:
            dirty = w.harvest()
            sync_time = w.now()
            prog.dirty_sync_count += 1
            prog.remaining_pages = len(dirty)
            period = max(sync_time - (prog.start + rnd.start), 1e-9)
            prog.dirty_pages_rate = len(dirty) / period
            remaining = len(dirty) * PAGE_SIZE
            bw = max(rnd.bandwidth, 1.0)
            rnd.threshold_bytes = bw * p.downtime_limit_ms / 1000
            if p.switchover is Switchover.FIRMWARE:
                expected = self._predict(dirty) + p.switchover_fixed_ms / 1000
                fits = expected * 1000 <= p.downtime_limit_ms
            else:
                expected = remaining / bw
                fits = remaining <= rnd.threshold_bytes
            prog.expected_downtime_ms = expected * 1000
            self.observe("sync", prog)
            if fits:
                prog.switchover = "converged"
                break
            iterative = rnd.index  # rounds done after the bulk one
            if p.max_rounds and iterative >= p.max_rounds:
                prog.switchover = "max-rounds"
                break  # QEMU has no cap; Cloud Hypervisor's old one paused regardless
            if p.timeout_s and sync_time - prog.start >= p.timeout_s:
                if p.timeout_action is TimeoutAction.CANCEL:
                    raise MigrationCancelled(
                        f"timeout: not converged after {p.timeout_s:g} s "
                        f"({remaining / 2**20:.1f} MiB still dirty, threshold "
                        f"{rnd.threshold_bytes / 2**20:.1f} MiB). Try: {self._advice()}"
                    )
                prog.switchover = "timeout"
                break
            self.policy.on_sync(self, Sync(sync_time, len(dirty), prog.transferred))
            rnd = self._send_round(rnd.index + 1, "iterative", dirty, dirty=len(dirty))

        # stop-and-copy
        self._status("device")
        w.pause_guest()
        prog.pause_time = w.now()
        # what the last sync found is still unsent: it goes now, with what came since
        final = np.union1d(dirty, w.harvest())
        prog.dirty_sync_count += 1
        last = self._send_round(rnd.index + 1, "stop-and-copy", final, dirty=len(final),
                                rate_limited=False)
        state = w.send_vcpu_state()
        self._account(last, state)
        running_at = w.complete()
        end = w.now()
        last.duration = running_at - (prog.start + last.start)
        prog.downtime = running_at - prog.pause_time
        prog.total_time = end - prog.start
        prog.remaining_pages = 0
        self._status("completed")
        return prog

    def _advice(self) -> str:
        """What a user whose migration did not converge can change, most useful first."""
        p = self.params
        tips = []
        if p.batching not in (Batching.AEAD, Batching.SG):
            tips.append("--batching aead (fewer, cheaper firmware commands)")
        if p.throttle is ThrottleKind.NONE:
            tips.append("--throttle auto-converge (slows the guest's writes)")
        tips.append(f"a larger --downtime-limit (now {p.downtime_limit_ms} ms)")
        if p.timeout_action is TimeoutAction.CANCEL:
            tips.append("--timeout-action force (stop and copy what is left)")
        tips.append("a longer --timeout")
        return "; ".join(tips)

    def _send_round(
        self, index: int, kind: str, pfns: np.ndarray, *, dirty: int, rate_limited: bool = True
    ) -> Round:
        w, p, prog = self.world, self.params, self.progress
        t0 = w.now()
        rnd = Round(index, kind, start=t0 - prog.start, dirty_pages=dirty,
                    throttle_pct=prog.throttle_pct)
        prog.rounds.append(rnd)
        self._window_start, self._window_bytes = t0, 0
        shared = w.shared_mask(pfns)
        if shared.any():
            self._account(rnd, w.send_shared(pfns[shared]))
            pfns = pfns[~shared]
        lo = 0
        while lo < len(pfns):
            if kind != "stop-and-copy" and self.should_cancel():
                raise MigrationCancelled("migration cancelled")
            chunk = pfns[lo : lo + self._chunk]
            lo += len(chunk)
            t = w.now()
            bounds = plan_batches(chunk, p.batching, p.cap)
            sent = w.send_private(chunk, bounds, p.queue)
            dt = w.now() - t
            self._adapt_chunk(len(chunk), dt)
            self._costs = [*self._costs[-63:], (len(bounds) - 1, sent.bytes, dt)]
            self._account(rnd, sent)
            prog.remaining_pages = max(0, prog.remaining_pages - sent.pages)
            if rate_limited and p.max_bandwidth:
                self._rate_limit(sent.bytes)
            self.observe("chunk", prog)
        rnd.duration = w.now() - t0
        rnd.bandwidth = rnd.bytes / rnd.duration if rnd.duration > 0 else 0.0
        prog.bandwidth = rnd.bandwidth
        prog.pages_per_second = rnd.pages / rnd.duration if rnd.duration > 0 else 0.0
        self.observe("round", prog)
        return rnd

    def _predict(self, pfns: np.ndarray) -> float:
        """Seconds to send ``pfns`` as they would be batched, from the recent sends:
        t = a x commands + b x bytes, fitted by least squares (a, b >= 0)."""
        if not self._costs or len(pfns) == 0:
            return 0.0
        p = self.params
        cmds = len(plan_batches(pfns, p.batching, p.cap)) - 1
        nbytes = len(pfns) * PAGE_SIZE
        x = np.array([(c, b) for c, b, _ in self._costs], dtype=float)
        y = np.array([t for _, _, t in self._costs], dtype=float)
        ratio = x[:, 1] / np.maximum(x[:, 0], 1.0)
        if ratio.max() < 1.2 * ratio.min():
            # every send had the same bytes per command (the bulk round; page mode): the
            # split is unknowable, so charge it all per command: pessimistic for a dirty
            # set that batches worse, exact for one that batches the same
            return float(y.sum() / max(x[:, 0].sum(), 1.0) * cmds)
        scale = x.max(axis=0)
        coef, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
        a, b = np.maximum(coef, 0.0) / scale
        return float(a * cmds + b * nbytes)

    def _adapt_chunk(self, pages: int, seconds: float) -> None:
        if seconds <= 0:
            return
        cap = self.params.cap
        want = int(pages / seconds * self.chunk_target_s)
        if self.params.max_bandwidth:  # no burst larger than half a rate window's budget
            want = min(want, int(self.params.max_bandwidth * RATE_WINDOW_S / 2 / PAGE_SIZE))
        want = max(MIN_CHUNK_PAGES, min(MAX_CHUNK_PAGES, want))
        self._chunk = max(cap, want - want % cap)  # whole commands per chunk

    def _account(self, rnd: Round, sent: Sent) -> None:
        prog = self.progress
        rnd.pages += sent.pages
        rnd.bytes += sent.bytes
        rnd.commands += sent.commands
        rnd.doorbells += sent.doorbells
        rnd.psp_seconds += sent.psp_seconds
        prog.transferred += sent.bytes
        prog.pages_sent += sent.pages
        prog.psp_commands += sent.commands
        prog.psp_doorbells += sent.doorbells
        prog.psp_seconds += sent.psp_seconds

    def _rate_limit(self, nbytes: int) -> None:
        """max-bandwidth: pace every send so the bytes so far fit the rate. (QEMU spends a
        100 ms budget, then sleeps; pacing each chunk avoids the bursts that makes.)"""
        w = self.world
        self._window_bytes += nbytes
        due = self._window_start + self._window_bytes / self.params.max_bandwidth
        now = w.now()
        if due > now:
            # in slices: a cancel cuts the pacing short within 0.1 s (the next chunk's
            # check then raises it; a low max-bandwidth can make one pause seconds long)
            while due > now and not self.should_cancel():
                w.sleep(min(due - now, 0.1))
                now = w.now()
        elif now - due > RATE_WINDOW_S:
            # fell behind the rate (the link is slower): don't bank the slack as a burst
            self._window_start, self._window_bytes = now, 0

    def _status(self, status: str) -> None:
        self.progress.status = status
        self.observe("status", self.progress)

