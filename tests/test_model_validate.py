"""`cvmig model --validate`'s bookkeeping, on engine results written by hand: which runs
calibrate, what the model is held to (the runs' median), the engine's own spread."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cvmig.bench.paper import MODES
from cvmig.migration.driver import Driver, MigrationParams
from cvmig.model import calibrate as C
from cvmig.model import validate as V
from cvmig.model.cli import model
from cvmig.model.costs import STOP_SYNC_PAGE_S, SYNC_PAGE_S
from cvmig.model.workload import guest_from_reports
from cvmig.model.world import Costs, GuestModel, SimWorld
from cvmig.psp.api import PAGE_SIZE

PSP = {"none": {"page": {"send": {"t_cmd": 100e-6, "bw": 1e15},
                         "receive": {"t_cmd": 100e-6, "bw": 1e15}}}}
NPAGES = 4094  # 16 MiB less the two VMSA pages


def _run(workload: str, total: float, downtime: float, gap: float, bulk_s: float,
         busy: float = 1.0, cpu: float = 0.0) -> dict[str, Any]:
    row = {"workload": workload, "mode": "page", "throttle": "none", "profile": "none",
           "memory_mib": 16, "status": "completed", "switchover": "converged",
           "total_ms": total, "downtime_ms": downtime, "gap_ms": gap, "rounds": 2,
           "dirty_fraction": 0.5 if workload.startswith("dirtier") else 0.0}
    report = {
        "rounds": [{"kind": "bulk", "start": 0.01, "duration": bulk_s, "pages": NPAGES,
                    "dirty_pages": NPAGES},
                   {"kind": "stop-and-copy", "start": 0.01 + bulk_s, "duration": 0.01,
                    "pages": 2, "dirty_pages": 0}],
        "x-stop": {"costs-measured-ms": {"pause": 1.0, "vcpu_state": 1.0, "trailer": 0.5,
                                         "finish": 5.0, "grant": 1.0}},
        "guest": {"ops-per-s-before": 100.0, "cpu-cores-before": cpu,
                  "cpu-cores-during": cpu},
        "x-host-cpu": {"cores": 2, "busy-cores-precopy": busy, "destination-start-cpu-s": 0.0},
        "psp": {"profile": "none"}, "ram": {"total": 16 << 20}, "total-time": total,
        "setup-time": 10,
        "downtime": downtime,
    }
    return {"row": row, "report": report}


def _bench(tmp_path: Path) -> Path:
    wl = "dirtier:rate=100,pattern=uniform"
    runs = [_run("idle", 700, 8, 20, 0.6),
            _run(wl, 900, 10, 30, 0.6), _run(wl, 1300, 30, 50, 0.6),
            _run(wl, 1000, 20, 40, 0.6)]
    runs.append({"row": {**runs[1]["row"], "status": "failed"}, "report": None})
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"meta": {"grid": {"timeout_s": 40.0}}, "runs": runs}))
    return path


def test_the_model_is_held_to_the_median_of_a_cells_runs(tmp_path: Path) -> None:
    res = V.from_bench(_bench(tmp_path), tmp_path / "out", lambda s: None, PSP)
    assert res["summary"]["cells"] == 1  # the idle run calibrates: it is not a cell
    cell = res["cells"][0]
    assert (cell["workload"], cell["mode"]) == ("d0.5", "page")
    e, m = cell["engine"], cell["model"]
    assert (e["total_ms"], e["downtime_ms"], e["gap_ms"]) == (1000, 20, 40)
    assert len(e["runs"]) == 3  # the failed run is left out
    assert cell["spread_total"] == pytest.approx(0.2)  # (1300 - 900) / 2 / 1000
    assert cell["spread_downtime"] == pytest.approx(0.5)
    assert cell["err_total"] == pytest.approx((m["total_ms"] - 1000) / 1000, abs=1e-3)
    assert (tmp_path / "out" / "model-validation-bench.json").is_file()


def test_the_calibration_makes_the_models_bulk_last_as_long_as_the_engines() -> None:
    for bulk_s in (0.6, 0.3):  # slower than the priced PSP, then faster (a drifted pace)
        cell = C.calibration_cell(_run("idle", 700, 8, 20, bulk_s)["report"], MODES["page"],
                                  PSP["none"])
        costs = C.costs_from_cell(cell, C.LOOPBACK_BW, C.LOOPBACK_LATENCY)
        assert C._model_bulk(costs, NPAGES, MODES["page"]) == pytest.approx(bulk_s, rel=0.01)
        assert ("psp_scale" in cell) == (bulk_s < NPAGES * 100e-6)
        # the busy cores less the guest's and the start work: the migration's own demand
        assert cell["host"] == {"cores": 2.0, "pipeline_cores": 1.0, "start_cpu": 0.0,
                                "psp_cpu": True}
        # the set-up before the bulk, and the source's digest after the go-ahead (the
        # engine's 700 ms less its time to the end of the stop round): as measured
        w = SimWorld(GuestModel(npages=NPAGES, dirty_rate=0, working_set=0), costs)
        p = Driver(w, MODES["page"].params(MigrationParams())).run()
        assert p.rounds[0].start == pytest.approx(0.010)
        last = p.rounds[-1]
        assert p.total_time - (last.start + last.duration) == pytest.approx(
            0.700 - (0.010 + bulk_s + 0.010), rel=0.01)


def test_the_firmwares_pace_is_what_the_engine_timed_in_its_bulk() -> None:
    """The engine times its firmware calls (a round's ``psp_seconds``): the calibration
    prices the firmware at that pace, in both directions, and leaves the bulk's rest to
    the engine's own work per page, so that the dirty rounds (old pages, no such work)
    move at the firmware's measured pace, not the bench's."""
    priced = NPAGES * 100e-6  # the bulk's commands at PSP's price
    for pace in (1.3, 0.8):
        rep = _run("idle", 700, 8, 20, 0.6)["report"]
        rep["rounds"][0]["psp_seconds"] = pace * priced
        cell = C.calibration_cell(rep, MODES["page"], PSP["none"])
        assert cell["psp_scale"] == pytest.approx(pace, rel=1e-3)
        costs = C.costs_from_cell(cell, C.LOOPBACK_BW, C.LOOPBACK_LATENCY)
        assert costs.t_cmd == pytest.approx(pace * 100e-6, rel=1e-3)
        assert costs.rx_t_cmd == pytest.approx(pace * 100e-6, rel=1e-3)
        assert C._model_bulk(costs, NPAGES, MODES["page"]) == pytest.approx(0.6, rel=0.01)
        assert cell["t_page"] > 0  # 0.6 s against 0.41 or 0.33 s of firmware
    # the bench's prices themselves stay as measured
    assert PSP["none"]["page"]["send"]["t_cmd"] == 100e-6


def test_a_busy_guest_on_the_small_host_lengthens_the_predicted_migration(tmp_path: Path) -> None:
    cal = {"cells": {"none/page": C.calibration_cell(
        _run("idle", 700, 8, 20, 0.6, busy=2.0)["report"], MODES["page"], PSP["none"])}}
    idle = guest_from_reports("idle", 16 << 20, [_run("idle", 0, 0, 0, 0)["report"]], V.VCPUS)
    busy = guest_from_reports("idle", 16 << 20, [_run("idle", 0, 0, 0, 0, cpu=2.0)["report"]],
                              V.VCPUS)
    assert busy.cpu == 2.0
    t_idle = V.predict_cell(cal, "none", "page", "none", idle, 40)["total_ms"]
    t_busy = V.predict_cell(cal, "none", "page", "none", busy, 40)["total_ms"]
    assert t_busy > 1.8 * t_idle  # the pipeline asked for both cores; now it gets half


def test_a_live_grids_runs_are_kept_for_the_model_to_be_held_to_again(tmp_path: Path) -> None:
    """`model --validate` keeps its runs as `bench paper` does: `--from-bench` then holds
    the model to them without migrating, each profile at the timeout the grid ran it."""
    runs = json.loads(_bench(tmp_path).read_text())["runs"]
    V._keep_runs(tmp_path, replace(V.FULL, timeout_s=15.0, hw_timeout_s=40.0), runs)
    kept = json.loads((tmp_path / "runs.json").read_text())
    assert kept["meta"]["source"] == "model --validate" and len(kept["runs"]) == len(runs)
    res = V.from_bench(tmp_path / "runs.json", tmp_path / "out", lambda s: None, PSP)
    assert [c["workload"] for c in res["cells"]] == ["d0.5"]
    assert V._timeout(kept["meta"], "none") == 15.0
    assert V._timeout(kept["meta"], "sev-2020") == 40.0  # its own, not 4 x 15
    assert V._timeout({"grid": {"timeout_s": 40.0}}, "sev-2020") == 160.0  # bench paper's
    assert V._fraction("d1.5") == 1.5 and V._fraction("sqlite") == 0.0


def test_each_guest_size_of_a_grid_is_predicted_from_its_own_calibration(
        tmp_path: Path) -> None:
    """A grid of several guest sizes (`model --validate`'s) is calibrated size by size:
    the 16 MiB cells come out as from a grid of the 16 MiB runs alone, though the larger
    guest's idle runs moved their pages at another pace."""
    small = json.loads(_bench(tmp_path).read_text())
    large = json.loads(json.dumps(small))
    for r in large["runs"]:
        r["row"]["memory_mib"] = 64
        if r["report"] is not None:
            r["report"]["ram"]["total"] = 64 << 20
            for rnd in r["report"]["rounds"]:
                rnd["pages"] = rnd["dirty_pages"] = rnd["pages"] * 4 if rnd["kind"] == "bulk" \
                    else rnd["pages"]
            r["report"]["rounds"][0]["duration"] *= 8  # half the pace
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"meta": small["meta"], "runs": small["runs"] + large["runs"]}))
    res = V.from_bench(both, tmp_path / "out", lambda s: None, PSP)
    alone = V.from_bench(tmp_path / "runs.json", tmp_path / "alone", lambda s: None, PSP)
    cells = {c["memory_mib"]: c for c in res["cells"]}
    assert set(cells) == {16, 64}
    assert cells[16]["model"]["total_ms"] == pytest.approx(
        alone["cells"][0]["model"]["total_ms"], rel=1e-6)
    assert set(res["calibration_by_mib"]) == {"16", "64"}
    kept = json.loads((tmp_path / "out" / "model-calibration.json").read_text())
    assert kept["cells"] == res["calibration_by_mib"]["64"]["cells"]  # the largest's


