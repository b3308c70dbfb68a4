"""`cvmig bench prestart`: both kinds of destination, side by side, in one run."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from cvmig.bench.prestart import prestart


def test_one_rep_each_way_writes_both_kinds_and_their_ratio(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    r = CliRunner().invoke(prestart, ["-m", "16M", "-b", "sg,page", "--reps", "1",
                                      "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "cores" in r.output.splitlines()[0]  # the machine it ran on
    rec = json.loads(out.read_text())
    assert set(rec["modes"]) == {"sg", "page"}
    for mode in ("sg", "page"):
        runs = rec["modes"][mode]["runs"]
        assert all(run["verified"] for kind in runs.values() for run in kind)
        t = rec["modes"][mode]["summary"]["total_ms"]
        assert t["ratio"] == round(t["prestart"] / t["at-start"], 3)
        # a destination that started its vCPUs ahead spent less starting them during it
        c = rec["modes"][mode]["summary"]["start_cpu_s"]
        assert c["prestart"] < c["at-start"]
    # each mode ran as named: page one command per page (the shared ones skip the
    # firmware), sg up to 256
    page = rec["modes"]["page"]["runs"]["prestart"][0]
    sg = rec["modes"]["sg"]["runs"]["prestart"][0]
    assert page["commands"] >= page["pages"] - 64
    assert sg["commands"] <= sg["pages"] // 256 + 64
    assert out.with_suffix(".log").exists()


def test_an_unknown_batching_mode_is_refused_before_any_run(tmp_path: Path) -> None:
    r = CliRunner().invoke(prestart, ["-b", "sg,warp", "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 2
    assert "warp" in r.output and "aead" in r.output
    assert not (tmp_path / "p.json").exists()
