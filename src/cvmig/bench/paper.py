"""`cvmig bench paper`: the IPSJ report's evaluation, rerun on this machine.

A grid of batching mode x throttle policy x workload, each cell a real live migration
(PSP processes, guest processes, TCP), repeated; the `page` mode with no throttle is the
baseline every ratio is measured against, in the same run. The dirtier runs at dirty
rates relative to the transfer rate the baseline achieves here, measured first.
Writes runs.json (every report), runs.csv (one row per run), summary.csv (medians and
ratios) and PNG plots.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from cvmig.bench.claims import Key, by_config, check, echo_claims
from cvmig.bench.machine import machine_info, machine_line
from cvmig.migration.driver import MigrationParams, Switchover, TimeoutAction
from cvmig.migration.report import downtime_ms
from cvmig.migration.throttle import ThrottleKind, ThrottleParams
from cvmig.psp.api import PAGE_SIZE, Batching

MiB = 1 << 20


@dataclass(frozen=True)
class Mode:
    """A batching configuration under test."""

    name: str
    batching: Batching
    cap: int = 0
    queue: bool = False
    switchover: Switchover = Switchover.FIRMWARE

    def params(self, base: MigrationParams) -> MigrationParams:
        return replace(base, batching=self.batching, batch_cap=self.cap, queue=self.queue,
                       switchover=self.switchover)


MODES = {
    "page": Mode("page", Batching.PAGE),
    "contig": Mode("contig", Batching.CONTIG),  # 16 KiB: what the SEV spec allows
    "contig64": Mode("contig64", Batching.CONTIG, cap=64),  # extension: 256 KiB commands
    "sg": Mode("sg", Batching.SG),
    # contig with QEMU's switch-over rule (remaining bytes / bandwidth) instead of the
    # default, which counts the measured stop costs and prices the dirty set's commands
    "contig-qemu": Mode("contig-qemu", Batching.CONTIG, switchover=Switchover.QEMU),
    "queue": Mode("queue", Batching.PAGE, queue=True),  # one-page commands, one doorbell
}
THROTTLES = [k.value for k in ThrottleKind]


@dataclass(frozen=True)
class Grid:
    modes: tuple[str, ...]
    throttles: tuple[str, ...]
    dirty_fractions: tuple[float, ...]  # dirtier rates as fractions of the baseline rate
    idle: bool
    sqlite: bool
    reps: int
    memory: int
    profiles: tuple[str, ...]
    hw_memory: int  # guest size for hardware-profile runs (they are slow by design)
    hw_modes: tuple[str, ...]
    timeout_s: float


QUICK = Grid(modes=("page", "contig", "contig-qemu", "sg"), throttles=("none", "auto-converge", "precopy"),
             dirty_fractions=(1.0, 2.0), idle=True, sqlite=True, reps=1, memory=64 * MiB,
             profiles=("none", "sev-2020"), hw_memory=16 * MiB,
             hw_modes=("page", "contig", "sg"), timeout_s=15.0)
FULL = Grid(modes=tuple(MODES), throttles=tuple(THROTTLES), dirty_fractions=(0.5, 1.0, 2.0),
            idle=True, sqlite=True, reps=3, memory=128 * MiB, profiles=("none", "sev-2020"),
            hw_memory=16 * MiB, hw_modes=("page", "contig", "contig64", "sg"), timeout_s=40.0)


def _run(workload: str, mode: Mode, throttle: str, profile: str, memory: int,
         timeout_s: float, rep: int) -> dict[str, Any]:
    from cvmig.guest.vm import GuestConfig
    from cvmig.guest.workloads import parse_workload
    from cvmig.migration.session import MigrateOptions, migrate_local_or_remote
    from cvmig.migration.source import MigrationFailed

    base = MigrationParams(throttle=ThrottleKind(throttle), throttle_params=ThrottleParams(),
                           timeout_s=timeout_s, timeout_action=TimeoutAction.FORCE)
    opts = MigrateOptions(
        guest=GuestConfig(memory=memory, vcpus=2, workload=parse_workload(workload)),
        params=mode.params(base), psp_profile=profile, warmup_s=0.5)
    row: dict[str, Any] = {"workload": workload, "mode": mode.name, "throttle": throttle,
                           "profile": profile, "memory_mib": memory // MiB, "rep": rep}
    try:
        rep_ = migrate_local_or_remote(opts)
    except MigrationFailed as e:
        row.update(status="failed", error=str(e))
        return {"row": row, "report": None}
    g = rep_["guest"]
    row.update(
        status=rep_["status"],
        switchover=rep_["x-switchover"],
        total_ms=rep_["total-time"],
        downtime_ms=downtime_ms(rep_),
        rounds=rep_["ram"]["dirty-sync-count"],
        transferred_mib=round(rep_["ram"]["transferred"] / MiB, 2),
        mbps=rep_["ram"]["mbps"],
        psp_commands=rep_["psp"]["commands"],
        psp_ms=rep_["psp"]["time-ms"],
        psp_us_per_page=rep_["psp"]["us-per-page"],
        pages_per_command=round(sum(r["pages"] for r in rep_["rounds"]) /
                                max(1, rep_["psp"]["commands"]), 2),
        final_throttle=rep_.get("cpu-throttle-percentage", 0),
        ops_before=g["ops-per-s-before"], ops_during=g["ops-per-s-during"],
        ops_after=g["ops-per-s-after"], gap_ms=g["observed-gap-ms"],
        guest_cpu_before=g.get("cpu-cores-before"), guest_cpu_during=g.get("cpu-cores-during"),
        verified=rep_["verify"]["memory"] == "match" and
        bool(rep_["verify"]["workload"].get("ok")),
    )
    return {"row": row, "report": rep_}


BASELINE_RUNS = 2  # the faster of these: one slow spell of a shared machine (a grid here
# once measured 4,220 pages/s where a minute later it moved 6,909) sets every dirtier's
# rate for the hour the grid runs


def _baseline_rate(memory: int, profile: str) -> float:
    """Pages/s the baseline (page mode, no throttle) moves here: an idle migration's bulk,
    the faster of ``BASELINE_RUNS``."""
    rates = []
    for _ in range(BASELINE_RUNS):
        r = _run("idle", MODES["page"], "none", profile, memory, 0.0, 0)
        rep = r["report"]
        if rep is None:
            raise click.ClickException(f"calibration migration failed: {r['row'].get('error')}")
        bulk = rep["rounds"][0]
        rates.append(float(bulk["pages"] / bulk["duration"]))
    return max(rates)


def _workloads(grid: Grid, rate: float) -> list[str]:
    out = ["idle"] if grid.idle else []
    out += [f"dirtier:rate={max(1, round(f * rate))},pattern=uniform"
            for f in grid.dirty_fractions]
    if grid.sqlite:
        out.append("sqlite:accounts=200")
    return out


def _write_runs(out: Path, grid: object, results: list[dict[str, Any]], **meta: Any) -> None:
    """runs.json (every report; ``meta`` beside the machine and ``grid``, a dataclass) and
    runs.csv (a row a run). Rewritten after each run: runs.json is replaced whole, so an
    interrupt mid-write leaves the last one (`cvmig model --validate` keeps its runs so too)."""
    doc = {"meta": {"machine": machine_info(), "grid": {**vars(grid)}, **meta}, "runs": results}
    tmp = out / "runs.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out / "runs.json")
    _write_csv(out / "runs.csv", (r["row"] for r in results))


def run_grid(grid: Grid, out: Path, echo: Any = click.echo,
             quick: bool = False) -> list[dict[str, Any]]:
    """Every cell of ``grid``; runs.json and runs.csv are rewritten after each run, so an
    hour-long grid that is interrupted keeps what it measured."""
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    for profile in grid.profiles:
        hw = profile != "none"
        memory = grid.hw_memory if hw else grid.memory
        modes = grid.hw_modes if hw else grid.modes
        throttles = ("none",) if hw else grid.throttles
        t_cal = time.monotonic()
        rate = _baseline_rate(memory, profile)
        echo(f"[{profile}] baseline transfer rate here: {rate:,.0f} pages/s "
             f"({rate * PAGE_SIZE / MiB:.1f} MiB/s) for a {memory // MiB} MiB guest")
        nruns = len(modes) * len(throttles) * grid.reps * (
            int(grid.idle) + (1 if hw else len(grid.dirty_fractions)) + int(grid.sqlite and not hw))
        # an idle guest's page-mode migration took `each`; the grid's runs take that or more
        each = (time.monotonic() - t_cal) / BASELINE_RUNS
        echo(f"[{profile}] {nruns} runs, at least {nruns * each / 60:.0f} "
             "minutes at this machine's pace")
        fractions = grid.dirty_fractions if not hw else (0.5,)
        g = replace(grid, dirty_fractions=fractions, sqlite=grid.sqlite and not hw)
        for workload in _workloads(g, rate):
            for mode in modes:
                for throttle in throttles:
                    for rep in range(grid.reps):  # a hardware profile too: one run has no spread
                        r = _run(workload, MODES[mode], throttle, profile, memory,
                                 grid.timeout_s * (4 if hw else 1), rep)
                        r["row"]["dirty_fraction"] = _fraction(workload, rate)
                        r["row"]["baseline_pages_per_s"] = round(rate, 1)
                        results.append(r)
                        _write_runs(out, grid, results, quick=quick)
                        row = r["row"]
                        echo(f"  {profile:8} {workload:38} {mode:8} {throttle:13} "
                             f"total {row.get('total_ms', '-'):>6} ms  downtime "
                             f"{row.get('downtime_ms', '-'):>5} ms  {row.get('switchover', row['status'])}")
    echo(f"grid done in {time.monotonic() - started:.0f} s")
    return results


def _fraction(workload: str, rate: float) -> float:
    from cvmig.guest.workloads import parse_workload

    spec = parse_workload(workload)
    return round(float(spec.get("rate")) / rate, 2) if spec.kind == "dirtier" else 0.0


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per configuration, and ratios to page/none of the same workload+profile."""
    med: dict[Key, dict[str, Any]] = {}
    for key, rows in by_config(results).items():
        med[key] = {
            "profile": key[0], "workload": key[1], "mode": key[2], "throttle": key[3],
            "runs": len(rows),
            "total_ms": statistics.median(x["total_ms"] for x in rows),
            "downtime_ms": statistics.median(x["downtime_ms"] for x in rows),
            "psp_us_per_page": statistics.median(x["psp_us_per_page"] for x in rows),
            "ops_during": statistics.median(x["ops_during"] for x in rows),
            "ops_before": statistics.median(x["ops_before"] for x in rows),
            "converged": sum(x["switchover"] == "converged" for x in rows),
            "dirty_fraction": rows[0]["dirty_fraction"],
        }
    for key, m in med.items():
        base = med.get((key[0], key[1], "page", "none"))
        if base:
            m["time_vs_page"] = round(m["total_ms"] / max(base["total_ms"], 1e-9), 3)
            m["downtime_vs_page"] = round(m["downtime_ms"] / max(base["downtime_ms"], 1e-9), 3)
        m["guest_kept"] = round(m["ops_during"] / m["ops_before"], 3) if m["ops_before"] else None
    return list(med.values())


