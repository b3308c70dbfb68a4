"""The doorbell: a shared-memory command slot per client connection, with a cheap wake-up.

Why: on this (virtualised, 2-core) machine a blocking wake-up of a process on another,
idle CPU costs ~40 µs (the halted vCPU must be woken by the host), so a SEQPACKET round
trip costs ~100 µs when client and PSP sit on different CPUs, ~12 µs when the scheduler
puts them on the same one; the server's own work is ~3 µs. A spinner sees the other core's
store in ~0.5 µs, but spinning for a peer on the SAME CPU only delays it (~130 µs).

So each side publishes the CPU it runs on, and spins (bounded, ``SPIN_S``) only while the
peer demonstrably runs on another CPU: the server after serving a client on another CPU,
waiting for its next command; a client whose request found the server spinning (no bell
needed) on another CPU, and only until the server takes it (``TAKE_S``). Otherwise it
sleeps at once on an eventfd, which the waker writes only if the other side said it
sleeps. Spinners never call sched_yield (under load a yielding spinner waits a whole
scheduler slice, milliseconds).

Layout of one slot, a sealed memfd the server creates and both map (fixed size: nobody can
shrink it under the other, so no SIGBUS): a 4 KiB header of u64 words, the request area
(``MAX_MESSAGE`` bytes), the reply area (``MAX_REPLY``). Pages are only backed once touched.
The client writes the request, then its length and command, then bumps ``REQ_SEQ`` last;
the server writes the reply, then ``REP_SEQ`` = that sequence number. x86 stores become
visible in program order (TSO), so publishing the sequence number last is enough.

The "I sleep" flags race (store flag, load the other's sequence number, which x86 may
reorder): a wake-up can be lost. The sleeper's wait is therefore bounded and re-checks,
and a client whose request was not taken rings again: a lost wake-up costs a millisecond,
never a hang. Client and server each wake on their own eventfd: ``doorbell`` (server, one
for all rings) and the per-connection ``reply`` eventfd.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
from collections.abc import Callable

from cvmig.psp.commands import MAX_MESSAGE, MAX_REPLY

HEADER = 4096
REQ_OFF = HEADER
REP_OFF = HEADER + MAX_MESSAGE
SIZE = REP_OFF + MAX_REPLY

# u64 word indices in the header; the client's and the server's words on separate lines.
REQ_SEQ, REQ_CMD, REQ_LEN, CLIENT_SLEEPING, CLIENT_CPU = 0, 1, 2, 3, 4
REP_SEQ, REP_STATUS, REP_LEN, SERVER_SLEEPING, TAKEN_SEQ, SERVER_CPU = 8, 9, 10, 11, 12, 13
NO_CPU = 0xFFFF_FFFF  # not known (yet)

SPIN_S = 50e-6  # longest spin: a no-op or page command, or the engine's gap between two
TAKE_S = 10e-6  # a spinning server takes a request within ~3 µs; if not, it is busy or away
RECHECK_S = (1e-3, 50e-3)  # a sleeper's first and longest bounded wait (lost wake-ups)

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class Ring:
    """One mapped slot: ``hdr`` (u64 words), ``req`` and ``rep`` byte areas."""

    def __init__(self, fd: int) -> None:
        if os.fstat(fd).st_size != SIZE:
            raise ValueError(f"doorbell ring of {os.fstat(fd).st_size} B, expected {SIZE}")
        self._mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mv = memoryview(self._mm)
        self.hdr = mv[:HEADER].cast("Q")
        self.req = mv[REQ_OFF:REP_OFF]
        self.rep = mv[REP_OFF:SIZE]
        self._views = (mv, self.hdr, self.req, self.rep)

    @staticmethod
    def create_fd() -> int:
        """A fresh sealed memfd of the ring's size (the server's side)."""
        fd = os.memfd_create("cvmig-psp-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, SIZE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        for v in reversed(self._views):
            v.release()
        with contextlib.suppress(BufferError):
            self._mm.close()


def _cpu_getter() -> Callable[[], int]:
    try:
        f = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):  # no glibc: placement unknown, peers look remote
        return lambda: NO_CPU
    f.restype, f.argtypes = ctypes.c_int, []
    return lambda: f() & NO_CPU  # ~0.5 µs


current_cpu = _cpu_getter()


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def ring_bell(fd: int) -> None:
    with contextlib.suppress(OSError):  # the other side is gone: its own checks see to it
        os.eventfd_write(fd, 1)


def drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)
