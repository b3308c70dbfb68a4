"""The source's sending half of the data path: frames from a ring of transport slots onto
the socket, on a thread of its own, within the destination's window, while the engine has
its secure processor fill the next slot. The source PSP never waits for the network or
for the destination's acknowledgements while a slot is free.

Ownership, in the manner of asyncio's transports: the engine takes a free slot (`slot`),
has the PSP write packets into it and hands it over with its frame (`submit`); from then
on the slot belongs to the sender until the frame is on the socket. The sender owns the
socket (both directions) while it runs: it reads the destination's ACKs and any ERROR or
CANCEL, also while it has nothing to send (so `in_flight` is current when the driver
decides whether to stop, and `wait_landed` returns as the last ACK comes in). `close`
gives the socket back to the engine for the handoff. Frames go out in submission order.
A failure of the sender is raised to the engine at its next call.
"""

from __future__ import annotations

import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cvmig.migration.driver import LATENCY_KEEP, MigrationCancelled, landing_quantile
from cvmig.wire.channel import Channel, PeerGone, RemoteError
from cvmig.wire.frames import HEADER_SIZE, FrameType, ProtocolError
from cvmig.wire.protocol import Ack, transport_slots

POLL_S = 0.25  # how often a blocked wait looks at whether the other side gave up

Buffers = Sequence[bytes | memoryview]


@dataclass
class _Out:
    type: FrameType
    meta: Buffers
    data: Buffers
    slot: int  # -1: data is not in a slot
    windowed: bool  # counts against the destination's window (PAGES, SHARED)


def frame_bytes(meta: Buffers, data: Buffers) -> int:
    """Bytes a frame occupies on the wire."""
    return HEADER_SIZE + sum(memoryview(b).nbytes for b in meta) + sum(
        memoryview(b).nbytes for b in data)


