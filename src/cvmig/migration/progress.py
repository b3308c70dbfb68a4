"""What a person watching a migration sees: a live bar, then a summary table."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cvmig.migration.driver import Progress as MigrationProgress
from cvmig.migration.live import RateMeter, migration_info, percent

LINE_EVERY_S = 3.0  # off a terminal (a log, CI): one plain progress line this often


class ProgressView:
    """A rich progress bar fed by the driver's observer; plain lines when the output is
    not a terminal, so a log shows a migration is alive and where it stands."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.meter = RateMeter()
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self._t0 = time.monotonic()
        self._next_line = self._t0 + LINE_EVERY_S
        self._last_status = ""
        self._bar = Progress(
            TextColumn("[bold]Migration:[/] {task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f} %"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._bar.add_task("setup", total=100.0, detail="", start=True)

    def __enter__(self) -> ProgressView:
        if self.enabled and self.live:
            self._bar.start()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.enabled and self.live:
            self._bar.stop()

    def observe(self, event: str, p: MigrationProgress) -> None:
        """Show what query-migrate would show now (the same numbers QMP clients see)."""
        if not self.enabled:
            return
        if event == "chunk" or (event == "status" and p.status == "active"):
            self.meter.add(time.monotonic(), p.transferred, p.pages_sent)
        info = migration_info(p.status, p, None, self.meter)
        ram = info.get("ram", {})
        rnd = p.rounds[-1].kind if p.rounds else "setup"
        detail = (
            f"round {len(p.rounds)} ({rnd})  {ram.get('mbps', 0.0):7.1f} Mbit/s  "
            f"remaining {ram.get('remaining', 0) / 2**20:7.1f} MiB  "
            f"throttle {info.get('cpu-throttle-percentage', 0):2d} %"
        )
        if self.live:
            self._bar.update(self._task, completed=percent(info), description=p.status,
                             detail=detail)
            return
        now = time.monotonic()
        if now >= self._next_line or p.status != self._last_status:
            self._next_line = now + LINE_EVERY_S
            self._last_status = p.status
            self.console.print(f"[{now - self._t0:6.1f} s] {p.status:9s} {percent(info):5.1f} %  "
                               f"{detail}", highlight=False, soft_wrap=True)


def print_summary(rep: dict[str, Any], console: Console | None = None) -> None:
    """The report as two tables: the migration, then its rounds."""
    c = console or Console()
    ram = rep.get("ram", {})
    psp = rep.get("psp", {})
    guest = rep.get("guest", {})
    verify = rep.get("verify", {})
    t = Table(title="cvmig migration", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("status", rep.get("status")),
        ("total time", f"{rep.get('total-time', 0)} ms"),
        ("downtime", f"{rep.get('downtime', 0)} ms (limit {rep['params']['downtime-limit']} ms)"),
        ("setup time", f"{rep.get('setup-time', 0)} ms"),
        ("transferred", f"{ram.get('transferred', 0) / 2**20:.1f} MiB of "
                        f"{ram.get('total', 0) / 2**20:.0f} MiB guest RAM"),
        ("throughput", f"{ram.get('mbps', 0):.1f} Mbit/s"),
        ("rounds (dirty syncs)", ram.get("dirty-sync-count")),
        ("batching", f"{rep['params']['x-batching']} (cap {rep['params']['x-batch-cap']}, "
                     f"queue {'on' if rep['params']['x-queue'] else 'off'})"),
        ("firmware", f"{psp.get('commands', 0)} commands, {psp.get('time-ms', 0):.0f} ms, "
                     f"{psp.get('us-per-page', 0):.1f} µs/page (profile {psp.get('profile')})"),
        ("throttle", f"{rep['params']['x-throttle']}, final "
                     f"{rep.get('cpu-throttle-percentage', 0)} %"),
        ("guest ops/s", f"before {guest.get('ops-per-s-before')}, during "
                        f"{guest.get('ops-per-s-during')}, after {guest.get('ops-per-s-after')}"),
        ("guest CPU (cores)", f"before {guest.get('cpu-cores-before')}, during "
                              f"{guest.get('cpu-cores-during')}"),
        ("guest-observed gap", f"{guest.get('observed-gap-ms')} ms"),
        ("memory verified", verify.get("memory")),
        ("workload check", verify.get("workload", {}).get("ok")),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    c.print(t)
    r = Table(title="rounds (dirty: pages the sync found; sent: pages sent; fw: firmware)")
    # short headers: the table must fit an 80-column terminal
    for col in ("#", "kind", "ms", "dirty", "sent", "MiB", "cmds", "fw ms", "Mbit/s",
                "thr %"):
        r.add_column(col, justify="right", no_wrap=True)
    for x in rep.get("rounds", []):
        kind = {"iterative": "iter", "stop-and-copy": "stop"}.get(x["kind"], x["kind"])
        r.add_row(str(x["index"]), kind, f"{x['duration'] * 1000:.0f}",
                  str(x["dirty_pages"]), str(x["pages"]), f"{x['bytes'] / 2**20:.1f}",
                  str(x["commands"]), f"{x['psp_seconds'] * 1000:.0f}", f"{x['mbps']:.0f}",
                  str(x["throttle_pct"]))
    c.print(r)
