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
is MAC'd), and at RECEIVE_FINISH a count that differs from the sender's (drops).

``aead`` packets are a second extension, the same guarantees at a fraction of the cost
(TDX's migration stream: one AES-GCM tag per page, no HMAC pass over the data):

    aead header (16 B)  count u32, FLAGS u32 (0), first sequence number u64
    GPA table           count × GPA u64
    records             count × (page ciphertext 4096 B ‖ GCM tag 16 B)
    per page            AES-128-GCM under K_AEAD, nonce = seq u64 ‖ 0 u32 (little-endian),
                        AAD = 0x16 ‖ seq u64 ‖ GPA u64
    K_AEAD              HMAC-SHA-256(TIK, 0x17 ‖ TEK)[:16], so no AES key serves two modes

Nothing in the header needs a MAC of its own: a changed sequence number changes the
nonce and a changed GPA the AAD, so the page's tag fails; a changed count no longer
matches the command. Sequence numbers share the sg counter.

A session is bound to one batching mode: each side's firmware locks the mode of its first
UPDATE_DATA command and refuses any other afterwards, and the finish trailer carries the
sender's mode under its MAC, so a stream rewritten to another mode (a downgrade, or the
VMSA packet fed back as a private page) fails at RECEIVE_FINISH, before the guest runs.
The trailer: count u64 ‖ stream 32 B ‖ HMAC(TIK, 0x15 ‖ count u64 ‖ format u8 ‖ stream),
format 0 for SEV's (page, contig), 2 for sg, 3 for aead, 0xFF if no page was sent; stream
= HMAC(TIK, 0x18 ‖ the per-page measurements of the last version of each page sent,
zero for pages never sent), which RECEIVE_FINISH compares with the same over what it
imported: in every mode, SEV's included, memory altered in transit fails before the
guest can run.
"""

from __future__ import annotations

import hmac
import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cvmig.psp.api import PACKET_HEADER_SIZE, PAGE_SIZE, Batching, PspError, Status
from cvmig.psp.session import TransportKeys

HDR = PACKET_HEADER_SIZE
SG_HDR = 16
SG_ENTRY = 8 + 32  # GPA u64 + page MAC
TRAILER_SIZE = 8 + 32 + 32

CTX_DATA = 0x02  # the firmware's "DATA" channel context (used for VMSA too, as on Genoa)
CTX_SG = 0x12  # extension: scatter-gather packet header
CTX_SG_PAGE = 0x13  # extension: one scatter-gather page
CTX_TRAILER = 0x15  # extension: the finish trailer
CTX_AEAD_PAGE = 0x16  # extension: one aead page's AAD
CTX_AEAD_KEY = 0x17  # extension: derivation of K_AEAD
CTX_STREAM = 0x18  # extension: the keyed digest of the pages a session moved
AEAD_HDR = 16
AEAD_TAG = 16
AEAD_RECORD = PAGE_SIZE + AEAD_TAG
NO_MODE = 0xFF

_HDR_FMT = struct.Struct("<I16s32s")
_AAD_FMT = struct.Struct("<BI16sII")  # the 29-byte associated data of a SEV packet
_SGH_FMT = struct.Struct("<IIQ")
_PAGE_AAD = struct.Struct("<BQQ")
_SG_AAD = struct.Struct("<BI16s")  # context, FLAGS, IV: the sg header MAC's prefix
_GPA_FMT = struct.Struct("<Q")
_ENTRY_DT = np.dtype([("gpa", "<u8"), ("mac", "V32")])  # one sg table entry
_AEAD_HDR = struct.Struct("<IIQ")
_NONCE = struct.Struct("<QI")
# the trailer's format byte: fixed values, so that a new mode cannot renumber the old ones
_MODE_BYTE = {Batching.PAGE: 0, Batching.CONTIG: 1, Batching.SG: 2, Batching.AEAD: 3}
_FORMAT_NAME = {Batching.PAGE: "SEV (page/contig)", Batching.SG: "sg", Batching.AEAD: "aead"}


def packet_format(mode: Batching) -> Batching:
    """The packet format ``mode`` uses: page and contig share SEV's."""
    return Batching.PAGE if mode is Batching.CONTIG else mode


def format_code(fmt: Batching) -> int:
    return _MODE_BYTE[fmt]


def format_from_code(code: int) -> Batching | None:
    """The extension format with this code (sg, aead); None for any other."""
    for m in (Batching.SG, Batching.AEAD):
        if _MODE_BYTE[m] == code:
            return m
    return None


