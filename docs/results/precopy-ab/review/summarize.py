"""Medians of the review A/B's runs (runs.jsonl beside this file), before -> after."""

import json
import statistics
from collections import defaultdict
from pathlib import Path

rows = [json.loads(line) for line in (Path(__file__).parent / "runs.jsonl").open()]
cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
for r in rows:
    key = (r["memory_mib"], r["mode"], r["workload"].split(",")[0], r["throttle"])
    cells[key][r["version"]].append(r)


def med(runs: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in runs)


def span(runs: list[dict]) -> str:
    xs = [x["downtime_ms"] for x in runs]
    return f"{min(xs):.0f}-{max(xs):.0f}"


for key in sorted(cells):
    b, a = cells[key]["before"], cells[key]["after"]
    if not a or not b:
        continue
    mem, mode, wl, thr = key
    print(f"{mem:3} MiB {mode:6} {wl:22} {thr:8}: downtime {med(b, 'downtime_ms'):6.1f} -> "
          f"{med(a, 'downtime_ms'):6.1f} ms (runs {span(b)} -> {span(a)}), total "
          f"{med(b, 'total_ms'):6.0f} -> {med(a, 'total_ms'):6.0f} ms, final throttle "
          f"{med(b, 'final_throttle'):.0f} -> {med(a, 'final_throttle'):.0f} %, "
          f"n={len(b)},{len(a)}, verified {all(x['verified'] for x in a + b)}")
