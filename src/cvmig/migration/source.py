"""The source side of a migration: binds the driver's world to the guest, the PSP and the
wire, and keeps the promise that nothing is lost.

Order of the end game: pause, last dirty pages, VMSAs, page states, the finish trailer;
the destination runs RECEIVE_FINISH, resumes the guest and confirms with the digest its
PSP measured on import (the downtime ends here); the still-paused source measures its
own memory and, if they agree, issues SEND_FINISH (after which this guest can never run
again) and releases. Any failure before that: SEND_CANCEL, the destination discards its
copy, and the guest runs on here as before.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
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
from cvmig.migration.host import Host
from cvmig.migration.sender import Sender
from cvmig.psp.api import Batching, GuestState, PlatformCerts, PspError
from cvmig.wire.channel import Channel, PeerGone, RemoteError, parse_uri
from cvmig.wire.frames import VERSION, FrameType, ProtocolError, json_meta
from cvmig.wire.protocol import WINDOW, PagesFrame, SharedFrame, Vmsa, slot_size

MODES = tuple(m.value for m in Batching)
SOURCE_SLOTS = 3  # one the PSP fills, one on the wire, one queued between them


class MigrationFailed(Exception):
    """A migration did not complete; the guest still runs on the source."""


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
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (time, guest ops)


class RealWorld:
    """The driver's world on real processes, a real PSP and a real socket."""

    def __init__(self, vm: SourceVM, chan: Channel, params: MigrationParams) -> None:
        self.vm = vm
        self.chan = chan
        self.params = params
        assert vm.host.psp is not None and vm.host.transport is not None
        self.psp = vm.host.psp
        self.trans = vm.host.transport
        self.mode = params.batching
        self.outcome: Outcome | None = None
        self.sender = Sender(chan, self.trans.view, SOURCE_SLOTS, slot_size(), WINDOW,
                             io_timeout=chan.sock.gettimeout() or 60.0)

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
        pages = self.vm.memory.pages[pfns]  # shared pages: plaintext by design
        sent = self.sender.submit(FrameType.SHARED, SharedFrame(pfns, pages).encode(),
                                  windowed=True)
        return Sent(pages=len(pfns), bytes=sent)

    def _take_frame(self, want: FrameType | None = None) -> dict[str, object] | None:
        """After the sender has handed the socket back: the destination's next frame."""
        f = self.chan.recv_frame(max_data=1 << 20)
        if f.type is FrameType.ACK:
            return None  # late acknowledgements of the last page frames
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
    def pause_guest(self) -> None:
        self.vm.guest.pause()
        if self.outcome is not None:
            self.outcome.ops_at_pause = guest_ops(self.vm.guest)

    def send_vcpu_state(self) -> Sent:
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
        return out

    def complete(self) -> float:
        """Finish the stream; return when the destination runs the guest (the end of the
        downtime). Then, with the destination running, the paused source measures its own
        memory: the digests must match before anything is released."""
        assert self.outcome is not None
        trailer = self.psp.send_trailer(self.vm.handle)
        self.sender.submit(FrameType.FINISH, [json_meta({})], data=[trailer])
        self.sender.flush()
        self.sender.close()  # the socket is ours again: the handoff reads from it
        confirm = None
        while confirm is None:
            confirm = self._take_frame(FrameType.CONFIRM)
        running_at = time.monotonic()
        self.outcome.confirm = confirm
        digest = self.vm.guest.digest()
        self.outcome.source_digest = digest
        if confirm.get("digest") != digest:
            raise MigrationFailed(
                f"destination memory digest {confirm.get('digest')} does not match the "
                f"source's {digest}: refusing to release the guest")
        return running_at


def _psp_state(vm: SourceVM) -> GuestState | None:
    assert vm.host.psp is not None
    try:
        return vm.host.psp.guest_status(vm.handle)[0]
    except PspError:
        return None


def migrate_out(
    vm: SourceVM,
    uri: str,
    params: MigrationParams,
    observer: Observer | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    connect_timeout: float = 10.0,
    io_timeout: float = 60.0,
    on_channel: Callable[[Channel], None] | None = None,
) -> Outcome:
    """Migrate ``vm`` to the destination listening at ``uri``.

    On success the source guest has been released (SENT, shut down). On failure raises
    MigrationFailed and the guest runs on the source, its memory untouched.
    """
    params.validate()
    host, port = parse_uri(uri)
    assert vm.host.psp is not None
    psp = vm.host.psp
    chan: Channel | None = None
    world: RealWorld | None = None
    driver: Driver | None = None
    try:
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise MigrationFailed(f"cannot connect to destination {uri}: {e.strerror or e}") from None
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
        sess = psp.send_start(vm.handle, certs)  # policy and chain checks happen here
        chan.send_json(FrameType.START, {
            "config": config_to_json(vm.config),
            "npages": vm.memory.npages,
            "policy": sess.policy,
            "batching": str(params.batching),
            "cap": params.cap,
        }, [sess.sender_pdh, sess.session])
        world = RealWorld(vm, chan, params)
        outcome = Outcome(Progress())
        world.outcome = outcome
        driver = Driver(world, params, observer or (lambda e, p: None), should_cancel)
        outcome.progress = driver.progress
        driver.run()
        # confirmed: the destination runs the guest. Release ours.
        psp.send_finish(vm.handle)
        try:
            chan.send_json(FrameType.RELEASED, {})
            verified = chan.recv_frame()
            if verified.type is FrameType.CONFIRM:
                outcome.verified = verified.json()
        except (PeerGone, ProtocolError, OSError):
            pass  # the guest runs there; a late check we could not read changes nothing
        vm.shutdown()
        return outcome
    except BaseException as e:
        if world is not None:
            world.sender.close()  # the socket is ours again for the CANCEL
        if chan is not None and isinstance(e, PeerGone | OSError):
            e = _peer_reason(chan) or e  # the destination may have said why it hung up
        reason = describe_failure(e, "destination")
        _roll_back(vm, chan, driver, reason)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise MigrationFailed(reason) from e
    finally:
        if chan is not None:
            chan.close()


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


def _roll_back(vm: SourceVM, chan: Channel | None, driver: Driver | None, reason: str) -> None:
    """Leave the guest running on the source as if nothing had happened."""
    if chan is not None:
        try:
            chan.sock.settimeout(1.0)
            chan.send_json(FrameType.CANCEL, {"message": reason})
        except (OSError, PeerGone):
            pass
    if _psp_state(vm) is GuestState.SUPDATE:
        assert vm.host.psp is not None
        vm.host.psp.send_cancel(vm.handle)
    g = vm.guest
    g.set_throttle(0.0)
    g.set_dirty_limit(None)
    g.stop_dirty_log()
    g.resume()
    if driver is not None:
        driver.progress.status = "failed"
        driver.progress.error = reason


def guest_ops(guest: Guest) -> float:
    """Operations the guest's vCPUs have done so far (their own counters)."""
    return float(sum(s.ops for s in guest.stats()))
