"""A stop behind frames in flight lets them land first when that pays: its A/B (runs.jsonl
beside this file, from ../precopy-ab/ab.py), the engine before (b861101) and after, run by
run in turn, on the 2-core VM of docs/results. Before, the rule let the frames in flight
land before the stop only when that shortened it by 1/12 of the limit (25 ms of 300); an
idle sg guest stopped behind its last 1 MiB frames in 4 of 9 runs of the issue's grid
(13-16 ms against 7-9). After, a stop about to be taken waits for them on the extra
round's terms (the stop after them at most 0.8 of this one, the wait under 1 s).
Per cell (size, mode, workload; no throttle) the median migration time and downtime of
each; over all, the cells' ratios. summary.txt is its output; ab.log the runs as they went:

    python docs/results/precopy-ab/ab.py BEFORE \
        'idle;dirtier:rate=2949,pattern=uniform;sqlite:accounts=200' \
        4 16,64 page,contig,sg docs/results/landfirst-ab/runs.jsonl none
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

rows = [json.loads(line) for line in (Path(__file__).parent / "runs.jsonl").open()]
cells: dict[tuple[int, str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
for r in rows:
    wl = r["workload"].split(":")[0]
    cells[(r["memory_mib"], r["mode"], wl)][r["version"]].append(r)

print(f"{'cell':<24} {'time before':>12} {'after':>8} {'ratio':>6}   "
      f"{'downtime before':>15} {'after':>7} {'ratio':>6}   {'longest before':>14} {'after':>7}")
time_ratios, down_ratios = [], []
for key in sorted(cells):
    v = cells[key]
    tb, ta = (statistics.median(x["total_ms"] for x in v[s]) for s in ("before", "after"))
    db, da = (statistics.median(x["downtime_ms"] for x in v[s]) for s in ("before", "after"))
    mb, ma = (max(x["downtime_ms"] for x in v[s]) for s in ("before", "after"))
    time_ratios.append(ta / tb)
    down_ratios.append(da / db)
    name = f"{key[0]} MiB {key[1]} {key[2]}"
    print(f"{name:<24} {tb:>10.0f}ms {ta:>6.0f}ms {ta / tb:>6.2f}   "
          f"{db:>13.1f}ms {da:>5.1f}ms {da / db:>6.2f}   {mb:>12.1f}ms {ma:>5.1f}ms")
print(f"{len(cells)} cells, {len(rows)} migrations: migration time after/before, median cell "
      f"{statistics.median(time_ratios):.2f}x (shorter in "
      f"{sum(r < 1 for r in time_ratios)}); downtime {statistics.median(down_ratios):.2f}x "
      f"(shorter in {sum(r < 1 for r in down_ratios)})")
for size in sorted({k[0] for k in cells}):
    rs = [r for k, r in zip(sorted(cells), time_ratios, strict=True) if k[0] == size]
    print(f"  {size} MiB: migration time {statistics.median(rs):.2f}x at the median cell")
