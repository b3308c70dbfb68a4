"""The source side of a migration: binds the driver's world to the guest, the PSP and the
wire, and keeps the promise that nothing is lost.

Order of the end game: pause, last dirty pages, VMSAs, page states, the finish trailer;
the destination runs RECEIVE_FINISH, resumes the guest and confirms with the digest its
PSP measured on import (the downtime ends here); the still-paused source measures its
own memory and, if they agree, releases the guest (RELEASED) and, once the destination
says it owns it (OWNED), issues SEND_FINISH, after which this copy can never run again.
Any failure before RELEASED: SEND_CANCEL, the destination discards its copy, and the
guest runs on here as before. After RELEASED and before OWNED the outcome is unknown:
the paused copy here is held, unfinished, in doubt (`SourceHold`), so that a destination
that died in that window does not take the only runnable copy with it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from cvmig.guest.memory import GuestMemory
from cvmig.guest.vm import Guest, GuestConfig
from cvmig.migration.config import config_to_json
from cvmig.migration.driver import (
    Driver,
    MigrationCancelled,
    MigrationParams,
    Observer,
    Progress,
    Sent,
)
from cvmig.migration.host import Host, busy_cpu_seconds
from cvmig.migration.sender import Sender
from cvmig.migration.stopcost import StopCosts, estimate, record
from cvmig.psp.api import PAGE_SIZE, Batching, GuestState, PlatformCerts, PspError
from cvmig.psp.cost import parse
from cvmig.psp.measure import compose
from cvmig.wire.channel import Channel, PeerGone, RemoteError, parse_uri
from cvmig.wire.frames import VERSION, FrameType, ProtocolError, json_meta
from cvmig.wire.protocol import (
    ENDGAME_TIMEOUT_S,
    IO_TIMEOUT_S,
    LEASE_S,
    MAX_FRAME_PAGES,
    WINDOW,
    PagesFrame,
    SharedFrame,
    Vmsa,
    slot_size,
)
from cvmig.wire.tls import TlsCreds, TlsError, client_wrap

MODES = tuple(m.value for m in Batching)
LEASE_POLL_S = 0.2  # how often the end game looks for the destination's lease requests
LEASE_MARGIN_S = 1.0  # for the destination to notice and pause
RESOLVE_WINDOW_S = 30.0  # how long a released source keeps trying to tell the destination
ABORT_WINDOW_S = 10.0  # ... and one that kept the guest, in the background
SOURCE_SLOTS = 3  # one the PSP fills, one on the wire, one queued between them


class MigrationFailed(Exception):
    """A migration did not complete; the guest still runs on the source."""


class DigestMismatch(MigrationFailed):
    """The destination's memory is not the source's: the guest must stay here."""


class MigrationInDoubt(Exception):
    """The source released the guest but could not hear the destination take it. The
    destination holds it (paused until told, `cvmig resolve`) or runs it, or is gone;
    ``hold`` is this source's paused copy, kept until someone decides."""

    def __init__(self, message: str, hold: SourceHold | None = None) -> None:
        super().__init__(message)
        self.hold = hold