def test_the_hosts_calibration_keeps_every_profile_a_grids_sizes_calibrated(
        tmp_path: Path) -> None:
    """A hardware profile runs small guests only: the host's calibration a multi-size grid
    leaves takes each profile's cells from the largest guest that calibrated it, so
    `cvmig model --calibration ... --psp-profile sev-2020` still finds them."""
    data = json.loads(_bench(tmp_path).read_text())
    large = json.loads(json.dumps(data["runs"]))
    for r in large:
        r["row"]["memory_mib"] = 64
    hw = json.loads(json.dumps(data["runs"]))
    for r in hw:
        r["row"]["profile"] = "sev-2020"
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"meta": data["meta"], "runs": data["runs"] + large + hw}))
    psp = {**PSP, "sev-2020": PSP["none"]}
    res = V.from_bench(both, tmp_path / "out", lambda s: None, psp)
    kept = json.loads((tmp_path / "out" / "model-calibration.json").read_text())
    assert set(kept["cells"]) == {"none/page", "sev-2020/page"}
    assert kept["cells"]["none/page"] == res["calibration_by_mib"]["64"]["cells"]["none/page"]
    assert kept["cells"]["sev-2020/page"] == \
        res["calibration_by_mib"]["16"]["cells"]["sev-2020/page"]


