"""The destination side: receive a guest through the local PSP, run it, confirm.

A half-received guest is discarded whole: its PSP context decommissioned, its memory
unlinked. The guest runs here after RECEIVE_FINISH; it stays only if the source, comparing
its own digest with the one our PSP measured on import, releases it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from cvmig.guest.memory import GuestMemory, Populator
from cvmig.guest.vm import Guest
from cvmig.migration.config import config_from_json
from cvmig.migration.host import Host
from cvmig.migration.receiver import Receiver
from cvmig.migration.source import MODES, describe_failure, guest_ops
from cvmig.psp.api import PspError, SendSession, packet_size
from cvmig.psp.mailbox import MailboxClient
from cvmig.psp.measure import compose
from cvmig.wire.channel import Channel, PeerGone, RemoteError
from cvmig.wire.frames import VERSION, FrameType, ProtocolError, parse_json
from cvmig.wire.protocol import WINDOW, Ack, slot_size

VERIFY_WAIT_S = 10.0  # how long the workload may take to show progress after resume


class IncomingFailed(Exception):
    """The incoming migration did not complete; nothing of it is kept."""


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


def migrate_in(hostobj: Host, conn: socket.socket, io_timeout: float = 60.0) -> IncomingVM:
    """Receive one guest over ``conn``. Raises IncomingFailed (after discarding it)."""
    conn.settimeout(io_timeout)
    chan = Channel(conn)
    psp = hostobj.psp
    trans = hostobj.transport
    assert psp is not None and trans is not None
    memory: GuestMemory | None = None
    populator: Populator | None = None
    handle: int | None = None
    guest: Guest | None = None
    try:
        chan.send_json(FrameType.HELLO, {"version": VERSION, "role": "destination",
                                         "capabilities": list(MODES)})
        hello = chan.expect(FrameType.HELLO).json()
        if hello.get("role") != "source":
            raise ProtocolError("peer is not a cvmig source")
        chan.send(FrameType.CERTS, psp.export_certs().to_bytes())
        start = chan.expect(FrameType.START, max_data=1 << 16)
        info = parse_json(start.header, start.meta[: start.header.meta_len])
        config = config_from_json(info["config"])
        npages = int(info["npages"])  # type: ignore[call-overload]
        tail = start.meta[start.header.meta_len:]
        sender_pdh, session = tail[:-128], tail[-128:]
        memory = GuestMemory.create(config.memory, populate=False)
        # first-touch faults of a large memory cost seconds per GiB here: taken on a
        # thread, ahead of the pages arriving in order, not before the first one
        populator = memory.populate_in_background()
        if memory.npages != npages:
            raise ProtocolError(f"source guest has {npages} pages, config says {memory.npages}")
        region = psp.map_region(memory.name, memory.size)
        handle = psp.receive_start(region, npages, SendSession(
            int(info["policy"]), bytes(sender_pdh), bytes(session)))  # type: ignore[call-overload]
        # the vCPU processes start now, while the pages arrive, not in the downtime
        guest = Guest(config, memory, hostobj.psp_socket, handle)
        guest.prepare()
        memory.unlink()  # the PSP and the vCPUs have it mapped; a killed host leaks nothing
        rx = Receiver(chan, trans.view, WINDOW, slot_size(), npages).start()
        try:
            trailer = _import_stream(rx, psp, handle, trans.region, memory)
        except BaseException:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)  # wakes the reader; ERROR can still go out
            raise
        finally:
            rx.stop()
        populator.stop()  # whatever it has not reached was faulted in by the import
        private = psp.receive_finish(handle, trailer)
        # measured by our PSP as it imported the pages: no pass over memory in the downtime
        digest = compose(private, memory.pages, memory.page_state)
        guest.restore()  # vCPUs up, paused, state imported from the VMSAs
        guest.resume()
        resumed_at = time.monotonic()
        chan.send_json(FrameType.CONFIRM, {"status": "running", "digest": digest})
        vm = IncomingVM(guest, memory, handle)
        released = chan.recv_frame()
        if released.type is not FrameType.RELEASED:
            # the source found the digests differ, or could not release: two copies must
            # never run, and the source's is the one that stays
            why = released.json().get("message", released.type.name)
            raise IncomingFailed(f"source did not release the guest: {why}")
        vm.report = _verify(guest, resumed_at)
        try:
            chan.send_json(FrameType.CONFIRM, vm.report)
        except (PeerGone, OSError):
            pass
        return vm
    except BaseException as e:
        reason = str(e) if isinstance(e, IncomingFailed) else describe_failure(e, "source")
        try:
            chan.sock.settimeout(1.0)
            if not isinstance(e, RemoteError | PeerGone):
                chan.send_json(FrameType.ERROR, {"message": reason})
        except (OSError, PeerGone):
            pass
        if guest is not None:
            guest.shutdown()
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
                   memory: GuestMemory) -> bytes:
    """Import frames as the receiver hands them over, acknowledging each page frame;
    return the finish trailer."""
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
            return item.raw
        else:
            raise ProtocolError(f"unexpected {t.name} frame during the transfer")


def _verify(guest: Guest, resumed_at: float, window_s: float = 0.5) -> dict[str, object]:
    """The workload's own check, after it has run here for a measurement window."""
    deadline = resumed_at + VERIFY_WAIT_S
    base = guest_ops(guest)
    while guest_ops(guest) <= base and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the vCPUs' own counters, with a deadline
    t0, ops0 = time.monotonic(), guest_ops(guest)
    time.sleep(window_s)  # the "after" throughput is measured over this window
    t1, ops1 = time.monotonic(), guest_ops(guest)
    # the ring continues the source's: its first gap is the switchover as the guest saw it
    gap = guest.max_heartbeat_gap(resumed_at, t1)
    guest.pause()
    check = guest.check()
    guest.resume()
    return {"check": check, "resumed_at": resumed_at,
            "ops_after": ops1 - ops0, "verify_time": t1 - t0, "observed_gap": gap}
