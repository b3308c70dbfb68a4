"""`cvmig model`: the same pre-copy driver on a simulated clock, for sizes and hardware this
machine does not have. Costs come from a PSP cost profile (the calibrated `sev-2020`, or
your own `fixed_us:doorbell_us:mb_per_s`, measured with `cvmig bench psp`), or from this
host's calibration (``--calibration``, written by ``--validate``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from cvmig.migration.cli import SIZE
from cvmig.migration.driver import (
    CHUNK_TARGET_S,
    Driver,
    MigrationCancelled,
    MigrationParams,
    Switchover,
    TimeoutAction,
)
from cvmig.migration.throttle import ThrottleKind
from cvmig.model.costs import costs_from_calibration, costs_from_profile, load_calibration
from cvmig.model.world import Costs, GuestModel, SimWorld
from cvmig.psp.api import PAGE_SIZE, Batching

__all__ = ["costs_from_profile", "model", "predict"]


def predict(guest: GuestModel, costs: Costs, params: MigrationParams,
            chunk_target_s: float = 1.0) -> dict[str, Any]:
    """One migration, simulated. ``chunk_target_s``: seconds per send in the bulk round
    (the engine's is CHUNK_TARGET_S; longer is faster to simulate, and near the stop the
    driver sizes sends to the downtime-limit either way)."""
    world = SimWorld(guest, costs)
    driver = Driver(world, params, chunk_target_s=chunk_target_s)
    try:
        p = driver.run()
    except MigrationCancelled as e:
        return {"status": "cancelled", "error": str(e), "rounds": len(driver.progress.rounds),
                "elapsed_s": round(world.clock, 3)}
    gap = world.guest_gap(p)
    return {
        "status": p.status,
        "switchover": p.switchover,
        "total_s": round(p.total_time, 3),
        "downtime_ms": round(p.downtime * 1000, 1),
        "gap_ms": round(gap * 1000, 1),
        "expected_downtime_ms": round(p.expected_downtime_ms, 1),
        "rounds": len(p.rounds),
        "transferred_gib": round(p.transferred / 2**30, 3),
        "psp_commands": p.psp_commands,
        "stop_cap": p.stop_cap,
        "final_throttle": p.throttle_pct,
    }


MODE_NAMES = ("page", "contig", "sg", "aead", "queue")


def _runs_json(option: str, path: Path) -> Path:
    runs = path / "runs.json" if path.is_dir() else path
    if not runs.is_file():
        raise click.UsageError(f"{option}: no runs.json at {runs} (give the folder "
                               "`cvmig bench paper --out` wrote, or its runs.json)")
    return runs


def _pair(stat: dict[str, float]) -> str:
    return f"{stat['median_abs']:.1%} / {stat['max_abs']:.1%}"


def _validate(quick: bool, reps: int | None, from_bench: Path | None,
              calibration: Path | None, out: Path, samples: int = 1,
              calibrate_on: Path | None = None) -> None:
    from cvmig.model import validate as V

    if calibrate_on is not None and from_bench is None:
        raise click.UsageError("--calibrate-on goes with --from-bench (the grid it predicts)")
    if from_bench is not None:
        runs = _runs_json("--from-bench", from_bench)
        other = _runs_json("--calibrate-on", calibrate_on) if calibrate_on else None
        if reps or quick:
            raise click.UsageError("--from-bench takes the grid and its repetitions from the "
                                   "bench: --quick and --reps do not apply")
        try:
            psp = load_calibration(calibration).get("psp") if calibration else None
            res = V.from_bench(runs, out, click.echo, psp, samples, other)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        name = "model-validation-bench" if other is None else "model-validation-heldout"
    else:
        grid = V.QUICK if quick else V.FULL
        res = V.run(replace(grid, reps=reps) if reps else grid, out, click.echo, samples)
        name = "model-validation"
    s = res["summary"]
    if not s["cells"]:
        raise click.ClickException("no cell could be compared (every engine run failed?)")
    click.echo(f"{s['cells']} cells; |error| median / max: total time "
               f"{_pair(s['err_total'])}, downtime {_pair(s['err_downtime'])}")
    click.echo(f"the engine's own spread (half the range of a cell's runs), median / max: "
               f"total time {_pair(s['spread_total'])}, downtime {_pair(s['spread_downtime'])}")
    if "twinned" in s:
        t = s["twinned"]
        click.echo(f"the other grid's medians against this one's ({t['cells']} cells), "
                   f"median / max: total time {_pair(s['err_twin_total'])}, downtime "
                   f"{_pair(s['err_twin_downtime'])}; the model on those cells: "
                   f"{_pair(t['err_total'])}, {_pair(t['err_downtime'])}")
    if "within_downtime" in s:
        click.echo(f"the engine's median within the model's 10th-90th percentiles "
                   f"({samples} samples): total time in {s['within_total']:.0%} of the cells, "
                   f"downtime in {s['within_downtime']:.0%}")
    kept = "" if calibrate_on else f", {out / 'model-calibration.json'}"
    click.echo(f"wrote {out / (name + '.json')}, {out / (name + '.png')}{kept}")


@click.command()
@click.option("--memory", "-m", type=SIZE, default="8G", show_default=True)
@click.option("--dirty-rate", type=click.FloatRange(0), default=350.0, show_default=True,
              help="Pages/s the guest writes (AMD saw 300-400+ on 4-8 GiB guests).")
@click.option("--working-set", type=SIZE, default="1G", show_default=True,
              help="Memory the writes fall on, at random.")
@click.option("--pattern", type=click.Choice(["uniform", "contiguous"]), default="uniform",
              show_default=True, help="uniform: dirty pages scattered over the working set; "
                                      "contiguous: one run (contig batching's best case).")
@click.option("--vcpus", type=click.IntRange(1, 512), default=4, show_default=True)
@click.option("--modes", default="page,contig,sg", show_default=True,
              help="Batching modes to compare (page, contig, sg, aead, queue).")
@click.option("--throttle", type=click.Choice([k.value for k in ThrottleKind]),
              default="none", show_default=True)
@click.option("--downtime-limit", type=click.IntRange(0, 2_000_000), default=300,
              show_default=True, help="ms")
@click.option("--switchover", type=click.Choice([s.value for s in Switchover]),
              default=MigrationParams().switchover.value, show_default=True)
@click.option("--psp-profile", default="sev-2020", show_default=True)
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="This host's costs (JSON from --validate) instead of --psp-profile.")
@click.option("--link", "link_gbit", type=click.FloatRange(0.001), default=10.0,
              show_default=True, help="Gbit/s.")
@click.option("--timeout", type=click.FloatRange(1), default=86400.0, show_default=True,
              help="Simulated seconds before giving up (not converged).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--validate", is_flag=True,
              help="Run real migrations next to the model on the same inputs and report the "
                   "error per cell (JSON and a plot in --out).")
@click.option("--quick", is_flag=True, help="With --validate: the small grid (a few minutes).")
@click.option("--reps", type=click.IntRange(1, 20), default=None,
              help="With --validate: real migrations per cell, the model held to their "
                   "median (default: 2 quick, 3 full).")
@click.option("--from-bench", "from_bench", type=click.Path(path_type=Path), default=None,
              help="With --validate: instead of migrating, hold the model to a `cvmig bench "
                   "paper` grid already run (its --out folder or runs.json).")
@click.option("--calibrate-on", "calibrate_on", type=click.Path(path_type=Path), default=None,
              help="With --from-bench: calibrate on another run of the grid (its idle "
                   "runs), hold every cell of --from-bench out, and set that grid's own "
                   "medians beside the model's (how well one grid predicts another).")
@click.option("--samples", type=click.IntRange(1, 200), default=1, show_default=True,
              help="With --validate: migrate each cell's model this many times, at the "
                   "paces and stop costs the engine's runs showed; held by its median, and "
                   "the engine's median checked against its 10th-90th percentiles.")
@click.option("--scale", is_flag=True,
              help="Predict 1-64 GiB guests under sev-2020 and the helper profile (this "
                   "host's calibration, --calibration); JSON in --out.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("docs/results"), show_default=True)
def model(memory: int, dirty_rate: float, working_set: int, pattern: str, vcpus: int,
          modes: str, throttle: str, downtime_limit: int, switchover: str, psp_profile: str,
          calibration: Path | None, link_gbit: float, timeout: float, json_path: Path | None,
          validate: bool, quick: bool, reps: int | None, from_bench: Path | None,
          calibrate_on: Path | None, samples: int, scale: bool, out: Path) -> None:
    """Predict migration time and downtime with the engine's own driver, simulated."""
    if scale:
        from cvmig.model.validate import scale as run_scale

        try:
            cal = load_calibration(calibration) if calibration else None
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        rows = run_scale(cal, click.echo, link_gbit)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model-scale.json").write_text(json.dumps(rows, indent=1) + "\n")
        click.echo(f"wrote {out / 'model-scale.json'}")
        return
    if (reps or from_bench or calibrate_on or samples > 1) and not validate:
        raise click.UsageError("--reps, --from-bench, --calibrate-on and --samples go with "
                               "--validate")
    if validate:
        _validate(quick, reps, from_bench, calibration, out, samples, calibrate_on)
        return
    names = [m.strip() for m in modes.split(",") if m.strip()]
    try:
        for m in names:
            if m not in MODE_NAMES:
                raise ValueError(f"unknown mode {m!r}; allowed: {', '.join(MODE_NAMES)}")
        if working_set > memory:
            raise ValueError("working set is larger than memory")
        cal = load_calibration(calibration) if calibration else None
        base_costs = None if cal else costs_from_profile(psp_profile, link_gbit, vcpus)
        per_mode = {m: base_costs or costs_from_calibration(
            cal or {}, psp_profile, "page" if m == "queue" else m, vcpus) for m in names}
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    guest = GuestModel(npages=memory // PAGE_SIZE, dirty_rate=dirty_rate,
                       working_set=working_set // PAGE_SIZE, vcpus=vcpus,
                       contiguous=pattern == "contiguous")
    base = MigrationParams(downtime_limit_ms=downtime_limit, throttle=ThrottleKind(throttle),
                           switchover=Switchover(switchover), timeout_s=timeout,
                           timeout_action=TimeoutAction.CANCEL)
    src = f"calibration {calibration}" if calibration else f"PSP profile {psp_profile}"
    click.echo(f"model: {memory / 2**30:g} GiB, {dirty_rate:g} pages/s over "
               f"{working_set / 2**30:g} GiB ({pattern}), {src}, link {link_gbit:g} "
               f"Gbit/s, downtime-limit {downtime_limit} ms, throttle {throttle}")
    rows = []
    # small guests: the engine's own send size, so the pipeline's tail is the engine's
    target = CHUNK_TARGET_S if memory <= 1 << 30 else 1.0
    for m in names:
        params = replace(base, batching=Batching.PAGE if m == "queue" else Batching(m),
                         queue=m == "queue")
        r = {"mode": m, **predict(guest, per_mode[m], params, target)}
        rows.append(r)
        if r["status"] == "completed":
            click.echo(f"  {m:7} total {r['total_s']:10.1f} s  downtime {r['downtime_ms']:8.1f} ms"
                       f"  rounds {r['rounds']:4}  {r['switchover']}")
        else:
            click.echo(f"  {m:7} does not converge within {timeout:g} s "
                       f"({r['rounds']} rounds)")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2) + "\n")