class SourceHold:
    """The paused, unfinished source copy of a guest whose release is in doubt.

    Never twice: nothing here resumes it on its own, since the destination may run the
    guest. ``release`` finishes it (the destination has the guest: it said OWNED, or an
    operator knows); ``keep`` runs it here again (an operator knows the destination does
    not have it: its host died, say); ``retry`` tries once more to hear OWNED."""

    def __init__(self, vm: SourceVM, uri: str, mig_id: str, tls: TlsCreds | None) -> None:
        self.vm, self.uri, self.mig_id, self.tls = vm, uri, mig_id, tls
        self.decided = ""  # "released" | "kept" once decided
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self.decided:
                return
            self.decided = "released"
            assert self.vm.host.psp is not None
            with contextlib.suppress(PspError):  # SENT: this copy can never run again
                self.vm.host.psp.send_finish(self.vm.handle)
            self.vm.shutdown()

    def keep(self) -> None:
        with self._lock:
            if self.decided:
                if self.decided != "kept":
                    raise MigrationFailed("the source's copy was already released")
                return
            self.decided = "kept"
            _roll_back(self.vm, None, "kept at the source by an operator")
        # a destination that holds its copy in doubt may discard it now
        threading.Thread(target=_tell_aborted, args=(self.uri, self.mig_id,
                         "the source kept the guest", self.tls),
                         name="cvmig-tell-aborted", daemon=True).start()

    def retry(self, window_s: float, should_cancel: Callable[[], bool] = lambda: False) -> bool:
        """Deliver RELEASED again for up to ``window_s``; release on OWNED. Returns whether
        the destination took the guest (False: still in doubt, or already decided)."""
        if self.decided:
            return self.decided == "released"
        try:
            _deliver(self.uri, self.mig_id, "released", window_s, "", self.tls, should_cancel)
        except MigrationInDoubt:
            return False
        self.release()
        return self.decided == "released"


