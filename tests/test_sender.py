"""The source's sender over a real TCP connection: it hears the destination's ACKs while it
has nothing to send (so the driver's count of frames in flight is current, and a wait
for them ends when they land), and leaves what follows the last ACK to the handoff."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from cvmig.migration.sender import Sender
from cvmig.wire.channel import Channel
from cvmig.wire.frames import FrameType, json_meta
from cvmig.wire.protocol import Ack

SLOT = 4096


@pytest.fixture
def link() -> Iterator[tuple[Channel, Channel]]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    src, dst = Channel(a), Channel(b)
    yield src, dst
    src.close()
    dst.close()


def _frames(sender: Sender, n: int) -> None:
    for i in range(n):
        slot = sender.slot()
        sender.submit(FrameType.PAGES, [b"m%d" % i], slot, SLOT, windowed=True)


def test_acks_are_heard_while_nothing_is_sent_and_the_confirm_is_left_for_the_handoff(
        link: tuple[Channel, Channel]) -> None:
    src, dst = link
    sender = Sender(src, memoryview(bytearray(3 * SLOT)), 3, SLOT, window=3, io_timeout=5.0)
    _frames(sender, 3)
    got = [dst.recv_frame(max_data=SLOT) for _ in range(3)]
    assert [f.type for f in got] == [FrameType.PAGES] * 3
    assert sender.in_flight == 3
    # the destination acknowledges after the last frame went out (the sender sits idle),
    # its CONFIRM right behind the last ACK, in one burst
    dst.send(FrameType.ACK, Ack.encode(1))
    dst.send(FrameType.ACK, Ack.encode(3))
    dst.send(FrameType.CONFIRM, json_meta({"running": True}))
    assert sender.wait_landed(5.0)
    assert sender.in_flight == 0
    sender.flush()
    sender.close()
    sender.peer_check()  # the CONFIRM was not taken for a stray frame mid-stream
    assert src.recv_frame().type is FrameType.CONFIRM  # it is the handoff's to read


def test_a_wait_for_frames_that_never_land_is_bounded(link: tuple[Channel, Channel]) -> None:
    src, dst = link
    sender = Sender(src, memoryview(bytearray(3 * SLOT)), 3, SLOT, window=3, io_timeout=5.0)
    _frames(sender, 2)
    for _ in range(2):
        dst.recv_frame(max_data=SLOT)
    dst.send(FrameType.ACK, Ack.encode(1))  # one of two
    t0 = time.monotonic()
    assert not sender.wait_landed(0.3)
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert sender.in_flight == 1  # the one ACK was heard
    sender.close()


def test_a_submit_wakes_the_sender_from_listening_for_acks(
        link: tuple[Channel, Channel]) -> None:
    src, dst = link
    sender = Sender(src, memoryview(bytearray(3 * SLOT)), 3, SLOT, window=3, io_timeout=5.0)
    _frames(sender, 1)
    dst.recv_frame(max_data=SLOT)
    sender.flush()  # on the socket, unacknowledged: the sender listens for the ACK
    t0 = time.monotonic()
    _frames(sender, 1)
    got: list[FrameType] = []
    reader = threading.Thread(target=lambda: got.append(dst.recv_frame(max_data=SLOT).type))
    reader.start()
    reader.join(5.0)
    # sent at once, not after the listen's poll interval ran out
    assert got == [FrameType.PAGES]
    assert time.monotonic() - t0 < 0.2
    sender.close()


def test_landing_in_is_what_recent_frames_took_to_be_acknowledged(
        link: tuple[Channel, Channel]) -> None:
    src, dst = link
    sender = Sender(src, memoryview(bytearray(3 * SLOT)), 3, SLOT, window=3, io_timeout=5.0)
    assert sender.landing_in() == 0.0  # nothing owed
    _frames(sender, 1)
    assert sender.landing_in() is None  # owed, and nothing seen yet to judge by
    dst.recv_frame(max_data=SLOT)
    held = 0.3  # the destination takes this long over the frame
    time.sleep(held)  # (standing in for its import: the latency is the point)
    dst.send(FrameType.ACK, Ack.encode(1))
    assert sender.wait_landed(5.0)
    assert sender.landing_in() == 0.0
    _frames(sender, 1)
    est = sender.landing_in()
    assert est is not None and held * 0.9 <= est <= held + 0.5
    dst.recv_frame(max_data=SLOT)
    dst.send(FrameType.ACK, Ack.encode(2))
    assert sender.wait_landed(5.0)
    sender.close()
