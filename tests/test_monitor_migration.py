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


def vm_pair(tmp_path: Path, incoming: str) -> Iterator[tuple[VmProcess, VmProcess]]:
    """A source `cvmig vm` with GUEST and a destination `--incoming incoming`, both QMP."""
    dst = VmProcess(str(tmp_path / "dst.sock"), ["--incoming", incoming])
    try:
        src = VmProcess(str(tmp_path / "src.sock"), GUEST)
    except BaseException:
        dst.close()
        raise
    yield src, dst
    src.close()
    dst.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[VmProcess, VmProcess]]:
    yield from vm_pair(tmp_path, "tcp:127.0.0.1:0")


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
        assert await dst.execute("query-migrate") == {"status": "setup", "socket-address": [
            {"port": str(dst_proc.port), "ipv4": True, "host": "127.0.0.1", "type": "inet"}]}
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

        statuses = [e["data"]["status"] for e in seen if e["event"] == "MIGRATION"]
        assert statuses == ["setup", "active", "device", "completed"]
        passes = [e["data"]["pass"] for e in seen if e["event"] == "MIGRATION_PASS"]
        assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 2
        # QEMU's order: the vCPUs stop, then the migration enters device
        names = [(e["event"], e.get("data", {}).get("status")) for e in seen]
        assert names.index(("STOP", None)) + 1 == names.index(("MIGRATION", "device"))
        assert set(seen[0]["timestamp"]) == {"seconds", "microseconds"}

        # the figures agree with the events: total-time is the setup -> completed interval,
        # downtime the source's STOP -> the destination's RESUME (one clock: one machine)
        def at(ev: Any) -> float:
            return float(ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6)

        setup_ev, done_ev = seen[0], seen[-1]
        stop_ev = next(e for e in seen if e["event"] == "STOP")
        resume_ev = next(e for e in dst_seen if e["event"] == "RESUME")
        assert abs(info["total-time"] - (at(done_ev) - at(setup_ev)) * 1000) < 50, info
        gap_ms = (at(resume_ev) - at(stop_ev)) * 1000
        # (the RESUME comes after the grant's trip and the vCPUs' resume: ~15 ms here)
        assert gap_ms > 0 and abs(info["downtime"] - gap_ms) < 100, (info["downtime"], gap_ms)
        # the guest's own view of the pause comes from the destination's check, shortly after
        later = await _poll(src, "query-migrate", lambda i: "x-guest-gap" in i)
        assert later["x-guest-gap"] >= 0
        assert later["total-time"] == info["total-time"]  # fixed at completed
        print(f"downtime {info['downtime']} ms, STOP->RESUME {gap_ms:.1f} ms, "
              f"guest gap {later['x-guest-gap']} ms, total {info['total-time']} ms")

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
        # QEMU's order at the destination: active, RESUME (the vCPUs run), completed
        assert [(e["event"], e.get("data", {}).get("status")) for e in dst_seen] == \
            [("MIGRATION", "active"), ("RESUME", None), ("MIGRATION", "completed")]
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


def test_parameters_change_live_and_take_effect(pair: tuple[VmProcess, VmProcess]) -> None:
    """virsh migrate-setspeed and migrate-setmaxdowntime, as QEMU takes them: during the
    migration, from its next send."""
    src_proc, dst_proc = pair
    with RawQMP(src_proc.qmp_path) as q:
        q.ok("migrate-set-capabilities", {"capabilities": [{"capability": "events",
                                                            "state": True}]})
        # 4 MiB/s: the 32 MiB bulk pass alone would take 8 s
        q.ok("migrate-set-parameters", {"max-bandwidth": 4 << 20})
        q.ok("migrate", {"uri": f"tcp:127.0.0.1:{dst_proc.port}"})
        q.wait_event("MIGRATION", lambda d: d["status"] == "active")
        info = q.poll("query-migrate", lambda i: i["ram"]["transferred"] > 1 << 20)
        # QEMU's conventions in the first pass: the sync that started dirty logging
        # counts, and the expected downtime is the limit until there is an estimate
        assert info["ram"]["dirty-sync-count"] == 1
        assert info["expected-downtime"] == 300
        assert info["ram"]["mbps"] < 60  # 4 MiB/s is 33.6 Mbit/s
        assert q.ok("migrate-set-parameters", {"downtime-limit": 1234}) == {}
        assert q.ok("query-migrate-parameters")["downtime-limit"] == 1234
        assert q.ok("query-migrate")["expected-downtime"] == 1234
        # the others were agreed with the destination: refused, nothing changed
        r = q.cmd("migrate-set-parameters", {"downtime-limit": 50, "x-batching": "page"})
        assert "x_batching' cannot change while a migration" in r["error"]["desc"]
        assert q.ok("query-migrate-parameters")["downtime-limit"] == 1234
        assert q.ok("migrate-set-parameters", {"x-batching": "aead"}) == {}  # no change
        assert q.ok("migrate-set-parameters", {"max-bandwidth": 0}) == {}  # unlimited now
        q.wait_event("MIGRATION", lambda d: d["status"] == "completed", timeout=DEADLINE_S)
        info = q.ok("query-migrate")
        assert info["status"] == "completed", info
        assert info["total-time"] < 6000, info  # the cap was lifted, mid-pass
        assert info["ram"]["dirty-sync-count"] >= 2

