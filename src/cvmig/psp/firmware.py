"""The SEV firmware, in process: platform identity, guest contexts and the migration commands.

`Firmware` implements `SecureProcessor` directly (it is the in-process binding used by unit
tests) and is what the PSP process serves through its mailbox. Every refusal is a
`PspError` carrying a SEV status code; a refused command changes no guest memory.

Guest memory and transport buffers are shared-memory objects the firmware maps like system
memory (`map_region`). Guest pages are stored encrypted under the guest's VEK with the
address-tweaked `MemoryCipher`; the firmware reads them "with the C-bit set" (decrypts
with the VEK) into its own scratch memory, never into anything the hypervisor can see.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from cvmig.psp import certs as C
from cvmig.psp.api import (
    PAGE_SIZE,
    SESSION_SIZE,
    SPEC_MAX_LENGTH,
    Batching,
    GuestState,
    PlatformCerts,
    Policy,
    PspError,
    SendSession,
    Status,
)
from cvmig.psp.measure import measure_digest, page_measure
from cvmig.psp.memcrypt import VEK_SIZE, MemoryCipher, is_run
from cvmig.psp.packet import (
    AEAD_RECORD,
    Channel,
    format_code,
    format_from_code,
    packet_size,
)
from cvmig.psp.packet import packet_format as format_of
from cvmig.psp.session import (
    FORMAT_EXT_SIZE,
    check_format_ext,
    format_ext,
    shared_secret,
    unwrap,
    wrap,
)

DEFAULT_MAX_SG_PAGES = 512  # TDX's TDH.EXPORT.MEM limit; a GPA list page of 8-byte entries
_LAUNCH_CHUNK = 1024  # pages encrypted per pass when a guest's memory is initialised
_POPULATE_MAX = 64 << 20  # regions up to this size are populated when mapped


def shm_path(name: str) -> str:
    """A POSIX shared-memory name (``cvmig-x`` or ``/cvmig-x``) or a file path."""
    if name.startswith("/") and name.count("/") > 1:
        return name  # already a path, e.g. /dev/shm/cvmig-x
    return "/dev/shm/" + name.lstrip("/")


class Region:
    """A shared-memory object mapped into the firmware's address space."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        try:
            fd = os.open(shm_path(name), os.O_RDWR)
        except OSError as e:
            raise PspError("MAP_REGION", Status.INVALID_ADDRESS, f"{name}: {e.strerror}") from e
        try:
            have = os.fstat(fd).st_size
            if size <= 0 or have < size:
                raise PspError(
                    "MAP_REGION", Status.INVALID_LENGTH, f"{name} holds {have} bytes, asked {size}"
                )
            # Populate a transport buffer's page tables now, so that commands do not pay
            # first-touch faults; a guest's memory is populated by its owner, on its own
            # schedule (a large one while pages arrive), and faults in here as it is used.
            flags = mmap.MAP_SHARED
            if size <= _POPULATE_MAX:
                flags |= getattr(mmap, "MAP_POPULATE", 0)
            self._mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.arr = np.frombuffer(self._mm, dtype=np.uint8)

    def span(self, cmd: str, offset: int, length: int) -> np.ndarray:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise PspError(
                cmd, Status.INVALID_ADDRESS,
                f"[{offset}, {offset + length}) is outside region {self.name} ({self.size} B)",
            )
        return self.arr[offset : offset + length]

    def close(self) -> None:
        self.arr = np.empty(0, dtype=np.uint8)
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with it


@dataclass
class GuestContext:
    """The firmware's record of one guest (its VEK never leaves the PSP but to the memory
    controller, `memory_key`)."""

    handle: int
    region: int
    npages: int
    policy: int
    vek: bytes
    cipher: MemoryCipher
    pages: np.ndarray  # (npages, 4096) view of guest memory
    state: GuestState
    channel: Channel | None = None
    sent: np.ndarray | None = None  # sender: per-page measurement of the last version sent
    last_seq: np.ndarray | None = None  # receiver: newest sg sequence number per page
    measure: np.ndarray | None = None  # receiver: per-page measurement of what was imported


