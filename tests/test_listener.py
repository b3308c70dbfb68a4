"""The destination's listener: handshakes served concurrently and bounded, a busy
destination refuses a second source, idle and garbage connections delay nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from cvmig.migration.destination import listen
from cvmig.migration.listener import BUSY_MESSAGE, Listener
from cvmig.wire.channel import Channel, PeerGone, RemoteError
from cvmig.wire.frames import VERSION, FrameType
from tests.proctree import (
    attached_vcpus,
    descendants,
    finish_within,
    leftovers,
    wait_for,
    wait_gone,
)

HELLO = {"version": VERSION, "role": "source", "capabilities": ["page"]}


@pytest.fixture
def front() -> Iterator[Listener]:
    with Listener(listen("127.0.0.1", 0), handshake_timeout=0.5) as lst:
        yield lst


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    return s


def _source(port: int) -> Channel:
    chan = Channel(_connect(port))
    chan.send_json(FrameType.HELLO, HELLO)
    return chan


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_a_connection_without_a_handshake_is_dropped(front: Listener) -> None:
    idle = _connect(front.port)
    t0 = time.monotonic()
    assert _closed_within(idle, 3.0)
    assert 0.4 < time.monotonic() - t0 < 2.0
    garbage = _connect(front.port)
    garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert _closed_within(garbage, 3.0)
    partial = _connect(front.port)  # the first bytes of a header, then nothing
    partial.sendall(b"\xe7\xc5\x01")
    assert _closed_within(partial, 3.0)
    assert front.dropped == 3
    assert front.take(timeout=0.1) is None


def test_the_first_valid_source_is_taken_with_its_hello_unread(front: Listener) -> None:
    idle = _connect(front.port)  # opened first, and idle: it must not hold anyone up
    src = _source(front.port)
    t0 = time.monotonic()
    conn = front.take(timeout=5.0)
    assert conn is not None
    assert time.monotonic() - t0 < 0.4  # before the idle one's handshake timeout
    hello = Channel(conn).expect(FrameType.HELLO).json()  # still there for migrate_in
    assert hello["role"] == "source"
    conn.close()
    src.close()
    idle.close()


def test_a_second_source_gets_busy_and_the_first_is_unaffected(front: Listener) -> None:
    first = _source(front.port)
    conn = front.take(timeout=5.0)
    assert conn is not None
    second = _source(front.port)
    with pytest.raises(RemoteError) as e:
        second.expect(FrameType.HELLO)
    assert e.value.message == BUSY_MESSAGE
    # the first one's connection still works both ways
    ch = Channel(conn)
    assert ch.expect(FrameType.HELLO).json()["role"] == "source"
    ch.send_json(FrameType.HELLO, {"role": "destination"})
    assert first.expect(FrameType.HELLO).json()["role"] == "destination"
    front.idle()
    third = _source(front.port)
    assert front.take(timeout=5.0) is not None  # not busy any more
    for c in (first, second, third):
        c.close()
    conn.close()


def test_another_version_is_told_why(front: Listener) -> None:
    s = _connect(front.port)
    header = struct.pack("<HBBIQII", 0xC5E7, 99, int(FrameType.HELLO), 2, 0, 0, 0) + b"{}"
    s.sendall(header)
    chan = Channel(s)
    with pytest.raises((RemoteError, PeerGone)) as e:
        chan.expect(FrameType.HELLO)
    assert isinstance(e.value, RemoteError) and "version 99" in e.value.message
    s.close()


# -- end to end: `cvmig vm --incoming` ------------------------------------------------

def _destination(*extra: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "cvmig", "vm", "--incoming",
                             "tcp:127.0.0.1:0", "--once", "--announce", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    line = json.loads(proc.stdout.readline())
    assert line["event"] == "listening", line
    return proc, int(line["port"])


def _migrate(port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cvmig", "migrate", "--to",
                             f"tcp:127.0.0.1:{port}", "-m", "16M", "--vcpus", "1", "-w", "idle",
                             "--warmup", "0", "--timeout", "0", "-q", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_idle_and_garbage_connections_do_not_delay_a_real_migration() -> None:
    # a handshake timeout far longer than the migration: served one at a time, the idle
    # connection opened first would hold the real source up for 30 s
    dest, port = _destination("--handshake-timeout", "30")
    idle = _connect(port)
    garbage = _connect(port)
    garbage.sendall(os.urandom(64))
    trickle = _connect(port)
    trickle.sendall(b"\xe7")
    t0 = time.monotonic()
    code, _, err = finish_within(_migrate(port), 60.0)
    took = time.monotonic() - t0
    assert code == 0, err
    assert took < 20.0, f"the migration took {took:.1f} s"
    dcode, dout, derr = finish_within(dest, 20.0)
    assert dcode == 0, derr
    assert '"event": "migrated"' in dout
    for s in (idle, garbage, trickle):
        s.close()


def test_a_second_source_to_a_busy_destination_is_refused() -> None:
    dest, port = _destination()
    tree: dict[int, str] = {}
    first = _migrate(port, "--max-bandwidth", "2M")  # about 8 s of transfer
    try:
        # wait until the destination receives (its vCPUs have the guest's memory), then
        # try a second one
        deadline = time.monotonic() + 60.0
        while not attached_vcpus(dest.pid):
            assert time.monotonic() < deadline and first.poll() is None, "never started"
            time.sleep(0.05)
        tree = descendants(dest.pid)
        code2, _, err2 = finish_within(_migrate(port), 60.0)
        assert code2 == 1, err2
        assert "busy" in err2, err2
        assert "Traceback" not in err2, err2
        assert first.poll() is None  # still migrating
        code1, _, err1 = finish_within(first, 90.0)
        assert code1 == 0, err1
        dcode, dout, derr = finish_within(dest, 20.0)
        assert dcode == 0, derr
    finally:
        for p in (first, dest):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert not wait_gone(tree, 10.0)
    assert not leftovers([dest.pid, first.pid, *tree])


def test_sigterm_ends_a_waiting_destination_cleanly() -> None:
    dest, port = _destination()
    tree = descendants(dest.pid)
    t0 = time.monotonic()
    os.killpg(dest.pid, signal.SIGTERM)
    code, _, err = finish_within(dest, 10.0)
    assert code == 128 + signal.SIGTERM, err
    assert "terminating on SIGTERM" in err
    assert "Traceback" not in err
    assert time.monotonic() - t0 < 5.0
    assert not wait_gone(tree, 10.0)
    assert not leftovers([dest.pid, *tree])


def test_after_a_failed_migration_the_destination_starts_its_vcpus_again() -> None:
    """A destination that serves more than one migration: the one that failed took a
    prestarted vCPU process with it; the destination starts another before the next
    source comes, and that source's guest runs on the refilled ones."""
    proc = subprocess.Popen([sys.executable, "-m", "cvmig", "vm", "--incoming",
                             "tcp:127.0.0.1:0", "--announce", "--vcpus", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    tree: dict[int, str] = {}

    def vcpus() -> set[int]:
        return {p for p, c in descendants(proc.pid).items() if "cvmig.guest.vcpu" in c}

    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["event"] == "listening", line
        port = int(line["port"])
        ahead = vcpus()
        assert len(ahead) == 2 and not attached_vcpus(proc.pid)
        # about 8 s of transfer, cancelled (Ctrl-C) once the guest is coming in
        first = _migrate(port, "--max-bandwidth", "2M")
        assert wait_for(lambda: bool(attached_vcpus(proc.pid)) or first.poll() is not None,
                        60.0)
        first.send_signal(signal.SIGINT)
        code, _, err = finish_within(first, 60.0)
        assert code == 130, err
        assert json.loads(proc.stdout.readline())["event"] == "failed"
        refilled: set[int] = set()

        def back() -> bool:
            nonlocal refilled
            refilled = vcpus()
            return len(refilled) == 2 and not attached_vcpus(proc.pid)

        assert wait_for(back, 30.0), (ahead, vcpus())
        assert len(refilled & ahead) == 1  # the one not taken stayed; the taken one is gone
        code, _, err = finish_within(_migrate(port, "--vcpus", "2"), 60.0)
        assert code == 0, err
        assert json.loads(proc.stdout.readline())["event"] == "migrated"
        assert set(attached_vcpus(proc.pid)) == refilled == vcpus()
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        dcode, _, derr = finish_within(proc, 20.0)
        assert dcode == 128 + signal.SIGTERM, derr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not wait_gone(tree, 10.0)
    assert not leftovers([proc.pid, *tree])
