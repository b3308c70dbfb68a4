"""`cvmig bench psp`: the secure processor's per-command and per-page cost, through the real
mailbox and PSP processes, for SEND and RECEIVE, each batching mode and batch size.

Two PSP processes (a source and a destination host) share one emulated PKI. For each
(mode, batch) a fresh session is opened: the source sends for ``--seconds`` (or until the
transport buffer is full), laying packets back to back; the destination then receives
exactly those packets in order. Rates come from the median time of a mailbox message (the
mean is in the JSON too), so that spikes from other processes on the machine do not
count. The guest keeps running (SEND_CANCEL ends each session), as it does during pre-copy.
Contig batches above 4 pages exceed the SEV spec's 16 KiB cap: both PSPs run with a larger
cap for them, an extension, and the records say so. Beside each cost stands the format's
floor on this machine (`cvmig.bench.floor`: its cryptography alone) and the share of the
achieved cost that floor is.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from cvmig.bench.floor import floor_us_per_page, primitives
from cvmig.bench.machine import machine_info, machine_line
from cvmig.psp.api import PAGE_SIZE, SPEC_MAX_LENGTH, Batching, packet_size
from cvmig.psp.cost import parse
from cvmig.psp.mailbox import MailboxClient, PspProcess
from cvmig.psp.testing import ShmRegion

MODES = ("page", "contig", "sg", "aead", "queue")
DEFAULT_BATCHES = (1, 2, 4, 16, 64, 256)
MAX_BATCH = 256
TRANSPORT = 96 << 20


@dataclass
class Cell:
    direction: str  # "send" / "receive"
    mode: str  # page, contig, sg, queue (queue: one-page commands behind one doorbell)
    batch_pages: int  # pages per command (queue: commands per doorbell)
    commands: int  # firmware commands
    doorbells: int  # mailbox round trips
    pages: int
    seconds: float
    commands_per_s: float
    us_per_command: float
    us_per_page: float
    mb_per_s: float
    us_per_page_mean: float  # the rates above use the median message; this is the mean
    spec_compliant: bool  # within SEV's 16 KiB per command, one command per doorbell
    floor_us_per_page: float = 0.0  # the format's cryptography alone (cvmig.bench.floor)
    pct_of_floor: float = 0.0  # floor / achieved: 100 % = nothing but the cryptography


@dataclass
class _Plan:
    mode: Batching
    queue: bool
    batch: int


def _pfn_batches(plan: _Plan, npages: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` pfn lists, each one command (or, for a queue, one doorbell's commands)."""
    b = plan.batch
    if plan.mode in (Batching.SG, Batching.AEAD):  # scattered pages, distinct within a batch
        perm = rng.permutation(npages)
        return [perm[(i * b) % (npages - npages % b) :][:b].copy() for i in range(count)]
    span = npages - npages % b  # contiguous runs (queue: consecutive single pages)
    return [np.arange((i * b) % span, (i * b) % span + b, dtype=np.int64) for i in range(count)]


def _measure(
    a: MailboxClient, b: MailboxClient, h: int, dregion: int, npages: int, ta: int, tb: int,
    plan: _Plan, seconds: float, rng: np.random.Generator,
) -> tuple[list[float], list[float]]:
    """Seconds of each mailbox message: for send, then for receive of the same packets."""
    sess = a.send_start(h, b.export_certs(), plan.mode)
    hd = b.receive_start(dregion, npages, sess, plan.mode)
    try:
        one = packet_size(plan.mode, 1 if plan.queue else plan.batch)
        per_msg = one * (plan.batch if plan.queue else 1)
        max_msgs = TRANSPORT // per_msg
        bounds = np.arange(plan.batch + 1, dtype=np.int64) if plan.queue else None
        batches = _pfn_batches(plan, npages, min(max_msgs, 4096), rng)
        sent: list[tuple[np.ndarray, int, int]] = []
        t_send: list[float] = []
        off = 0
        clock = time.perf_counter
        deadline = clock() + seconds
        i = 0
        while i < max_msgs and (clock() < deadline or i < 5):
            pfns = batches[i % len(batches)]
            t0 = clock()
            if bounds is not None:
                n = a.send_update_data_queue(h, plan.mode, pfns, bounds, ta, off)
            else:
                n = a.send_update_data(h, plan.mode, pfns, ta, off)
            t_send.append(clock() - t0)
            sent.append((pfns, off, n))
            off += n
            i += 1
        t_recv: list[float] = []
        for pfns, o, n in sent:
            t0 = clock()
            if bounds is not None:
                b.receive_update_data_queue(hd, plan.mode, pfns, bounds, tb, o, n)
            else:
                b.receive_update_data(hd, plan.mode, pfns, tb, o, n)
            t_recv.append(clock() - t0)
    finally:
        a.send_cancel(h)
        b.decommission(hd)
    return t_send, t_recv


