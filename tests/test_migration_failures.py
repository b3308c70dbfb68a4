"""Nothing is lost: every failure leaves the guest running on the source, memory intact."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cvmig.guest.vm import GuestConfig
from cvmig.guest.workloads import parse_workload
from cvmig.migration.driver import MigrationParams, Progress
from cvmig.migration.host import Host
from cvmig.migration.session import DestinationProcess
from cvmig.migration.source import MigrationFailed, SourceVM, migrate_out
from cvmig.psp.api import Batching, GuestState, Policy
from cvmig.wire.channel import parse_uri
from tests.netfault import Relay

MiB = 1 << 20
ES = int(Policy.NODBG | Policy.ES)


@pytest.fixture
def host() -> Iterator[Host]:
    with Host("source") as h:
        yield h


def boot(host: Host, workload: str = "dirtier:rate=3000,pattern=hotcold",
         policy: int = ES) -> SourceVM:
    cfg = GuestConfig(memory=32 * MiB, vcpus=2, workload=parse_workload(workload))
    return SourceVM.boot(host, cfg, policy)


def ops(vm: SourceVM) -> int:
    return sum(s.ops for s in vm.guest.stats())


def assert_still_running_intact(vm: SourceVM) -> None:
    """The guest runs on the source (its counters advance), the PSP has it RUNNING, and
    its memory passes the workload's own exact check."""
    assert vm.host.psp is not None
    assert vm.host.psp.guest_status(vm.handle)[0] is GuestState.RUNNING
    before = ops(vm)
    deadline = time.monotonic() + 10
    while ops(vm) <= before:
        assert time.monotonic() < deadline, "guest did not resume on the source"
        time.sleep(0.01)
    vm.guest.pause()
    check = vm.guest.check()
    assert check["ok"], check
    vm.guest.resume()


def fails_but_keeps_running(vm: SourceVM, uri: str, match: str | None = None,
                            **kw: object) -> None:
    """The migration fails with a clear error, and the guest runs on, intact."""
    with pytest.raises(MigrationFailed, match=match):
        migrate_out(vm, uri, io_timeout=20, **kw)  # type: ignore[arg-type]
    assert_still_running_intact(vm)


def run_failing(vm: SourceVM, uri: str, when: Callable[[str, Progress], bool],
                action: Callable[[], None], match: str,
                params: MigrationParams | None = None) -> None:
    fired = []

    def observer(event: str, p: Progress) -> None:
        if not fired and when(event, p):
            fired.append(event)
            action()

    with pytest.raises(MigrationFailed, match=match):
        migrate_out(vm, uri, params or MigrationParams(), observer, io_timeout=20)
    assert fired, "the fault was never injected"


def in_round(kind: str, min_pages: int = 0) -> Callable[[str, Progress], bool]:
    return lambda e, p: e == "chunk" and p.rounds[-1].kind == kind and \
        p.rounds[-1].pages >= min_pages


@pytest.mark.parametrize("phase", ["bulk", "iterative", "stop-and-copy"])
def test_destination_killed(host: Host, phase: str) -> None:
    vm = boot(host)
    dest = DestinationProcess()
    try:
        if phase == "bulk":
            when = in_round("bulk", 2048)
        elif phase == "iterative":
            when = in_round("iterative")
        else:
            def when(e: str, p: Progress) -> bool:
                return e == "status" and p.status == "device"
        params = MigrationParams(downtime_limit_ms=1) if phase == "iterative" else \
            MigrationParams(max_rounds=1) if phase == "stop-and-copy" else MigrationParams()
        run_failing(vm, dest.uri, when, dest.kill, "destination", params)
        assert_still_running_intact(vm)
    finally:
        dest.close()
        vm.shutdown()


def test_idle_guest_memory_is_bit_for_bit_unchanged_after_failure(host: Host) -> None:
    vm = boot(host, "idle")
    dest = DestinationProcess()
    try:
        before = vm.guest.digest()
        run_failing(vm, dest.uri, in_round("bulk", 2048), dest.kill, "destination")
        assert vm.guest.digest() == before
    finally:
        dest.close()
        vm.shutdown()


def test_connection_dropped(host: Host) -> None:
    vm = boot(host)
    dest = DestinationProcess()
    relay = Relay(parse_uri(dest.uri), cut_after=6 * MiB)
    try:
        fails_but_keeps_running(vm, relay.uri, params=MigrationParams())
        assert relay.broken.is_set()
        ev = dest.result(timeout=30)
        assert ev["event"] == "failed"
    finally:
        relay.close()
        dest.close()
        vm.shutdown()


