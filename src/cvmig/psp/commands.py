"""The mailbox's command table: one place for every command's ID, name and byte formats.

Client (`client.py`) and server (`server.py`) both read this table, so a command buffer is
encoded and decoded by the same pair of functions on both sides. A command is its ID (u32;
SEV's IDs where SEV has the command, this emulator's extensions in 0xE0-0xFF), a
little-endian request buffer (the arguments of the `SecureProcessor` method, in order) and
a reply buffer (its result). A failed command replies with its SEV status and
``name \\0 detail`` instead (`error_body` / `raise_status`): status codes, not exceptions,
cross the mailbox. Imports nothing below the contract (`api`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from cvmig.psp.api import (
    Batching,
    GuestState,
    PlatformCerts,
    PspError,
    SendSession,
    Status,
)

MAX_MESSAGE = 4 << 20  # bytes, ID included; a queue of 4094 one-page commands needs ~64 KiB
MAX_REPLY = 1 << 20  # bytes of reply body (the largest real one, PDH_CERT_EXPORT, is ~12 KiB)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_II = struct.Struct("<II")
_LAUNCH = struct.Struct("<IQI")  # region, npages, policy
_RSTART = struct.Struct("<IQI")  # region, npages, packet format (then the session)
# handle u32, mode u8, pad 3, trans u32, pad 4, offset u64, length u64, npfns u32, nbounds u32
_XFER = struct.Struct("<IB3xI4xQQII")
_VMSA = struct.Struct("<I4xQIIQQ")  # handle, pfn, trans, pad, offset, length
_MODES = list(Batching)  # by position, so a new Batching member needs no change here
_MODE_ID: dict[str, int] = {m: i for i, m in enumerate(_MODES)}  # Batching is a str enum

R = TypeVar("R")


@dataclass(frozen=True)
class Codec(Generic[R]):
    """A reply format: result -> bytes on the server, bytes -> result on the client."""

    encode: Callable[[R], bytes]
    decode: Callable[[memoryview], R]


@dataclass(frozen=True)
class Request:
    """A request format: the method's arguments -> bytes, bytes -> the same arguments."""

    encode: Callable[..., bytes]
    decode: Callable[[memoryview], tuple[Any, ...]]


@dataclass(frozen=True)
class Command(Generic[R]):
    id: int
    name: str
    method: str  # the `Firmware` method the server calls with the decoded arguments
    request: Request
    reply: Codec[R]
    free: bool = False  # not a PSP command on hardware: the cost profile does not apply


# --- request formats --------------------------------------------------------------------


def _u32(b: memoryview) -> tuple[int]:
    return (_U32.unpack_from(b, 0)[0],)


def _xfer(handle: int, mode: Batching, trans: int, offset: int, length: int,
          pfns: np.ndarray, bounds: np.ndarray | None) -> bytes:
    p = np.ascontiguousarray(pfns, dtype="<i8").reshape(-1)
    b = np.ascontiguousarray(bounds if bounds is not None else (), dtype="<i8").reshape(-1)
    head = _XFER.pack(handle, _MODE_ID[mode], trans, offset, length, len(p), len(b))
    return head + p.tobytes() + b.tobytes()


def _unxfer(buf: memoryview) -> tuple[int, Batching, int, int, int, np.ndarray, np.ndarray]:
    handle, mode, trans, offset, length, npfns, nbounds = _XFER.unpack_from(buf, 0)
    o = _XFER.size
    if mode >= len(_MODES) or len(buf) != o + 8 * (npfns + nbounds):
        raise PspError("mailbox", Status.INVALID_PARAM, "malformed transfer command buffer")
    pfns = np.frombuffer(buf, dtype="<i8", count=npfns, offset=o)
    bounds = np.frombuffer(buf, dtype="<i8", count=nbounds, offset=o + 8 * npfns)
    return handle, _MODES[mode], trans, offset, length, pfns, bounds


def session_bytes(s: SendSession) -> bytes:
    return _II.pack(s.policy, len(s.sender_pdh)) + s.sender_pdh + s.session


def session_from(buf: bytes | memoryview) -> SendSession:
    policy, n = _II.unpack_from(buf, 0)
    return SendSession(policy, bytes(buf[8 : 8 + n]), bytes(buf[8 + n :]))


NONE = Request(lambda: b"", lambda b: ())
HANDLE = Request(_U32.pack, _u32)  # one u32: a guest handle or a region id
MAP = Request(
    lambda name, size: _U64.pack(size) + name.encode(),
    lambda b: (bytes(b[8:]).decode(), _U64.unpack_from(b, 0)[0]),
)
LAUNCH = Request(_LAUNCH.pack, lambda b: _LAUNCH.unpack_from(b, 0))
_NO_FORMAT = 0xFF  # the packet format is not negotiated (bound by the first packet)


def _format_code(fmt: Batching | None) -> int:
    return _NO_FORMAT if fmt is None else _MODE_ID[Batching(fmt)]


