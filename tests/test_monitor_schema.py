"""query-qmp-schema: QEMU's format, exactly what cvmig implements, and every reply and
event held to it.

Without processes: the schema describes itself, its commands are the monitor's, its
parameters the table's; beside a real QEMU (when one is installed) every member QEMU's
schema requires of a command or event cvmig shares is required in cvmig's too. With
processes: a deferred destination (``--incoming defer``, then migrate-incoming) and a
source go through a whole migration, and every reply and event is checked against the
schema each monitor serves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmig.migration.parameters import TABLE
from cvmig.monitor.commands import COMMANDS
from cvmig.monitor.introspect import schema, validate
from cvmig.monitor.testing import RawQMP, VmProcess
from tests.test_monitor_migration import vm_pair

QEMU = shutil.which("qemu-system-x86_64")


def _by_name(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in entries}


def test_the_schema_describes_itself_in_qemus_format() -> None:
    s = schema()
    by = _by_name(s)
    assert len(by) == len(s)  # every name once
    assert by["0"] == {"name": "0", "members": [], "meta-type": "object"}  # as QEMU's
    assert validate(s, by["query-qmp-schema"]["ret-type"], s) == []
    commands = {e["name"] for e in s if e["meta-type"] == "command"}
    assert commands == set(COMMANDS) | {"qmp_capabilities"}
    for e in s:  # every reference resolves
        for key in ("arg-type", "ret-type", "element-type"):
            if key in e:
                assert e[key] in by, (e, key)


def test_the_parameters_are_the_tables() -> None:
    by = _by_name(schema())
    args = by[by["migrate-set-parameters"]["arg-type"]]["members"]
    ret = by[by["query-migrate-parameters"]["ret-type"]]["members"]
    names = [p.name for p in TABLE]
    assert [m["name"] for m in args] == names == [m["name"] for m in ret]
    assert all("default" in m for m in args)  # each optional in a set
    assert not any("default" in m for m in ret)  # each always in the reply
    tls = next(m for m in args if m["name"] == "tls-creds")
    assert by[tls["type"]]["meta-type"] == "alternate"  # QEMU's StrOrNull
    batching = next(m for m in args if m["name"] == "x-batching")
    assert by[batching["type"]]["values"] == ["page", "contig", "sg", "aead"]
    assert batching["features"] == ["unstable"]


def test_validate_finds_what_is_wrong() -> None:
    s = schema()
    by = _by_name(s)
    info = by["query-migrate"]["ret-type"]
    assert validate(s, info, {"status": "setup"}) == []
    assert validate(s, info, {"status": "warp"})  # not an enum value
    assert validate(s, info, {"bogus": 1})  # not in the schema
    assert validate(s, info, {"ram": {"transferred": 1}})  # required members missing
    assert validate(s, info, {"socket-address": [{"type": "inet", "host": "h",
                                                  "port": "1"}]}) == []
    assert validate(s, info, {"socket-address": [{"type": "inet", "host": "h"}]})


def _qemu_schema() -> list[dict[str, Any]]:
    assert QEMU is not None
    msgs = [{"execute": "qmp_capabilities"}, {"execute": "query-qmp-schema"},
            {"execute": "quit"}]
    out = subprocess.run([QEMU, "-machine", "none", "-nodefaults", "-display", "none",
                          "-qmp", "stdio"], input="".join(json.dumps(m) + "\n" for m in msgs),
                         capture_output=True, text=True, timeout=60).stdout
    replies = [json.loads(line) for line in out.splitlines()]
    return list(next(r["return"] for r in replies if isinstance(r.get("return"), list)))


def _required(by: dict[str, dict[str, Any]], name: str, path: str,
              out: dict[str, str], every: set[str] | None = None) -> None:
    """Every required member under type ``name``: path -> its json or meta type; all
    members' paths, required or not, into ``every``."""
    t = by[name]
    if t["meta-type"] == "array":
        _required(by, t["element-type"], path + "[]", out, every)
        return
    if t["meta-type"] != "object":
        return
    for m in t["members"]:
        sub = by[m["type"]]
        if "default" not in m:
            out[f"{path}.{m['name']}"] = sub.get("json-type", sub["meta-type"])
        if every is not None:
            every.add(f"{path}.{m['name']}")
        _required(by, m["type"], f"{path}.{m['name']}", out, every)


