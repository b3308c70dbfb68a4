"""Helpers for tests that signal or kill cvmig processes: the process tree under a pid
(children run in sessions of their own, so a process group does not find them), waiting
for processes to be gone, and what cvmig left in /dev/shm and the temporary directory
under the pids of a tree."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable

import pytest

_SHM_PID = re.compile(r"^cvmig-[a-z]+(?:-[a-z]+)*-(\d+)-")
_DIR_PID = re.compile(r"^cvmig-(?:source|destination)-(\d+)-")


def _stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of a live process, None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[1]), rest[0]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> dict[int, str]:
    """Live descendants of ``root`` (not root itself): pid -> command line."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                parent[int(name)] = st[0]
    out: dict[int, str] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for child, pp in parent.items():
            if pp == p and child not in out:
                out[child] = cmdline(child)
                frontier.append(child)
    return out


def attached_vcpus(host: int) -> list[int]:
    """vCPU processes under ``host`` that have a guest's memory mapped: a destination's
    once a guest is coming in (the ones it starts ahead map nothing until then)."""
    out = []
    for pid, cmd in descendants(host).items():
        if "cvmig.guest.vcpu" not in cmd:
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                if "/cvmig-guest-" in f.read():
                    out.append(pid)
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    return _stat(pid) is not None


def wait_for(cond: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    """Poll ``cond`` until true or ``timeout`` s have passed; its last value."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until every pid is gone; the ones still alive after ``timeout`` s."""
    pids = list(pids)
    wait_for(lambda: not any(alive(p) for p in pids), timeout)
    return [p for p in pids if alive(p)]


def leftovers(pids: Iterable[int]) -> list[str]:
    """cvmig's shm names and host directories owned by any of ``pids``."""
    want = {str(p) for p in pids}
    found: list[str] = []
    for name in os.listdir("/dev/shm"):
        m = _SHM_PID.match(name)
        if m and m.group(1) in want:
            found.append("/dev/shm/" + name)
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        m = _DIR_PID.match(name)
        if m and m.group(1) in want:
            found.append(os.path.join(tmp, name))
    return found


def finish_within(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``proc``, which must end within ``timeout`` s."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args!r} did not end within {timeout} s: {err[-2000:]}")
    return proc.returncode, out, err