def _check_gpas(cmd: str, gpas: np.ndarray, pfns: np.ndarray) -> np.ndarray:
    """A sequenced packet's GPA table must name exactly the command's frames (else the
    hypervisor redirected a page); returns those GPAs."""
    want = pfns.astype(np.uint64) * np.uint64(PAGE_SIZE)
    if not np.array_equal(gpas, want):
        bad = int(np.flatnonzero(gpas != want)[0])
        raise PspError(
            cmd, Status.INVALID_ADDRESS,
            f"page {bad} is for GPA 0x{int(gpas[bad]):x}, not pfn {int(pfns[bad])} "
            "(redirected)",
        )
    return want


def packet_size(mode: Batching | str, npages: int) -> int:
    """Bytes one UPDATE_DATA packet of ``npages`` pages occupies in a transport buffer."""
    if npages < 1:
        raise ValueError("a packet carries at least one page")
    mode = Batching(mode)
    if mode is Batching.SG:
        return HDR + SG_HDR + npages * (SG_ENTRY + PAGE_SIZE)
    if mode is Batching.AEAD:
        return AEAD_HDR + npages * (8 + AEAD_RECORD)
    if mode is Batching.PAGE and npages != 1:
        raise ValueError("page mode carries exactly one page")
    return HDR + npages * PAGE_SIZE


