"""The wire protocol's frames: encode/decode round trips, and every length checked
against what the protocol allows before anything is allocated."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cvmig.psp.api import Batching, packet_size
from cvmig.wire.frames import (
    HEADER,
    MAGIC,
    META_LIMIT,
    VERSION,
    FrameType,
    ProtocolError,
    decode_header,
    encode_header,
)
from cvmig.wire.protocol import MAX_FRAME_PAGES, Ack, PagesFrame, SharedFrame, Vmsa


def _meta(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


@given(st.sampled_from(list(Batching)), st.integers(1, 64), st.data())
def test_pages_frame_round_trip(mode: Batching, n: int, data: st.DataObject) -> None:
    npages = 1 << 16
    pfns = np.array(sorted(data.draw(st.sets(st.integers(0, npages - 1), min_size=n,
                                             max_size=n))), dtype=np.int64)
    if mode is Batching.PAGE:
        bounds = np.arange(n + 1, dtype=np.int64)
    else:
        cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1)) if n > 1 else [])
        bounds = np.array([0, *cuts, n], dtype=np.int64)
    if mode is Batching.CONTIG:
        pfns = np.arange(n, dtype=np.int64) + int(pfns[0]) % (npages - n)
    data_len = sum(packet_size(mode, int(k)) for k in np.diff(bounds))
    f = PagesFrame(mode, False, pfns, bounds)
    g = PagesFrame.decode(_meta(f.encode()), data_len, npages)
    assert g.mode is mode and np.array_equal(g.pfns, pfns) and np.array_equal(g.bounds, bounds)
    with pytest.raises(ProtocolError, match="need"):
        PagesFrame.decode(_meta(f.encode()), data_len + 1, npages)  # data must fit exactly


@pytest.mark.parametrize("bad,match", [
    (lambda m: m[:5], "too short"),
    (lambda m: b"zstd\0\0\0\0" + m[8:], "unknown packet format"),
    (lambda m: m[:-8], "length does not match"),
])
def test_pages_frame_refuses_malformed_meta(bad, match) -> None:  # type: ignore[no-untyped-def]
    f = PagesFrame(Batching.SG, False, np.array([1, 5], np.int64), np.array([0, 2], np.int64))
    with pytest.raises(ProtocolError, match=match):
        PagesFrame.decode(bad(_meta(f.encode())), packet_size(Batching.SG, 2), 16)


def test_pages_frame_refuses_out_of_guest_pfns_and_bad_bounds() -> None:
    for pfns, bounds, match in [([1, 99], [0, 2], "outside guest memory"),
                                ([1, 2], [0, 3], "malformed command bounds"),
                                ([1, 2], [1, 2], "malformed command bounds")]:
        f = PagesFrame(Batching.SG, False, np.array(pfns, np.int64), np.array(bounds, np.int64))
        with pytest.raises(ProtocolError, match=match):
            PagesFrame.decode(_meta(f.encode()), packet_size(Batching.SG, 2), 16)
    big = np.arange(MAX_FRAME_PAGES + 1, dtype=np.int64)
    f = PagesFrame(Batching.SG, False, big, np.array([0, len(big)], np.int64))
    with pytest.raises(ProtocolError, match="out of bounds"):
        PagesFrame.decode(_meta(f.encode()), 0, 1 << 20)


def test_small_frames_round_trip_and_refuse_wrong_sizes() -> None:
    assert Ack.decode(Ack.encode(7)) == 7
    with pytest.raises(ProtocolError):
        Ack.decode(b"\0" * 9)
    vmsa_len = packet_size(Batching.PAGE, 1)
    assert Vmsa.decode(Vmsa.encode(3), vmsa_len, 4) == 3
    with pytest.raises(ProtocolError, match="outside"):
        Vmsa.decode(Vmsa.encode(4), vmsa_len, 4)
    with pytest.raises(ProtocolError, match="a VMSA packet is"):
        Vmsa.decode(Vmsa.encode(3), 1 << 40, 4)  # the 2^40-byte VMSA of the issue
    pages = np.arange(2 * 4096, dtype=np.uint8).reshape(2, 4096) % 251
    s = SharedFrame.decode(_meta(SharedFrame(np.array([0, 3]), pages).encode()), 4)
    assert np.array_equal(s.pages, pages) and s.pfns.tolist() == [0, 3]
    with pytest.raises(ProtocolError):
        SharedFrame.decode(b"\0" * 100, 4)


def _raw_header(ftype: int, meta_len: int, data_len: int) -> bytes:
    crc = zlib.crc32(struct.pack("<BIQ", ftype, meta_len, data_len))
    return HEADER.pack(MAGIC, VERSION, ftype, meta_len, data_len, crc, 0)


@pytest.mark.parametrize("ftype", list(FrameType))
def test_every_frame_kind_has_a_meta_bound_checked_at_the_header(ftype: FrameType) -> None:
    """A hostile meta length is refused from the 24-byte header alone, before any
    allocation: the destination's memory stays bounded under any stream."""
    limit = META_LIMIT[ftype]
    assert limit <= 16 << 20
    decode_header(_raw_header(ftype, limit, 0))  # at the bound: fine
    with pytest.raises(ProtocolError, match="over its"):
        decode_header(_raw_header(ftype, limit + 1, 0))
    assert encode_header(ftype, b"", 0)[:2] == struct.pack("<H", MAGIC)
