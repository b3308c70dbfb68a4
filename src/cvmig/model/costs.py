"""Where the model's costs come from: a named hardware profile, or this host, calibrated.

A hardware profile (`cvmig.psp.cost`) gives the secure processor's per-command and per-byte
cost; the stop's fixed parts are this machine's measured software costs (pause, restore,
grant: `cvmig.migration.stopcost`) plus the profile's price of the firmware commands a stop
issues (a VMSA per vCPU at each end, the trailer, RECEIVE_FINISH). That is an assumption,
stated: on hardware the vCPUs are KVM's, whose restore is far cheaper than starting our
vCPU processes, so these stop costs are pessimistic there.

A host calibration (``cvmig model --validate`` writes one: docs/results/model-calibration.json)
holds, per batching mode and cost profile: the PSP's cost per command and per page for
SEND and RECEIVE (`cvmig bench psp`: a line, and the measured table by pages), scaled to
the idle runs' pace; the engine's own work per page and the destination's lag, fitted to
those runs; their stop costs, set-up and digest; how they shared the host's cores (and
how much a busy guest slows the migration, fitted on one busy cell where there is one); the
link. It is what carries the model onto the engine it was calibrated on.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from cvmig.migration.stopcost import StopCosts, default_costs
from cvmig.model.world import Costs
from cvmig.psp.api import PAGE_SIZE
from cvmig.psp.cost import CostProfile, parse

LOOPBACK_BW = 2.0e9  # bytes/s, Python over loopback here (shared/reference/platform.md §3)
LOOPBACK_LATENCY = 50e-6  # s, one way (a 32 B ping-pong's median / 2, rounded up)
# A sync's own time where no report measured it (x-sync-ms): idle guests here, 32, 128 and
# 512 MiB, 3 runs each: 0.95-0.99, 1.11-1.24, 1.88-1.93 ms before the pause (the harvest
# and the decision), 0.44-0.48, 0.60-0.72, 0.96-1.03 ms after it (the harvest alone)
SYNC_S, SYNC_PAGE_S = 0.9e-3, 7.7e-9
STOP_SYNC_S, STOP_SYNC_PAGE_S = 0.41e-3, 4.5e-9

# Newer hardware: no public PSP timing exists for any SEV generation (sev-protocol.md §3).
# What AMD plans for SNP (and IBM built for SEV) is a migration helper in a mirror VM that
# moves pages with its own software AES-GCM, bypassing the PSP's data path. Our `aead`
# mode on this machine is exactly that path in software: a helper's per-page cost is at
# most this host's measured aead cost. So "helper" = this host's calibrated aead costs.
HELPER = "helper"


def costs_from_profile(spec: str, link_gbit: float, vcpus: int = 2) -> Costs:
    """Costs for a named profile (or fixed_us:doorbell_us:mb_per_s)."""
    prof = parse(spec)
    if prof.is_free:
        raise ValueError("the model needs a cost profile with costs: sev-2020, "
                         "fixed_us:doorbell_us:mb_per_s measured with `cvmig bench psp`, or "
                         "--calibration FILE (this host, from `cvmig model --validate`)")
    return with_sync(Costs(t_doorbell=prof.t_doorbell, t_cmd=prof.t_fixed,
                           psp_bw=prof.bandwidth or float("inf"), link_bw=link_gbit * 1e9 / 8,
                           stop=hardware_stop(prof, vcpus)), {})


def hardware_stop(prof: CostProfile, vcpus: int) -> StopCosts:
    """This machine's software stop costs plus the profile's firmware commands."""
    return default_costs(vcpus, prof.duration(1, PAGE_SIZE))


def load_calibration(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read calibration {path}: {e}") from None
    if not isinstance(data, dict) or "cells" not in data:
        raise ValueError(f"{path} is not a model calibration (from `cvmig model --validate`)")
    return data


def costs_from_calibration(cal: dict[str, Any], profile: str, mode: str,
                           vcpus: int = 2) -> Costs:
    """The host's calibrated costs for one cost profile and batching mode."""
    key = f"{profile}/{mode}"
    cell = cal["cells"].get(key)
    if cell is None:
        have = ", ".join(sorted(cal["cells"]))
        raise ValueError(f"the calibration has no {key}; it has: {have}")
    c = costs_from_cell(cell, cal.get("link_bw", LOOPBACK_BW),
                        cal.get("latency", LOOPBACK_LATENCY))
    c.guest_weight = cal.get("guest_weight", {}).get(profile, 1.0)
    if vcpus != cal.get("vcpus", vcpus):  # the stop's per-vCPU parts scale
        k = vcpus / cal["vcpus"]
        c.stop = replace(c.stop, vcpu_state=c.stop.vcpu_state * k, finish=c.stop.finish * k)
    return c


def costs_from_cell(cell: dict[str, Any], link_bw: float, latency: float) -> Costs:
    """One calibrated mode: each secure processor's cost per doorbell, command and byte
    (a queue's doorbell apart from its commands), the engine's own work, the stop."""
    stop = StopCosts.from_ms(cell["stop_ms"])
    stop.slice = cell["stop_ms"].get("slice", 10.0) / 1000
    send, recv, host = cell["send"], cell["receive"], cell.get("host", {})
    costs = Costs(t_doorbell=send.get("t_doorbell", 0.0), t_cmd=send["t_cmd"],
                  psp_bw=send["bw"], rx_t_cmd=recv["t_cmd"],
                  rx_t_doorbell=recv.get("t_doorbell", 0.0), rx_psp_bw=recv["bw"],
                  t_send=cell.get("t_send", 0.0), t_page=cell.get("t_page", 0.0),
                  setup=cell.get("setup_s", 0.0), digest_page=cell.get("digest_page", 0.0),
                  rx_lag=cell.get("rx_lag", 0.0), dst_start=host.get("dst_start", 0.0),
                  stop_rest=cell.get("stop_rest_ms", 0.0) / 1000,
                  cmd_table=_table(send), rx_cmd_table=_table(recv),
                  link_bw=link_bw, latency=latency, stop=stop,
                  # how this host's cores were shared (cvmig.model.calibrate.host_share)
                  cores=host.get("cores", 0.0), pipeline_cores=host.get("pipeline_cores", 0.0),
                  psp_cpu=host.get("psp_cpu", True), start_cpu=host.get("start_cpu", 0.0))
    return with_sync(costs, cell)


def with_sync(c: Costs, cell: dict[str, Any]) -> Costs:
    """A sync's own time, before the pause and after it: the cell's where its calibration
    measured them (their fixed part), else this machine's."""
    return replace(c, sync=cell.get("sync_s", SYNC_S), sync_page=SYNC_PAGE_S,
                   stop_sync=cell.get("stop_sync_s", STOP_SYNC_S),
                   stop_sync_page=STOP_SYNC_PAGE_S)


def _table(direction: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    t = direction.get("table")
    return (tuple(t[0]), tuple(t[1])) if t else None

