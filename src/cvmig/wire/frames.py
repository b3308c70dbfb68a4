"""The migration stream: a versioned sequence of typed frames.

Every frame is a 24-byte header, then ``meta`` (small, CRC-protected), then ``data`` (bulk).
For firmware packets the data is protected by the packets' own MACs; for everything else
(shared pages, control messages) the CRC covers it, since it travels in ``meta``.

    magic u16 | version u8 | type u8 | meta_len u32 | data_len u64 | crc32 u32 | reserved u32

The stream opens with HELLO from each side; the sequence of frames, and the formats of
the bulk ones, are in `cvmig.wire.protocol`.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = 0xC5E7
VERSION = 1
HEADER = struct.Struct("<HBBIQII")
HEADER_SIZE = HEADER.size
MAX_META = 64 << 20  # a frame's meta never needs more; larger means a corrupt stream


class FrameType(enum.IntEnum):
    HELLO = 1  # json: version, role, capabilities
    CERTS = 2  # destination -> source: the destination platform's certificate bundle
    START = 3  # source -> destination: json guest config + SEND_START output
    PAGES = 4  # meta: mode, pfns, command bounds; data: firmware packets
    SHARED = 5  # meta: pfns + plaintext of shared pages
    PAGE_STATE = 6  # meta: the page-state map (private / shared)
    VMSA = 7  # meta: pfn; data: one firmware packet of a vCPU's VMSA page
    FINISH = 8  # source -> destination: json (source digest) + finish trailer in data
    CONFIRM = 9  # destination -> source: json (running, digest, check)
    CANCEL = 10  # either way: json reason; the peer discards its half
    ERROR = 11  # either way: json message
    RELEASED = 12  # source -> destination: the source has released the guest (SEND_FINISH)
    ACK = 13  # destination -> source: u64 count of page frames imported so far
    HEARTBEAT = 14  # json {"n"}: D asks the source to renew its lease n; S grants, echoing n
    OWNED = 15  # destination -> source: RELEASED received, the guest is the destination's


_KIB = 1 << 10
# The most meta each frame kind can carry (PAGES: 1024 pfns and bounds; SHARED: 1024
# pages; PAGE_STATE: a byte per page of a 64 GiB guest).
META_LIMIT: dict[FrameType, int] = {
    FrameType.HELLO: 4 * _KIB,
    FrameType.CERTS: 64 * _KIB,
    FrameType.START: 64 * _KIB,
    FrameType.PAGES: 32 * _KIB,
    FrameType.SHARED: 1024 * (8 + 4096),
    FrameType.PAGE_STATE: 16 << 20,
    FrameType.VMSA: 8,
    FrameType.FINISH: 4 * _KIB,
    FrameType.CONFIRM: 1024 * _KIB,
    FrameType.CANCEL: 64 * _KIB,
    FrameType.ERROR: 64 * _KIB,
    FrameType.RELEASED: 4 * _KIB,
    FrameType.ACK: 8,
    FrameType.HEARTBEAT: 64,
    FrameType.OWNED: 4 * _KIB,
}


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame at this point of the protocol."""


@dataclass(frozen=True)
class Header:
    type: FrameType
    meta_len: int
    data_len: int
    crc: int


Buffer = bytes | bytearray | memoryview


def encode_header(ftype: FrameType, meta: Buffer | Sequence[Buffer], data_len: int) -> bytes:
    """The header of a frame whose meta is one buffer or several sent back to back."""
    parts = [meta] if isinstance(meta, bytes | bytearray | memoryview) else meta
    meta_len = sum(memoryview(m).nbytes for m in parts)
    crc = zlib.crc32(struct.pack("<BIQ", ftype, meta_len, data_len))
    for m in parts:
        crc = zlib.crc32(m, crc)
    return HEADER.pack(MAGIC, VERSION, ftype, meta_len, data_len, crc, 0)


def decode_header(raw: bytes | bytearray | memoryview) -> Header:
    magic, version, ftype, meta_len, data_len, crc, _ = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic 0x{magic:04x}: not a cvmig stream or corrupted")
    if version != VERSION:
        raise ProtocolError(f"stream version {version} is not supported (this is {VERSION})")
    try:
        t = FrameType(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type {ftype}") from None
    limit = META_LIMIT.get(t, MAX_META)
    if meta_len > limit:
        # checked before anything is allocated: a hostile length costs nothing
        raise ProtocolError(f"{t.name} frame meta of {meta_len} bytes is over its {limit}")
    return Header(t, meta_len, data_len, crc)


def check_meta(h: Header, meta: bytes | bytearray | memoryview) -> None:
    crc = zlib.crc32(meta, zlib.crc32(struct.pack("<BIQ", h.type, h.meta_len, h.data_len)))
    if crc != h.crc:
        raise ProtocolError(f"{h.type.name} frame failed its CRC check: corrupted in transit")


def json_meta(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def parse_json(h: Header, meta: bytes | memoryview) -> dict[str, object]:
    try:
        obj = json.loads(bytes(meta))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{h.type.name} frame carries invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{h.type.name} frame must carry a JSON object")
    return obj
