"""Calibrating the model on this host: what `cvmig model --validate` (and `--calibration`)
takes the model's costs from.

Per cost profile and batching mode: `cvmig bench psp` gives each secure processor's cost
per command by its pages (SEND and RECEIVE); the medians of a few idle migrations give the
stop costs the engine measured, its set-up and digest, how it shared the host's cores, and
what makes the model's idle migration last as long as the engine's (the PSP's pace that
day, the engine's own work per page, the destination's extra work). What the modes share
is settled once all are calibrated (a one-page command's price, the host's destination),
and one busy guest's runs weigh a busy guest's demand on the cores.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cvmig.bench.paper import MODES, Mode
from cvmig.migration.driver import Driver, MigrationParams, Progress, Switchover
from cvmig.migration.report import downtime_ms
from cvmig.model.costs import (
    LOOPBACK_BW,
    LOOPBACK_LATENCY,
    STOP_SYNC_PAGE_S,
    SYNC_PAGE_S,
    costs_from_calibration,
    costs_from_cell,
)
from cvmig.model.world import Costs, GuestModel, SimWorld
from cvmig.psp.api import PAGE_SIZE, Batching
from cvmig.psp.cost import parse

MiB = 1 << 20
VCPUS = 2
PSP_SCALE_MIN, PSP_SCALE_MAX = 0.05, 4.0  # a run's firmware pace against the bench's


def _fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """y = a + b x, a, b >= 0, by least squares on the relative error: a command's cost
    is not quite linear in its pages, and the fit must hold for the one-page commands of
    a scattered dirty set as well as for the bulk's big ones."""
    if len(set(x)) < 2:  # page mode: one size only, all of it per command
        return max(float(np.median(y)), 0.0), 0.0
    ys = np.array(y)
    b, a = np.polyfit(np.array(x), ys, 1, w=1 / np.maximum(ys, 1e-12))
    return max(float(a), 0.0), max(float(b), 1e-12)


