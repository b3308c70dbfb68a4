"""`cvmig model --validate`: real migrations next to the model, on the same inputs.

First the host is calibrated (`cvmig.model.calibrate`), per cost profile and batching
mode; those calibration runs are not part of the grid. Then each cell of the grid is migrated
for real (`cvmig.bench.paper`'s runner: PSP processes, guest processes, TCP) and
predicted by the model, with the same guest size, workload, batching, throttle, limit and
timeout; the error is (model - engine) / engine.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cvmig.bench.paper import MODES
from cvmig.migration.driver import Driver, MigrationParams, TimeoutAction
from cvmig.migration.throttle import ThrottleKind
from cvmig.model.calibrate import (
    BUSY,
    VCPUS,
    MiB,
    calibrate_mode,
    calibrate_on,
    describe,
    psp_costs,
    psp_modes,
    settle,
    weigh_busy,
)
from cvmig.model.costs import (
    LOOPBACK_BW,
    LOOPBACK_LATENCY,
    costs_from_calibration,
)
from cvmig.model.workload import guest_from_reports, stop_samples, workload_stop
from cvmig.model.world import Costs, GuestModel, SimWorld
from cvmig.psp.api import Batching


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
    calibration: dict[str, Any] = {
        "cells": {}, "psp": {p: psp_costs(p, psp_modes(grid.modes)) for p in grid.profiles},
        "vcpus": VCPUS, "link_bw": LOOPBACK_BW, "latency": LOOPBACK_LATENCY}
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []  # every run of the grid, as `cvmig bench paper` keeps them
    pools: dict[tuple[str, int, str], Workload] = {}
    for profile in grid.profiles:
        hw = profile != "none"
        rate = 0.0  # the dirtiers' rates: from the profile's first calibration of page
        for mem_mib in grid.hw_memories if hw else grid.memories:
            for wname in grid.hw_workloads if hw else grid.workloads:
                # this shared machine's pace drifts by minutes: the engine's own costs
                # are measured again (idle runs, not cells) before each block
                for mode in grid.modes:
                    key = f"{profile}/{mode}"
                    calibration["cells"][key] = calibrate_mode(
                        profile, mode, mem_mib * MiB, calibration["psp"][profile], grid.reps)
                    echo(describe(key, calibration["cells"][key]))
                settle(calibration["cells"], profile)
                # (kept as it goes: an interrupted run leaves this host's calibration)
                (out / "model-calibration.json").write_text(
                    json.dumps(calibration, indent=1) + "\n")
                rate = rate or calibration["cells"][f"{profile}/page"]["bulk_pages_per_s"]
                wl = _workload(wname, rate)
                # a busy guest's cell calibrates its weight first (cvmig.model.world)
                for mode in sorted(grid.modes, key=lambda m: (wname, m) != BUSY[:2]):
                    for thr in grid.throttles:
                        if thr != "none" and wname == "idle":
                            continue  # nothing to throttle
                        timeout = grid.hw_timeout_s if hw else grid.timeout_s
                        runs = [_run(wl, MODES[mode], thr, profile, mem_mib * MiB, timeout, i)
                                for i in range(grid.reps)]
                        for r in runs:
                            r["row"]["dirty_fraction"] = _fraction(wname)
                        kept += runs
                        _keep_runs(out, grid, kept)
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


def _fraction(wname: str) -> float:
    return float(wname[1:]) if wname.startswith("d") else 0.0


def _keep_runs(out: Path, grid: Grid, runs: list[dict[str, Any]]) -> None:
    """The grid's runs as `cvmig bench paper` keeps its own (runs.json, runs.csv),
    rewritten after each cell: the model can be held to them again (``--from-bench``)
    without migrating."""
    from cvmig.bench.paper import _write_runs

    _write_runs(out, grid, runs, source="model --validate")


def _timeout(meta: dict[str, Any], profile: str) -> float:
    """A cell's migration timeout as its grid ran it: `model --validate` keeps the hardware
    profile's own; `bench paper` gives it four times the emulator's."""
    g = meta["grid"]
    if profile == "none":
        return float(g["timeout_s"])
    return float(g.get("hw_timeout_s") or 4 * float(g["timeout_s"]))


Group = tuple[str, int, str, str, str]  # profile, MiB, workload spec, mode, throttle


def _load_grid(runs_json: Path) -> tuple[dict[Group, list[dict[str, Any]]], dict[str, Any]]:
    """A `cvmig bench paper` grid's runs by cell (the modes the model knows), and its meta."""
    try:
        data = json.loads(runs_json.read_text())
        runs, meta = data["runs"], data["meta"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{runs_json} is not a `cvmig bench paper` runs.json: {e}") from None
    groups: dict[Group, list[dict[str, Any]]] = {}
    for r in runs:
        row = r["row"]
        if row["mode"] not in MODES:
            continue
        key = (row["profile"], row["memory_mib"], row["workload"], row["mode"], row["throttle"])
        groups.setdefault(key, []).append(r)
    return groups, meta


def _wname(key: Group, runs: list[dict[str, Any]]) -> str:
    """A cell's workload as the grids name it alike (a dirtier's rate is a share of the
    grid's own baseline, which moves with the machine's pace)."""
    wl = key[2]
    frac = runs[0]["row"].get("dirty_fraction", 0.0)
    return f"d{frac:g}" if wl.startswith("dirtier") else wl.split(":")[0]


def _calibrate_grid(groups: dict[Group, list[dict[str, Any]]], psp: dict[str, Any],
                    echo: Callable[[str], None]) -> dict[str, Any]:
    """Each mode calibrated on its idle runs in a grid; a busy guest's weight on its cell."""
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
            echo(describe(f"{profile}/{mode}", cal["cells"][f"{profile}/{mode}"]))
        settle(cal["cells"], profile)
    cal["guest_weight"] = {}
    for (profile, _, wl, mode, thr), rs in groups.items():
        if (wl.split(":")[0], mode, thr) == BUSY and f"{profile}/{mode}" in cal["cells"] \
                and profile not in cal["guest_weight"]:
            reps = [r["report"] for r in rs if r["report"]]
            if reps:
                weigh_busy(cal, profile, reps, echo)
    return cal


def _calibrate_sizes(groups: dict[Group, list[dict[str, Any]]], psp: dict[str, Any],
                     echo: Callable[[str], None]) -> dict[int, dict[str, Any]]:
    """A calibration per guest size in the grid (`_calibrate_grid` on that size's runs),
    the firmware priced once for every size's modes."""
    for profile in sorted({k[0] for k in groups}):
        need = psp_modes(tuple(sorted({k[3] for k in groups if k[0] == profile})))
        if not set(need) <= set(psp.get(profile, {})):
            echo(f"pricing the firmware: cvmig bench psp --psp-profile {profile}")
            psp[profile] = {**psp.get(profile, {}), **psp_costs(profile, need)}
    sizes = sorted({k[1] for k in groups})
    out = {}
    for mem in sizes:
        if len(sizes) > 1:
            echo(f"calibrating on the {mem} MiB guests")
        out[mem] = _calibrate_grid({k: v for k, v in groups.items() if k[1] == mem}, psp, echo)
    return out


def _host_calibration(cals: dict[int, dict[str, Any]], psp: dict[str, Any]) -> dict[str, Any]:
    """This host's calibration from a grid's sizes (what `cvmig model --calibration` and
    --scale take): each profile and mode's cell, and each profile's busy-guest weight, from
    the largest guest that calibrated it (a hardware profile runs small guests only)."""
    host: dict[str, Any] = {"cells": {}, "psp": psp, "vcpus": VCPUS, "link_bw": LOOPBACK_BW,
                            "latency": LOOPBACK_LATENCY, "guest_weight": {}}
    for mem in sorted(cals, reverse=True):
        for key, cell in cals[mem]["cells"].items():
            host["cells"].setdefault(key, cell)
        for profile, w in cals[mem].get("guest_weight", {}).items():
            host["guest_weight"].setdefault(profile, w)
    return host


def _nearest(cals: dict[int, dict[str, Any]], mem: int) -> int | None:
    """The calibrated guest size nearest ``mem`` (a held-out grid may have others)."""
    return min(cals, key=lambda m: (abs(m - mem), m)) if cals else None


def _medians(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    rows = [r["row"] for r in runs if r["report"] is not None]
    if not rows:
        return None
    return {key: float(statistics.median(float(r[key]) for r in rows)) for _, key in METRICS}


def from_bench(runs_json: Path, out: Path, echo: Callable[[str], None] = print,
               psp: dict[str, Any] | None = None, samples: int = 1,
               calibrate_on: Path | None = None) -> dict[str, Any]:
    """The model against a `cvmig bench paper` grid already run (its runs.json): each
    mode's idle runs at each guest size calibrate it there (their medians; the idle cell
    without a throttle is left out of the error), `cvmig bench psp` prices the firmware
    (``psp``: reuse a calibration's), and every other cell is predicted.

    ``calibrate_on``: another grid of the same bench, whose idle runs calibrate the model
    instead (this grid's every cell is then held out, its idle ones too); each cell also
    gets that grid's own median beside it (``twin``): how well one run of the grid predicts
    another, the floor under any model's error."""
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    groups, meta = _load_grid(runs_json)
    psp = dict(psp or {})
    twins: dict[tuple[str, int, str, str, str], dict[str, float]] = {}
    # each guest size calibrated on its own idle runs, as `model --validate` calibrates
    # each block before it: a small guest's migration is mostly its ends (the drain of
    # the frames in flight, the stop), which a large one's calibration prices wrong
    if calibrate_on is None:
        cals = _calibrate_sizes(groups, psp, echo)
    else:
        other, _ = _load_grid(calibrate_on)
        cals = _calibrate_sizes(other, psp, echo)
        for key, rs in other.items():
            med = _medians(rs)
            if med is not None:
                twins[(key[0], key[1], _wname(key, rs), key[3], key[4])] = med
    pools: dict[tuple[str, int, str], Workload] = {}
    for (profile, mem_mib, wl, _, thr), rs in groups.items():
        pools.setdefault((profile, mem_mib, wl), Workload([], [])).add(rs, thr)
    rows: list[dict[str, Any]] = []
    unmatched: set[int] = set()
    for key, rs in groups.items():
        profile, mem_mib, wl, mode, thr = key
        near = _nearest(cals, mem_mib)
        cal = cals[near] if near is not None else None
        if cal is None or f"{profile}/{mode}" not in cal["cells"]:
            continue  # uncalibrated
        if near != mem_mib and mem_mib not in unmatched:
            unmatched.add(mem_mib)
            echo(f"  {mem_mib} MiB: no idle runs of that size to calibrate on; "
                 f"calibrated at {near} MiB")
        if calibrate_on is None and ((wl == "idle" and thr == "none")
                                     or (wl.split(":")[0], mode, thr) == BUSY):
            continue  # the calibration itself
        wname = _wname(key, rs)
        cell = make_cell(cal, profile, mem_mib, wname, wl, mode, thr,
                         _timeout(meta, profile), rs,
                         pools[(profile, mem_mib, wl)], samples)
        if cell is None:
            continue
        twin = twins.get((profile, mem_mib, wname, mode, thr))
        if twin is not None:
            cell["twin"] = twin
            for name, k in METRICS:
                cell[f"err_twin_{name}"] = _err(twin[k], cell["engine"][k])
        rows.append(cell)
        _echo_cell(echo, cell)
    out.mkdir(parents=True, exist_ok=True)
    host = _host_calibration(cals, psp)
    extra: dict[str, Any] = {"bench": str(runs_json), "calibration": host}
    if len(cals) > 1:
        extra["calibration_by_mib"] = {str(k): v for k, v in cals.items()}
    if calibrate_on is None:
        # this host's latest calibration (what `cvmig model --calibration` and --scale take)
        (out / "model-calibration.json").write_text(json.dumps(host, indent=1) + "\n")
        return _result(rows, extra, out, "model-validation-bench", t0, load0)
    extra["calibrated_on"] = str(calibrate_on)
    return _result(rows, extra, out, "model-validation-heldout", t0, load0)


def _abs_stats(xs: list[float]) -> dict[str, float]:
    """Median and max of relative errors' magnitudes."""
    mags = [abs(x) for x in xs]
    return {"median_abs": round(statistics.median(mags), 4), "max_abs": round(max(mags), 4)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"cells": len(rows)}
    for k in ("err_total", "err_downtime", "err_gap", "spread_total", "spread_downtime",
              "spread_gap", "err_twin_total", "err_twin_downtime", "err_twin_gap"):
        xs = [r[k] for r in rows if k in r]
        if xs:
            out[k] = _abs_stats(xs)
    twinned = [r for r in rows if "twin" in r]
    if twinned:  # the model on the cells the other grid has too, beside the other grid
        out["twinned"] = {"cells": len(twinned), **{
            f"err_{name}": _abs_stats([r[f"err_{name}"] for r in twinned])
            for name, _ in METRICS}}
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
