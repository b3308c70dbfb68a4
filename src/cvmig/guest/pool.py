"""vCPU processes started ahead of the guest they will run.

A vCPU is a fresh interpreter (``python -m cvmig.guest.vcpu``); starting one and importing
what it runs costs ~0.25 s of wall time and ~0.35 CPU-seconds here. A destination that
starts its vCPUs when a migration arrives spends that inside the migration, on the cores
the pages stream through. QEMU's destination is a process started with ``-incoming``
before the migration begins, its vCPU threads already made; a `VcpuPool` is that: the
processes are up, their imports done, each waiting to be told which vCPU of which guest
it is (`cvmig.guest.vcpu.VcpuSpec`).

A pooled process holds no guest memory, key or shm name until it is taken, so a host
killed outright leaves nothing behind: its pooled vCPUs read end of file and exit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

_WARM_TIMEOUT = 60.0


@dataclass
class VcpuProcess:
    """One vCPU process and the hypervisor's end of its connection. ``warm``: it has said
    its imports are done (its "warm" message is read); otherwise that message is still
    to come, ahead of any answer."""

    proc: subprocess.Popen[bytes]
    conn: Connection
    warm: bool = False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        self.conn.close()


def spawn_vcpu() -> VcpuProcess:
    """Start one vCPU process; it says "warm" once it can be told what to run."""
    # a fresh interpreter (python -m): no fork of the hypervisor's state, and no
    # re-import of the caller's __main__ as spawn would do
    ours, theirs = socket.socketpair()
    with theirs:
        try:
            p = subprocess.Popen(
                [sys.executable, "-m", "cvmig.guest.vcpu", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                # a terminal's Ctrl-C reaches the hypervisor only; a vCPU ends with it all
                # the same (its connection reads end of file)
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
    return VcpuProcess(p, Connection(ours.detach()))


class VcpuPool:
    """Warm vCPU processes for the next guest this host starts (see the module doc)."""

    def __init__(self) -> None:
        self._warm: list[VcpuProcess] = []
        self._closed = False
        self.size = 0  # how many the last fill asked for: what refill restores

    def __len__(self) -> int:
        return len(self._warm)

    def fill(self, n: int, timeout: float = _WARM_TIMEOUT) -> None:
        """Start processes until ``n`` are warm; return when they are. Raises
        RuntimeError if one cannot be started, dies or does not get warm within
        ``timeout`` (those warm already stay pooled)."""
        if self._closed:
            raise RuntimeError("the vCPU pool is closed")
        self.size = n
        alive = []
        for w in self._warm:
            if w.proc.poll() is None:
                alive.append(w)
            else:
                w.kill()  # died while pooled: reap it and close our end
        self._warm = alive
        deadline = time.monotonic() + timeout
        pending: dict[Connection, VcpuProcess] = {}
        v: VcpuProcess | None = None
        try:
            for _ in range(max(0, n - len(self._warm))):
                try:
                    v = spawn_vcpu()
                except OSError as e:  # out of processes or descriptors
                    raise RuntimeError(f"cannot start a vCPU process: {e}") from None
                pending[v.conn] = v
                v = None
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{len(pending)} vCPU process(es) did not start "
                                       f"within {timeout:.0f} s")
                for c in wait(list(pending), min(left, 1.0)):
                    v = pending.pop(c)  # type: ignore[call-overload]
                    try:
                        msg = v.conn.recv()
                    except (EOFError, OSError):
                        raise RuntimeError(f"a vCPU process (pid {v.proc.pid}) exited as it "
                                           "started") from None
                    if msg != ("warm", None):
                        raise RuntimeError(f"a vCPU process said {msg!r} as it started")
                    v.warm = True
                    self._warm.append(v)
                    v = None
        except BaseException:
            for u in [*pending.values(), *([v] if v is not None else [])]:
                u.kill()
            raise

    def refill(self) -> None:
        """Make it as full as the last fill did (after a guest took from it). A failure
        costs only the head start: the next guest starts what is missing as it comes."""
        with contextlib.suppress(RuntimeError):
            self.fill(self.size)

    def take(self) -> VcpuProcess:
        """A warm process if one lives, else a fresh one (its "warm" still to come)."""
        while self._warm:
            v = self._warm.pop(0)
            if v.proc.poll() is None:
                return v
            v.kill()  # died while pooled (killed from outside): reap it, try the next
        return spawn_vcpu()

    def close(self) -> None:
        self._closed = True
        for v in self._warm:
            v.kill()
        self._warm.clear()
