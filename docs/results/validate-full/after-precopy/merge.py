"""runs.json here: the grid's runs without a throttle (docs/results/validate-full) and the
precopy cells run again (precopy_cells.py's output).

    python docs/results/validate-full/after-precopy/merge.py PRECOPY.json OUT/runs.json
"""

import json
import sys
from pathlib import Path

grid = json.loads((Path(__file__).parent.parent / "runs.json").read_text())
again = json.loads(Path(sys.argv[1]).read_text())["runs"]
kept = [r for r in grid["runs"] if r["row"]["throttle"] != "precopy"]
meta = {**grid["meta"], "source": "model --validate; its precopy cells run again after the "
        "precopy change (f4529ad)"}
Path(sys.argv[2]).write_text(json.dumps({"meta": meta, "runs": kept + again}, indent=1))
print(len(kept), len(again))