@pytest.mark.parametrize("mode", [Batching.PAGE, Batching.SG])
def test_corrupted_frame_is_refused(host: Host, mode: Batching) -> None:
    vm = boot(host)
    dest = DestinationProcess()
    relay = Relay(parse_uri(dest.uri), flip_at=3 * MiB + 12345)
    try:
        fails_but_keeps_running(vm, relay.uri, "BAD_MEASUREMENT|CRC|corrupt",
                                params=MigrationParams(batching=mode))
        assert relay.broken.is_set()
        ev = dest.result(timeout=30)
        assert ev["event"] == "failed"
    finally:
        relay.close()
        dest.close()
        vm.shutdown()


def test_nosend_guest_is_refused_before_anything_moves(host: Host) -> None:
    vm = boot(host, policy=ES | int(Policy.NOSEND))
    dest = DestinationProcess()
    try:
        fails_but_keeps_running(vm, dest.uri, "POLICY_FAILURE", params=MigrationParams())
    finally:
        dest.close()
        vm.shutdown()


def test_untrusted_destination_chain_is_refused(host: Host) -> None:
    # DOMAIN policy: the target's OCA must be the source's; a platform of another owner
    # is refused at SEND_START, before a byte of the guest moves
    vm = boot(host, policy=ES | int(Policy.DOMAIN))
    dest = DestinationProcess(extra=["--psp-owner", "self"])
    try:
        fails_but_keeps_running(vm, dest.uri, "secure processor refused",
                                params=MigrationParams())
    finally:
        dest.close()
        vm.shutdown()


def test_cancel_mid_migration_then_migrate_again(host: Host) -> None:
    vm = boot(host)
    dest = DestinationProcess()
    dest2: DestinationProcess | None = None
    try:
        calls = []

        def cancel() -> bool:
            calls.append(1)
            return len(calls) > 2

        fails_but_keeps_running(vm, dest.uri, "cancelled", params=MigrationParams(),
                                should_cancel=cancel)
        dest2 = DestinationProcess()
        out = migrate_out(vm, dest2.uri, MigrationParams(batching=Batching.SG), io_timeout=30)
        assert out.confirm["digest"] == out.source_digest
        assert not vm.alive
    finally:
        dest.close()
        if dest2 is not None:
            dest2.close()
        vm.shutdown()


def test_same_owner_domain_guest_migrates(host: Host) -> None:
    vm = boot(host, "idle", policy=ES | int(Policy.DOMAIN))
    dest = DestinationProcess()
    try:
        out = migrate_out(vm, dest.uri, MigrationParams(), io_timeout=30)
        assert out.confirm["digest"] == out.source_digest
    finally:
        dest.close()
        vm.shutdown()


def test_cancel_ends_a_handshake_wait_within_a_second(host: Host) -> None:
    """A destination that accepts the connection and never answers HELLO: a cancel ends
    the wait (the I/O timeout is 15 s) within a second, and the guest runs on intact."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts in the backlog, says nothing
    silent.settimeout(10)  # the cancel is set only once the source has connected
    port = silent.getsockname()[1]
    vm = boot(host, "dirtier:rate=500")
    cancel = threading.Event()
    try:
        t, errors = migrate_in_background(vm, f"tcp:127.0.0.1:{port}", cancel.is_set)
        conn, _ = silent.accept()  # the source is connected and waits for our HELLO
        cancel_within_a_second(cancel, t, errors)
        assert_still_running_intact(vm)
        conn.close()
    finally:
        cancel.set()
        silent.close()
        vm.shutdown()


def migrate_in_background(vm: SourceVM, uri: str, should_cancel: Callable[[], bool],
                          **kw: Any) -> tuple[threading.Thread, list[BaseException]]:
    """`migrate_out` on a thread of its own; what it raised lands in the list."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            migrate_out(vm, uri, MigrationParams(), None, should_cancel, **kw)
        except BaseException as e:  # noqa: BLE001 - examined by the caller
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def cancel_within_a_second(cancel: threading.Event, t: threading.Thread,
                           errors: list[BaseException]) -> None:
    """Cancel the migration on ``t``: it must end within a second, failed, naming the
    cancel."""
    t0 = time.monotonic()
    cancel.set()
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 1.5, f"the cancel took {time.monotonic() - t0:.1f} s"
    assert errors and isinstance(errors[0], MigrationFailed), errors
    assert "cancel" in str(errors[0])
