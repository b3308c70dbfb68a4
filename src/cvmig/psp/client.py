"""The hypervisor's binding to the PSP process (`MailboxClient`), the memory controller's
key fetch (`fetch_memory_key`), and a round-trip benchmark (`doorbell_round_trip`).

A client connects to the PSP's SEQPACKET socket and asks for a shared-memory doorbell ring
(`ring.py`); its commands then go through the ring, and the socket only tells it that the
PSP is gone. If the PSP offers no ring, or ``ring=False``, every command is a SEQPACKET
message instead (the fallback). Either way a non-SUCCESS status becomes `PspError`.

Rerun the benchmark: ``python -m cvmig.psp.client [-n 5000] [--socket S]``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import socket
import struct
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from cvmig.psp import commands as K
from cvmig.psp.api import (
    PAGE_SIZE,
    Batching,
    GuestState,
    PlatformCerts,
    PspError,
    SecureProcessor,
    SendSession,
    Status,
)
from cvmig.psp.commands import MAX_MESSAGE, MAX_REPLY, RING_SETUP, Command, raise_status
from cvmig.psp.ring import (
    ACK_SEQ,
    CLIENT_CPU,
    CLIENT_SLEEPING,
    NO_CPU,
    RECHECK_S,
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
    TAKE_S,
    TAKEN_SEQ,
    WAKE_S,
    Ring,
    current_cpu,
    ring_bell,
)

SOCK_BUF = 4 << 20  # a SEQPACKET message must fit the socket buffer whole
_U32 = struct.Struct("<I")
_SETUP_REPLY = struct.Struct("<IQI")  # status, ring size, server pid
R = TypeVar("R")


class MailboxClient:
    """The hypervisor's `SecureProcessor`: commands through the PSP process's mailbox.

    Thread-safe (one command in flight per client). ``trace``, if given, receives every
    raw reply (status u32 + body), so a test can check what the hypervisor side was ever
    handed. ``ring=False`` keeps to the SEQPACKET socket; ``spin_s`` is how long a call
    spins for its reply before it sleeps.
    """

    def __init__(self, socket_path: str, trace: list[bytes] | None = None, *,
                 ring: bool = True, spin_s: float = SPIN_S) -> None:
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
        self._sock.connect(socket_path)
        self._lock = threading.Lock()
        self._rbuf = bytearray(MAX_REPLY + 4)
        self._trace = trace
        self._spin_s = spin_s
        self._ring: Ring | None = None
        self._seq = 0
        if ring:
            self._setup_ring()

    @property
    def transport(self) -> str:
        """``"ring"`` (shared-memory doorbell) or ``"socket"`` (the SEQPACKET fallback)."""
        return "ring" if self._ring is not None else "socket"

    def _setup_ring(self) -> None:
        self._sock.send(_U32.pack(RING_SETUP))
        msg, fds, _, _ = socket.recv_fds(self._sock, 64, 1)
        if len(msg) < 4:
            raise ConnectionError("the PSP closed the mailbox")
        if _U32.unpack_from(msg, 0)[0] != Status.SUCCESS or len(fds) != 1 \
                or len(msg) != _SETUP_REPLY.size:
            for fd in fds:  # a PSP without rings: stay on the socket
                os.close(fd)
            return
        _, size, server_pid = _SETUP_REPLY.unpack(msg)
        (memfd,) = fds
        try:
            if size != SIZE:
                raise ConnectionError(f"PSP ring of {size} B, this client expects {SIZE}")
            self._ring = Ring(memfd)
        finally:
            os.close(memfd)
        if server_pid == os.getpid():  # a server thread in this process needs our GIL
            self._spin_s = 0.0
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)  # a bell, or end of file: PSP gone

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._sock.close()

    def __enter__(self) -> MailboxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------

    def _call(self, cmd: Command[R], *args: Any) -> R:
        payload = cmd.request.encode(*args)
        with self._lock:
            if self._ring is not None:
                status, body = self._ring_call(cmd, payload)
            else:
                status, body = self._socket_call(cmd, payload)
        if self._trace is not None:
            self._trace.append(_U32.pack(status) + body)
        if status != Status.SUCCESS:
            raise_status(status, body)
        return cmd.reply.decode(memoryview(body))

    def _socket_call(self, cmd: Command[Any], payload: bytes) -> tuple[int, bytes]:
        try:
            self._sock.send(_U32.pack(cmd.id) + payload)
        except OSError as e:
            if e.errno != errno.EMSGSIZE:
                raise
            raise PspError(
                cmd.name, Status.INVALID_LENGTH,
                f"a {len(payload)}-byte command buffer is over the mailbox's message limit "
                "(net.core.wmem_max); split the queue",
            ) from None
        n = self._sock.recv_into(self._rbuf)
        if n < 4:
            raise ConnectionError("the PSP closed the mailbox")
        return _U32.unpack_from(self._rbuf, 0)[0], bytes(self._rbuf[4:n])

    def _ring_call(self, cmd: Command[Any], payload: bytes) -> tuple[int, bytes]:
        ring = self._ring
        assert ring is not None
        n = len(payload)
        if n > MAX_MESSAGE - 4:
            raise PspError(cmd.name, Status.INVALID_LENGTH,
                           f"a {n}-byte command buffer is over the mailbox's limit of "
                           f"{MAX_MESSAGE - 4} B; split the queue")
        h = ring.hdr
        cpu = current_cpu()
        ring.req[:n] = payload
        h[REQ_CMD] = cmd.id
        h[REQ_LEN] = n
        h[CLIENT_CPU] = cpu
        seq = self._seq = self._seq + 1
        h[REQ_SEQ] = seq  # publish last
        rang = bool(h[SERVER_SLEEPING])
        if rang:
            ring_bell(self._sock)
        if h[REP_SEQ] != seq:
            remote = h[SERVER_CPU] != cpu or cpu == NO_CPU
            self._await_reply(h, seq, self._spin_s if remote else 0.0, WAKE_S if rang else TAKE_S)
        m = h[REP_LEN]
        if m > MAX_REPLY:
            raise ConnectionError(f"malformed PSP reply ({m} B)")
        reply = h[REP_STATUS], bytes(ring.rep[:m])
        h[ACK_SEQ] = seq  # tells the server we run (ring.py)
        return reply

    def _await_reply(self, h: memoryview, seq: int, spin: float, take: float) -> None:
        """Spin up to ``spin`` s (giving up if the server has not taken the request after
        ``take`` s), then sleep on the socket (a bell, or end of file) in bounded waits:
        a PSP that dies is an error at once, never a hang."""
        if spin > 0:
            perf = time.perf_counter
            t0 = perf()
            take_by, end = t0 + take, t0 + spin
            while h[REP_SEQ] != seq:
                t = perf()
                if t > end or (t > take_by and h[TAKEN_SEQ] != seq):
                    break
            else:
                return
        h[CLIENT_SLEEPING] = 1
        try:
            wait = RECHECK_S[0]
            while h[REP_SEQ] != seq:
                if self._poll.poll(wait * 1e3):
                    self._drain_bells(h, seq)
                else:  # bounded wait over: a doorbell may have been lost (ring.py)
                    if h[TAKEN_SEQ] != seq:
                        ring_bell(self._sock)
                    wait = min(2 * wait, RECHECK_S[1])
        finally:
            h[CLIENT_SLEEPING] = 0

    def _drain_bells(self, h: memoryview, seq: int) -> None:
        while True:
            try:
                msg = self._sock.recv(16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg and h[REP_SEQ] != seq:
                raise ConnectionError(
                    f"the PSP closed the mailbox at {self.socket_path} (its process is gone?)"
                )
            if not msg:
                return

    # -- platform --
    def export_certs(self) -> PlatformCerts:
        return self._call(K.PDH_CERT_EXPORT)

    def platform_status(self) -> dict[str, object]:
        """API version, batching limits, cost profile and per-command counters."""
        return self._call(K.PLATFORM_STATUS)

    def limits(self) -> dict[str, int]:
        lim = self.platform_status()["limits"]
        assert isinstance(lim, dict)
        return lim

    def map_region(self, shm_name: str, size: int) -> int:
        return self._call(K.MAP_REGION, shm_name, size)

    def unmap_region(self, region: int) -> None:
        self._call(K.UNMAP_REGION, region)

    # -- guest lifecycle --
    def launch(self, region: int, npages: int, policy: int) -> int:
        return self._call(K.LAUNCH_START, region, npages, policy)

    def decommission(self, handle: int) -> None:
        self._call(K.DECOMMISSION, handle)

    def guest_status(self, handle: int) -> tuple[GuestState, int]:
        return self._call(K.GUEST_STATUS, handle)

    # -- send --
    def send_start(self, handle: int, target: PlatformCerts,
                   packet_format: Batching | None = None) -> SendSession:
        return self._call(K.SEND_START, handle, target, packet_format)

    def send_update_data(
        self, handle: int, mode: Batching, pfns: np.ndarray, trans: int, offset: int
    ) -> int:
        return self._call(K.SEND_UPDATE_DATA, handle, mode, pfns, trans, offset)

    def send_update_data_queue(
        self, handle: int, mode: Batching, pfns: np.ndarray, bounds: np.ndarray, trans: int,
        offset: int,
    ) -> int:
        return self._call(K.SEND_UPDATE_DATA_QUEUE, handle, mode, pfns, bounds, trans, offset)

    def send_update_vmsa(self, handle: int, pfn: int, trans: int, offset: int) -> int:
        return self._call(K.SEND_UPDATE_VMSA, handle, pfn, trans, offset)

    def send_trailer(self, handle: int) -> bytes:
        """The finish trailer (SUPDATE, no state change) for the destination's RECEIVE_FINISH."""
        return self._call(K.SEND_TRAILER, handle)

    def send_finish(self, handle: int) -> None:
        self._call(K.SEND_FINISH, handle)

    def send_cancel(self, handle: int) -> None:
        self._call(K.SEND_CANCEL, handle)

    # -- receive --
    def receive_start(self, region: int, npages: int, session: SendSession,
                      packet_format: Batching | None = None) -> int:
        return self._call(K.RECEIVE_START, region, npages, session, packet_format)

    def receive_update_data(
        self, handle: int, mode: Batching, pfns: np.ndarray, trans: int, offset: int, length: int
    ) -> None:
        self._call(K.RECEIVE_UPDATE_DATA, handle, mode, pfns, trans, offset, length)

    def receive_update_data_queue(
        self, handle: int, mode: Batching, pfns: np.ndarray, bounds: np.ndarray, trans: int,
        offset: int, length: int,
    ) -> None:
        self._call(K.RECEIVE_UPDATE_DATA_QUEUE, handle, mode, pfns, bounds, trans, offset, length)

    def receive_update_vmsa(self, handle: int, pfn: int, trans: int, offset: int, length: int) -> None:
        self._call(K.RECEIVE_UPDATE_VMSA, handle, pfn, trans, offset, length)

    def receive_finish(self, handle: int, trailer: bytes) -> bytes:
        return self._call(K.RECEIVE_FINISH, handle, trailer)


