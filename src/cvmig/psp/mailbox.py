"""The PSP as its own process, reached through a mailbox on a UNIX socket.

One PSP process per host serves ONE command at a time for any number of clients (the
migration engine, guest vCPU processes, tools), like the real PSP behind the kernel's
`sev_cmd_mutex`. A message is a SEQPACKET datagram: command ID (u32, SEV's IDs where SEV
has the command) and a little-endian command buffer. The reply is a status (u32, SEV
status code) and the command's output, or on failure the command name and a message; the
client turns a non-zero status into `PspError`. Bulk data never crosses the socket: guest
memory and transport buffers are POSIX shared-memory objects the PSP maps (`map_region`),
SEND writes packets straight into the transport region and RECEIVE reads them from there.

`fetch_memory_key` is the memory controller, not a PSP command the hypervisor can use: on
hardware the memory controller holds each guest's VEK and the hypervisor never sees it.
Here the guest's own vCPU processes (package `cvmig.guest`) fetch it once and do their
memory encryption themselves; `MailboxClient`, the hypervisor's binding, has no such method.

Run standalone: ``python -m cvmig.psp.mailbox --socket /run/psp.sock [--profile sev-2020]``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from cvmig.psp import certs as C
from cvmig.psp.api import (
    SPEC_MAX_LENGTH,
    Batching,
    GuestState,
    PlatformCerts,
    PspError,
    SecureProcessor,
    SendSession,
    Status,
)
from cvmig.psp.cost import CostProfile, parse, wait_until
from cvmig.psp.firmware import DEFAULT_MAX_SG_PAGES, Firmware

# SEV command IDs (sev-tool sevapi.h), and this emulator's extensions in 0xE0-0xFF.
PLATFORM_STATUS = 0x04
PDH_CERT_EXPORT = 0x08
DECOMMISSION = 0x20
GUEST_STATUS = 0x23
LAUNCH_START = 0x30  # here: LAUNCH_START .. LAUNCH_FINISH + ACTIVATE, memory from zero
SEND_START = 0x40
SEND_UPDATE_DATA = 0x41
SEND_UPDATE_VMSA = 0x42
SEND_FINISH = 0x43
SEND_CANCEL = 0x44
SEND_TRAILER = 0xE4  # extension: the sg page count, MAC'd, for RECEIVE_FINISH
RECEIVE_START = 0x50
RECEIVE_UPDATE_DATA = 0x51
RECEIVE_UPDATE_VMSA = 0x52
RECEIVE_FINISH = 0x53
MAP_REGION = 0xE0
UNMAP_REGION = 0xE1
SEND_UPDATE_DATA_QUEUE = 0xE2  # Hygon CSV ring-buffer style: many commands, one doorbell
RECEIVE_UPDATE_DATA_QUEUE = 0xE3
FETCH_MEMORY_KEY = 0xF0  # the memory controller (guest vCPUs only)

COMMAND_NAMES: dict[int, str] = {
    PLATFORM_STATUS: "PLATFORM_STATUS",
    PDH_CERT_EXPORT: "PDH_CERT_EXPORT",
    DECOMMISSION: "DECOMMISSION",
    GUEST_STATUS: "GUEST_STATUS",
    LAUNCH_START: "LAUNCH_START",
    SEND_START: "SEND_START",
    SEND_UPDATE_DATA: "SEND_UPDATE_DATA",
    SEND_UPDATE_VMSA: "SEND_UPDATE_VMSA",
    SEND_FINISH: "SEND_FINISH",
    SEND_CANCEL: "SEND_CANCEL",
    SEND_TRAILER: "SEND_TRAILER",
    RECEIVE_START: "RECEIVE_START",
    RECEIVE_UPDATE_DATA: "RECEIVE_UPDATE_DATA",
    RECEIVE_UPDATE_VMSA: "RECEIVE_UPDATE_VMSA",
    RECEIVE_FINISH: "RECEIVE_FINISH",
    MAP_REGION: "MAP_REGION",
    UNMAP_REGION: "UNMAP_REGION",
    SEND_UPDATE_DATA_QUEUE: "SEND_UPDATE_DATA_QUEUE",
    RECEIVE_UPDATE_DATA_QUEUE: "RECEIVE_UPDATE_DATA_QUEUE",
    FETCH_MEMORY_KEY: "FETCH_MEMORY_KEY",
}

# Not firmware commands on hardware (DMA mapping; the memory controller): no PSP cost.
_FREE = frozenset({MAP_REGION, UNMAP_REGION, FETCH_MEMORY_KEY})

MAX_MESSAGE = 4 << 20  # bytes; a queue of 4094 one-page commands needs ~64 KiB
_SOCK_BUF = 4 << 20

_U32 = struct.Struct("<I")
_MODES = list(Batching)
_MODE_ID: dict[str, int] = {m: i for i, m in enumerate(_MODES)}  # Batching is a str enum
# handle u32, mode u8, pad 3, trans u32, pad 4, offset u64, length u64, npfns u32, nbounds u32
_XFER = struct.Struct("<IB3xI4xQQII")
_VMSA = struct.Struct("<I4xQIIQQ")  # handle, pfn, trans, pad, offset, length


def _xfer(handle: int, mode: Batching, trans: int, offset: int, length: int,
          pfns: np.ndarray, bounds: np.ndarray | None = None) -> bytes:
    p = np.ascontiguousarray(pfns, dtype="<i8").reshape(-1)
    if bounds is None:
        return _XFER.pack(handle, _MODE_ID[mode], trans, offset, length, len(p), 0) + p.tobytes()
    b = np.ascontiguousarray(bounds, dtype="<i8").reshape(-1)
    head = _XFER.pack(handle, _MODE_ID[mode], trans, offset, length, len(p), len(b))
    return head + p.tobytes() + b.tobytes()


def _unxfer(buf: memoryview) -> tuple[int, Batching, int, int, int, np.ndarray, np.ndarray]:
    handle, mode, trans, offset, length, npfns, nbounds = _XFER.unpack_from(buf, 0)
    o = _XFER.size
    if mode >= len(_MODES) or len(buf) != o + 8 * (npfns + nbounds):
        raise PspError("mailbox", Status.INVALID_PARAM, "malformed transfer command buffer")
    pfns = np.frombuffer(buf, dtype="<i8", count=npfns, offset=o)
    bounds = np.frombuffer(buf, dtype="<i8", count=nbounds, offset=o + 8 * npfns)
    return handle, _MODES[mode], trans, offset, length, pfns, bounds


def _session_bytes(s: SendSession) -> bytes:
    return _U32.pack(s.policy) + _U32.pack(len(s.sender_pdh)) + s.sender_pdh + s.session


def _session_from(buf: bytes | memoryview) -> SendSession:
    policy, n = struct.unpack_from("<II", buf, 0)
    return SendSession(policy, bytes(buf[8 : 8 + n]), bytes(buf[8 + n :]))


# --- server ---------------------------------------------------------------------------


def _handlers(fw: Firmware, status: Callable[[], dict[str, object]]) -> dict[int, Callable[[memoryview], bytes]]:
    def map_region(b: memoryview) -> bytes:
        (size,) = struct.unpack_from("<Q", b, 0)
        return _U32.pack(fw.map_region(bytes(b[8:]).decode(), size))

    def send_update(b: memoryview) -> bytes:
        h, mode, trans, off, _, pfns, _ = _unxfer(b)
        return struct.pack("<Q", fw.send_update_data(h, mode, pfns, trans, off))

    def send_queue(b: memoryview) -> bytes:
        h, mode, trans, off, _, pfns, bounds = _unxfer(b)
        return struct.pack("<Q", fw.send_update_data_queue(h, mode, pfns, bounds, trans, off))

    def receive_update(b: memoryview) -> bytes:
        h, mode, trans, off, length, pfns, _ = _unxfer(b)
        fw.receive_update_data(h, mode, pfns, trans, off, length)
        return b""

    def receive_queue(b: memoryview) -> bytes:
        h, mode, trans, off, length, pfns, bounds = _unxfer(b)
        fw.receive_update_data_queue(h, mode, pfns, bounds, trans, off, length)
        return b""

    def send_vmsa(b: memoryview) -> bytes:
        h, pfn, trans, _, off, _ = _VMSA.unpack_from(b, 0)
        return struct.pack("<Q", fw.send_update_vmsa(h, pfn, trans, off))

    def receive_vmsa(b: memoryview) -> bytes:
        h, pfn, trans, _, off, length = _VMSA.unpack_from(b, 0)
        fw.receive_update_vmsa(h, pfn, trans, off, length)
        return b""

    def receive_start(b: memoryview) -> bytes:
        region, npages = struct.unpack_from("<IQ", b, 0)
        return _U32.pack(fw.receive_start(region, npages, _session_from(b[12:])))

    def receive_finish(b: memoryview) -> bytes:
        return fw.receive_finish(_U32.unpack_from(b, 0)[0], bytes(b[4:]))

    def guest_status(b: memoryview) -> bytes:
        state, policy = fw.guest_status(_U32.unpack_from(b, 0)[0])
        return struct.pack("<II", int(state), policy)

    def unit(f: Callable[[int], object]) -> Callable[[memoryview], bytes]:
        def run(b: memoryview) -> bytes:
            f(_U32.unpack_from(b, 0)[0])
            return b""
        return run

    return {
        PLATFORM_STATUS: lambda b: json.dumps(status()).encode(),
        PDH_CERT_EXPORT: lambda b: fw.export_certs().to_bytes(),
        MAP_REGION: map_region,
        UNMAP_REGION: unit(fw.unmap_region),
        LAUNCH_START: lambda b: _U32.pack(fw.launch(*struct.unpack_from("<IQI", b, 0))),
        DECOMMISSION: unit(fw.decommission),
        GUEST_STATUS: guest_status,
        SEND_START: lambda b: _session_bytes(
            fw.send_start(_U32.unpack_from(b, 0)[0], PlatformCerts.from_bytes(bytes(b[4:])))
        ),
        SEND_UPDATE_DATA: send_update,
        SEND_UPDATE_DATA_QUEUE: send_queue,
        SEND_UPDATE_VMSA: send_vmsa,
        SEND_TRAILER: lambda b: fw.send_trailer(_U32.unpack_from(b, 0)[0]),
        SEND_FINISH: unit(fw.send_finish),
        SEND_CANCEL: unit(fw.send_cancel),
        RECEIVE_START: receive_start,
        RECEIVE_UPDATE_DATA: receive_update,
        RECEIVE_UPDATE_DATA_QUEUE: receive_queue,
        RECEIVE_UPDATE_VMSA: receive_vmsa,
        RECEIVE_FINISH: receive_finish,
        FETCH_MEMORY_KEY: lambda b: fw.memory_key(_U32.unpack_from(b, 0)[0]),
    }


class PspServer:
    """The mailbox loop over one `Firmware`: one command at a time, any number of clients.

    Runs in the PSP process (`PspProcess`), or in a thread of a test that wants to look
    inside the firmware while clients talk to it through the real socket.
    """

    def __init__(self, firmware: Firmware, socket_path: str, profile: str | CostProfile = "none") -> None:
        self.firmware = firmware
        self.socket_path = socket_path
        self.profile = parse(profile)
        self.counts: dict[str, int] = {}
        self.busy_s = 0.0
        self._handlers = _handlers(firmware, self.status)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listen.bind(socket_path)
        self._listen.listen(64)
        self._wake_r, self._wake_w = os.pipe()
        self._buf = bytearray(MAX_MESSAGE)
        self._stopping = False

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

    def _serve_one(self, conn: socket.socket) -> bool:
        try:
            n = conn.recv_into(self._buf, MAX_MESSAGE, socket.MSG_TRUNC)
        except OSError:
            return False
        if n == 0:
            return False
        t0 = time.perf_counter()
        cmd_id = _U32.unpack_from(self._buf, 0)[0] if n >= 4 else -1
        name = COMMAND_NAMES.get(cmd_id, f"0x{cmd_id:x}")
        self.firmware.last_work = (1, 0)
        try:
            if n > MAX_MESSAGE:
                raise PspError(name, Status.INVALID_LENGTH, f"message of {n} B over {MAX_MESSAGE}")
            handler = self._handlers.get(cmd_id)
            if handler is None:
                raise PspError(name, Status.INVALID_COMMAND, "unknown command")
            reply = _U32.pack(Status.SUCCESS) + handler(memoryview(self._buf)[4:n])
        except PspError as e:
            reply = _U32.pack(e.status) + f"{e.command}\0{e.detail}".encode()
        except Exception as e:  # a malformed buffer must not take the PSP down
            reply = _U32.pack(Status.INVALID_PARAM) + f"{name}\0{type(e).__name__}: {e}".encode()
        if not self.profile.is_free and cmd_id not in _FREE:
            ncmd, nbytes = self.firmware.last_work
            wait_until(t0 + self.profile.duration(ncmd, nbytes))
        self.busy_s += time.perf_counter() - t0
        self.counts[name] = self.counts.get(name, 0) + 1
        try:
            conn.send(reply)
        except OSError:
            return False
        return True

    def serve_forever(self, parent_pid: int | None = None) -> None:
        """Serve until `stop`, or (if ``parent_pid`` is given) until that process is gone,
        so that a PSP whose host process died does not linger."""
        sel = selectors.DefaultSelector()
        sel.register(self._listen, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        timeout = None if parent_pid is None else 1.0
        try:
            while not self._stopping:
                if parent_pid is not None and os.getppid() != parent_pid:
                    return
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        return
                    if key.data == "listen":
                        conn, _ = self._listen.accept()
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)
                        sel.register(conn, selectors.EVENT_READ, "conn")
                        continue
                    conn = key.fileobj  # type: ignore[assignment]
                    if not self._serve_one(conn):
                        sel.unregister(conn)
                        conn.close()
        finally:
            for key in list(sel.get_map().values()):
                if key.data == "conn":
                    key.fileobj.close()  # type: ignore[union-attr]
            sel.close()
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listen.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def serve_in_thread(server: PspServer) -> threading.Thread:
    """Run ``server`` on a daemon thread (tests); stop it with ``server.stop()``."""
    t = threading.Thread(target=server.serve_forever, name="psp", daemon=True)
    t.start()
    return t


# --- client ---------------------------------------------------------------------------


class MailboxClient:
    """The hypervisor's `SecureProcessor`: commands through the PSP process's mailbox.

    Thread-safe (one command in flight per client). ``trace``, if given, receives every
    raw reply, so a test can check what the hypervisor side was ever handed.
    """

    def __init__(self, socket_path: str, trace: list[bytes] | None = None) -> None:
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
        self._sock.connect(socket_path)
        self._lock = threading.Lock()
        self._rbuf = bytearray(1 << 20)
        self._trace = trace

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> MailboxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, cmd: int, payload: bytes = b"") -> memoryview:
        with self._lock:
            try:
                self._sock.send(_U32.pack(cmd) + payload)
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    raise
                raise PspError(
                    COMMAND_NAMES.get(cmd, hex(cmd)), Status.INVALID_LENGTH,
                    f"a {len(payload)}-byte command buffer is over the mailbox's message limit "
                    "(net.core.wmem_max); split the queue",
                ) from None
            n = self._sock.recv_into(self._rbuf)
            if n == 0:
                raise ConnectionError("the PSP closed the mailbox")
            reply = memoryview(self._rbuf)[:n]
            if self._trace is not None:
                self._trace.append(bytes(reply))
            status = _U32.unpack_from(reply, 0)[0]
            if status != Status.SUCCESS:
                _raise(status, reply[4:])
            return memoryview(bytes(reply[4:]))

    # -- platform --
    def export_certs(self) -> PlatformCerts:
        return PlatformCerts.from_bytes(bytes(self._call(PDH_CERT_EXPORT)))

    def platform_status(self) -> dict[str, object]:
        """API version, batching limits, cost profile and per-command counters."""
        result: dict[str, object] = json.loads(bytes(self._call(PLATFORM_STATUS)))
        return result

    def limits(self) -> dict[str, int]:
        lim = self.platform_status()["limits"]
        assert isinstance(lim, dict)
        return lim

    def map_region(self, shm_name: str, size: int) -> int:
        r = self._call(MAP_REGION, struct.pack("<Q", size) + shm_name.encode())
        return int(_U32.unpack_from(r, 0)[0])

    def unmap_region(self, region: int) -> None:
        self._call(UNMAP_REGION, _U32.pack(region))

    # -- guest lifecycle --
    def launch(self, region: int, npages: int, policy: int) -> int:
        return int(_U32.unpack_from(self._call(LAUNCH_START, struct.pack("<IQI", region, npages, policy)), 0)[0])

    def decommission(self, handle: int) -> None:
        self._call(DECOMMISSION, _U32.pack(handle))

    def guest_status(self, handle: int) -> tuple[GuestState, int]:
        state, policy = struct.unpack_from("<II", self._call(GUEST_STATUS, _U32.pack(handle)), 0)
        return GuestState(state), policy

    # -- send --
    def send_start(self, handle: int, target: PlatformCerts) -> SendSession:
        return _session_from(self._call(SEND_START, _U32.pack(handle) + target.to_bytes()))

    def send_update_data(
        self, handle: int, mode: Batching, pfns: np.ndarray, trans: int, offset: int
    ) -> int:
        r = self._call(SEND_UPDATE_DATA, _xfer(handle, mode, trans, offset, 0, pfns))
        return int(struct.unpack_from("<Q", r, 0)[0])

    def send_update_data_queue(
        self, handle: int, mode: Batching, pfns: np.ndarray, bounds: np.ndarray, trans: int,
        offset: int,
    ) -> int:
        r = self._call(SEND_UPDATE_DATA_QUEUE, _xfer(handle, mode, trans, offset, 0, pfns, bounds))
        return int(struct.unpack_from("<Q", r, 0)[0])

    def send_update_vmsa(self, handle: int, pfn: int, trans: int, offset: int) -> int:
        r = self._call(SEND_UPDATE_VMSA, _VMSA.pack(handle, pfn, trans, 0, offset, 0))
        return int(struct.unpack_from("<Q", r, 0)[0])

    def send_trailer(self, handle: int) -> bytes:
        """The finish trailer (SUPDATE, no state change) for the destination's RECEIVE_FINISH."""
        return bytes(self._call(SEND_TRAILER, _U32.pack(handle)))

    def send_finish(self, handle: int) -> None:
        self._call(SEND_FINISH, _U32.pack(handle))

    def send_cancel(self, handle: int) -> None:
        self._call(SEND_CANCEL, _U32.pack(handle))

    # -- receive --
    def receive_start(self, region: int, npages: int, session: SendSession) -> int:
        r = self._call(RECEIVE_START, struct.pack("<IQ", region, npages) + _session_bytes(session))
        return int(_U32.unpack_from(r, 0)[0])

    def receive_update_data(
        self, handle: int, mode: Batching, pfns: np.ndarray, trans: int, offset: int, length: int
    ) -> None:
        self._call(RECEIVE_UPDATE_DATA, _xfer(handle, mode, trans, offset, length, pfns))

    def receive_update_data_queue(
        self, handle: int, mode: Batching, pfns: np.ndarray, bounds: np.ndarray, trans: int,
        offset: int, length: int,
    ) -> None:
        self._call(
            RECEIVE_UPDATE_DATA_QUEUE, _xfer(handle, mode, trans, offset, length, pfns, bounds)
        )

    def receive_update_vmsa(self, handle: int, pfn: int, trans: int, offset: int, length: int) -> None:
        self._call(RECEIVE_UPDATE_VMSA, _VMSA.pack(handle, pfn, trans, 0, offset, length))

    def receive_finish(self, handle: int, trailer: bytes) -> bytes:
        return bytes(self._call(RECEIVE_FINISH, _U32.pack(handle) + trailer))


