"""The simulated world: the driver's interface on a virtual clock and a cost model.

The same `Driver` that moves real guests runs here, so what the model predicts is what
the engine does, at sizes and on hardware this machine does not have. Costs:

- a firmware command costs ``t_cmd`` + bytes / ``psp_bw`` (one command at a time per host,
  as on the real PSP), plus ``t_doorbell`` per mailbox round trip (shared by a queue);
- the link carries ``link_bw`` bytes/s; firmware and link work are serial, as in the
  engine (the PSP writes a chunk, then the socket sends it);
- the guest writes ``dirty_rate`` pages/s uniformly over ``working_set`` pages while it
  runs, slowed by the throttle (it runs 1 - p of the time) or its dirty limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cvmig.migration.driver import Sent
from cvmig.psp.api import PACKET_HEADER_SIZE, PAGE_SIZE


@dataclass
class Costs:
    t_doorbell: float = 30e-6  # mailbox round trip, s
    t_cmd: float = 10e-6  # fixed firmware work per command, s
    psp_bw: float = 1.5e9  # firmware bytes/s
    link_bw: float = 1.2e9  # wire bytes/s
    t_pause: float = 2e-3  # stopping the vCPUs
    t_resume: float = 5e-3  # destination start-up after the last byte


@dataclass
class GuestModel:
    npages: int
    dirty_rate: float  # pages/s written while unthrottled
    working_set: int  # pages the writes fall on
    vcpus: int = 1
    shared_pages: int = 0


@dataclass
class SimWorld:
    guest: GuestModel
    costs: Costs = field(default_factory=Costs)
    clock: float = 0.0
    throttle: float = 0.0
    dirty_limit: float | None = None  # pages/s per vCPU
    paused: bool = False
    _last_accrue: float = 0.0
    _writes: float = 0.0  # writes since the last harvest
    _carry: float = 0.0  # fractional page left over from the last harvest
    log: list[tuple[float, str]] = field(default_factory=list)
    # page versions on each side: a write bumps the source's, a send copies it across
    src_version: np.ndarray = field(init=False)
    dst_version: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.src_version = np.zeros(self.guest.npages, dtype=np.int64)
        self.dst_version = np.full(self.guest.npages, -1, dtype=np.int64)

    def destination_matches(self) -> bool:
        """Whether every page arrived in its latest version (the engine's digest check)."""
        return bool(np.array_equal(self.src_version, self.dst_version))

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
        self._last_accrue = self.clock
        self._writes = 0.0

    def _accrue(self) -> None:
        """Account the writes done at the current rate since the last change of rate."""
        self._writes += self.write_rate() * (self.clock - self._last_accrue)
        self._last_accrue = self.clock

    def write_rate(self) -> float:
        """Pages/s the guest writes now."""
        if self.paused:
            return 0.0
        rate = self.guest.dirty_rate * (1.0 - self.throttle)
        if self.dirty_limit is not None:
            rate = min(rate, self.dirty_limit * self.guest.vcpus)
        return rate

    def harvest(self) -> np.ndarray:
        self._accrue()
        writes, self._writes = self._writes + self._carry, 0.0
        ws = self.guest.working_set
        # distinct pages hit by uniform writes over the working set
        unique = ws * (1.0 - math.exp(-writes / ws)) if ws else 0.0
        n = int(unique)
        self._carry = 0.0 if n else writes
        start = self.guest.npages - ws
        pfns = np.arange(start, start + n, dtype=np.int64)
        self.src_version[pfns] += 1
        return pfns

    def send_private(self, pfns: np.ndarray, bounds: np.ndarray, queue: bool) -> Sent:
        c = self.costs
        ncmds = len(bounds) - 1
        nbytes = len(pfns) * PAGE_SIZE + ncmds * PACKET_HEADER_SIZE
        doorbells = 1 if queue else ncmds
        psp = doorbells * c.t_doorbell + ncmds * c.t_cmd + nbytes / c.psp_bw
        self.clock += psp + nbytes / c.link_bw
        self.dst_version[pfns] = self.src_version[pfns]
        return Sent(len(pfns), nbytes, ncmds, doorbells, psp)

    def send_shared(self, pfns: np.ndarray) -> Sent:
        nbytes = len(pfns) * PAGE_SIZE
        self.clock += nbytes / self.costs.link_bw
        self.dst_version[pfns] = self.src_version[pfns]
        return Sent(len(pfns), nbytes)

    # -- throttle -----------------------------------------------------------------------
    def set_throttle(self, pct: int) -> None:
        self._accrue()
        self.throttle = pct / 100
        self.log.append((self.clock, f"throttle {pct}"))

    def set_dirty_limit(self, pages_per_s: float | None) -> None:
        self._accrue()
        self.dirty_limit = pages_per_s
        self.log.append((self.clock, f"dirty-limit {pages_per_s}"))

    # -- end game -----------------------------------------------------------------------
    def pause_guest(self) -> None:
        # writes up to now still land in the last harvest
        self.clock += self.costs.t_pause
        self._accrue()
        self.paused = True
        self.log.append((self.clock, "pause"))

    def send_vcpu_state(self) -> Sent:
        c = self.costs
        n = self.guest.vcpus
        psp = n * (c.t_doorbell + c.t_cmd)
        nbytes = n * (PAGE_SIZE + PACKET_HEADER_SIZE)
        self.clock += psp + nbytes / c.link_bw
        return Sent(n, nbytes, n, n, psp)

    def complete(self) -> float:
        self.clock += self.costs.t_resume
        self.log.append((self.clock, "complete"))
        return self.clock