def fetch_memory_key(socket_path: str, handle: int) -> bytes:
    """The guest's VEK, for the guest's own vCPU processes (package `cvmig.guest` only).

    This emulates the memory controller: on hardware the VEK sits in the memory controller,
    which encrypts and decrypts the guest's accesses, and the hypervisor never sees it. The
    guest's vCPUs do that work themselves here, so they need the key; they fetch it straight
    from the PSP, never through the hypervisor. Refused (INVALID_GUEST_STATE) unless the
    guest is RUNNING or SUPDATE: a SENT guest must never run again, and a guest still being
    received has no complete memory yet. One SEQPACKET message: a one-off needs no ring.
    """
    cmd = K.FETCH_MEMORY_KEY
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(socket_path)
        s.send(_U32.pack(cmd.id) + cmd.request.encode(handle))
        reply = s.recv(4096)
    if len(reply) < 4:
        raise ConnectionError("the PSP closed the mailbox")
    status = _U32.unpack_from(reply, 0)[0]
    if status != Status.SUCCESS:
        raise_status(status, memoryview(reply)[4:])
    return cmd.reply.decode(memoryview(reply)[4:])


# --- benchmark ----------------------------------------------------------------------------


def doorbell_round_trip(n: int = 2000, socket_path: str | None = None, *,
                        pki: str | None = None) -> dict[str, Any]:
    """Round trips of GUEST_STATUS (a no-op command) through the SEQPACKET socket and
    through the ring: ``{"n", "socket": {...}, "ring": {...}}``, each with ``median_us``,
    ``p90_us``, ``mean_us``, ``min_us``. Uses the PSP at ``socket_path``, or starts one
    (with a throwaway PKI unless ``pki`` names one)."""
    if socket_path is not None:
        return _round_trips(socket_path, n)
    from cvmig.psp import certs
    from cvmig.psp.process import PspProcess  # here: process imports this module

    with tempfile.TemporaryDirectory(prefix="cvmig-doorbell-") as tmp:
        if pki is None:
            certs.AmdRoot.generate().save(os.path.join(tmp, "amd-root"))
            certs.Owner.generate().save(os.path.join(tmp, "owner"))
        with PspProcess(os.path.join(tmp, "psp.sock"), pki=pki or tmp) as psp:
            return _round_trips(psp.socket_path, n)


