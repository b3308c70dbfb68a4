"""The report's claims checked on a grid's results (hand-written rows: pure bookkeeping)."""

from __future__ import annotations

from typing import Any

from cvmig.bench.claims import check


def _r(mode: str, throttle: str, downtime: float, gap: float, total: float = 1000,
       switchover: str = "converged", workload: str = "w", frac: float = 2.0) -> dict[str, Any]:
    row = {"profile": "none", "workload": workload, "mode": mode, "throttle": throttle,
           "status": "completed", "switchover": switchover, "downtime_ms": downtime,
           "gap_ms": gap, "total_ms": total, "dirty_fraction": frac}
    return {"row": row, "report": {"params": {"downtime-limit": 300}}}


def test_claims_count_the_limit_per_rule_and_compare_medians_with_the_spread() -> None:
    runs = [_r("page", "none", d, d + 20, 4000) for d in (100, 120, 140)]
    # contig: a worse median, but within page's spread; sg: better everywhere
    runs += [_r("contig", "none", d, d + 20, 2000) for d in (110, 130, 150)]
    runs += [_r("sg", "none", d, d + 20, 500) for d in (10, 12, 14)]
    # QEMU's rule: over the limit once, and never compared as a batching mode
    runs += [_r("contig-qemu", "none", d, d + 20, 2000) for d in (250, 270, 400)]
    # a throttle that lengthens the stop beyond every run without it
    runs += [_r("page", "precopy", d, d + 20, 3000) for d in (150, 160, 170)]
    runs.append(_r("page", "auto-converge", 900, 950, 9000, switchover="timeout"))
    runs.append({"row": {**runs[0]["row"], "status": "failed"}, "report": None})
    c = check(runs, {"contig-qemu"})
    assert c["downtime_limit"]["default"]["runs"] == 12  # the forced and failed runs are out
    assert c["downtime_limit"]["default"]["within"] == 12
    q = c["downtime_limit"]["qemu"]
    assert (q["runs"], q["within"]) == (3, 2) and q["over"][0]["gap_ms"] == 420
    assert len(c["unconverged"]) == 1
    down = {x["mode"]: x for x in c["batching"]["downtime_ms"]}
    assert set(down) == {"contig", "sg"}
    assert down["contig"]["worse"] and not down["contig"]["beyond_spread"]
    assert not down["sg"]["worse"]
    assert not any(x["worse"] for x in c["batching"]["total_ms"])
    thr = {x["throttle"]: x for x in c["throttling"]}
    assert set(thr) == {"precopy", "auto-converge"}
    assert thr["precopy"]["worse"] and thr["precopy"]["beyond_spread"]
