"""A/B of the precopy change (f4529ad): the engine before and after, run by run in turn.
(Also the stop cap's A/B, docs/results/stopcap-ab/, which added the stop's cap and size.)

Each run is a real local migration (`cvmig.bench.paper._run`) in a fresh interpreter whose
PYTHONPATH is one of two checkouts. Usage (from the repository root, with a checkout of
the commit before at BEFORE):

    python docs/results/precopy-ab/ab.py BEFORE 'WORKLOAD;...' REPS SIZES MODES OUT.jsonl \
        [THROTTLES]   # default precopy
"""

import itertools
import json
import os
import subprocess
import sys

CODE = r"""
import json, sys
from cvmig.bench.paper import _run, MODES
r = _run(sys.argv[1], MODES[sys.argv[2]], sys.argv[4], "none", int(sys.argv[3]) << 20, 15.0, 0)
row = r["row"]
if r["report"]:
    row["throttles"] = [x["throttle_pct"] for x in r["report"]["rounds"]]
    last = r["report"]["rounds"][-1]
    row["stop_cap"] = r["report"]["x-stop"]["cap"]
    row["stop_pages"], row["stop_commands"] = last["dirty_pages"], last["commands"]
print(json.dumps(row))
"""


def main() -> None:
    before, wls, reps, sizes, modes, out_path = sys.argv[1:7]
    throttles = sys.argv[7].split(",") if len(sys.argv) > 7 else ["precopy"]
    trees = {"before": before, "after": os.getcwd()}
    with open(out_path, "a") as out:
        for rep in range(int(reps)):
            for size, mode, wl, thr in itertools.product(sizes.split(","), modes.split(","),
                                                         wls.split(";"), throttles):
                order = ("before", "after") if rep % 2 == 0 else ("after", "before")
                for ver in order:
                    env = dict(os.environ, PYTHONPATH=trees[ver] + "/src")
                    p = subprocess.run([sys.executable, "-c", CODE, wl, mode, size, thr],
                                       env=env, capture_output=True, text=True,
                                       timeout=300, check=True)
                    row = json.loads(p.stdout.strip().splitlines()[-1])
                    row["version"] = ver
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(ver, size, mode, wl, thr, row.get("total_ms"), row.get("downtime_ms"),
                          row.get("switchover"), row.get("throttles"), flush=True)


if __name__ == "__main__":
    main()