@pytest.mark.skipif(QEMU is None, reason="no qemu-system-x86_64 to compare with")
def test_every_member_qemu_requires_is_required_here() -> None:
    ours, theirs = _by_name(schema()), _by_name(_qemu_schema())
    shared = [n for n, e in ours.items() if e["meta-type"] in ("command", "event")
              and n in theirs]
    assert {"query-migrate", "migrate", "migrate-incoming", "query-status", "MIGRATION",
            "query-migrate-parameters", "query-qmp-schema"} <= set(shared)
    for n in shared:
        for key in ("ret-type", "arg-type"):
            if key not in ours[n]:
                continue
            want: dict[str, str] = {}
            have: dict[str, str] = {}
            every: set[str] = {n}
            _required(theirs, theirs[n][key], n, want)
            _required(ours, ours[n][key], n, have, every)
            if key == "arg-type":
                # an argument QEMU requires that we lack would refuse its callers (members
                # of an optional argument cvmig does not take are not QEMU callers' burden)
                top = {k for k in want if k.count(".") == 1}
                assert not top - set(have), (n, top - set(have))
                continue
            if n == "query-qmp-schema":
                continue  # the same SchemaInfo shape, checked by validate above
            for member, jtype in want.items():
                if member.rsplit(".", 1)[0].removesuffix("[]") not in every:
                    continue  # inside an optional member cvmig never sends (vfio, ...)
                assert member in have, f"{member} is required by QEMU's schema"
                assert have[member] == jtype, (member, have[member], jtype)
        # and no member of ours is one QEMU calls by another type
        if "arg-type" in ours[n]:
            qemu_args = {m["name"]: m for m in theirs[theirs[n]["arg-type"]]["members"]}
            for m in ours[ours[n]["arg-type"]]["members"]:
                if not m["name"].startswith("x-"):
                    assert m["name"] in qemu_args, (n, m["name"])


class CheckedQMP(RawQMP):
    """A raw client that checks every reply and event against the VM's own schema."""

    schema: list[dict[str, Any]] = []  # none until fetched: negotiation goes unchecked

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.schema = self.ok("query-qmp-schema")
        self.by = _by_name(self.schema)
        self.checked = 0

    def cmd(self, name: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        reply = super().cmd(name, args, **extra)
        if self.schema and "return" in reply:
            errors = validate(self.schema, self.by[name]["ret-type"], reply["return"], name)
            assert errors == [], errors
            self.checked += 1
        return reply

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        msg = super().recv(timeout)
        if self.schema and "event" in msg:
            errors = validate(self.schema, self.by[msg["event"]]["arg-type"],
                              msg.get("data", {}), msg["event"])
            assert errors == [], errors
            self.checked += 1
        return msg


@pytest.fixture
def deferred(tmp_path: Path) -> Iterator[tuple[VmProcess, VmProcess]]:
    yield from vm_pair(tmp_path, "defer")


def test_deferred_incoming_and_every_reply_in_the_schema(
        deferred: tuple[VmProcess, VmProcess]) -> None:
    src_proc, dst_proc = deferred
    assert dst_proc.ready["event"] == "deferred"
    with CheckedQMP(dst_proc.qmp_path) as dst, CheckedQMP(src_proc.qmp_path) as src:
        events = {"capabilities": [{"capability": "events", "state": True}]}
        for q in (src, dst):
            q.ok("migrate-set-capabilities", events)
            for cmd in ("query-version", "query-commands", "query-status", "query-migrate",
                        "query-migrate-parameters", "query-migrate-capabilities"):
                q.ok(cmd)
        # as QEMU's -incoming defer: waiting, nowhere yet, until migrate-incoming
        assert dst.ok("query-status") == {"running": False, "status": "inmigrate"}
        assert dst.ok("query-migrate") == {}
        assert src.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})["error"]["desc"] == \
            "'-incoming' was not specified on the command line"
        assert "'uri'" in dst.cmd("migrate-incoming", {})["error"]["desc"]
        assert "tcp:HOST:PORT" in dst.cmd("migrate-incoming", {"uri": "udp:x:1"})["error"]["desc"]
        dst.ok("migrate-set-parameters", {"downtime-limit": 400})  # before it listens
        assert dst.ok("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}) == {}
        assert dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})["error"]["desc"] == \
            "The incoming migration has already been started"
        info = dst.ok("query-migrate")
        assert info["status"] == "setup"
        [where] = info["socket-address"]
        assert where["type"] == "inet" and where["host"] == "127.0.0.1" and where["ipv4"]
        port = int(where["port"])
        assert port > 0  # the port it chose, as QEMU reports it
        dst.wait_event("MIGRATION", lambda d: d["status"] == "setup", timeout=5)

        src.ok("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        while src.ok("query-migrate").get("status") in ("setup", "active", "device"):
            dst.ok("query-migrate")  # every state's reply, checked
        src.wait_event("MIGRATION", lambda d: d["status"] == "completed", timeout=60)
        dst.wait_event("MIGRATION", lambda d: d["status"] == "completed", timeout=60)
        assert src.ok("query-migrate")["status"] == "completed"
        assert dst.ok("query-status") == {"running": True, "status": "running"}
        assert "socket-address" not in dst.ok("query-migrate")  # closed, as QEMU's
        assert dst.checked > 10 and src.checked > 10
