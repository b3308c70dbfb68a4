"""The one-more-round lookahead's A/B (runs.jsonl beside this file, from
../precopy-ab/ab.py): the engine before (d5dc1c2) and after (0bf31cb), run by run in turn,
on the 2-core VM of docs/results. Per cell the median downtime and its runs' range, and the
median migration time; over all, the medians' ratios and how far a cell's runs spread.
summary.txt is its output; ab.log the runs as they went:

    python docs/results/precopy-ab/ab.py BEFORE \
        'dirtier:rate=5171,pattern=uniform;dirtier:rate=15512,pattern=uniform' 4 16,64 \
        page,contig,sg docs/results/lookahead-ab/runs.jsonl none,precopy
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

rows = [json.loads(line) for line in (Path(__file__).parent / "runs.jsonl").open()]
cells: dict[tuple[int, str, str, str, str], list[dict]] = defaultdict(list)
for r in rows:
    rate = r["workload"].split(",")[0].split("=")[1]
    cells[(r["memory_mib"], r["mode"], rate, r["throttle"], r["version"])].append(r)


def med(runs: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in runs)


def spread(runs: list[dict]) -> float:
    """Half the runs' downtime range over their median."""
    xs = [x["downtime_ms"] for x in runs]
    return (max(xs) - min(xs)) / 2 / statistics.median(xs)


down, total, spreads = [], [], {"before": [], "after": []}
print("cell (MiB mode rate throttle): downtime median (range) before -> after, ms; "
      "total time median before -> after, ms; runs")
for key in sorted({k[:4] for k in cells}):
    b, a = cells[(*key, "before")], cells[(*key, "after")]
    if not a or not b:
        continue

    def show(runs: list[dict]) -> str:
        xs = [x["downtime_ms"] for x in runs]
        return f"{statistics.median(xs):6.1f} ({min(xs):.0f}-{max(xs):.0f})"

    timeouts = sum(x["switchover"] == "timeout" for x in a + b)
    mem, mode, rate, thr = key
    print(f"{mem:3} {mode:6} {rate:>5} {thr:8}: {show(b)} -> {show(a)}; "
          f"{med(b, 'total_ms'):6.0f} -> {med(a, 'total_ms'):6.0f}; n={len(b)},{len(a)}"
          + (f" ({timeouts} timed out)" if timeouts else ""))
    if timeouts:
        continue  # a forced stop at the timeout: no rule of the driver's chose it
    down.append(med(a, "downtime_ms") / med(b, "downtime_ms"))
    total.append(med(a, "total_ms") / med(b, "total_ms"))
    spreads["before"].append(spread(b))
    spreads["after"].append(spread(a))

print(f"\n{len(down)} converged cells (those that timed out left out):")
print(f"downtime after/before: median {statistics.median(down):.2f}x, geometric mean "
      f"{statistics.geometric_mean(down):.2f}x, shorter in {sum(d < 1 for d in down)}, "
      f"longer in {sum(d > 1 for d in down)}")
print(f"migration time after/before: median {statistics.median(total):.2f}x, geometric "
      f"mean {statistics.geometric_mean(total):.2f}x")
for ver, xs in spreads.items():
    print(f"{ver:6}: a cell's downtime spread (half its range over its median): median "
          f"{statistics.median(xs):.0%}, max {max(xs):.0%}")