class Sender:
    """Sends frames whose data lies in ``slots`` slots of ``slot_bytes`` in ``view`` (a
    transport buffer the local PSP has mapped), at most ``window`` PAGES/SHARED frames
    unacknowledged by the destination. ``io_timeout`` bounds each wait on the peer."""

    def __init__(self, chan: Channel, view: memoryview, slots: int, slot_bytes: int,
                 window: int, io_timeout: float,
                 should_cancel: Callable[[], bool] = lambda: False) -> None:
        self._views = transport_slots(view, slots, slot_bytes)
        self.chan = chan
        self.slot_bytes = slot_bytes
        self.window = window
        self.io_timeout = io_timeout
        self.should_cancel = should_cancel  # checked by every wait, at least every POLL_S
        self.frames_sent = 0
        self.frames_acked = 0
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(slots):
            self._free.put(i)
        self._out: queue.SimpleQueue[_Out | None] = queue.SimpleQueue()
        self._pending = 0  # frames submitted, not yet on the socket
        # when each unacknowledged windowed frame was submitted, oldest first, and how long
        # recent ones took from submission to their ACK (queued, sent, imported)
        self._submitted: deque[float] = deque()
        self._latency: deque[float] = deque(maxlen=LATENCY_KEEP)
        self._idle = threading.Condition()  # notified as frames go out and ACKs come in
        # a submit wakes the sender thread from reading ACKs while it has nothing to send
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cvmig-sender", daemon=True)
        self._thread.start()

    # -- the engine's side ----------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Frames submitted that the destination has not acknowledged (queued or sent)."""
        return self.frames_sent - self.frames_acked + self._pending

    def offset(self, slot: int) -> int:
        return slot * self.slot_bytes

    def slot(self) -> int:
        """A free transport slot; waits while every slot is queued or on the wire."""
        while True:
            self._check()
            try:
                return self._free.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def submit(self, ftype: FrameType, meta: Buffers, slot: int = -1, length: int = 0,
               data: Buffers = (), windowed: bool = False) -> int:
        """Queue a frame; its data is ``slot``'s first ``length`` bytes, or ``data``.
        Returns the bytes it will occupy on the wire."""
        self._check()
        if slot >= 0:
            data = [self._views[slot][:length]]
        with self._idle:
            self._pending += 1
            if windowed:
                self._submitted.append(time.monotonic())
        self._out.put(_Out(ftype, meta, data, slot, windowed))
        self._wake()
        return frame_bytes(meta, data)

    def landing_in(self) -> float | None:
        """Seconds until the destination should have acknowledged every windowed frame
        submitted: the last one's submission plus what recent frames took (their 75th
        percentile); 0 when none is owed, None before any was acknowledged."""
        with self._idle:
            if not self._submitted:
                return 0.0
            if not self._latency:
                return None
            lat = landing_quantile(self._latency)
            last = self._submitted[-1]
        return max(0.0, last + lat - time.monotonic())

    def wait_landed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until the destination has acknowledged every frame
        submitted; whether it has."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.in_flight:
                self._check()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, POLL_S))
        return True

    def flush(self) -> None:
        """Wait until every submitted frame is on the socket."""
        with self._idle:
            while self._pending and self._error is None and self._thread.is_alive():
                if self.should_cancel():
                    break
                self._idle.wait(POLL_S)
        self._check()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the sender thread (after `flush`, or to abandon what is queued); the
        socket is the engine's again."""
        self._stopping.set()
        self._out.put(None)
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if not self._thread.is_alive() and self._wake_w >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # full (it is awake already) or closed (it has stopped)

    def peer_check(self) -> None:
        """Raise what the sender learned: the destination's ERROR, a broken link."""
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self.should_cancel():
            raise MigrationCancelled("migration cancelled")
        if not self._thread.is_alive() and not self._stopping.is_set():
            raise ProtocolError("the sender stopped unexpectedly")

    # -- the sender thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._hear_while_idle()
                out = self._out.get()
                if out is None or self._stopping.is_set():
                    return
                if out.windowed:
                    self._await_window()
                self.chan.send(out.type, out.meta, out.data)
                if out.windowed:
                    self.frames_sent += 1
                if out.slot >= 0:
                    self._free.put(out.slot)
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
                self._take_acks(wait=False)
        except BaseException as e:  # noqa: BLE001 - raised to the engine at its next call
            self._error = e
            with self._idle:
                self._idle.notify_all()

    def _hear_while_idle(self) -> None:
        """Nothing queued: read ACKs as they come until a frame is submitted (or none is
        owed: then the queue's own wait is enough)."""
        while self._out.empty() and self.frames_sent > self.frames_acked \
                and not self._stopping.is_set():
            if self.chan.tls and self.chan.sock.pending():  # type: ignore[attr-defined]
                self._take_acks(wait=False)
                continue
            sock = self.chan.sock.fileno()
            r, _, _ = select.select([sock, self._wake_r], [], [], POLL_S)
            if self._wake_r in r:
                os.read(self._wake_r, 4096)
            if sock in r:
                self._take_acks(wait=False)

    def _await_window(self) -> None:
        deadline = time.monotonic() + self.io_timeout
        while self.frames_sent - self.frames_acked >= self.window:
            if self._stopping.is_set():
                raise PeerGone("sender stopped while waiting for the destination")
            if time.monotonic() > deadline:
                raise PeerGone(
                    f"the destination acknowledged nothing for {self.io_timeout:g} s")
            self._take_acks(wait=True)

    def _take_acks(self, wait: bool) -> None:
        """Read what the destination sent while it owes ACKs: ACKs, or an ERROR/CANCEL
        (raised). Not once every frame is acknowledged: what comes next (CONFIRM after
        FINISH) is the handoff's to read."""
        while self.frames_acked < self.frames_sent:
            # not select() on the socket: over TLS, bytes may wait inside the SSL object
            if not self.chan.wait_readable(POLL_S if wait else 0):
                return
            f = self.chan.recv_frame(max_data=1 << 20)
            if f.type is FrameType.ACK:
                acked = Ack.decode(f.meta)
                if not self.frames_acked <= acked <= self.frames_sent:
                    raise ProtocolError(
                        f"ACK for {acked} frames, {self.frames_sent} were sent")
                now = time.monotonic()
                with self._idle:
                    for _ in range(acked - self.frames_acked):
                        self._latency.append(now - self._submitted.popleft())
                    self.frames_acked = acked
                    self._idle.notify_all()
                wait = False  # got one: take the rest without blocking
                continue
            if f.type in (FrameType.ERROR, FrameType.CANCEL):
                raise RemoteError(f.type, str(f.json().get("message", "no reason given")))
            raise ProtocolError(f"unexpected {f.type.name} from the destination mid-stream")