def _cell(direction: str, plan: _Plan, times: list[float]) -> Cell:
    """Rates from the median message time, so a noisy neighbour's spikes do not count."""
    spec = (plan.batch * PAGE_SIZE <= SPEC_MAX_LENGTH or plan.mode is Batching.PAGE) and not (
        plan.queue or plan.mode in (Batching.SG, Batching.AEAD)
    )
    per_msg_cmds = plan.batch if plan.queue else 1
    msgs = len(times)
    med = float(np.median(times))
    return Cell(
        direction=direction,
        mode="queue" if plan.queue else plan.mode.value,
        batch_pages=plan.batch,
        commands=msgs * per_msg_cmds,
        doorbells=msgs,
        pages=msgs * plan.batch,
        seconds=round(sum(times), 6),
        commands_per_s=round(per_msg_cmds / med, 1),
        us_per_command=round(med / per_msg_cmds * 1e6, 2),
        us_per_page=round(med / plan.batch * 1e6, 2),
        mb_per_s=round(plan.batch * PAGE_SIZE / med / 1e6, 2),
        us_per_page_mean=round(sum(times) / (msgs * plan.batch) * 1e6, 2),
        spec_compliant=spec,
    )


def _plans(modes: list[str], batches: list[int]) -> list[_Plan]:
    out: list[_Plan] = []
    for m in modes:
        if m == "page":
            out.append(_Plan(Batching.PAGE, False, 1))
        elif m == "queue":  # a doorbell of N one-page commands (N = 1 is just page mode)
            out += [_Plan(Batching.PAGE, True, b) for b in batches if b > 1]
        else:
            out += [_Plan(Batching(m), False, b) for b in batches]
    return out


def _csv(
    kind: type, allowed: tuple[str, ...] | None = None
) -> Callable[[click.Context, click.Parameter, str], list[Any]]:
    def convert(ctx: click.Context, param: click.Parameter, value: str) -> list[Any]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise click.BadParameter("give at least one value")
        out: list[Any] = []
        for v in items:
            if allowed is not None and v not in allowed:
                raise click.BadParameter(f"{v!r} is not one of {', '.join(allowed)}")
            try:
                x = kind(v)
            except ValueError:
                raise click.BadParameter(f"{v!r} is not a whole number") from None
            if kind is int and not 1 <= x <= MAX_BATCH:
                raise click.BadParameter(f"batch {x} is outside 1..{MAX_BATCH}")
            out.append(x)
        return out

    return convert


