"""The destination side: receive a guest through the local PSP, run it, confirm.

A half-received guest is discarded whole: its PSP context decommissioned, its memory
unlinked. The guest runs here after RECEIVE_FINISH; it stays only if the source, comparing
its own digest with the one our PSP measured on import, releases it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cvmig.guest.memory import GuestMemory, Populator
from cvmig.guest.vm import Guest
from cvmig.migration.config import config_from_json
from cvmig.migration.host import Host
from cvmig.migration.receiver import Receiver
from cvmig.migration.source import MODES, describe_failure, guest_ops
from cvmig.psp.api import SESSION_SIZE, Batching, PspError, SendSession, packet_size
from cvmig.psp.mailbox import MailboxClient
from cvmig.psp.measure import compose
from cvmig.psp.session import FORMAT_EXT_SIZE
from cvmig.wire.channel import Channel, PeerGone, RemoteError, shutdown
from cvmig.wire.frames import VERSION, FrameType, ProtocolError, parse_json
from cvmig.wire.protocol import (
    ENDGAME_TIMEOUT_S,
    IO_TIMEOUT_S,
    LEASE_REQUEST_S,
    LEASE_S,
    WINDOW,
    Ack,
    slot_size,
)

VERIFY_WAIT_S = 10.0  # how long the workload may take to show progress after resume
HANDSHAKE_S = 5.0  # a connection must say who it is within this
POLL_S = 0.5


class IncomingFailed(Exception):
    """The incoming migration did not complete; nothing of it is kept."""


class IncomingInDoubt(IncomingFailed):
    """The guest is held paused here, in doubt, with no way to hear the source's decision
    (``vm``: the paused guest, for the caller to hold until someone decides)."""

    vm: IncomingVM | None = None


@dataclass
class IncomingVM:
    """A guest received by this host and now running here."""

    guest: Guest
    memory: GuestMemory
    handle: int
    report: dict[str, object] = field(default_factory=dict)

    def shutdown(self, host: Host) -> None:
        self.guest.shutdown()
        assert host.psp is not None
        try:
            host.psp.decommission(self.handle)
        except PspError:
            pass
        self.memory.close()
        self.memory.unlink()


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(1)
    return srv


def migrate_in(hostobj: Host, conn: socket.socket, io_timeout: float = IO_TIMEOUT_S, *,
               lease_s: float = LEASE_S,
               decisions: Callable[[float], socket.socket | None] | None = None,
               on_in_doubt: Callable[[str], None] | None = None,
               on_event: Callable[[str], None] | None = None) -> IncomingVM:
    """Receive one guest over ``conn``. Raises IncomingFailed (after discarding it).
    ``on_event`` hears the moments a monitor reports, as they happen: "resumed" (the
    vCPUs run here), "paused" (held in doubt) and "owned" (the source released it).

    Once resumed here, the guest runs on a lease from the source: if the source falls
    silent for ``lease_s`` before releasing it, the guest is paused and held in doubt
    until a decision arrives: ``decisions(timeout)`` yields the connections that carry one
    (`cvmig.migration.listener.Listener.take_decision`)."""
    tell = on_event or (lambda event: None)
    conn.settimeout(io_timeout)
    chan = Channel(conn)
    psp = hostobj.psp
    trans = hostobj.transport
    assert psp is not None and trans is not None
    memory: GuestMemory | None = None
    populator: Populator | None = None
    handle: int | None = None
    guest: Guest | None = None
    leased = False
    vm: IncomingVM | None = None
    try:
        chan.send_json(FrameType.HELLO, {"version": VERSION, "role": "destination",
                                         "capabilities": list(MODES)})
        hello = chan.expect(FrameType.HELLO).json()
        if hello.get("role") != "source":
            raise ProtocolError("peer is not a cvmig source")
        chan.send(FrameType.CERTS, psp.export_certs().to_bytes())
        start = chan.expect(FrameType.START, max_data=1 << 16)
        started = time.monotonic()
        info = parse_json(start.header, start.meta[: start.header.meta_len])
        config = config_from_json(info["config"])
        npages = int(info["npages"])  # type: ignore[call-overload]
        tail = start.meta[start.header.meta_len:]
        session_len = info.get("session_len", SESSION_SIZE)
        if session_len not in (SESSION_SIZE, SESSION_SIZE + FORMAT_EXT_SIZE) or \
                not isinstance(session_len, int) or len(tail) <= session_len:
            raise ProtocolError(f"START: a session blob of {session_len!r} bytes")
        try:
            fmt = Batching(str(info.get("batching")))
        except ValueError:
            raise ProtocolError(f"START: unknown batching {info.get('batching')!r}") from None
        sender_pdh, session = tail[:-session_len], tail[-session_len:]
        memory = GuestMemory.create(config.memory, populate=False)
        # first-touch faults of a large memory cost seconds per GiB here: taken on a
        # thread, ahead of the pages arriving in order, not before the first one
        populator = memory.populate_in_background()
        if memory.npages != npages:
            raise ProtocolError(f"source guest has {npages} pages, config says {memory.npages}")
        region = psp.map_region(memory.name, memory.size)
        handle = psp.receive_start(region, npages, SendSession(
            int(info["policy"]), bytes(sender_pdh), bytes(session)),  # type: ignore[call-overload]
            fmt)
        # the vCPU processes (warm from the host's pool, or started now) attach now,
        # while the pages arrive, not in the downtime
        guest = Guest(config, memory, hostobj.psp_socket, handle, pool=hostobj.vcpu_pool)
        guest.prepare()
        memory.unlink()  # the PSP and the vCPUs have it mapped; a killed host leaks nothing
        rx = Receiver(chan, trans.view, WINDOW, slot_size(), npages, ENDGAME_TIMEOUT_S).start()
        # how long the source's first frames waited for us (the model's dst_start)
        ready_s = time.monotonic() - started
        try:
            trailer, finish = _import_stream(rx, psp, handle, trans.region, memory)
        except BaseException:
            with contextlib.suppress(OSError):
                shutdown(conn, socket.SHUT_RD)  # wakes the reader; ERROR can still go out
            raise
        finally:
            rx.stop()
        finish_in = time.monotonic()  # the stop's part here begins (migration/stopcost.py)
        populator.stop()  # whatever it has not reached was faulted in by the import
        # what readying this host cost while the pages streamed in (the model's contention)
        start_cpu_s = guest.cpu_seconds() + populator.cpu_s
        mig_id = str(finish.get("id", ""))
        # never stale: our PSP refuses a stream whose pages differ from those sent (any
        # mode), and the shared pages and page states must be the source's, before we run
        private = psp.receive_finish(handle, trailer)
        if finish.get("shared") != compose(b"", memory.pages, memory.page_state):
            raise IncomingFailed("shared pages or page states differ from the source's: "
                                 "altered in transit; the guest stays at the source")
        # measured by our PSP as it imported the pages: no pass over memory in the downtime
        digest = compose(private, memory.pages, memory.page_state)
        guest.restore()  # vCPUs up, paused, state imported from the VMSAs
        vm = IncomingVM(guest, memory, handle)
        in_doubt = False
        leased = True  # from CONFIRM on, the source may commit: we hold until it decides
        lease = Lease(chan, guest, lease_s, on_resume=lambda: tell("resumed"))
        try:
            confirmed_at = time.monotonic()
            chan.send_json(FrameType.CONFIRM, {"status": "ready", "digest": digest,
                                               "lease": 0})
            lease.requested(0)
            resumed_at = lease.run_until_released()
            leased = False
        except (PeerGone, ProtocolError, OSError) as e:
            # the lease is lost (or was never granted): the source may still resume its
            # copy, so ours must not run; nor may it be discarded, since the source may
            # have released it
            guest.pause()
            tell("paused")
            in_doubt = True
            decision = _await_resolution(decisions, mig_id, f"{describe_failure(e, 'source')}",
                                         on_in_doubt)
            if decision != "released":
                raise IncomingFailed("in doubt, resolved: the source kept the guest") from None
            resumed_at = lease.resume()
            tell("owned")
        if not in_doubt:
            chan.send_json(FrameType.OWNED, {})
            tell("owned")
            vm.report = _verify(guest, resumed_at, confirmed_at)
            vm.report["stop_costs"] = {"finish": round((confirmed_at - finish_in) * 1000, 3),
                                       "grant": round((resumed_at - confirmed_at) * 1000, 3)}
            vm.report["start_cpu_s"] = round(start_cpu_s, 3)
            vm.report["ready_s"] = round(ready_s, 4)
            with contextlib.suppress(PeerGone, OSError):
                chan.send_json(FrameType.CONFIRM, vm.report)
        else:
            vm.report = _verify(guest, resumed_at, confirmed_at)
        return vm
    except IncomingInDoubt as e:
        e.vm = vm
        raise  # held paused, not discarded: the source may have released it (never lost)
    except BaseException as e:
        reason = str(e) if isinstance(e, IncomingFailed) else describe_failure(e, "source")
        if guest is not None:
            guest.shutdown()  # first: what we say next is the source's proof it stopped here
        try:
            chan.sock.settimeout(1.0)
            if not isinstance(e, RemoteError | PeerGone):
                chan.send_json(FrameType.ERROR, {"message": reason})
            elif isinstance(e, RemoteError) and e.ftype is FrameType.CANCEL and leased:
                chan.send_json(FrameType.CANCEL, {"message": "discarded"})
        except (OSError, PeerGone):
            pass
        if handle is not None:
            try:
                psp.decommission(handle)
            except PspError:
                pass
        if populator is not None:
            populator.stop()
        if memory is not None:
            memory.close()
            memory.unlink()
        if isinstance(e, KeyboardInterrupt):
            raise
        raise IncomingFailed(reason) from e
    finally:
        chan.close()


def _import_stream(rx: Receiver, psp: MailboxClient, handle: int, region: int,
                   memory: GuestMemory) -> tuple[bytes, dict[str, object]]:
    """Import frames as the receiver hands them over, acknowledging each page frame;
    return the finish trailer and the FINISH frame's json."""
    chan = rx.chan
    frames = 0
    while True:
        item = rx.next()
        t = item.type
        if t is FrameType.PAGES:
            f = item.pages
            assert f is not None
            off = rx.offset(item.slot)
            try:
                if f.queued:
                    psp.receive_update_data_queue(handle, f.mode, f.pfns, f.bounds, region, off,
                                                  item.length)
                else:
                    b = f.bounds.tolist()
                    for i in range(len(b) - 1):
                        n = packet_size(f.mode, b[i + 1] - b[i])
                        psp.receive_update_data(handle, f.mode, f.pfns[b[i] : b[i + 1]], region,
                                                off, n)
                        off += n
            finally:
                rx.release(item.slot)
            frames += 1
            chan.send(FrameType.ACK, Ack.encode(frames))
        elif t is FrameType.SHARED:
            sh = item.shared
            assert sh is not None
            memory.pages[sh.pfns] = sh.pages
            frames += 1
            chan.send(FrameType.ACK, Ack.encode(frames))
        elif t is FrameType.VMSA:
            try:
                psp.receive_update_vmsa(handle, item.pfn, region, rx.offset(item.slot),
                                        item.length)
            finally:
                rx.release(item.slot)
        elif t is FrameType.PAGE_STATE:
            memory.page_state[:] = np.frombuffer(item.raw, np.uint8)
        elif t is FrameType.FINISH:
            return item.raw, item.finish
        else:
            raise ProtocolError(f"unexpected {t.name} frame during the transfer")


