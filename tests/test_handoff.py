"""The handoff as a commit protocol: one owner at every instant, whatever breaks in the
end game (the break after CONFIRM that used to lose the guest, a killed source, a stall
after the pause, a digest mismatch), and in-doubt states that a decision resolves."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmig.guest.vm import GuestConfig
from cvmig.guest.workloads import parse_workload
from cvmig.migration.driver import MigrationParams
from cvmig.migration.host import Host
from cvmig.migration.resolve import resolve_in_doubt
from cvmig.migration.source import (
    LEASE_MARGIN_S,
    LEASE_S,
    MigrationFailed,
    MigrationInDoubt,
    SourceVM,
    migrate_out,
)
from cvmig.monitor.testing import RawQMP, VmProcess
from cvmig.psp.api import GuestState, Policy
from cvmig.wire.frames import HEADER, HEADER_SIZE, FrameType
from tests.test_migration_failures import assert_still_running_intact

MiB = 1 << 20
ES = int(Policy.NODBG | Policy.ES)


class FrameProxy:
    """Relays every connection to ``target``, frame by frame. On the first connection,
    when the ``nth`` frame of ``ftype`` comes in direction ``way`` ("s2d" or "d2s"), it
    applies ``action``: "cut" (the frame is not delivered; both ends are closed) or
    "stall" (that direction delivers nothing more; the connection stays open until the
    proxy is closed). Later connections (the in-doubt decision) go through untouched."""

    def __init__(self, target: tuple[str, int], way: str, ftype: FrameType, action: str,
                 nth: int = 1, only_first: bool = False) -> None:
        self.target, self.way, self.ftype, self.action, self.nth = target, way, ftype, action, nth
        self.only_first = only_first  # later connections are closed at once: unreachable
        self.fired = threading.Event()
        self._seen = 0
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self._srv.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._closing = False
        self._first = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                a, _ = self._srv.accept()
            except OSError:
                return
            if self.only_first and not self._first:
                _close(a)
                continue
            try:
                b = socket.create_connection(self.target)
            except OSError:  # the destination is gone (a late decision): nobody to relay to
                _close(a)
                continue
            self._socks += [a, b]
            faulty, self._first = self._first, False
            for src, dst, way in ((a, b, "s2d"), (b, a, "d2s")):
                threading.Thread(target=self._pump, args=(src, dst, way, faulty, (a, b)),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str, faulty: bool,
              pair: tuple[socket.socket, socket.socket]) -> None:
        buf = b""
        try:
            while True:
                chunk = src.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= HEADER_SIZE:
                    _, _, t, meta_len, data_len, _, _ = HEADER.unpack_from(buf)
                    size = HEADER_SIZE + meta_len + data_len
                    if len(buf) < size:
                        break
                    frame, buf = buf[:size], buf[size:]
                    if faulty and way == self.way and t == self.ftype and not self.fired.is_set():
                        self._seen += 1
                        if self._seen == self.nth:
                            self.fired.set()
                            if self.action == "cut":
                                for s in pair:
                                    _close(s)
                                return
                    if faulty and self.fired.is_set() and self.action == "stall" and way == self.way:
                        continue  # swallowed: the peer hears nothing more this way
                    dst.sendall(frame)
        except OSError:
            pass
        for s in pair:
            if not (faulty and self.action == "stall" and self.fired.is_set()):
                _close(s)

    def close(self) -> None:
        self._closing = True
        _close(self._srv)
        for s in self._socks:
            _close(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


class Destination:
    """`cvmig vm --incoming --once --announce`, its JSON events read as they come."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cvmig", "vm", "--incoming", "tcp:127.0.0.1:0", "--once",
             "--announce"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ev = self.event(60)
        assert ev.get("event") == "listening", ev
        self.port = int(ev["port"])
        self.uri = f"tcp:127.0.0.1:{self.port}"

    def event(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert r, f"no event from the destination within {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"destination exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
        return dict(json.loads(line))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def host() -> Iterator[Host]:
    with Host("source") as h:
        yield h


@pytest.fixture
def dest() -> Iterator[Destination]:
    d = Destination()
    yield d
    d.close()


def boot(host: Host) -> SourceVM:
    cfg = GuestConfig(memory=16 * MiB, vcpus=2,
                      workload=parse_workload("dirtier:rate=2000,pattern=hotcold"))
    return SourceVM.boot(host, cfg, ES)


def test_lost_released_is_delivered_again_and_the_destination_owns_the_guest(
    host: Host, dest: Destination
) -> None:
    """The case that lost the guest: the source has committed (SEND_FINISH) and its
    RELEASED never arrives. The destination holds the guest paused in doubt; the source
    delivers its decision over a new connection; the guest runs there, and only there."""
    vm = boot(host)
    proxy = FrameProxy(("127.0.0.1", dest.port), "s2d", FrameType.RELEASED, "cut")
    try:
        out = migrate_out(vm, proxy.uri, MigrationParams(), resolve_window_s=30)
        assert proxy.fired.is_set()
        assert out.source_digest == out.confirm.get("digest")
        ev = dest.event(30)
        assert ev["event"] == "in-doubt", ev  # it held the guest paused, did not discard
        ev = dest.event(30)
        assert ev["event"] == "migrated", ev  # the source's decision reached it
        assert ev["report"]["check"]["ok"] is True
        assert not vm.alive  # the source released it: SENT, shut down
    finally:
        proxy.close()
        vm.shutdown()


def test_source_killed_after_confirm_leaves_the_guest_in_doubt_until_an_operator_keeps_it(
    dest: Destination,
) -> None:
    """kill -9 of the source while it checks its digest: the destination's lease runs
    out, it pauses the guest and holds it; `cvmig resolve --keep` runs it there."""
    proxy = FrameProxy(("127.0.0.1", dest.port), "d2s", FrameType.CONFIRM, "stall")
    src = subprocess.Popen(
        [sys.executable, "-m", "cvmig", "migrate", "--to", proxy.uri, "--memory", "16M",
         "--warmup", "0.1", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        assert proxy.fired.wait(120), "the migration never reached CONFIRM"
        os.killpg(src.pid, signal.SIGKILL)  # the source and everything it started
        src.wait(10)
        t0 = time.monotonic()
        ev = dest.event(LEASE_S + 10)
        assert ev["event"] == "in-doubt", ev
        assert time.monotonic() - t0 <= LEASE_S + 3  # noticed within the lease
        r = subprocess.run([sys.executable, "-m", "cvmig", "resolve", dest.uri, "--keep"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        ev = dest.event(30)
        assert ev["event"] == "migrated" and ev["report"]["check"]["ok"] is True, ev
    finally:
        proxy.close()
        if src.poll() is None:
            os.killpg(src.pid, signal.SIGKILL)
        for f in (src.stdout, src.stderr):
            if f is not None:
                f.close()


def test_stall_after_the_pause_gives_the_guest_back_to_the_source_in_bounded_time(
    host: Host, dest: Destination,
) -> None:
    """The link stalls right after FINISH: the destination never hears it, the source
    hears nothing back. The source resumes the guest once the destination's lease must
    have run out, not after a socket timeout of a minute; the destination discards."""
    vm = boot(host)
    proxy = FrameProxy(("127.0.0.1", dest.port), "s2d", FrameType.FINISH, "stall")
    try:
        t0 = time.monotonic()
        with pytest.raises(MigrationFailed):
            migrate_out(vm, proxy.uri, MigrationParams())
        took = time.monotonic() - t0
        assert proxy.fired.is_set()
        assert_still_running_intact(vm)
        # from FINISH: the end game's 5 s timeout, then the lease's end, at most
        assert took < 25
        ev = dest.event(LEASE_S + LEASE_MARGIN_S + 30)
        assert ev["event"] == "failed", ev  # it never resumed: nothing to hold in doubt
    finally:
        proxy.close()
        vm.shutdown()


def test_digest_mismatch_stops_the_destination_before_the_source_resumes(
    host: Host, dest: Destination, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The source's own check differs (a dirty-tracking fault): it cancels, the
    destination stops and discards its copy and says so, and only then does the source
    resume: never on both hosts at once."""
    vm = boot(host)
    real = vm.guest.digest
    monkeypatch.setattr(vm.guest, "digest", lambda: "0" * 64 if real() else "")
    try:
        with pytest.raises(MigrationFailed, match="does not match"):
            migrate_out(vm, dest.uri, MigrationParams())
        ev = dest.event(30)
        assert ev["event"] == "failed", ev
        assert_still_running_intact(vm)
    finally:
        vm.shutdown()


def test_operator_decision_to_a_destination_holding_nothing_is_refused(
    dest: Destination,
) -> None:
    """`cvmig resolve` to a destination that is not in doubt changes nothing there."""
    with pytest.raises((RuntimeError, ConnectionError, OSError)):
        resolve_in_doubt(dest.uri, keep=True, timeout=5)
    assert dest.proc.poll() is None  # still listening for a real migration


def test_in_doubt_source_says_so_and_what_to_run(host: Host, dest: Destination) -> None:
    """A source that released the guest but can reach no destination at all:
    MigrationInDoubt, naming the command that resolves it; its own copy stays paused and
    unfinished (the destination may run the guest, so it is never resumed on its own)
    until it is released, here once the operator has kept the guest at the destination."""
    vm = boot(host)
    proxy = FrameProxy(("127.0.0.1", dest.port), "s2d", FrameType.RELEASED, "cut",
                       only_first=True)  # the decision's connections find nobody
    try:
        with pytest.raises(MigrationInDoubt, match="cvmig resolve") as info:
            migrate_out(vm, proxy.uri, MigrationParams(), resolve_window_s=2)
        hold = info.value.hold
        assert hold is not None and vm.alive and vm.guest.paused
        assert host.psp is not None
        assert host.psp.guest_status(vm.handle)[0] is GuestState.SUPDATE  # not finished
        ev = dest.event(30)
        assert ev["event"] == "in-doubt", ev
        resolve_in_doubt(dest.uri, keep=True)
        ev = dest.event(30)
        assert ev["event"] == "migrated", ev
        hold.release()
        assert not vm.alive  # SENT and shut down: it can never run here again
        with pytest.raises(MigrationFailed):
            hold.keep()  # decided: an operator cannot take it back any more
    finally:
        proxy.close()
        vm.shutdown()


def test_qmp_shows_the_in_doubt_guest_and_resolves_it(
    host: Host, tmp_path: os.PathLike[str],
) -> None:
    """A QMP-driven destination holding a guest in doubt says so in query-status and
    query-migrate, and `x-migrate-resolve` with decision 'keep' runs it there."""
    from cvmig.monitor.testing import RawQMP, VmProcess

    dst = VmProcess(os.path.join(tmp_path, "dst.sock"), ["--incoming", "tcp:127.0.0.1:0"])
    vm = boot(host)
    # the source must not reach the destination again within its window: later
    # connections are refused at once (closing the proxy once the cut fired raced with
    # the source's first retry on a loaded machine, which then delivered its decision)
    proxy = FrameProxy(("127.0.0.1", dst.port), "s2d", FrameType.RELEASED, "cut",
                       only_first=True)
    try:
        with pytest.raises(MigrationInDoubt):
            migrate_out(vm, proxy.uri, MigrationParams(), resolve_window_s=1)
        with RawQMP(os.path.join(tmp_path, "dst.sock")) as q:
            st = q.poll("query-status", lambda r: "x-in-doubt" in r, timeout=LEASE_S + 10)
            assert st["running"] is False
            assert "x-in-doubt" in q.ok("query-migrate")
            assert q.cmd("x-migrate-resolve", {"decision": "maybe"})["error"]["class"] == \
                "GenericError"
            q.ok("x-migrate-resolve", {"decision": "keep"})
            q.poll("query-migrate", lambda r: r.get("status") == "completed", timeout=30)
            st = q.ok("query-status")
            assert st["running"] is True and "x-in-doubt" not in st
    finally:
        proxy.close()
        vm.shutdown()
        dst.close()


def test_qmp_source_holds_its_copy_when_the_destination_dies_at_released(
    dest: Destination, tmp_path: Path,
) -> None:
    """A source under QMP releases the guest and its destination dies before it can take
    it: the source shows x-in-doubt with its copy paused (it never resumes it on its own),
    and an operator's x-migrate-resolve keep runs it there again."""
    src = VmProcess(str(tmp_path / "src.sock"), ["--memory", "16M", "--vcpus", "2",
                                                 "--workload", "dirtier:rate=500"])
    proxy = FrameProxy(("127.0.0.1", dest.port), "s2d", FrameType.RELEASED, "cut",
                       only_first=True)
    try:
        with RawQMP(src.qmp_path) as qmp:
            qmp.ok("migrate", {"uri": proxy.uri})
            assert proxy.fired.wait(60), "the migration never reached RELEASED"
            dest.proc.kill()  # its host dies with the guest it ran on a lease
            dest.proc.wait(10)
            st = qmp.poll("query-status", lambda r: "x-in-doubt" in r, timeout=20)
            assert st["running"] is False, st  # paused: never resumed on its own
            assert "x-in-doubt" in qmp.ok("query-migrate")
            qmp.ok("x-migrate-resolve", {"decision": "keep"})
            st = qmp.ok("query-status")
            assert st == {"running": True, "status": "running"}, st
            assert qmp.ok("query-migrate")["status"] == "failed"
    finally:
        proxy.close()
        src.close()
