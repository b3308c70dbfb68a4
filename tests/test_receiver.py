"""The destination's reader thread and the engine taking its frames, over a real socket."""

from __future__ import annotations

import queue
import socket

import pytest

from cvmig.migration.receiver import Item, Receiver
from cvmig.psp.packet import TRAILER_SIZE
from cvmig.wire.channel import Channel
from cvmig.wire.frames import FrameType, ProtocolError


class _LateQueue(queue.SimpleQueue):  # type: ignore[type-arg]
    """A queue whose first timed wait runs out before the item that is on its way lands:
    the moment the reader puts its last frame and ends, just after the engine's wait."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        if block and timeout is not None and self.waits == 0:
            self.waits += 1
            raise queue.Empty
        return super().get(block, timeout)


def _receiver() -> tuple[Receiver, Channel, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname(), timeout=5.0)
        b, _ = srv.accept()
    b.settimeout(5.0)
    rx = Receiver(Channel(b), memoryview(bytearray(4 * 4096)), 2, 2 * 4096, 4, 5.0)
    return rx, Channel(a), b


def test_a_final_frame_put_just_after_the_engines_wait_ran_out_is_still_read() -> None:
    rx, src, b = _receiver()
    late = _LateQueue()
    rx._items = late
    try:
        src.send_json(FrameType.FINISH, {"id": "m"}, [bytes(TRAILER_SIZE)])
        rx.start()
        rx._thread.join(5.0)
        assert not rx._thread.is_alive()  # the reader has put FINISH and ended
        got = rx.next()  # its first wait "runs out": then the reader is seen gone
        assert late.waits == 1
        assert isinstance(got, Item) and got.type is FrameType.FINISH
        assert got.finish == {"id": "m"}
    finally:
        src.close()
        b.close()


def test_a_reader_that_ended_with_nothing_left_is_a_loss() -> None:
    rx, src, b = _receiver()
    try:
        rx.stop()  # stopped before it read anything: it ends without a frame
        rx.start()
        rx._thread.join(5.0)
        with pytest.raises(ProtocolError, match="without a final frame"):
            rx.next()
    finally:
        src.close()
        b.close()
