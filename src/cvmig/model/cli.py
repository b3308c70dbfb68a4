"""`cvmig model`: the same pre-copy driver on a simulated clock, for sizes and hardware this
machine does not have. Costs come from a PSP cost profile (the calibrated `sev-2020`, or
your own `fixed_us:doorbell_us:mb_per_s`, measured with `cvmig bench psp`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from cvmig.migration.cli import SIZE
from cvmig.migration.driver import (
    Driver,
    MigrationCancelled,
    MigrationParams,
    Switchover,
    TimeoutAction,
)
from cvmig.migration.throttle import ThrottleKind
from cvmig.model.world import Costs, GuestModel, SimWorld
from cvmig.psp.api import PAGE_SIZE, Batching


def costs_from_profile(spec: str, link_gbit: float) -> Costs:
    from cvmig.psp.cost import parse

    prof = parse(spec)
    if prof.is_free:
        raise ValueError("the model needs a cost profile with costs: sev-2020, or "
                         "fixed_us:doorbell_us:mb_per_s measured with `cvmig bench psp`")
    return Costs(t_doorbell=prof.t_doorbell, t_cmd=prof.t_fixed,
                 psp_bw=prof.bandwidth or float("inf"), link_bw=link_gbit * 1e9 / 8)


def predict(guest: GuestModel, costs: Costs, params: MigrationParams) -> dict[str, Any]:
    world = SimWorld(guest, costs)
    driver = Driver(world, params, chunk_target_s=60.0)  # no real-time checks to keep up
    try:
        p = driver.run()
    except MigrationCancelled as e:
        return {"status": "cancelled", "error": str(e), "rounds": len(driver.progress.rounds),
                "elapsed_s": round(world.clock, 3)}
    return {
        "status": p.status,
        "switchover": p.switchover,
        "total_s": round(p.total_time, 3),
        "downtime_ms": round(p.downtime * 1000, 1),
        "rounds": len(p.rounds),
        "transferred_gib": round(p.transferred / 2**30, 3),
        "psp_commands": p.psp_commands,
        "final_throttle": p.throttle_pct,
    }


@click.command()
@click.option("--memory", "-m", type=SIZE, default="8G", show_default=True)
@click.option("--dirty-rate", type=click.FloatRange(0), default=350.0, show_default=True,
              help="Pages/s the guest writes (AMD saw 300-400+ on 4-8 GiB guests).")
@click.option("--working-set", type=SIZE, default="1G", show_default=True,
              help="Memory the writes fall on, uniformly.")
@click.option("--vcpus", type=click.IntRange(1, 512), default=4, show_default=True)
@click.option("--modes", default="page,contig,sg", show_default=True,
              help="Batching modes to compare (page, contig, sg, aead, queue).")
@click.option("--throttle", type=click.Choice([k.value for k in ThrottleKind]),
              default="none", show_default=True)
@click.option("--downtime-limit", type=click.IntRange(0, 2_000_000), default=300,
              show_default=True, help="ms")
@click.option("--switchover", type=click.Choice([s.value for s in Switchover]),
              default="qemu", show_default=True)
@click.option("--psp-profile", default="sev-2020", show_default=True)
@click.option("--link", "link_gbit", type=click.FloatRange(0.001), default=10.0,
              show_default=True, help="Gbit/s.")
@click.option("--timeout", type=click.FloatRange(1), default=86400.0, show_default=True,
              help="Simulated seconds before giving up (not converged).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def model(memory: int, dirty_rate: float, working_set: int, vcpus: int, modes: str,
          throttle: str, downtime_limit: int, switchover: str, psp_profile: str,
          link_gbit: float, timeout: float, json_path: Path | None) -> None:
    """Predict migration time and downtime with the engine's own driver, simulated."""
    try:
        costs = costs_from_profile(psp_profile, link_gbit)
        names = [m.strip() for m in modes.split(",") if m.strip()]
        for m in names:
            if m not in ("page", "contig", "sg", "aead", "queue"):
                raise ValueError(f"unknown mode {m!r}; allowed: page, contig, sg, aead, queue")
        if working_set > memory:
            raise ValueError("working set is larger than memory")
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    guest = GuestModel(npages=memory // PAGE_SIZE, dirty_rate=dirty_rate,
                       working_set=working_set // PAGE_SIZE, vcpus=vcpus)
    base = MigrationParams(downtime_limit_ms=downtime_limit, throttle=ThrottleKind(throttle),
                           switchover=Switchover(switchover), timeout_s=timeout,
                           timeout_action=TimeoutAction.CANCEL)
    click.echo(f"model: {memory / 2**30:g} GiB, {dirty_rate:g} pages/s over "
               f"{working_set / 2**30:g} GiB, PSP profile {psp_profile}, link {link_gbit:g} "
               f"Gbit/s, downtime-limit {downtime_limit} ms, throttle {throttle}")
    out = []
    for m in names:
        params = replace(base, batching=Batching.PAGE if m == "queue" else Batching(m),
                         queue=m == "queue")
        r = {"mode": m, **predict(guest, costs, params)}
        out.append(r)
        if r["status"] == "completed":
            click.echo(f"  {m:7} total {r['total_s']:10.1f} s  downtime {r['downtime_ms']:8.1f} ms"
                       f"  rounds {r['rounds']:4}  {r['switchover']}")
        else:
            click.echo(f"  {m:7} does not converge within {timeout:g} s "
                       f"({r['rounds']} rounds)")
    if json_path:
        json_path.write_text(json.dumps(out, indent=2) + "\n")
