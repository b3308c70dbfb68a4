"""Whole migrations driven through QMP, with the `qemu.qmp` client library unchanged.

A source `cvmig vm --qmp` and a destination `cvmig vm --incoming ... --qmp`, each with its
own PSP process, move a 32 MiB, 2-vCPU guest over loopback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from cvmig.monitor.testing import RawQMP, VmProcess

GUEST = ["--memory", "32M", "--vcpus", "2", "--workload", "dirtier:rate=2000,pattern=hotcold"]
DEADLINE_S = 60.0


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[VmProcess, VmProcess]]:
    dst = VmProcess(str(tmp_path / "dst.sock"), ["--incoming", "tcp:127.0.0.1:0"])
    try:
        src = VmProcess(str(tmp_path / "src.sock"), GUEST)
    except BaseException:
        dst.close()
        raise
    yield src, dst
    src.close()
    dst.close()


async def _poll(qmp: QMPClient, cmd: str, pred: Any, timeout: float = DEADLINE_S) -> Any:
    """Run ``cmd`` until ``pred`` holds on its return (deadline-bound); that return."""
    deadline = time.monotonic() + timeout
    while True:
        ret = await qmp.execute(cmd)
        if pred(ret):
            return ret
        assert time.monotonic() < deadline, f"{cmd} never got there; last: {ret}"
        await asyncio.sleep(0.02)  # spaces the polls; the deadline bounds the wait


async def _error_desc(qmp: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> str:
    with pytest.raises(ExecuteError) as e:
        await qmp.execute(cmd, args)
    assert e.value.error_class == "GenericError"
    return str(e.value)


async def _events_until(listener: Any, name: str, status: str) -> list[Any]:
    """Events from ``listener`` up to and including MIGRATION ``status``."""
    seen = []
    async with asyncio.timeout(DEADLINE_S):
        async for ev in listener:
            seen.append(ev)
            if ev["event"] == name and ev.get("data", {}).get("status") == status:
                return seen
    raise AssertionError("listener ended")


def test_qemu_qmp_drives_a_whole_migration(pair: tuple[VmProcess, VmProcess]) -> None:
    src_proc, dst_proc = pair

    async def main() -> None:
        src, dst = QMPClient("source"), QMPClient("destination")
        await src.connect(src_proc.qmp_path)
        await dst.connect(dst_proc.qmp_path)
        assert await dst.execute("query-status") == {"running": False, "status": "inmigrate"}
        assert await dst.execute("query-migrate") == {"status": "setup"}
        events = [{"capability": "events", "state": True}]
        await dst.execute("migrate-set-capabilities", {"capabilities": events})
        await src.execute("migrate-set-capabilities", {"capabilities": events + [
            {"capability": "auto-converge", "state": True}]})
        await src.execute("migrate-set-parameters", {
            "downtime-limit": 500, "cpu-throttle-initial": 30, "cpu-throttle-increment": 20,
            "x-batching": "contig", "x-queue": True})
        params = await src.execute("query-migrate-parameters")
        assert isinstance(params, dict)
        assert params["downtime-limit"] == 500 and params["x-batching"] == "contig"

        with src.listener(("MIGRATION", "MIGRATION_PASS", "STOP")) as src_ev, \
                dst.listener(("MIGRATION", "RESUME")) as dst_ev:
            assert await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{dst_proc.port}"}) == {}
            info = await _poll(src, "query-migrate",
                               lambda i: i.get("status") in ("completed", "failed"))
            assert info["status"] == "completed", info
            seen = await _events_until(src_ev, "MIGRATION", "completed")
            dst_seen = await _events_until(dst_ev, "MIGRATION", "completed")
            resume = await dst_ev.get()

        statuses = [e["data"]["status"] for e in seen if e["event"] == "MIGRATION"]
        assert statuses == ["setup", "active", "device", "completed"]
        passes = [e["data"]["pass"] for e in seen if e["event"] == "MIGRATION_PASS"]
        assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 2
        names = [e["event"] for e in seen]
        assert names.index("STOP") > statuses.index("device")  # downtime starts at device
        assert set(seen[0]["timestamp"]) == {"seconds", "microseconds"}

        assert info["downtime"] <= info["total-time"] and "expected-downtime" not in info
        assert info["setup-time"] >= 0
        ram = info["ram"]
        assert ram["transferred"] >= ram["total"] > 0 and ram["remaining"] == 0
        assert ram["dirty-sync-count"] == passes[-1]
        assert ram["page-size"] == 4096 and ram["mbps"] > 0
        assert info["x-psp"]["commands"] > 0
        assert info["x-throttle"] == "auto-converge"  # from the capability

        # the source has released the guest; the destination runs it
        assert await src.execute("query-status") == {"running": False,
                                                     "status": "postmigrate"}
        assert "migrated away" in await _error_desc(src, "cont")
        assert "no guest" in await _error_desc(src, "migrate", {"uri": "tcp:127.0.0.1:1"})
        assert [e["data"]["status"] for e in dst_seen if e["event"] == "MIGRATION"] == \
            ["active", "completed"]
        assert resume["event"] == "RESUME"
        assert await dst.execute("query-status") == {"running": True, "status": "running"}
        assert await dst.execute("query-migrate") == {"status": "completed"}
        await src.disconnect()
        await dst.disconnect()

    asyncio.run(main())


def test_cancel_mid_migration_then_migrate_again(pair: tuple[VmProcess, VmProcess]) -> None:
    """As QEMU's test_multifd_tcp_cancel: cancel while active, the guest runs on at the
    source, and the same source then migrates for real."""
    src_proc, dst_proc = pair
    uri = f"tcp:127.0.0.1:{dst_proc.port}"

    async def main() -> None:
        src, dst = QMPClient("source"), QMPClient("destination")
        await src.connect(src_proc.qmp_path)
        await dst.connect(dst_proc.qmp_path)
        # a destination before its guest arrives
        assert "waiting for an incoming migration" in await _error_desc(
            dst, "migrate", {"uri": "tcp:127.0.0.1:1"})
        assert "has not arrived" in await _error_desc(dst, "stop")
        assert await dst.execute("cont") == {}  # QEMU: autostart; cvmig starts it anyway
        assert await dst.execute("query-status") == {"running": False, "status": "inmigrate"}

        await src.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "events", "state": True}]})
        await src.execute("migrate-set-parameters", {"max-bandwidth": 16 << 20})  # ~2 s
        with src.listener("MIGRATION") as ev:
            await src.execute("migrate", {"uri": uri})
            info = await _poll(src, "query-migrate",
                               lambda i: i.get("status") == "active"
                               and i["ram"]["mbps"] > 0)  # a rate over the latest window
            assert info["total-time"] >= info["setup-time"]
            assert info["ram"]["mbps"] < 16 * 8.4 * 1.5  # max-bandwidth holds
            assert 0 < info["ram"]["remaining"] < info["ram"]["total"]
            assert "in progress" in await _error_desc(src, "cont")
            assert "in progress" in await _error_desc(src, "stop")
            assert "in progress" in await _error_desc(src, "migrate", {"uri": uri})
            assert await src.execute("query-status") == {"running": True, "status": "running"}
            assert await src.execute("migrate_cancel") == {}
            seen = await _events_until(ev, "MIGRATION", "cancelled")
        assert [e["data"]["status"] for e in seen][-2:] == ["cancelling", "cancelled"]
        assert await src.execute("query-migrate") == {"status": "cancelled"}
        assert await src.execute("query-status") == {"running": True, "status": "running"}
        # the destination threw the half-received guest away and listens again
        await _poll(dst, "query-migrate", lambda i: i.get("status") == "failed")
        assert await dst.execute("query-status") == {"running": False, "status": "inmigrate"}

        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await src.execute("migrate", {"uri": uri})
        info = await _poll(src, "query-migrate",
                           lambda i: i.get("status") in ("completed", "failed"))
        assert info["status"] == "completed", info
        await _poll(dst, "query-status", lambda s: s["running"])
        assert await dst.execute("query-migrate") == {"status": "completed"}
        await src.disconnect()
        await dst.disconnect()

    asyncio.run(main())


def test_a_received_guest_migrates_on(tmp_path: Path,
                                      pair: tuple[VmProcess, VmProcess]) -> None:
    """The destination's guest is a source-to-be: it moves on to a third host."""
    src_proc, dst_proc = pair
    third = VmProcess(str(tmp_path / "third.sock"), ["--incoming", "tcp:127.0.0.1:0"])
    try:
        with RawQMP(src_proc.qmp_path) as src, RawQMP(dst_proc.qmp_path) as dst, \
                RawQMP(third.qmp_path) as far:
            src.ok("migrate", {"uri": f"tcp:127.0.0.1:{dst_proc.port}"})
            assert _finished(src)["status"] == "completed"
            dst.poll("query-status", lambda s: s["running"])
            dst.ok("migrate-set-parameters", {"x-batching": "sg"})
            dst.ok("migrate", {"uri": f"tcp:127.0.0.1:{third.port}"})
            info = _finished(dst)
            assert info["status"] == "completed", info
            assert info["ram"]["transferred"] >= info["ram"]["total"]
            assert dst.ok("query-status") == {"running": False, "status": "postmigrate"}
            far.poll("query-status", lambda s: s["running"])
    finally:
        third.close()


