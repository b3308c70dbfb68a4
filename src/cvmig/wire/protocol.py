r"""The migration protocol in one place: the bulk frames' formats and the order of frames.

Sequence (source S, destination D); every frame is `cvmig.wire.frames`' header + meta + data:

    S -> D  HELLO       json: version, role "source", capabilities (packet formats)
    D -> S  HELLO       json: version, role "destination", capabilities
    D -> S  CERTS       the destination platform's certificate chain (PDH, PEK, OCA, CEK, ...)
    S -> D  START       json: guest config, npages, policy, batching, cap; data: PDH + session
    S -> D  PAGES*      `PagesFrame`: firmware packets of private pages      \  any order,
    S -> D  SHARED*     `SharedFrame`: plaintext of shared pages              } at most
    D -> S  ACK*        `Ack`: page frames imported so far                   /  WINDOW unacked
    S -> D  VMSA*       pfn; data: the SEND_UPDATE_VMSA packet (guest paused from here)
    S -> D  PAGE_STATE  the page-state map
    S -> D  FINISH      json: migration id, digest of shared pages + page states; data: the
                        finish trailer (count, stream digest, packet format; MAC'd)
            D: RECEIVE_FINISH refuses a stream altered in transit; the shared digest must
               match; the guest is restored, paused
    D -> S  CONFIRM     json: status "ready", the digest D's PSP measured on import, lease
                        request 0 (D stamps it with its clock)
    S -> D  HEARTBEAT   json {"n": 0}: the grant, and the go-ahead: D resumes the guest and
                        may run it until stamp(0) + LEASE_S
    D -> S  HEARTBEAT   json {"n": 1}: lease request 1, the moment the vCPUs run at D;
                        only then does S measure its own copy (it would take the CPU
                        D's start needs where both share cores)
    D -> S  HEARTBEAT*  json {"n": k}: lease request k, once a second while S decides ...
    S -> D  HEARTBEAT*  ... each granted by echoing k: D runs on until stamp(k) + LEASE_S
    S -> D  RELEASED    digests matched and SEND_FINISH is done: the guest is D's
    D -> S  OWNED       D heard it: only now does S report "completed"
    D -> S  CONFIRM     json: the workload's own check after it ran at D

Either side may send ERROR or CANCEL (json message) instead of its next frame; the other
side then discards its half (D) or resumes the guest (S). After FINISH, D stops its copy
before it answers a CANCEL with CANCEL or sends ERROR; S resumes only on such an answer,
at once if it granted no lease, or LEASE_S + 1 s after its last grant (a lease counts
from D's request, made before S's grant, so it has ended by then whatever delayed the
frames). If D's lease runs out before RELEASED, D pauses the guest and holds it in doubt;
the decision then comes over a new connection: HELLO with role "source", the migration id
and decision "released" or "aborted" (or role "operator": `cvmig resolve`), answered OWNED
or CANCEL. The migration README draws the states.

Flow control: D acknowledges every PAGES and SHARED frame once imported; S keeps at most
`WINDOW` unacknowledged, which is also the depth of D's ring of transport slots, so D can
always read the next frame while its secure processor imports the last.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from cvmig.psp.api import PAGE_SIZE, Batching, packet_size
from cvmig.wire.frames import ProtocolError

# page frames in flight: one being imported at D, one received behind it, one on the wire.
# More would only fill socket buffers: S would measure its own speed, not the link's, and
# the backlog would land in the downtime.
WINDOW = 3
MAX_FRAME_PAGES = 1024  # pages one PAGES frame carries at most (a transport slot's worth)

# Timing both ends must agree on (migration README: detection times, the lease).
IO_TIMEOUT_S = 15.0  # silence tolerated while pages stream (either way; configurable)
ENDGAME_TIMEOUT_S = 4.0  # ... once the source has paused the guest
LEASE_S = 3.0  # the destination runs the guest this long past a granted lease request
LEASE_REQUEST_S = 1.0  # how often the destination asks to renew its lease


def slot_size() -> int:
    """Bytes of one transport slot: the largest PAGES frame's data in any format."""
    return max(
        packet_size(Batching.SG, MAX_FRAME_PAGES),
        packet_size(Batching.AEAD, MAX_FRAME_PAGES),
        MAX_FRAME_PAGES * packet_size(Batching.PAGE, 1),
    )


def transport_slots(view: memoryview, slots: int, slot_bytes: int) -> list[memoryview]:
    """A transport buffer cut into ``slots`` slots of ``slot_bytes`` (slot i starts at
    offset i × slot_bytes, where the PSP reads or writes it)."""
    if slots * slot_bytes > len(view):
        raise ValueError(f"{slots} slots of {slot_bytes} B do not fit the transport buffer")
    return [view[i * slot_bytes : (i + 1) * slot_bytes] for i in range(slots)]


