"""The destination's deferred vCPU standby: its A/B (runs.jsonl beside this file, from
../precopy-ab/ab.py), the engine before (5360339) and after (5166dd9), run by run in
turn, on the 2-core VM of docs/results. The destination waits for its vCPU processes to
attach (25-40 ms here) before it imports the first frame; 5166dd9 let them attach while it
imported, and was reverted on this A/B (no shorter migration: the two share the cores).
Per cell (size, mode, workload; no throttle) the median migration time and downtime of
each; over all, the cells' ratios. summary.txt is its output; ab.log the runs as they went.
Another A/B's folder as its argument summarizes that one's runs.jsonl instead (--longest:
each side's longest downtime too; docs/results/landfirst-ab):

    python docs/results/precopy-ab/ab.py BEFORE 'idle;dirtier:rate=3000,pattern=uniform' \
        3 16,64,128 page,contig,sg docs/results/standby-ab/runs.jsonl none
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

args = [a for a in sys.argv[1:] if a != "--longest"]
longest = "--longest" in sys.argv[1:]
folder = Path(args[0]) if args else Path(__file__).parent
rows = [json.loads(line) for line in (folder / "runs.jsonl").open()]
cells: dict[tuple[int, str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
for r in rows:
    wl = r["workload"].split(":")[0]
    cells[(r["memory_mib"], r["mode"], wl)][r["version"]].append(r)

print(f"{'cell':<24} {'time before':>12} {'after':>8} {'ratio':>6}   "
      f"{'downtime before':>15} {'after':>7} {'ratio':>6}"
      + (f"   {'longest before':>14} {'after':>7}" if longest else ""))
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
          f"{db:>13.1f}ms {da:>5.1f}ms {da / db:>6.2f}"
          + (f"   {mb:>12.1f}ms {ma:>5.1f}ms" if longest else ""))
print(f"{len(cells)} cells, {len(rows)} migrations: migration time after/before, median cell "
      f"{statistics.median(time_ratios):.2f}x (shorter in "
      f"{sum(r < 1 for r in time_ratios)}); downtime {statistics.median(down_ratios):.2f}x "
      f"(shorter in {sum(r < 1 for r in down_ratios)})")
for size in sorted({k[0] for k in cells}):
    rs = [r for k, r in zip(sorted(cells), time_ratios, strict=True) if k[0] == size]
    print(f"  {size} MiB: migration time {statistics.median(rs):.2f}x at the median cell")