def _raise(status: int, body: memoryview) -> None:
    command, _, detail = bytes(body).decode(errors="replace").partition("\0")
    try:
        code = Status(status)
    except ValueError:
        code = Status.HWERROR_PLATFORM
        detail = f"unknown status 0x{status:x}: {detail}"
    raise PspError(command, code, detail)


def fetch_memory_key(socket_path: str, handle: int) -> bytes:
    """The guest's VEK, for the guest's own vCPU processes (package `cvmig.guest` only).

    This emulates the memory controller: on hardware the VEK sits in the memory controller,
    which encrypts and decrypts the guest's accesses, and the hypervisor never sees it. The
    guest's vCPUs do that work themselves here, so they need the key; they fetch it straight
    from the PSP, never through the hypervisor. Refused (INVALID_GUEST_STATE) unless the
    guest is RUNNING or SUPDATE: a SENT guest must never run again, and a guest still being
    received has no complete memory yet.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(socket_path)
        s.send(_U32.pack(FETCH_MEMORY_KEY) + _U32.pack(handle))
        reply = s.recv(4096)
    if len(reply) < 4:
        raise ConnectionError("the PSP closed the mailbox")
    status = _U32.unpack_from(reply, 0)[0]
    if status != Status.SUCCESS:
        _raise(status, memoryview(reply)[4:])
    return reply[4:]


# --- the PSP process ------------------------------------------------------------------


class PspProcess:
    """Start (and stop) one host's PSP as its own process serving ``socket_path``.

    ``profile``: cost profile name or spec (see `cvmig.psp.cost`). ``max_contig_bytes``:
    the contig cap (16 KiB per the SEV spec; larger is an extension). ``pki``: directory of
    the emulated PKI (``amd-root/``, ``owner/``; default `certs.pki_dir()`), so that every
    PSP on the machine chains to one ARK and, by default, one owner (a DOMAIN). ``owner``:
    another owner directory, or ``"self"`` for a self-owned platform with a fresh OCA.
    """

    def __init__(
        self,
        socket_path: str,
        profile: str = "none",
        *,
        max_contig_bytes: int = SPEC_MAX_LENGTH,
        max_sg_pages: int = DEFAULT_MAX_SG_PAGES,
        pki: str | None = None,
        owner: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        parse(profile)  # fail here, not in the child
        self.socket_path = socket_path
        self.profile = profile
        self._args = [
            "--socket", socket_path, "--profile", profile,
            "--max-contig-bytes", str(max_contig_bytes), "--max-sg-pages", str(max_sg_pages),
            "--parent-pid", str(os.getpid()),
        ]
        if pki:
            self._args += ["--pki", pki]
        if owner:
            self._args += ["--owner", owner]
        self._timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> PspProcess:
        if self._proc is not None:
            raise RuntimeError("PSP process already started")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cvmig.psp.mailbox", *self._args],
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], self._timeout)
        line = self._proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"PSP process did not start (got {line!r})")
        return self

    def client(self, trace: list[bytes] | None = None) -> MailboxClient:
        return MailboxClient(self.socket_path, trace)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def __enter__(self) -> PspProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cvmig.psp.mailbox", description=__doc__)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--profile", default="none")
    ap.add_argument("--max-contig-bytes", type=int, default=SPEC_MAX_LENGTH)
    ap.add_argument("--max-sg-pages", type=int, default=DEFAULT_MAX_SG_PAGES)
    ap.add_argument("--pki", default=None)
    ap.add_argument("--owner", default=None)
    ap.add_argument("--parent-pid", type=int, default=None,
                    help="exit when this process (the host that started the PSP) is gone")
    a = ap.parse_args(argv)
    if a.pki:
        os.environ["CVMIG_PKI_DIR"] = a.pki
    root, owner = C.default_pki()
    if a.owner == "self":
        owner = C.Owner.generate()
    elif a.owner:
        owner = C.Owner.load(Path(a.owner))
    fw = Firmware(
        C.PlatformIdentity.generate(root, owner), trusted_arks=[root.ark_cert],
        max_contig_bytes=a.max_contig_bytes, max_sg_pages=a.max_sg_pages,
    )
    server = PspServer(fw, a.socket, a.profile)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    print("ready", flush=True)
    server.serve_forever(parent_pid=a.parent_pid)


if TYPE_CHECKING:  # mypy proves both bindings implement the contract

    def _conforms(c: MailboxClient, f: Firmware) -> tuple[SecureProcessor, SecureProcessor]:
        return c, f


if __name__ == "__main__":
    main()
