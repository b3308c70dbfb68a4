"""`cvmig guest ...`: run a guest standalone, to size a workload before migrating it."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import click

from cvmig.guest.workloads import WorkloadSpec, parse_workload
from cvmig.units import parse_size  # the one size grammar (QEMU's)

__all__ = ["guest", "parse_size", "parse_throttle"]


def parse_throttle(text: str) -> float:
    """'0.3' or '30%' -> 0.3."""
    t = text.strip()
    try:
        p = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"throttle {text!r} is not a number (use 0.3 or 30%)") from None
    if not 0 <= p <= 0.99:
        raise ValueError(f"throttle {text!r} must be in [0, 0.99] (or 0%..99%)")
    return p


class _Size(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return value if isinstance(value, int) else parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class _Workload(click.ParamType):
    name = "workload"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> WorkloadSpec:
        try:
            return value if isinstance(value, WorkloadSpec) else parse_workload(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class _Throttle(click.ParamType):
    name = "fraction"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            return value if isinstance(value, float) else parse_throttle(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.group()
def guest() -> None:
    """Run confidential guests on their own (no migration)."""


@guest.command()
@click.option("--memory", "memory", type=_Size(), default="256M", show_default=True, help="guest memory (e.g. 256M, 1G)")
@click.option("--workload", type=_Workload(), default="dirtier", show_default=True,
              help="idle | dirtier[:rate=N|max,pattern=uniform|hotcold|sequential,hot=F,skew=F,ws=F] | sqlite[:accounts=N,rate=N]")
@click.option("--seconds", type=click.FloatRange(min=0.5, max=86400), default=5.0, show_default=True)
@click.option("--vcpus", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--tracker", type=click.Choice(["auto", "uffd", "dmap"]), default="auto", show_default=True,
              help="dirty tracking: kernel userfaultfd write-protect, or the byte map")
@click.option("--throttle", type=_Throttle(), default=0.0, help="vCPU throttle, 0..0.99 or 0%..99%")
@click.option("--dirty-limit", type=click.FloatRange(min=0), default=None, help="per-vCPU dirty pages/s quota")
@click.option("--shared-pages", type=click.IntRange(min=0), default=16, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="write the per-second records here")
def run(memory: int, workload: WorkloadSpec, seconds: float, vcpus: int, tracker: str, throttle: float,
        dirty_limit: float | None, shared_pages: int, json_path: str | None) -> None:
    """Launch a guest on a fresh PSP and print its throughput and dirty rate each second."""
    from cvmig.guest.vm import GuestConfig, choose_tracker

    config = GuestConfig(memory=memory, vcpus=vcpus, workload=workload, tracker=tracker, shared_pages=shared_pages)
    try:
        config.validate()
        chosen = choose_tracker(tracker)
    except (ValueError, RuntimeError) as e:
        raise click.UsageError(str(e)) from None
    if json_path:
        parent = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(parent):
            raise click.UsageError(f"--json: directory {parent} does not exist")
    try:
        result = _run(config, seconds, throttle, dirty_limit)
    except KeyboardInterrupt:
        raise click.Abort() from None
    except (RuntimeError, OSError, TimeoutError) as e:
        raise click.ClickException(str(e)) from None
    result["tracker"] = chosen
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        click.echo(f"wrote {json_path}")
    if not result["check"]["ok"]:
        raise click.ClickException(f"the workload's check failed: {json.dumps(result['check'])[:2000]}")


def _run(config: Any, seconds: float, throttle: float, dirty_limit: float | None) -> dict[str, Any]:
    from cvmig.guest.memory import GuestMemory
    from cvmig.guest.vm import Guest
    from cvmig.psp.api import Policy
    from cvmig.psp.mailbox import MailboxClient, PspProcess

    records: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="cvmig-guest-") as tmp:
        sock = os.path.join(tmp, "psp.sock")
        with PspProcess(sock), MailboxClient(sock) as psp, GuestMemory.create(config.memory) as mem:
            region = psp.map_region(mem.name, mem.size)
            handle = psp.launch(region, mem.npages, int(Policy.NODBG | Policy.ES))
            t_boot = time.monotonic()
            g = Guest(config, mem, sock, handle)
            try:
                g.boot()
                click.echo(
                    f"guest: {config.memory >> 20} MiB, {config.vcpus} vCPUs, {config.workload}, "
                    f"tracker {g.tracker_kind}, booted in {time.monotonic() - t_boot:.2f} s"
                )
                g.set_throttle(throttle)
                g.set_dirty_limit(dirty_limit)
                g.start_dirty_log()
                click.echo(f"{'t/s':>5} {'ops/s':>10} {'written/s':>11} {'dirty/s':>10} {'harvest':>9}")
                t0 = prev_t = time.monotonic()
                prev = g.stats()
                while (now := time.monotonic()) < t0 + seconds:
                    time.sleep(max(0.0, min(t0 + seconds, prev_t + 1.0) - now))
                    h0 = time.perf_counter()
                    dirty = g.harvest_dirty()
                    h_ms = (time.perf_counter() - h0) * 1e3
                    t = time.monotonic()
                    st = g.stats()
                    dt = t - prev_t
                    rec = {
                        "t": round(t - t0, 3),
                        "ops_per_s": sum(s.ops for s in st) - sum(s.ops for s in prev),
                        "pages_written_per_s": sum(s.pages_written for s in st) - sum(s.pages_written for s in prev),
                        "dirty_pages_per_s": float(len(dirty)),
                        "harvest_ms": round(h_ms, 3),
                        "throttle": throttle,
                    }
                    for k in ("ops_per_s", "pages_written_per_s", "dirty_pages_per_s"):
                        rec[k] = round(rec[k] / dt, 1)
                    records.append(rec)
                    click.echo(
                        f"{rec['t']:5.1f} {rec['ops_per_s']:10.0f} {rec['pages_written_per_s']:11.0f} "
                        f"{rec['dirty_pages_per_s']:10.0f} {h_ms:7.2f}ms"
                    )
                    prev, prev_t = st, t
                g.pause()
                check = g.check()
                gap = g.max_heartbeat_gap(t0, t)
            finally:
                g.shutdown()
    click.echo(f"check: {'ok' if check['ok'] else 'FAILED'}; largest heartbeat gap {gap * 1e3:.1f} ms")
    return {
        "memory": config.memory,
        "vcpus": config.vcpus,
        "workload": str(config.workload),
        "seconds": seconds,
        "records": records,
        "check": check,
        "max_heartbeat_gap_s": gap,
    }