@dataclass
class SourceVM:
    """A running confidential guest on the source host."""

    host: Host
    config: GuestConfig
    guest: Guest
    handle: int
    memory: GuestMemory
    alive: bool = True

    @classmethod
    def boot(cls, host: Host, config: GuestConfig, policy: int) -> SourceVM:
        assert host.psp is not None
        mem = GuestMemory.create(config.memory, populate=True)
        try:
            region = host.psp.map_region(mem.name, mem.size)
            handle = host.psp.launch(region, mem.npages, policy)
            guest = Guest(config, mem, host.psp_socket, handle)
            guest.boot()
            mem.unlink()  # the PSP and every vCPU have it mapped: nothing left to attach
        except BaseException:
            mem.close()
            mem.unlink()
            raise
        return cls(host, config, guest, handle, mem)

    def psp_state(self) -> GuestState | None:
        """The guest's state in its PSP; None once it is decommissioned."""
        assert self.host.psp is not None
        try:
            return self.host.psp.guest_status(self.handle)[0]
        except PspError:
            return None

    def shutdown(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.guest.shutdown()
        assert self.host.psp is not None
        try:
            self.host.psp.decommission(self.handle)
        except PspError:
            pass
        self.memory.close()
        self.memory.unlink()


@dataclass
class Outcome:
    """What the source learned from a migration."""

    progress: Progress
    confirm: dict[str, object] = field(default_factory=dict)
    verified: dict[str, object] = field(default_factory=dict)
    source_digest: str = ""
    ops_at_pause: float = 0.0
    cpu_at_pause: float = 0.0  # the vCPUs' CPU seconds (Guest.cpu_seconds)
    busy_at_pause: float = 0.0  # the host's busy CPU seconds (host.busy_cpu_seconds)
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (time, guest ops)


class RealWorld:
    """The driver's world on real processes, a real PSP and a real socket."""

    def __init__(self, vm: SourceVM, chan: Channel, params: MigrationParams,
                 should_cancel: Callable[[], bool] = lambda: False) -> None:
        self.vm = vm
        self.chan = chan
        self.params = params
        assert vm.host.psp is not None and vm.host.transport is not None
        self.psp = vm.host.psp
        self.trans = vm.host.transport
        self.mode = params.batching
        self.outcome: Outcome | None = None
        self.sender = Sender(chan, self.trans.view, SOURCE_SLOTS, slot_size(), WINDOW,
                             io_timeout=chan.sock.gettimeout() or IO_TIMEOUT_S,
                             should_cancel=should_cancel)
        self.mig_id = secrets.token_hex(8)
        self.finish_sent = False  # FINISH may be on the wire: from here a break is in doubt
        self.granted_at = 0.0  # our last lease grant (0: none: the guest never ran there)
        self.granted_n = -1  # the latest lease request granted
        self.measured = StopCosts()  # this migration's stop, part by part (stopcost.py)

    # -- clock --------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)  # the rate limit itself: this IS the wait

    # -- pages --------------------------------------------------------------------------
    def all_pages(self) -> np.ndarray:
        g = self.vm.guest
        return np.union1d(g.ram_pfns, g.shared_pfns).astype(np.int64)

    def shared_mask(self, pfns: np.ndarray) -> np.ndarray:
        return np.asarray(self.vm.memory.page_state[pfns] != 0)

    def start_dirty_log(self) -> None:
        self.vm.guest.start_dirty_log()

    def harvest(self) -> np.ndarray:
        pfns = self.vm.guest.harvest_dirty()
        # VMSA pages move with SEND_UPDATE_VMSA at the end, not as RAM
        vmsa = self.vm.guest.vmsa_pfns
        if len(vmsa):
            pfns = pfns[~np.isin(pfns, vmsa)]
        return pfns

    def send_private(self, pfns: np.ndarray, bounds: np.ndarray, queue: bool) -> Sent:
        ncmds = len(bounds) - 1
        if ncmds == 0:
            return Sent()
        handle, mode, region = self.vm.handle, self.mode, self.trans.region
        slot = self.sender.slot()  # the PSP fills this while earlier frames are on the wire
        base = self.sender.offset(slot)
        t0 = time.perf_counter()
        if queue:
            total = self.psp.send_update_data_queue(handle, mode, pfns, bounds, region, base)
            doorbells = 1
        else:
            total = 0
            b = bounds.tolist()
            for i in range(ncmds):
                total += self.psp.send_update_data(handle, mode, pfns[b[i] : b[i + 1]], region,
                                                   base + total)
            doorbells = ncmds
        psp_s = time.perf_counter() - t0
        meta = PagesFrame(mode, queue, pfns, bounds).encode()
        sent = self.sender.submit(FrameType.PAGES, meta, slot, total, windowed=True)
        if self.outcome is not None:
            self.outcome.timeline.append((time.monotonic(), guest_ops(self.vm.guest)))
        return Sent(pages=len(pfns), bytes=sent, commands=ncmds, doorbells=doorbells,
                    psp_seconds=psp_s)

    def send_shared(self, pfns: np.ndarray) -> Sent:
        out = Sent()
        for lo in range(0, len(pfns), MAX_FRAME_PAGES):  # a frame's bound (wire.frames)
            part = pfns[lo : lo + MAX_FRAME_PAGES]
            pages = self.vm.memory.pages[part]  # shared pages: plaintext by design
            out.bytes += self.sender.submit(FrameType.SHARED, SharedFrame(part, pages).encode(),
                                            windowed=True)
            out.pages += len(part)
        return out

    def _take_frame(self, want: FrameType | None = None) -> dict[str, object] | None:
        """After the sender has handed the socket back: the destination's next frame."""
        f = self.chan.recv_frame(max_data=1 << 20)
        if f.type is FrameType.ACK:
            return None  # late acknowledgements of the last page frames
        if f.type is FrameType.HEARTBEAT:
            self._grant(f.json().get("n"))  # the destination asks to keep running it
            return None
        if f.type in (FrameType.ERROR, FrameType.CANCEL):
            raise RemoteError(f.type, str(f.json().get("message", "no reason given")))
        if f.type is want:
            return f.json()
        raise ProtocolError(f"unexpected {f.type.name} from the destination mid-stream")

    # -- throttle -----------------------------------------------------------------------
    def set_throttle(self, pct: int) -> None:
        self.vm.guest.set_throttle(pct / 100)

    def set_dirty_limit(self, pages_per_s: float | None) -> None:
        self.vm.guest.set_dirty_limit(pages_per_s)

    # -- end game -----------------------------------------------------------------------
    def frames_in_flight(self) -> int:
        """Frames handed to the sender that the destination has not acknowledged."""
        return self.sender.in_flight

    def wait_landed(self, timeout: float) -> None:
        self.sender.wait_landed(timeout)

    def landing_in(self) -> float | None:
        return self.sender.landing_in()

    def stop_costs(self) -> StopCosts:
        """What stopping costs here, as recent migrations measured it (the driver counts
        it); before any, defaults plus the cost profile's price of the commands."""
        profile = self.vm.host.psp_profile
        return estimate(profile, self.vm.config.vcpus, parse(profile).duration(1, PAGE_SIZE))[0]

    def record_stop_costs(self, progress: Progress) -> None:
        """Remember this stop (with the destination's parts, from its report) for the
        next migration, and put it in the report."""
        dest = self.outcome.verified.get("stop_costs") if self.outcome is not None else None
        if isinstance(dest, dict):
            theirs = StopCosts.from_ms(dest)
            self.measured.finish, self.measured.grant = theirs.finish, theirs.grant
        progress.stop_costs_measured = self.measured.as_ms()
        if self.measured.finish and self.measured.grant:  # a whole stop, not a broken one
            record(self.vm.host.psp_profile, self.vm.config.vcpus, self.measured)

    def pause_guest(self) -> None:
        if self.outcome is not None:  # read from /proc just before, not in the downtime
            self.outcome.cpu_at_pause = self.vm.guest.cpu_seconds()
            self.outcome.busy_at_pause = busy_cpu_seconds()
        t0 = time.monotonic()
        self.vm.guest.pause()
        self.measured.pause = time.monotonic() - t0
        if self.outcome is not None:
            self.outcome.ops_at_pause = guest_ops(self.vm.guest)

    def send_vcpu_state(self) -> Sent:
        t_start = time.monotonic()
        out = Sent()
        g, region = self.vm.guest, self.trans.region
        for pfn in g.vmsa_pfns.tolist():
            slot = self.sender.slot()
            t0 = time.perf_counter()
            n = self.psp.send_update_vmsa(self.vm.handle, int(pfn), region,
                                          self.sender.offset(slot))
            out.psp_seconds += time.perf_counter() - t0
            out.bytes += self.sender.submit(FrameType.VMSA, [Vmsa.encode(int(pfn))], slot, n)
            out.commands += 1
            out.doorbells += 1
            out.pages += 1
        state = np.asarray(self.vm.memory.page_state)
        out.bytes += self.sender.submit(FrameType.PAGE_STATE, [state.data.cast("B")])
        self.measured.vcpu_state = time.monotonic() - t_start
        return out

    def complete(self) -> float:
        """Finish the stream; return when the destination runs the guest (the end of the
        downtime). Then, with the destination running on our lease (renewed by
        heartbeats), the paused source measures its own memory: the digests must match
        before anything is released."""
        assert self.outcome is not None
        t_trailer = time.monotonic()
        trailer = self.psp.send_trailer(self.vm.handle)
        shared = compose(b"", self.vm.memory.pages, self.vm.memory.page_state)
        self.finish_sent = True
        self.sender.submit(FrameType.FINISH, [json_meta({"id": self.mig_id, "shared": shared})],
                           data=[trailer])
        self.measured.trailer = time.monotonic() - t_trailer
        self.sender.flush()
        self.sender.close()  # the socket is ours again: the handoff reads from it
        self.chan.sock.settimeout(ENDGAME_TIMEOUT_S)
        confirm = None
        while confirm is None:
            confirm = self._take_frame(FrameType.CONFIRM)
        self._grant(confirm.get("lease"))  # the go-ahead: the destination resumes the guest
        running_at = time.monotonic()
        self.outcome.confirm = confirm
        self._await_running()
        digest = self._digest_keeping_lease()
        self.outcome.source_digest = digest
        if confirm.get("digest") != digest:
            raise DigestMismatch(
                f"destination memory digest {confirm.get('digest')} does not match the "
                f"source's {digest}: refusing to release the guest")
        return running_at

    def _await_running(self) -> None:
        """Until the destination's first lease renewal, which it asks the moment its
        vCPUs run: measuring our copy before then would take the CPU that start needs
        where both hosts share cores. Bounded: an older destination asks a second later,
        and a silent one fails the read (the lease we granted then runs its course)."""
        deadline = time.monotonic() + ENDGAME_TIMEOUT_S
        while self.granted_n < 1:
            if time.monotonic() >= deadline:
                raise PeerGone(f"the destination asked no lease renewal within "
                               f"{ENDGAME_TIMEOUT_S:g} s of its go-ahead")
            self._take_frame()

    def _digest_keeping_lease(self) -> str:
        """Our own digest (the vCPUs measure the paused memory) while heartbeats keep the
        destination's lease alive; a destination that fails meanwhile is heard at once."""
        result: list[str] = []
        error: list[BaseException] = []

        def measure() -> None:
            try:
                result.append(self.vm.guest.digest())
            except BaseException as e:  # noqa: BLE001 - raised below, in this thread
                error.append(e)

        t = threading.Thread(target=measure, name="cvmig-digest", daemon=True)
        t.start()
        while t.is_alive():
            while self.chan.readable():
                self._take_frame()  # lease requests are granted; a failure is raised
            t.join(LEASE_POLL_S)
        if error:
            raise error[0]
        return result[0]

    def _grant(self, n: object) -> None:
        """Grant the destination's lease request ``n``: it may run the guest until its
        request's time + LEASE_S, so surely no later than now + LEASE_S."""
        if not isinstance(n, int):
            raise ProtocolError(f"lease request {n!r} is not a number")
        self.chan.send_json(FrameType.HEARTBEAT, {"n": n})
        self.granted_at = time.monotonic()
        self.granted_n = max(self.granted_n, n)

    def release(self) -> None:
        """The decision is made: tell the destination, and return once it acknowledges
        that it owns the guest (then, and only then, may SEND_FINISH end our copy).
        Raises if that cannot be heard."""
        self.chan.send_json(FrameType.RELEASED, {"id": self.mig_id})
        # bounded even while lease requests keep coming: a destination that never heard
        # RELEASED asks on; once we stop granting, its lease ends and it holds in doubt
        deadline = time.monotonic() + ENDGAME_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerGone(f"the destination did not take the guest within "
                               f"{ENDGAME_TIMEOUT_S:g} s of RELEASED")
            self.chan.sock.settimeout(left)
            if self._take_frame(FrameType.OWNED) is not None:
                return


def migrate_out(
    vm: SourceVM,
    uri: str,
    params: MigrationParams,
    observer: Observer | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    connect_timeout: float = 10.0,
    io_timeout: float = IO_TIMEOUT_S,
    resolve_window_s: float = RESOLVE_WINDOW_S,
    on_channel: Callable[[Channel], None] | None = None,
    tls: TlsCreds | None = None,
) -> Outcome:
    """Migrate ``vm`` to the destination listening at ``uri``.

    On success the source guest has been released (SENT, shut down). On failure raises
    MigrationFailed and the guest runs on the source, its memory untouched. When the
    destination could not be heard taking the released guest, raises MigrationInDoubt
    whose ``hold`` keeps the paused copy here until the caller decides (never resumed
    on its own: the destination may run the guest).
    """
    params.validate()
    host, port = parse_uri(uri)
    assert vm.host.psp is not None
    psp = vm.host.psp
    chan: Channel | None = None
    world: RealWorld | None = None
    driver: Driver | None = None
    released = False
    hold: SourceHold | None = None
    try:
        try:
            raw = _connect(host, port, connect_timeout, should_cancel)
        except OSError as e:
            raise MigrationFailed(f"cannot connect to destination {uri}: {e.strerror or e}") from None
        with _shut_on_cancel(raw, should_cancel):  # a cancel ends the handshake's waits
            raw.settimeout(io_timeout)
            sock = client_wrap(raw, tls, host)  # TlsError is a failure like any other here
            sock.settimeout(io_timeout)
            chan = Channel(sock)
            if on_channel is not None:
                on_channel(chan)  # e.g. a monitor that cancels by shutting the socket down
            chan.send_json(FrameType.HELLO, {"version": VERSION, "role": "source",
                                             "capabilities": MODES})
            hello = chan.expect(FrameType.HELLO).json()
            if hello.get("role") != "destination":
                raise ProtocolError("peer is not a cvmig destination")
            certs = PlatformCerts.from_bytes(chan.expect(FrameType.CERTS, max_data=1 << 20).meta)
        # policy and chain checks happen here; the packet format is negotiated here too
        sess = psp.send_start(vm.handle, certs, params.batching)
        chan.send_json(FrameType.START, {
            "config": config_to_json(vm.config),
            "npages": vm.memory.npages,
            "policy": sess.policy,
            "batching": str(params.batching),
            "cap": params.cap,
            "session_len": len(sess.session),
        }, [sess.sender_pdh, sess.session])
        world = RealWorld(vm, chan, params, should_cancel)
        outcome = Outcome(Progress())
        world.outcome = outcome
        driver = Driver(world, params, observer or (lambda e, p: None), should_cancel)
        outcome.progress = driver.progress
        driver.run()
        # the digests agree: release. From RELEASED on we never resume our copy on our
        # own (the destination may run the guest); it stays paused and unfinished until
        # the destination says it owns the guest, and only then does SEND_FINISH end it.
        released = True
        hold = SourceHold(vm, uri, world.mig_id, tls)
        try:
            world.release()
        except (PeerGone, ProtocolError, RemoteError, OSError) as e:
            # in doubt: tell it again over new connections; if none is heard, the caller
            # gets the paused copy to decide on (`SourceHold`)
            _deliver(uri, world.mig_id, "released", resolve_window_s,
                     describe_failure(e, "destination"), tls, should_cancel, hold)
        else:
            if observer is not None:
                observer("handed-off", driver.progress)  # OWNED: the handoff is complete
            with contextlib.suppress(PeerGone, ProtocolError, OSError):
                verified = chan.recv_frame()  # the workload's own check, there
                if verified.type is FrameType.CONFIRM:
                    outcome.verified = verified.json()
            world.record_stop_costs(driver.progress)
        hold.release()  # SEND_FINISH: OWNED was heard, the guest is the destination's
        return outcome
    except MigrationInDoubt:
        raise  # the paused copy is the caller's (e.hold)
    except BaseException as e:
        if released:
            # after RELEASED only the destination's OWNED or an operator decides
            if hold is not None and hold.decided:
                raise  # released after OWNED: only the clean-up failed
            raise MigrationInDoubt(
                _in_doubt_message(uri, describe_failure(e, "destination")), hold) from e
        if should_cancel() and not isinstance(e, MigrationCancelled | KeyboardInterrupt):
            e = MigrationCancelled("migration cancelled")  # whatever the cancel broke
        if world is not None:
            world.sender.close()  # the socket is ours again for the CANCEL
        if chan is not None and isinstance(e, PeerGone | OSError):
            e = _peer_reason(chan) or e  # the destination may have said why it hung up
        reason = describe_failure(e, "destination")
        _send_cancel(chan, reason)
        told = True  # an ERROR or CANCEL from the destination: it stopped its copy first
        if world is not None and world.finish_sent and not isinstance(e, RemoteError):
            told = _await_lease_end(world, chan)  # never twice: it stopped there
        _roll_back(vm, driver, reason)
        if not told and world is not None:
            # the destination may hold its copy paused, in doubt, until it hears this;
            # telling it must not hold up the guest, which already runs here again
            threading.Thread(target=_tell_aborted, args=(uri, world.mig_id, reason, tls),
                             name="cvmig-tell-aborted", daemon=True).start()
        if isinstance(e, KeyboardInterrupt):
            raise
        raise MigrationFailed(reason) from e
    finally:
        if chan is not None:
            chan.close()


CANCEL_POLL_S = 0.1  # how often a wait without a cancel of its own looks for one


def _connect(host: str, port: int, timeout: float,
             should_cancel: Callable[[], bool]) -> socket.socket:
    """A TCP connection within ``timeout``; a cancel ends the wait at once
    (MigrationCancelled)."""
    err: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        code = sock.connect_ex(addr)
        deadline = time.monotonic() + timeout
        while code in (errno.EINPROGRESS, errno.EAGAIN):
            if should_cancel():
                sock.close()
                raise MigrationCancelled("migration cancelled while connecting")
            left = deadline - time.monotonic()
            if left <= 0:
                code = errno.ETIMEDOUT
            elif select.select([], [sock], [], min(CANCEL_POLL_S, left))[1]:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            sock.setblocking(True)
            return sock
        sock.close()
        err = OSError(code, os.strerror(code))
    raise err


@contextlib.contextmanager
def _shut_on_cancel(sock: socket.socket, should_cancel: Callable[[], bool]) -> Iterator[None]:
    """While the body waits on ``sock`` (or on the TLS socket wrapping it: wrapping
    detaches ``sock`` but keeps its descriptor), a cancel shuts the connection down,
    which ends the wait."""
    done = threading.Event()
    fd = sock.fileno()

    def watch() -> None:
        while not done.wait(CANCEL_POLL_S):
            if should_cancel():
                # through a duplicate: the TLS socket's own shutdown would drop its state
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
                return

    t = threading.Thread(target=watch, name="cvmig-cancel-watch", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def _await_lease_end(world: RealWorld, chan: Channel | None) -> bool:
    """After FINISH and our CANCEL, before resuming here: make sure the destination no
    longer runs the guest. It never resumed it if we granted no lease; else it stops once
    it has told us so (it answers our CANCEL with CANCEL after stopping), or at the latest
    when the last lease we granted has run out: the lease counts from the destination's
    request, made before our grant, so it ends before granted_at + LEASE_S whatever
    delayed the frames.
    Returns whether the destination's copy is known to be gone or never ran (else it may
    hold it paused, in doubt)."""
    if not world.granted_at:
        return False  # never ran there; it holds its copy paused until it hears from us
    deadline = world.granted_at + LEASE_S + LEASE_MARGIN_S
    if chan is not None:
        try:  # a destination that discarded its copy answers CANCEL: that is our proof
            while (left := deadline - time.monotonic()) > 0:
                chan.sock.settimeout(left)  # a timeout here ends the listening for good
                f = chan.recv_frame(max_data=1 << 20)
                if f.type is FrameType.CANCEL:
                    return True
        except (PeerGone, ProtocolError, OSError):
            pass  # a closed link proves nothing (a middlebox may have closed it)
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))  # the lease's own clock: this IS the wait
    return False


