"""query-migrate while a migration runs: report.query_migrate, made live (QMP and the
progress bar show the same numbers).

The driver's Progress holds totals and per-round figures; QEMU's query-migrate also
shows a running ``total-time`` and a throughput over the last 100 ms window
(``migration_update_counters``), which a poll in the middle of the bulk round needs, since
no round has ended yet. Those two come from here; the rest is report.query_migrate, with
QEMU's conventions where the driver counts differently:

- times come from the caller's `Clock`, stamped when the events go out: ``total-time``
  runs from MIGRATION setup to MIGRATION completed (never backwards), ``setup-time`` to
  MIGRATION active;
- ``dirty-sync-count`` counts the sync that starts dirty logging, as QEMU's does (1
  during the bulk pass), and MIGRATION_PASS follows it;
- ``expected-downtime`` is downtime-limit until the first estimate, as in QEMU;
- members QEMU's schema requires and cvmig has no use for are 0 (postcopy, multifd,
  zero-copy).
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from dataclasses import dataclass
from typing import Any

from cvmig.migration.driver import MigrationParams, Progress
from cvmig.migration.report import query_migrate

WINDOW_S = 0.1  # QEMU's BUFFER_DELAY
HISTORY_S = 2.0

# statuses in which a source's migration holds the guest, the socket and the PSP context
IN_PROGRESS = frozenset({"setup", "active", "device", "cancelling"})


class RateMeter:
    """Bytes and pages per second over the latest window of at least WINDOW_S."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # fed by the migration thread, read by the monitor
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def add(self, now: float, transferred: int, pages: int) -> None:
        with self._lock:
            s = self._samples
            s.append((now, transferred, pages))
            while len(s) > 2 and s[1][0] <= now - HISTORY_S:
                s.popleft()

    def rates(self) -> tuple[float, float] | None:
        """(bytes/s, pages/s), or None before two samples."""
        with self._lock:
            s = list(self._samples)
        if len(s) < 2:
            return None
        t1, b1, p1 = s[-1]
        base = s[0]
        for sample in reversed(s[:-1]):  # the newest sample a full window back
            if t1 - sample[0] >= WINDOW_S:
                base = sample
                break
        dt = t1 - base[0]
        if dt <= 0:
            return None
        return (b1 - base[1]) / dt, (p1 - base[2]) / dt


@dataclass
class Clock:
    """When a migration's events went out (time.monotonic()); 0: not yet."""

    setup: float = 0.0  # MIGRATION setup: total-time starts
    active: float = 0.0  # MIGRATION active: setup-time ends
    completed: float = 0.0  # MIGRATION completed: total-time ends


def sync_count(p: Progress) -> int:
    """QEMU's dirty-sync-count: the driver's harvests, plus the sync that started the
    dirty log (QEMU's ram_init_bitmaps), once it has (the bulk pass reports 1)."""
    return p.dirty_sync_count + (1 if p.total_pages else 0)


def migration_info(status: str, progress: Progress, params: MigrationParams | None,
                   meter: RateMeter | None, *, error: str = "",
                   now: float | None = None, clock: Clock | None = None,
                   guest_gap_s: float | None = None) -> dict[str, Any]:
    """MigrationInfo for the source side, with QEMU's members for ``status``."""
    if status == "none":
        return {}  # QEMU: nothing at all before the first migration
    p = copy.copy(progress)  # shallow: the driver keeps writing the original
    p.status = status
    p.error = error
    t = time.monotonic() if now is None else now
    live = status in IN_PROGRESS and p.start > 0
    if clock is not None and clock.setup:
        end = clock.completed or t
        p.total_time = max(0.0, end - clock.setup)
        if clock.active:
            p.setup_time = clock.active - clock.setup
    elif live:
        p.total_time = t - p.start
    p.dirty_sync_count = sync_count(p)
    if not progress.dirty_sync_count and params is not None:
        p.expected_downtime_ms = params.downtime_limit_ms  # QEMU: the limit, until estimated
    info = query_migrate(p)
    ram = info.get("ram")
    if live and ram is not None and meter is not None and (r := meter.rates()) is not None:
        ram["mbps"] = round(r[0] * 8 / 1e6, 3)
        ram["pages-per-second"] = round(r[1])
    if ram is not None:
        # required by QEMU's schema; cvmig has no postcopy, multifd or zero-copy send
        ram.update({"postcopy-requests": 0, "multifd-bytes": 0,
                    "dirty-sync-missed-zero-copy": 0})
        # what only cvmig knows: the secure processor's share of the work
        info["x-rounds"] = len(p.rounds)
        info["x-psp"] = {"commands": p.psp_commands, "doorbells": p.psp_doorbells,
                         "time-ms": round(p.psp_seconds * 1000, 3)}
        if params is not None:
            info["x-throttle"] = str(params.throttle)
    if guest_gap_s is not None and "downtime" in info:
        # beside the pause the hosts measured: the longest gap the guest itself saw
        info["x-guest-gap"] = round(guest_gap_s * 1000)
    return info


def percent(info: dict[str, Any]) -> float:
    """virsh migrate --verbose's figure from a MigrationInfo: 100 - remaining/total."""
    if info.get("status") == "completed":
        return 100.0
    ram = info.get("ram") or {}
    total = ram.get("total", 0)
    if not total:
        return 0.0
    return max(0.0, 100.0 - ram.get("remaining", 0) * 100.0 / total)

