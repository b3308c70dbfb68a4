"""UPDATE_DATA packets: the 52-byte SEV header, the scatter-gather extension, the trailer.

``page`` and ``contig`` packets are SEV's (sev-protocol.md §1.4): header FLAGS u32 (0),
IV (16 B, fresh per packet), MAC (32 B), then the ciphertext. The data is AES-128-CTR
under the TEK with the IV as the initial 128-bit big-endian counter block; the MAC is
HMAC-SHA-256 under the TIK over (0x02, FLAGS u32, IV, length u32, length u32) followed
by the ciphertext. Nothing binds the packet to a guest address or to its place in the
session: that is SEV's gap, reproduced faithfully.

``sg`` packets are this emulator's extension (the TDX / SNP pattern), closing the gap:

    header (52 B)    FLAGS = 0, IV, MAC = HMAC(TIK, 0x12 ‖ FLAGS ‖ IV ‖ sg header ‖ table)
    sg header (16 B) count u32, reserved u32, first sequence number u64
    table            count × (GPA u64, page MAC 32 B)
    data             count × 4096 B, one AES-128-CTR stream from IV under the TEK
    page MAC         HMAC(TIK, 0x13 ‖ seq u64 ‖ GPA u64 ‖ page ciphertext)

Sequence numbers count the session's scatter-gather pages from 0, so each (page, seq)
pair is sent once; the receiver refuses a page whose seq is not newer than the last it
wrote at that address (replay, stale reorder), a page sent to another address (the GPA
is MAC'd), and at RECEIVE_FINISH a count that differs from the sender's (drops). The
count travels in the finish trailer: count u64 ‖ HMAC(TIK, 0x15 ‖ count u64).
"""

from __future__ import annotations

import hmac
import os
import struct

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cvmig.psp.api import PACKET_HEADER_SIZE, PAGE_SIZE, Batching, PspError, Status
from cvmig.psp.session import TransportKeys

HDR = PACKET_HEADER_SIZE
SG_HDR = 16
SG_ENTRY = 8 + 32  # GPA u64 + page MAC
TRAILER_SIZE = 8 + 32

CTX_DATA = 0x02  # the firmware's "DATA" channel context (used for VMSA too, as on Genoa)
CTX_SG = 0x12  # extension: scatter-gather packet header
CTX_SG_PAGE = 0x13  # extension: one scatter-gather page
CTX_TRAILER = 0x15  # extension: the finish trailer

_HDR_FMT = struct.Struct("<I16s32s")
_AAD_FMT = struct.Struct("<BI16sII")  # the 29-byte associated data of a SEV packet
_SGH_FMT = struct.Struct("<IIQ")
_PAGE_AAD = struct.Struct("<BQQ")
_SG_AAD = struct.Struct("<BI16s")  # context, FLAGS, IV: the sg header MAC's prefix
_GPA_FMT = struct.Struct("<Q")
_ENTRY_DT = np.dtype([("gpa", "<u8"), ("mac", "V32")])  # one sg table entry


def packet_size(mode: Batching | str, npages: int) -> int:
    """Bytes one UPDATE_DATA packet of ``npages`` pages occupies in a transport buffer."""
    if npages < 1:
        raise ValueError("a packet carries at least one page")
    mode = Batching(mode)
    if mode is Batching.SG:
        return HDR + SG_HDR + npages * (SG_ENTRY + PAGE_SIZE)
    if mode is Batching.PAGE and npages != 1:
        raise ValueError("page mode carries exactly one page")
    return HDR + npages * PAGE_SIZE