def psp_costs(profile: str, modes: tuple[str, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per mode and direction: t_cmd (s per command, doorbell included) and bw (bytes/s),
    from `cvmig bench psp` over batch sizes."""
    with tempfile.TemporaryDirectory(prefix="cvmig-validate-") as tmp:
        out = Path(tmp) / "psp.json"
        subprocess.run([sys.executable, "-m", "cvmig", "bench", "psp", "--modes",
                        ",".join(modes), "--batches", "1,4,16,64,256", "--seconds", "0.1",
                        "--psp-profile", profile, "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        recs = json.loads(out.read_text())
    res: dict[str, dict[str, dict[str, Any]]] = {}
    for m in modes:
        for d in ("send", "receive"):
            rows = [r for r in recs if r["mode"] == m and r["direction"] == d]
            if m == "queue":
                # a doorbell of N one-page commands costs t_doorbell + N t_cmd
                a, b = _fit_line([r["batch_pages"] for r in rows],
                                 [r["us_per_command"] * r["batch_pages"] * 1e-6 for r in rows])
                res.setdefault(m, {})[d] = {"t_doorbell": a, "t_cmd": b, "bw": 1e15}
                continue
            rows.sort(key=lambda r: r["batch_pages"])
            x, y = [r["batch_pages"] for r in rows], [r["us_per_command"] * 1e-6 for r in rows]
            a, b = _fit_line(x, y)
            res.setdefault(m, {})[d] = {"t_cmd": a, "bw": PAGE_SIZE / b if b else 1e15}
            if len(x) > 1:
                res[m][d]["table"] = [x, y]
    return res


def one_page_as_page(cells: dict[str, Any], profile: str) -> None:
    """A one-page command is the same firmware work however it was batched: the engine's
    own firmware time says so (117-130 µs in the dirty rounds of page, contig, contig64
    and contig-qemu alike, on both full grids here), where `cvmig bench psp`, measuring each
    mode apart, drifts by 20-30 %. So the contiguous modes' measured tables start at what
    page mode's calibration (its bulk is nothing but one-page commands) prices one at."""
    page = cells.get(f"{profile}/page")
    if page is None:
        return
    for name, mode in MODES.items():
        cell = cells.get(f"{profile}/{name}")
        if cell is None or mode.batching is not Batching.CONTIG or mode.queue:
            continue
        for d in ("send", "receive"):
            t, p = cell[d].get("table"), page[d]
            if t and t[0][0] == 1:
                t[1][0] = p["t_cmd"] + PAGE_SIZE / p["bw"]


def pool_lag(cells: dict[str, Any], profile: str) -> None:
    """The destination's extra work is the host's, not a mode's: each mode's idle runs
    give one view of it (the drain of the frames in flight at the end of their bulk, frames
    of that mode's commands), and in the dirty rounds of a scattered writer every mode but
    sg sends one-page commands anyway. The profile's modes under the default rule take the
    median of their fits (here 0-15 %; a fit at 0 is a mode whose modelled drain was long
    enough already), and their engine's own work per page is fitted again to it."""
    own = {name: cells[f"{profile}/{name}"] for name, mode in MODES.items()
           if f"{profile}/{name}" in cells and mode.switchover is Switchover.FIRMWARE
           and "rx_lag" in cells[f"{profile}/{name}"]}
    if len(own) < 2:
        return
    lag = float(statistics.median(c["rx_lag"] for c in own.values()))
    for name, cell in own.items():
        cell["rx_lag_fit"], cell["rx_lag"] = cell["rx_lag"], lag
        _refit_t_page(cell, MODES[name])


def _refit_t_page(cell: dict[str, Any], mode: Mode) -> None:
    """The engine's own work per page again, for a cell whose lag changed: the lag sets
    the bulk's pace too (the window fills)."""
    b = cell.get("bulk")
    if b:
        cell["t_page"] = fit_t_page(costs_from_cell(cell, LOOPBACK_BW, LOOPBACK_LATENCY),
                                    b["pages"], mode, b["seconds"], b["cpu"])


def lag_from_twin(cells: dict[str, Any], profile: str) -> None:
    """QEMU's rule does not wait for the frames in flight before it stops, so its idle
    runs cannot show the destination's lag apart from the rest of a stop beyond its parts
    (their drain is in it); the mode with the same data path under the default rule can,
    and both are the data path's, not the rule's. The twin's own fit, not the host's pool:
    what the rule stops behind is that very drain (on the full grid, contig's idle runs
    waited 49-74 ms for it before their stop, contig-qemu's stopped with 74-144 ms of it;
    contig's own fit, 0, reproduces its wait, the pool's 4 % made it long)."""
    for name, mode in MODES.items():
        cell = cells.get(f"{profile}/{name}")
        if cell is None or mode.switchover is Switchover.FIRMWARE:
            continue
        for twin_name, twin in MODES.items():
            t = cells.get(f"{profile}/{twin_name}")
            if t is not None and twin.switchover is Switchover.FIRMWARE and \
                    (twin.batching, twin.cap, twin.queue) == (mode.batching, mode.cap, mode.queue):
                cell["rx_lag"] = t.get("rx_lag_fit", t.get("rx_lag", 0.0))
                cell["stop_rest_ms"] = t.get("stop_rest_ms", 0.0)
                _refit_t_page(cell, mode)


def psp_key(mode: Mode) -> str:
    """Which `cvmig bench psp` mode prices a configuration's firmware commands."""
    return "queue" if mode.queue else mode.batching.value


def _solve(f: Callable[[float], float], target: float, lo: float, hi: float,
           steps: int) -> float:
    """The x in [lo, hi] where f, increasing, reaches ``target`` (bisection)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _model_idle_run(costs: Costs, npages: int, mode: Mode, cpu: float = 0.0) -> Progress:
    """The model's idle migration."""
    w = SimWorld(GuestModel(npages=npages, dirty_rate=0, working_set=0, vcpus=VCPUS, cpu=cpu),
                 costs)
    d = Driver(w, mode.params(MigrationParams()))
    return d.run()


def _model_idle(costs: Costs, npages: int, mode: Mode, cpu: float = 0.0) -> tuple[float, float]:
    """The model's idle migration: its bulk round, and the wait between the bulk's end
    and the stop (its frames in flight landing), in seconds."""
    rounds = _model_idle_run(costs, npages, mode, cpu).rounds
    bulk, nxt = rounds[0], rounds[1]
    return bulk.duration, nxt.start - bulk.start - bulk.duration


def _model_bulk(costs: Costs, npages: int, mode: Mode, cpu: float = 0.0) -> float:
    """The model's bulk round for an idle guest (seconds)."""
    return _model_idle(costs, npages, mode, cpu)[0]


def fit_rx_lag(costs: Costs, npages: int, mode: Mode, gap_s: float, cpu: float = 0.0) -> float:
    """The destination's extra work (``rx_lag``) that makes the model's frames in flight
    at the end of the bulk take as long to land as the engine's did (the wait before its
    stop). A destination a few per cent slower than its source is the pipeline's slower
    end: over a long bulk the window fills, and the frames in it drain at the end; the
    engine's drains take 1-6 of its frames' time, as full windows do."""
    if mode.switchover is not Switchover.FIRMWARE:
        return 0.0  # (QEMU's rule does not wait for frames in flight: nothing to fit)
    # without a lag of its own: a refit starts from the last fit's, which already met the
    # gap, and read that as no lag at all
    bulk, gap = _model_idle(replace(costs, rx_lag=0.0), npages, mode, cpu)
    if gap >= gap_s:
        return 0.0
    # the wait ends as the frames land (`Driver._await_landed`): it is their drain. More
    # work at the destination paces the bulk too, which its own fit already explains: the
    # extra work is at most what leaves the bulk's pace as it is (within LAG_PACE)
    hi = _solve(lambda lag: float(_model_idle(replace(costs, rx_lag=lag), npages, mode,
                                              cpu)[0] > bulk * (1 + LAG_PACE)),
                0.5, 0.0, float(costs.window + costs.slots), 12)
    return _solve(lambda lag: _model_idle(replace(costs, rx_lag=lag), npages, mode, cpu)[1],
                  gap_s, 0.0, hi, 25)


def fit_t_page(costs: Costs, npages: int, mode: Mode, bulk_s: float, cpu: float = 0.0) -> float:
    """The engine's own work per page that makes the model's bulk last ``bulk_s``: what
    the bulk takes beyond its firmware. It is the destination's first touch of each page
    (its memory faulted in), paid once: the engine's dirty rounds take little more than
    their firmware time (sg on the dirtier at 2×: 0.14-0.18 s for 0.14-0.15 s of it)."""
    if _model_bulk(replace(costs, t_page=0.0), npages, mode, cpu) >= bulk_s:
        return 0.0
    return _solve(lambda t: _model_bulk(replace(costs, t_page=t), npages, mode, cpu),
                  bulk_s, 0.0, 1e-3, 30)


LAG_PACE = 0.01  # the most the destination's fitted extra work may slow the model's bulk
BUSY = ("sqlite", "sg", "none")  # the busy-guest cell that calibrates guest_weight


def fit_guest_weight(cal: dict[str, Any], profile: str, reports: list[dict[str, Any]]) -> float:
    """How many times a busy guest's demand for the cores counts against the migration:
    what makes the model's bulk round, beside a guest as busy as the reports', last as long
    as theirs did (their median). 1 where the model's is already as long."""
    mode = MODES[BUSY[1]]
    costs = costs_from_calibration(cal, profile, BUSY[1], VCPUS)
    bulk = statistics.median(r["rounds"][0]["duration"] for r in reports)
    npages = reports[0]["rounds"][0]["pages"]
    cpu = statistics.median(float(r["guest"].get("cpu-cores-before") or 0.0) for r in reports)
    if not cpu or _model_bulk(costs, npages, mode, cpu) >= bulk:
        return 1.0
    return _solve(lambda w: _model_bulk(replace(costs, guest_weight=w), npages, mode, cpu),
                  bulk, 1.0, 4.0, 25)


def _scaled(direction: dict[str, Any], f: float) -> dict[str, Any]:
    """One direction's PSP costs ``f`` times as long."""
    out: dict[str, Any] = {}
    for k, v in direction.items():
        if k == "table":
            out[k] = [v[0], [y * f for y in v[1]]]
        else:
            out[k] = v / f if k == "bw" else v * f
    return out


def _pace(cell: dict[str, Any], f: float) -> None:
    """The cell's firmware (both directions) ``f`` times as long, ``psp_scale`` kept."""
    cell["psp_scale"] = cell.get("psp_scale", 1.0) * f
    for d in ("send", "receive"):
        cell[d] = _scaled(cell[d], f)


def fit_psp_scale(cell: dict[str, Any], npages: int, mode: Mode, bulk_s: float,
                  cpu: float) -> float:
    """The factor on the PSP's priced costs that makes the model's bulk last ``bulk_s``."""
    def bulk(f: float) -> float:
        scaled = {**cell, **{d: _scaled(cell[d], f) for d in ("send", "receive")}}
        return _model_bulk(costs_from_cell(scaled, LOOPBACK_BW, LOOPBACK_LATENCY), npages,
                           mode, cpu)

    return _solve(bulk, bulk_s, 0.05, 1.0, 25)


def calibration_cell(rep: dict[str, Any], mode: Mode,
                     psp: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """From an idle migration's report: the stop costs the engine measured, and its own
    work per page (what makes the model's bulk round last as long as the engine's)."""
    bulk = rep["rounds"][0]
    measured = rep["x-stop"]["costs-measured-ms"]
    last = rep["rounds"][-1]
    running_at = last["start"] + last["duration"]  # the go-ahead: the downtime's end
    # a copy: the calibration's own tables are adjusted later (`one_page_as_page`), and
    # the firmware's prices must stay as `bench psp` measured them for the next one
    cell: dict[str, Any] = {**copy.deepcopy(psp[psp_key(mode)]), "t_page": 0.0,
                            "stop_ms": {**measured, "slice": 10.0},
                            "host": host_share(rep),
                            "setup_s": rep.get("setup-time", 0) / 1000,
                            "digest_page": max(rep["total-time"] / 1000 - running_at, 0.0)
                            / rep["ram"]["total"] * PAGE_SIZE}
    cell.update(sync_cost(rep))
    cpu = float(rep["guest"].get("cpu-cores-before") or 0.0)
    base = costs_from_cell(cell, LOOPBACK_BW, LOOPBACK_LATENCY)
    emulated = cell["host"].get("psp_cpu", True)  # the firmware is CPU work here, its pace drifts
    measured_psp = float(bulk.get("psp_seconds") or 0.0)
    if emulated and measured_psp > 0:
        # the emulator's pace in this run, as the engine timed its firmware calls (the
        # bulk's commands at the bench's prices, on cores of their own): a queue's ran 12 %
        # slower in the grid than in the bench, in its bulk and its dirty rounds alike
        priced = _model_idle_run(replace(base, cores=0.0), bulk["pages"], mode,
                                 cpu).rounds[0].psp_seconds
        if priced > 0:
            _pace(cell, min(max(measured_psp / priced, PSP_SCALE_MIN), PSP_SCALE_MAX))
            base = costs_from_cell(cell, LOOPBACK_BW, LOOPBACK_LATENCY)
    if emulated and _model_bulk(base, bulk["pages"], mode, cpu) > bulk["duration"]:
        # the emulator ran faster during this run than when `bench psp` priced it (this
        # shared machine's pace drifts): the same shape, scaled to the run
        _pace(cell, fit_psp_scale(cell, bulk["pages"], mode, bulk["duration"], cpu))
        base = costs_from_cell(cell, LOOPBACK_BW, LOOPBACK_LATENCY)
    cell["t_page"] = fit_t_page(base, bulk["pages"], mode, bulk["duration"], cpu)
    # the lag changes the pipeline's pace too (the window fills): fitted, then the pace again
    stop_at = rep["rounds"][1]["start"] if len(rep["rounds"]) > 1 else None
    if stop_at is not None:
        gap = stop_at - bulk["start"] - bulk["duration"]
        for _ in range(2):
            cell["rx_lag"] = fit_rx_lag(replace(base, t_page=cell["t_page"]), bulk["pages"],
                                        mode, gap, cpu)
            base = replace(base, rx_lag=cell["rx_lag"])
            cell["t_page"] = fit_t_page(base, bulk["pages"], mode, bulk["duration"], cpu)
    # what the engine's stop took beyond the parts it measured and the model's own way
    # through them (FINISH's and CONFIRM's way, the source's wake: ~1 ms here)
    run = _model_idle_run(replace(base, t_page=cell["t_page"]), bulk["pages"], mode, cpu)
    cell["stop_rest_ms"] = round(max(0.0, downtime_ms(rep) - run.downtime * 1000), 3)
    cell["bulk_pages_per_s"] = bulk["pages"] / bulk["duration"]
    cell["bulk"] = {"pages": bulk["pages"], "seconds": bulk["duration"], "cpu": cpu}
    cell["calibration_run"] = {"memory_mib": rep["ram"]["total"] // MiB + 1,
                               "total_ms": rep["total-time"], "downtime_ms": downtime_ms(rep)}
    return cell


def host_share(rep: dict[str, Any]) -> dict[str, Any]:
    """How an idle migration shared this host's cores: their number, what the migration's
    own processes kept busy (the host's busy cores less the guest's and the destination's
    start work), the start work, and whether the PSP's costs were CPU work here (the
    emulator's) or a hardware profile's wall time; where the report has it, how long the
    destination took to ready itself before its first import (``dst_start``: older reports
    lack it, and the model's destination then begins at once). Empty for reports that lack
    the shares."""
    h = rep.get("x-host-cpu") or {}
    busy, start = h.get("busy-cores-precopy"), h.get("destination-start-cpu-s")
    if not busy or start is None:
        return {}
    pre = sum(r["duration"] for r in rep["rounds"] if r["kind"] != "stop-and-copy")
    guest = float(rep["guest"].get("cpu-cores-during") or 0.0)
    cores = float(h["cores"])
    pipeline = min(max(busy - guest - start / max(pre, 1e-3), 0.05), cores)
    out = {"cores": cores, "pipeline_cores": round(pipeline, 3), "start_cpu": float(start),
           "psp_cpu": parse(rep["psp"]["profile"]).is_free}
    if h.get("destination-ready-s") is not None:
        out["dst_start"] = float(h["destination-ready-s"])
    return out


def sync_cost(rep: dict[str, Any]) -> dict[str, float]:
    """A sync's own time less its per-page part, before the pause (the median of those a
    report measured) and after it: nothing where it measured none (older than x-sync-ms)."""
    x = rep.get("x-sync-ms", [])
    if len(x) < 2:
        return {}
    npages = rep["ram"]["total"] // PAGE_SIZE
    return {"sync_s": max(statistics.median(x[:-1]) / 1000 - npages * SYNC_PAGE_S, 0.0),
            "stop_sync_s": max(x[-1] / 1000 - npages * STOP_SYNC_PAGE_S, 0.0)}


def median_report(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """An idle migration made of the medians of several: its bulk, the wait before its
    stop, its stop costs, set-up, digest and host shares (what one run alone would set
    at one moment of a shared machine's drifting pace)."""
    def med(f: Callable[[dict[str, Any]], float]) -> float:
        return float(statistics.median(f(r) for r in reports))

    def tail(r: dict[str, Any]) -> float:
        last = r["rounds"][-1]
        return r["total-time"] / 1000 - last["start"] - last["duration"]

    two = [r for r in reports if len(r["rounds"]) > 1]
    base = copy.deepcopy(two[0] if two else reports[0])
    bulk = base["rounds"][0]
    bulk["duration"] = med(lambda r: r["rounds"][0]["duration"])
    end = bulk["start"] + bulk["duration"]
    if two:
        gap = float(statistics.median(r["rounds"][1]["start"] - r["rounds"][0]["start"]
                                      - r["rounds"][0]["duration"] for r in two))
        base["rounds"][1]["start"] = end + gap
        end = base["rounds"][1]["start"] + base["rounds"][1]["duration"]
        base["rounds"] = base["rounds"][:2]
    base["total-time"] = (end + med(tail)) * 1000
    base["setup-time"] = med(lambda r: r.get("setup-time", 0))
    stop: dict[str, float] = {}
    for part in base["x-stop"]["costs-measured-ms"]:
        stop[part] = float(statistics.median(
            r["x-stop"]["costs-measured-ms"].get(part, 0.0) for r in reports))
    base["x-stop"]["costs-measured-ms"] = stop
    base["guest"]["cpu-cores-before"] = med(lambda r: r["guest"].get("cpu-cores-before") or 0)
    base["guest"]["cpu-cores-during"] = med(lambda r: r["guest"].get("cpu-cores-during") or 0)
    pre = [t for r in reports for t in r.get("x-sync-ms", [])[:-1]]
    if pre:  # the syncs before the pause, and the stop's
        base["x-sync-ms"] = [statistics.median(pre),
                             statistics.median(r["x-sync-ms"][-1] for r in reports
                                               if r.get("x-sync-ms"))]
    hosts = [r["x-host-cpu"] for r in reports if (r.get("x-host-cpu") or {}).get(
        "busy-cores-precopy") and r["x-host-cpu"].get("destination-start-cpu-s") is not None]
    if hosts:
        base["x-host-cpu"] = {
            "cores": hosts[0]["cores"],
            "busy-cores-precopy": statistics.median(h["busy-cores-precopy"] for h in hosts),
            "destination-start-cpu-s": statistics.median(
                h["destination-start-cpu-s"] for h in hosts)}
        ready = [h["destination-ready-s"] for h in hosts
                 if h.get("destination-ready-s") is not None]
        if ready:
            base["x-host-cpu"]["destination-ready-s"] = statistics.median(ready)
    base["downtime"] = med(lambda r: r["downtime"])
    base["x-downtime-ms"] = med(downtime_ms)
    return base


def calibrate_on(reports: list[dict[str, Any]], mode: Mode,
                 psp: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """A mode's calibration from several idle runs: their medians, and how their pace
    varied (for `predict_cell`'s samples)."""
    cell = calibration_cell(median_report(reports), mode, psp)
    cell["pace"] = pace_of(reports)
    return cell


def settle(cells: dict[str, Any], profile: str) -> None:
    """What a profile's calibrated modes share once all are calibrated: a one-page
    command's price, the destination's lag (under QEMU's rule too)."""
    one_page_as_page(cells, profile)
    pool_lag(cells, profile)
    lag_from_twin(cells, profile)


def weigh_busy(cal: dict[str, Any], profile: str, reports: list[dict[str, Any]],
               echo: Callable[[str], None]) -> None:
    """The busy-guest cell (`BUSY`) calibrates ``profile``'s guest_weight."""
    w = round(fit_guest_weight(cal, profile, reports), 3)
    cal.setdefault("guest_weight", {})[profile] = w
    echo(f"  calibrated {profile}: a busy guest weighs {w:g}x")


def calibrate_mode(profile: str, mode: str, memory: int,
                   psp: dict[str, dict[str, dict[str, Any]]], runs: int = 1) -> dict[str, Any]:
    """``runs`` idle migrations calibrate ``mode`` (a `cvmig bench paper` mode) here."""
    from cvmig.bench.paper import _run

    reports = []
    for i in range(runs):
        r = _run("idle", MODES[mode], "none", profile, memory, 0.0, i)
        if r["report"] is None:
            raise RuntimeError(f"calibration migration failed: {r['row'].get('error')}")
        reports.append(r["report"])
    cell = calibrate_on(reports, MODES[mode], psp)
    cell["calibration_run"]["load"] = os.getloadavg()[0]
    return cell


def describe(key: str, cell: dict[str, Any]) -> str:
    s = cell["send"]
    stop = sum(v for k, v in cell["stop_ms"].items() if k != "slice")
    return (f"  calibrated {key}: send {s['t_cmd'] * 1e6:.0f} µs/cmd + "
            f"{PAGE_SIZE / s['bw'] * 1e6:.1f} µs/page, engine {cell['t_page'] * 1e6:.1f} "
            f"µs/page, stop {stop:.0f} ms")


def psp_modes(modes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({psp_key(MODES[m]) for m in modes}))


def pace_of(reports: list[dict[str, Any]]) -> list[float]:
    """Each idle run's bulk round against the median one's: how the engine's pace varies
    from run to run on this machine."""
    bulks = [r["rounds"][0]["duration"] for r in reports]
    med = statistics.median(bulks)
    return [round(b / med, 4) for b in bulks]
