"""The guest of a validation cell, from the engine's reports of its workload.

A dirtier has a rate knob: the model takes the rate it wrote at before the migration.
A database has none, and its dirty set is not a rate over all of memory: it rewrites a
few pages (its log and root pages) in every interval it runs, and its other pages fill
towards a working set. So its dirty set after ``t`` seconds is fitted, from the dirty
log's syncs, as ``hot + ws (1 - exp(-rate t / ws))``. Its pages lie together, so they
are dirtied in runs: their length is what the runs of contiguous commands show.

Every guest also writes an I/O record per vCPU timeslice to its shared ring, a page
after the other: an interval shorter than the ring's turn dirties only part of it. Its
pages cost no firmware command, so the curve is fitted to the private pages alone.

A busy guest also makes the stop dearer: its vCPUs ack the pause at the end of a
timeslice, and its workload's state takes longer to export and restore. The engine
measures each stop's parts; the model takes this workload's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cvmig.guest.vcpu import SLICE
from cvmig.guest.workloads import parse_workload
from cvmig.migration.stopcost import MEASURED_PARTS, StopCosts
from cvmig.model.world import GuestModel
from cvmig.psp.api import PAGE_SIZE


@dataclass(frozen=True)
class DirtyCurve:
    hot: int  # pages rewritten in every interval
    ws: int  # pages the rest of the writes fall on, uniformly
    rate: float  # pages/s of those writes, as the migration let the guest run

    def at(self, t: np.ndarray) -> np.ndarray:
        return self.hot + self.ws * (1.0 - np.exp(-self.rate * t / max(self.ws, 1)))


def dirty_samples(reports: list[dict[str, Any]], ring: IoRing | None = None
                  ) -> list[tuple[float, int]]:
    """(seconds between two syncs, private pages the later found dirty), over the rounds
    in which the guest ran unthrottled. The I/O ring's pages are not counted: where one
    page was one command (page batching), what went without one; elsewhere what the
    ring's rate says it wrote in the interval."""
    out: list[tuple[float, int]] = []
    for rep in reports:
        rounds, page = rep["rounds"], _one_page_commands(rep)
        for a, b in zip(rounds, rounds[1:], strict=False):
            if a.get("throttle_pct", 0) or b.get("throttle_pct", 0):
                continue
            dt = b["start"] - a["start"]
            if page:
                shared = b.get("pages", 0) - b.get("commands", 0)
            else:
                shared = ring.written(dt) if ring else 0
            private = int(b.get("dirty_pages", 0)) - shared
            if dt > 0 and private > 0:
                out.append((dt, private))
    return out


def fit_dirty_curve(samples: list[tuple[float, int]], npages: int) -> DirtyCurve | None:
    """The curve closest to the samples in relative terms: a grid search over the three
    parameters, then a finer one around the best (a few dozen samples: cheap). The hot
    pages are at most what a short interval finds, but not the fewest any did: a vCPU
    left off the cores for a timeslice wrote less than its transaction's pages."""
    if not samples:
        return None
    t = np.array([s[0] for s in samples])
    d = np.array([s[1] for s in samples], dtype=float)
    top = float(np.percentile(d, 25))
    hots = np.linspace(0, top, 24)
    wss, rates = np.geomspace(1, npages, 48), np.geomspace(1.0, 1e6, 72)
    best = _search(t, d, hots, wss, rates, npages)
    for _ in range(2):  # each pass: a step of the last grid either side, finer
        h, ws, r = best
        dh, kw, kr = hots[1] - hots[0] if len(hots) > 1 else 1.0, wss[1] / wss[0], rates[1] / rates[0]
        hots = np.linspace(max(h - dh, 0), min(h + dh, top), 9)
        wss = np.geomspace(max(ws / kw, 1), min(ws * kw, npages), 15)
        rates = np.geomspace(r / kr, r * kr, 15)
        best = _search(t, d, hots, wss, rates, npages)
    h, ws, r = best
    return DirtyCurve(int(round(h)), int(round(ws)), r)


def _search(t: np.ndarray, d: np.ndarray, hots: np.ndarray, wss: np.ndarray,
            rates: np.ndarray, npages: int) -> tuple[float, float, float]:
    best: tuple[float, float, float, float] | None = None
    r = rates[None, :, None]
    for hot in hots:
        ws = wss[wss <= npages - hot][:, None, None]
        pred = hot + ws * (1.0 - np.exp(-r * t[None, None, :] / ws))
        err = np.square(np.log(np.maximum(pred, 0.5) / d)).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        if best is None or err[i, j] < best[0]:
            best = (float(err[i, j]), float(hot), float(ws[i, 0, 0]), float(rates[j]))
    assert best is not None
    return best[1], best[2], best[3]


def run_length(reports: list[dict[str, Any]]) -> int:
    """Pages per run of the dirty set: its pages per command where contiguous batching
    (uncapped by a small cap) followed them, after the bulk (1 where none did)."""
    seen = [rnd["pages"] / rnd["commands"] for rep in reports if _runs_whole(rep)
            for rnd in rep["rounds"][1:] if rnd.get("commands")]
    return max(1, round(statistics.median(seen))) if seen else 1


@dataclass(frozen=True)
class IoRing:
    pages: int  # shared pages the guest writes its I/O records to, in turn
    rate: float  # records a second while it runs unthrottled

    def written(self, t: float) -> int:
        """Ring pages dirty after ``t`` seconds of the guest running."""
        return min(self.pages, round(self.rate * t))


def _one_page_commands(rep: dict[str, Any]) -> bool:
    return bool(rep.get("params", {}).get("x-batching") == "page")


