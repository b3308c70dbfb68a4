"""The simulated world: the driver's interface on a virtual clock and a cost model.

The same `Driver` that moves real guests runs here, so what the model predicts is what
the engine does, at sizes and on hardware this machine does not have. It mirrors the
engine's data path (migration/source.py, sender.py, receiver.py, destination.py):

- the source's secure processor fills a transport slot (``slots`` of them) with a send's
  packets: per command ``t_cmd`` + its bytes / ``psp_bw``, plus ``t_doorbell`` per mailbox
  round trip (shared by a queue), plus ``t_send`` and ``t_page``, the engine's own work
  per send and per page new to the destination (the bulk's first touch of its memory);
- the frame goes on the link (``link_bw`` bytes/s, ``latency`` one way) once it is within
  the destination's ``window`` of unacknowledged frames, and frees its slot;
- the destination's secure processor imports it (``rx_t_cmd``, ``rx_psp_bw``, and the
  destination's own work beyond them, ``rx_lag``), one frame at a time, and acknowledges
  it; it imports none before ``dst_start`` (it readies itself first). Each PSP serves
  one command at a time, as hardware does; the three stages overlap, so a round costs its
  slowest stage;
- the stop: the measured fixed costs (`cvmig.migration.stopcost.StopCosts`) at the points
  where the engine pays them, the FINISH waiting behind every frame still in flight;
- the guest writes ``dirty_rate`` pages/s at random over ``working_set`` pages while it
  runs (``contiguous``: over its first pages in order), slowed by the throttle or its
  dirty limit. It writes as the engine's vCPUs do (`cvmig.guest.vcpu`): each vCPU at the
  start of its 10 ms timeslice, a slice's worth at once, and a throttle p puts it to
  sleep p / (1 - p) of a slice after each, read as the slice ends;
- on a host of ``cores`` CPUs (0: as many as needed, as on hardware, where the vCPUs
  have cores of their own and the PSP is a separate chip), the migration's own processes
  (``pipeline_cores`` of demand), the guest's vCPUs (``GuestModel.cpu``, less as the
  throttle bites) and the destination readying itself (``start_cpu`` CPU-seconds of
  work by ``start_cores`` processes) share the cores: when they ask for more than there
  is, each gets its share, and the migration's CPU work (the engine's own, and the
  secure processors' where they are software: ``psp_cpu``) slows by demand / cores, the
  guest's demand weighed ``guest_weight`` times.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field, replace

import numpy as np

from cvmig.migration.driver import LATENCY_KEEP, Progress, Sent, landing_quantile
from cvmig.migration.stopcost import StopCosts
from cvmig.psp.api import PACKET_HEADER_SIZE, PAGE_SIZE

WINDOW = 3  # cvmig.wire.protocol.WINDOW (imported lazily would pull in the wire)
SLOTS = 3  # cvmig.migration.source.SOURCE_SLOTS
SLICE = 0.010  # cvmig.guest.vcpu.SLICE: a vCPU's timeslice, s
THROTTLE_POLL = 0.05  # a throttle's sleep looks for a new throttle this often (guest.vcpu)


@dataclass
class Costs:
    t_doorbell: float = 30e-6  # mailbox round trip, s
    t_cmd: float = 10e-6  # fixed firmware work per command, s (source PSP)
    psp_bw: float = 1.5e9  # firmware bytes/s (source PSP)
    link_bw: float = 1.2e9  # wire bytes/s
    rx_t_cmd: float | None = None  # destination PSP per command incl. its doorbell (None: same)
    rx_t_doorbell: float = 0.0  # ... plus per doorbell, when rx_t_cmd leaves it out (a queue)
    rx_psp_bw: float | None = None  # destination PSP bytes/s (None: same)
    t_send: float = 0.0  # the engine's own work per send (plan, frame, hand-over), s
    t_page: float = 0.0  # ... and per page the destination receives for the first time
    latency: float = 0.0  # one way, s
    rx_lag: float = 0.0  # the destination's import takes this share of a frame's source
    # time more than its own costs say (receiving, checking, writing the pages in,
    # acknowledging): a few per cent make it the pipeline's slower end, so in a long round
    # the window fills and frames wait their turn, as the engine's acknowledgements show
    stop_rest: float = 0.0  # the part of a stop no measured part holds (FINISH's and
    # CONFIRM's way between the engines, the source's wake on CONFIRM), s: the idle runs'
    # downtime beyond the model's
    sync: float = 0.0  # a dirty-log sync's own time, s: the harvest and the driver's decision
    # on it (the engine's x-sync-ms); the guest runs on meanwhile, and its writes go to the
    # next harvest
    sync_page: float = 0.0  # ... and per guest page (the harvest scans the whole log)
    stop_sync: float = 0.0  # the stop's, after the pause (a harvest, no decision): in the
    stop_sync_page: float = 0.0  # downtime
    cores: float = 0.0  # the host's CPUs the migration shares with its guest (0: no sharing)
    pipeline_cores: float = 0.0  # cores the migration's processes keep busy on their own
    psp_cpu: bool = True  # the PSP costs are CPU work on those cores (the emulator)
    start_cpu: float = 0.0  # CPU-s the destination spends starting its vCPUs, during pre-copy
    start_cores: float = 2.0  # ... by this many processes at once
    dst_start: float = 0.0  # s after the dirty log starts before the destination imports a
    # frame: it maps the memory, runs RECEIVE_START and waits for its vCPUs to attach
    # (`cvmig.migration.destination`; its first ACK came 23-53 ms after the first frame)
    guest_weight: float = 1.0  # a busy guest's demand counts this many times: the
    # migration's stages hand work on to each other, and each waits while another is
    # descheduled, so a guest slows them more than its share of the cores says
    setup: float = 0.0  # s from the migration's start to its bulk round (the dirty log on)
    digest_page: float = 0.0  # s per page: the source measures its paused copy after the
    # go-ahead (the destination runs meanwhile), before it releases it: in the total time
    # cmd_table, rx_cmd_table: one command's measured cost by its pages at each end
    # (`cvmig.bench.psp`; the doorbell included), ((pages, ...), (seconds, ...)), where a
    # line is not close enough: a one-page command costs less than a line through the big
    # ones says. Interpolated; a queue's commands keep the line
    cmd_table: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    rx_cmd_table: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    stop: StopCosts = field(default_factory=lambda: StopCosts(pause=2e-3, grant=5e-3))
    window: int = WINDOW
    slots: int = SLOTS

    @staticmethod
    def by_table(table: tuple[tuple[float, ...], tuple[float, ...]], sizes: np.ndarray) -> float:
        """The commands' cost from a measured table, linear past its last point."""
        x, y = np.asarray(table[0]), np.asarray(table[1])
        cost = np.interp(sizes, x, y)
        over = sizes > x[-1]
        if over.any() and len(x) > 1:
            slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
            cost[over] = y[-1] + (sizes[over] - x[-1]) * slope
        return float(cost.sum())

    def at_pace(self, f: float) -> Costs:
        """These costs with every per-command, per-byte and per-page part ``f`` times as
        long (one run's pace on a shared machine against the median run's)."""
        def table(t: tuple[tuple[float, ...], tuple[float, ...]] | None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
            return None if t is None else (t[0], tuple(y * f for y in t[1]))

        return replace(self, t_doorbell=self.t_doorbell * f, t_cmd=self.t_cmd * f,
                       psp_bw=self.psp_bw / f,
                       rx_t_cmd=None if self.rx_t_cmd is None else self.rx_t_cmd * f,
                       rx_t_doorbell=self.rx_t_doorbell * f,
                       rx_psp_bw=None if self.rx_psp_bw is None else self.rx_psp_bw / f,
                       t_send=self.t_send * f, t_page=self.t_page * f,
                       cmd_table=table(self.cmd_table), rx_cmd_table=table(self.rx_cmd_table))

    def src_psp(self, ncmds: int, doorbells: int, nbytes: int,
                sizes: np.ndarray | None = None) -> float:
        """The source PSP's time for these commands (``sizes``: their pages, for the
        table where there is one)."""
        if self.cmd_table is not None and sizes is not None:
            return self.by_table(self.cmd_table, sizes)
        return doorbells * self.t_doorbell + ncmds * self.t_cmd + nbytes / self.psp_bw

    def dst_psp(self, ncmds: int, nbytes: int, doorbells: int | None = None,
                sizes: np.ndarray | None = None) -> float:
        if self.rx_cmd_table is not None and sizes is not None:
            return self.by_table(self.rx_cmd_table, sizes)
        bw = self.psp_bw if self.rx_psp_bw is None else self.rx_psp_bw
        if self.rx_t_cmd is None:  # the destination's firmware costs what the source's does
            return self.src_psp(ncmds, ncmds if doorbells is None else doorbells, nbytes) \
                - nbytes / self.psp_bw + nbytes / bw
        return (ncmds if doorbells is None else doorbells) * self.rx_t_doorbell \
            + ncmds * self.rx_t_cmd + nbytes / bw


PIPELINE_THREADS = 4  # the migration's busy threads: each end's engine and secure processor


def fair_share(demands: list[float], cores: float) -> float:
    """The most any one thread gets when threads asking ``demands`` cores share ``cores``
    fairly (water-filling: those asking less get all of it); inf when all fit."""
    left, n = cores, len(demands)
    for d in sorted(demands):
        if d * n > left:
            return left / n
        left, n = left - d, n - 1
    return float("inf")


@dataclass
class GuestModel:
    npages: int
    dirty_rate: float  # pages/s written while unthrottled
    working_set: int  # pages the writes fall on
    vcpus: int = 1
    shared_pages: int = 0  # the first pages: plaintext, sent without the firmware
    io_pages: int = 0  # of those, the I/O ring: the guest writes its pages in turn,
    io_rate: float = 0.0  # ... this many a second while it runs unthrottled (a record per
    # vCPU timeslice: the engine's guests, guest.vcpu.VcpuContext.io_write)
    cpu: float = 0.0  # cores the vCPUs keep busy while they run unthrottled
    contiguous: bool = False  # True: the dirty pages are the working set's first, in order
    hot_pages: int = 0  # pages rewritten in every interval it runs (a database's log), apart
    # from the working set, just below it,
    hot_runs: int = 1  # ... in this many runs a page apart (its tables' roots, its header)
    run_pages: int = 1  # the writes dirty runs of this many pages (a database's lie together)
    rate_under_load: bool = False  # dirty_rate was seen while a migration shared the host's
    # cores with it (not before): the model slows it only by what contention adds to that
    timeslice: float = SLICE  # each vCPU writes a slice's worth as its slice begins (the
    # engine's vCPUs); 0: the writes spread evenly over time
    seed: int = 1


@dataclass
class SimWorld:
    guest: GuestModel
    costs: Costs = field(default_factory=Costs)
    clock: float = 0.0
    throttle: float = 0.0
    dirty_limit: float | None = None  # pages/s per vCPU
    paused: bool = False
    resumed_at: float = 0.0  # when the destination's vCPUs run (its clock = ours)
    _last_accrue: float = 0.0
    _writes: float = 0.0  # writes since the last harvest
    _carry: float = 0.0  # fractional page left over from the last harvest
    _io_writes: float = 0.0  # I/O records since the last harvest (a fraction carried over)
    _io_next: int = 0  # the ring's page the next record goes to
    # per vCPU: when its current timeslice began, and when its next begins
    _slice_began: np.ndarray = field(init=False)
    _slice_next: np.ndarray = field(init=False)
    log: list[tuple[float, str]] = field(default_factory=list)
    # page versions on each side: a write bumps the source's, a send copies it across
    src_version: np.ndarray = field(init=False)
    dst_version: np.ndarray = field(init=False)
    # the pipeline: per frame, when it left the link and when the destination imported it
    _wire_done: list[float] = field(default_factory=list)
    _dst_done: list[float] = field(default_factory=list)
    _submitted: list[float] = field(default_factory=list)  # when the source handed it over
    _link_free: float = 0.0
    _dst_ready: float = 0.0  # when the destination imports its first frame

    def __post_init__(self) -> None:
        self._start_left = self.costs.start_cpu
        self.src_version = np.zeros(self.guest.npages, dtype=np.int64)
        self.dst_version = np.full(self.guest.npages, -1, dtype=np.int64)
        self._rng = np.random.default_rng(self.guest.seed)
        n = max(self.guest.vcpus, 1)
        self._slice_began = np.full(n, -SLICE)
        self._slice_next = np.zeros(n)
        self._ran_since_sync = False  # the guest ran since the last harvest (its hot pages are dirty)
        g = self.guest
        if not 1 <= g.hot_runs <= max(g.hot_pages, 1):
            raise ValueError(f"hot_runs must be 1..hot_pages ({g.hot_pages}), got {g.hot_runs}")
        if g.hot_pages + g.hot_runs - 1 + g.working_set > g.npages:
            raise ValueError("hot_pages (and the gaps between their runs) + working_set "
                             "exceed the guest's pages")
        self._hot = self._hot_layout()
        if not g.timeslice >= 0:
            raise ValueError(f"timeslice must be >= 0 s, got {g.timeslice}")
        if g.io_pages > g.shared_pages:
            raise ValueError("io_pages exceed the guest's shared pages")

    def guest_gap(self, p: Progress) -> float:
        """The pause as the guest sees it, at most: from the start of its last timeslice
        before the pause to its destination's vCPUs running."""
        s = self.costs.stop
        return self.resumed_at - (p.pause_time - s.pause) + s.slice

    def destination_matches(self) -> bool:
        """Whether every page arrived in its latest version (the engine's digest check)."""
        return bool(np.array_equal(self.src_version, self.dst_version))

    # -- what the driver counts -----------------------------------------------------------
    def stop_costs(self) -> StopCosts:
        return self.costs.stop

    # -- clock --------------------------------------------------------------------------
    def now(self) -> float:
        return self.clock

    def sleep(self, seconds: float) -> None:
        self.clock += max(0.0, seconds)

    # -- pages --------------------------------------------------------------------------
    def all_pages(self) -> np.ndarray:
        return np.arange(self.guest.npages, dtype=np.int64)

    def shared_mask(self, pfns: np.ndarray) -> np.ndarray:
        return pfns < self.guest.shared_pages

    def start_dirty_log(self) -> None:
        self.clock += self.costs.setup
        self._last_accrue = self.clock
        self._dst_ready = self.clock + self.costs.dst_start
        self._writes = 0.0
        self._io_writes = 0.0
        # the vCPUs' slices run out of step with the migration and each other
        ts = self.guest.timeslice
        self._slice_next = self.clock + self._rng.uniform(0.0, ts, len(self._slice_next))
        self._slice_began = self._slice_next - ts

    def _cycle(self) -> float:
        """A vCPU's timeslice and the throttle's sleep after it, s."""
        return self.guest.timeslice / max(1.0 - self.throttle, 1e-3)

    def _accrue(self) -> None:
        """Account the writes since the last change of rate. A vCPU writes its slice's
        share at once as the slice begins, and an I/O record (`GuestModel.timeslice`; a
        smooth rate never let a short round find nothing, where the engine's throttled
        guests, asleep between slices, let most of their last rounds find none and its
        stops came at the floor, the model's 1.5-2.5x above it)."""
        if not self.paused and not self.guest.timeslice:
            dt = self.clock - self._last_accrue
            self._writes += self.write_rate() * dt
            self._ran_since_sync |= dt > 0
            self._io_writes += self.guest.io_rate * (1.0 - self.throttle) * dt
        elif not self.paused:
            cycle = self._cycle()
            due = self._slice_next <= self.clock
            if due.any():
                k = np.floor((self.clock - self._slice_next[due]) / cycle) + 1
                self._slice_began[due] = self._slice_next[due] + (k - 1) * cycle
                self._slice_next[due] += k * cycle
                per = float(k.sum()) / len(self._slice_next)  # slices per vCPU
                self._writes += self.write_rate() * cycle * per
                self._io_writes += self.guest.io_rate * self.guest.timeslice * per
                self._ran_since_sync = True
        self._last_accrue = self.clock

    def write_rate(self) -> float:
        """Pages/s the guest writes now: what its throttle or dirty limit lets it, slowed
        where its vCPUs get less of the small host's cores than they ask for."""
        slow = self.guest_slowdown()
        if self.guest.rate_under_load:  # seen at the pace the migration left it
            slow /= self.guest_slowdown(unthrottled=True)
        return self._allowed_rate() / slow

    def guest_slowdown(self, unthrottled: bool = False) -> float:
        """How much slower the guest's vCPUs run than they ask to: the host's scheduler
        shares the cores out thread by thread, so a vCPU that asks for little (a dirtier
        that mostly sleeps) gets it all, and a busy one its share of what the migration's
        threads (``PIPELINE_THREADS``, each asking for a share of ``pipeline_cores``) and
        the destination's start work leave. ``unthrottled``: without a throttle, once the
        start work is done (the pace a rate seen during a migration was seen at)."""
        c, g = self.costs, self.guest
        if not c.cores or not g.vcpus or self.paused:
            return 1.0
        want, start = self._demand()
        if unthrottled:
            want, start = g.cpu, 0.0
        per = want / g.vcpus
        if per <= 0:
            return 1.0
        demands = [c.pipeline_cores / PIPELINE_THREADS] * PIPELINE_THREADS + [per] * g.vcpus \
            + [start / c.start_cores] * int(c.start_cores) * (start > 0)
        return max(1.0, per / min(per, fair_share(demands, c.cores)))

    def _allowed_rate(self) -> float:
        if self.paused:
            return 0.0
        rate = self.guest.dirty_rate * (1.0 - self.throttle)
        if self.dirty_limit is not None:
            rate = min(rate, self.dirty_limit * self.guest.vcpus)
        return rate

    def harvest(self) -> np.ndarray:
        self._accrue()
        writes, self._writes = self._writes + self._carry, 0.0
        n_writes = int(writes + 1e-9)  # (a slice's 10 pages, not 9.999...)
        self._carry = writes - n_writes
        pfns = self._harvest_ws(n_writes)
        if self._ran_since_sync and self.guest.hot_pages:
            pfns = np.concatenate([self._hot, pfns])
        if self.guest.io_pages:
            pfns = np.union1d(self._harvest_io(), pfns)
        self._ran_since_sync = False
        self.src_version[pfns] += 1
        c, n = self.costs, self.guest.npages
        own = c.stop_sync + n * c.stop_sync_page if self.paused else c.sync + n * c.sync_page
        took = own * self.contention()
        self.clock += took
        self._ran(took)
        return pfns

    def _hot_layout(self) -> np.ndarray:
        """The hot pages: ``hot_runs`` runs as even as can be, a page between each two,
        ending just below the working set."""
        g = self.guest
        if not g.hot_pages:
            return np.zeros(0, dtype=np.int64)
        i = np.arange(g.hot_pages, dtype=np.int64)
        run = i * g.hot_runs // g.hot_pages  # which run each page is in
        end = g.npages - g.working_set
        return end - (g.hot_pages + g.hot_runs - 1) + i + run

    def _harvest_io(self) -> np.ndarray:
        """The ring's pages the I/O records since the last harvest went to, in turn."""
        m, n = self.guest.io_pages, int(self._io_writes)
        self._io_writes -= n
        first, self._io_next = self._io_next, (self._io_next + n) % m
        return (first + np.arange(min(n, m), dtype=np.int64)) % m

    def _harvest_ws(self, n_writes: int) -> np.ndarray:
        """The working-set pages ``n_writes`` uniform writes dirtied."""
        ws = self.guest.working_set
        start = self.guest.npages - ws
        if not ws or not n_writes:
            return np.zeros(0, dtype=np.int64)
        if self.guest.contiguous:
            # distinct pages hit by uniform writes, laid out as one run
            n = int(ws * (1.0 - math.exp(-n_writes / ws)))
            return np.arange(start, start + n, dtype=np.int64)
        run = self.guest.run_pages
        runs, per_run = max(ws // run, 1), n_writes / run
        if per_run >= 8 * runs:
            return np.arange(start, start + ws, dtype=np.int64)  # all but surely every page
        if run == 1:
            return start + np.unique(self._rng.integers(0, ws, size=n_writes, dtype=np.int64))
        # whole runs, as many writes' worth (the last, partial one by chance)
        k = int(per_run) + int(self._rng.random() < per_run - int(per_run))
        first = np.unique(self._rng.integers(0, runs, size=k, dtype=np.int64)) * run
        return start + (first[:, None] + np.arange(run, dtype=np.int64)).ravel()

    def _demand(self) -> tuple[float, float]:
        """(the guest's cores, the destination's start work's cores) asked for now."""
        g = self.guest
        if self.paused:
            guest = 0.0
        elif g.dirty_rate > 0:
            guest = g.cpu * self._allowed_rate() / g.dirty_rate
        else:
            guest = g.cpu * (1.0 - self.throttle)
        return guest, self.costs.start_cores if self._start_left > 0 else 0.0

    def contention(self) -> float:
        """How much slower the migration's CPU work runs now than on cores of its own."""
        c = self.costs
        if not c.cores:
            return 1.0
        guest, start = self._demand()
        return max(1.0, (c.pipeline_cores + c.guest_weight * guest + start) / c.cores)

    def _ran(self, seconds: float) -> None:
        """The destination's start work got its share of the cores for ``seconds``."""
        c = self.costs
        if self._start_left <= 0 or not c.cores:
            self._start_left = 0.0
            return
        self._accrue()  # the guest's pace changes when the start work ends
        guest, start = self._demand()
        total = c.pipeline_cores + guest + start
        share = start * min(1.0, c.cores / total)
        self._start_left -= share * seconds

    def _frame(self, src_cost: float, nbytes: int, dst_cost: float,
               lag_base: float | None = None) -> float:
        """Move one frame through the pipeline; return the seconds the source spent on it
        (waiting for a free slot, then its secure processor). The destination works
        ``rx_lag`` of ``lag_base`` (default: ``src_cost``) longer on it than ``dst_cost``."""
        c, k = self.costs, len(self._wire_done)
        t0 = self.clock
        start = max(self.clock, self._wire_done[k - c.slots] if k >= c.slots else 0.0)
        self.clock = start + src_cost
        acked = self._dst_done[k - c.window] + c.latency if k >= c.window else 0.0
        wire = max(self.clock, self._link_free, acked) + nbytes / c.link_bw
        self._link_free = wire
        lag = c.rx_lag * (src_cost if lag_base is None else lag_base)
        done = max(wire + c.latency, self._dst_free, self._dst_ready) + dst_cost + lag
        self._wire_done.append(wire)
        self._dst_done.append(done)
        self._submitted.append(self.clock)
        return self.clock - t0

    @property
    def _dst_free(self) -> float:
        """When the destination's secure processor is free: it imports in order."""
        return self._dst_done[-1] if self._dst_done else 0.0

    def frames_in_flight(self) -> int:
        """Frames the destination has not imported yet (the engine: not acknowledged)."""
        return len(self._dst_done) - bisect_right(self._dst_done, self.clock)

    def landing_in(self) -> float | None:
        """Seconds until the frames in flight should have landed, judged as the engine's
        sender judges it (`cvmig.migration.sender.Sender.landing_in`), not as this world
        knows it: the last one's submission plus what recent acknowledged frames took from
        submission to ACK. (The driver's decisions turn on it: with the exact figure the
        model let frames land in stops that the engine, waiting for them, did not.)"""
        if not self.frames_in_flight():
            return 0.0
        lat = self.costs.latency
        # the destination imports in order: the acknowledged frames are a prefix
        k = bisect_right(self._dst_done, self.clock - lat)
        took = [d + lat - s for d, s in zip(self._dst_done[max(0, k - LATENCY_KEEP):k],
                                            self._submitted[max(0, k - LATENCY_KEEP):k],
                                            strict=True)]
        if not took:
            return None
        return max(0.0, self._submitted[-1] + landing_quantile(took) - self.clock)

    def wait_landed(self, timeout: float) -> None:
        """Until the destination has acknowledged every frame, at most ``timeout``."""
        landed = self._dst_free + self.costs.latency
        self.clock = min(self.clock + max(timeout, 0.0), max(self.clock, landed))

    def send_private(self, pfns: np.ndarray, bounds: np.ndarray, queue: bool) -> Sent:
        c = self.costs
        ncmds = len(bounds) - 1
        nbytes = len(pfns) * PAGE_SIZE + ncmds * PACKET_HEADER_SIZE
        doorbells = 1 if queue else ncmds
        k = self.contention()
        kp = k if c.psp_cpu else 1.0
        sizes = None if queue else np.diff(bounds)  # a queue's commands keep the line
        psp = c.src_psp(ncmds, doorbells, nbytes, sizes) * kp
        dst = c.dst_psp(ncmds, nbytes, doorbells, sizes) * kp
        # the engine's own work, at each end: per send, and per page the destination
        # receives for the first time (it faults its memory in; the dirty rounds of the
        # engine take little more than their firmware time)
        fresh = int(np.count_nonzero(self.dst_version[pfns] < 0))
        own = (c.t_send + fresh * c.t_page) * k
        # the destination's extra work is a share of a frame's own time, not of the time a
        # crowded host stretched it to (it was measured on idle runs)
        spent = self._frame(psp + own, nbytes, dst + own, psp / kp + own / k)
        self._ran(spent)
        self.dst_version[pfns] = self.src_version[pfns]
        return Sent(len(pfns), nbytes, ncmds, doorbells, psp)

    def send_shared(self, pfns: np.ndarray) -> Sent:
        nbytes = len(pfns) * PAGE_SIZE
        self._ran(self._frame(self.costs.t_send * self.contention(), nbytes, 0.0))
        self.dst_version[pfns] = self.src_version[pfns]
        return Sent(len(pfns), nbytes)

    # -- throttle -----------------------------------------------------------------------
    def set_throttle(self, pct: int) -> None:
        self._accrue()
        self.throttle = pct / 100
        self.log.append((self.clock, f"throttle {pct}"))
        # a vCPU reads its throttle as its slice ends: one in its slice sleeps after it as
        # the new one says; one asleep sleeps on (`cvmig.guest.vcpu.Vcpu._wait` looks at
        # the throttle only when its wait for commands times out, every THROTTLE_POLL)
        if not self.guest.timeslice:
            return
        end = self._slice_began + self.guest.timeslice
        tick = end + THROTTLE_POLL * np.ceil((self.clock - end) / THROTTLE_POLL)
        asleep = self.clock >= end
        woken = np.where(self._slice_next - end > THROTTLE_POLL,
                         np.minimum(self._slice_next, tick), self._slice_next)
        self._slice_next = np.where(asleep, woken, self._slice_began + self._cycle())

    def set_dirty_limit(self, pages_per_s: float | None) -> None:
        self._accrue()
        self.dirty_limit = pages_per_s
        self.log.append((self.clock, f"dirty-limit {pages_per_s}"))

    # -- end game -----------------------------------------------------------------------
    def pause_guest(self) -> None:
        # writes up to the acknowledgement still land in the last harvest
        self.clock += self.costs.stop.pause
        self._accrue()
        before = self.contention()
        self.paused = True
        self._uncrowd(before)
        self.log.append((self.clock, "pause"))

    def _uncrowd(self, before: float) -> None:
        """The frames still in flight were priced at the pace of a host the guest crowded;
        the rest of their work now runs on the cores the paused guest gave back."""
        f = self.contention() / before
        if f >= 1.0:
            return
        t = self.clock
        for i in range(bisect_right(self._dst_done, t), len(self._dst_done)):
            self._dst_done[i] = t + (self._dst_done[i] - t) * f

    def send_vcpu_state(self) -> Sent:
        n = self.guest.vcpus
        self.clock += self.costs.stop.vcpu_state
        nbytes = n * (PAGE_SIZE + PACKET_HEADER_SIZE)
        return Sent(n, nbytes, n, n, 0.0)

    def complete(self) -> float:
        """The trailer, then FINISH behind every frame in flight; the destination's
        RECEIVE_FINISH and restore; CONFIRM back; our grant (the end of the downtime as
        the source counts it); the destination's vCPUs run a grant's time after CONFIRM.
        The clock then runs on while we measure our paused copy (the digest)."""
        c, s = self.costs, self.costs.stop
        self.clock += s.trailer
        arrive = max(self.clock, self._link_free) + c.latency
        confirm = max(arrive, self._dst_free) + s.finish
        self.resumed_at = confirm + s.grant
        running_at = confirm + c.latency + c.stop_rest
        self.clock = running_at + self.guest.npages * c.digest_page
        self.log.append((self.clock, "complete"))
        return running_at
