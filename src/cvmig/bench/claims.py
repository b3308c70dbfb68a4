"""The report's claims, checked against a `cvmig bench paper` grid.

Each claim is a comparison of medians in the same profile and workload; beside each, how
many of the comparisons go against it, and how many of those by more than the runs'
own spread (every run of the one mode against every run of the other), since a median of
three migrations on a shared machine moves by tens of ms on its own. The downtime-limit is
checked run by run, on the guest-observed gap.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

Key = tuple[str, str, str, str]  # profile, workload, mode, throttle


def by_config(results: list[dict[str, Any]]) -> dict[Key, list[dict[str, Any]]]:
    """The completed runs' rows, by profile, workload, mode and throttle."""
    out: dict[Key, list[dict[str, Any]]] = {}
    for r in results:
        row = r["row"]
        if row["status"] == "completed":
            out.setdefault((row["profile"], row["workload"], row["mode"], row["throttle"]),
                           []).append(row)
    return out


def _compare(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """``a`` against ``b`` on ``key``: the medians, and whether a is worse, and worse in
    every pair of runs (beyond the spread)."""
    xa, xb = [float(x[key]) for x in a], [float(x[key]) for x in b]
    ma, mb = statistics.median(xa), statistics.median(xb)
    return {"median": ma, "baseline": mb, "worse": ma > mb, "beyond_spread": min(xa) > max(xb)}


def check(results: list[dict[str, Any]], qemu_modes: set[str]) -> dict[str, Any]:
    groups = by_config(results)
    limit_runs: dict[str, list[dict[str, Any]]] = {"default": [], "qemu": []}
    unconverged: list[dict[str, Any]] = []
    for r in results:
        row, rep = r["row"], r["report"]
        if row["status"] != "completed" or rep is None:
            continue
        limit = float(rep["params"]["downtime-limit"])
        entry = {"profile": row["profile"], "workload": row["workload"], "mode": row["mode"],
                 "throttle": row["throttle"], "gap_ms": row["gap_ms"], "limit_ms": limit}
        if row["switchover"] != "converged":
            unconverged.append(entry)
            continue
        limit_runs["qemu" if row["mode"] in qemu_modes else "default"].append(entry)
    within = {rule: {"runs": len(rs), "within": sum(e["gap_ms"] <= e["limit_ms"] for e in rs),
                     "over": [e for e in rs if e["gap_ms"] > e["limit_ms"]]}
              for rule, rs in limit_runs.items()}

    batching: dict[str, list[dict[str, Any]]] = {"total_ms": [], "downtime_ms": []}
    throttling: list[dict[str, Any]] = []
    for (profile, wl, mode, thr), rows in groups.items():
        if mode != "page" and mode not in qemu_modes:
            base = groups.get((profile, wl, "page", thr))
            if base:
                for key in batching:
                    batching[key].append({"profile": profile, "workload": wl, "mode": mode,
                                          "throttle": thr, **_compare(rows, base, key)})
        if thr != "none":
            base = groups.get((profile, wl, mode, "none"))
            if base:
                throttling.append({"profile": profile, "workload": wl, "mode": mode,
                                   "throttle": thr,
                                   "dirty_fraction": rows[0].get("dirty_fraction", 0.0),
                                   **_compare(rows, base, "downtime_ms")})
    return {"downtime_limit": within, "unconverged": unconverged,
            "batching": batching, "throttling": throttling}


def echo_claims(c: dict[str, Any], echo: Callable[[str], None]) -> None:
    for rule, name in (("default", "the default switch-over rule"),
                       ("qemu", "QEMU's rule (contig-qemu)")):
        w = c["downtime_limit"][rule]
        if w["runs"]:
            echo(f"downtime-limit kept (guest-observed gap), {name}: {w['within']} of "
                 f"{w['runs']} converged runs ({100 * w['within'] / w['runs']:.0f} %)")
    if c["unconverged"]:
        echo(f"runs that never converged (forced at the timeout): {len(c['unconverged'])}")
    for key, what in (("total_ms", "migration time"), ("downtime_ms", "downtime")):
        cmp = c["batching"][key]
        worse = [x for x in cmp if x["worse"]]
        beyond = [x for x in worse if x["beyond_spread"]]
        echo(f"batching shortens {what}: {len(cmp) - len(worse)} of {len(cmp)} comparisons "
             f"with page (same profile, workload, throttle); worse in {len(worse)}, "
             f"beyond the runs' spread in {len(beyond)}")
        for x in beyond:
            echo(f"    {x['profile']} {x['workload']} {x['mode']} {x['throttle']}: "
                 f"{x['median']:.0f} vs page's {x['baseline']:.0f}")
    for t, where in ((c["throttling"], ""),
                     ([x for x in c["throttling"] if x["dirty_fraction"] >= 1.0],
                      " where the guest dirties at least what page moves")):
        worse = [x for x in t if x["worse"]]
        echo(f"throttling shortens downtime{where}: {len(t) - len(worse)} of {len(t)} "
             f"comparisons with no throttle; longer in {len(worse)}, beyond the spread in "
             f"{sum(x['beyond_spread'] for x in worse)}")