class Channel:
    """One session's transport keys, with cipher and MAC objects reused for every packet."""

    __slots__ = ("_ctr", "_mac", "_hmac", "_gcm", "seq", "mode")

    def __init__(self, keys: TransportKeys) -> None:
        self._ctr = Cipher(algorithms.AES(keys.tek), modes.CTR(bytes(16))).encryptor()
        # keys are set up once per session; every MAC starts from a copy of this state
        self._mac = hmac.new(keys.tik, digestmod="sha256")
        # the C object underneath, when there is one: its copy() skips a Python layer
        self._hmac = getattr(self._mac, "_hmac", None) or self._mac
        k_aead = hmac.digest(keys.tik, bytes([CTX_AEAD_KEY]) + keys.tek, "sha256")[:16]
        self._gcm = AESGCM(k_aead)
        # Sender: next scatter-gather sequence number. Receiver: sg pages accepted.
        self.seq = 0
        self.mode: Batching | None = None  # the session's batching mode, once data moved

    def check_mode(self, cmd: str, mode: Batching) -> Batching:
        """Refuse ``mode`` if the session is bound to another packet format; return the
        format ``mode`` uses. page and contig share SEV's format (a page packet is a
        one-page contig packet), so they count as one."""
        fmt = packet_format(mode)
        if self.mode is not None and fmt is not self.mode:
            raise PspError(
                cmd, Status.INVALID_PARAM,
                f"this session moves {_FORMAT_NAME[self.mode]} packets; a {mode.value} packet is "
                "refused (the packet format is bound to the session)",
            )
        return fmt

    def bind_mode(self, fmt: Batching) -> None:
        """Lock the session to packet format ``fmt`` (after its first packet was made or
        verified: a forged packet refused must not pick the session's format)."""
        self.mode = fmt

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
        copy = self._hmac.copy
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
        want = _check_gpas(cmd, np.frombuffer(table, dtype=_ENTRY_DT)["gpa"], pfns)
        ct = scratch[t_end:]
        got = self._page_macs(seq0, want.tolist(), ct)
        for i, mac_i in enumerate(got):
            if not hmac.compare_digest(mac_i, table[SG_ENTRY * i + 8 : SG_ENTRY * (i + 1)]):
                raise PspError(cmd, Status.BAD_MEASUREMENT, f"page {i}: MAC does not verify")
        self._ctr_into(iv, ct, pt)
        return np.arange(seq0, seq0 + n, dtype=np.int64)

    # -- aead packets ----------------------------------------------------------------------

    def seal_aead(self, pfns: np.ndarray, pt: np.ndarray, rec: np.ndarray, out: np.ndarray) -> None:
        """AEAD packet of plaintext pages ``pt`` ((n, 4096)) for frames ``pfns`` into
        ``out``, sealed first in PSP scratch ``rec`` ((n, 4112)), so that nothing the
        hypervisor can write is read back while the tags are computed."""
        n = len(pfns)
        seq0 = self.seq
        gpas = pfns.astype("<u8") * np.uint64(PAGE_SIZE)
        enc = self._gcm.encrypt_into
        nonce, aad = _NONCE.pack, _PAGE_AAD.pack
        src = memoryview(pt.reshape(-1))  # type: ignore[arg-type]
        dst = memoryview(rec.reshape(-1))  # type: ignore[arg-type]
        # one GCM call per page is the format; the loop body is that call and nothing else
        for i, gpa in enumerate(gpas.tolist()):
            seq = seq0 + i
            enc(nonce(seq, 0), src[i * PAGE_SIZE : (i + 1) * PAGE_SIZE],
                aad(CTX_AEAD_PAGE, seq, gpa), dst[i * AEAD_RECORD : (i + 1) * AEAD_RECORD])
        t_end = AEAD_HDR + 8 * n
        memoryview(out)[:AEAD_HDR] = _AEAD_HDR.pack(n, 0, seq0)  # type: ignore[arg-type]
        out[AEAD_HDR:t_end] = gpas.view(np.uint8)
        out[t_end:] = rec.reshape(-1)
        self.seq = seq0 + n

    def open_aead(
        self, cmd: str, pkt: np.ndarray, pfns: np.ndarray, scratch: np.ndarray, pt: np.ndarray
    ) -> np.ndarray:
        """Verify an AEAD packet for frames ``pfns`` and decrypt it into ``pt`` ((n, 4096),
        PSP scratch). ``scratch`` is PSP memory of the packet's size. Returns the pages'
        sequence numbers; raises before the caller writes any guest page."""
        n = len(pfns)
        scratch[:] = pkt  # everything checked below is PSP-private from here on
        count, flags, seq0 = _AEAD_HDR.unpack(scratch[:AEAD_HDR].tobytes())
        if flags != 0:
            raise PspError(cmd, Status.UNSUPPORTED, f"packet FLAGS 0x{flags:x}")
        if count != n:
            raise PspError(cmd, Status.INVALID_LENGTH, f"packet has {count} pages, command {n}")
        t_end = AEAD_HDR + 8 * n
        want = _check_gpas(cmd, scratch[AEAD_HDR:t_end].view("<u8"), pfns)
        dec = self._gcm.decrypt_into
        nonce, aad = _NONCE.pack, _PAGE_AAD.pack
        src = memoryview(scratch[t_end:])  # type: ignore[arg-type]
        dst = memoryview(pt.reshape(-1))  # type: ignore[arg-type]
        try:
            for i, gpa in enumerate(want.tolist()):
                seq = seq0 + i
                dec(nonce(seq, 0), src[i * AEAD_RECORD : (i + 1) * AEAD_RECORD],
                    aad(CTX_AEAD_PAGE, seq, gpa), dst[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        except InvalidTag:
            raise PspError(
                cmd, Status.BAD_MEASUREMENT, f"page {i} (pfn {int(pfns[i])}): tag does not verify"
            ) from None
        return np.arange(seq0, seq0 + n, dtype=np.int64)

    # -- finish trailer --------------------------------------------------------------------

    def stream_digest(self, measure: np.ndarray) -> bytes:
        """HMAC(TIK, 0x18 ‖ per-page measurements): what the session moved, page by page,
        keyed so that it says nothing of the guest to anyone without the TIK."""
        return self._digest(bytes([CTX_STREAM]), np.ascontiguousarray(measure))

    def _trailer_mac(self, count: bytes, stream: bytes) -> bytes:
        mode = NO_MODE if self.mode is None else _MODE_BYTE[self.mode]
        return self._digest(bytes([CTX_TRAILER]), count, bytes([mode]), stream)

    def trailer(self, stream: bytes) -> bytes:
        """Sender: the count of sequenced (sg, aead) pages sent, the stream digest of the
        last version of every page sent, and the session's packet format, MAC'd."""
        c = struct.pack("<Q", self.seq)
        return c + stream + self._trailer_mac(c, stream)

    def check_trailer(self, cmd: str, trailer: bytes, stream: bytes) -> None:
        """Receiver: the trailer is genuine, the stream kept the sender's packet format,
        every sequenced page sent was received, and the last version of every page
        imported (``stream``, our own digest) is the last version sent — in any mode, so
        a replayed, misplaced or missing page is caught before the guest runs."""
        if len(trailer) != TRAILER_SIZE:
            raise PspError(cmd, Status.INVALID_LENGTH,
                           f"trailer is {len(trailer)} bytes, want {TRAILER_SIZE}")
        c, sent = trailer[:8], trailer[8:40]
        if not hmac.compare_digest(self._trailer_mac(c, sent), trailer[40:]):
            raise PspError(
                cmd, Status.BAD_MEASUREMENT,
                "finish trailer MAC does not verify (forged, or the stream's packet format "
                f"{_FORMAT_NAME[self.mode] if self.mode else 'none'} is not the sender's)",
            )
        n = struct.unpack("<Q", c)[0]
        if n != self.seq:
            raise PspError(
                cmd, Status.BAD_MEASUREMENT,
                f"sender sent {n} scatter-gather pages, {self.seq} were received (dropped)",
            )
        if not hmac.compare_digest(sent, stream):
            raise PspError(
                cmd, Status.BAD_MEASUREMENT,
                "the pages imported are not the last ones sent (a page replayed, misplaced "
                "or missing in transit)",
            )