class Channel:
    """One session's transport keys, with cipher and MAC objects reused for every packet."""

    __slots__ = ("_ctr", "_mac", "seq")

    def __init__(self, keys: TransportKeys) -> None:
        self._ctr = Cipher(algorithms.AES(keys.tek), modes.CTR(bytes(16))).encryptor()
        self._mac = hmac.new(keys.tik, digestmod="sha256")
        # Sender: next scatter-gather sequence number. Receiver: sg pages accepted.
        self.seq = 0

    def _ctr_into(self, iv: bytes, src: np.ndarray, dst: np.ndarray) -> None:
        self._ctr.reset_nonce(iv)
        self._ctr.update_into(src.reshape(-1), dst.reshape(-1))  # type: ignore[arg-type]

    def _digest(self, *parts: bytes | np.ndarray) -> bytes:
        h = self._mac.copy()
        for p in parts:
            h.update(p)  # type: ignore[arg-type]
        return h.digest()

    # -- SEV packets (page, contig, VMSA) ----------------------------------------------

    def seal(self, pt: np.ndarray, ct: np.ndarray, out: np.ndarray) -> None:
        """Encrypt flat plaintext ``pt`` into PSP scratch ``ct``, MAC it there (so the
        hypervisor cannot change what is MAC'd), then write header and ciphertext to
        ``out`` (the transport buffer, ``HDR + len(pt)`` bytes)."""
        n = pt.size
        iv = os.urandom(16)
        self._ctr_into(iv, pt, ct)
        mac = self._digest(_AAD_FMT.pack(CTX_DATA, 0, iv, n, n), ct)
        memoryview(out)[:HDR] = _HDR_FMT.pack(0, iv, mac)  # type: ignore[arg-type]
        out[HDR:] = ct

    def open(self, cmd: str, pkt: np.ndarray, ct: np.ndarray, pt: np.ndarray) -> None:
        """Copy packet ``pkt`` into PSP scratch ``ct``, verify its MAC, and only then
        decrypt into ``pt``. Raises BAD_MEASUREMENT without touching ``pt``."""
        flags, iv, mac = _HDR_FMT.unpack(pkt[:HDR].tobytes())
        if flags != 0:
            raise PspError(cmd, Status.UNSUPPORTED, f"packet FLAGS 0x{flags:x} (compression)")
        ct[:] = pkt[HDR:]
        n = ct.size
        if not hmac.compare_digest(self._digest(_AAD_FMT.pack(CTX_DATA, 0, iv, n, n), ct), mac):
            raise PspError(cmd, Status.BAD_MEASUREMENT, "packet MAC does not verify")
        self._ctr_into(iv, ct, pt)

    # -- scatter-gather packets ------------------------------------------------------------

    def seal_sg(self, pfns: np.ndarray, pt: np.ndarray, ct: np.ndarray, out: np.ndarray) -> None:
        """Scatter-gather packet of pages ``pt`` ((n, 4096)) for guest frames ``pfns``."""
        n = len(pfns)
        seq0 = self.seq
        iv = os.urandom(16)
        self._ctr_into(iv, pt, ct)
        gpas = (pfns * PAGE_SIZE).tolist()
        pack = _GPA_FMT.pack
        table = b"".join(
            [pack(g) + m for g, m in zip(gpas, self._page_macs(seq0, gpas, ct), strict=True)]
        )
        sgh = _SGH_FMT.pack(n, 0, seq0)
        mac = self._digest(_SG_AAD.pack(CTX_SG, 0, iv), sgh, table)
        head = _HDR_FMT.pack(0, iv, mac) + sgh + table
        memoryview(out)[: len(head)] = head  # type: ignore[arg-type]
        out[len(head) :] = ct.reshape(-1)
        self.seq = seq0 + n

    def _page_macs(self, seq0: int, gpas: list[int], ct: np.ndarray) -> list[bytes]:
        """HMAC(TIK, 0x13 ‖ seq ‖ GPA ‖ page) for each page: one MAC per page is the design."""
        copy = self._mac.copy
        pack = _PAGE_AAD.pack
        flat = memoryview(ct.reshape(-1))  # type: ignore[arg-type]
        out = []
        for i, gpa in enumerate(gpas):
            h = copy()
            h.update(pack(CTX_SG_PAGE, seq0 + i, gpa))
            h.update(flat[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            out.append(h.digest())
        return out

    def open_sg(
        self, cmd: str, pkt: np.ndarray, pfns: np.ndarray, scratch: np.ndarray, pt: np.ndarray
    ) -> np.ndarray:
        """Verify a scatter-gather packet for frames ``pfns`` and decrypt it into ``pt``
        ((n, 4096)). ``scratch`` is PSP memory of the packet's size. Returns the pages'
        sequence numbers (the caller checks freshness before writing anything)."""
        n = len(pfns)
        scratch[:] = pkt  # everything checked below is PSP-private from here on
        t_end = HDR + SG_HDR + n * SG_ENTRY
        head = scratch[:t_end].tobytes()
        flags, iv, mac = _HDR_FMT.unpack_from(head, 0)
        if flags != 0:
            raise PspError(cmd, Status.UNSUPPORTED, f"packet FLAGS 0x{flags:x}")
        sgh, table = head[HDR : HDR + SG_HDR], head[HDR + SG_HDR :]
        if not hmac.compare_digest(self._digest(_SG_AAD.pack(CTX_SG, 0, iv), sgh, table), mac):
            raise PspError(cmd, Status.BAD_MEASUREMENT, "scatter-gather header MAC does not verify")
        count, _, seq0 = _SGH_FMT.unpack(sgh)
        if count != n:
            raise PspError(cmd, Status.INVALID_LENGTH, f"packet has {count} pages, command {n}")
        entries = np.frombuffer(table, dtype=_ENTRY_DT)
        want = pfns.astype(np.uint64) * np.uint64(PAGE_SIZE)
        if not np.array_equal(entries["gpa"], want):
            bad = int(np.flatnonzero(entries["gpa"] != want)[0])
            raise PspError(
                cmd, Status.INVALID_ADDRESS,
                f"page {bad} is for GPA 0x{int(entries['gpa'][bad]):x}, not pfn {int(pfns[bad])} "
                "(redirected)",
            )
        ct = scratch[t_end:]
        got = self._page_macs(seq0, want.tolist(), ct)
        for i, mac_i in enumerate(got):
            if not hmac.compare_digest(mac_i, table[SG_ENTRY * i + 8 : SG_ENTRY * (i + 1)]):
                raise PspError(cmd, Status.BAD_MEASUREMENT, f"page {i}: MAC does not verify")
        self._ctr_into(iv, ct, pt)
        return np.arange(seq0, seq0 + n, dtype=np.int64)

    # -- finish trailer --------------------------------------------------------------------

    def trailer(self) -> bytes:
        """Sender: the count of scatter-gather pages sent, MAC'd under the TIK."""
        c = struct.pack("<Q", self.seq)
        return c + self._digest(bytes([CTX_TRAILER]), c)

    def check_trailer(self, cmd: str, trailer: bytes) -> None:
        """Receiver: the trailer is genuine and every sg page sent was received."""
        if len(trailer) != TRAILER_SIZE:
            raise PspError(cmd, Status.INVALID_LENGTH, f"trailer is {len(trailer)} bytes, want 40")
        c = trailer[:8]
        if not hmac.compare_digest(self._digest(bytes([CTX_TRAILER]), c), trailer[8:]):
            raise PspError(cmd, Status.BAD_MEASUREMENT, "finish trailer MAC does not verify")
        sent = struct.unpack("<Q", c)[0]
        if sent != self.seq:
            raise PspError(
                cmd, Status.BAD_MEASUREMENT,
                f"sender sent {sent} scatter-gather pages, {self.seq} were received (dropped)",
            )
