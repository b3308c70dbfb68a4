"""Test helpers: a `cvmig vm --qmp` child process and a raw, synchronous QMP client.

The raw client sends bytes as given (malformed JSON included) and keeps events apart
from replies, waiting on the socket with deadlines, never with fixed sleeps.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


class VmProcess:
    """`cvmig vm --qmp unix:PATH --announce ...` as a child; ready once it has said so."""

    def __init__(self, qmp_path: str, args: list[str], timeout: float = 60.0) -> None:
        self.qmp_path = qmp_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cvmig", "vm", "--qmp", f"unix:{qmp_path}", "--announce",
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
        self.ready = self._read_line(timeout)
        if not self.ready:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            self.proc.wait(10)
            raise RuntimeError(f"cvmig vm did not start (exit {self.proc.returncode}): "
                               f"{err[-3000:]}")

    def _read_line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return {}
            chunk = os.read(fd, 4096)
            if not chunk:
                return {}
            buf += chunk
        return dict(json.loads(buf.splitlines()[0]))

    @property
    def port(self) -> int:
        return int(self.ready["port"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Quit through QMP if it still runs (clean shutdown), else kill."""
        if self.alive():
            try:
                with RawQMP(self.qmp_path, timeout=5.0) as q:
                    q.cmd("quit")
                self.proc.wait(60)
            except (OSError, TimeoutError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()

    def stderr_text(self) -> str:
        if self.alive() or self.proc.stderr is None or self.proc.stderr.closed:
            return ""
        return self.proc.stderr.read().decode(errors="replace")


class RawQMP:
    """A QMP connection that sends raw bytes and reads whole messages with deadlines."""

    def __init__(self, path: str, negotiate: bool = True, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting = self.recv()
        if negotiate:
            reply = self.cmd("qmp_capabilities")
            if reply != {"return": {}}:
                raise RuntimeError(f"negotiation failed: {reply}")

    def __enter__(self) -> RawQMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message, event or reply; TimeoutError past the deadline."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError("no QMP message before the deadline")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the monitor closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def reply(self, timeout: float | None = None) -> dict[str, Any]:
        """The next reply; events that come first are kept in ``events``."""
        while True:
            msg = self.recv(timeout)
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def cmd(self, name: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        self.send_raw(json.dumps(msg) + "\n")
        return self.reply()

    def ok(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """The command's ``return`` value; AssertionError with the error otherwise."""
        r = self.cmd(name, args)
        assert "return" in r, f"{name} {args}: {r}"
        return r["return"]

    def wait_event(self, name: str, pred: Callable[[dict[str, Any]], bool] = lambda d: True,
                   timeout: float = 30.0) -> dict[str, Any]:
        """The first event ``name`` whose data satisfies ``pred``, kept or yet to come."""
        for i, ev in enumerate(self.events):
            if ev["event"] == name and pred(ev.get("data", {})):
                del self.events[: i + 1]
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event before the deadline")
            msg = self.recv(left)
            if "event" not in msg:
                raise AssertionError(f"unexpected reply while waiting for {name}: {msg}")
            if msg["event"] == name and pred(msg.get("data", {})):
                return msg
            self.events.append(msg)

    def poll(self, name: str, pred: Callable[[Any], bool], timeout: float = 30.0,
             args: dict[str, Any] | None = None, interval: float = 0.02) -> Any:
        """Run ``name`` until ``pred`` holds on its return, or the deadline; that return."""
        deadline = time.monotonic() + timeout
        while True:
            ret = self.ok(name, args)
            if pred(ret):
                return ret
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} never satisfied the condition; last: {ret}")
            time.sleep(interval)  # spaces the polls; the deadline bounds the wait
