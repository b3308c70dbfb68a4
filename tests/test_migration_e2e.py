"""Live migration end to end: real PSP processes, real guest processes, real TCP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cvmig.guest.vm import GuestConfig
from cvmig.guest.workloads import parse_workload
from cvmig.migration.driver import MigrationParams
from cvmig.migration.session import MigrateOptions, migrate_local_or_remote
from cvmig.migration.throttle import ThrottleKind
from cvmig.psp.api import PAGE_SIZE, Batching

MiB = 1 << 20

WORKLOADS = {
    "idle": "idle",
    "dirtier": "dirtier:rate=3000,pattern=hotcold",
    "sqlite": "sqlite:accounts=200",
}


def _migrate(workload: str, mode: Batching, memory: int = 32 * MiB, **kw: object) -> dict:
    cfg = GuestConfig(memory=memory, vcpus=2, workload=parse_workload(workload))
    params = MigrationParams(batching=mode, **kw)  # type: ignore[arg-type]
    return migrate_local_or_remote(MigrateOptions(guest=cfg, params=params, warmup_s=0.3))


def _assert_good(rep: dict, memory: int) -> None:
    assert rep["status"] == "completed"
    assert rep["verify"]["memory"] == "match", rep["verify"]
    assert rep["verify"]["source-digest"] == rep["verify"]["destination-digest"]
    assert rep["verify"]["workload"]["ok"] is True, rep["verify"]["workload"]
    ram = rep["ram"]
    assert ram["total"] == memory - 2 * PAGE_SIZE  # RAM less the two VMSA pages
    assert ram["transferred"] >= ram["total"]
    assert ram["normal"] >= ram["total"] // PAGE_SIZE
    assert rep["rounds"][0]["kind"] == "bulk"
    assert rep["rounds"][-1]["kind"] == "stop-and-copy"
    assert rep["downtime"] <= rep["total-time"]
    # QEMU's whole ms, cut down, and the fraction (to the µs: 8.9996 ms reads 9.0 and 8)
    assert rep["downtime"] <= rep["x-downtime-ms"] < rep["downtime"] + 1.001
    # each sync's own time (a harvest, a decision), the stop's last: within the round gaps
    syncs, rounds = rep["x-sync-ms"], rep["rounds"]
    assert len(syncs) >= 2 and all(t > 0 for t in syncs)
    assert syncs[-1] <= rep["x-downtime-ms"]
    assert syncs[0] / 1000 <= rounds[1]["start"] - rounds[0]["start"] - rounds[0]["duration"]
    assert rep["guest"]["ops-per-s-after"] > 0 or "idle" in rep["guest"]["workload"]
    # the guest's own clock saw the whole pause, less at most the hosts' round trips to
    # its vCPUs (pausing them; resuming them, in the grant)
    m = rep["x-stop"]["costs-measured-ms"]
    seen = rep["guest"]["observed-gap-ms"]
    assert seen >= rep["x-downtime-ms"] - m["pause"] - m["grant"], (seen, rep["x-stop"])
    # how long the destination readied itself before its first import (the model's
    # dst_start): some time, and over well before the migration was
    ready = rep["x-host-cpu"]["destination-ready-s"]
    assert 0 < ready * 1000 < rep["total-time"], (ready, rep["total-time"])


@pytest.mark.parametrize("mode", [Batching.PAGE, Batching.CONTIG, Batching.SG])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_migration_moves_guest_exactly(workload: str, mode: Batching) -> None:
    rep = _migrate(WORKLOADS[workload], mode)
    _assert_good(rep, 32 * MiB)
    r0 = rep["rounds"][0]
    pages = r0["pages"]
    if mode is Batching.PAGE:
        assert r0["commands"] >= pages - 64  # shared pages skip the firmware
    elif mode is Batching.CONTIG:
        assert r0["commands"] <= pages // 4 + 64
    else:
        assert r0["commands"] <= pages // 256 + 64


def test_queue_mode_rings_fewer_doorbells() -> None:
    rep = _migrate(WORKLOADS["dirtier"], Batching.CONTIG, queue=True)
    _assert_good(rep, 32 * MiB)
    assert rep["psp"]["doorbells"] < rep["psp"]["commands"] // 10


def test_throttled_migration_records_throttle_and_completes() -> None:
    rep = _migrate(WORKLOADS["dirtier"], Batching.PAGE, throttle=ThrottleKind.PRECOPY)
    _assert_good(rep, 32 * MiB)
    assert rep["rounds"][0]["throttle_pct"] == 20
    assert rep["params"]["x-throttle"] == "precopy"


@pytest.mark.slow
def test_cli_migrate_writes_report(tmp_path: os.PathLike[str]) -> None:
    out = os.path.join(tmp_path, "rep.json")
    r = subprocess.run(
        [sys.executable, "-m", "cvmig", "migrate", "--memory", "32M", "--warmup", "0.2",
         "--batching", "contig", "--quiet", "--json", out],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        rep = json.load(f)
    _assert_good(rep, 32 * MiB)
    assert "cvmig migration" in r.stdout
    for key in ("status", "total-time", "downtime", "setup-time", "ram", "rounds", "psp",
                "guest", "verify", "machine"):
        assert key in rep
    for key in ("transferred", "total", "remaining", "normal", "normal-bytes",
                "dirty-sync-count", "mbps", "pages-per-second", "dirty-pages-rate"):
        assert key in rep["ram"]


def test_cli_rejects_bad_input_before_starting() -> None:
    for args, needle in [
        (["--memory", "12345"], "multiple of 4096"),
        (["--workload", "bogus"], "bogus"),
        (["--batching", "page", "--cap", "4"], "one page per command"),
        (["--to", "udp:1.2.3.4:5"], "tcp:HOST:PORT"),
        (["--psp-profile", "nope"], "nope"),
        (["--policy", "fly"], "fly"),
        (["--io-timeout", "0"], "--io-timeout"),
    ]:
        r = subprocess.run([sys.executable, "-m", "cvmig", "migrate", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_defaults_converge_and_report_progress_off_a_terminal(
    tmp_path: os.PathLike[str],
) -> None:
    """`cvmig migrate` with no tuning (as `make run`, on a small guest) uses the report's
    optimizations, converges and verifies; with stderr not a terminal it still says where
    it stands, in plain lines."""
    out = os.path.join(tmp_path, "rep.json")
    r = subprocess.run(
        [sys.executable, "-m", "cvmig", "migrate", "--memory", "32M", "--warmup", "0.2",
         "--json", out],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        rep = json.load(f)
    _assert_good(rep, 32 * MiB)
    assert rep["params"]["x-batching"] == "aead"
    assert rep["params"]["x-throttle"] == "auto-converge"
    assert rep["x-switchover"] == "converged"
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    assert any("active" in ln for ln in lines), r.stderr
    assert all(" s] " in ln and "%" in ln for ln in lines), lines
    assert "\x1b[" not in r.stderr  # no terminal control codes in a log


@pytest.mark.slow
def test_cli_timeout_cancels_with_advice() -> None:
    """The baseline cannot keep up with a guest that rewrites all its memory: the timeout
    cancels, says what to try, and the guest runs on at the source."""
    r = subprocess.run(
        [sys.executable, "-m", "cvmig", "migrate", "--memory", "32M", "--warmup", "0.2",
         "--batching", "page", "--throttle", "none", "--timeout", "2", "--quiet",
         "--workload", "dirtier:rate=400000,pattern=uniform"],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 1, r.stderr
    assert "not converged after 2 s" in r.stderr, r.stderr
    assert "Try:" in r.stderr and "--batching aead" in r.stderr
    assert "--throttle auto-converge" in r.stderr
    assert "nothing was lost" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("prestart", [True, False])
def test_destination_starts_its_vcpus_before_the_migration_comes(prestart: bool) -> None:
    """`cvmig vm --incoming` has its --vcpus vCPU processes up when it says it listens,
    and the guest that comes runs on them (none is started while the pages stream);
    --no-prestart starts them as it comes."""
    from cvmig.migration.session import DestinationProcess
    from tests.proctree import descendants

    def vcpus(pid: int) -> set[int]:
        return {p for p, cmd in descendants(pid).items() if "cvmig.guest.vcpu" in cmd}

    dest = DestinationProcess(extra=["--vcpus", "3", "--run-after", "30"] if prestart
                              else ["--no-prestart", "--run-after", "30"])
    try:
        ahead = vcpus(dest.pid)
        assert len(ahead) == (3 if prestart else 0)
        cfg = GuestConfig(memory=32 * MiB, vcpus=3, workload=parse_workload("idle"))
        rep = migrate_local_or_remote(MigrateOptions(guest=cfg, warmup_s=0.2), uri=dest.uri)
        assert rep["status"] == "completed" and rep["verify"]["memory"] == "match"
        running = vcpus(dest.pid)
        assert len(running) == 3
        assert (running == ahead) is prestart
    finally:
        dest.close()