def _tell_aborted(uri: str, mig_id: str, why: str, tls: TlsCreds | None) -> None:
    with contextlib.suppress(MigrationInDoubt):
        _deliver(uri, mig_id, "aborted", ABORT_WINDOW_S, why, tls)


def _in_doubt_message(uri: str, why: str, decision: str = "released") -> str:
    if decision != "released":
        return (f"in doubt: this source kept the guest, but the destination at {uri} could "
                f"not be told ({why}). If it holds a copy paused, run `cvmig resolve {uri} "
                "--discard` there.")
    return (f"in doubt: this source released the guest, but could not hear the destination "
            f"at {uri} take it ({why}). The source holds its paused copy. If the destination "
            f"holds or runs the guest, run `cvmig resolve {uri} --keep` there; only if its "
            "host is gone, keep the source's copy (QMP x-migrate-resolve on the source).")


def _deliver(uri: str, mig_id: str, decision: str, window_s: float, why: str,
             tls: TlsCreds | None = None, should_cancel: Callable[[], bool] = lambda: False,
             hold: SourceHold | None = None) -> None:
    """Tell the destination our decision over new connections until it answers, the
    window ends or we are cancelled; then MigrationInDoubt says what to do."""
    host, port = parse_uri(uri)
    deadline = time.monotonic() + window_s
    last = why
    while True:
        try:
            with socket.create_connection((host, port), timeout=ENDGAME_TIMEOUT_S) as raw, \
                    client_wrap(raw, tls, host) as sock:
                sock.settimeout(ENDGAME_TIMEOUT_S)
                ch = Channel(sock)
                ch.send_json(FrameType.HELLO, {"version": VERSION, "role": "source",
                                               "resolve": mig_id, "decision": decision})
                f = ch.recv_frame(max_data=1 << 20)
                want = FrameType.OWNED if decision == "released" else FrameType.CANCEL
                if f.type is want:
                    return
                last = str(f.json().get("message", f.type.name))
        except (OSError, PeerGone, ProtocolError, TlsError) as e:
            last = str(e)
        pause_until = min(deadline, time.monotonic() + 1.0)  # retry pacing
        while time.monotonic() < pause_until and not should_cancel():
            time.sleep(0.05)  # the pacing itself, watching for a cancel
        if time.monotonic() >= deadline or should_cancel():
            break
    raise MigrationInDoubt(_in_doubt_message(uri, last or "no answer", decision), hold)


