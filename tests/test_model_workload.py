"""The model's guest from the engine's reports of its workload: a database's dirty-set
curve and runs, its stop costs, and how much a busy guest slows the migration."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmig.bench.paper import MODES
from cvmig.migration.stopcost import StopCosts
from cvmig.model import validate as V
from cvmig.model.workload import (
    DirtyCurve,
    dirty_samples,
    fit_dirty_curve,
    guest_from_reports,
    run_length,
    workload_stop,
)
from cvmig.model.world import Costs, GuestModel, SimWorld

NPAGES = 32766


@settings(max_examples=25, deadline=None)
@given(hot=st.integers(0, 60), ws=st.integers(50, 2000), rate=st.floats(20.0, 5000.0))
def test_a_dirty_set_curve_is_recovered_from_its_own_samples(hot: int, ws: int,
                                                             rate: float) -> None:
    truth = DirtyCurve(hot, ws, rate)
    t = np.array([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0])
    d = np.maximum(np.round(truth.at(t)), 1)
    fit = fit_dirty_curve(list(zip(t.tolist(), d.astype(int).tolist(), strict=True)), NPAGES)
    assert fit is not None
    # the fit predicts what was seen (a grid search: within a few per cent)
    assert np.allclose(fit.at(t), d, rtol=0.12, atol=3)


def _report(rounds: list[tuple[float, float, int, int]], throttle: int = 0,
            batching: str = "contig", cap: int = 64,
            stop: dict[str, float] | None = None, cpu: float = 2.0) -> dict[str, Any]:
    return {"rounds": [{"start": s, "duration": d, "pages": p, "dirty_pages": p,
                        "commands": c, "throttle_pct": throttle} for s, d, p, c in rounds],
            "params": {"x-batching": batching, "x-batch-cap": cap, "x-queue": False},
            "x-stop": {"costs-measured-ms": stop or {}},
            "guest": {"cpu-cores-before": cpu, "ops-per-s-before": 1000.0}}


def test_samples_are_the_intervals_between_syncs_of_unthrottled_rounds() -> None:
    free = _report([(0.0, 1.0, NPAGES, 100), (1.5, 0.1, 180, 10), (1.7, 0.02, 60, 4)])
    throttled = _report([(0.0, 1.0, NPAGES, 100), (1.5, 0.1, 180, 10)], throttle=20)
    assert dirty_samples([free, throttled]) == [(1.5, 180), (pytest.approx(0.2), 60)]


def test_a_databases_runs_are_its_pages_per_contiguous_command() -> None:
    wide = _report([(0.0, 1.0, NPAGES, 600), (1.5, 0.1, 170, 10), (1.7, 0.1, 160, 10)])
    narrow = _report([(0.0, 1.0, NPAGES, 600), (1.5, 0.1, 170, 60)], cap=4)  # capped: not runs
    sg = _report([(0.0, 1.0, NPAGES, 150), (1.5, 0.1, 170, 1)], batching="sg")
    assert run_length([wide, narrow, sg]) == 16  # 170/10 and 160/10
    assert run_length([narrow, sg]) == 1


def test_a_database_guest_rewrites_its_hot_pages_and_dirties_runs() -> None:
    reps = [_report([(0.0, t, NPAGES, 600), (t, 0.1, round(40 + 200 * (1 - np.exp(-t))), 12)])
            for t in (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)]
    g = guest_from_reports("sqlite:accounts=200", 128 << 20, reps, 2)
    assert g.rate_under_load and g.cpu == 2.0
    assert 30 <= g.hot_pages <= 50 and 150 <= g.working_set <= 260 and g.run_pages > 1
    # a dirtier keeps its rate knob: uniform pages over all of memory
    d = guest_from_reports("dirtier:rate=500,pattern=uniform", 128 << 20, reps, 2)
    assert (d.dirty_rate, d.working_set, d.hot_pages, d.run_pages) == (500.0, NPAGES, 0, 1)


def test_the_hot_pages_are_dirty_after_any_interval_the_guest_ran() -> None:
    g = GuestModel(npages=1000, dirty_rate=100.0, working_set=200, hot_pages=30, run_pages=8)
    w = SimWorld(g, Costs())
    w.start_dirty_log()
    w.sleep(0.001)  # a write's tenth: no write yet, but the guest ran
    first = w.harvest()
    assert set(range(770, 800)) <= set(first.tolist())
    w.sleep(1.0)
    pfns = w.harvest()
    runs = pfns[pfns >= 800]
    assert len(runs) and len(runs) % 8 == 0  # whole runs of the working set
    assert np.all(np.diff(runs.reshape(-1, 8), axis=1) == 1)
    w.pause_guest()
    w.sleep(1.0)
    w.harvest()  # the writes up to the pause
    assert len(w.harvest()) == 0  # paused: nothing, hot pages included


def test_a_rate_seen_under_load_is_not_slowed_again_by_the_same_load() -> None:
    costs = Costs(cores=2.0, pipeline_cores=1.0, start_cpu=0.0)
    seen = SimWorld(GuestModel(npages=1000, dirty_rate=100.0, working_set=1000, cpu=2.0,
                               rate_under_load=True), costs)
    before = SimWorld(GuestModel(npages=1000, dirty_rate=100.0, working_set=1000, cpu=2.0),
                      costs)
    assert seen.write_rate() == pytest.approx(100.0)
    assert before.write_rate() == pytest.approx(100.0 / 1.5)  # (1 + 2) / 2 cores


def test_a_workloads_stop_costs_are_the_medians_its_stops_measured() -> None:
    idle = StopCosts(pause=1e-3, vcpu_state=1e-3, trailer=1e-3, finish=5e-3, grant=1e-3)
    reps = [_report([], stop={"pause": p, "finish": f}) for p, f in ((7, 10), (9, 12), (8, 30))]
    got = workload_stop(idle, reps)
    assert got.pause == pytest.approx(8e-3) and got.finish == pytest.approx(12e-3)
    assert got.grant == idle.grant  # not measured: the calibration's


def test_a_busy_guests_weight_makes_the_models_bulk_as_long_as_the_engines() -> None:
    cell = V.calibration_cell(_idle_report(0.6), MODES["sg"], _PSP)
    cal = {"cells": {"none/sg": cell}}
    costs = V.costs_from_calibration(cal, "none", "sg")
    plain = V._model_bulk(costs, 4094, MODES["sg"], 2.0)
    busy = [_idle_report(plain * 1.4, cpu=2.0) for _ in range(3)]
    w = V.fit_guest_weight(cal, "none", busy)
    assert w > 1.0
    weighed = V._model_bulk(Costs(**{**costs.__dict__, "guest_weight": w}), 4094,
                            MODES["sg"], 2.0)
    assert weighed == pytest.approx(plain * 1.4, rel=0.02)
    # a guest that slowed the engine no more than the model says weighs 1
    assert V.fit_guest_weight(cal, "none", [_idle_report(plain * 0.9, cpu=2.0)]) == 1.0


_PSP = {"sg": {"send": {"t_cmd": 100e-6, "bw": 1e9}, "receive": {"t_cmd": 100e-6, "bw": 1e9}}}


def _idle_report(bulk_s: float, cpu: float = 0.0) -> dict[str, Any]:
    return {"rounds": [{"kind": "bulk", "start": 0.01, "duration": bulk_s, "pages": 4094,
                        "dirty_pages": 4094},
                       {"kind": "stop-and-copy", "start": 0.01 + bulk_s, "duration": 0.01,
                        "pages": 2, "dirty_pages": 0}],
            "x-stop": {"costs-measured-ms": {"pause": 1.0, "vcpu_state": 1.0, "trailer": 0.5,
                                             "finish": 5.0, "grant": 1.0}},
            "guest": {"cpu-cores-before": cpu, "cpu-cores-during": cpu},
            "x-host-cpu": {"cores": 2, "busy-cores-precopy": 1.0,
                           "destination-start-cpu-s": 0.0},
            "psp": {"profile": "none"}, "ram": {"total": 16 << 20}, "total-time": 700,
            "setup-time": 10, "downtime": 8}