def _write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


@click.command()
@click.option("--quick", is_flag=True, help="The small grid (about 5 minutes here).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("docs/results"), show_default=True)
@click.option("--reps", type=click.IntRange(1, 20), default=None,
              help="Repetitions per cell (default: 1 quick, 3 full).")
@click.option("--profiles", default=None,
              help="Comma list of PSP cost profiles (default: none,sev-2020).")
@click.option("--modes", default=None,
              help=f"Comma list of batching modes, a part of the grid ({', '.join(MODES)}).")
@click.option("--throttles", default=None,
              help=f"Comma list of throttle policies ({', '.join(THROTTLES)}).")
@click.option("--workloads", default=None,
              help="Comma list of workloads: idle, sqlite, and dirtiers as dF, F times the "
                   "baseline's rate (d0.5,d1,d2).")
@click.option("--from-runs", "from_runs", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Migrate nothing: summarize, plot and check the claims of "
                                 "a grid already run (its runs.json) into --out.")
def paper(quick: bool, out: Path, reps: int | None, profiles: str | None,
          modes: str | None, throttles: str | None, workloads: str | None,
          from_runs: Path | None) -> None:
    """Batching x throttling x workload, measured side by side against the page baseline."""
    from cvmig.psp.cost import parse

    if from_runs is not None:
        try:
            results = json.loads(from_runs.read_text())["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise click.BadParameter(f"not a `cvmig bench paper` runs.json: {e}",
                                     param_hint="--from-runs") from None
        out.mkdir(parents=True, exist_ok=True)
        _conclude(results, out)
        return

    grid = QUICK if quick else FULL
    if reps:
        grid = replace(grid, reps=reps)
    if profiles:
        names = tuple(p.strip() for p in profiles.split(",") if p.strip())
        for n in names:
            try:
                parse(n)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--profiles") from None
        grid = replace(grid, profiles=names)
    grid = _part(grid, modes, throttles, workloads)
    out.mkdir(parents=True, exist_ok=True)
    click.echo(machine_line())
    results = run_grid(grid, out, quick=quick)
    _conclude(results, out)
    click.echo(f"wrote {out / 'runs.json'}, {out / 'runs.csv'}")


def _names(text: str, allowed: Iterable[str], option: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise click.BadParameter(f"{', '.join(bad) or 'nothing given'}: choose from "
                                 f"{', '.join(allowed)}", param_hint=option)
    return names


def _part(grid: Grid, modes: str | None, throttles: str | None,
          workloads: str | None) -> Grid:
    """The part of ``grid`` the options name (each option, when given, replaces its axis)."""
    if modes:
        names = _names(modes, MODES, "--modes")
        grid = replace(grid, modes=names,
                       hw_modes=tuple(m for m in grid.hw_modes if m in names) or names)
    if throttles:
        grid = replace(grid, throttles=_names(throttles, THROTTLES, "--throttles"))
    if workloads:
        names = _names(workloads, ("idle", "sqlite", "d0.5", "d1", "d1.5", "d2", "d3"),
                       "--workloads")
        grid = replace(grid, idle="idle" in names, sqlite="sqlite" in names,
                       dirty_fractions=tuple(float(n[1:]) for n in names if n.startswith("d")))
    return grid


def _conclude(results: list[dict[str, Any]], out: Path) -> None:
    """summary.csv, the plots, and the report's claims checked (claims.json)."""
    from cvmig.bench.plots import plot_all

    summary = summarize(results)
    _write_csv(out / "summary.csv", summary)
    for p in plot_all(results, summary, out):
        click.echo(f"wrote {p}")
    claims = check(results, {m.name for m in MODES.values() if m.switchover is Switchover.QEMU})
    (out / "claims.json").write_text(json.dumps(claims, indent=1) + "\n")
    echo_claims(claims, click.echo)
    click.echo(f"wrote {out / 'summary.csv'}, {out / 'claims.json'}")