def _profile(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


@click.command("psp")
@click.option("--seconds", type=click.FloatRange(0.01, 60), default=0.2, show_default=True,
              help="Sending time per (mode, batch); receiving replays those packets.")
@click.option("--pages", type=click.IntRange(MAX_BATCH, 1 << 20), default=4096, show_default=True,
              help="Guest size in 4 KiB pages.")
@click.option("--modes", default=",".join(MODES), show_default=True,
              callback=_csv(str, MODES), help="Comma list of page, contig, sg, aead, queue.")
@click.option("--batches", default=",".join(map(str, DEFAULT_BATCHES)), show_default=True,
              callback=_csv(int), help="Pages per command (queue: commands per doorbell).")
@click.option("--psp-profile", default="none", show_default=True, callback=_profile,
              help="PSP cost profile: none, sev-2020, or fixed_us:doorbell_us:mb_per_s.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the records (a JSON list) here.")
def psp(seconds: float, pages: int, modes: list[str], batches: list[int], psp_profile: str,
        json_path: str | None) -> None:
    """Firmware cost per command and per page, SEND and RECEIVE, through the real mailbox."""
    plans = _plans(modes, batches)
    if not plans:
        raise click.UsageError("nothing to measure (queue needs a batch above 1)")
    cap = max([p.batch for p in plans if p.mode is Batching.CONTIG], default=4)
    machine = machine_info()
    rng = np.random.default_rng(1)
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="cvmig-bench-psp-") as tmp:
        from cvmig.psp import certs

        certs.AmdRoot.generate().save(Path(tmp) / "amd-root")
        certs.Owner.generate().save(Path(tmp) / "owner")
        contig = max(cap, 4) * PAGE_SIZE
        with PspProcess(f"{tmp}/src.sock", psp_profile, max_contig_bytes=contig, pki=tmp) as src_psp, \
                PspProcess(f"{tmp}/dst.sock", psp_profile, max_contig_bytes=contig, pki=tmp) as dst_psp, \
                ShmRegion(pages * PAGE_SIZE) as gmem, ShmRegion(pages * PAGE_SIZE) as dmem, \
                ShmRegion(TRANSPORT) as wire, src_psp.client() as a, dst_psp.client() as b:
            wire.arr[:] = 0  # touch the buffer once, so first-touch faults are not timed
            g, d = a.map_region(gmem.name, gmem.size), b.map_region(dmem.name, dmem.size)
            ta, tb = a.map_region(wire.name, wire.size), b.map_region(wire.name, wire.size)
            h = a.launch(g, pages, 0x1)
            rt = _round_trip(a, h)
            floors: dict[int, dict[str, float]] = {}
            for plan in plans:
                t_send, t_recv = _measure(a, b, h, d, pages, ta, tb, plan, seconds, rng)
                # one command's pages: a queue's commands are one page each
                per_cmd = 1 if plan.queue else plan.batch
                prims = floors.setdefault(per_cmd, primitives(per_cmd))
                floor = floor_us_per_page(plan.mode, per_cmd, prims)
                for direction, times in (("send", t_send), ("receive", t_recv)):
                    c = _cell(direction, plan, times)
                    c.floor_us_per_page = round(floor, 2)
                    c.pct_of_floor = round(100 * floor / c.us_per_page, 1)
                    cells.append(c)
    _print(cells, rt, psp_profile)
    if json_path:
        records = [dict(asdict(c), profile=psp_profile, machine=machine) for c in cells]
        Path(json_path).write_text(json.dumps(records, indent=1) + "\n")
        click.echo(f"wrote {len(records)} records to {json_path}")


def _round_trip(c: MailboxClient, h: int, n: int = 2000) -> float:
    """µs per GUEST_STATUS: the mailbox round trip with (almost) no firmware work."""
    for _ in range(50):
        c.guest_status(h)
    t = time.perf_counter()
    for _ in range(n):
        c.guest_status(h)
    return (time.perf_counter() - t) / n * 1e6


def _print(cells: list[Cell], rt_us: float, profile: str) -> None:
    click.echo(f"PSP profile {profile}; mailbox round trip (GUEST_STATUS) {rt_us:.1f} µs")
    click.echo("floor: the format's cryptography alone on this machine; % of floor = "
               "floor / achieved")
    head = (f"{'dir':<8}{'mode':<7}{'batch':>6}{'cmd/s':>10}{'µs/cmd':>10}{'µs/page':>10}"
            f"{'MB/s':>9}{'floor':>8}{'% fl':>7}  note")
    click.echo(head)
    click.echo("-" * len(head))
    for c in cells:
        note = "" if c.spec_compliant else "extension"
        click.echo(
            f"{c.direction:<8}{c.mode:<7}{c.batch_pages:>6}{c.commands_per_s:>10.0f}"
            f"{c.us_per_command:>10.1f}{c.us_per_page:>10.2f}{c.mb_per_s:>9.1f}"
            f"{c.floor_us_per_page:>8.2f}{c.pct_of_floor:>6.0f}%  {note}"
        )
    click.echo(machine_line())
