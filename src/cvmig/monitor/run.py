"""A long-lived VM process with a QMP monitor: ``cvmig vm --qmp unix:PATH``.

A source boots its guest first, then opens the monitor; a destination opens the monitor
and its migration listener, then waits. Either runs until ``quit``, SIGTERM or SIGINT,
and shuts its guest and secure processor down on the way out.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

from cvmig.guest.vm import GuestConfig
from cvmig.migration.host import Host
from cvmig.migration.listener import HANDSHAKE_TIMEOUT_S
from cvmig.monitor.machine import Machine
from cvmig.monitor.protocol import QMPError
from cvmig.monitor.server import Server

Say = Callable[[dict[str, Any]], None]
_SOCKET_OPTIONS = ("server", "server=on", "nowait", "wait=off")


def parse_qmp_address(text: str) -> str:
    """'unix:PATH' (QEMU's ',server=on,wait=off' accepted and implied) -> PATH."""
    if not text.startswith("unix:") or len(text) <= 5:
        raise ValueError(f"the QMP address must be unix:PATH, got {text!r}")
    path, *opts = text[5:].split(",")
    for o in opts:
        if o not in _SOCKET_OPTIONS:
            raise ValueError(f"unknown QMP socket option {o!r} (this monitor always listens)")
    if not path:
        raise ValueError(f"the QMP address must be unix:PATH, got {text!r}")
    return path


class StartError(Exception):
    """The monitor socket or the migration listener could not be opened."""


def run_vm(qmp_path: str, psp_profile: str, say: Say, *, guest: GuestConfig | None = None,
           policy: int = 0, incoming: tuple[str, int] | None = None, contig_cap: int = 4,
           psp_owner: str | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
           parameters: dict[str, Any] | None = None, defer: bool = False,
           prestart_vcpus: int = 0) -> None:
    """Serve until quit. ``incoming``: a destination on (addr, port); ``defer``: a
    destination that listens once told where (migrate-incoming); else boot ``guest``.
    ``handshake_timeout``: seconds an incoming connection has to say HELLO as a source.
    ``parameters``: migration parameters set before anything starts (the --tls-* options),
    as if by migrate-set-parameters. ``prestart_vcpus``: a destination's vCPU processes
    started before the migration comes (cvmig.guest.pool), as QEMU's -smp with -incoming."""
    folder = os.path.dirname(os.path.abspath(qmp_path))
    if not os.path.isdir(folder):  # say so before a guest boots for nothing
        raise StartError(f"cannot serve QMP on unix:{qmp_path}: no folder {folder}")
    role = "destination" if incoming or defer else "source"
    with Host(role, psp_profile, contig_cap=contig_cap, psp_owner=psp_owner) as host:
        machine = Machine(host, contig_cap=contig_cap)
        try:
            if parameters:
                try:
                    machine.set_parameters(parameters)
                except QMPError as e:
                    raise StartError(str(e)) from None
            port = None
            if incoming is not None or defer:
                try:
                    host.vcpu_pool.fill(prestart_vcpus)
                except RuntimeError as e:
                    raise StartError(f"cannot start vCPU processes: {e}") from None
            if defer:
                machine.defer(handshake_timeout)
            elif incoming is not None:
                try:
                    port = machine.listen(*incoming, handshake_timeout=handshake_timeout)
                except OSError as e:
                    raise StartError(f"cannot listen on {incoming[0]}:{incoming[1]}: "
                                     f"{e.strerror or e}") from None
            else:
                assert guest is not None
                machine.boot(guest, policy)
            asyncio.run(_serve(machine, qmp_path, say, port, defer))
        finally:
            machine.close()


async def _serve(machine: Machine, path: str, say: Say, port: int | None,
                 defer: bool = False) -> None:
    server = Server(machine)
    try:
        await server.start(path)
    except OSError as e:
        raise StartError(f"cannot serve QMP on unix:{path}: {e.strerror or e}") from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_quit, "host-signal")
    if defer:  # the port comes with migrate-incoming (query-migrate's socket-address)
        say({"event": "deferred", "qmp": path})
    elif port is None:
        say({"event": "running", "qmp": path})
    else:
        say({"event": "listening", "port": port, "qmp": path})
    try:
        await server.quit_requested.wait()
        await asyncio.to_thread(machine.close)
    finally:
        await server.close()
