"""The pre-copy driver: every decision of a migration, as pure logic over a small world.

What to send next, how to batch it, when to throttle, when to stop and copy. The real
engine binds `World` to the guest, the secure processor and the wire; a model binds it to
a simulated clock. One driver, two worlds.

The algorithm is QEMU's, by rounds: a bulk round over every page, then iterative rounds
over the dirty set; after each dirty-log sync, switch over when the stop is predicted to
fit the downtime-limit. The default rule (``firmware``) predicts the whole stop: the fixed
costs the hosts measured (pause, VMSAs, trailer, RECEIVE_FINISH, starting the vCPUs,
migration/stopcost.py), the frames still in flight, and the dirty set priced by the
firmware commands it needs, at a cost per command and per byte fitted from this
migration's own sends. QEMU's rule (``qemu``: remaining bytes <= bandwidth x limit,
``migration_iteration_run``) stays available. Near the stop, commands and sends are sized
to the budget, so that on slow hardware one big command cannot blow it.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from cvmig.migration.batching import SCATTERED, default_cap, plan_batches, validate_cap
from cvmig.migration.stopcost import StopCosts
from cvmig.migration.throttle import (
    Sync,
    ThrottleKind,
    ThrottleParams,
    ThrottlePolicy,
    make_policy,
)
from cvmig.psp.api import PAGE_SIZE, Batching, packet_size

# Pages handed to the world per send: sized so one send takes about CHUNK_TARGET_S at the
# rate measured so far, so that cancel, rate-limit and flow-control checks stay frequent
# whether a page costs 5 µs (sg here) or 2.5 ms (2020 SEV hardware); short sends also keep
# the two frames in flight at the switch short.
CHUNK_TARGET_S = 0.025
MIN_CHUNK_PAGES = 16
MAX_CHUNK_PAGES = 1024  # what one PAGES frame carries (cvmig.wire.protocol)
RATE_WINDOW_S = 0.1  # QEMU's BUFFER_DELAY: the max-bandwidth budget is per 100 ms
# near the stop (iterative rounds, stop-and-copy), so that the last commands fit the budget:
STOP_CMD_SHARE = 0.1  # one firmware command takes at most this share of downtime-limit
STOP_SEND_SHARE = 1 / 12  # one send (a frame) at most this share: the frames in flight
MAX_EXTRA_ROUNDS = 12  # rounds after the stop first fits, each only if it shortens it ...
EXTRA_ROUND_S = 1.0  # ... takes at most this long ...
EXTRA_ROUND_GAIN = 0.8  # ... leaves a stop at most this share of the one it puts off ...
EXTRA_ROUND_AHEAD = 3  # ... within this many rounds (if each sends less than the last) ...
EXTRA_ROUND_PAID = 0.9  # ... and the one before it did (its stop is this much shorter)
EXTRA_ROUND_STRIKES = 2  # ... or, of those that did not, fewer than this many in a row
UNKEEPABLE_SHARE = 0.25  # a limit the fixed costs exceed: the pages' share allowed
PIPELINE_FRAMES = 2  # frames in flight at the switch: one being imported, one on the wire
LANDING_BOUND = 2.0  # a wait for the frames in flight to land: at most this x their estimate
LATENCY_KEEP = 16  # when they should land: recent frames' submission -> ACK times kept ...
LATENCY_QUANTILE = 0.75  # ... and the share of them the estimate covers (landing_quantile)
PROBE_SENDS = (6, 8)  # bulk sends made with small commands, so per-command and per-byte
# costs can be told apart (the bulk's own commands all have the same size); after the
# pipeline has filled, so they see the same back-pressure as the rest


def landing_quantile(took: Sequence[float]) -> float:
    """What recent frames took from submission to ACK, as the estimate of when the frames
    in flight land counts it (their LATENCY_QUANTILE)."""
    return sorted(took)[int(LATENCY_QUANTILE * (len(took) - 1))]


class TimeoutAction(enum.StrEnum):
    CANCEL = "cancel"
    FORCE = "force"


class Switchover(enum.StrEnum):
    """How the driver predicts the stop-and-copy time it compares with downtime-limit."""

    QEMU = "qemu"  # remaining bytes / the last round's bandwidth (QEMU's rule)
    FIRMWARE = "firmware"  # the commands the dirty set needs x measured cost per command,
    # plus its bytes x measured cost per byte: a scattered dirty set batches worse than the
    # bulk round did, and the firmware's per-command cost is what dominates SEV migration


class ParamsFeed:
    """Parameters changed while a migration runs (QMP's migrate-set-parameters): the
    monitor puts the newest, the driver takes it between sends. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._new: MigrationParams | None = None

    def put(self, params: MigrationParams) -> None:
        with self._lock:
            self._new = params

    def take(self) -> MigrationParams | None:
        with self._lock:
            new, self._new = self._new, None
        return new


@dataclass(frozen=True)
class MigrationParams:
    """Everything a user can set; QEMU's names and defaults where QEMU has them.
    (User-facing names, ranges and defaults: `cvmig.migration.parameters`.)"""

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
    switchover: Switchover = Switchover.FIRMWARE
    # firmware estimate only: what stopping costs besides the pages (pause, VMSAs, trailer,
    # RECEIVE_FINISH, starting the vCPUs there); -1 = as measured (migration/stopcost.py)
    switchover_fixed_ms: int = -1
    # where changes made during the migration arrive (None: fixed for the whole run)
    updates: ParamsFeed | None = field(default=None, compare=False, repr=False)

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
        if self.switchover_fixed_ms < -1:
            raise ValueError("switchover fixed cost must be >= 0 ms (or -1: as measured)")
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

    # Optional, looked up by name: ``stop_costs() -> StopCosts``, the fixed costs of the
    # stop as measured on these hosts (none: nothing counted); ``frames_in_flight() ->
    # int``, frames sent and not yet acknowledged by the destination (else
    # ``pipeline_frames``, default PIPELINE_FRAMES); ``wait_landed(timeout: float)``,
    # wait until the destination has acknowledged every frame sent, at most ``timeout``
    # seconds (else the driver sleeps ``timeout``, its estimate of their time);
    # ``landing_in() -> float | None``, seconds until they should have landed, as recent
    # frames took (None: not known yet).


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
    stop_costs: dict[str, float] = field(default_factory=dict)  # ms, counted by the rule
    stop_costs_measured: dict[str, float] = field(default_factory=dict)  # ms, this stop
    stop_cap: int = 0  # pages per command in stop-and-copy
    # each sync's own time: harvesting the dirty log and deciding on it, a wait for frames
    # to land left out (the model's `Costs.sync`); the last is the stop's, after the pause
    sync_seconds: list[float] = field(default_factory=list)


# (event, progress): "round", "chunk", "status", "sync", "paused"; the source adds
# "handed-off" (the destination owns the guest)
Observer = Callable[[str, Progress], None]


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
        # per send: (commands, bytes, seconds it took, seconds in the source's firmware)
        self._costs: list[tuple[int, int, float, float]] = []
        self._probes: list[tuple[int, int, float, float]] = []  # the bulk's small commands
        self._sent_at = 0.0  # when the last send returned
        self._in_flight = 0.0  # seconds of sent frames not yet through, at the last sync
        self._extra_rounds = 0  # rounds made after the stop first fitted
        self._put_off = math.inf  # the stop (less frames in flight) the last of them put off
        self._unpaid = 0  # of them, how many in a row did not shorten the stop they put off
        self._harvest_s = 0.0  # the last harvest of the dirty log took this long
        get = getattr(world, "stop_costs", None)
        self.stop: StopCosts = get() if callable(get) else StopCosts()
        self.pipeline_frames = int(getattr(world, "pipeline_frames", PIPELINE_FRAMES))
        self.progress.stop_costs = self.stop.as_ms()

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
        last_sync = w.now()
        pages = w.all_pages()
        prog.total_pages = len(pages)
        prog.remaining_pages = len(pages)
        prog.setup_time = w.now() - prog.start
        self._status("active")
        self.policy.start(self, w.now(), prog.transferred)

        rnd = self._send_round(0, "bulk", pages, dirty=len(pages))
        while True:
            p = self._take_updates()
            began, waited = w.now(), 0.0
            dirty = self._harvest()
            prev_sync = last_sync
            sync_time = last_sync = self._synced(dirty, prev_sync)
            bw = max(rnd.bandwidth, 1.0)
            rnd.threshold_bytes = bw * p.downtime_limit_ms / 1000
            if p.switchover is Switchover.FIRMWARE:
                expected = self.expected_downtime(dirty)
                fits = self._fits(expected)
                # frames in flight in the way, or a good share of the stop? let them land
                # while the guest still runs (no empty rounds spinning)
                later = self._after_landing(expected)
                shorter = later < expected - STOP_SEND_SHARE * p.downtime_limit_ms / 1000
                if self._in_flight > 0 and self._fits(later) and (not fits or shorter):
                    dirty, sync_time, waited = self._land(dirty, prev_sync)
                    last_sync = sync_time
                    expected = self.expected_downtime(dirty)
                    fits = self._fits(expected)
            else:
                remaining = len(dirty) * PAGE_SIZE
                expected = remaining / bw
                fits = remaining <= rnd.threshold_bytes
            prog.expected_downtime_ms = expected * 1000
            self.observe("sync", prog)
            cost = self._page_cost()
            sync = Sync(sync_time, len(dirty), prog.transferred,
                        PAGE_SIZE / cost if cost > 0 else 0.0)
            # an extra round is a choice, not a failure to converge: where the round cap or
            # the timeout comes first, the stop that fitted is taken
            extra = fits and p.switchover is Switchover.FIRMWARE and \
                self._one_more(dirty, expected, self.policy.share_after(sync))
            if extra:
                fits = False  # a short round now buys a clearly shorter stop
                self._extra_rounds += 1
            elif fits and p.switchover is Switchover.FIRMWARE and self._lands_first(expected):
                # about to stop behind frames in flight that are a good share of the stop:
                # they land first, while the guest runs, on the extra round's terms (a
                # wait is a round with nothing to send); what it wrote meanwhile goes in
                # the stop, priced again
                dirty, sync_time, more = self._land(dirty, prev_sync)
                last_sync, waited = sync_time, waited + more
                expected = self.expected_downtime(dirty)
                fits = self._fits(expected)
                prog.expected_downtime_ms = expected * 1000
            prog.sync_seconds.append(w.now() - began - waited)
            if fits:
                prog.switchover = "converged"
                break
            if self.should_cancel():  # a round with nothing to send checks nothing else
                raise MigrationCancelled("migration cancelled")
            iterative = rnd.index  # rounds done after the bulk one
            if p.max_rounds and iterative >= p.max_rounds:
                prog.switchover = "converged" if extra else "max-rounds"
                break  # QEMU has no cap; Cloud Hypervisor's old one paused regardless
            if p.timeout_s and sync_time - prog.start >= p.timeout_s:
                if extra:
                    prog.switchover = "converged"
                    break
                if p.timeout_action is TimeoutAction.CANCEL:
                    raise MigrationCancelled(
                        f"timeout: not converged after {p.timeout_s:g} s "
                        f"({len(dirty) * PAGE_SIZE / 2**20:.1f} MiB still dirty, threshold "
                        f"{rnd.threshold_bytes / 2**20:.1f} MiB). Try: {self._advice()}"
                    )
                prog.switchover = "timeout"
                break
            self.policy.on_sync(self, sync)
            rnd = self._send_round(rnd.index + 1, "iterative", dirty, dirty=len(dirty))

        # stop-and-copy
        self._status("device")
        w.pause_guest()
        prog.pause_time = w.now()
        self.observe("paused", prog)  # the vCPUs have stopped: STOP's moment
        # what the last sync found is still unsent: it goes now, with what came since
        began = w.now()
        final = np.union1d(dirty, w.harvest())
        prog.dirty_sync_count += 1
        a, b = self._fit()
        prog.stop_cap = self._stop_cap(len(final), a, b)
        prog.sync_seconds.append(w.now() - began)
        last = self._send_round(rnd.index + 1, "stop-and-copy", final, dirty=len(final),
                                rate_limited=False, cap=prog.stop_cap)
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

    def _harvest(self) -> np.ndarray:
        """The dirty log's harvest, timed: the stop harvests once more, paused, and the
        rule counts it as long as the last."""
        began = self.world.now()
        dirty = self.world.harvest()
        self._harvest_s = self.world.now() - began
        return dirty

    def _synced(self, dirty: np.ndarray, since: float) -> float:
        """Count a harvest that found ``dirty``; return when. Its rate is over the time
        since the harvest at ``since`` (QEMU's time_last_bitmap_sync), not since the round
        began: a wait for frames to land in between dirties pages too, and a rate over the
        round alone read them as a guest writing half as fast again."""
        prog, now = self.progress, self.world.now()
        prog.dirty_sync_count += 1
        prog.remaining_pages = len(dirty)
        prog.dirty_pages_rate = len(dirty) / max(now - since, 1e-9)
        return now

    def _take_updates(self) -> MigrationParams:
        """Adopt parameters changed mid-migration, if any (checked by whoever put them;
        the non-live ones, batching and throttle kind, never differ): the policy reads
        its own from now on, and the rate window starts afresh."""
        feed = self.params.updates
        new = feed.take() if feed is not None else None
        if new is not None:
            new.validate()
            self.params = replace(new, updates=feed)
            pol = self.policy
            pol.params = new.throttle_params
            if pol.pct > new.throttle_params.max_cpu_throttle:
                pol._set(self, pol.pct)  # clamps to the new max-cpu-throttle at once
            if pol.dirty_limit is not None:  # dirty-limit already on: the new quota
                pol.dirty_limit = new.throttle_params.vcpu_dirty_limit * 1e6 / PAGE_SIZE
                self.set_dirty_limit(pol.dirty_limit)
            self._window_start, self._window_bytes = self.world.now(), 0
        return self.params

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
        self, index: int, kind: str, pfns: np.ndarray, *, dirty: int, rate_limited: bool = True,
        cap: int = 0,
    ) -> Round:
        w, p, prog = self.world, self.params, self.progress
        near_stop = kind != "bulk"
        if not cap:
            cap = self._round_cap(*self._fit()) if near_stop else p.cap
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
        sends = 0
        while lo < len(pfns):
            if kind != "stop-and-copy" and self.should_cancel():
                raise MigrationCancelled("migration cancelled")
            p = self._take_updates()  # a new max-bandwidth paces the very next send
            probe = kind == "bulk" and sends in PROBE_SENDS and cap > 1
            # a round's last sends are short too (commands and frames): a switch may
            # follow at once, and what is then in flight lands in the downtime
            end = not near_stop and len(pfns) - lo <= 4 * self._chunk
            use = max(1, cap // 8) if probe else self._round_cap(*self._fit()) if end else cap
            size = min(self._chunk, 4 * cap) if probe else self._chunk  # a few commands
            chunk = pfns[lo : lo + min(size, self._frame_pages(use))]
            lo += len(chunk)
            t = w.now()
            bounds = plan_batches(chunk, p.batching, use)
            sent = w.send_private(chunk, bounds, p.queue)
            self._sent_at = w.now()
            dt = self._sent_at - t
            sends += 1
            cost = (len(bounds) - 1, sent.bytes, dt, sent.psp_seconds)
            if probe:
                self._probes.append(cost)
            else:
                self._adapt_chunk(len(chunk), dt, use, near_stop or end)
                self._costs = [*self._costs[-63:], cost]
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

    def expected_downtime(self, dirty: np.ndarray) -> float:
        """Seconds from the pause to the guest running at the destination, if the stop
        came now: the measured fixed costs, the stop's own harvest of the dirty log (as
        long as the last: a walk over all of memory, ~0.6 ms at 128 MiB here, far more at
        64 GiB), the frames still in flight, the dirty set (and what the guest writes while
        it is being paused) priced by its firmware commands at the stop's cap, and the last
        frame's way through the destination."""
        a, b = self._fit()
        extra = int(self.progress.dirty_pages_rate * self.stop.pause)
        n = len(dirty) + extra
        cap = self._stop_cap(n, a, b)
        cmds = len(plan_batches(dirty, self.params.batching, cap)) - 1
        cmds += math.ceil(extra / cap) if self.params.batching in SCATTERED else extra
        pages = self._slowdown() * (a * cmds + b * n * PAGE_SIZE)
        # the frames still in flight (as many as the world counts unacknowledged, each
        # as long as it took to send) drain while we decide: what is left of them
        count = getattr(self.world, "frames_in_flight", None)
        n = int(count()) if callable(count) else self.pipeline_frames
        last = sum(c[2] for c in self._costs[-n:]) if n > 0 else 0.0
        in_flight = max(0.0, last - (self.world.now() - self._sent_at))
        # ... or as long as recent frames took to be acknowledged, where the world knows
        # and the destination is the slower end (the longer: it errs on the safe side)
        landing = getattr(self.world, "landing_in", None)
        seen = landing() if callable(landing) and n > 0 else None
        if seen is not None:
            in_flight = max(in_flight, seen)
        self._in_flight = in_flight
        tail = min(pages, self._send_target(True))
        return self._fixed() + self._harvest_s + in_flight + pages + tail

    def _await_landed(self, estimate: float) -> None:
        """Let the frames in flight land while the guest runs: until the destination has
        acknowledged them, at most twice the ``estimate`` of their time (what lands later
        lands in the stop); where the world cannot tell, for the estimate."""
        land = getattr(self.world, "wait_landed", None)
        if callable(land):
            land(LANDING_BOUND * estimate)
        else:
            self.world.sleep(estimate)

    def _fits(self, expected: float) -> bool:
        """Whether a stop predicted to take ``expected`` seconds may start. Where stopping
        alone costs (nearly) the whole limit, the limit cannot be kept: stop once the
        rest is a small share of it, rather than never."""
        limit, fixed = self.params.downtime_limit_ms / 1000, self._fixed()
        return expected <= limit or (fixed >= (1 - UNKEEPABLE_SHARE) * limit
                                     and expected - fixed <= UNKEEPABLE_SHARE * limit + 1e-9)

    def _one_more(self, dirty: np.ndarray, expected: float, share: float = 1.0) -> bool:
        """Whether one more round, cheap and short, should come before a stop that fits:
        when sending the dirty set takes a fraction of a second and the guest dirties so
        few pages meanwhile that the stop after it would be at least a fifth shorter.
        (Batching makes rounds short: without this, a mode whose rounds are fast would
        stop at the first fit like the slowest, and gain no downtime from its speed.)

        Rounds go on while each pays, down to the floor where the fixed costs dominate,
        not a set number of them: a set number leaves the stop wherever the first fit
        happened to fall below the limit (from a few ms to the whole limit, run to run),
        halved that many times. Two rounds in a row that did not shorten the stop they put
        off end them (the guest writes faster than the prediction assumed). One alone
        does not: its sync may have come late (the wait for the frames in flight lets the
        guest write on, a dirtier a timeslice's pages at once), so the round found more
        than it sent though the guest wrote at the rate predicted; stopping then stopped
        on the larger set, 2-3x the stop its cell's other runs made (16 of 252 runs of the
        third grid). The next round prices the stop afresh.

        A round is judged by where the next few lead (EXTRA_ROUND_AHEAD, within
        EXTRA_ROUND_S), not by the next alone: a guest that writes at 0.6-0.85 of what the
        rounds send buys at most a fifth off the stop in one round (its ratio below 0.8
        to pay, while sending dominates; now about 0.9, where a round that does what was
        predicted still shortens its stop by the tenth the strikes ask), so one round's
        priced gain sat on the rule's edge, and the price of a scattered page moving by a
        third run to run (101-155 µs, contig after its bulk) decided whether the stop came
        straight after the bulk (147-176 ms) or rounds went on (32-83 ms).

        ``share``: of its present rate, what the throttle policy would leave the guest in
        that round (`ThrottlePolicy.share_after`): a throttle about to bite makes a round
        pay that would not otherwise (a stop of 170 ms where the same guest, throttled,
        stops for 8)."""
        if self._extra_rounds >= MAX_EXTRA_ROUNDS or len(dirty) == 0:
            return False
        fixed = self._fixed()
        now = expected - self._in_flight
        if self._extra_rounds and now > EXTRA_ROUND_PAID * self._put_off:
            self._unpaid += 1
            if self._unpaid >= EXTRA_ROUND_STRIKES:
                return False
        else:
            self._unpaid = 0
        send = now - fixed
        if send <= 0 or send > EXTRA_ROUND_S:
            return False
        # each round sends what the one before let the guest write: the stop's sending
        # part shrinks by this ratio a round (less than 1: the rounds converge)
        ratio = self.progress.dirty_pages_rate * share * self._page_cost()
        if ratio >= 1:
            return False
        rounds, spent = 1, send
        while rounds < EXTRA_ROUND_AHEAD and spent + send * ratio**rounds <= EXTRA_ROUND_S:
            spent += send * ratio**rounds
            rounds += 1
        # (send holds the stop's harvest, which no round shrinks. Counting it as fixed, or
        # capping the rounds looked ahead by those left, was tried: the model stopped 1-10
        # ms higher at the floor in 15 of the issue grid's 63 cells, and its error grew)
        after = fixed + send * ratio**rounds
        if after >= EXTRA_ROUND_GAIN * now:
            return False
        self._put_off = now
        return True

    def _lands_first(self, expected: float) -> bool:
        """Whether a stop predicted at ``expected`` seconds should wait for the frames in
        flight first: the stop after them, with what the guest writes meanwhile, at most
        EXTRA_ROUND_GAIN of this one, for a wait within EXTRA_ROUND_S. (The wait before
        the one-more rule asks more, a send's share of the limit: there a round would
        follow and overlap them anyway. Before, an idle sg guest stopped behind its last
        1 MiB frames in 4 of 9 runs of the issue grid: 13-16 ms against 7-9.)"""
        if self._in_flight <= 0 or self._in_flight > EXTRA_ROUND_S:
            return False
        later = self._after_landing(expected)
        return later <= EXTRA_ROUND_GAIN * expected and self._fits(later)

    def _after_landing(self, expected: float) -> float:
        """The stop predicted at ``expected`` seconds, once the frames in flight have
        landed: without them, and with what the guest writes while they do."""
        wait = self._in_flight
        return expected - wait + self.progress.dirty_pages_rate * wait * self._page_cost()

    def _land(self, dirty: np.ndarray, since: float) -> tuple[np.ndarray, float, float]:
        """Let the frames in flight land while the guest runs, then harvest what it wrote
        meanwhile, so that the stop or the round that comes next, and its price, see the
        whole dirty set (priced by the rate, it went uncounted in a round's send and made
        the round after it look no shorter): the dirty set, the sync's time, the wait."""
        landing = self.world.now()
        self._await_landed(self._in_flight)
        waited = self.world.now() - landing
        dirty = np.union1d(dirty, self._harvest())
        return dirty, self._synced(dirty, since), waited

    def _page_cost(self) -> float:
        """Seconds one more scattered page adds to the stop (a command of its own unless
        the mode batches scattered pages). Under contig it prices a contiguous writer's
        pages, whose runs merge, too high; priced by the set at hand instead, a scattered
        writer's dense first sets (their neighbours merge) made precopy throttle too little
        for the sparse ones after them: 1.3 -> 1.9 s and 21 -> 49 ms at 16 MiB
        (docs/results/precopy-ab/review)."""
        a, b = self._fit()
        per_cmd = self.params.cap if self.params.batching in SCATTERED else 1
        return self._slowdown() * (a / per_cmd + b * PAGE_SIZE)

    def _fixed(self) -> float:
        p = self.params
        return p.switchover_fixed_ms / 1000 if p.switchover_fixed_ms >= 0 else self.stop.total()

    def _slowdown(self) -> float:
        """How much longer the recent sends took than their firmware time: the pipeline's
        other stages (the destination's PSP, the link, a shared CPU), 1 when the source's
        PSP is the bottleneck."""
        psp = sum(c[3] for c in self._costs)
        if psp <= 0:
            return 1.0  # a world that times no firmware: the fit is on wall time already
        return min(max(sum(c[2] for c in self._costs) / psp, 1.0), 4.0)

    def _frame_pages(self, cap: int) -> int:
        """Pages one send may carry in commands of ``cap``: scattered packets of few pages
        carry more header per page, and a frame must fit its transport slot."""
        mode = self.params.batching
        if mode not in SCATTERED or cap >= MAX_CHUNK_PAGES:
            return MAX_CHUNK_PAGES
        fit = packet_size(mode, MAX_CHUNK_PAGES) // packet_size(mode, cap)
        return max(cap, fit * cap)

    def _fit(self) -> tuple[float, float]:
        """Seconds per command and per byte, t = a x commands + b x bytes, fitted by least
        squares (a, b >= 0) to the firmware time of the recent sends and the bulk's probes
        (their wall time where the world times no firmware)."""
        data = self._probes + self._costs
        if not data:
            return 0.0, 0.0
        col = 3 if sum(c[3] for c in data) > 0 else 2
        x = np.array([(c[0], c[1]) for c in data], dtype=float)
        y = np.array([c[col] for c in data], dtype=float)
        per_cmd = float(y.sum() / max(x[:, 0].sum(), 1.0))
        ratio = x[:, 1] / np.maximum(x[:, 0], 1.0)
        if ratio.max() < 1.2 * ratio.min():
            # every send had the same bytes per command (page mode): the split is
            # unknowable, and needless: charge it all per command
            return per_cmd, 0.0
        scale = x.max(axis=0)
        coef, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
        a, b = coef / scale
        if a < 0:
            return 0.0, float(y.sum() / max(x[:, 1].sum(), 1.0))
        if b < 0:
            return per_cmd, 0.0
        return float(a), float(b)

    def _round_cap(self, a: float, b: float) -> int:
        """Pages per command near the stop: one command within STOP_CMD_SHARE of the
        limit (on 2020 hardware a 256-page command takes 130 ms)."""
        cap, pb = self.params.cap, b * PAGE_SIZE
        limit = self.params.downtime_limit_ms / 1000
        if cap > 1 and pb > 0 and limit > 0:
            cap = min(cap, max(1, int((STOP_CMD_SHARE * limit - a) / pb)))
        return cap

    def _stop_cap(self, n: int, a: float, b: float) -> int:
        """Pages per command for a stop of ``n`` pages: also small enough that the two
        secure processors overlap (the destination imports one frame while the source
        fills the next): n pages in commands of c cost n*a/c + n*b + (a + c*b) for the
        last one at the destination, least at c = sqrt(n*a/b)."""
        cap, pb = self._round_cap(a, b), b * PAGE_SIZE
        if cap > 1 and pb > 0 and n > 0:
            best = round(math.sqrt(n * a / pb))
            if a <= 0:
                # no cost per command in the fit is not cheap small commands but a cost
                # that is not a line over the sizes sent (sg's 256-page commands cost
                # more a page than its 64-page ones here, and a least-squares line through
                # them crosses zero): not below the smallest command measured. At cap 1,
                # sg stopped in 1-page commands at 120 µs each, 17-55 ms where the same
                # cells' other runs stopped for 8-27 (6 of 63 runs of the issue's grid)
                best = max(best, self._smallest_command())
            cap = min(cap, max(1, best))
        return cap

    def _smallest_command(self) -> int:
        """The fewest pages per command among the sends the cost fit is made of."""
        data = self._probes + self._costs
        return min((int(c[1] // c[0]) // PAGE_SIZE for c in data if c[0] > 0),
                   default=1)

    def _send_target(self, near_stop: bool) -> float:
        """Seconds one send should take: short near the stop, so what is in flight at the
        switch (and the last frame through the destination) stays a small share."""
        limit = self.params.downtime_limit_ms / 1000
        if near_stop and limit > 0:
            return min(self.chunk_target_s, limit * STOP_SEND_SHARE)
        return self.chunk_target_s

    def _adapt_chunk(self, pages: int, seconds: float, cap: int, near_stop: bool) -> None:
        if seconds <= 0:
            return
        want = int(pages / seconds * self._send_target(near_stop))
        if self.params.max_bandwidth:  # no burst larger than half a rate window's budget
            want = min(want, int(self.params.max_bandwidth * RATE_WINDOW_S / 2 / PAGE_SIZE))
        want = max(MIN_CHUNK_PAGES, min(MAX_CHUNK_PAGES, want))
        if want >= cap or not near_stop:
            self._chunk = max(cap, want - want % cap)  # whole commands per chunk
        else:
            # near the stop a send keeps its time, not a cap's worth of pages: scattered
            # pages take a command each, and 55 of them (contig64's cap there at 2020
            # prices) made a 140 ms frame, a 340 ms stop behind it. (In the bulk the
            # commands stay whole: fewer commands, the faster the round.)
            self._chunk = want

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