def _round_trips(socket_path: str, n: int) -> dict[str, Any]:
    from cvmig.psp.testing import ShmRegion

    out: dict[str, Any] = {"n": n}
    with ShmRegion(PAGE_SIZE) as mem:
        for transport in ("socket", "ring"):
            with MailboxClient(socket_path, ring=transport == "ring") as c:
                region = c.map_region(mem.name, mem.size)
                h = c.launch(region, 1, 0)
                for _ in range(min(n, 500)):  # warm up: caches, the PSP's spin, CPU placement
                    c.guest_status(h)
                ts = np.empty(n)
                perf = time.perf_counter
                for i in range(n):
                    t = perf()
                    c.guest_status(h)
                    ts[i] = perf() - t
                c.decommission(h)
                c.unmap_region(region)
            us = ts * 1e6
            out[transport] = {
                "median_us": round(float(np.median(us)), 2),
                "p90_us": round(float(np.percentile(us, 90)), 2),
                "mean_us": round(float(us.mean()), 2),
                "min_us": round(float(us.min()), 2),
            }
    return out


if TYPE_CHECKING:  # mypy proves the binding implements the contract

    def _conforms(c: MailboxClient) -> SecureProcessor:
        return c


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m cvmig.psp.client",
                                 description="GUEST_STATUS round trips: SEQPACKET vs ring.")
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--socket", default=None, help="an already running PSP (default: start one)")
    a = ap.parse_args()
    print(json.dumps(doorbell_round_trip(a.n, a.socket), indent=1))