def _runs_whole(rep: dict[str, Any]) -> bool:
    """Contiguous batching whose cap does not cut a database's runs: a command a run."""
    p = rep.get("params", {})
    return bool(p.get("x-batching") == "contig" and p.get("x-batch-cap", 0) >= 64
                and not p.get("x-queue"))


def hot_runs(reports: list[dict[str, Any]], curve: DirtyCurve, run: int) -> int:
    """How many runs the hot pages lie in: the commands contiguous batching (uncapped by a
    small cap) needed in the intervals too short for the working set to add many pages,
    less the runs those few pages make (1 where no interval was that short)."""
    seen = []
    for rep in reports:
        if not _runs_whole(rep):
            continue
        for a, b in zip(rep["rounds"], rep["rounds"][1:], strict=False):
            dt = b["start"] - a["start"]
            ws = float(curve.at(np.array([dt]))[0]) - curve.hot
            if dt <= 0 or not b.get("commands") or ws > curve.hot / 2:
                continue
            # the stop's VMSAs: a command and a page each, beyond the dirty pages
            vmsas = b["pages"] - b["dirty_pages"] if b.get("kind") == "stop-and-copy" else 0
            seen.append(b["commands"] - vmsas - ws / run)
    if not seen or not curve.hot:
        return 1
    return int(min(max(round(statistics.median(seen)), 1), curve.hot))


def io_ring(reports: list[dict[str, Any]], vcpus: int) -> IoRing:
    """The guest's I/O ring: what the rounds after the bulk sent without a firmware
    command where one page was one command is shared. The ring is the most such a round
    sent; its rate what the intervals too short to fill it show (a record per vCPU
    timeslice, as the engine's guests write, where none was that short)."""
    seen = [(b["start"] - a["start"], b["pages"] - b["commands"])
            for rep in reports if _one_page_commands(rep)
            for a, b in zip(rep["rounds"], rep["rounds"][1:], strict=False)
            if b.get("pages") and b["start"] > a["start"]]
    pages = max((n for _, n in seen), default=0)
    if not pages:
        return IoRing(0, 0.0)
    short = [n / dt for dt, n in seen if 0 < n < pages]
    return IoRing(pages, statistics.median(short) if short else vcpus / SLICE)


def guest_from_reports(workload: str, memory: int, reports: list[dict[str, Any]],
                       vcpus: int, pooled: list[dict[str, Any]] | None = None) -> GuestModel:
    """The guest the engine's runs of a cell saw (their medians). ``pooled``: every
    report of this workload at this size and profile, for what is the workload's own and
    not the cell's (a database's dirty-set curve)."""
    npages = memory // PAGE_SIZE - vcpus  # the VMSA pages move apart
    spec = parse_workload(workload)
    cpu = [float(r["guest"].get("cpu-cores-before") or 0.0) for r in reports]
    ring = io_ring(pooled or reports, vcpus) if spec.kind != "idle" else IoRing(0, 0.0)
    guest = GuestModel(npages=npages, dirty_rate=0.0, working_set=0, vcpus=vcpus,
                       cpu=statistics.median(cpu) if cpu else 0.0, shared_pages=ring.pages,
                       io_pages=ring.pages, io_rate=ring.rate)
    if spec.kind == "dirtier":
        rate = float(spec.get("rate"))
        before = [float(r["guest"]["ops-per-s-before"]) for r in reports
                  if r["guest"]["ops-per-s-before"] > 0]
        if before:
            # what the guest wrote before the migration began (its vCPUs share two cores
            # with everything else here, and may fall short of the rate asked for)
            rate = min(rate, statistics.median(before))
        return replace(guest, dirty_rate=rate, working_set=npages if rate else 0)
    if spec.kind == "idle":
        return guest
    curve = fit_dirty_curve(dirty_samples(pooled or reports, ring), npages)
    if curve is None:
        return guest
    run = min(run_length(pooled or reports), curve.ws)
    return replace(guest, dirty_rate=curve.rate, working_set=curve.ws, hot_pages=curve.hot,
                   hot_runs=hot_runs(pooled or reports, curve, run), run_pages=run,
                   rate_under_load=True)


def _measured_stops(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stop costs (ms, part by part) of each report that measured its stop."""
    return [r["x-stop"]["costs-measured-ms"] for r in reports
            if r.get("x-stop") and r["x-stop"].get("costs-measured-ms")]


def stop_samples(reports: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Seconds each part of the stop took in each of the reports that measured it."""
    out: dict[str, list[float]] = {}
    for name in MEASURED_PARTS:
        xs = [m.get(name) for m in _measured_stops(reports)]
        got = [float(x) / 1000 for x in xs if x is not None]
        if got:
            out[name] = got
    return out


def workload_stop(calibrated: StopCosts, reports: list[dict[str, Any]]) -> StopCosts:
    """The stop costs this workload's stops measured: the medians of its reports, part by
    part, scaled so that together they are the median stop, not the sum of the parts'
    medians (a stall lengthens one part of one stop, so the parts' medians add up short:
    the model's downtime ran 9.5 % short at the median on the issue's fifth grid); the
    calibrated (idle) ones where they did not measure a part."""
    samples = stop_samples(reports)
    if not samples:
        return calibrated
    medians = {k: statistics.median(v) for k, v in samples.items()}
    stops = [sum(float(m.get(k) or 0.0) / 1000 for k in samples)
             for m in _measured_stops(reports)]
    parts = sum(medians.values())
    f = statistics.median(stops) / parts if parts > 0 else 1.0
    return replace(calibrated, **{k: v * f for k, v in medians.items()})
