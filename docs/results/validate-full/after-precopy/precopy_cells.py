"""The precopy cells of `cvmig model --validate`'s grid again, on the engine after the
precopy change: the same workloads, rates, sizes, modes and timeouts as the grid's run
(docs/results/validate-full); its other cells do not change with it.

    PYTHONPATH=src python docs/results/validate-full/after-precopy/precopy_cells.py OUT.json
"""

import json
import sys

from cvmig.bench.paper import MODES, _run
from cvmig.model.validate import FULL, MiB

RATES = {("none", 0.5): 3074, ("none", 1.5): 9223, ("sev-2020", 0.5): 176,
         ("sev-2020", 1.5): 529}  # pages/s, as the grid's run measured its baselines


def main(out: str) -> None:
    runs = []
    for profile in FULL.profiles:
        hw = profile != "none"
        for mem in FULL.hw_memories if hw else FULL.memories:
            for wname in FULL.hw_workloads if hw else FULL.workloads:
                if wname == "idle":
                    continue
                frac = float(wname[1:]) if wname.startswith("d") else 0.0
                wl = (f"dirtier:rate={RATES[(profile, frac)]},pattern=uniform" if frac
                      else "sqlite:accounts=200")
                for mode in FULL.modes:
                    for i in range(FULL.reps):
                        r = _run(wl, MODES[mode], "precopy", profile, mem * MiB,
                                 FULL.hw_timeout_s if hw else FULL.timeout_s, i)
                        r["row"]["dirty_fraction"] = frac
                        runs.append(r)
                        row = r["row"]
                        print(profile, mem, wname, mode, i, row.get("total_ms"),
                              row.get("downtime_ms"), row.get("switchover"), flush=True)
                        with open(out, "w") as f:
                            json.dump({"runs": runs}, f)


if __name__ == "__main__":
    main(sys.argv[1])
