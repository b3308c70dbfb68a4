"""The QMP commands this monitor knows: name -> argument schema and handler.

Handlers run on a worker thread (a guest pause is an RPC to its vCPU processes), never on
the monitor's event loop, and return the ``return`` member of the reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cvmig.monitor.introspect import schema
from cvmig.monitor.machine import Machine
from cvmig.monitor.protocol import QEMU_VERSION, QMPError
from cvmig.monitor.schema import Schema

Handler = Callable[[Machine, dict[str, Any]], Any]


@dataclass(frozen=True)
class Command:
    run: Handler
    schema: Schema | None  # None: the handler checks its own arguments


def _returns_nothing(method: Callable[[Machine], None]) -> Handler:
    def run(m: Machine, a: dict[str, Any]) -> dict[str, Any]:
        method(m)
        return {}

    return run


def _migrate(m: Machine, a: dict[str, Any]) -> dict[str, Any]:
    if a.get("resume"):
        raise QMPError("'resume' recovers a paused postcopy migration; cvmig does pre-copy only")
    if "channels" in a:
        raise QMPError("cvmig takes the destination as 'uri' (tcp:HOST:PORT), not 'channels'")
    if "uri" not in a:
        raise QMPError("need either 'uri' or 'channels' argument")  # QEMU's words
    m.migrate(a["uri"])  # 'detach' is accepted and ignored, as QEMU does
    return {}


def _migrate_incoming(m: Machine, a: dict[str, Any]) -> dict[str, Any]:
    if "channels" in a:
        raise QMPError("cvmig takes the address as 'uri' (tcp:HOST:PORT), not 'channels'")
    if "uri" not in a:
        raise QMPError("need either 'uri' or 'channels' argument")  # QEMU's words
    # 'exit-on-error': cvmig never exits on a failed incoming migration; it listens on
    m.migrate_incoming(a["uri"])
    return {}


def _resolve(m: Machine, a: dict[str, Any]) -> dict[str, Any]:
    if a["decision"] not in ("keep", "discard"):
        raise QMPError("Parameter 'decision' must be 'keep' (run the guest here) or "
                       "'discard' (its source runs it)")
    m.resolve(a["decision"] == "keep")
    return {}


def _set_parameters(m: Machine, a: dict[str, Any]) -> dict[str, Any]:
    m.set_parameters(a)
    return {}


def _set_capabilities(m: Machine, a: dict[str, Any]) -> dict[str, Any]:
    m.set_capabilities(a["capabilities"])
    return {}


COMMANDS: dict[str, Command] = {
    "query-version": Command(lambda m, a: QEMU_VERSION, {}),
    "query-commands": Command(
        lambda m, a: [{"name": n} for n in ("qmp_capabilities", *sorted(COMMANDS))], {}),
    "query-status": Command(lambda m, a: m.query_status(), {}),
    "stop": Command(_returns_nothing(Machine.stop), {}),
    "cont": Command(_returns_nothing(Machine.cont), {}),
    "quit": Command(lambda m, a: {}, {}),  # the monitor shuts down after the reply
    "query-qmp-schema": Command(lambda m, a: schema(), {}),
    "migrate": Command(_migrate, {"uri": ("str", False), "channels": ("array", False),
                                  "detach": ("bool", False), "resume": ("bool", False)}),
    "migrate-incoming": Command(_migrate_incoming, {"uri": ("str", False),
                                                    "channels": ("array", False),
                                                    "exit-on-error": ("bool", False)}),
    "migrate_cancel": Command(_returns_nothing(Machine.migrate_cancel), {}),
    "query-migrate": Command(lambda m, a: m.query_migrate(), {}),
    "migrate-set-parameters": Command(_set_parameters, None),
    "query-migrate-parameters": Command(lambda m, a: m.settings.query_parameters(), {}),
    "migrate-set-capabilities": Command(_set_capabilities,
                                        {"capabilities": ("array", True)}),
    "query-migrate-capabilities": Command(lambda m, a: m.settings.query_capabilities(), {}),
    # cvmig's own: an operator's decision for an incoming guest held in doubt
    "x-migrate-resolve": Command(_resolve, {"decision": ("str", True)}),
}
