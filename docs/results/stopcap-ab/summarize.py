"""The stop cap's A/B (runs.jsonl beside this file, from ../precopy-ab/ab.py): sg on the
dirtier, the engine before (a83a3bc) and after (4244eab), run by run in turn, on the 2-core
VM of docs/results. Per cell the median downtime and its runs' range, and, over all, the
stops made in one-page commands and the longest. summary.txt is its output; ab.log the
runs as they went:

    python docs/results/precopy-ab/ab.py BEFORE \
        'dirtier:rate=3074,pattern=uniform;dirtier:rate=9223,pattern=uniform' 5 16,64,128 sg \
        docs/results/stopcap-ab/runs.jsonl none,precopy
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

rows = [json.loads(line) for line in (Path(__file__).parent / "runs.jsonl").open()]
cells: dict[tuple[int, str, str, str], list[dict]] = defaultdict(list)
for r in rows:
    cells[(r["memory_mib"], r["workload"].split(",")[0], r["throttle"], r["version"])].append(r)

for mem, wl, thr in sorted({k[:3] for k in cells}):
    b, a = cells[(mem, wl, thr, "before")], cells[(mem, wl, thr, "after")]

    def show(runs: list[dict]) -> str:
        xs = [x["downtime_ms"] for x in runs]
        return f"{statistics.median(xs):5.1f} ({min(xs):.0f}-{max(xs):.0f})"

    print(f"{mem:4} MiB {wl:19} {thr:8}: downtime {show(b)} -> {show(a)} ms, total "
          f"{statistics.median(x['total_ms'] for x in b):5.0f} -> "
          f"{statistics.median(x['total_ms'] for x in a):5.0f} ms, n={len(b)},{len(a)}")

for ver in ("before", "after"):
    rs = [r for r in rows if r["version"] == ver]
    one = [r for r in rs if r["stop_cap"] == 1 and r["stop_pages"] > 1]
    dts = sorted(r["downtime_ms"] for r in rs)
    ones = ", ".join(f"{r['downtime_ms']:.0f} ms" for r in one) or "-"
    print(f"{ver:6}: {len(rs)} runs, {len(one)} stopped in one-page commands ({ones}); "
          f"downtime median {statistics.median(dts):.1f}, 90th percentile "
          f"{dts[int(0.9 * len(dts))]:.1f}, max {dts[-1]:.1f} ms; "
          f"verified {all(r['verified'] for r in rs)}")