class Lease:
    """The guest runs here only on a lease the source grants, and the lease is measured
    from *before* the source could have granted it: we ask (CONFIRM, then a HEARTBEAT
    request every second), stamping each request with our clock; a grant for request n
    (the source's HEARTBEAT echoing n) lets the guest run until stamp(n) + lease_s. The
    source, which sent the grant after our request, knows the guest stops here by
    (its grant's time) + lease_s whatever delayed the messages: only then may it resume
    its own copy without word from us. The first grant is the go-ahead to resume."""

    def __init__(self, chan: Channel, guest: Guest, lease_s: float,
                 on_resume: Callable[[], None] = lambda: None) -> None:
        self.chan, self.guest, self.lease_s = chan, guest, lease_s
        self.on_resume = on_resume  # told the moment the vCPUs run (RESUME's time)
        self.stamps: dict[int, float] = {}
        self.next_n = 0
        self.until = 0.0  # the guest may run here until then (monotonic); 0: not granted

    def resume(self) -> float:
        """Run the guest here; the moment it runs."""
        self.guest.resume()
        at = time.monotonic()
        self.on_resume()
        return at

    def requested(self, n: int) -> None:
        self.stamps[n] = time.monotonic()
        self.next_n = n + 1

    def run_until_released(self) -> float:
        """Resume at the first grant; return its time once RELEASED arrives. Raises
        RemoteError if the source cancelled (its digest differed), PeerGone if the lease
        ran out (or was never granted) or the link broke."""
        resumed_at = 0.0
        next_request = time.monotonic() + LEASE_REQUEST_S
        sock = self.chan.sock
        while True:
            now = time.monotonic()
            end = self.until if self.until else self.stamps[0] + self.lease_s
            if now >= end:
                raise PeerGone(f"no word from the source within the {self.lease_s:g} s lease"
                               + ("" if self.until else " (never granted)"))
            if self.until and now >= next_request:
                self.chan.send_json(FrameType.HEARTBEAT, {"n": self.next_n})
                self.requested(self.next_n)
                next_request = now + LEASE_REQUEST_S
            wait = min(end, next_request) - now if self.until else end - now
            if not self.chan.wait_readable(max(0.0, wait)):  # TLS-buffered bytes too
                continue
            sock.settimeout(self.lease_s)  # a frame begun is a small one: read it whole
            f = self.chan.recv_frame()
            if f.type is FrameType.HEARTBEAT:
                n = f.json().get("n")
                stamp = self.stamps.get(n) if isinstance(n, int) else None
                if stamp is None:
                    raise ProtocolError(f"a grant for lease request {n!r}, never asked")
                self.until = max(self.until, stamp + self.lease_s)
                if not resumed_at and time.monotonic() < self.until:
                    resumed_at = self.resume()  # the go-ahead: the downtime ends here
                    # the first renewal goes out now: it tells the source the vCPUs run,
                    # so its own measuring no longer takes the CPU our start needs
                    next_request = resumed_at
                continue
            if f.type is FrameType.RELEASED:
                return resumed_at or self.resume()
            if f.type in (FrameType.CANCEL, FrameType.ERROR):
                raise RemoteError(f.type, str(f.json().get("message", "no reason given")))
            raise ProtocolError(f"unexpected {f.type.name} while the source decides")


