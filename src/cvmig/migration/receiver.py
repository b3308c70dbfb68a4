"""The destination's receiving half of the data path: frames off the socket into a ring of
transport slots, on a thread of its own, while the engine imports the slots already filled
through the secure processor. Network receive and firmware import overlap; a round costs
the slower of the two, not their sum.

Ownership, in the manner of asyncio's transports: the receiver owns the socket's read side
and the free slots; a slot handed out with an item belongs to the engine until it calls
`release`. The reader stops after FINISH, CANCEL or ERROR, or on the first failure, which
it hands over as the next item, so the engine sees frames and failures in stream order.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from cvmig.psp.packet import TRAILER_SIZE
from cvmig.wire.channel import Channel, RemoteError
from cvmig.wire.frames import FrameType, ProtocolError, parse_json
from cvmig.wire.protocol import PagesFrame, SharedFrame, Vmsa, transport_slots

POLL_S = 0.25  # how often a blocked wait looks at whether the other side gave up


@dataclass
class Item:
    """One frame as the engine sees it. ``slot`` holds the data of PAGES and VMSA."""

    type: FrameType
    pages: PagesFrame | None = None
    shared: SharedFrame | None = None
    pfn: int = -1
    slot: int = -1
    length: int = 0
    raw: bytes = b""  # PAGE_STATE map, FINISH trailer
    finish: dict[str, object] = field(default_factory=dict)  # FINISH: its json


class Receiver:
    """Reads PAGES, SHARED, VMSA, PAGE_STATE and FINISH frames into ``slots`` of
    ``slot_bytes`` each in ``view`` (a transport buffer the local PSP has mapped)."""

    def __init__(self, chan: Channel, view: memoryview, slots: int, slot_bytes: int,
                 npages: int, endgame_timeout: float) -> None:
        self._views = transport_slots(view, slots, slot_bytes)
        self.chan = chan
        self.slot_bytes = slot_bytes
        self.npages = npages
        self.endgame_timeout = endgame_timeout
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(slots):
            self._free.put(i)
        self._items: queue.SimpleQueue[Item | BaseException] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cvmig-receiver", daemon=True)

    def offset(self, slot: int) -> int:
        """Where ``slot`` starts in the transport buffer."""
        return slot * self.slot_bytes

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def next(self) -> Item:
        """The next frame, in stream order; raises what the reader failed with. Bounded:
        the reader's own waits are bounded by the socket's timeout."""
        while True:
            try:
                got = self._items.get(timeout=POLL_S)
            except queue.Empty:
                if self._thread.is_alive():
                    continue
                # the reader may have put its last frame and ended after our wait ran
                # out: what it left is read before its end is taken for a loss
                try:
                    got = self._items.get_nowait()
                except queue.Empty:
                    raise ProtocolError("the receiver stopped without a final frame") from None
            if isinstance(got, BaseException):
                raise got
            return got

    def release(self, slot: int) -> None:
        """The engine is done with ``slot``: the reader may fill it again."""
        self._free.put(slot)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading (the caller shuts the socket down first if the reader may be
        blocked in a receive)."""
        self._stopping.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the reader thread ----------------------------------------------------------------
    def _slot(self) -> int:
        while not self._stopping.is_set():
            try:
                return self._free.get(timeout=POLL_S)
            except queue.Empty:
                continue
        raise ProtocolError("receiver stopped")

    def _run(self) -> None:
        chan = self.chan
        try:
            while not self._stopping.is_set():
                h = chan.recv_header()
                t = h.type
                if t is FrameType.PAGES:
                    meta = chan.recv_meta(h)
                    frame = PagesFrame.decode(meta, h.data_len, self.npages)
                    slot = self._slot()
                    chan.recv_into(self._views[slot][: h.data_len])
                    self._items.put(Item(t, pages=frame, slot=slot, length=h.data_len))
                    continue
                if t is FrameType.VMSA:
                    # the source has paused: from here a silent source is noticed sooner
                    chan.sock.settimeout(self.endgame_timeout)
                    pfn = Vmsa.decode(chan.recv_meta(h), h.data_len, self.npages)
                    slot = self._slot()
                    chan.recv_into(self._views[slot][: h.data_len])
                    self._items.put(Item(t, pfn=pfn, slot=slot, length=h.data_len))
                    continue
                if t is FrameType.FINISH:
                    if h.meta_len > 4096:
                        raise ProtocolError(f"FINISH frame meta of {h.meta_len} bytes")
                    finish_meta = chan.recv_meta(h)
                    if h.data_len != TRAILER_SIZE:
                        raise ProtocolError(
                            f"FINISH frame carries {h.data_len} bytes; the trailer is "
                            f"{TRAILER_SIZE}")
                    trailer = bytearray(TRAILER_SIZE)
                    chan.recv_into(memoryview(trailer))
                    info = parse_json(h, finish_meta) if finish_meta else {}
                    self._items.put(Item(t, raw=bytes(trailer), finish=info))
                    return
                if h.data_len:
                    raise ProtocolError(f"unexpected {h.data_len} data bytes on a {t.name} frame")
                meta = chan.recv_meta(h)
                if t is FrameType.SHARED:
                    self._items.put(Item(t, shared=SharedFrame.decode(meta, self.npages)))
                elif t is FrameType.PAGE_STATE:
                    if len(meta) != self.npages:
                        raise ProtocolError("page-state map has the wrong size")
                    self._items.put(Item(t, raw=meta))
                elif t in (FrameType.CANCEL, FrameType.ERROR):
                    raise RemoteError(t, str(parse_json(h, meta).get("message", "")))
                else:
                    raise ProtocolError(f"unexpected {t.name} frame during the transfer")
        except BaseException as e:  # noqa: BLE001 - handed to the engine, in order
            self._items.put(e)
