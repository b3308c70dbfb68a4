"""The secure processor as the hypervisor sees it: commands in, status codes and blobs out.

This is the contract between `cvmig.psp` and its users (the migration engine, the guest's
launch, benchmarks). Two bindings implement `SecureProcessor`: an in-process one over the
firmware object (unit tests), and a mailbox client talking to the PSP process (everything
real). Status codes cross the mailbox; the client raises `PspError` carrying the code.

Addresses: each guest's memory is a shared-memory region the PSP maps as "system memory";
a guest page is named by its page frame number (pfn) within the guest. Transport buffers
(where SEND writes packets and RECEIVE reads them) are shared-memory regions the hypervisor
owns and the PSP maps, named by (region id, byte offset), as DMA buffers are on hardware.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import numpy as np

PAGE_SIZE = 4096
PACKET_HEADER_SIZE = 52  # FLAGS u32, IV 16 B, MAC 32 B
SESSION_SIZE = 128
SEV_CERT_SIZE = 2084
SPEC_MAX_LENGTH = 16 * 1024  # SEND/RECEIVE_UPDATE_DATA cap in the SEV API spec (4 pages)


class Status(enum.IntEnum):
    """SEV firmware status codes (SEV API spec, table of status codes)."""

    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LENGTH = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DF_FLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18


class PspError(Exception):
    """A firmware command returned a status other than SUCCESS."""

    def __init__(self, command: str, status: Status, detail: str = "") -> None:
        self.command = command
        self.status = status
        self.detail = detail
        msg = f"{command} failed: {status.name} (0x{int(status):02x})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class Batching(enum.StrEnum):
    """How SEND/RECEIVE_UPDATE_DATA cover pages."""

    PAGE = "page"  # one 4 KiB page per command: what KVM and QEMU do
    CONTIG = "contig"  # one command per run of physically contiguous pages, up to a cap
    SG = "sg"  # scatter-gather over any pages, per-page MAC bound to address and sequence
    AEAD = "aead"  # scatter-gather with one AES-GCM tag per page (GPA, sequence as AAD), as TDX


class Policy(enum.IntFlag):
    """Guest policy bits (legacy SEV); API_MAJOR/MINOR live in bits 16-31."""

    NODBG = 1 << 0
    NOKS = 1 << 1
    ES = 1 << 2
    NOSEND = 1 << 3
    DOMAIN = 1 << 4
    SEV = 1 << 5


class GuestState(enum.IntEnum):
    """Firmware guest states (GSTATE)."""

    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6


@dataclass(frozen=True)
class PlatformCerts:
    """A platform's identity as exported for migration: its PDH and the chains behind it.

    ``pdh``, ``pek``, ``oca``, ``cek`` are SEV-format certificates (2084 bytes each);
    ``ask`` and ``ark`` are AMD-format certificates.
    """

    pdh: bytes
    pek: bytes
    oca: bytes
    cek: bytes
    ask: bytes
    ark: bytes

    def to_bytes(self) -> bytes:
        """Length-prefixed concatenation, for the wire."""
        out = bytearray()
        for part in (self.pdh, self.pek, self.oca, self.cek, self.ask, self.ark):
            out += len(part).to_bytes(4, "little") + part
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> PlatformCerts:
        parts: list[bytes] = []
        off = 0
        for _ in range(6):
            if off + 4 > len(data):
                raise ValueError("truncated certificate bundle")
            n = int.from_bytes(data[off : off + 4], "little")
            off += 4
            if off + n > len(data):
                raise ValueError("truncated certificate bundle")
            parts.append(bytes(data[off : off + n]))
            off += n
        if off != len(data):
            raise ValueError("trailing bytes after certificate bundle")
        return cls(*parts)


@dataclass(frozen=True)
class SendSession:
    """What SEND_START produces and RECEIVE_START consumes."""

    policy: int
    sender_pdh: bytes  # the sending platform's PDH certificate
    session: bytes  # the session blob: SEV's 128 bytes (+36 negotiating sg or aead)


def packet_size(mode: Batching, npages: int) -> int:
    """Bytes one UPDATE_DATA packet of ``npages`` pages occupies in a transport buffer."""
    from cvmig.psp.packet import packet_size as _size

    return _size(mode, npages)


class SecureProcessor(Protocol):
    """The hypervisor's view of one host's secure processor."""

    # -- platform -------------------------------------------------------------------
    def export_certs(self) -> PlatformCerts:
        """PDH_CERT_EXPORT plus the AMD chain: what a peer needs to send to this host."""
        ...

    def map_region(self, shm_name: str, size: int) -> int:
        """Map a shared-memory object (guest memory or a transport buffer); returns its id."""
        ...

    def unmap_region(self, region: int) -> None: ...

    # -- guest lifecycle ------------------------------------------------------------
    def launch(self, region: int, npages: int, policy: int) -> int:
        """LAUNCH_START..ACTIVATE: a new guest with a fresh VEK over ``npages`` pages of
        ``region``, its memory encrypted from zero. Returns the guest handle."""
        ...

    def decommission(self, handle: int) -> None: ...

    def guest_status(self, handle: int) -> tuple[GuestState, int]:
        """GUEST_STATUS: (state, policy)."""
        ...

    # -- send -----------------------------------------------------------------------
    def send_start(self, handle: int, target: PlatformCerts,
                   packet_format: Batching | None = None) -> SendSession:
        """RUNNING -> SUPDATE. ``packet_format`` (the batching mode the session will use)
        is negotiated here: the session is bound to it, and for cvmig's own formats (sg,
        aead) the session blob carries it under a MAC (psp/README.md). None: bound by
        the first packet, as before negotiation existed."""
        ...

    def send_update_data(
        self, handle: int, mode: Batching, pfns: np.ndarray, trans: int, offset: int
    ) -> int:
        """Encrypt pages ``pfns`` (int64, one command: one page, one contiguous run, or one
        scatter-gather list) into transport region ``trans`` at ``offset``.
        Returns the packet's length in bytes (== packet_size(mode, len(pfns)))."""
        ...

    def send_update_data_queue(
        self, handle: int, mode: Batching, pfns: np.ndarray, bounds: np.ndarray, trans: int,
        offset: int,
    ) -> int:
        """Many UPDATE_DATA commands behind one mailbox doorbell (Hygon CSV ring style):
        command i covers ``pfns[bounds[i]:bounds[i+1]]``; packets are laid back to back from
        ``offset``. Each is a full command (own IV, MAC, firmware cost); only the mailbox
        round trip is shared. Returns the total bytes written."""
        ...

    def send_update_vmsa(self, handle: int, pfn: int, trans: int, offset: int) -> int:
        """Send the VMSA page at ``pfn`` (guest policy must have ES)."""
        ...

    def send_trailer(self, handle: int) -> bytes:
        """Extension, in SUPDATE, no state change: the finish trailer (the count of
        scatter-gather pages sent, MAC'd under the TIK) that RECEIVE_FINISH checks. Called
        after the last UPDATE command and BEFORE the destination confirms: SEND_FINISH must
        wait for that confirmation, since a SENT guest can never run again."""
        ...

    def send_finish(self, handle: int) -> None:
        """SUPDATE -> SENT; erases the channel keys. Only after the destination confirms."""
        ...

    def send_cancel(self, handle: int) -> None: ...

    # -- receive --------------------------------------------------------------------
    def receive_start(self, region: int, npages: int, session: SendSession,
                      packet_format: Batching | None = None) -> int:
        """A new guest in RUPDATE over ``region``, with its own new VEK. Returns the handle.
        The session is bound to the packet format its blob negotiates; ``packet_format``,
        if given (the one the stream announced), must be that one."""
        ...

    def receive_update_data(
        self, handle: int, mode: Batching, pfns: np.ndarray, trans: int, offset: int, length: int
    ) -> None: ...

    def receive_update_data_queue(
        self, handle: int, mode: Batching, pfns: np.ndarray, bounds: np.ndarray, trans: int,
        offset: int, length: int,
    ) -> None:
        """Mirror of send_update_data_queue: packets back to back in [offset, offset+length)."""
        ...

    def receive_update_vmsa(
        self, handle: int, pfn: int, trans: int, offset: int, length: int
    ) -> None: ...

    def receive_finish(self, handle: int, trailer: bytes) -> bytes:
        """RUPDATE -> RUNNING; checks the trailer (no scatter-gather page dropped at the end).
        Returns the measurement of the private pages imported (`cvmig.psp.measure`)."""
        ...
