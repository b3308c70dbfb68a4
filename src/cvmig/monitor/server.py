"""The QMP server: a UNIX socket, any number of clients, commands in order per client.

Each connection gets the greeting, must negotiate with ``qmp_capabilities``, then may run
commands; events go to every negotiated connection. Nothing a client sends can stop the
VM except ``quit``: bad JSON, bad envelopes, unknown commands and bad arguments are all
answered with an error in QMP's form, and the connection stays open.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from cvmig.monitor import protocol
from cvmig.monitor.commands import COMMANDS
from cvmig.monitor.machine import Machine
from cvmig.monitor.protocol import QMPError
from cvmig.monitor.schema import check_args

log = logging.getLogger(__name__)
MAX_BACKLOG = 16 << 20  # bytes queued to a client that does not read: then drop it


@dataclass(eq=False)
class Client:
    writer: asyncio.StreamWriter
    negotiated: bool = False

    def send(self, msg: dict[str, Any]) -> None:
        self.writer.write(protocol.encode(msg))


class Server:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.clients: set[Client] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.quit_requested = asyncio.Event()
        self.path = ""

    # -- events -------------------------------------------------------------------------
    def emit(self, name: str, data: dict[str, Any] | None) -> None:
        """Thread-safe: stamp the event now, send it from the loop, in emit order."""
        msg = protocol.event(name, data)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._broadcast, msg)

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for c in list(self.clients):
            if not c.negotiated or c.writer.is_closing():
                continue  # QEMU sends no events during capabilities negotiation
            if c.writer.transport.get_write_buffer_size() > MAX_BACKLOG:
                log.warning("QMP client does not read its events; disconnecting it")
                c.writer.close()
                continue
            c.send(msg)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, path: str) -> None:
        self._loop = asyncio.get_running_loop()
        self.machine.emit = self.emit
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # as QEMU: a stale socket from a previous run is replaced
        self._server = await asyncio.start_unix_server(self._serve, path=path)
        self.path = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.clients):
            c.writer.close()
        for c in list(self.clients):
            with contextlib.suppress(Exception):
                await c.writer.wait_closed()
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def request_quit(self, reason: str) -> None:
        """On the loop: SHUTDOWN goes out now, before any connection closes."""
        if not self.quit_requested.is_set():
            self._broadcast(protocol.event("SHUTDOWN", {"guest": False, "reason": reason}))
            self.quit_requested.set()

    # -- one connection -----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(writer)
        self.clients.add(client)
        splitter = protocol.Splitter()
        decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        try:
            client.send(protocol.greeting())
            while not self.quit_requested.is_set():
                data = await reader.read(1 << 16)
                if not data:
                    break
                for item in splitter.feed(decode(data)):
                    reply, quit_now = await self._handle(client, item)
                    client.send(reply)
                    await writer.drain()
                    if quit_now:
                        self.request_quit("host-qmp-quit")
                        return
        except (ConnectionError, OSError):
            pass  # the client went away; the VM does not care
        finally:
            self.clients.discard(client)
            writer.close()

    async def _handle(self, client: Client, item: str | QMPError) -> tuple[dict[str, Any], bool]:
        msg_id: Any = None
        has_id = False
        try:
            if isinstance(item, QMPError):
                raise item
            msg = protocol.parse(item)
            if isinstance(msg, dict) and "id" in msg:
                msg_id, has_id = msg["id"], True  # echoed whatever its type, as QEMU
            name, args = protocol.check_request(msg)
            if not client.negotiated:
                self._negotiate(name, args)
                client.negotiated = True
                result: Any = {}
            elif name == "qmp_capabilities":
                raise QMPError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
            else:
                cmd = COMMANDS.get(name)
                if cmd is None:
                    raise QMPError(f"The command {name} has not been found", "CommandNotFound")
                if cmd.schema is not None:
                    args = check_args(args, cmd.schema)
                result = await asyncio.to_thread(cmd.run, self.machine, args)
            reply: dict[str, Any] = {"return": result}
            if has_id:
                reply["id"] = msg_id
            return reply, name == "quit" and client.negotiated
        except QMPError as e:
            return protocol.error(e, msg_id, has_id), False
        except Exception as e:  # a bug in a handler must not take the VM down
            log.exception("QMP command failed")
            return protocol.error(QMPError(f"internal error: {type(e).__name__}: {e}"),
                                  msg_id, has_id), False

    @staticmethod
    def _negotiate(name: str, args: dict[str, Any]) -> None:
        if name != "qmp_capabilities":
            raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           "CommandNotFound")
        enable = check_args(args, {"enable": ("array", False)}).get("enable", [])
        for cap in enable:
            raise QMPError(f"Capability '{cap}' not available")
