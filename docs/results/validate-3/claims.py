"""The report's claims on a `model --validate` grid (runs.json), guest size by guest size
(`cvmig bench paper`'s check keys its comparisons by profile and workload, and this grid
runs the same workloads at 16, 64 and 128 MiB): the downtime-limit kept on the
guest-observed gap, and contig and sg against page at the same profile, size, workload
and throttle. Usage: python claims.py runs.json
"""

import json
import sys
from pathlib import Path

from cvmig.bench.claims import check, echo_claims

runs = json.loads(Path(sys.argv[1]).read_text())["runs"]
for mem in sorted({r["row"]["memory_mib"] for r in runs}):
    print(f"{mem} MiB:")
    echo_claims(check([r for r in runs if r["row"]["memory_mib"] == mem], set()),
                lambda line: print("  " + line))