def _format(code: int) -> Batching | None:
    return None if code == _NO_FORMAT else _MODES[code]


SEND_START_REQ = Request(
    lambda h, target, fmt=None: _II.pack(h, _format_code(fmt)) + target.to_bytes(),
    lambda b: (_II.unpack_from(b, 0)[0], PlatformCerts.from_bytes(bytes(b[8:])),
               _format(_II.unpack_from(b, 0)[1])),
)
def _send_data(b: memoryview) -> tuple[Any, ...]:
    h, mode, trans, off, _, pfns, _ = _unxfer(b)
    return h, mode, pfns, trans, off


def _send_queue(b: memoryview) -> tuple[Any, ...]:
    h, mode, trans, off, _, pfns, bounds = _unxfer(b)
    return h, mode, pfns, bounds, trans, off


def _receive_data(b: memoryview) -> tuple[Any, ...]:
    h, mode, trans, off, length, pfns, _ = _unxfer(b)
    return h, mode, pfns, trans, off, length


def _receive_queue(b: memoryview) -> tuple[Any, ...]:
    h, mode, trans, off, length, pfns, bounds = _unxfer(b)
    return h, mode, pfns, bounds, trans, off, length


def _send_vmsa(b: memoryview) -> tuple[Any, ...]:
    h, pfn, trans, _, off, _ = _VMSA.unpack_from(b, 0)
    return h, pfn, trans, off


def _receive_vmsa(b: memoryview) -> tuple[Any, ...]:
    h, pfn, trans, _, off, length = _VMSA.unpack_from(b, 0)
    return h, pfn, trans, off, length


# Each Request's encode takes the `SecureProcessor` method's arguments in order.
SEND_DATA = Request(
    lambda h, mode, pfns, trans, off: _xfer(h, mode, trans, off, 0, pfns, None), _send_data
)
SEND_QUEUE = Request(
    lambda h, mode, pfns, bounds, trans, off: _xfer(h, mode, trans, off, 0, pfns, bounds),
    _send_queue,
)
RECEIVE_DATA = Request(
    lambda h, mode, pfns, trans, off, n: _xfer(h, mode, trans, off, n, pfns, None), _receive_data
)
RECEIVE_QUEUE = Request(
    lambda h, mode, pfns, bounds, trans, off, n: _xfer(h, mode, trans, off, n, pfns, bounds),
    _receive_queue,
)
SEND_VMSA = Request(lambda h, pfn, trans, off: _VMSA.pack(h, pfn, trans, 0, off, 0), _send_vmsa)
RECEIVE_VMSA = Request(
    lambda h, pfn, trans, off, n: _VMSA.pack(h, pfn, trans, 0, off, n), _receive_vmsa
)
RECEIVE_START_REQ = Request(
    lambda region, npages, s, fmt=None: _RSTART.pack(region, npages, _format_code(fmt))
    + session_bytes(s),
    lambda b: (*_RSTART.unpack_from(b, 0)[:2], session_from(b[_RSTART.size :]),
               _format(_RSTART.unpack_from(b, 0)[2])),
)
HANDLE_BYTES = Request(  # (handle, trailer)
    lambda h, data: _U32.pack(h) + data,
    lambda b: (_U32.unpack_from(b, 0)[0], bytes(b[4:])),
)

# --- reply formats ------------------------------------------------------------------------

EMPTY: Codec[None] = Codec(lambda _: b"", lambda b: None)
U32: Codec[int] = Codec(_U32.pack, lambda b: int(_U32.unpack_from(b, 0)[0]))
U64: Codec[int] = Codec(_U64.pack, lambda b: int(_U64.unpack_from(b, 0)[0]))
BYTES: Codec[bytes] = Codec(bytes, bytes)


def _state(b: memoryview) -> tuple[GuestState, int]:
    state, policy = _II.unpack_from(b, 0)
    return GuestState(state), int(policy)


STATE: Codec[tuple[GuestState, int]] = Codec(lambda r: _II.pack(int(r[0]), r[1]), _state)
CERTS: Codec[PlatformCerts] = Codec(lambda c: c.to_bytes(), lambda b: PlatformCerts.from_bytes(bytes(b)))
SESSION: Codec[SendSession] = Codec(session_bytes, session_from)
JSON: Codec[dict[str, Any]] = Codec(lambda d: json.dumps(d).encode(), lambda b: dict(json.loads(bytes(b))))

# --- the table ----------------------------------------------------------------------------

