"""The model's guest from the engine's reports of its workload: a database's dirty-set
curve and runs, its stop costs, and how much a busy guest slows the migration."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmig.bench.paper import MODES
from cvmig.guest.vcpu import SLICE
from cvmig.migration.stopcost import StopCosts
from cvmig.model import calibrate as C
from cvmig.model import validate as V
from cvmig.model.workload import (
    DirtyCurve,
    IoRing,
    dirty_samples,
    fit_dirty_curve,
    guest_from_reports,
    hot_runs,
    io_ring,
    run_length,
    workload_stop,
)
from cvmig.model.world import Costs, GuestModel, SimWorld, fair_share
from tests.test_model_validate import _run

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


def test_one_short_interval_with_few_pages_does_not_cap_the_hot_pages() -> None:
    # a vCPU that sat a timeslice out wrote less than its transaction: one sample of 11
    truth = DirtyCurve(20, 200, 200.0)
    t = np.repeat([0.01, 0.02, 0.05, 0.1, 1.0, 3.0], 5)
    samples = [(float(x), int(round(float(truth.at(np.array([x]))[0])))) for x in t]
    fit = fit_dirty_curve([*samples, (0.014, 11)], NPAGES)
    assert fit is not None and 17 <= fit.hot <= 22


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
    g = GuestModel(npages=1000, dirty_rate=100.0, working_set=200, hot_pages=30, run_pages=8,
                   timeslice=0)  # (evenly: its writes come as their time does)
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
    # four pipeline threads at a quarter core each leave the two vCPUs half a core each
    assert before.write_rate() == pytest.approx(100.0 / 2.0)


def test_a_workloads_stop_costs_add_up_to_its_median_stop() -> None:
    idle = StopCosts(pause=1e-3, vcpu_state=1e-3, trailer=1e-3, finish=5e-3, grant=1e-3)
    # stops of 17, 21 and 38 ms; the parts' medians (8 and 12 ms) add up to 20
    reps = [_report([], stop={"pause": p, "finish": f}) for p, f in ((7, 10), (9, 12), (8, 30))]
    got = workload_stop(idle, reps)
    assert got.pause + got.finish == pytest.approx(21e-3)  # the median stop
    assert got.pause / got.finish == pytest.approx(8 / 12)  # shared as the medians are
    assert got.grant == idle.grant  # not measured: the calibration's
    assert workload_stop(idle, []) == idle


def test_a_busy_guests_weight_makes_the_models_bulk_as_long_as_the_engines() -> None:
    cell = C.calibration_cell(_idle_report(0.6), MODES["sg"], _PSP)
    cal = {"cells": {"none/sg": cell}}
    costs = V.costs_from_calibration(cal, "none", "sg")
    plain = C._model_bulk(costs, 4094, MODES["sg"], 2.0)
    busy = [_idle_report(plain * 1.4, cpu=2.0) for _ in range(3)]
    w = C.fit_guest_weight(cal, "none", busy)
    assert w > 1.0
    weighed = C._model_bulk(Costs(**{**costs.__dict__, "guest_weight": w}), 4094,
                            MODES["sg"], 2.0)
    assert weighed == pytest.approx(plain * 1.4, rel=0.02)
    # a guest that slowed the engine no more than the model says weighs 1
    assert C.fit_guest_weight(cal, "none", [_idle_report(plain * 0.9, cpu=2.0)]) == 1.0


_PSP = {"sg": {"send": {"t_cmd": 100e-6, "bw": 1e9}, "receive": {"t_cmd": 100e-6, "bw": 1e9}}}


def _idle_report(bulk_s: float, cpu: float = 0.0) -> dict[str, Any]:
    return _run("idle", 700, 8, 20, bulk_s, cpu=cpu)["report"]


def test_fair_share_gives_small_asks_all_they_ask() -> None:
    assert fair_share([0.1, 0.1], 2.0) == float("inf")  # everything fits
    assert fair_share([0.1, 1.0, 1.0, 1.0], 2.0) == pytest.approx(0.633, abs=1e-3)
    assert fair_share([1.0] * 4, 2.0) == pytest.approx(0.5)


def test_a_light_guest_keeps_its_pace_and_a_busy_one_shares_the_cores() -> None:
    costs = Costs(cores=2.0, pipeline_cores=1.6, start_cpu=0.5)
    light = SimWorld(GuestModel(npages=1000, dirty_rate=100.0, working_set=1000, cpu=0.1,
                                vcpus=2), costs)
    busy = SimWorld(GuestModel(npages=1000, dirty_rate=100.0, working_set=1000, cpu=2.0,
                               vcpus=2), costs)
    assert light.guest_slowdown() == 1.0  # a dirtier that mostly sleeps: as the engine saw
    assert busy.guest_slowdown() > 2.0  # two busy vCPUs beside the start work's two threads
    assert 1.0 < busy.guest_slowdown(unthrottled=True) < busy.guest_slowdown()
    busy.set_throttle(90)
    assert busy.guest_slowdown() < 1.5  # a throttled guest asks for a tenth


def test_costs_at_a_pace_scale_every_per_command_and_per_page_part() -> None:
    c = Costs(t_doorbell=1e-5, t_cmd=1e-4, psp_bw=1e9, rx_t_cmd=2e-4, rx_psp_bw=5e8,
              t_page=5e-6, cmd_table=((1.0, 64.0), (1e-4, 6e-4)))
    slow = c.at_pace(1.5)
    sizes = np.array([1, 8, 64])
    assert slow.src_psp(3, 3, 3 * 4096, sizes) == pytest.approx(1.5 * c.src_psp(3, 3, 3 * 4096,
                                                                                 sizes))
    assert slow.dst_psp(3, 3 * 4096) == pytest.approx(1.5 * c.dst_psp(3, 3 * 4096))
    assert slow.t_page == pytest.approx(7.5e-6) and slow.stop == c.stop


def test_a_one_page_command_costs_what_page_modes_calibration_says_in_every_contig_mode(
        ) -> None:
    table = [[1, 4, 64], [150e-6, 200e-6, 700e-6]]
    cells = {"none/page": {"send": {"t_cmd": 110e-6, "bw": 1e15},
                           "receive": {"t_cmd": 120e-6, "bw": 1e15}},
             "none/contig64": {"send": {"t_cmd": 1e-4, "bw": 1e9, "table": [list(table[0]),
                                                                         list(table[1])]},
                               "receive": {"t_cmd": 1e-4, "bw": 1e9,
                                           "table": [list(table[0]), list(table[1])]}},
             "none/sg": {"send": {"t_cmd": 1e-4, "bw": 1e9, "table": [list(table[0]),
                                                                    list(table[1])]},
                         "receive": {"t_cmd": 1e-4, "bw": 1e9}}}
    C.one_page_as_page(cells, "none")
    assert cells["none/contig64"]["send"]["table"][1] == pytest.approx([110e-6, 200e-6, 700e-6])
    assert cells["none/contig64"]["receive"]["table"][1][0] == pytest.approx(120e-6)
    assert cells["none/sg"]["send"]["table"][1][0] == 150e-6  # a scatter list: its own cost


def test_a_sampled_prediction_brackets_its_median() -> None:
    cell = C.calibration_cell(_idle_report(0.6), MODES["sg"], _PSP)
    cell["pace"] = [0.8, 1.0, 1.3]
    cal = {"cells": {"none/sg": cell}}
    guest = GuestModel(npages=4094, dirty_rate=2000.0, working_set=4094, vcpus=2)
    stops = [_idle_report(0.6) for _ in range(3)]
    for i, r in enumerate(stops):
        r["x-stop"]["costs-measured-ms"]["finish"] = 5.0 + 20.0 * i
    one = V.predict_cell(cal, "none", "sg", "none", guest, 40, stops)
    m = V.predict_cell(cal, "none", "sg", "none", guest, 40, stops, samples=15)
    assert m["samples"] == 15 and "samples" not in one
    for key in ("total_ms", "downtime_ms"):
        assert m[f"{key}_p10"] <= m[key] <= m[f"{key}_p90"]
    # the stop's finish was drawn from 5, 25 and 45 ms, the pace from 0.8-1.3: a band
    assert m["downtime_ms_p90"] - m["downtime_ms_p10"] > 15.0
    assert m["total_ms_p90"] > m["total_ms_p10"]


def test_qemus_rule_takes_the_destinations_lag_from_its_data_paths_twin() -> None:
    cells = {"none/contig": {"rx_lag": 0.6}, "none/contig-qemu": {"rx_lag": 0.0},
             "none/sg": {"rx_lag": 0.2}}
    C.lag_from_twin(cells, "none")
    assert cells["none/contig-qemu"]["rx_lag"] == 0.6  # contig's, not sg's
    assert cells["none/sg"]["rx_lag"] == 0.2


def test_the_engines_own_work_per_page_is_paid_on_a_pages_first_arrival_only() -> None:
    w = SimWorld(GuestModel(npages=100, dirty_rate=0.0, working_set=0),
                 Costs(t_doorbell=0.0, t_cmd=1e-4, psp_bw=1e15, t_page=1e-3, latency=0.0))
    pfns = np.arange(10, dtype=np.int64)
    bounds = np.arange(11, dtype=np.int64)  # one page a command
    t0 = w.now()
    w.send_private(pfns, bounds, queue=False)
    first = w.now() - t0
    t1 = w.now()
    w.send_private(pfns, bounds, queue=False)  # the same pages, dirtied again
    again = w.now() - t1
    assert first == pytest.approx(10 * 1e-4 + 10 * 1e-3)
    assert again == pytest.approx(10 * 1e-4)


def test_a_guests_io_ring_is_the_shared_pages_its_page_rounds_sent_without_commands() -> None:
    # page mode: one command a page, so what the rounds after the bulk sent without one
    # is shared; contig's rounds cannot tell (a command holds several pages). The 0.02 s
    # interval was too short to fill the ring: 8 records in it, 400 a second
    page = _report([(0.0, 1.0, NPAGES, NPAGES - 16), (1.5, 0.1, 180, 164), (1.52, 0.02, 50, 42)],
                   batching="page", cap=1)
    contig = _report([(0.0, 1.0, NPAGES, 600), (1.5, 0.1, 170, 10)])
    g = guest_from_reports("dirtier:rate=500,pattern=uniform", 128 << 20, [page, contig], 2)
    assert (g.io_pages, g.shared_pages) == (16, 16)
    assert g.io_rate == pytest.approx(400.0)
    assert io_ring([page], 2).written(0.01) == 4 and io_ring([page], 2).written(1.0) == 16
    # never short enough: a record per vCPU timeslice
    full = _report([(0.0, 1.0, NPAGES, NPAGES - 16), (1.5, 0.1, 180, 164)], batching="page", cap=1)
    assert io_ring([full], 2) == IoRing(16, 2 / SLICE)
    assert guest_from_reports("dirtier:rate=500", 128 << 20, [contig], 2).io_pages == 0
    assert guest_from_reports("idle", 128 << 20, [page], 2).io_pages == 0


def _first_slice(w: SimWorld, step: float = 0.5e-3) -> float:
    """Harvest in small steps until a slice's writes show; return the time (its slice
    began at most ``step`` before)."""
    while not len(w.harvest()):
        w.sleep(step)
    return w.now()


def test_a_throttled_guest_writes_a_slice_at_once_and_sleeps_between() -> None:
    # the engine's vCPUs write a 10 ms slice's pages as it begins and sleep p / (1 - p) of
    # a slice after it: at 80 % a window shorter than the sleep mostly finds nothing,
    # where an even writer at the same rate would leave a few pages in every one
    g = GuestModel(npages=100_000, dirty_rate=2000.0, working_set=100_000, vcpus=1)
    w = SimWorld(g, Costs())
    w.start_dirty_log()
    w.sleep(1.0)
    assert len(w.harvest()) == pytest.approx(2000, rel=0.03)  # 100 slices of 20 pages
    w.set_throttle(80)  # the next slice comes 50 ms after the last began
    w.sleep(0.1)
    w.harvest()
    found = []
    for _ in range(40):  # 200 ms in windows of 5 ms: four slices
        w.sleep(0.005)
        found.append(len(w.harvest()))
    assert sorted(found)[-4:] == [20, 20, 20, 20] and sorted(found)[:-4] == [0] * 36
    w.sleep(1.0)
    assert len(w.harvest()) == pytest.approx(400, abs=20)  # 1 - p of the rate


def test_a_new_throttle_is_read_as_the_slice_ends_or_at_the_sleeps_poll() -> None:
    # guest.vcpu reads the throttle after each slice, and in a sleep only when its wait
    # for commands times out (every 50 ms): a change does not wake a vCPU at once
    g = GuestModel(npages=100_000, dirty_rate=1000.0, working_set=100_000, vcpus=1)
    w = SimWorld(g, Costs())
    w.start_dirty_log()
    w.set_throttle(50)  # read as the first slice ends: 10 ms of sleep after it
    t = _first_slice(w)  # a slice began in (t - 0.5 ms, t]

    def at(ms: float) -> int:
        w.sleep(t + ms / 1000 - w.now())
        return len(w.harvest())

    w.sleep(0.015 + t - w.now())
    w.set_throttle(90)  # asleep for 10 ms (< 50): sleeps on; 90 ms after the next slice
    assert at(18.5) == 0 and at(21) == 10
    assert at(40) == 0
    w.set_throttle(0)  # asleep for 90 ms since 30: wakes at the poll, 50 ms into it
    assert at(78.5) == 0 and at(81) == 10
    assert at(89.5) == 0 and at(91) == 10  # unthrottled: a slice every 10 ms


def test_the_io_ring_is_written_in_turn_at_its_rate_and_goes_as_shared() -> None:
    g = GuestModel(npages=1000, dirty_rate=0.5, working_set=500, shared_pages=16, io_pages=16,
                   io_rate=200.0, timeslice=0)
    w = SimWorld(g, Costs())
    w.start_dirty_log()
    w.sleep(0.025)  # five records, no write to RAM yet
    assert w.harvest().tolist() == [0, 1, 2, 3, 4]
    w.sleep(0.061)  # twelve more (and a fifth carried): the ring wraps round
    pfns = w.harvest()
    assert pfns.tolist() == [0] + list(range(5, 16))  # 5..15, then 0
    assert w.shared_mask(pfns).all()
    w.sleep(1.0)
    assert w.harvest().tolist() == list(range(16))  # a long interval: all of it
    w.set_throttle(50)
    w.sleep(0.04)  # half the timeslices: four records
    assert len(w.harvest()) == 4
    w.pause_guest()
    w.harvest()
    w.sleep(1.0)
    assert len(w.harvest()) == 0  # paused: the ring rests too
    with pytest.raises(ValueError, match="io_pages"):
        SimWorld(GuestModel(npages=100, dirty_rate=0.0, working_set=0, io_pages=4), Costs())


def test_a_databases_samples_leave_out_its_io_ring_and_its_hot_pages_lie_in_runs() -> None:
    # page mode tells the ring's pages exactly; contig's are taken off at the ring's rate
    page = _report([(0.0, 1.0, NPAGES, NPAGES - 16), (1.5, 0.02, 30, 24)], batching="page",
                   cap=1)
    ring = IoRing(16, 300.0)
    contig = _report([(0.0, 1.0, NPAGES, 600), (1.05, 0.01, 30, 12), (1.07, 0.01, 12, 5)],
                     cap=64)
    # a full ring after the bulk's second; 6 of its pages in the 20 ms after
    assert dirty_samples([page, contig], ring) == [(1.5, 24), (1.05, 14), (pytest.approx(0.02), 6)]
    # a stop 20 ms after a sync: 4 ring pages, 26 private in 11 commands (2 of them the
    # VMSAs), 2 from the working set (a quarter of a run): the hot pages lie in 9 runs.
    # The round a second after the bulk is left out: its working set's pages swamp them
    stop = {"start": 1.07, "duration": 0.02, "pages": 32, "dirty_pages": 30, "commands": 11,
            "kind": "stop-and-copy", "throttle_pct": 0}
    ended = _report([(0.0, 1.0, NPAGES, 600), (1.05, 0.01, 120, 40)], cap=64)
    ended["rounds"].append(stop)
    curve = DirtyCurve(hot=26, ws=200, rate=100.0)
    assert hot_runs([ended], curve, run=8) == 9
    assert hot_runs([page], curve, run=8) == 1  # no contiguous round: one run
    w = SimWorld(GuestModel(npages=1000, dirty_rate=0.0, working_set=200, hot_pages=26,
                            hot_runs=9), Costs())
    w.start_dirty_log()
    w.sleep(0.01)
    hot = w.harvest()
    assert len(hot) == 26 and hot.max() == 799  # just below the working set
    assert np.count_nonzero(np.diff(hot) > 1) + 1 == 9  # in nine runs
    with pytest.raises(ValueError, match="hot_runs"):
        SimWorld(GuestModel(npages=1000, dirty_rate=0.0, working_set=200, hot_pages=4,
                            hot_runs=5), Costs())


def test_frames_in_flight_at_the_pause_finish_at_the_pace_of_the_cores_it_frees() -> None:
    # a guest that wants both cores: the frames' work runs 2x slower while it runs
    g = GuestModel(npages=4000, dirty_rate=0.0, working_set=0, cpu=2.0)
    costs = Costs(t_doorbell=0.0, t_cmd=1e-3, psp_bw=1e15, link_bw=1e12, cores=2.0,
                  pipeline_cores=2.0, window=64, slots=64)
    w = SimWorld(g, costs)
    w.start_dirty_log()
    k = w.contention()
    assert k == pytest.approx(2.0)
    pfns = np.arange(40, dtype=np.int64)
    for i in range(4):
        w.send_private(pfns[i * 10:(i + 1) * 10], np.arange(0, 11, dtype=np.int64), False)
    left = w._dst_free - w.clock  # the destination's work still queued, priced at 2x
    assert left > 0
    w.pause_guest()
    # the guest's cores came back: what was left takes half as long from the pause on
    assert w.contention() == pytest.approx(1.0)
    assert w._dst_free - w.clock == pytest.approx(max(left - costs.stop.pause, 0) / k)
    assert all(d <= w._dst_free for d in w._dst_done)
