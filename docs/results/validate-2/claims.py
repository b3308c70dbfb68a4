"""The report's claims on a `model --validate` grid (runs.json), per guest size: converged
runs over the 300 ms limit (the guest-observed gap), and contig and sg against page at
the same profile, size, workload and throttle (time shorter; median downtime no longer;
worse in every pair of runs, "beyond spread"). Usage: python claims.py runs.json
"""
import collections
import json
import statistics as st
import sys
from pathlib import Path

runs = json.loads(Path(sys.argv[1]).read_text())["runs"]
c = collections.defaultdict(list)
conv = over = 0
for x in runs:
    r = x["row"]
    if r["status"] != "completed":
        continue
    if r["switchover"] == "converged":
        conv += 1
        over += r["gap_ms"] > 300
    c[(r["profile"], r["memory_mib"], r["workload"], r["throttle"], r["mode"])].append(r)
print(f"converged {conv}, gap over 300 ms: {over}")
t_ok = d_ok = n = beyond = 0
worse = []
for k in sorted({k[:4] for k in c}):
    page = c.get(k + ("page",))
    if not page:
        continue
    for m in ("contig", "sg"):
        b = c.get(k + (m,))
        if not b:
            continue
        n += 1
        t_ok += st.median(x["total_ms"] for x in b) < st.median(x["total_ms"] for x in page)
        db, dp = [x["downtime_ms"] for x in b], [x["downtime_ms"] for x in page]
        if st.median(db) <= st.median(dp):
            d_ok += 1
        else:
            worse.append((k, m, round(st.median(db), 1), round(st.median(dp), 1), min(db) > max(dp)))
            beyond += min(db) > max(dp)
print(f"{n} comparisons: time shorter {t_ok}, downtime <= page {d_ok}, worse {n - d_ok} ({beyond} beyond spread)")
for w in worse:
    print("  ", w)