def _await_resolution(decisions: Callable[[float], socket.socket | None] | None,
                      mig_id: str, why: str,
                      on_in_doubt: Callable[[str], None] | None) -> str:
    """In doubt: hold the paused guest until the decision ("released" or "aborted")
    arrives over a new connection, from the source (naming this migration's id) or an
    operator (`cvmig resolve`). Other connections are told we are busy. Returns the
    decision. With no way to hear one, IncomingInDoubt says so (the guest stays paused)."""
    msg = (f"in doubt after the guest resumed here ({why}): holding it paused until the "
           "source's decision arrives (or `cvmig resolve`)")
    if on_in_doubt is not None:
        on_in_doubt(msg)
    if decisions is None:
        raise IncomingInDoubt(msg)
    while True:  # each wait is bounded; only a decision ends this (never lost)
        conn = decisions(POLL_S)
        if conn is None:
            continue
        with conn:
            conn.settimeout(HANDSHAKE_S)
            ch = Channel(conn)
            try:
                hello = ch.expect(FrameType.HELLO).json()
                decision = str(hello.get("decision", ""))
                ours = hello.get("resolve") == mig_id or hello.get("role") == "operator"
                if not ours or decision not in ("released", "aborted"):
                    ch.send_json(FrameType.ERROR, {
                        "message": "busy: holding an in-doubt guest; only its source's "
                                   "decision (or `cvmig resolve`) is accepted"})
                    continue
                ch.send_json(FrameType.OWNED if decision == "released" else FrameType.CANCEL,
                             {"message": f"destination: {decision}"})
                return decision
            except (PeerGone, ProtocolError, RemoteError, OSError):
                continue


def _verify(guest: Guest, resumed_at: float, held_at: float,
            window_s: float = 0.5) -> dict[str, object]:
    """The workload's own check, after it has run here for a measurement window.
    ``held_at``: a moment the guest was still paused here, before it first ran."""
    deadline = resumed_at + VERIFY_WAIT_S
    base = guest_ops(guest)
    while guest_ops(guest) <= base and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the vCPUs' own counters, with a deadline
    t0, ops0 = time.monotonic(), guest_ops(guest)
    time.sleep(window_s)  # the "after" throughput is measured over this window
    t1, ops1 = time.monotonic(), guest_ops(guest)
    # the ring continues the source's: its first gap is the switchover as the guest saw it.
    # That gap spans held_at; it may end before resumed_at, stamped once the vCPUs answered
    gap = guest.max_heartbeat_gap(held_at, t1)
    guest.pause()
    check = guest.check()
    guest.resume()
    return {"check": check, "resumed_at": resumed_at,
            "ops_after": ops1 - ops0, "verify_time": t1 - t0, "observed_gap": gap}
