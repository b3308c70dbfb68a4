"""Start a child process and wait, bounded, until it says it is ready; then stop it.

One handshake for every child the project starts: the parent passes the child one end of
a socketpair (its descriptor number in ``$CVMIG_PARENT_FD``); the child writes JSON lines
on it, first ``{"event": "ready", ...}`` (or ``{"event": "failed", "error": ...}``), and may
send more events later. The parent waits for each line with a deadline and sees the child's
death at once (end of file), not after a timeout. The same socket is the child's lifeline:
it reads end of file when the parent is gone, so a child can exit with its parent without
polling. stdout and stderr stay free for the child's own output.

Standard library only, and nothing from cvmig: any part (psp, guest, migration) may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

ENV = "CVMIG_PARENT_FD"


class ChildFailed(RuntimeError):
    """The child exited, failed, or did not answer in time."""


class Child:
    """The parent's handle on a child started by `spawn`; ``info`` is its ready message."""

    def __init__(self, proc: subprocess.Popen[bytes], chan: socket.socket, what: str) -> None:
        self.proc = proc
        self.what = what
        self.info: dict[str, Any] = {}
        self._chan = chan
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def recv(self, timeout: float) -> dict[str, Any]:
        """The child's next event; `ChildFailed` if it exits or is silent for ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._chan], [], [], left)[0]:
                raise ChildFailed(f"{self.what} (pid {self.pid}) said nothing for {timeout:g} s")
            data = self._chan.recv(65536)
            if not data:
                code = _wait_briefly(self.proc)
                raise ChildFailed(f"{self.what} (pid {self.pid}) exited (exit code {code})")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._chan.close()
        return self.proc.returncode

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def spawn(argv: Sequence[str], *, what: str, ready_timeout: float,
          pass_fds: Sequence[int] = (), env: dict[str, str] | None = None,
          **popen: Any) -> Child:
    """Start ``argv`` and return once it announced ready (`Parent.ready`); on failure,
    silence past ``ready_timeout`` or death, kill it and raise `ChildFailed`.

    The child runs in a session of its own (unless ``start_new_session=False`` is passed):
    a terminal's Ctrl-C, sent to the whole foreground process group, reaches only the
    parent, which decides how its children end. A child still ends with its parent: the
    handshake socket is its lifeline."""
    popen.setdefault("start_new_session", True)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child_env = dict(os.environ if env is None else env)
    child_env[ENV] = str(theirs.fileno())
    try:
        proc = subprocess.Popen(list(argv), pass_fds=(theirs.fileno(), *pass_fds),
                                env=child_env, **popen)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    child = Child(proc, ours, what)
    try:
        msg = child.recv(ready_timeout)
        if msg.get("event") != "ready":
            raise ChildFailed(f"{what} did not start: {msg.get('error', msg)}")
    except BaseException:
        child.stop(timeout=1.0)
        raise
    child.info = msg
    return child


class Parent:
    """The child's end of the handshake: announce, report, and learn when the parent is gone."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def from_env(cls) -> Parent | None:
        """The channel `spawn` set up, or None if this process was started some other way."""
        fd = os.environ.pop(ENV, None)
        return None if fd is None else cls(socket.socket(fileno=int(fd)))

    def send(self, **event: Any) -> None:
        with contextlib.suppress(OSError):  # a parent that is gone reads nothing
            self._sock.sendall(json.dumps(event).encode() + b"\n")

    def ready(self, **info: Any) -> None:
        self.send(event="ready", pid=os.getpid(), **info)

    def fail(self, error: str) -> None:
        self.send(event="failed", error=error)

    def fileno(self) -> int:
        """Readable (end of file) once the parent is gone: put it in a poll set."""
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


def _wait_briefly(proc: subprocess.Popen[bytes]) -> int | None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1.0)
    return proc.returncode
