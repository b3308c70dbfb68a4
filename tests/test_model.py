"""`cvmig model`: the engine's driver on a simulated clock, at hardware costs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from cvmig.migration.driver import MigrationParams
from cvmig.model.cli import costs_from_profile, model, predict
from cvmig.model.world import GuestModel
from cvmig.psp.api import Batching


def test_model_at_sev_2020_costs_ranks_batching_as_the_report_does(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    r = CliRunner().invoke(model, ["--memory", "2G", "--working-set", "256M", "--dirty-rate",
                                   "300", "--vcpus", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = {x["mode"]: x for x in json.loads(out.read_text())}
    assert all(x["status"] == "completed" for x in rows.values())
    # batching shortens both migration time and downtime (the report's claim), sg most
    assert rows["contig"]["total_s"] < rows["page"]["total_s"]
    assert rows["sg"]["total_s"] <= rows["contig"]["total_s"]
    # a uniform writer's dirty set is scattered: contig's stop is page's again (the same
    # one-page commands; where each one's last round happens to end decides the rest)
    assert rows["contig"]["downtime_ms"] <= 1.1 * rows["page"]["downtime_ms"]
    # sg's short rounds buy a shorter stop (extra rounds once the stop fits)
    assert rows["sg"]["downtime_ms"] < 0.8 * rows["page"]["downtime_ms"]
    assert all(x["downtime_ms"] <= 300 for x in rows.values())


def test_a_dirty_rate_above_the_page_rate_never_converges_at_300_ms() -> None:
    # AMD's QEMU prototype: ~400 pages/s moved, guests dirtying more never converge
    costs = costs_from_profile("sev-2020", 10.0)
    g = GuestModel(npages=(512 << 20) // 4096, dirty_rate=500, working_set=(64 << 20) // 4096)
    r = predict(g, costs, MigrationParams(batching=Batching.PAGE, timeout_s=3600))
    assert r["status"] == "cancelled"
    # a uniform writer's dirty pages are scattered: contig is one page a command again,
    # sg batches them and converges
    r = predict(g, costs, MigrationParams(batching=Batching.CONTIG, timeout_s=3600))
    assert r["status"] == "cancelled"
    r = predict(g, costs, MigrationParams(batching=Batching.SG, timeout_s=3600))
    assert r["status"] == "completed"


def test_model_needs_costs() -> None:
    r = CliRunner().invoke(model, ["--psp-profile", "none"])
    assert r.exit_code == 2
    assert "needs a cost profile" in r.output


def test_the_model_overlaps_the_two_secure_processors_as_the_engine_does() -> None:
    from cvmig.migration.driver import Driver
    from cvmig.model.world import Costs, SimWorld

    # each PSP takes 100 µs a page; the link is fast: a round costs its slowest stage,
    # not the sum of the two, plus the last frame through the destination
    c = Costs(t_doorbell=0.0, t_cmd=100e-6, psp_bw=1e15, link_bw=1e12)
    w = SimWorld(GuestModel(npages=8192, dirty_rate=0, working_set=0), c)
    d = Driver(w, MigrationParams(batching=Batching.PAGE))
    d.run()
    bulk = d.progress.rounds[0].duration
    assert 8192 * 100e-6 <= bulk < 8192 * 100e-6 * 1.1
    assert w.destination_matches()


def test_hardware_profiles_carry_stop_costs() -> None:
    from cvmig.migration.stopcost import default_costs

    hw = costs_from_profile("sev-2020", 10.0, vcpus=2).stop
    # the stop's firmware commands at 2020 prices: 2 VMSAs at each end, trailer, finish
    assert hw.total() - default_costs(2).total() == pytest.approx(6 * 2.5e-3, rel=0.01)


def test_model_runs_on_a_host_calibration(tmp_path: Path) -> None:
    cell = {"send": {"t_cmd": 1e-4, "bw": 4e8}, "receive": {"t_cmd": 1e-4, "bw": 4e8},
            "t_page": 2e-5, "stop_ms": {"pause": 1, "vcpu_state": 2, "trailer": 1,
                                        "finish": 60, "grant": 3}}
    cal = {"cells": {"none/page": cell, "none/sg": cell}, "vcpus": 2}
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    out = tmp_path / "m.json"
    r = CliRunner().invoke(model, ["--calibration", str(path), "--psp-profile", "none",
                                   "--modes", "page,sg", "--memory", "64M", "--working-set",
                                   "16M", "--vcpus", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert all(x["status"] == "completed" for x in rows)
    assert all(x["gap_ms"] >= 67 for x in rows)  # the calibrated stop is counted
    r = CliRunner().invoke(model, ["--calibration", str(path), "--modes", "contig"])
    assert r.exit_code == 2 and "has no sev-2020/contig" in r.output


def _bulk_s(costs: object, cpu: float = 0.0) -> float:
    from cvmig.migration.driver import Driver
    from cvmig.model.world import SimWorld

    w = SimWorld(GuestModel(npages=4096, dirty_rate=0, working_set=0, cpu=cpu),
                 costs)  # type: ignore[arg-type]
    d = Driver(w, MigrationParams(batching=Batching.PAGE))
    d.run()
    return d.progress.rounds[0].duration


def test_a_guest_that_takes_the_small_hosts_cores_slows_the_migration_by_its_share() -> None:
    from cvmig.model.world import Costs

    alone = Costs(t_doorbell=0.0, t_cmd=100e-6, psp_bw=1e15, link_bw=1e12, cores=2.0,
                  pipeline_cores=2.0)
    base = _bulk_s(alone)
    # two busy vCPUs ask for 2 cores more: each side gets half of what it asks
    assert _bulk_s(alone, cpu=2.0) == pytest.approx(2 * base, rel=0.02)
    # with cores to spare (or none modelled: hardware), the guest costs the migration nothing
    spare = Costs(t_doorbell=0.0, t_cmd=100e-6, psp_bw=1e15, link_bw=1e12, cores=8.0,
                  pipeline_cores=2.0)
    assert _bulk_s(spare, cpu=2.0) == pytest.approx(base, rel=0.02)
    assert _bulk_s(Costs(t_doorbell=0.0, t_cmd=100e-6, psp_bw=1e15, link_bw=1e12),
                   cpu=2.0) == pytest.approx(base, rel=0.02)
    # a hardware profile's PSP time is the chip's, not the host's: only the engine's slows
    hw = Costs(t_doorbell=0.0, t_cmd=100e-6, psp_bw=1e15, link_bw=1e12, cores=2.0,
               pipeline_cores=2.0, psp_cpu=False)
    assert _bulk_s(hw, cpu=2.0) == pytest.approx(base, rel=0.02)


def test_the_destinations_start_work_slows_only_the_first_part_of_the_bulk() -> None:
    from cvmig.model.world import Costs

    c = Costs(t_doorbell=0.0, t_cmd=100e-6, psp_bw=1e15, link_bw=1e12, cores=2.0,
              pipeline_cores=2.0)
    base = _bulk_s(c)  # 0.41 s
    # 0.2 CPU-s by two processes: while it runs, the demand is 4 cores on 2, so it gets
    # 1 core and is done after 0.2 s, in which the migration did half its work
    slowed = _bulk_s(replace(c, start_cpu=0.2))
    assert slowed == pytest.approx(base + 0.1, rel=0.05)


def test_a_destination_that_readies_itself_first_is_behind_at_the_end_of_a_small_bulk(
) -> None:
    # the engine's destination maps the memory, runs RECEIVE_START and waits for its
    # vCPUs before it imports (`destination-ready-s`, 25-50 ms here): the source's first
    # frames wait in the window, and a small guest's bulk ends with the destination still
    # that far behind, which the stop waits for (or carries)
    from cvmig.migration.driver import Driver
    from cvmig.model.world import Costs, SimWorld

    def idle(dst_start: float) -> tuple[SimWorld, float]:
        c = Costs(t_doorbell=0.0, t_cmd=100e-6, psp_bw=1e15, link_bw=1e12,
                  dst_start=dst_start)
        w = SimWorld(GuestModel(npages=4096, dirty_rate=0.0, working_set=0), c)
        p = Driver(w, MigrationParams(batching=Batching.SG)).run()
        end = p.rounds[0].start + p.rounds[0].duration
        return w, p.total_time - end

    now, late = idle(0.0), idle(0.04)
    assert late[0]._dst_done[0] >= 0.04  # nothing imported before it is ready
    assert now[0]._dst_done[0] < 0.01
    assert late[1] > now[1] + 0.02  # its last frames land (or are waited for) later


def test_a_queue_shares_the_doorbell_at_both_ends() -> None:
    from cvmig.model.world import Costs

    c = Costs(t_doorbell=300e-6, t_cmd=100e-6, psp_bw=1e15, rx_t_cmd=100e-6,
              rx_t_doorbell=300e-6)
    assert c.dst_psp(10, 0, doorbells=1) == pytest.approx(300e-6 + 10 * 100e-6)
    assert c.dst_psp(10, 0) == pytest.approx(10 * 400e-6)
    same = Costs(t_doorbell=300e-6, t_cmd=100e-6, psp_bw=1e15)  # the destination as the source
    assert same.dst_psp(10, 0, doorbells=1) == pytest.approx(same.src_psp(10, 1, 0))