@dataclass(frozen=True)
class PagesFrame:
    """Meta of a PAGES frame: the packet format by value, whether the commands were
    queued behind one doorbell, the pages and the command boundaries
    (command i covers ``pfns[bounds[i]:bounds[i+1]]``). The data is the packets."""

    mode: Batching
    queued: bool
    pfns: np.ndarray  # int64
    bounds: np.ndarray  # int64, len = commands + 1

    HEAD = struct.Struct("<8sBxxxII")  # mode (ASCII), queued, commands, pages

    def encode(self) -> list[bytes | memoryview]:
        """The meta as buffers to send as they are (the pfn and bound arrays uncopied)."""
        pfns = np.ascontiguousarray(self.pfns, dtype="<i8")
        bounds = np.ascontiguousarray(self.bounds, dtype="<i8")
        head = self.HEAD.pack(self.mode.value.encode(), self.queued, len(bounds) - 1, len(pfns))
        return [head, pfns.data.cast("B"), bounds.data.cast("B")]

    @classmethod
    def decode(cls, meta: bytes, data_len: int, npages: int) -> PagesFrame:
        """Parse and check against the guest's size; the data length must be exactly what
        these commands' packets occupy. Raises ProtocolError."""
        if len(meta) < cls.HEAD.size:
            raise ProtocolError("PAGES frame meta is too short")
        raw_mode, queued, ncmds, n = cls.HEAD.unpack_from(meta)
        try:
            mode = Batching(raw_mode.rstrip(b"\0").decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(f"PAGES frame names an unknown packet format {raw_mode!r}") from None
        off = cls.HEAD.size
        if not 1 <= n <= MAX_FRAME_PAGES or not 1 <= ncmds <= n:
            raise ProtocolError(f"PAGES frame of {n} pages in {ncmds} commands is out of bounds")
        if len(meta) != off + 8 * (n + ncmds + 1):
            raise ProtocolError("PAGES frame meta length does not match its page count")
        pfns = np.frombuffer(meta, np.int64, n, off)
        bounds = np.frombuffer(meta, np.int64, ncmds + 1, off + 8 * n)
        check_pfns(pfns, npages)
        counts = np.diff(bounds)
        if bounds[0] != 0 or bounds[-1] != n or np.any(counts <= 0):
            raise ProtocolError("PAGES frame has malformed command bounds")
        try:
            if mode in (Batching.SG, Batching.AEAD):
                need = sum(packet_size(mode, int(k)) for k in counts.tolist())
            else:
                per = packet_size(mode, 1) - PAGE_SIZE  # one header per command
                need = ncmds * per + n * PAGE_SIZE
                if mode is Batching.PAGE and ncmds != n:
                    raise ValueError("page mode carries one page per command")
        except ValueError as e:
            raise ProtocolError(f"PAGES frame: {e}") from None
        if need != data_len:
            raise ProtocolError(
                f"PAGES frame carries {data_len} bytes, its {ncmds} commands need {need}")
        return cls(mode, bool(queued), pfns, bounds)


@dataclass(frozen=True)
class SharedFrame:
    """Meta of a SHARED frame: n pfns, then n plaintext pages (shared by design)."""

    pfns: np.ndarray
    pages: np.ndarray  # (n, 4096) uint8

    def encode(self) -> list[bytes | memoryview]:
        pfns = np.ascontiguousarray(self.pfns, dtype="<i8")
        pages = np.ascontiguousarray(self.pages, dtype=np.uint8)
        return [pfns.data.cast("B"), pages.reshape(-1).data]

    @classmethod
    def decode(cls, meta: bytes, npages: int) -> SharedFrame:
        n, rest = divmod(len(meta), 8 + PAGE_SIZE)
        if rest or n == 0:
            raise ProtocolError("SHARED frame meta is not a whole number of pages")
        pfns = np.frombuffer(meta, np.int64, n)
        check_pfns(pfns, npages)
        return cls(pfns, np.frombuffer(meta, np.uint8, n * PAGE_SIZE, 8 * n).reshape(n, PAGE_SIZE))


class Ack:
    """Meta of an ACK frame: u64 count of page frames imported so far."""

    FMT = struct.Struct("<Q")

    @classmethod
    def encode(cls, frames: int) -> bytes:
        return cls.FMT.pack(frames)

    @classmethod
    def decode(cls, meta: bytes) -> int:
        if len(meta) != cls.FMT.size:
            raise ProtocolError("ACK frame meta must be 8 bytes")
        return int(cls.FMT.unpack(meta)[0])


class Vmsa:
    """Meta of a VMSA frame: the VMSA page's pfn (i64); data: one page packet."""

    FMT = struct.Struct("<q")

    @classmethod
    def encode(cls, pfn: int) -> bytes:
        return cls.FMT.pack(pfn)

    @classmethod
    def decode(cls, meta: bytes, data_len: int, npages: int) -> int:
        if len(meta) != cls.FMT.size:
            raise ProtocolError("VMSA frame meta must be 8 bytes")
        (pfn,) = cls.FMT.unpack(meta)
        if not 0 <= pfn < npages:
            raise ProtocolError(f"VMSA frame names pfn {pfn}, outside the guest's {npages} pages")
        if data_len != packet_size(Batching.PAGE, 1):
            raise ProtocolError(
                f"VMSA frame carries {data_len} bytes, a VMSA packet is "
                f"{packet_size(Batching.PAGE, 1)}")
        return int(pfn)


def check_pfns(pfns: np.ndarray, npages: int) -> None:
    if len(pfns) and (int(pfns.min()) < 0 or int(pfns.max()) >= npages):
        raise ProtocolError("page frame number outside guest memory")
