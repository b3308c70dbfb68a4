"""QMP conformance of `cvmig vm --qmp`: every command, and every kind of bad input or
wrong-state command answered with a QMP error while the VM keeps running.

Real processes: a source VM (32 MiB, 2 vCPUs, its own PSP process) per module, or per
test where the test needs a VM that has never migrated.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmig.monitor.testing import RawQMP, VmProcess

GUEST = ["--memory", "32M", "--vcpus", "2", "--workload", "dirtier:rate=2000,pattern=hotcold"]


def _start(path: Path) -> VmProcess:
    return VmProcess(str(path), GUEST)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmProcess]:
    proc = _start(tmp_path_factory.mktemp("qmp") / "vm.sock")
    yield proc
    proc.close()


@pytest.fixture
def fresh_vm(tmp_path: Path) -> Iterator[VmProcess]:
    proc = _start(tmp_path / "vm.sock")
    yield proc
    proc.close()


def _still_running(proc: VmProcess) -> None:
    assert proc.alive(), proc.stderr_text()
    with RawQMP(proc.qmp_path) as q:
        assert q.ok("query-status") == {"running": True, "status": "running"}


@pytest.fixture
def qmp(vm: VmProcess) -> Iterator[RawQMP]:
    with RawQMP(vm.qmp_path) as q:
        yield q
    _still_running(vm)  # whatever the test sent, the VM runs on


def _error(reply: dict, cls: str = "GenericError") -> str:
    assert "error" in reply and "return" not in reply, reply
    assert reply["error"]["class"] == cls, reply
    assert isinstance(reply["error"]["desc"], str)
    return str(reply["error"]["desc"])


# -- greeting and negotiation ----------------------------------------------------------

def test_greeting_and_capabilities_negotiation(vm: VmProcess) -> None:
    with RawQMP(vm.qmp_path, negotiate=False) as q:
        g = q.greeting["QMP"]
        assert g["capabilities"] == []
        assert set(g["version"]["qemu"]) == {"major", "minor", "micro"}
        assert "cvmig" in g["version"]["package"]
        r = q.cmd("query-status", id="before")
        assert _error(r, "CommandNotFound") == \
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        assert r["id"] == "before"
        assert "not available" in _error(q.cmd("qmp_capabilities", {"enable": ["oob"]}))
        assert q.cmd("qmp_capabilities", id=1) == {"return": {}, "id": 1}
        assert _error(q.cmd("qmp_capabilities"), "CommandNotFound") == \
            "Capabilities negotiation is already complete, command ignored"
        assert q.ok("query-status")["running"] is True
    _still_running(vm)


def test_query_version_and_commands(qmp: RawQMP) -> None:
    assert qmp.ok("query-version")["qemu"] == {"major": 10, "minor": 0, "micro": 0}
    names = {c["name"] for c in qmp.ok("query-commands")}
    assert {"qmp_capabilities", "query-status", "stop", "cont", "quit", "migrate",
            "migrate_cancel", "migrate-set-parameters", "query-migrate-parameters",
            "migrate-set-capabilities", "query-migrate-capabilities", "query-migrate",
            "query-qmp-schema", "migrate-incoming"} <= names
    # the schema lists exactly the commands there are (test_monitor_schema checks the rest)
    schema = qmp.ok("query-qmp-schema")
    assert {e["name"] for e in schema if e["meta-type"] == "command"} == names


# -- bad input -------------------------------------------------------------------------

def test_malformed_json_is_answered_and_the_connection_lives_on(qmp: RawQMP) -> None:
    for raw in ["garbage\n", '{"execute": }\n', "}\n", b"\xff\xfe\n", '{"execute": "x" "y"}\n']:
        r = qmp.send_raw(raw) or qmp.reply()
        assert _error(r).startswith("JSON parse error"), (raw, r)
        assert "id" not in r
    qmp.send_raw('{"execute":\n "query-status",\n "id": 5')  # one message over three lines
    qmp.send_raw("}")
    assert qmp.reply()["id"] == 5
    qmp.send_raw('{"execute": "query-status", "id": 1}{"execute": "query-status", "id": 2}\n')
    assert [qmp.reply()["id"], qmp.reply()["id"]] == [1, 2]


@pytest.mark.parametrize("raw, desc", [
    ("[1, 2]", "QMP input must be a JSON object"),
    ('"query-status"', "QMP input must be a JSON object"),
    ('{"arguments": {}}', "QMP input lacks member 'execute'"),
    ('{"execute": 5}', "QMP input member 'execute' must be a string"),
    ('{"execute": "query-status", "arguments": [1]}',
     "QMP input member 'arguments' must be an object"),
    ('{"execute": "query-status", "extra": 1}', "QMP input member 'extra' is unexpected"),
])
def test_bad_envelopes(qmp: RawQMP, raw: str, desc: str) -> None:
    qmp.send_raw(raw + "\n")
    assert _error(qmp.reply()) == desc


@pytest.mark.parametrize("msg_id", ["abc", 17, {"a": [1, None]}, None])
def test_unknown_command_echoes_id(qmp: RawQMP, msg_id: object) -> None:
    r = qmp.cmd("frobnicate", id=msg_id)
    assert _error(r, "CommandNotFound") == "The command frobnicate has not been found"
    assert r["id"] == msg_id
    assert qmp.cmd("query-status", id=msg_id)["id"] == msg_id


@pytest.mark.parametrize("cmd, args, desc", [
    ("query-status", {"verbose": True}, "Parameter 'verbose' is unexpected"),
    ("stop", {"now": 1}, "Parameter 'now' is unexpected"),
    ("cont", {"x": None}, "Parameter 'x' is unexpected"),
    ("migrate", {"uri": 5}, "Invalid parameter type for 'uri', expected: string"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "detach": "yes"},
     "Invalid parameter type for 'detach', expected: boolean"),
    ("migrate", {"url": "tcp:127.0.0.1:1"}, "Parameter 'url' is unexpected"),
    ("migrate_cancel", {"force": True}, "Parameter 'force' is unexpected"),
    ("query-migrate", {"x": 1}, "Parameter 'x' is unexpected"),
    # QEMU 10's words, checked against it in test_parameters
    ("migrate-set-parameters", {"downtime-limit": "300"},
     "Parameter 'downtime-limit' expects uint64"),
    ("migrate-set-parameters", {"downtime-limit": 300.5},
     "Parameter 'downtime-limit' expects uint64"),
    ("migrate-set-parameters", {"downtime-limit": -1},  # QEMU reads it as 2^64 - 1
     "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
    ("migrate-set-parameters", {"tls-creds": 5},
     "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
    ("migrate-set-parameters", {"cpu-throttle-initial": 300},
     "Parameter 'cpu-throttle-initial' expects uint8_t"),
    ("migrate-set-parameters", {"cpu-throttle-tailslow": 1},
     "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean"),
    ("migrate-set-parameters", {"x-batching": 2},
     "Invalid parameter type for 'x-batching', expected: string"),
    ("migrate-set-parameters", {"max-bandwidth": "fast"},
     "Parameter 'max-bandwidth' expects uint64"),
    ("migrate-set-parameters", {"warp": 9}, "Parameter 'warp' is unexpected"),
    ("migrate-set-capabilities", {}, "Parameter 'capabilities' is missing"),
    ("migrate-set-capabilities", {"capabilities": "events"},
     "Invalid parameter type for 'capabilities', expected: array"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": 1}]},
     "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ("query-migrate-parameters", {"all": True}, "Parameter 'all' is unexpected"),
    ("query-migrate-capabilities", {"all": True}, "Parameter 'all' is unexpected"),
])
def test_wrong_arguments(qmp: RawQMP, cmd: str, args: dict, desc: str) -> None:
    assert _error(qmp.cmd(cmd, args, id="a")) == desc


def test_bad_values_are_refused_and_change_nothing(qmp: RawQMP) -> None:
    before = qmp.ok("query-migrate-parameters")
    caps = qmp.ok("query-migrate-capabilities")
    for cmd, args, needle in [
        ("migrate-set-parameters", {"x-batching": "page", "x-batch-cap": 8}, "one page"),
        ("migrate-set-parameters", {"downtime-limit": 10, "max-cpu-throttle": 0},
         "max_cpu_throttle"),
        ("migrate-set-parameters", {"max-cpu-throttle": 15},  # below cpu-throttle-initial
         "Parameter 'max_cpu_throttle' expects an integer in the range of "
         "cpu_throttle_initial to 99"),
        ("migrate-set-parameters", {"x-throttle": "warp"}, "does not accept value 'warp'"),
        ("migrate-set-parameters", {"multifd-channels": 4}, "not supported by cvmig"),
        ("migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram",
                                                        "state": True}]}, "not supported"),
        ("migrate-set-capabilities", {"capabilities": [{"capability": "nope", "state": True}]},
         "does not accept value 'nope'"),
        ("migrate-set-capabilities", {"capabilities": [
            {"capability": "dirty-limit", "state": True},
            {"capability": "auto-converge", "state": True}]}, "dirty-limit conflicts"),
    ]:
        assert needle in _error(qmp.cmd(cmd, args)), (cmd, args)
    assert qmp.ok("query-migrate-parameters") == before
    assert qmp.ok("query-migrate-capabilities") == caps


# -- run state ---------------------------------------------------------------------------

def test_stop_and_cont_with_events(qmp: RawQMP) -> None:
    assert qmp.ok("query-status") == {"running": True, "status": "running"}
    assert qmp.ok("stop") == {}
    ev = qmp.wait_event("STOP")
    assert "data" not in ev
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert qmp.ok("query-status") == {"running": False, "status": "paused"}
    assert qmp.ok("stop") == {}  # as QEMU: nothing to do, no event
    r = qmp.cmd("migrate", {"uri": "tcp:127.0.0.1:1"})
    assert "'cont' it first" in _error(r)
    assert qmp.ok("query-status")["status"] == "paused"
    assert qmp.ok("cont") == {}
    qmp.wait_event("RESUME")
    assert qmp.ok("cont") == {}
    assert qmp.ok("query-status") == {"running": True, "status": "running"}
    assert not [e for e in qmp.events if e["event"] in ("STOP", "RESUME")]


def test_events_go_to_every_negotiated_client(vm: VmProcess) -> None:
    with RawQMP(vm.qmp_path) as a, RawQMP(vm.qmp_path) as b, \
            RawQMP(vm.qmp_path, negotiate=False) as c:
        a.ok("stop")
        a.ok("cont")
        for q in (a, b):
            stop, resume = q.wait_event("STOP"), q.wait_event("RESUME")
            t = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"])
                 for e in (stop, resume)]
            assert t[0] <= t[1]
        c.send_raw('{"execute": "qmp_capabilities"}\n')
        assert c.recv() == {"return": {}}  # nothing was queued for it before negotiating
    _still_running(vm)


# -- parameters and capabilities ---------------------------------------------------------

def test_parameters_roundtrip(qmp: RawQMP) -> None:
    defaults = qmp.ok("query-migrate-parameters")
    for name, value in [("downtime-limit", 300), ("max-bandwidth", 134217728),
                        ("throttle-trigger-threshold", 50), ("cpu-throttle-initial", 20),
                        ("cpu-throttle-increment", 10), ("cpu-throttle-tailslow", False),
                        ("max-cpu-throttle", 99), ("vcpu-dirty-limit", 1),
                        ("x-batching", "aead"), ("x-batch-cap", 0), ("x-queue", False),
                        ("x-throttle", "auto"), ("x-precopy-throttle", -1),
                        ("x-max-rounds", 0), ("x-timeout", 0.0),
                        ("x-timeout-action", "cancel")]:
        assert defaults[name] == value, name
    new = {"downtime-limit": 100, "max-bandwidth": 64 << 20, "cpu-throttle-initial": 30,
           "cpu-throttle-increment": 20, "cpu-throttle-tailslow": True,
           "max-cpu-throttle": 80, "x-batching": "contig", "x-batch-cap": 4, "x-queue": True,
           "x-throttle": "precopy", "x-precopy-throttle": 50, "x-timeout": 30}
    assert qmp.ok("migrate-set-parameters", new) == {}
    got = qmp.ok("query-migrate-parameters")
    assert {k: got[k] for k in new} == new
    assert qmp.ok("migrate-set-parameters", defaults) == {}  # a query result sets back
    assert qmp.ok("query-migrate-parameters") == defaults


def test_capabilities_roundtrip(qmp: RawQMP) -> None:
    caps = qmp.ok("query-migrate-capabilities")
    names = [c["capability"] for c in caps]
    assert {"xbzrle", "auto-converge", "events", "postcopy-ram", "multifd", "dirty-limit",
            "switchover-ack"} <= set(names)
    assert not any(c["state"] for c in caps)
    on = [{"capability": "events", "state": True}, {"capability": "auto-converge",
                                                     "state": True}]
    assert qmp.ok("migrate-set-capabilities", {"capabilities": on}) == {}
    state = {c["capability"]: c["state"] for c in qmp.ok("query-migrate-capabilities")}
    assert state["events"] and state["auto-converge"] and not state["xbzrle"]
    off = [dict(c, state=False) for c in on]
    qmp.ok("migrate-set-capabilities", {"capabilities": off})
    assert qmp.ok("query-migrate-capabilities") == caps


# -- migration: failures and wrong states ----------------------------------------------

def test_migrate_argument_and_address_errors(qmp: RawQMP) -> None:
    assert "tcp:HOST:PORT" in _error(qmp.cmd("migrate", {"uri": "udp:1.2.3.4:5"}))
    assert "'uri'" in _error(qmp.cmd("migrate", {}))
    assert "postcopy" in _error(qmp.cmd("migrate", {"uri": "tcp:127.0.0.1:1",
                                                    "resume": True}))
    assert "'channels'" in _error(qmp.cmd("migrate", {"channels": []}))
    assert qmp.ok("migrate_cancel") == {}  # nothing to cancel: QEMU succeeds too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_failed_migration_leaves_the_guest_running(fresh_vm: VmProcess) -> None:
    with RawQMP(fresh_vm.qmp_path) as q:
        assert q.ok("query-migrate") == {}  # QEMU: nothing before the first migration
        q.ok("migrate-set-capabilities", {"capabilities": [{"capability": "events",
                                                            "state": True}]})
        assert q.ok("migrate", {"uri": f"tcp:127.0.0.1:{_free_port()}"}) == {}
        q.wait_event("MIGRATION", lambda d: d["status"] == "setup")
        q.wait_event("MIGRATION", lambda d: d["status"] == "failed")
        info = q.ok("query-migrate")
        assert info["status"] == "failed" and "cannot connect" in info["error-desc"]
        assert set(info) == {"status", "error-desc"}
        assert q.ok("query-status") == {"running": True, "status": "running"}
    _still_running(fresh_vm)


def test_commands_in_the_wrong_state_during_a_migration(fresh_vm: VmProcess) -> None:
    # a destination that accepts and never speaks: the migration stays in setup
    with socket.create_server(("127.0.0.1", 0)) as silent, RawQMP(fresh_vm.qmp_path) as q:
        q.ok("migrate-set-capabilities", {"capabilities": [{"capability": "events",
                                                            "state": True}]})
        q.ok("migrate", {"uri": f"tcp:127.0.0.1:{silent.getsockname()[1]}"})
        q.wait_event("MIGRATION", lambda d: d["status"] == "setup")
        conn, _ = silent.accept()
        with conn:
            for cmd, args, needle in [
                ("cont", None, "while a migration is in progress"),
                ("stop", None, "while a migration is in progress"),
                ("migrate", {"uri": "tcp:127.0.0.1:1"}, "There's a migration process in progress"),
                ("migrate-set-capabilities", {"capabilities": [{"capability": "events",
                                                                "state": False}]},
                 "There's a migration process in progress"),
                # live ones may change (test_monitor_migration); these were agreed
                ("migrate-set-parameters", {"x-batching": "page"},
                 "Parameter 'x_batching' cannot change while a migration is in progress"),
                ("migrate-set-parameters", {"tls-creds": "/nonexistent"},
                 "cannot change while a migration is in progress"),
            ]:
                assert needle in _error(q.cmd(cmd, args, id=cmd)), cmd
            assert q.ok("query-status") == {"running": True, "status": "running"}
            assert q.ok("query-migrate") == {"status": "setup"}
            assert q.ok("query-migrate-parameters")["downtime-limit"] == 300
            assert q.ok("migrate_cancel") == {}
            q.wait_event("MIGRATION", lambda d: d["status"] == "cancelling")
            assert q.ok("query-migrate")["status"] == "cancelling"
            assert "in progress" in _error(q.cmd("cont"))
        # the destination goes away: the migration ends, cancelled, the guest unmoved
        q.wait_event("MIGRATION", lambda d: d["status"] == "cancelled")
        assert q.ok("query-migrate") == {"status": "cancelled"}
        assert q.ok("query-status") == {"running": True, "status": "running"}
        assert q.ok("migrate-set-parameters", {"downtime-limit": 200}) == {}
    _still_running(fresh_vm)


def test_quit_replies_then_shuts_down(fresh_vm: VmProcess) -> None:
    with RawQMP(fresh_vm.qmp_path) as q:
        r = q.cmd("quit", id="bye")
        assert r == {"return": {}, "id": "bye"}
        ev = q.wait_event("SHUTDOWN")
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        with pytest.raises(EOFError):
            q.recv()
    assert fresh_vm.wait(60) == 0
    assert not Path(fresh_vm.qmp_path).exists()


@pytest.mark.parametrize("args, needle", [
    (["--qmp", "tcp:127.0.0.1:4444"], "unix:PATH"),
    (["--qmp", "unix:/nonexistent-cvmig-dir/vm.sock"], "no folder"),
    (["--qmp", "unix:/tmp/cvmig-x.sock", "--incoming", "udp:1:2"], "tcp:HOST:PORT"),
    (["--qmp", "unix:/tmp/cvmig-x.sock", "--memory", "12345"], "multiple of 4096"),
    ([], "--qmp unix:PATH"),
    (["--incoming", "defer"], "--incoming defer needs --qmp"),
])
def test_cli_refuses_bad_options_before_starting(args: list[str], needle: str) -> None:
    r = subprocess.run([sys.executable, "-m", "cvmig", "vm", *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode in (1, 2), r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