def _zero_fill(g: GuestContext) -> None:
    """Every page becomes zero plaintext under the guest's VEK (LAUNCH_UPDATE_DATA of zeros)."""
    zeros = np.zeros((min(g.npages, _LAUNCH_CHUNK), PAGE_SIZE), dtype=np.uint8)
    for lo in range(0, g.npages, _LAUNCH_CHUNK):
        hi = min(g.npages, lo + _LAUNCH_CHUNK)
        g.cipher.encrypt_pages(np.arange(lo, hi, dtype=np.int64), zeros[: hi - lo], g.pages[lo:hi])


def _api_version(policy: int) -> tuple[int, int]:
    return (policy >> 16) & 0xFF, (policy >> 24) & 0xFF


class Firmware:
    """One platform's SEV firmware. Single-threaded: callers serialize (the mailbox does)."""

    def __init__(
        self,
        identity: C.PlatformIdentity | None = None,
        *,
        trusted_arks: list[bytes] | None = None,
        max_contig_bytes: int = SPEC_MAX_LENGTH,
        max_sg_pages: int = DEFAULT_MAX_SG_PAGES,
    ) -> None:
        if identity is None:
            root, owner = C.default_pki()
            identity = C.PlatformIdentity.generate(root, owner)
        if max_contig_bytes < PAGE_SIZE or max_contig_bytes % PAGE_SIZE:
            raise ValueError("max_contig_bytes must be a positive multiple of 4096")
        if max_sg_pages < 1:
            raise ValueError("max_sg_pages must be positive")
        self.identity = identity
        self.trusted_arks = trusted_arks if trusted_arks is not None else [identity.certs.ark]
        self.max_contig_bytes = max_contig_bytes
        self.max_sg_pages = max_sg_pages
        self._regions: dict[int, Region] = {}
        self._guests: dict[int, GuestContext] = {}
        self._next_region = 1
        self._next_handle = 1
        self._scratch = np.empty(0, dtype=np.uint8)
        # (commands, guest bytes) of the last call, for the cost profile.
        self.last_work: tuple[int, int] = (1, 0)

    # -- helpers -------------------------------------------------------------------------

    def _scratch_bufs(self, nbytes: int, count: int) -> list[np.ndarray]:
        """``count`` PSP-private buffers of ``nbytes`` each (reused between commands)."""
        need = nbytes * count
        if self._scratch.size < need:
            self._scratch = np.empty(max(need, 2 * self._scratch.size), dtype=np.uint8)
        return [self._scratch[i * nbytes : (i + 1) * nbytes] for i in range(count)]

    def _region(self, cmd: str, region: int) -> Region:
        r = self._regions.get(region)
        if r is None:
            raise PspError(cmd, Status.INVALID_ADDRESS, f"no mapped region {region}")
        return r

    def _guest(self, cmd: str, handle: int) -> GuestContext:
        g = self._guests.get(handle)
        if g is None:
            raise PspError(cmd, Status.INVALID_GUEST, f"no guest with handle {handle}")
        return g

    @staticmethod
    def _need_state(cmd: str, g: GuestContext, *states: GuestState) -> None:
        if g.state not in states:
            want = " or ".join(s.name for s in states)
            raise PspError(
                cmd, Status.INVALID_GUEST_STATE,
                f"guest {g.handle} is {g.state.name}, the command needs {want}",
            )

    def _new_guest(self, cmd: str, region: int, npages: int, policy: int, state: GuestState,
                   *, zero: bool = True) -> GuestContext:
        r = self._region(cmd, region)
        if npages < 1 or npages * PAGE_SIZE > r.size:
            raise PspError(
                cmd, Status.INVALID_LENGTH, f"{npages} pages do not fit region {r.name} ({r.size} B)"
            )
        for other in self._guests.values():
            if other.region == region:
                raise PspError(
                    cmd, Status.INVALID_PARAM, f"region {region} already holds guest {other.handle}"
                )
        vek = os.urandom(VEK_SIZE)
        cipher = MemoryCipher(vek)
        pages = r.arr[: npages * PAGE_SIZE].reshape(npages, PAGE_SIZE)
        h = self._next_handle
        self._next_handle += 1
        g = GuestContext(h, region, npages, policy & 0xFFFFFFFF, vek, cipher, pages, state)
        # A launched guest's memory starts as zero plaintext under the new VEK
        # (LAUNCH_UPDATE_DATA of zeros). A received one is written page by page by
        # RECEIVE_UPDATE_DATA, as on hardware, so no work of the guest's size precedes the
        # first page; a private page never received measures as missing, and the
        # hypervisor writes shared pages itself.
        if zero:
            _zero_fill(g)
        self._guests[h] = g
        return g

    def _check_pfns(self, cmd: str, g: GuestContext, mode: Batching, pfns: np.ndarray) -> np.ndarray:
        if not (isinstance(pfns, np.ndarray) and pfns.dtype == np.int64 and pfns.ndim == 1):
            pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
        n = len(pfns)
        if n == 0:
            raise PspError(cmd, Status.INVALID_LENGTH, "no pages")
        if n == 1:  # the common page-mode case, without numpy reductions
            if not 0 <= int(pfns[0]) < g.npages:
                raise PspError(
                    cmd, Status.INVALID_ADDRESS, f"pfn {int(pfns[0])} is outside guest {g.handle}'s "
                    f"{g.npages} pages"
                )
            return pfns
        if int(pfns.min()) < 0 or int(pfns.max()) >= g.npages:
            raise PspError(
                cmd, Status.INVALID_ADDRESS, f"a pfn is outside guest {g.handle}'s {g.npages} pages"
            )
        if mode is Batching.PAGE:
            if n != 1:
                raise PspError(cmd, Status.INVALID_LENGTH, f"page mode takes 1 page, got {n}")
        elif mode is Batching.CONTIG:
            if n * PAGE_SIZE > self.max_contig_bytes:
                raise PspError(
                    cmd, Status.INVALID_LENGTH,
                    f"{n * PAGE_SIZE} bytes exceed the {self.max_contig_bytes}-byte contig cap",
                )
            if n > 1 and not bool(np.all(np.diff(pfns) == 1)):
                raise PspError(cmd, Status.INVALID_ADDRESS, "contig pages are not contiguous")
        elif n > self.max_sg_pages:
            raise PspError(
                cmd, Status.INVALID_LENGTH, f"{n} pages exceed the {self.max_sg_pages}-page sg cap"
            )
        return pfns

    # -- platform --------------------------------------------------------------------------

    def export_certs(self) -> PlatformCerts:
        return self.identity.certs

    def map_region(self, shm_name: str, size: int) -> int:
        r = Region(shm_name, size)
        rid = self._next_region
        self._next_region += 1
        self._regions[rid] = r
        return rid

    def unmap_region(self, region: int) -> None:
        r = self._region("UNMAP_REGION", region)
        for g in self._guests.values():
            if g.region == region:
                raise PspError(
                    "UNMAP_REGION", Status.INVALID_PARAM, f"region {region} holds guest {g.handle}"
                )
        del self._regions[region]
        r.close()

    def limits(self) -> dict[str, int]:
        """Batching limits of this firmware (an extension; the engine sizes commands by it)."""
        return {"max_contig_bytes": self.max_contig_bytes, "max_sg_pages": self.max_sg_pages}

    # -- guest lifecycle -------------------------------------------------------------------

    def launch(self, region: int, npages: int, policy: int) -> int:
        return self._new_guest("LAUNCH_START", region, npages, policy, GuestState.RUNNING).handle

    def decommission(self, handle: int) -> None:
        g = self._guest("DECOMMISSION", handle)
        g.channel = None
        del self._guests[handle]

    def guest_status(self, handle: int) -> tuple[GuestState, int]:
        g = self._guest("GUEST_STATUS", handle)
        return g.state, g.policy

    def memory_key(self, handle: int) -> bytes:
        """The memory controller's copy of a guest's VEK, for the guest's own vCPUs only
        (see `mailbox.fetch_memory_key`). A SENT guest never runs again; a guest still
        being received has not run yet."""
        g = self._guest("FETCH_MEMORY_KEY", handle)
        self._need_state("FETCH_MEMORY_KEY", g, GuestState.RUNNING, GuestState.SUPDATE)
        return g.vek

    # -- send ------------------------------------------------------------------------------

    def send_start(self, handle: int, target: PlatformCerts,
                   packet_format: Batching | None = None) -> SendSession:
        cmd = "SEND_START"
        g = self._guest(cmd, handle)
        self._need_state(cmd, g, GuestState.RUNNING)
        if g.policy & Policy.NOSEND:
            raise PspError(cmd, Status.POLICY_FAILURE, "guest policy has NOSEND")
        try:
            if g.policy & Policy.SEV:
                pek = C.validate_sev_chain(target, self.trusted_arks)
                if (pek.api_major, pek.api_minor) < _api_version(g.policy):
                    raise PspError(
                        cmd, Status.POLICY_FAILURE,
                        f"target API {pek.api_major}.{pek.api_minor} is below the policy's "
                        "{}.{}".format(*_api_version(g.policy)),
                    )
            if g.policy & Policy.DOMAIN:
                C.validate_domain(target, self.identity.certs.oca)
            pdh = C.parse_pdh(target.pdh, "target PDH")
        except C.CertError as e:
            raise PspError(cmd, e.status, e.detail) from None
        z = shared_secret(self.identity.pdh_key, pdh.public_key)
        blob, keys = wrap(z, g.policy)
        g.channel = Channel(keys)
        if packet_format is not None:  # negotiated now, bound from the first packet on
            fmt = format_of(Batching(packet_format))
            g.channel.bind_mode(fmt)
            if fmt is not Batching.PAGE:
                blob += format_ext(keys.tik, format_code(fmt))
        g.sent = np.zeros((g.npages, 2), dtype=np.uint64)
        g.state = GuestState.SUPDATE
        return SendSession(g.policy, self.identity.certs.pdh, blob)

    def _send_one(
        self, cmd: str, g: GuestContext, mode: Batching, pfns: np.ndarray, out: np.ndarray
    ) -> None:
        assert g.channel is not None and g.sent is not None
        n = len(pfns)
        nbytes = n * PAGE_SIZE
        if mode is Batching.SG or mode is Batching.AEAD:
            record = AEAD_RECORD if mode is Batching.AEAD else PAGE_SIZE
            pt, sealed = self._scratch_bufs(n * record, 2)
            pt = pt[:nbytes].reshape(n, PAGE_SIZE)
            np.take(g.pages, pfns, axis=0, out=pt)
            g.cipher.decrypt_pages(pfns, pt, pt)
            g.sent[pfns] = page_measure(pt, pfns)
            if mode is Batching.SG:
                g.channel.seal_sg(pfns, pt, sealed.reshape(n, record), out)
            else:
                g.channel.seal_aead(pfns, pt, sealed.reshape(n, record), out)
            return
        pt, ct = self._scratch_bufs(nbytes, 2)
        p0 = int(pfns[0])
        g.cipher.decrypt_pages(pfns, g.pages[p0 : p0 + n], pt.reshape(n, PAGE_SIZE))
        g.sent[p0 : p0 + n] = page_measure(pt.reshape(n, PAGE_SIZE), pfns)
        g.channel.seal(pt, ct, out)

    def send_update_data(
        self, handle: int, mode: Batching, pfns: np.ndarray, trans: int, offset: int
    ) -> int:
        cmd = "SEND_UPDATE_DATA"
        g = self._guest(cmd, handle)
        self._need_state(cmd, g, GuestState.SUPDATE)
        mode = Batching(mode)
        pfns = self._check_pfns(cmd, g, mode, pfns)
        size = packet_size(mode, len(pfns))
        out = self._region(cmd, trans).span(cmd, offset, size)
        assert g.channel is not None
        fmt = g.channel.check_mode(cmd, mode)
        self._send_one(cmd, g, mode, pfns, out)
        g.channel.bind_mode(fmt)
        self.last_work = (1, len(pfns) * PAGE_SIZE)
        return size

    @staticmethod
    def _check_bounds(cmd: str, pfns: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
        bounds = np.asarray(bounds, dtype=np.int64).reshape(-1)
        if (
            len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != len(pfns)
            or not bool(np.all(np.diff(bounds) > 0))
        ):
            raise PspError(cmd, Status.INVALID_PARAM, "queue bounds must rise from 0 to len(pfns)")
        return pfns, bounds

    def send_update_data_queue(
        self, handle: int, mode: Batching, pfns: np.ndarray, bounds: np.ndarray, trans: int,
        offset: int,
    ) -> int:
        cmd = "SEND_UPDATE_DATA"
        pfns, bounds = self._check_bounds(cmd, pfns, bounds)
        total = 0
        for i in range(len(bounds) - 1):
            try:
                total += self.send_update_data(
                    handle, mode, pfns[bounds[i] : bounds[i + 1]], trans, offset + total
                )
            except PspError as e:
                raise PspError(
                    e.command, e.status, f"queued command {i} of {len(bounds) - 1}: {e.detail}"
                ) from None
        self.last_work = (len(bounds) - 1, len(pfns) * PAGE_SIZE)
        return total

    def send_update_vmsa(self, handle: int, pfn: int, trans: int, offset: int) -> int:
        cmd = "SEND_UPDATE_VMSA"
        g = self._guest(cmd, handle)
        self._need_state(cmd, g, GuestState.SUPDATE)
        if not g.policy & Policy.ES:
            raise PspError(cmd, Status.POLICY_FAILURE, "guest policy lacks ES: no VMSA to send")
        pfns = self._check_pfns(cmd, g, Batching.PAGE, np.array([pfn]))
        size = packet_size(Batching.PAGE, 1)
        out = self._region(cmd, trans).span(cmd, offset, size)
        self._send_one(cmd, g, Batching.PAGE, pfns, out)
        self.last_work = (1, PAGE_SIZE)
        return size

    def send_trailer(self, handle: int) -> bytes:
        """Extension, SUPDATE, no state change: the count of sequenced pages sent, the
        stream digest of the last version of every page sent and the packet format, MAC'd
        under the TIK, for RECEIVE_FINISH. Taken after the last UPDATE command and before
        SEND_FINISH, which must wait until the destination has confirmed."""
        cmd = "SEND_TRAILER"
        g = self._guest(cmd, handle)
        self._need_state(cmd, g, GuestState.SUPDATE)
        assert g.channel is not None and g.sent is not None
        return g.channel.trailer(g.channel.stream_digest(g.sent))

    def send_finish(self, handle: int) -> None:
        cmd = "SEND_FINISH"
        g = self._guest(cmd, handle)
        self._need_state(cmd, g, GuestState.SUPDATE)
        g.sent = None
        g.channel = None  # channel keys erased
        g.state = GuestState.SENT

    def send_cancel(self, handle: int) -> None:
        cmd = "SEND_CANCEL"
        g = self._guest(cmd, handle)
        self._need_state(cmd, g, GuestState.SUPDATE)
        g.sent = None
        g.channel = None
        g.state = GuestState.RUNNING

    # -- receive ---------------------------------------------------------------------------

    def receive_start(self, region: int, npages: int, session: SendSession,
                      packet_format: Batching | None = None) -> int:
        cmd = "RECEIVE_START"
        self._region(cmd, region)
        if _api_version(session.policy) > (C.API_MAJOR, C.API_MINOR):
            raise PspError(
                cmd, Status.POLICY_FAILURE,
                "policy needs API {}.{}, this firmware is ".format(*_api_version(session.policy))
                + f"{C.API_MAJOR}.{C.API_MINOR}",
            )
        try:
            pdh = C.parse_pdh(session.sender_pdh, "sender PDH")
        except C.CertError as e:
            raise PspError(cmd, e.status, e.detail) from None
        z = shared_secret(self.identity.pdh_key, pdh.public_key)
        blob = session.session
        if len(blob) not in (SESSION_SIZE, SESSION_SIZE + FORMAT_EXT_SIZE):
            raise PspError(cmd, Status.INVALID_LENGTH, f"session blob is {len(blob)} bytes, "
                           f"want {SESSION_SIZE} (SEV) or {SESSION_SIZE + FORMAT_EXT_SIZE} "
                           "(with a negotiated packet format)")
        keys = unwrap(z, session.policy, blob[:SESSION_SIZE])  # before any guest is created
        fmt = Batching.PAGE  # a SEV blob negotiates SEV's packets
        if len(blob) == SESSION_SIZE + FORMAT_EXT_SIZE:
            code = check_format_ext(keys.tik, blob[SESSION_SIZE:])
            ext = format_from_code(code)
            if ext is None:
                raise PspError(cmd, Status.INVALID_PARAM, f"no packet format has code {code}")
            fmt = ext
        if packet_format is not None and format_of(Batching(packet_format)) is not fmt:
            raise PspError(
                cmd, Status.BAD_MEASUREMENT,
                f"the session negotiates {fmt.value} packets, not {packet_format.value} "
                "(the packet format was changed on the way)")
        g = self._new_guest(cmd, region, npages, session.policy, GuestState.RUPDATE, zero=False)
        g.channel = Channel(keys)
        if packet_format is not None or len(blob) > SESSION_SIZE:
            g.channel.bind_mode(fmt)
        g.last_seq = np.full(npages, -1, dtype=np.int64)
        g.measure = np.zeros((npages, 2), dtype=np.uint64)
        return g.handle

    def _receive_one(
        self, cmd: str, g: GuestContext, mode: Batching, pfns: np.ndarray, pkt: np.ndarray
    ) -> None:
        assert g.channel is not None and g.last_seq is not None and g.measure is not None
        n = len(pfns)
        if mode is Batching.SG or mode is Batching.AEAD:
            scratch, pt = self._scratch_bufs(pkt.size, 2)
            pt = pt[: n * PAGE_SIZE].reshape(n, PAGE_SIZE)
            if mode is Batching.SG:
                seqs = g.channel.open_sg(cmd, pkt, pfns, scratch, pt)
            else:
                seqs = g.channel.open_aead(cmd, pkt, pfns, scratch, pt)
            if not bool(np.all(seqs > g.last_seq[pfns])):
                bad = int(np.flatnonzero(seqs <= g.last_seq[pfns])[0])
                raise PspError(
                    cmd, Status.BAD_MEASUREMENT,
                    f"page {bad} (pfn {int(pfns[bad])}) has sequence {int(seqs[bad])}, not newer "
                    f"than {int(g.last_seq[pfns[bad]])} already written (replayed or reordered)",
                )
            g.measure[pfns] = page_measure(pt, pfns)
            if is_run(pfns):
                # a run (the bulk round's case): encrypt straight into guest memory
                p0 = int(pfns[0])
                g.cipher.encrypt_pages(pfns, pt, g.pages[p0 : p0 + n])
            else:
                g.cipher.encrypt_pages(pfns, pt, pt)
                g.pages[pfns] = pt
            g.last_seq[pfns] = seqs
            g.channel.seq += n
            return
        ct, pt = self._scratch_bufs(n * PAGE_SIZE, 2)
        g.channel.open(cmd, pkt, ct, pt)
        p0 = int(pfns[0])
        g.measure[p0 : p0 + n] = page_measure(pt.reshape(n, PAGE_SIZE), pfns)
        g.cipher.encrypt_pages(pfns, pt.reshape(n, PAGE_SIZE), g.pages[p0 : p0 + n])

    def receive_update_data(
        self, handle: int, mode: Batching, pfns: np.ndarray, trans: int, offset: int, length: int
    ) -> None:
        cmd = "RECEIVE_UPDATE_DATA"
        g = self._guest(cmd, handle)
        self._need_state(cmd, g, GuestState.RUPDATE)
        mode = Batching(mode)
        pfns = self._check_pfns(cmd, g, mode, pfns)
        size = packet_size(mode, len(pfns))
        if length != size:
            raise PspError(
                cmd, Status.INVALID_LENGTH,
                f"packet is {length} bytes, {len(pfns)} {mode.value} pages need {size}",
            )
        pkt = self._region(cmd, trans).span(cmd, offset, length)
        assert g.channel is not None
        fmt = g.channel.check_mode(cmd, mode)
        self._receive_one(cmd, g, mode, pfns, pkt)
        g.channel.bind_mode(fmt)
        self.last_work = (1, len(pfns) * PAGE_SIZE)

    def receive_update_data_queue(
        self, handle: int, mode: Batching, pfns: np.ndarray, bounds: np.ndarray, trans: int,
        offset: int, length: int,
    ) -> None:
        cmd = "RECEIVE_UPDATE_DATA"
        pfns, bounds = self._check_bounds(cmd, pfns, bounds)
        mode = Batching(mode)
        sizes = [packet_size(mode, int(b - a)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if sum(sizes) != length:
            raise PspError(
                cmd, Status.INVALID_LENGTH, f"queue is {length} bytes, its packets need {sum(sizes)}"
            )
        off = offset
        for i, size in enumerate(sizes):
            try:
                self.receive_update_data(
                    handle, mode, pfns[bounds[i] : bounds[i + 1]], trans, off, size
                )
            except PspError as e:
                raise PspError(
                    e.command, e.status, f"queued command {i} of {len(sizes)}: {e.detail}"
                ) from None
            off += size
        self.last_work = (len(sizes), len(pfns) * PAGE_SIZE)

    def receive_update_vmsa(self, handle: int, pfn: int, trans: int, offset: int, length: int) -> None:
        cmd = "RECEIVE_UPDATE_VMSA"
        g = self._guest(cmd, handle)
        self._need_state(cmd, g, GuestState.RUPDATE)
        if not g.policy & Policy.ES:
            raise PspError(cmd, Status.POLICY_FAILURE, "guest policy lacks ES: no VMSA to receive")
        pfns = self._check_pfns(cmd, g, Batching.PAGE, np.array([pfn]))
        size = packet_size(Batching.PAGE, 1)
        if length != size:
            raise PspError(cmd, Status.INVALID_LENGTH, f"VMSA packet is {length} bytes, want {size}")
        pkt = self._region(cmd, trans).span(cmd, offset, length)
        self._receive_one(cmd, g, Batching.PAGE, pfns, pkt)
        self.last_work = (1, PAGE_SIZE)

    def receive_finish(self, handle: int, trailer: bytes) -> bytes:
        """RUPDATE -> RUNNING. Returns the measurement of the imported private pages (an
        extension, as SNP's migration digest: `cvmig.psp.measure`)."""
        cmd = "RECEIVE_FINISH"
        g = self._guest(cmd, handle)
        self._need_state(cmd, g, GuestState.RUPDATE)
        assert g.channel is not None and g.measure is not None
        g.channel.check_trailer(cmd, trailer, g.channel.stream_digest(g.measure))
        g.channel = None  # channel keys erased
        g.last_seq = None
        digest = measure_digest(g.measure)
        g.measure = None
        g.state = GuestState.RUNNING
        return digest
