"""The PSP's mailbox server: one `Firmware`, one command at a time for any number of clients.

Like the real PSP behind the kernel's `sev_cmd_mutex`, one thread serves every client in
turn. Clients connect to a SEQPACKET UNIX socket; a message there is a command ID (u32)
and its buffer, the reply a status (u32) and the output (formats: `commands.py`). A client
may then ask for a shared-memory doorbell ring on its connection (`ring.py`), after which
its commands go through the ring and the socket only tells each side that the other is
gone. Bulk data never crosses either: guest memory and transport buffers are POSIX
shared-memory objects the firmware maps (MAP_REGION).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cvmig.psp import certs as C
from cvmig.psp.api import PspError, Status
from cvmig.psp.commands import (
    COMMANDS,
    MAX_MESSAGE,
    MAX_REPLY,
    PLATFORM_STATUS,
    RING_BELL,
    RING_SETUP,
    error_body,
    name_of,
)
from cvmig.psp.cost import CostProfile, parse, wait_until
from cvmig.psp.firmware import Firmware
from cvmig.psp.ring import (
    ACK_S,
    ACK_SEQ,
    CLIENT_CPU,
    CLIENT_SLEEPING,
    NO_CPU,
    REP_LEN,
    REP_SEQ,
    REP_STATUS,
    REQ_CMD,
    REQ_LEN,
    REQ_SEQ,
    SERVER_CPU,
    SERVER_SLEEPING,
    SIZE,
    SPIN_S,
    TAKEN_SEQ,
    Ring,
    current_cpu,
    ring_bell,
)

SOCK_BUF = 4 << 20  # a SEQPACKET message must fit the socket buffer whole
_POLL_EVERY = 20e-6  # while spinning, look at the sockets this often (new clients, fallback)
_U32 = struct.Struct("<I")
_SETUP_REPLY = struct.Struct("<IQI")  # status, ring size, server pid

Handler = Callable[[memoryview], bytes]


@dataclass
class _Conn:
    sock: socket.socket
    ring: Ring | None = None
    seen: int = 0  # the last request sequence number served


class PspServer:
    """The mailbox loop over one `Firmware`.

    Runs in the PSP process (`PspProcess`), or in a thread of a test that wants to look
    inside the firmware while clients talk to it through the real socket and ring.
    ``spin_s``: how long to spin for the next ring command before sleeping.
    """

    def __init__(self, firmware: Firmware, socket_path: str, profile: str | CostProfile = "none",
                 *, spin_s: float = SPIN_S) -> None:
        self.firmware = firmware
        self.socket_path = socket_path
        self.profile = parse(profile)
        self.spin_s = spin_s
        self.counts: dict[str, int] = {}
        self.busy_s = 0.0
        self._table = self._bind()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listen.bind(socket_path)
        self._listen.listen(64)
        self._wake_r, self._wake_w = os.pipe()
        self._buf = bytearray(MAX_MESSAGE)  # the PSP's own copy of each command buffer
        self._view = memoryview(self._buf)
        self._rings: list[tuple[_Conn, Ring]] = []  # the connections with a doorbell ring
        self._stopping = False

    def _bind(self) -> dict[int, tuple[str, Handler, bool]]:
        """cmd id -> (name, handler: buffer -> reply body, free of the cost profile)."""
        table: dict[int, tuple[str, Handler, bool]] = {}
        for cid, cmd in COMMANDS.items():
            fn: Callable[..., Any] = (
                self.status if cmd is PLATFORM_STATUS else getattr(self.firmware, cmd.method)
            )

            def run(b: memoryview, fn: Callable[..., Any] = fn, dec: Any = cmd.request.decode,
                    enc: Any = cmd.reply.encode) -> bytes:
                return enc(fn(*dec(b)))

            table[cid] = (cmd.name, run, cmd.free)
        return table

    def status(self) -> dict[str, object]:
        """PLATFORM_STATUS: API version, limits, cost profile and command counters."""
        return {
            "api": f"{C.API_MAJOR}.{C.API_MINOR}",
            "profile": self.profile.name,
            "limits": self.firmware.limits(),
            "guests": len(self.firmware._guests),
            "commands": dict(self.counts),
            "busy_s": self.busy_s,
        }

    def stop(self) -> None:
        """Ask `serve_forever` to return (from any thread or a signal handler)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- one command -----------------------------------------------------------------------

    def execute(self, cmd_id: int, buf: memoryview) -> tuple[int, bytes]:
        """Run one command on the firmware: (status, reply body). Never raises: a malformed
        buffer or a firmware refusal is a status code, and the PSP serves on."""
        t0 = time.perf_counter()
        entry = self._table.get(cmd_id)
        name = entry[0] if entry else name_of(cmd_id)
        status: int
        self.firmware.last_work = (1, 0)
        try:
            if entry is None:
                raise PspError(name, Status.INVALID_COMMAND, "unknown command")
            body = entry[1](buf)
            status = Status.SUCCESS
            if len(body) > MAX_REPLY:
                raise PspError(name, Status.INVALID_LENGTH, f"{len(body)}-byte reply over {MAX_REPLY}")
        except PspError as e:
            status, body = e.status, error_body(e.command, e.detail)
        except Exception as e:  # a malformed buffer must not take the PSP down
            status, body = Status.INVALID_PARAM, error_body(name, f"{type(e).__name__}: {e}")
        if not (entry and entry[2]) and not self.profile.is_free:
            ncmd, nbytes = self.firmware.last_work
            wait_until(t0 + self.profile.duration(ncmd, nbytes))
        self.busy_s += time.perf_counter() - t0
        self.counts[name] = self.counts.get(name, 0) + 1
        return status, body

    def _serve_ring(self, c: _Conn, ring: Ring) -> bool:
        """Serve the ring's pending command; True if its client runs on another CPU (so
        spinning for its next command is worth it, see ring.py)."""
        h = ring.hdr
        seq = h[REQ_SEQ]
        c.seen = seq
        cpu = current_cpu()
        h[SERVER_CPU] = cpu
        h[TAKEN_SEQ] = seq
        cmd, n = h[REQ_CMD], h[REQ_LEN]
        status: int
        if n > MAX_MESSAGE - 4:
            name = name_of(cmd)
            status, body = Status.INVALID_LENGTH, error_body(name, f"message of {n} B over {MAX_MESSAGE}")
        else:
            # Copy first, as the firmware copies a command buffer into its own memory: the
            # client cannot change the buffer under a check.
            self._view[:n] = ring.req[:n]
            status, body = self.execute(cmd, self._view[:n])
        ring.rep[: len(body)] = body
        h[REP_STATUS] = status
        h[REP_LEN] = len(body)
        h[REP_SEQ] = seq  # publish last
        if h[CLIENT_SLEEPING]:
            ring_bell(c.sock)
        return h[CLIENT_CPU] != cpu or cpu == NO_CPU

    def _serve_socket(self, c: _Conn) -> bool:
        """One SEQPACKET message; False when the connection is done."""
        try:
            n = c.sock.recv_into(self._buf, MAX_MESSAGE, socket.MSG_TRUNC)
        except OSError:
            return False
        if n == 0:
            return False
        cmd = _U32.unpack_from(self._buf, 0)[0] if n >= 4 else -1
        status: int
        if cmd == RING_BELL:
            return True  # the rings are scanned at the top of the loop
        if cmd == RING_SETUP:
            return self._setup_ring(c)
        if n > MAX_MESSAGE:
            name = name_of(cmd)
            status, body = Status.INVALID_LENGTH, error_body(name, f"message of {n} B over {MAX_MESSAGE}")
        else:
            status, body = self.execute(cmd, self._view[4:n])
        try:
            c.sock.send(_U32.pack(status) + body)
        except OSError:
            return False
        return True

    def _setup_ring(self, c: _Conn) -> bool:
        if c.ring is not None:
            msg = _U32.pack(Status.INVALID_PARAM) + error_body("RING_SETUP", "ring already set up")
            return _send(c.sock, msg)
        fd = Ring.create_fd()
        try:
            ring = c.ring = Ring(fd)
            ring.hdr[SERVER_CPU] = NO_CPU
            self._rings.append((c, ring))
            reply = _SETUP_REPLY.pack(Status.SUCCESS, SIZE, os.getpid())
            return _send_fds(c.sock, reply, [fd])
        finally:
            os.close(fd)  # mapped here; the client got its own descriptor

    # -- the loop ------------------------------------------------------------------------

    def serve_forever(self, parent_pid: int | None = None, *, lifeline: int | None = None) -> None:
        """Serve until `stop`; or until ``lifeline`` (a descriptor the host holds the other
        end of) reads end-of-file; or, checked every second, until process ``parent_pid``
        is gone: a PSP whose host process died does not linger."""
        ep = select.epoll()
        conns: dict[int, _Conn] = {}
        rings = self._rings
        listen, wake = self._listen.fileno(), self._wake_r
        for fd in (listen, wake) + (() if lifeline is None else (lifeline,)):
            ep.register(fd, select.EPOLLIN)
        idle = -1.0 if parent_pid is None else 1.0
        spin_until = next_poll = ack_by = 0.0
        acker: tuple[_Conn, Ring] | None = None  # the client whose acknowledgement we await
        perf = time.perf_counter
        try:
            while not self._stopping:
                busy = False
                for c, r in rings:
                    if r.hdr[REQ_SEQ] != c.seen:
                        acker = (c, r) if self._serve_ring(c, r) else None
                        busy = True
                now = perf()
                if busy:  # spin for the next command only for a client on another CPU
                    spin_until, ack_by = (now + self.spin_s if acker else 0.0), now + ACK_S
                elif acker is not None and now > ack_by:
                    if acker[0].ring is None or acker[1].hdr[ACK_SEQ] != acker[0].seen:  # gone
                        spin_until = 0.0  # no acknowledgement: it does not run, stop spinning
                    acker = None
                if now < spin_until:
                    if now < next_poll:
                        continue
                    timeout = 0.0
                else:  # sleep: say so in every ring, then look once more (see ring.py)
                    timeout = idle
                    for _, r in rings:
                        r.hdr[SERVER_SLEEPING] = 1
                    if any(r.hdr[REQ_SEQ] != c.seen for c, r in rings):
                        timeout = 0.0
                events = ep.poll(timeout)
                if spin_until <= now:
                    for _, r in rings:
                        r.hdr[SERVER_SLEEPING] = 0
                next_poll = perf() + _POLL_EVERY
                for fd, _ in events:
                    if fd in (wake, lifeline):
                        return
                    elif fd == listen:
                        sock, _ = self._listen.accept()
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
                        conns[sock.fileno()] = _Conn(sock)
                        ep.register(sock.fileno(), select.EPOLLIN)
                    elif fd in conns and not self._serve_socket(conns[fd]):
                        ep.unregister(fd)
                        self._drop(conns.pop(fd))
                if parent_pid is not None and not events and os.getppid() != parent_pid:
                    return
        finally:
            for c in conns.values():
                self._drop(c)
            ep.close()
            self.close()

    def _drop(self, c: _Conn) -> None:
        if c.ring is not None:
            self._rings[:] = [x for x in self._rings if x[0] is not c]
            c.ring.close()
            c.ring = None
        c.sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listen.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _send(sock: socket.socket, msg: bytes) -> bool:
    try:
        sock.send(msg)
    except OSError:
        return False
    return True


def _send_fds(sock: socket.socket, msg: bytes, fds: list[int]) -> bool:
    try:
        socket.send_fds(sock, [msg], fds)
    except OSError:
        return False
    return True


def serve_in_thread(server: PspServer) -> threading.Thread:
    """Run ``server`` on a daemon thread (tests); stop it with ``server.stop()``. It does
    not spin there: in the clients' own process that would only hold the GIL against them."""
    server.spin_s = 0.0
    t = threading.Thread(target=server.serve_forever, name="psp", daemon=True)
    t.start()
    return t
