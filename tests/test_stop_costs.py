"""The cost of stopping, measured by a real migration and counted by the next one."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmig.guest.vm import GuestConfig
from cvmig.guest.workloads import parse_workload
from cvmig.migration import stopcost
from cvmig.migration.driver import MigrationParams
from cvmig.migration.session import MigrateOptions, migrate_local_or_remote
from cvmig.psp.api import Batching

MiB = 1 << 20
PARTS = ("pause", "vcpu_state", "trailer", "finish", "grant")


def test_a_real_migration_measures_its_stop_and_holds_a_100_ms_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(stopcost.ENV, str(tmp_path / "stop-costs.json"))
    cfg = GuestConfig(memory=16 * MiB, vcpus=1, workload=parse_workload("idle"))
    params = MigrationParams(batching=Batching.AEAD, downtime_limit_ms=100)
    # the first migration on a fresh host counts pessimistic defaults (its idle guest
    # then stops as soon as what is in flight has landed) and measures; the second counts
    # what the first measured
    first = migrate_local_or_remote(MigrateOptions(guest=cfg, params=params, warmup_s=0.3))
    assert first["status"] == "completed"
    assert len(first["rounds"]) <= 3, "no empty rounds spinning while frames land"
    rep = migrate_local_or_remote(MigrateOptions(guest=cfg, params=params, warmup_s=0.3))
    assert rep["status"] == "completed"
    assert rep["verify"]["memory"] == "match"
    stop = rep["x-stop"]
    # every part of the stop was measured, on both hosts, and is what the next one counts
    measured = stop["costs-measured-ms"]
    assert all(measured[k] > 0 for k in PARTS), measured
    counted, n = stopcost.estimate("none", 1)
    assert n == 2
    assert rep["x-stop"]["costs-counted-ms"]["finish"] == first["x-stop"]["costs-measured-ms"]["finish"]
    both = (measured["finish"], first["x-stop"]["costs-measured-ms"]["finish"])
    assert min(both) - 0.01 <= counted.finish * 1000 <= max(both) + 0.01  # a quantile of them
    # the guest saw a pause within the limit, and the rule saw it coming; unless stopping
    # alone took longer (on a loaded 2-core machine the destination's vCPU restore takes
    # 50-130 ms): no switch-over rule can keep that promise, and the test says so
    fixed = sum(measured[k] for k in PARTS)
    if fixed > 90:
        pytest.xfail(f"the stop's fixed costs alone took {fixed:.0f} ms here ({measured})")
    assert rep["guest"]["observed-gap-ms"] <= 100, stop
    assert stop["expected-downtime-ms"] <= 100
