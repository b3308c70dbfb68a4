"""`cvmig model --validate`: real migrations next to the model, on the same inputs.

First the host is calibrated, per cost profile and batching mode: `cvmig bench psp` gives
each secure processor's cost per command by its pages (SEND and RECEIVE); the medians of
a few idle migrations give the stop costs the engine measured, its set-up and digest, how
it shared the host's cores, and what makes the model's idle migration last as long as the
engine's (the PSP's pace that day, the engine's own work per page, the destination's lag).
Those calibration runs are not part of the grid. Then each cell of the grid is migrated
for real (`cvmig.bench.paper`'s runner: PSP processes, guest processes, TCP) and
predicted by the model, with the same guest size, workload, batching, throttle, limit and
timeout; the error is (model - engine) / engine.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cvmig.bench.paper import MODES, Mode
from cvmig.migration.driver import Driver, MigrationParams, Switchover, TimeoutAction
from cvmig.migration.throttle import ThrottleKind
from cvmig.model.costs import (
    LOOPBACK_BW,
    LOOPBACK_LATENCY,
    costs_from_calibration,
    costs_from_cell,
)
from cvmig.model.workload import guest_from_reports, stop_samples, workload_stop
from cvmig.model.world import Costs, GuestModel, SimWorld
from cvmig.psp.api import PAGE_SIZE, Batching
from cvmig.psp.cost import parse

MiB = 1 << 20
VCPUS = 2


@dataclass(frozen=True)
class Grid:
    memories: tuple[int, ...]  # MiB, emulator cost
    hw_memories: tuple[int, ...]  # MiB, hardware profile (slow by design)
    workloads: tuple[str, ...]  # idle | d0.5 | d1.5 (x the page baseline's rate) | sqlite
    hw_workloads: tuple[str, ...]
    modes: tuple[str, ...]
    throttles: tuple[str, ...]
    profiles: tuple[str, ...]
    timeout_s: float
    hw_timeout_s: float
    reps: int = 3  # real migrations per cell: the model is held to their median


QUICK = Grid(memories=(32,), hw_memories=(16,), workloads=("idle", "d0.5", "d1.5"),
             hw_workloads=("idle", "d0.5"), modes=("page", "sg"), throttles=("none", "precopy"),
             profiles=("none", "sev-2020"), timeout_s=8.0, hw_timeout_s=30.0, reps=2)
FULL = Grid(memories=(16, 64, 128), hw_memories=(16,),
            workloads=("idle", "d0.5", "d1.5", "sqlite"), hw_workloads=("idle", "d0.5", "d1.5"),
            modes=("page", "contig", "sg"), throttles=("none", "precopy"),
            profiles=("none", "sev-2020"), timeout_s=15.0, hw_timeout_s=40.0)


# -- calibration ---------------------------------------------------------------------------

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
    """The destination's lag is the host's, not a mode's: each mode's idle runs give one
    view of it (the drain of the frames in flight at the end of their bulk, frames of that
    mode's commands), and in the dirty rounds of a scattered writer every mode but sg sends
    one-page commands anyway. The profile's modes under the default rule take the median
    of their fits (a fit at 0 is a mode whose modelled drain was long enough already), and
    their engine's own work per page is fitted again to it."""
    own = {name: cells[f"{profile}/{name}"] for name, mode in MODES.items()
           if f"{profile}/{name}" in cells and mode.switchover is Switchover.FIRMWARE
           and "rx_lag" in cells[f"{profile}/{name}"]}
    if len(own) < 2:
        return
    lag = float(statistics.median(c["rx_lag"] for c in own.values()))
    for name, cell in own.items():
        cell["rx_lag_fit"], cell["rx_lag"] = cell["rx_lag"], lag
        b = cell.get("bulk")
        if b:
            base = costs_from_cell(cell, LOOPBACK_BW, LOOPBACK_LATENCY)
            cell["t_page"] = fit_t_page(replace(base, t_page=0.0), b["pages"], MODES[name],
                                        b["seconds"], b["cpu"])


def lag_from_twin(cells: dict[str, Any], profile: str) -> None:
    """QEMU's rule does not wait for the frames in flight before it stops, so its idle
    runs cannot show the destination's lag; the mode with the same data path under the
    default rule can, and the lag is the data path's, not the rule's."""
    for name, mode in MODES.items():
        cell = cells.get(f"{profile}/{name}")
        if cell is None or mode.switchover is Switchover.FIRMWARE:
            continue
        for twin_name, twin in MODES.items():
            t = cells.get(f"{profile}/{twin_name}")
            if t is not None and twin.switchover is Switchover.FIRMWARE and \
                    (twin.batching, twin.cap, twin.queue) == (mode.batching, mode.cap, mode.queue):
                cell["rx_lag"] = t.get("rx_lag", 0.0)


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


def _model_idle(costs: Costs, npages: int, mode: Mode, cpu: float = 0.0) -> tuple[float, float]:
    """The model's idle migration: its bulk round, and the wait between the bulk's end
    and the stop (its frames in flight landing), in seconds."""
    w = SimWorld(GuestModel(npages=npages, dirty_rate=0, working_set=0, vcpus=VCPUS, cpu=cpu),
                 costs)
    d = Driver(w, mode.params(MigrationParams()))
    d.run()
    bulk, nxt = d.progress.rounds[0], d.progress.rounds[1]
    return bulk.duration, nxt.start - bulk.start - bulk.duration


def _model_bulk(costs: Costs, npages: int, mode: Mode, cpu: float = 0.0) -> float:
    """The model's bulk round for an idle guest (seconds)."""
    return _model_idle(costs, npages, mode, cpu)[0]


def fit_rx_lag(costs: Costs, npages: int, mode: Mode, gap_s: float, cpu: float = 0.0) -> float:
    """The destination's lag that makes the model's frames in flight at the end of the
    bulk take as long to land as the engine's did (the wait before its stop)."""
    if mode.switchover is not Switchover.FIRMWARE or \
            _model_idle(costs, npages, mode, cpu)[1] >= gap_s:
        return 0.0  # (QEMU's rule does not wait for frames in flight: nothing to fit)
    # the wait ends as the frames land (`Driver._await_landed`): it is their drain, and a
    # destination may lag its source by the whole pipeline (window + slots frames)
    hi = float(costs.window + costs.slots)
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
    cpu = float(rep["guest"].get("cpu-cores-before") or 0.0)
    base = costs_from_cell(cell, LOOPBACK_BW, LOOPBACK_LATENCY)
    if cell["host"].get("psp_cpu", True) and \
            _model_bulk(base, bulk["pages"], mode, cpu) > bulk["duration"]:
        # the emulator ran faster during this run than when `bench psp` priced it (this
        # shared machine's pace drifts): the same shape, scaled to the run
        cell["psp_scale"] = f = fit_psp_scale(cell, bulk["pages"], mode, bulk["duration"], cpu)
        for d in ("send", "receive"):
            cell[d] = _scaled(cell[d], f)
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
    cell["bulk_pages_per_s"] = bulk["pages"] / bulk["duration"]
    cell["bulk"] = {"pages": bulk["pages"], "seconds": bulk["duration"], "cpu": cpu}
    cell["calibration_run"] = {"memory_mib": rep["ram"]["total"] // MiB + 1,
                               "total_ms": rep["total-time"], "downtime_ms": rep["downtime"]}
    return cell


def host_share(rep: dict[str, Any]) -> dict[str, Any]:
    """How an idle migration shared this host's cores: their number, what the migration's
    own processes kept busy (the host's busy cores less the guest's and the destination's
    start work), the start work, and whether the PSP's costs were CPU work here (the
    emulator's) or a hardware profile's wall time. Empty for reports that lack it."""
    h = rep.get("x-host-cpu") or {}
    busy, start = h.get("busy-cores-precopy"), h.get("destination-start-cpu-s")
    if not busy or start is None:
        return {}
    pre = sum(r["duration"] for r in rep["rounds"] if r["kind"] != "stop-and-copy")
    guest = float(rep["guest"].get("cpu-cores-during") or 0.0)
    cores = float(h["cores"])
    pipeline = min(max(busy - guest - start / max(pre, 1e-3), 0.05), cores)
    return {"cores": cores, "pipeline_cores": round(pipeline, 3), "start_cpu": float(start),
            "psp_cpu": parse(rep["psp"]["profile"]).is_free}


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
    hosts = [r["x-host-cpu"] for r in reports if (r.get("x-host-cpu") or {}).get(
        "busy-cores-precopy") and r["x-host-cpu"].get("destination-start-cpu-s") is not None]
    if hosts:
        base["x-host-cpu"] = {
            "cores": hosts[0]["cores"],
            "busy-cores-precopy": statistics.median(h["busy-cores-precopy"] for h in hosts),
            "destination-start-cpu-s": statistics.median(
                h["destination-start-cpu-s"] for h in hosts)}
    base["downtime"] = med(lambda r: r["downtime"])
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


def _describe(key: str, cell: dict[str, Any]) -> str:
    s = cell["send"]
    stop = sum(v for k, v in cell["stop_ms"].items() if k != "slice")
    return (f"  calibrated {key}: send {s['t_cmd'] * 1e6:.0f} µs/cmd + "
            f"{PAGE_SIZE / s['bw'] * 1e6:.1f} µs/page, engine {cell['t_page'] * 1e6:.1f} "
            f"µs/page, stop {stop:.0f} ms")


def psp_modes(modes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({psp_key(MODES[m]) for m in modes}))


def calibrate(grid: Grid, echo: Callable[[str], None]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    psps: dict[str, Any] = {}
    for profile in grid.profiles:
        psp = psps[profile] = psp_costs(profile, psp_modes(grid.modes))
        mem = (grid.hw_memories if profile != "none" else grid.memories)[0] * MiB
        for mode in grid.modes:
            cells[f"{profile}/{mode}"] = calibrate_mode(profile, mode, mem, psp, grid.reps)
            echo(_describe(f"{profile}/{mode}", cells[f"{profile}/{mode}"]))
        settle(cells, profile)
    return {"cells": cells, "psp": psps, "vcpus": VCPUS, "link_bw": LOOPBACK_BW,
            "latency": LOOPBACK_LATENCY}


# -- the grid ------------------------------------------------------------------------------

def _workload(name: str, rate: float) -> str:
    if name == "idle":
        return "idle"
    if name == "sqlite":
        return "sqlite:accounts=200"
    frac = float(name[1:])
    return f"dirtier:rate={max(1, round(frac * rate))},pattern=uniform"


def predict_cell(cal: dict[str, Any], profile: str, mode: str, throttle: str,
                 guest: GuestModel, timeout_s: float,
                 stopped: list[dict[str, Any]] | None = None,
                 samples: int = 1) -> dict[str, Any]:
    """The model's migration of one cell (``stopped``: reports whose measured stop costs
    are this workload's; without, the calibration's idle ones). With ``samples`` > 1 it
    is migrated that many times, each at a pace the calibration runs showed, with stop
    costs drawn part by part from those the reports measured and its own draw of pages:
    the medians, and the 10th-90th percentiles of what the engine's runs may show."""
    costs = costs_from_calibration(cal, profile, mode, VCPUS)
    if stopped:
        costs.stop = workload_stop(costs.stop, stopped)
    params = MODES[mode].params(MigrationParams(
        throttle=ThrottleKind(throttle), timeout_s=timeout_s, timeout_action=TimeoutAction.FORCE))
    if samples <= 1:
        return _predict(guest, costs, params)
    rng = np.random.default_rng(7)
    paces = cal["cells"][f"{profile}/{mode}"].get("pace") or [1.0]
    parts = stop_samples(stopped or [])
    runs = []
    for i in range(samples):
        c = costs.at_pace(float(rng.choice(paces)))
        if parts:
            c.stop = replace(c.stop, **{k: float(rng.choice(v)) for k, v in parts.items()})
        runs.append(_predict(replace(guest, seed=i + 1), c, params))
    out: dict[str, Any] = {"samples": samples, "rounds": statistics.median(r["rounds"] for r in runs),
                           "switchover": statistics.mode(r["switchover"] for r in runs)}
    for _, key in METRICS:
        xs = np.array([r[key] for r in runs])
        out[key] = float(np.median(xs))
        out[f"{key}_p10"], out[f"{key}_p90"] = (float(v) for v in np.percentile(xs, [10, 90]))
    return out


def _predict(guest: GuestModel, costs: Costs, params: MigrationParams) -> dict[str, Any]:
    world = SimWorld(guest, costs)
    p = Driver(world, params).run()
    return {"total_ms": p.total_time * 1000, "downtime_ms": p.downtime * 1000,
            "gap_ms": world.guest_gap(p) * 1000, "rounds": len(p.rounds),
            "switchover": p.switchover}


def pace_of(reports: list[dict[str, Any]]) -> list[float]:
    """Each idle run's bulk round against the median one's: how the engine's pace varies
    from run to run on this machine."""
    bulks = [r["rounds"][0]["duration"] for r in reports]
    med = statistics.median(bulks)
    return [round(b / med, 4) for b in bulks]


def _err(model: float, engine: float) -> float:
    return round((model - engine) / max(engine, 1e-9), 4)


@dataclass
class Workload:
    """A workload's reports at one guest size and cost profile, across the grid's cells."""

    all: list[dict[str, Any]]  # every mode and throttle: its stop costs
    unthrottled: list[dict[str, Any]]  # throttle none: its dirty set as it runs freely

    def add(self, runs: list[dict[str, Any]], throttle: str) -> None:
        reps = [r["report"] for r in runs if r["report"] is not None]
        self.all += reps
        if throttle == "none":
            self.unthrottled += reps


METRICS = (("total", "total_ms"), ("downtime", "downtime_ms"), ("gap", "gap_ms"))


def make_cell(cal: dict[str, Any], profile: str, mem_mib: int, wname: str, wl: str, mode: str,
              thr: str, timeout: float, runs: list[dict[str, Any]],
              workload: Workload | None = None, samples: int = 1) -> dict[str, Any] | None:
    """The engine's runs of one cell (`cvmig.bench.paper._run` results) beside the model.
    The model is held to the runs' median; how far the runs lie from it (half their
    range, relative) is the engine's own spread, the floor under any model's error.
    ``workload``: what the workload's runs at this size and profile measured of it (its
    stop costs; its dirty set where it has no rate knob); without, this cell's runs.
    ``samples``: the model's runs (`predict_cell`); with more than one, whether the
    engine's median lies within their 10th-90th percentiles."""
    ok = [r for r in runs if r["report"] is not None]
    if not ok:
        return None
    rows = [r["row"] for r in ok]
    reports = [r["report"] for r in ok]
    w = workload or Workload(reports, reports)
    guest = guest_from_reports(wl, mem_mib * MiB, reports, VCPUS, w.unthrottled or reports)
    m = predict_cell(cal, profile, mode, thr, guest, timeout, w.all, samples)
    engine: dict[str, Any] = {}
    cell: dict[str, Any] = {"profile": profile, "memory_mib": mem_mib, "workload": wname,
                            "workload_spec": wl, "mode": mode, "throttle": thr}
    for name, key in METRICS:
        xs = [float(r[key]) for r in rows]
        med = statistics.median(xs)
        engine[key] = med
        cell[f"err_{name}"] = _err(m[key], med)
        cell[f"spread_{name}"] = round((max(xs) - min(xs)) / 2 / max(med, 1e-9), 4)
        if f"{key}_p10" in m:
            cell[f"within_{name}"] = m[f"{key}_p10"] <= med <= m[f"{key}_p90"]
    engine["rounds"] = statistics.median(r["rounds"] for r in rows)
    engine["switchover"] = statistics.mode(r["switchover"] for r in rows)
    engine["runs"] = [{k: r[k] for k in ("total_ms", "downtime_ms", "gap_ms", "rounds",
                                         "switchover")} for r in rows]
    engine["stop"] = [r["report"].get("x-stop") for r in ok]
    cell["engine"] = engine
    cell["model"] = {k: round(v, 1) if isinstance(v, float) else v for k, v in m.items()}
    return cell


def _echo_cell(echo: Callable[[str], None], c: dict[str, Any]) -> None:
    e, m = c["engine"], c["model"]
    echo(f"  {c['profile']:8} {c['memory_mib']:4} MiB {c['workload']:6} {c['mode']:11} "
         f"{c['throttle']:13} total {e['total_ms']:7.0f} / {m['total_ms']:7.0f} ms "
         f"({c['err_total']:+.0%}, runs ±{c['spread_total']:.0%})  downtime "
         f"{e['downtime_ms']:5.0f} / {m['downtime_ms']:5.0f} ms ({c['err_downtime']:+.0%}, "
         f"runs ±{c['spread_downtime']:.0%})")


def _result(rows: list[dict[str, Any]], extra: dict[str, Any], out: Path, name: str,
            t0: float, load0: float) -> dict[str, Any]:
    from cvmig.bench.machine import machine_info

    result = {"summary": summarize(rows), "cells": rows, **extra, "machine": machine_info(),
              "load": {"start": load0, "end": os.getloadavg()[0]},
              "seconds": round(time.monotonic() - t0, 1)}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, out / f"{name}.png")
    return result


def run(grid: Grid, out: Path, echo: Callable[[str], None] = print,
        samples: int = 1) -> dict[str, Any]:
    from cvmig.bench.paper import _run

    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    echo(f"calibrating this host (bench psp, {grid.reps} idle migrations per mode and profile)")
    calibration = calibrate(grid, echo)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model-calibration.json").write_text(json.dumps(calibration, indent=1) + "\n")
    rows: list[dict[str, Any]] = []
    pools: dict[tuple[str, int, str], Workload] = {}
    for profile in grid.profiles:
        hw = profile != "none"
        rate = calibration["cells"][f"{profile}/page"]["bulk_pages_per_s"]
        for mem_mib in grid.hw_memories if hw else grid.memories:
            for wname in grid.hw_workloads if hw else grid.workloads:
                wl = _workload(wname, rate)
                # this shared machine's pace drifts by minutes: the engine's own costs
                # are measured again (idle runs, not cells) before each block
                for mode in grid.modes:
                    key = f"{profile}/{mode}"
                    calibration["cells"][key] = calibrate_mode(
                        profile, mode, mem_mib * MiB, calibration["psp"][profile], grid.reps)
                    echo(_describe(key, calibration["cells"][key]))
                settle(calibration["cells"], profile)
                # a busy guest's cell calibrates its weight first (cvmig.model.world)
                for mode in sorted(grid.modes, key=lambda m: (wname, m) != BUSY[:2]):
                    for thr in grid.throttles:
                        if thr != "none" and wname == "idle":
                            continue  # nothing to throttle
                        timeout = grid.hw_timeout_s if hw else grid.timeout_s
                        runs = [_run(wl, MODES[mode], thr, profile, mem_mib * MiB, timeout, i)
                                for i in range(grid.reps)]
                        # the workload as measured so far (the cells without a throttle
                        # come first)
                        pool = pools.setdefault((profile, mem_mib, wl), Workload([], []))
                        pool.add(runs, thr)
                        if (wname, mode, thr) == BUSY:
                            reps = [r["report"] for r in runs if r["report"]]
                            if reps:
                                weigh_busy(calibration, profile, reps, echo)
                                continue
                        cell = make_cell(calibration, profile, mem_mib, wname, wl, mode, thr,
                                         timeout, runs, pool, samples)
                        if cell is None:
                            echo(f"  {profile} {mem_mib} MiB {wname} {mode} {thr}: engine failed "
                                 f"({runs[0]['row'].get('error')})")
                            continue
                        rows.append(cell)
                        _echo_cell(echo, cell)
    (out / "model-calibration.json").write_text(json.dumps(calibration, indent=1) + "\n")
    return _result(rows, {"grid": grid.__dict__}, out, "model-validation", t0, load0)


def from_bench(runs_json: Path, out: Path, echo: Callable[[str], None] = print,
               psp: dict[str, Any] | None = None, samples: int = 1) -> dict[str, Any]:
    """The model against a `cvmig bench paper` grid already run (its runs.json): each
    mode's idle runs calibrate it (their medians; the idle cell without a throttle is
    left out of the error), `cvmig bench psp` prices the firmware (``psp``:
    reuse a calibration's), and every other cell is predicted."""
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    try:
        data = json.loads(runs_json.read_text())
        runs, meta = data["runs"], data["meta"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{runs_json} is not a `cvmig bench paper` runs.json: {e}") from None
    groups: dict[tuple[str, int, str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        row = r["row"]
        if row["mode"] not in MODES:
            continue
        key = (row["profile"], row["memory_mib"], row["workload"], row["mode"], row["throttle"])
        groups.setdefault(key, []).append(r)
    psp = dict(psp or {})
    cal: dict[str, Any] = {"cells": {}, "psp": psp, "vcpus": VCPUS, "link_bw": LOOPBACK_BW,
                           "latency": LOOPBACK_LATENCY}
    for profile in sorted({k[0] for k in groups}):
        modes = tuple(sorted({k[3] for k in groups if k[0] == profile}))
        need = psp_modes(modes)
        if not set(need) <= set(psp.get(profile, {})):
            echo(f"pricing the firmware: cvmig bench psp --psp-profile {profile}")
            psp[profile] = psp_costs(profile, need)
        for mode in modes:
            # every idle run of the mode (a throttle has nothing to slow on an idle
            # guest): the one whose bulk took the median time, so one run's pace at one
            # moment of an hour-long grid does not set the mode's
            idle = [r for k, rs in groups.items() if k[0] == profile and k[3] == mode
                    and k[2] == "idle" for r in rs if r["report"]]
            if not idle:
                echo(f"  {profile}/{mode}: no idle run to calibrate on; its cells are left out")
                continue
            cal["cells"][f"{profile}/{mode}"] = calibrate_on(
                [r["report"] for r in idle], MODES[mode], psp[profile])
            echo(_describe(f"{profile}/{mode}", cal["cells"][f"{profile}/{mode}"]))
        settle(cal["cells"], profile)
    cal["guest_weight"] = {}
    for (profile, _, wl, mode, thr), rs in groups.items():
        if (wl.split(":")[0], mode, thr) == BUSY and f"{profile}/{mode}" in cal["cells"] \
                and profile not in cal["guest_weight"]:
            reps = [r["report"] for r in rs if r["report"]]
            if reps:
                weigh_busy(cal, profile, reps, echo)
    timeout = float(meta["grid"]["timeout_s"])
    pools: dict[tuple[str, int, str], Workload] = {}
    for (profile, mem_mib, wl, _, thr), rs in groups.items():
        pools.setdefault((profile, mem_mib, wl), Workload([], [])).add(rs, thr)
    rows: list[dict[str, Any]] = []
    for (profile, mem_mib, wl, mode, thr), rs in groups.items():
        if f"{profile}/{mode}" not in cal["cells"] or (wl == "idle" and thr == "none") \
                or (wl.split(":")[0], mode, thr) == BUSY:
            continue  # uncalibrated, or the calibration itself
        frac = rs[0]["row"].get("dirty_fraction", 0.0)
        wname = f"d{frac:g}" if wl.startswith("dirtier") else wl.split(":")[0]
        cell = make_cell(cal, profile, mem_mib, wname, wl, mode, thr,
                         timeout * (4 if profile != "none" else 1), rs,
                         pools[(profile, mem_mib, wl)], samples)
        if cell is not None:
            rows.append(cell)
            _echo_cell(echo, cell)
    out.mkdir(parents=True, exist_ok=True)
    # this host's latest calibration (what `cvmig model --calibration` and --scale take)
    (out / "model-calibration.json").write_text(json.dumps(cal, indent=1) + "\n")
    return _result(rows, {"bench": str(runs_json), "calibration": cal}, out,
                   "model-validation-bench", t0, load0)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"cells": len(rows)}
    for k in ("err_total", "err_downtime", "err_gap", "spread_total", "spread_downtime",
              "spread_gap"):
        xs = [abs(r[k]) for r in rows]
        if xs:
            out[k] = {"median_abs": round(statistics.median(xs), 4), "max_abs": round(max(xs), 4)}
    for name, _ in METRICS:
        inside = [r[f"within_{name}"] for r in rows if f"within_{name}" in r]
        if inside:  # the model sampled: how often the engine's median fell in its band
            out[f"within_{name}"] = round(sum(inside) / len(inside), 3)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, key, title in ((axes[0], "total_ms", "migration time (ms)"),
                           (axes[1], "downtime_ms", "downtime (ms)")):
        for profile, marker in (("none", "o"), ("sev-2020", "s")):
            pts = [(r["engine"][key], r["model"][key]) for r in rows if r["profile"] == profile]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, marker=marker, label=profile, alpha=0.75)
        lo = min([min(r["engine"][key], r["model"][key]) for r in rows] or [1])
        hi = max([max(r["engine"][key], r["model"][key]) for r in rows] or [10])
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.plot([lo, hi], [lo * 1.1, hi * 1.1], "k:", lw=0.6)
        ax.plot([lo, hi], [lo * 0.9, hi * 0.9], "k:", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"engine, measured: {title}")
        ax.set_ylabel(f"model, predicted: {title}")
        ax.legend()
    fig.suptitle("cvmig model vs engine (dotted: ±10 %)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- predictions at scale --------------------------------------------------------------------

SCALE_GIB = (1, 4, 16, 64)
SCALE_RATE = 350.0  # pages/s: AMD's observation for 4-8 GiB guests (sev-protocol.md §3.1)


def scale(cal: dict[str, Any] | None, echo: Callable[[str], None] = print,
          link_gbit: float = 10.0) -> list[dict[str, Any]]:
    """1-64 GiB guests dirtying SCALE_RATE pages/s at random over a quarter of their
    memory (at most 1 GiB), under sev-2020 and under the helper profile (this host's
    calibrated software path, `cvmig.model.costs.HELPER`), each mode and throttle."""
    from cvmig.model.cli import predict
    from cvmig.model.costs import HELPER, costs_from_profile

    rows: list[dict[str, Any]] = []
    for gib in SCALE_GIB:
        npages = gib << 30 >> 12
        guest = GuestModel(npages=npages, dirty_rate=SCALE_RATE,
                           working_set=min(npages // 4, 1 << 18), vcpus=VCPUS)
        for profile, modes in (("sev-2020", ("page", "contig", "sg")), (HELPER, ("page", "sg"))):
            if profile == HELPER and cal is None:
                continue
            for mode in modes:
                if profile == HELPER:
                    costs = costs_from_calibration(cal or {}, "none", mode, guest.vcpus)
                    # a helper's host: cores of its own, no small-host sharing
                    costs = replace(costs, link_bw=link_gbit * 1e9 / 8, cores=0.0,
                                    start_cpu=0.0, rx_lag=0.0)
                else:
                    costs = costs_from_profile(profile, link_gbit, guest.vcpus)
                for thr in ("none", "precopy"):
                    params = MigrationParams(batching=Batching(mode),
                                             throttle=ThrottleKind(thr), timeout_s=86400.0)
                    r = predict(guest, costs, params)
                    rows.append({"gib": gib, "profile": profile, "mode": mode, "throttle": thr,
                                 **r})
                    echo(f"  {gib:3} GiB {profile:9} {mode:6} {thr:8} "
                         + (f"total {r['total_s']:9.1f} s  downtime {r['downtime_ms']:7.1f} ms"
                            if r["status"] == "completed" else "does not converge in a day"))
    return rows
