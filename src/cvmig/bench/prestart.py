"""`cvmig bench prestart`: what starting the destination's vCPU processes ahead saves.

A destination started with its vCPU processes up (`cvmig vm --incoming`'s default, as
QEMU's destination has its vCPU threads before `migrate`) against one that starts them when
the migration arrives (`--no-prestart`), the same local migration otherwise: alternating
rep by rep within each batching mode (so that load that comes and goes on a shared machine
falls on both alike), medians compared as ratios.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cvmig.bench.machine import SideBySideLog
from cvmig.bench.tls import summarize

KINDS = ("at-start", "prestart")  # the vCPUs start when the migration comes / before


def migration_run(memory: int, workload: str, batching: str, prestart: bool) -> dict[str, Any]:
    """One whole migration to a local destination process; its key figures."""
    from cvmig.guest.vm import GuestConfig
    from cvmig.guest.workloads import parse_workload
    from cvmig.migration.parameters import CLI_DEFAULTS, build
    from cvmig.migration.session import MigrateOptions, migrate_local_or_remote

    params = build({**CLI_DEFAULTS, "x-batching": batching})
    opts = MigrateOptions(guest=GuestConfig(memory=memory, vcpus=2,
                                            workload=parse_workload(workload)),
                          params=params, warmup_s=0.5, prestart=prestart)
    rep = migrate_local_or_remote(opts)
    host = rep.get("x-host-cpu", {})
    return {"total_ms": float(rep.get("total-time", 0)),
            "downtime_ms": float(rep.get("downtime", 0)),
            "start_cpu_s": float(host.get("destination-start-cpu-s") or 0.0),
            "pages": sum(int(r["pages"]) for r in rep.get("rounds", [])),
            "commands": sum(int(r["commands"]) for r in rep.get("rounds", [])),
            "verified": rep.get("verify", {}).get("memory") == "match"}


def _r(x: float | None) -> str:
    return f"{x:6.2f}" if x is not None else "     -"


@click.command("prestart")
@click.option("-m", "--memory", default="128M", show_default=True,
              help="Guest memory for the migration runs.")
@click.option("-w", "--workload", default="idle", show_default=True,
              help="Guest workload (idle: every run moves the same pages).")
@click.option("-b", "--batching", "modes", default="aead,sg,contig,page", show_default=True,
              help="Batching modes, comma-separated; each is measured both ways.")
@click.option("--reps", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Runs of each kind per mode (the kinds alternate); medians are compared.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("docs/results/prestart.json"), show_default=True,
              help="Results; a log (.log) goes beside it.")
def prestart(memory: str, workload: str, modes: str, reps: int, json_path: Path) -> None:
    """What a destination saves by starting its vCPU processes before the migration
    comes: the same migration both ways, side by side in one run (ratios; the machine
    is printed)."""
    from cvmig.guest.workloads import parse_workload
    from cvmig.migration.source import MigrationFailed
    from cvmig.psp.api import Batching
    from cvmig.units import parse_size

    try:
        mem = parse_size(memory)
        parse_workload(workload)
        batchings = [Batching(m.strip()).value for m in modes.split(",")]
    except ValueError as e:
        allowed = ", ".join(b.value for b in Batching)
        raise click.UsageError(f"{e} (batching modes: {allowed})") from None
    say = SideBySideLog("times")
    results: dict[str, Any] = {}
    for mode in batchings:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        for i in range(reps):
            for kind in KINDS:
                try:
                    r = migration_run(mem, workload, mode, kind == "prestart")
                except MigrationFailed as e:
                    raise click.ClickException(f"{mode} {kind} migration failed: {e}") from None
                runs[kind].append(r)
                say(f"{mode:6} {kind:8} rep {i + 1}: total {r['total_ms']:7.0f} ms, "
                    f"downtime {r['downtime_ms']:5.0f} ms, destination start "
                    f"{r['start_cpu_s']:5.2f} CPU-s, verified {r['verified']}")
        s = summarize(runs["at-start"], runs["prestart"],
                      ("total_ms", "downtime_ms", "start_cpu_s"), names=KINDS)
        results[mode] = {"summary": s, "runs": runs}
    say("")
    say(f"median of {reps}     total ms: at-start prestart  ratio paired    "
        "downtime ms: at-start prestart  ratio    start CPU-s: at-start prestart")
    for mode, r in results.items():
        t, d, c = (r["summary"][k] for k in ("total_ms", "downtime_ms", "start_cpu_s"))
        say(f"{mode:6}               {t['at-start']:8.0f} {t['prestart']:8.0f} {_r(t['ratio'])} "
            f"{_r(t['paired_ratio'])}                {d['at-start']:8.0f} {d['prestart']:8.0f} "
            f"{_r(d['ratio'])}                  {c['at-start']:8.2f} {c['prestart']:8.2f}")
    say("ratio: prestart / at-start; paired: the median of each rep's ratio")
    say.write(json_path, {"memory": mem, "workload": workload, "reps": reps,
              "modes": results})