def _peer_reason(chan: Channel) -> RemoteError | None:
    """An ERROR or CANCEL the peer sent before closing, if it is still in our buffer."""
    try:
        chan.sock.settimeout(1.0)
        while True:
            f = chan.recv_frame(max_data=1 << 20)
            if f.type in (FrameType.ERROR, FrameType.CANCEL):
                return RemoteError(f.type, str(f.json().get("message", "no reason given")))
    except (PeerGone, ProtocolError, OSError):
        return None


def describe_failure(e: BaseException, peer: str) -> str:
    """One line a user can act on, for a migration that failed with ``e``."""
    if isinstance(e, MigrationFailed | MigrationCancelled):
        return str(e)
    if isinstance(e, PspError):
        return f"secure processor refused: {e}"
    if isinstance(e, TlsError):
        return str(e)
    if isinstance(e, RemoteError):
        if e.ftype is FrameType.ERROR:
            return f"{peer} {e.message}"
        return f"{peer} cancelled: {e.message}"
    if isinstance(e, PeerGone):
        return f"{peer} gone: {e}"
    if isinstance(e, ProtocolError):
        return f"protocol error: {e}"
    if isinstance(e, OSError):
        return f"I/O error: {e}"
    return f"{type(e).__name__}: {e}"


def _send_cancel(chan: Channel | None, reason: str) -> None:
    """Tell the destination to discard its half (best effort: the link may be gone)."""
    if chan is not None:
        with contextlib.suppress(OSError, PeerGone):
            chan.sock.settimeout(1.0)
            chan.send_json(FrameType.CANCEL, {"message": reason})


def _roll_back(vm: SourceVM, driver: Driver | None, reason: str) -> None:
    """Leave the guest running on the source as if nothing had happened."""
    if vm.psp_state() is GuestState.SUPDATE:
        assert vm.host.psp is not None
        vm.host.psp.send_cancel(vm.handle)
    g = vm.guest
    broken = ""
    for step in (lambda: g.set_throttle(0.0), lambda: g.set_dirty_limit(None),
                 g.stop_dirty_log, g.resume):
        try:
            step()
        except (OSError, RuntimeError, TimeoutError) as e:  # a vCPU died: say so, go on
            broken = broken or f"; and the guest could not resume here: {e}"
    if driver is not None:
        driver.progress.status = "failed"
        driver.progress.error = reason + broken
    if broken:
        raise MigrationFailed(reason + broken)


def guest_ops(guest: Guest) -> float:
    """Operations the guest's vCPUs have done so far (their own counters)."""
    return float(sum(s.ops for s in guest.stats()))
