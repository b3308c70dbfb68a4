"""Four migrations at once on one machine: four sources, four destinations (each with its
own secure processor), all complete and verify."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

PAIRS = 4


def test_four_concurrent_migrations_complete_and_verify(tmp_path: Path) -> None:
    t0 = time.monotonic()
    procs = []
    for i in range(PAIRS):
        workload = "idle" if i % 2 == 0 else "dirtier:rate=200"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cvmig", "migrate", "-m", "16M", "--vcpus", "1",
             "-w", workload, "--warmup", "0.2", "-q", "--json", str(tmp_path / f"{i}.json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    took = time.monotonic() - t0
    for i, (code, err) in enumerate(results):
        assert code == 0, f"migration {i}: exit {code}: {err[-2000:]}"
        report = json.loads((tmp_path / f"{i}.json").read_text())
        assert report["status"] == "completed"
        assert report["verify"]["memory"] == "match"
        assert report["verify"]["workload"]["ok"] is True
    assert took < 60.0, f"four migrations took {took:.1f} s"
