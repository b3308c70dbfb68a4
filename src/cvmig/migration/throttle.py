"""vCPU throttle policies for pre-copy: pure decisions, fed at every dirty-log sync.

- ``none``: never throttle.
- ``auto-converge``: QEMU's (migration/ram.c ``migration_trigger_throttle`` and
  ``mig_throttle_guest_down``): over a sync period of at least 1 s, if the bytes dirtied
  exceed throttle-trigger-threshold % of the bytes sent, count it; on the second such
  period throttle every vCPU, cpu-throttle-initial first, then +cpu-throttle-increment (or
  less, with cpu-throttle-tailslow), capped at max-cpu-throttle.
- ``precopy``: the report's method: throttle applied from the start of pre-copy, either a
  fixed percentage or driven at each sync by the measured dirty rate against the transfer
  rate, so that the guest dirties no more than a target share of what the migration can
  send again (the lower of what it sent since the last sync and what it sends dirty pages
  at: a bulk of merged contiguous commands says little of a scattered writer's pages).
- ``dirty-limit``: per-vCPU dirty-rate quota (QEMU's dirty-limit): on the same trigger as
  auto-converge, each vCPU is held to vcpu-dirty-limit, so only the vCPUs that dirty
  memory are slowed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from cvmig.psp.api import PAGE_SIZE


class ThrottleKind(enum.StrEnum):
    NONE = "none"
    AUTO_CONVERGE = "auto-converge"
    PRECOPY = "precopy"
    DIRTY_LIMIT = "dirty-limit"


@dataclass(frozen=True)
class ThrottleParams:
    """QEMU's names and defaults (migration/options.c), plus cvmig's own."""

    throttle_trigger_threshold: int = 50  # %
    cpu_throttle_initial: int = 20  # %
    cpu_throttle_increment: int = 10  # %
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99  # %
    vcpu_dirty_limit: int = 1  # MB/s per vCPU (QEMU's unit)
    precopy_throttle: int | None = None  # fixed % for the precopy policy; None = adaptive
    precopy_target_ratio: float = 0.5  # adaptive precopy: dirty rate <= ratio x re-send rate

    def validate(self) -> None:
        limits = {
            "throttle_trigger_threshold": (1, 100),
            "cpu_throttle_initial": (1, 99),
            "cpu_throttle_increment": (1, 99),
            "max_cpu_throttle": (1, 99),
        }
        for name, (lo, hi) in limits.items():
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name.replace('_', '-')} must be in {lo}..{hi} %, got {v}")
        if self.precopy_throttle is not None and not 0 <= self.precopy_throttle <= 99:
            raise ValueError(f"precopy throttle must be in 0..99 %, got {self.precopy_throttle}")
        if not 0 < self.precopy_target_ratio <= 1:
            raise ValueError("precopy target ratio must be in (0, 1]")
        if self.vcpu_dirty_limit < 1:
            raise ValueError("vcpu-dirty-limit must be at least 1 MB/s")


class ThrottleControl(Protocol):
    """What a policy may do to the guest."""

    def set_throttle(self, pct: int) -> None: ...

    def set_dirty_limit(self, pages_per_s: float | None) -> None: ...


@dataclass(frozen=True)
class Sync:
    """One dirty-log sync as a policy sees it."""

    time: float  # seconds, the world's clock
    dirty_pages: int  # pages harvested by this sync
    transferred: int  # bytes sent since the migration began (all channels)
    # bytes/s at which the migration sends dirty pages again, as it prices the stop (0:
    # unknown). Below what the bulk moved where batching merged the bulk's contiguous
    # pages and a writer's dirty pages lie scattered (contig: a command each)
    resend_rate: float = 0.0


class ThrottlePolicy:
    """Base: no throttling. Subclasses override the hooks they need."""

    kind = ThrottleKind.NONE

    def __init__(self, params: ThrottleParams) -> None:
        self.params = params
        self.pct = 0  # current throttle, %
        self.dirty_limit: float | None = None  # current per-vCPU quota, pages/s

    def start(self, ctl: ThrottleControl, now: float, transferred: int) -> None:
        """Called once, when pre-copy begins."""

    def on_sync(self, ctl: ThrottleControl, sync: Sync) -> None:
        """Called after every dirty-log sync of pre-copy."""

    def share_after(self, sync: Sync) -> float:
        """The share of the guest's present dirty rate it would keep if pre-copy went on
        past ``sync`` (what `on_sync` would set, not set): the driver prices one more
        round with it. 1: no change foreseen (QEMU's triggers wait on periods of a second
        and more, which one short round does not make)."""
        return 1.0

    def _set(self, ctl: ThrottleControl, pct: int) -> None:
        pct = max(0, min(pct, self.params.max_cpu_throttle))
        if pct != self.pct:
            self.pct = pct
            ctl.set_throttle(pct)


class _PeriodTrigger(ThrottlePolicy):
    """QEMU's trigger: evaluated when at least 1 s has passed since the period began."""

    PERIOD_S = 1.0

    def start(self, ctl: ThrottleControl, now: float, transferred: int) -> None:
        self._period_start = now
        self._period_dirty = 0
        self._xfer_prev = transferred
        self._high = 0

    def on_sync(self, ctl: ThrottleControl, sync: Sync) -> None:
        self._period_dirty += sync.dirty_pages
        if sync.time <= self._period_start + self.PERIOD_S:
            return
        bytes_xfer = sync.transferred - self._xfer_prev
        bytes_dirty = self._period_dirty * PAGE_SIZE
        threshold = bytes_xfer * self.params.throttle_trigger_threshold // 100
        if bytes_dirty > threshold:
            self._high += 1
            if self._high >= 2:
                self._high = 0
                self.trigger(ctl, bytes_dirty, threshold)
        self._period_start = sync.time
        self._period_dirty = 0
        self._xfer_prev = sync.transferred

    def trigger(self, ctl: ThrottleControl, bytes_dirty: int, threshold: int) -> None:
        raise NotImplementedError


