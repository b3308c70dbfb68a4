"""`cvmig model`: the engine's driver on a simulated clock, at hardware costs."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from cvmig.migration.driver import MigrationParams
from cvmig.model.cli import costs_from_profile, model, predict
from cvmig.model.world import GuestModel
from cvmig.psp.api import Batching


def test_model_at_sev_2020_costs_ranks_batching_as_the_report_does(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    r = CliRunner().invoke(model, ["--memory", "2G", "--working-set", "256M", "--dirty-rate",
                                   "300", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = {x["mode"]: x for x in json.loads(out.read_text())}
    assert all(x["status"] == "completed" for x in rows.values())
    # batching shortens both migration time and downtime (the report's claim), sg most
    assert rows["contig"]["total_s"] < rows["page"]["total_s"]
    assert rows["sg"]["total_s"] <= rows["contig"]["total_s"]
    assert rows["contig"]["downtime_ms"] < rows["page"]["downtime_ms"]


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