def test_a_held_out_grid_of_another_size_is_calibrated_at_the_nearest(tmp_path: Path) -> None:
    """Calibrated on a grid of 64 MiB guests, a 16 MiB grid is still predicted (by the
    nearest size's calibration, and said so), not silently left out."""
    small = json.loads(_bench(tmp_path).read_text())
    large = json.loads(json.dumps(small))
    for r in large["runs"]:
        r["row"]["memory_mib"] = 64
    other = tmp_path / "large.json"
    other.write_text(json.dumps(large))
    said: list[str] = []
    res = V.from_bench(tmp_path / "runs.json", tmp_path / "out", said.append, PSP,
                       calibrate_on=other)
    assert res["summary"]["cells"] == 2  # the idle cell and the dirtier's, held out
    assert any("16 MiB: no idle runs of that size" in line for line in said)


def test_validate_options_are_checked(tmp_path: Path) -> None:
    r = CliRunner().invoke(model, ["--reps", "2"])
    assert r.exit_code == 2 and "go with --validate" in r.output
    r = CliRunner().invoke(model, ["--validate", "--from-bench", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no runs.json" in r.output
    bad = tmp_path / "runs.json"
    bad.write_text("{}")
    r = CliRunner().invoke(model, ["--validate", "--from-bench", str(bad)])
    assert r.exit_code == 2 and "not a `cvmig bench paper` runs.json" in r.output
    r = CliRunner().invoke(model, ["--validate", "--from-bench", str(bad), "--reps", "2"])
    assert r.exit_code == 2 and "do not apply" in r.output
    r = CliRunner().invoke(model, ["--validate", "--calibrate-on", str(bad)])
    assert r.exit_code == 2 and "goes with --from-bench" in r.output
    r = CliRunner().invoke(model, ["--validate", "--from-bench", str(bad),
                                   "--calibrate-on", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "--calibrate-on: no runs.json" in r.output


def test_a_grid_predicted_from_another_runs_calibration_beside_that_grids_own_medians(
        tmp_path: Path) -> None:
    """Calibrated on one grid, the model predicts another's every cell (its idle ones
    too: held out), and that grid's own median stands beside it: the engine's
    reproducibility, the floor under any model's error."""
    (tmp_path / "a").mkdir()
    first = _bench(tmp_path / "a")
    data = json.loads(first.read_text())
    for r in data["runs"]:  # the second grid: every run 10 % longer, its stops 20 % longer
        r["row"] = {**r["row"], "total_ms": r["row"]["total_ms"] * 1.1,
                    "downtime_ms": r["row"]["downtime_ms"] * 1.2}
    second = tmp_path / "second.json"
    second.write_text(json.dumps(data))
    res = V.from_bench(second, tmp_path / "out", lambda s: None, PSP, calibrate_on=first)
    cells = {c["workload"]: c for c in res["cells"]}
    assert set(cells) == {"idle", "d0.5"}  # the idle cell is held out, not calibrated on
    c = cells["d0.5"]
    assert c["twin"]["total_ms"] == 1000 and c["engine"]["total_ms"] == pytest.approx(1100)
    assert c["err_twin_total"] == pytest.approx(1000 / 1100 - 1, abs=1e-3)
    assert c["err_twin_downtime"] == pytest.approx(1 / 1.2 - 1, abs=1e-3)
    s = res["summary"]
    assert s["twinned"]["cells"] == 2
    assert s["err_twin_downtime"]["median_abs"] == pytest.approx(1 - 1 / 1.2, abs=1e-3)
    # the calibration is the first grid's: the same cell predicted as when it is its own
    own = V.from_bench(first, tmp_path / "own", lambda s: None, PSP)["cells"][0]
    assert c["model"]["total_ms"] == pytest.approx(own["model"]["total_ms"], rel=1e-6)
    assert (tmp_path / "out" / "model-validation-heldout.json").is_file()
    assert not (tmp_path / "out" / "model-calibration.json").exists()  # not this host's


def test_a_modes_calibration_takes_the_medians_of_its_idle_runs() -> None:
    reps = [_run("idle", total, 8, 20, bulk)["report"] for total, bulk in
            ((700, 0.6), (900, 0.5), (800, 0.7))]
    reps[1]["x-stop"]["costs-measured-ms"]["finish"] = 50.0  # one slow stop
    reps[2]["rounds"][1]["start"] += 0.040  # one run waited 40 ms for frames in flight
    m = C.median_report(reps)
    assert m["rounds"][0]["duration"] == 0.6
    assert m["x-stop"]["costs-measured-ms"]["finish"] == 5.0
    gap = m["rounds"][1]["start"] - m["rounds"][0]["start"] - m["rounds"][0]["duration"]
    assert gap == pytest.approx(0.0, abs=1e-9)
    # the time after the stop round: 700 - 620, 900 - 520, 800 - 760 ms; median 80 ms
    last = m["rounds"][-1]
    assert m["total-time"] / 1000 - last["start"] - last["duration"] == pytest.approx(0.080)
    # a median wait before the stop that the model's own pipeline does not show becomes
    # the destination's lag, fitted so that the model waits as long
    reps[0]["rounds"][1]["start"] += 0.100
    reps[1]["rounds"][1]["start"] += 0.100
    cell = C.calibration_cell(C.median_report(reps), MODES["page"], PSP["none"])
    costs = C.costs_from_cell(cell, C.LOOPBACK_BW, C.LOOPBACK_LATENCY)
    assert cell["rx_lag"] > 0
    bulk, wait = C._model_idle(costs, NPAGES, MODES["page"])
    # (fitted with the pace in turn: two passes get both close)
    assert wait == pytest.approx(0.100, abs=0.015) and bulk == pytest.approx(0.6, rel=0.02)
    # where the reports measured how long the destination readied itself, the median is
    # its start in the model (older reports: it starts at once), and the lag is fitted
    # to what that start leaves of the wait
    assert costs.dst_start == 0.0
    for r, ready in zip(reps, (0.030, 0.090, 0.050), strict=True):
        r["x-host-cpu"]["destination-ready-s"] = ready
    cell = C.calibration_cell(C.median_report(reps), MODES["page"], PSP["none"])
    late = C.costs_from_cell(cell, C.LOOPBACK_BW, C.LOOPBACK_LATENCY)
    assert late.dst_start == pytest.approx(0.050) and cell["rx_lag"] < costs.rx_lag
    assert C._model_idle(late, NPAGES, MODES["page"])[1] == pytest.approx(0.100, abs=0.015)


def test_a_calibration_leaves_the_firmwares_measured_prices_as_they_were() -> None:
    # contig's one-page price is set from page's after both are calibrated: on the cells'
    # own copies, not on `bench psp`'s prices, which the next calibration starts from
    table = {"t_cmd": 150e-6, "bw": 4e8, "table": [[1, 4, 16], [200e-6, 210e-6, 260e-6]]}
    psp = {"page": {"send": {"t_cmd": 120e-6, "bw": 1e15},
                    "receive": {"t_cmd": 120e-6, "bw": 1e15}},
           "contig": {"send": dict(table, table=[list(r) for r in table["table"]]),
                      "receive": dict(table, table=[list(r) for r in table["table"]])}}
    before = json.dumps(psp, sort_keys=True)
    cells = {f"none/{m}": C.calibration_cell(_run("idle", 700, 8, 20, 0.6)["report"],
                                             MODES[m], psp) for m in ("page", "contig")}
    C.settle(cells, "none")
    assert cells["none/contig"]["send"]["table"][1][0] == pytest.approx(120e-6, rel=0.01)
    assert json.dumps(psp, sort_keys=True) == before


def test_the_destinations_lag_is_one_for_the_hosts_modes() -> None:
    cells: dict[str, Any] = {}
    for mode, wait in (("page", 0.0), ("sg", 0.05), ("contig64", 0.15)):
        psp = {C.psp_key(MODES[mode]): PSP["none"]["page"]}
        rep = _run("idle", 700, 8, 20, 0.6)["report"]
        rep["rounds"][1]["start"] += wait  # its frames in flight took this long to land
        cells[f"none/{mode}"] = C.calibration_cell(rep, MODES[mode], psp)
    fits = sorted(c["rx_lag"] for c in cells.values())
    assert fits[0] < fits[-1]  # each mode's runs alone say different things
    C.settle(cells, "none")
    assert {c["rx_lag"] for c in cells.values()} == {fits[1]}  # their median
    assert sorted(c["rx_lag_fit"] for c in cells.values()) == fits
    for mode in ("page", "sg", "contig64"):  # and each bulk still lasts what the engine's did
        costs = C.costs_from_cell(cells[f"none/{mode}"], C.LOOPBACK_BW, C.LOOPBACK_LATENCY)
        assert C._model_bulk(costs, NPAGES, MODES[mode]) == pytest.approx(0.6, rel=0.02)


def test_a_destination_a_little_slower_than_its_source_is_what_the_drain_shows() -> None:
    # the model's own idle migration, its destination 5 % slower than its source: over
    # the bulk the window fills, and the frames in it drain at the end (the wait before
    # the stop). A calibration on that run finds the 5 % again, and the bulk's pace.
    mode = MODES["page"]
    psp = {C.psp_key(mode): PSP["none"]["page"]}
    probe = C.calibration_cell(_run("idle", 700, 8, 20, 0.6)["report"], mode, psp)
    truth = C.costs_from_cell(probe, C.LOOPBACK_BW, C.LOOPBACK_LATENCY)
    slow = replace(truth, rx_lag=0.05)
    bulk, gap = C._model_idle(slow, NPAGES, mode)
    bulk0, gap0 = C._model_idle(replace(truth, rx_lag=0.0), NPAGES, mode)
    assert gap > 1.5 * gap0  # a full window drains, not the last frame alone
    assert bulk < bulk0 * 1.06  # ... while the bulk's pace is barely the slower end's
    rep = _run("idle", 700, 8, 20, bulk)["report"]
    rep["rounds"][1]["start"] = 0.01 + bulk + gap
    cell = C.calibration_cell(rep, mode, psp)
    assert cell["rx_lag"] == pytest.approx(0.05, abs=0.01)
    got = C.costs_from_cell(cell, C.LOOPBACK_BW, C.LOOPBACK_LATENCY)
    assert C._model_idle(got, NPAGES, mode) == pytest.approx((bulk, gap), rel=0.03)


def test_the_rest_of_a_stop_beyond_its_measured_parts_is_what_the_idle_downtime_shows() -> None:
    # the model's own idle migration, with 1.5 ms of stop no part holds (CONFIRM's way,
    # the source's wake): its downtime, as an engine report would give it, calibrates
    # that rest again, and the calibrated model stops as long; QEMU's rule, whose idle
    # stops hold frames in flight too, takes its twin's
    mode = MODES["page"]
    psp = {C.psp_key(mode): PSP["none"]["page"]}
    probe = C.calibration_cell(_run("idle", 700, 8, 20, 0.6)["report"], mode, psp)
    truth = replace(C.costs_from_cell(probe, C.LOOPBACK_BW, C.LOOPBACK_LATENCY), stop_rest=0.0)
    bare = C._model_idle_run(truth, NPAGES, mode).downtime
    downtime = C._model_idle_run(replace(truth, stop_rest=1.5e-3), NPAGES, mode).downtime
    assert downtime == pytest.approx(bare + 1.5e-3)
    rep = _run("idle", 700, downtime * 1000, 20, 0.6)["report"]
    cell = C.calibration_cell(rep, mode, psp)
    assert cell["stop_rest_ms"] == pytest.approx(1.5, abs=0.05)
    got = C.costs_from_cell(cell, C.LOOPBACK_BW, C.LOOPBACK_LATENCY)
    assert C._model_idle_run(got, NPAGES, mode).downtime == pytest.approx(downtime, abs=1e-4)
    cells = {"none/contig": {**cell, "stop_rest_ms": 1.5},
             "none/contig-qemu": {**cell, "stop_rest_ms": 90.0}}
    C.lag_from_twin(cells, "none")
    assert cells["none/contig-qemu"]["stop_rest_ms"] == 1.5
    # and the twin's own lag, not the host's pool: what QEMU's rule stops behind is the
    # drain its twin waited out
    cells["none/contig"].update(rx_lag=0.04, rx_lag_fit=0.0)
    C.lag_from_twin(cells, "none")
    assert cells["none/contig-qemu"]["rx_lag"] == 0.0


def test_a_sync_takes_its_time_while_the_guest_writes_on_and_the_stops_is_downtime() -> None:
    # the engine measures each sync (x-sync-ms): its calibration takes the fixed part of
    # those before the pause and the stop's; the model's clock runs on by them, the guest
    # writing meanwhile into the next harvest, and the stop's harvest lands in the downtime
    rep = _run("idle", 700, 8, 20, 0.6)["report"]
    rep["x-sync-ms"] = [1.4, 1.0, 0.6]
    npages = rep["ram"]["total"] // PAGE_SIZE
    got = C.sync_cost(rep)
    assert got["sync_s"] == pytest.approx(1.2e-3 - npages * SYNC_PAGE_S)
    assert got["stop_sync_s"] == pytest.approx(0.6e-3 - npages * STOP_SYNC_PAGE_S)
    assert C.sync_cost(_run("idle", 700, 8, 20, 0.6)["report"]) == {}  # older: none
    guest = GuestModel(npages=1000, dirty_rate=1000.0, working_set=1000, timeslice=0)
    w = SimWorld(guest, Costs(sync=2e-3, sync_page=1e-6, stop_sync=1e-3))
    w.start_dirty_log()
    w.sleep(0.01)
    assert len(w.harvest()) == 10 and w.now() == pytest.approx(0.013)  # 2 ms + 1000 x 1 µs
    assert len(w.harvest()) == 3  # what the guest wrote while the driver took its time
    w.pause_guest()
    t = w.now()
    w.harvest()
    assert w.now() - t == pytest.approx(1e-3)
    bare = C._model_idle_run(Costs(), NPAGES, MODES["page"])
    timed = C._model_idle_run(Costs(sync=2e-3, stop_sync=1e-3), NPAGES, MODES["page"])
    assert timed.downtime == pytest.approx(bare.downtime + 1e-3)