class AutoConverge(_PeriodTrigger):
    kind = ThrottleKind.AUTO_CONVERGE

    def trigger(self, ctl: ThrottleControl, bytes_dirty: int, threshold: int) -> None:
        p = self.params
        if self.pct == 0:
            self._set(ctl, p.cpu_throttle_initial)
            return
        inc = p.cpu_throttle_increment
        if p.cpu_throttle_tailslow and bytes_dirty > 0:
            cpu_now = 100 - self.pct
            cpu_ideal = cpu_now * (threshold / bytes_dirty)
            inc = int(min(cpu_now - cpu_ideal, inc))
        self._set(ctl, self.pct + inc)


class DirtyLimit(_PeriodTrigger):
    kind = ThrottleKind.DIRTY_LIMIT

    def trigger(self, ctl: ThrottleControl, bytes_dirty: int, threshold: int) -> None:
        if self.dirty_limit is None:
            self.dirty_limit = self.params.vcpu_dirty_limit * 1e6 / PAGE_SIZE
            ctl.set_dirty_limit(self.dirty_limit)


class Precopy(ThrottlePolicy):
    kind = ThrottleKind.PRECOPY

    def start(self, ctl: ThrottleControl, now: float, transferred: int) -> None:
        self._last_time = now
        self._last_xfer = transferred
        fixed = self.params.precopy_throttle
        self._set(ctl, fixed if fixed is not None else self.params.cpu_throttle_initial)

    def _want(self, sync: Sync) -> int | None:
        """The throttle (%) that holds the guest to the target share of what the
        migration sends, or None when this sync says nothing of it. What it sends is the
        lower of what it sent since the last sync and what it sends dirty pages again at:
        after a bulk of merged contiguous commands, the first would leave a scattered
        writer unthrottled exactly when re-sending its pages slows to a command each."""
        if self.params.precopy_throttle is not None:
            return None
        dt = sync.time - self._last_time
        if dt <= 0:
            return None
        sent_rate = (sync.transferred - self._last_xfer) / dt
        if sync.resend_rate > 0:
            sent_rate = min(sent_rate, sync.resend_rate)
        if sent_rate <= 0:
            return None
        dirty_rate = sync.dirty_pages * PAGE_SIZE / dt
        # what the guest would dirty unthrottled: it runs (1 - p) of the time
        free_rate = dirty_rate / max(1e-3, 1 - self.pct / 100)
        target = self.params.precopy_target_ratio * sent_rate
        want = 0 if free_rate <= target else round(100 * (1 - target / free_rate))
        return max(0, min(want, self.params.max_cpu_throttle))

    def on_sync(self, ctl: ThrottleControl, sync: Sync) -> None:
        want = self._want(sync)
        if sync.time > self._last_time:
            self._last_time, self._last_xfer = sync.time, sync.transferred
        if want is not None:
            self._set(ctl, want)

    def share_after(self, sync: Sync) -> float:
        want = self._want(sync)
        if want is None:
            return 1.0
        return (1 - want / 100) / max(1e-3, 1 - self.pct / 100)


def make_policy(kind: ThrottleKind | str, params: ThrottleParams) -> ThrottlePolicy:
    kind = ThrottleKind(kind)
    cls: type[ThrottlePolicy] = {
        ThrottleKind.NONE: ThrottlePolicy,
        ThrottleKind.AUTO_CONVERGE: AutoConverge,
        ThrottleKind.PRECOPY: Precopy,
        ThrottleKind.DIRTY_LIMIT: DirtyLimit,
    }[kind]
    return cls(params)
