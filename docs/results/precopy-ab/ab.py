"""A/B of the precopy change (f4529ad): the engine before and after, run by run in turn.

Each run is a real local migration (`cvmig.bench.paper._run`) in a fresh interpreter whose
PYTHONPATH is one of two checkouts. Usage (from the repository root, with a checkout of
the commit before at BEFORE):

    python docs/results/precopy-ab/ab.py BEFORE WORKLOAD REPS SIZES MODES OUT.jsonl
"""

import json
import os
import subprocess
import sys

CODE = r"""
import json, sys
from cvmig.bench.paper import _run, MODES
r = _run(sys.argv[1], MODES[sys.argv[2]], "precopy", "none", int(sys.argv[3]) << 20, 15.0, 0)
row = r["row"]
if r["report"]:
    row["throttles"] = [x["throttle_pct"] for x in r["report"]["rounds"]]
print(json.dumps(row))
"""


def main() -> None:
    before, wl, reps, sizes, modes, out_path = sys.argv[1:7]
    trees = {"before": before, "after": os.getcwd()}
    with open(out_path, "a") as out:
        for rep in range(int(reps)):
            for size in sizes.split(","):
                for mode in modes.split(","):
                    order = ("before", "after") if rep % 2 == 0 else ("after", "before")
                    for ver in order:
                        env = dict(os.environ, PYTHONPATH=trees[ver] + "/src")
                        p = subprocess.run([sys.executable, "-c", CODE, wl, mode, size],
                                           env=env, capture_output=True, text=True,
                                           timeout=300, check=True)
                        row = json.loads(p.stdout.strip().splitlines()[-1])
                        row["version"] = ver
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        print(ver, size, mode, row.get("total_ms"), row.get("downtime_ms"),
                              row.get("switchover"), row.get("throttles"), flush=True)


if __name__ == "__main__":
    main()