PLATFORM_STATUS = Command(0x04, "PLATFORM_STATUS", "platform_status", NONE, JSON)
PDH_CERT_EXPORT = Command(0x08, "PDH_CERT_EXPORT", "export_certs", NONE, CERTS)
DECOMMISSION = Command(0x20, "DECOMMISSION", "decommission", HANDLE, EMPTY)
GUEST_STATUS = Command(0x23, "GUEST_STATUS", "guest_status", HANDLE, STATE)
# here: LAUNCH_START .. LAUNCH_FINISH + ACTIVATE, memory from zero
LAUNCH_START = Command(0x30, "LAUNCH_START", "launch", LAUNCH, U32)
SEND_START = Command(0x40, "SEND_START", "send_start", SEND_START_REQ, SESSION)
SEND_UPDATE_DATA = Command(0x41, "SEND_UPDATE_DATA", "send_update_data", SEND_DATA, U64)
SEND_UPDATE_VMSA = Command(0x42, "SEND_UPDATE_VMSA", "send_update_vmsa", SEND_VMSA, U64)
SEND_FINISH = Command(0x43, "SEND_FINISH", "send_finish", HANDLE, EMPTY)
SEND_CANCEL = Command(0x44, "SEND_CANCEL", "send_cancel", HANDLE, EMPTY)
RECEIVE_START = Command(0x50, "RECEIVE_START", "receive_start", RECEIVE_START_REQ, U32)
RECEIVE_UPDATE_DATA = Command(0x51, "RECEIVE_UPDATE_DATA", "receive_update_data", RECEIVE_DATA, EMPTY)
RECEIVE_UPDATE_VMSA = Command(0x52, "RECEIVE_UPDATE_VMSA", "receive_update_vmsa", RECEIVE_VMSA, EMPTY)
RECEIVE_FINISH = Command(0x53, "RECEIVE_FINISH", "receive_finish", HANDLE_BYTES, BYTES)
# Extensions. MAP/UNMAP are DMA mapping, FETCH_MEMORY_KEY the memory controller (guest
# vCPUs only): not firmware commands on hardware, so free under a cost profile.
MAP_REGION = Command(0xE0, "MAP_REGION", "map_region", MAP, U32, free=True)
UNMAP_REGION = Command(0xE1, "UNMAP_REGION", "unmap_region", HANDLE, EMPTY, free=True)
# Hygon CSV ring-buffer style: many commands, one doorbell
SEND_UPDATE_DATA_QUEUE = Command(
    0xE2, "SEND_UPDATE_DATA_QUEUE", "send_update_data_queue", SEND_QUEUE, U64
)
RECEIVE_UPDATE_DATA_QUEUE = Command(
    0xE3, "RECEIVE_UPDATE_DATA_QUEUE", "receive_update_data_queue", RECEIVE_QUEUE, EMPTY
)
# the sg page count, MAC'd, for RECEIVE_FINISH (SUPDATE, no state change)
SEND_TRAILER = Command(0xE4, "SEND_TRAILER", "send_trailer", HANDLE, BYTES)
FETCH_MEMORY_KEY = Command(0xF0, "FETCH_MEMORY_KEY", "memory_key", HANDLE, BYTES, free=True)

COMMANDS: dict[int, Command[Any]] = {
    c.id: c
    for c in (
        PLATFORM_STATUS, PDH_CERT_EXPORT, DECOMMISSION, GUEST_STATUS, LAUNCH_START,
        SEND_START, SEND_UPDATE_DATA, SEND_UPDATE_VMSA, SEND_FINISH, SEND_CANCEL,
        RECEIVE_START, RECEIVE_UPDATE_DATA, RECEIVE_UPDATE_VMSA, RECEIVE_FINISH,
        MAP_REGION, UNMAP_REGION, SEND_UPDATE_DATA_QUEUE, RECEIVE_UPDATE_DATA_QUEUE,
        SEND_TRAILER, FETCH_MEMORY_KEY,
    )
}
COMMAND_NAMES: dict[int, str] = {i: c.name for i, c in COMMANDS.items()}

# Transport, not a command: asks the server for a shared-memory doorbell ring on this
# connection (`ring.py`). Only ever sent over the SEQPACKET socket.
RING_SETUP = 0xE5
# Transport: "look at the ring", sent only to a side that said it sleeps. A socket wake-up,
# unlike an eventfd's, is a sync wake-up: on one CPU the woken side runs as the waker sleeps.
RING_BELL = 0xE6
COMMAND_NAMES[RING_SETUP] = "RING_SETUP"
COMMAND_NAMES[RING_BELL] = "RING_BELL"


def name_of(cmd_id: int) -> str:
    return COMMAND_NAMES.get(cmd_id, f"0x{cmd_id:x}")


def error_body(command: str, detail: str) -> bytes:
    """The reply body of a failed command (its status travels beside it)."""
    return f"{command}\0{detail}".encode()


def raise_status(status: int, body: bytes | memoryview) -> None:
    """Turn a non-SUCCESS reply into `PspError` (an unknown status into HWERROR_PLATFORM)."""
    command, _, detail = bytes(body).decode(errors="replace").partition("\0")
    try:
        code = Status(status)
    except ValueError:
        code = Status.HWERROR_PLATFORM
        detail = f"unknown status 0x{status:x}: {detail}"
    raise PspError(command, code, detail)