def _finished(q: RawQMP) -> dict[str, Any]:
    return dict(q.poll("query-migrate", lambda i: i.get("status") in ("completed", "failed"),
                       timeout=DEADLINE_S))


def test_quit_mid_migration_rolls_back_and_exits(pair: tuple[VmProcess, VmProcess]) -> None:
    src_proc, dst_proc = pair
    with RawQMP(src_proc.qmp_path) as src, RawQMP(src_proc.qmp_path) as watcher, \
            RawQMP(dst_proc.qmp_path) as dst:
        watcher.ok("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
        src.ok("migrate-set-parameters", {"max-bandwidth": 16 << 20})
        src.ok("migrate", {"uri": f"tcp:127.0.0.1:{dst_proc.port}"})
        watcher.wait_event("MIGRATION", lambda d: d["status"] == "active")
        assert src.cmd("quit") == {"return": {}}
        assert watcher.wait_event("SHUTDOWN")["data"]["reason"] == "host-qmp-quit"
        watcher.wait_event("MIGRATION", lambda d: d["status"] == "cancelled")
        assert src_proc.wait(DEADLINE_S) == 0
        # the destination discarded what it had and waits for another try
        dst.poll("query-migrate", lambda i: i.get("status") == "failed")
        assert dst.ok("query-status") == {"running": False, "status": "inmigrate"}


def test_sigterm_shuts_down_cleanly(pair: tuple[VmProcess, VmProcess]) -> None:
    src_proc, _ = pair
    with RawQMP(src_proc.qmp_path) as q:
        src_proc.proc.terminate()
        assert q.wait_event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-signal"}
    assert src_proc.wait(DEADLINE_S) == 0
    assert not Path(src_proc.qmp_path).exists()
