"""`cvmig bench paper` on a tiny grid: real migrations, ratios against page, files written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from click.testing import CliRunner

from cvmig.bench import paper as P


def test_tiny_grid_writes_runs_summary_and_plots(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tiny = P.Grid(modes=("page", "contig"), throttles=("none",), dirty_fractions=(0.5,),
                  idle=False, sqlite=False, reps=1, memory=32 << 20, profiles=("none",),
                  hw_memory=16 << 20, hw_modes=("page",), timeout_s=20.0)
    monkeypatch.setattr(P, "QUICK", tiny)
    out = tmp_path / "res"
    r = CliRunner().invoke(P.paper, ["--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "baseline transfer rate here" in r.output and "machine:" in r.output
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert [x["row"]["mode"] for x in runs] == ["page", "contig"]
    assert all(x["row"]["verified"] for x in runs)
    summary = list(csv.DictReader((out / "summary.csv").open()))
    by_mode = {s["mode"]: s for s in summary}
    assert float(by_mode["page"]["time_vs_page"]) == 1.0
    ratio = float(by_mode["contig"]["total_ms"]) / float(by_mode["page"]["total_ms"])
    assert abs(float(by_mode["contig"]["time_vs_page"]) - ratio) < 1e-3
    for png in ("time_downtime_none.png", "pages_per_round.png", "firmware_us_per_page.png",
                "guest_throughput.png"):
        assert (out / png).stat().st_size > 1000


def test_bad_profile_is_refused_before_any_run(tmp_path: Path) -> None:
    r = CliRunner().invoke(P.paper, ["--profiles", "warp-drive", "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert "warp-drive" in r.output
    assert not (tmp_path / "runs.json").exists()


def test_a_part_of_the_grid_is_named_axis_by_axis() -> None:
    g = P._part(P.FULL, "page,sg", "none", "idle,d0.5")
    assert (g.modes, g.throttles, g.idle, g.sqlite, g.dirty_fractions) == (
        ("page", "sg"), ("none",), True, False, (0.5,))
    assert g.hw_modes == ("page", "sg")  # the hardware profile's modes, within the named
    assert P._part(P.FULL, None, None, None) == P.FULL


def test_an_unknown_mode_throttle_or_workload_is_refused_before_any_run(tmp_path: Path) -> None:
    for opt, bad in (("--modes", "page,turbo"), ("--throttles", "brake"),
                     ("--workloads", "d0.5,video")):
        r = CliRunner().invoke(P.paper, [opt, bad, "--out", str(tmp_path)])
        assert r.exit_code == 2, r.output
        assert bad.split(",")[-1] in r.output and "choose from" in r.output
        assert not (tmp_path / "runs.json").exists()
