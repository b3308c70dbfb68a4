"""The in-process firmware: every command, the state machine, policies, tampering, the
integrity of the sequenced formats (sg, aead), and the binding of a session to one format."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cvmig.psp import certs as C
from cvmig.psp.api import (
    PAGE_SIZE,
    Batching,
    GuestState,
    PspError,
    SendSession,
    Status,
    packet_size,
)
from cvmig.psp.firmware import Firmware
from cvmig.psp.memcrypt import MemoryCipher
from cvmig.psp.packet import AEAD_HDR, AEAD_RECORD, AEAD_TAG, HDR, SG_ENTRY, SG_HDR
from cvmig.psp.session import TransportKeys, shared_secret, unwrap
from cvmig.psp.testing import ShmRegion

NPAGES = 32
TRANS = 4 << 20

NODBG, NOKS, ES, NOSEND, DOMAIN, SEV = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
SEQUENCED = [Batching.SG, Batching.AEAD]  # the packet formats with a per-page sequence number


@pytest.fixture(scope="module")
def pki() -> tuple[C.AmdRoot, C.Owner]:
    return C.AmdRoot.generate(), C.Owner.generate()


def make_fw(pki: tuple[C.AmdRoot, C.Owner], owner: C.Owner | None = None, **kw: int) -> Firmware:
    root, own = pki
    return Firmware(C.PlatformIdentity.generate(root, owner or own), trusted_arks=[root.ark_cert], **kw)


class World:
    """A source and a destination platform, a guest on the source, one transport buffer
    both map (standing in for the wire), and a destination memory region."""

    def __init__(self, src: Firmware, dst: Firmware, policy: int = 0, npages: int = NPAGES) -> None:
        self.src, self.dst, self.npages = src, dst, npages
        self.gmem = ShmRegion(npages * PAGE_SIZE)
        self.dmem = ShmRegion(npages * PAGE_SIZE)
        self.trans = ShmRegion(TRANS)
        self.g = src.map_region(self.gmem.name, self.gmem.size)
        self.d = dst.map_region(self.dmem.name, self.dmem.size)
        self.ts = src.map_region(self.trans.name, TRANS)
        self.td = dst.map_region("/dev/shm/" + self.trans.name, TRANS)
        self.h = src.launch(self.g, npages, policy)
        self.hd = 0
        self.session: SendSession | None = None

    def write(self, pfns: np.ndarray, pt: np.ndarray) -> None:
        """What the guest's vCPUs do: encrypt under the VEK into their memory."""
        ct = np.empty_like(pt)
        MemoryCipher(self.src.memory_key(self.h)).encrypt_pages(pfns, pt, ct)
        self.gmem.pages()[pfns] = ct

    def read(self, fw: Firmware, handle: int, mem: ShmRegion) -> np.ndarray:
        out = np.empty((self.npages, PAGE_SIZE), dtype=np.uint8)
        MemoryCipher(fw.memory_key(handle)).decrypt_pages(
            np.arange(self.npages), mem.pages(), out
        )
        return out

    def start(self, fmt: Batching | None = None) -> SendSession:
        s = self.src.send_start(self.h, self.dst.export_certs(), fmt)
        self.hd = self.dst.receive_start(self.d, self.npages, s, fmt)
        self.session = s
        return s

    def keys(self) -> TransportKeys:
        """The session's TEK and TIK, recovered as the destination firmware does."""
        s = self.session
        assert s is not None
        z = shared_secret(self.dst.identity.pdh_key, C.parse_pdh(s.sender_pdh).public_key)
        return unwrap(z, s.policy, s.session)

    def send(self, mode: Batching, pfns: list[int] | np.ndarray, off: int = 0) -> int:
        return self.src.send_update_data(self.h, mode, np.asarray(pfns), self.ts, off)

    def recv(self, mode: Batching, pfns: list[int] | np.ndarray, n: int, off: int = 0) -> None:
        self.dst.receive_update_data(self.hd, mode, np.asarray(pfns), self.td, off, n)

    def close(self) -> None:
        for fw in (self.src, self.dst):
            for h in list(fw._guests):
                fw.decommission(h)
        for fw, rs in ((self.src, (self.g, self.ts)), (self.dst, (self.d, self.td))):
            for r in rs:
                fw.unmap_region(r)
        for m in (self.gmem, self.dmem, self.trans):
            m.close()


@pytest.fixture(scope="module")
def fws(pki: tuple[C.AmdRoot, C.Owner]) -> tuple[Firmware, Firmware]:
    return make_fw(pki), make_fw(pki, max_contig_bytes=1 << 20)


@pytest.fixture
def world(fws: tuple[Firmware, Firmware]) -> Iterator[World]:
    w = World(*fws)
    yield w
    w.close()


def random_pages(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)


def status_of(excinfo: pytest.ExceptionInfo[PspError]) -> Status:
    return excinfo.value.status


# --- launch, regions, status -----------------------------------------------------------


def test_launch_memory_is_zero_under_a_fresh_vek(world: World) -> None:
    assert world.src.guest_status(world.h) == (GuestState.RUNNING, 0)
    assert not np.any(world.read(world.src, world.h, world.gmem))
    assert np.any(world.gmem.pages())  # but stored as ciphertext
    # Same zero plaintext at two addresses: different ciphertext (address tweak).
    assert not np.array_equal(world.gmem.pages()[0], world.gmem.pages()[1])
    other = ShmRegion(4 * PAGE_SIZE)
    try:
        r = world.src.map_region(other.name, other.size)
        h2 = world.src.launch(r, 4, NODBG)
        assert world.src.memory_key(h2) != world.src.memory_key(world.h)
        assert world.src.guest_status(h2) == (GuestState.RUNNING, NODBG)
        world.src.decommission(h2)
        with pytest.raises(PspError) as e:
            world.src.guest_status(h2)
        assert status_of(e) == Status.INVALID_GUEST
        world.src.unmap_region(r)
    finally:
        other.close()


def test_region_and_launch_errors(world: World) -> None:
    fw = world.src
    with pytest.raises(PspError) as e:
        fw.map_region("cvmig-psp-does-not-exist", 4096)
    assert status_of(e) == Status.INVALID_ADDRESS
    with pytest.raises(PspError) as e:
        fw.map_region(world.gmem.name, world.gmem.size + 1)
    assert status_of(e) == Status.INVALID_LENGTH
    with pytest.raises(PspError) as e:
        fw.launch(world.g, NPAGES, 0)  # the region already holds a guest
    assert status_of(e) == Status.INVALID_PARAM
    with pytest.raises(PspError) as e:
        fw.launch(world.ts, TRANS // PAGE_SIZE + 1, 0)
    assert status_of(e) == Status.INVALID_LENGTH
    with pytest.raises(PspError) as e:
        fw.launch(999, 1, 0)
    assert status_of(e) == Status.INVALID_ADDRESS
    with pytest.raises(PspError) as e:
        fw.unmap_region(world.g)  # still holds the guest
    assert status_of(e) == Status.INVALID_PARAM
    for bad in (fw.decommission, fw.send_cancel, fw.send_finish, fw.memory_key):
        with pytest.raises(PspError) as e:
            bad(4242)
        assert status_of(e) == Status.INVALID_GUEST


def test_limits_and_packet_sizes(fws: tuple[Firmware, Firmware]) -> None:
    assert fws[0].limits()["max_contig_bytes"] == 16384
    assert fws[1].limits()["max_contig_bytes"] == 1 << 20
    assert packet_size(Batching.PAGE, 1) == 52 + 4096
    assert packet_size(Batching.CONTIG, 4) == 52 + 4 * 4096
    assert packet_size(Batching.SG, 3) == 52 + 16 + 3 * (40 + 4096)
    # aead: 16-byte header, a u64 GPA per page, then (4096 B ciphertext, 16 B tag) per page
    assert packet_size(Batching.AEAD, 3) == 16 + 3 * 8 + 3 * (4096 + 16)
    assert packet_size("aead", 1) == 16 + 8 + 4112
    with pytest.raises(ValueError):
        packet_size(Batching.PAGE, 2)


# --- round trips -----------------------------------------------------------------------


# Each session moves one packet format (page and contig share SEV's); the same pages go
# in each, so the assertions below are the same for all three.
_SEV_PLAN = [
    (Batching.PAGE, [0]), (Batching.CONTIG, [1, 2, 3, 4]), (Batching.CONTIG, [5, 6, 7]),
    (Batching.PAGE, [9]), (Batching.PAGE, [31]),
]
_QUEUE_PFNS = {"sev": [10, 11, 12, 20, 21], "sg": [20, 12, 10, 21, 11], "aead": [21, 10, 12, 11, 20]}


def _scattered_plan(mode: Batching) -> list[tuple[Batching, list[int]]]:
    return [(mode, [9, 5, 31, 7]), (mode, [6]), (mode, [3, 0, 4, 1, 2])]


@pytest.mark.parametrize("fmt", ["sev", "sg", "aead"])
def test_round_trip_every_mode_and_vmsa(fws: tuple[Firmware, Firmware], fmt: str) -> None:
    plan_in = _SEV_PLAN if fmt == "sev" else _scattered_plan(Batching(fmt))
    qmode = Batching.CONTIG if fmt == "sev" else Batching(fmt)
    qpfns = np.array(_QUEUE_PFNS[fmt])
    w = World(*fws, policy=ES | NODBG)
    try:
        pt = random_pages(NPAGES, 1)
        w.write(np.arange(NPAGES), pt)
        w.start()
        assert w.src.guest_status(w.h)[0] == GuestState.SUPDATE
        assert w.dst.guest_status(w.hd) == (GuestState.RUPDATE, ES | NODBG)
        # RECEIVE_START writes no memory: no work of the guest's size before the first page
        assert not np.any(w.dmem.arr)
        off = 0
        plan: list[tuple[Batching, list[int], int, int]] = []
        for mode, pfns in plan_in:
            n = w.send(mode, pfns, off)
            assert n == packet_size(mode, len(pfns))
            plan.append((mode, pfns, off, n))
            off += n
        n = w.src.send_update_data_queue(w.h, qmode, qpfns, np.array([0, 3, 5]), w.ts, off)
        assert n == packet_size(qmode, 3) + packet_size(qmode, 2)
        qoff, qn = off, n
        off += n
        vn = w.src.send_update_vmsa(w.h, 30, w.ts, off)  # the VMSA goes in every session
        assert vn == packet_size(Batching.PAGE, 1)
        src_vek = w.src.memory_key(w.h)
        trailer = w.src.send_trailer(w.h)
        assert w.src.guest_status(w.h)[0] == GuestState.SUPDATE  # the trailer changes nothing
        w.src.send_finish(w.h)
        assert w.src.guest_status(w.h)[0] == GuestState.SENT
        for mode, pfns, o, n in plan:
            w.recv(mode, pfns, n, o)
        w.dst.receive_update_data_queue(w.hd, qmode, qpfns, np.array([0, 3, 5]), w.td, qoff, qn)
        w.dst.receive_update_vmsa(w.hd, 30, w.td, off, vn)
        w.dst.receive_finish(w.hd, trailer)
        assert w.dst.guest_status(w.hd)[0] == GuestState.RUNNING
        got = w.read(w.dst, w.hd, w.dmem)
        sent = [0, 1, 2, 3, 4, 5, 6, 7, 9, 31, 10, 11, 12, 20, 21, 30]
        assert sorted({p for _, pfns in plan_in for p in pfns} | set(qpfns.tolist()) | {30}) == sorted(sent)
        assert np.array_equal(got[sent], pt[sent])
        unsent = sorted(set(range(NPAGES)) - set(sent))
        assert not np.any(w.dmem.pages()[unsent])  # written by nothing but their packets
        # The destination has its own VEK: same plaintext, different ciphertext.
        assert w.dst.memory_key(w.hd) != src_vek
        assert not np.array_equal(w.dmem.pages()[0], w.gmem.pages()[0])
    finally:
        w.close()


_FAMILIES = {
    "sev": [Batching.PAGE, Batching.CONTIG], "sg": [Batching.SG], "aead": [Batching.AEAD],
}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_property_send_here_receive_there(fws: tuple[Firmware, Firmware], data: st.DataObject) -> None:
    npages = data.draw(st.integers(1, 24), label="npages")
    family = data.draw(st.sampled_from(sorted(_FAMILIES)), label="family")  # one per session
    w = World(*fws, npages=npages)
    try:
        seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
        pt = random_pages(npages, seed)
        w.write(np.arange(npages), pt)
        w.start()
        batches: list[tuple[Batching, list[int]]] = []
        for _ in range(data.draw(st.integers(1, 6), label="ncmds")):
            mode = data.draw(st.sampled_from(_FAMILIES[family]), label="mode")
            if mode is Batching.PAGE:
                pfns = [data.draw(st.integers(0, npages - 1))]
            elif mode is Batching.CONTIG:
                k = data.draw(st.integers(1, min(npages, 4)))  # the source has the 16 KiB cap
                p0 = data.draw(st.integers(0, npages - k))
                pfns = list(range(p0, p0 + k))
            else:
                pfns = data.draw(st.lists(st.integers(0, npages - 1), min_size=1, max_size=12))
            batches.append((mode, pfns))
        off, plan = 0, []
        for mode, pfns in batches:
            n = w.send(mode, pfns, off)
            plan.append((mode, pfns, off, n))
            off += n
        trailer = w.src.send_trailer(w.h)
        for mode, pfns, o, n in plan:
            w.recv(mode, pfns, n, o)
        w.dst.receive_finish(w.hd, trailer)
        w.src.send_finish(w.h)
        got = w.read(w.dst, w.hd, w.dmem)
        sent = sorted({p for _, pfns in batches for p in pfns})
        assert np.array_equal(got[sent], pt[sent])
    finally:
        w.close()


@pytest.mark.parametrize("mode", [Batching.AEAD, Batching.SG])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_property_sequenced_any_pages_any_delivery_order(
    fws: tuple[Firmware, Firmware], mode: Batching, data: st.DataObject
) -> None:
    """Random pages, packets over random subsets in random order (repeats too), the guest
    rewriting pages between packets, and the packets delivered in a random order. A model
    of the sequence numbers predicts exactly which packets the destination accepts; a
    refused one writes nothing; RECEIVE_FINISH passes iff every page sent was accepted,
    and then the destination holds exactly the newest copy of each page sent."""
    npages = data.draw(st.integers(1, 16), label="npages")
    w = World(*fws, npages=npages)
    try:
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        cur = rng.integers(0, 256, (npages, PAGE_SIZE), dtype=np.uint8)
        w.write(np.arange(npages), cur)
        w.start()
        sent: list[tuple[list[int], int, int, np.ndarray, int]] = []
        off = seq = 0
        for _ in range(data.draw(st.integers(1, 6), label="npackets")):
            dirty = data.draw(st.lists(st.integers(0, npages - 1), unique=True), label="dirty")
            if dirty:  # the guest writes some pages before this packet
                cur[dirty] = rng.integers(0, 256, (len(dirty), PAGE_SIZE), dtype=np.uint8)
                w.write(np.array(dirty), cur[dirty])
            pfns = data.draw(st.lists(st.integers(0, npages - 1), min_size=1, max_size=10), label="pfns")
            n = w.send(mode, pfns, off)
            assert n == packet_size(mode, len(pfns))
            sent.append((pfns, off, n, cur[pfns].copy(), seq))
            off, seq = off + n, seq + len(pfns)
        trailer = w.src.send_trailer(w.h)
        order = data.draw(st.permutations(range(len(sent))), label="delivery order")
        last = np.full(npages, -1, dtype=np.int64)
        want = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
        accepted = 0
        for i in order:
            pfns, o, n, pt_i, s0 = sent[i]
            seqs = s0 + np.arange(len(pfns))
            if bool(np.all(seqs > last[pfns])):
                w.recv(mode, pfns, n, o)
                last[pfns], want[pfns] = seqs, pt_i
                accepted += len(pfns)
            else:
                snap = w.dmem.arr.copy()
                with pytest.raises(PspError) as e:
                    w.recv(mode, pfns, n, o)
                assert status_of(e) == Status.BAD_MEASUREMENT and "replayed or reordered" in str(e.value)
                assert np.array_equal(w.dmem.arr, snap)
        event("all delivered" if accepted == seq else "some refused")
        if accepted == seq:
            w.dst.receive_finish(w.hd, trailer)
            got = w.read(w.dst, w.hd, w.dmem)
            came = last >= 0
            assert np.array_equal(got[came], want[came])  # every page received, exactly
            assert not np.any(w.dmem.pages()[~came])  # and no other page written
        else:
            with pytest.raises(PspError) as e:
                w.dst.receive_finish(w.hd, trailer)
            assert status_of(e) == Status.BAD_MEASUREMENT and "dropped" in str(e.value)
            assert w.dst.guest_status(w.hd)[0] == GuestState.RUPDATE
    finally:
        w.close()


# --- state machine ---------------------------------------------------------------------


def test_state_machine_errors(world: World) -> None:
    src, dst = world.src, world.dst
    with pytest.raises(PspError) as e:
        world.send(Batching.PAGE, [0])  # RUNNING: no session yet
    assert status_of(e) == Status.INVALID_GUEST_STATE
    for f in (src.send_finish, src.send_cancel, src.send_trailer):
        with pytest.raises(PspError) as e:
            f(world.h)
        assert status_of(e) == Status.INVALID_GUEST_STATE
    s = world.start()
    with pytest.raises(PspError) as e:
        src.send_start(world.h, dst.export_certs())  # already SUPDATE
    assert status_of(e) == Status.INVALID_GUEST_STATE
    with pytest.raises(PspError) as e:
        src.receive_update_data(world.h, Batching.PAGE, np.array([0]), world.ts, 0, 4148)
    assert status_of(e) == Status.INVALID_GUEST_STATE
    # The destination guest: receive-only, no key for vCPUs until it runs.
    with pytest.raises(PspError) as e:
        dst.send_update_data(world.hd, Batching.PAGE, np.array([0]), world.td, 0)
    assert status_of(e) == Status.INVALID_GUEST_STATE
    with pytest.raises(PspError) as e:
        dst.memory_key(world.hd)
    assert status_of(e) == Status.INVALID_GUEST_STATE
    with pytest.raises(PspError) as e:
        dst.send_start(world.hd, src.export_certs())
    assert status_of(e) == Status.INVALID_GUEST_STATE
    # The guest keeps running during SUPDATE: its vCPUs still get the key.
    assert len(src.memory_key(world.h)) == 32
    trailer = src.send_trailer(world.h)
    src.send_finish(world.h)
    # SENT never runs again and cannot be sent again.
    for f in (src.memory_key, src.send_finish, src.send_cancel, src.send_trailer):
        with pytest.raises(PspError) as e:
            f(world.h)
        assert status_of(e) == Status.INVALID_GUEST_STATE
    with pytest.raises(PspError) as e:
        src.send_start(world.h, dst.export_certs())
    assert status_of(e) == Status.INVALID_GUEST_STATE
    dst.receive_finish(world.hd, trailer)
    with pytest.raises(PspError) as e:
        dst.receive_finish(world.hd, trailer)
    assert status_of(e) == Status.INVALID_GUEST_STATE
    with pytest.raises(PspError) as e:
        dst.receive_update_data(world.hd, Batching.PAGE, np.array([0]), world.td, 0, 4148)
    assert status_of(e) == Status.INVALID_GUEST_STATE
    assert len(dst.memory_key(world.hd)) == 32
    assert s.policy == 0


def test_send_cancel_returns_to_running_and_retries(world: World) -> None:
    pt = random_pages(2, 5)
    world.write(np.array([3, 4]), pt)
    world.start()
    world.send(Batching.CONTIG, [3, 4])
    world.src.send_cancel(world.h)
    assert world.src.guest_status(world.h)[0] == GuestState.RUNNING
    with pytest.raises(PspError) as e:
        world.send(Batching.PAGE, [3])  # channel keys erased
    assert status_of(e) == Status.INVALID_GUEST_STATE
    # Retry to the same (or a new) target with a new session.
    world.dst.decommission(world.hd)
    world.start()
    n = world.send(Batching.CONTIG, [3, 4])
    world.recv(Batching.CONTIG, [3, 4], n)
    world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))
    world.src.send_finish(world.h)
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem)[[3, 4]], pt)


# --- policy ------------------------------------------------------------------------------


def test_nosend_refused(fws: tuple[Firmware, Firmware]) -> None:
    w = World(*fws, policy=NOSEND)
    try:
        with pytest.raises(PspError) as e:
            w.src.send_start(w.h, w.dst.export_certs())
        assert status_of(e) == Status.POLICY_FAILURE and "NOSEND" in str(e.value)
        assert w.src.guest_status(w.h)[0] == GuestState.RUNNING
    finally:
        w.close()


def test_domain_policy(pki: tuple[C.AmdRoot, C.Owner], fws: tuple[Firmware, Firmware]) -> None:
    stranger = make_fw(pki, owner=C.Owner.generate())
    w = World(fws[0], fws[1], policy=DOMAIN)
    try:
        with pytest.raises(PspError) as e:
            w.src.send_start(w.h, stranger.export_certs())
        assert status_of(e) == Status.POLICY_FAILURE and "OCA" in str(e.value)
        assert w.src.guest_status(w.h)[0] == GuestState.RUNNING
        w.start()  # same owner: accepted
    finally:
        w.close()


def test_sev_policy_chain(pki: tuple[C.AmdRoot, C.Owner], fws: tuple[Firmware, Firmware]) -> None:
    foreign = make_fw((C.AmdRoot.generate(), pki[1]))  # a platform under another root
    w = World(fws[0], fws[1], policy=SEV)
    try:
        with pytest.raises(PspError) as e:
            w.src.send_start(w.h, foreign.export_certs())
        assert status_of(e) == Status.BAD_SIGNATURE
        forged = dataclasses.replace(
            w.dst.export_certs(), pdh=foreign.export_certs().pdh  # a PDH the PEK never signed
        )
        with pytest.raises(PspError) as e:
            w.src.send_start(w.h, forged)
        assert status_of(e) == Status.BAD_SIGNATURE
        wrong_usage = dataclasses.replace(w.dst.export_certs(), pdh=w.dst.export_certs().pek)
        with pytest.raises(PspError) as e:
            w.src.send_start(w.h, wrong_usage)
        assert status_of(e) == Status.INVALID_CERTIFICATE
        assert w.src.guest_status(w.h)[0] == GuestState.RUNNING
        w.start()
    finally:
        w.close()


def test_no_policy_bits_means_unauthenticated_target(
    pki: tuple[C.AmdRoot, C.Owner], fws: tuple[Firmware, Firmware]
) -> None:
    # Faithful to the firmware: without SEV or DOMAIN the target PDH is not checked,
    # so a chain from an untrusted root is accepted (QEMU's default policy 0x1).
    foreign = make_fw((C.AmdRoot.generate(), C.Owner.generate()))
    w = World(*fws, policy=NODBG)
    try:
        s = w.src.send_start(w.h, foreign.export_certs())
        assert len(s.session) == 128
    finally:
        w.close()


def test_api_version_policy(fws: tuple[Firmware, Firmware]) -> None:
    too_new = SEV | (1 << 16)  # needs API 1.0; the platforms are 0.24
    w = World(*fws, policy=too_new)
    try:
        with pytest.raises(PspError) as e:
            w.src.send_start(w.h, w.dst.export_certs())
        assert status_of(e) == Status.POLICY_FAILURE and "API" in str(e.value)
    finally:
        w.close()
    w = World(*fws, policy=NODBG)
    try:
        s = w.src.send_start(w.h, w.dst.export_certs())
        # A session whose policy asks for a newer API than the receiver has: the policy
        # MAC would fail anyway, but the version check comes first and says why.
        with pytest.raises(PspError) as e:
            w.dst.receive_start(w.d, NPAGES, dataclasses.replace(s, policy=1 << 16))
        assert status_of(e) == Status.POLICY_FAILURE
    finally:
        w.close()


def test_vmsa_needs_es(world: World) -> None:
    world.start()
    with pytest.raises(PspError) as e:
        world.src.send_update_vmsa(world.h, 0, world.ts, 0)
    assert status_of(e) == Status.POLICY_FAILURE
    with pytest.raises(PspError) as e:
        world.dst.receive_update_vmsa(world.hd, 0, world.td, 0, 4148)
    assert status_of(e) == Status.POLICY_FAILURE


# --- lengths and addresses -------------------------------------------------------------


def test_length_and_address_checks(world: World) -> None:
    world.start()
    cases = [
        (Batching.PAGE, [0, 1], 0, Status.INVALID_LENGTH),
        (Batching.CONTIG, [0, 1, 2, 3, 4], 0, Status.INVALID_LENGTH),  # over the 16 KiB cap
        (Batching.CONTIG, [0, 2], 0, Status.INVALID_ADDRESS),  # not contiguous
        (Batching.PAGE, [NPAGES], 0, Status.INVALID_ADDRESS),
        (Batching.SG, [-1], 0, Status.INVALID_ADDRESS),
        (Batching.SG, [], 0, Status.INVALID_LENGTH),
        (Batching.PAGE, [0], TRANS - 100, Status.INVALID_ADDRESS),  # packet past the buffer
    ]
    for mode, pfns, off, status in cases:
        with pytest.raises(PspError) as e:
            world.send(mode, pfns, off)
        assert status_of(e) == status, (mode, pfns)
    with pytest.raises(PspError) as e:
        world.src.send_update_data(world.h, Batching.SG, np.arange(513) % NPAGES, world.ts, 0)
    assert status_of(e) == Status.INVALID_LENGTH
    with pytest.raises(PspError) as e:
        world.src.send_update_data_queue(
            world.h, Batching.PAGE, np.array([0, 1]), np.array([0, 2]), world.ts, 0
        )
    assert status_of(e) == Status.INVALID_LENGTH and "queued command 0" in str(e.value)
    with pytest.raises(PspError) as e:
        world.src.send_update_data_queue(
            world.h, Batching.PAGE, np.array([0, 1]), np.array([0, 1]), world.ts, 0
        )
    assert status_of(e) == Status.INVALID_PARAM
    # The destination has a 1 MiB contig cap (an extension).
    n = world.send(Batching.PAGE, [0])
    with pytest.raises(PspError) as e:
        world.recv(Batching.PAGE, [0], n - 16)  # TRANS_LENGTH must match
    assert status_of(e) == Status.INVALID_LENGTH


def test_larger_contig_cap_is_an_extension(fws: tuple[Firmware, Firmware]) -> None:
    # Source with cap 1 MiB -> destination with 16 KiB: the destination refuses.
    w = World(fws[1], fws[0])
    try:
        pt = random_pages(8, 3)
        w.write(np.arange(8), pt)
        w.start()
        n = w.send(Batching.CONTIG, list(range(8)))
        with pytest.raises(PspError) as e:
            w.recv(Batching.CONTIG, list(range(8)), n)
        assert status_of(e) == Status.INVALID_LENGTH
    finally:
        w.close()


# --- tampering -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,where",
    [(m, w) for m in (Batching.PAGE, Batching.CONTIG, Batching.SG) for w in ("flags", "iv", "mac", "data")]
    + [(Batching.SG, "sg-table"), (Batching.SG, "sg-header")],
)
def test_tampered_packet_refused_and_nothing_written(world: World, mode: Batching, where: str) -> None:
    pfns = [0] if mode is Batching.PAGE else [4, 5, 6]
    world.write(np.array(pfns), random_pages(len(pfns), 9))
    world.start()
    n = world.send(mode, pfns)
    pos = {
        "flags": 0, "iv": 4 + 7, "mac": 20 + 3, "data": n - 100,
        "sg-header": HDR + 8, "sg-table": HDR + SG_HDR + SG_ENTRY + 2,
    }[where]
    world.trans.arr[pos] ^= 0x40
    before = world.dmem.arr.copy()
    with pytest.raises(PspError) as e:
        world.recv(mode, pfns, n)
    assert status_of(e) == (Status.UNSUPPORTED if where == "flags" else Status.BAD_MEASUREMENT)
    assert np.array_equal(world.dmem.arr, before)  # nothing written to guest memory
    # The untampered packet is still accepted afterwards.
    world.trans.arr[pos] ^= 0x40
    world.recv(mode, pfns, n)
    assert not np.array_equal(world.dmem.arr, before)

# Where to flip a bit in a three-page aead packet for pfns [4, 5, 6], and what it must give.
_T0 = AEAD_HDR + 3 * 8  # the first record
_AEAD_TAMPER = {
    "count": (0, Status.INVALID_LENGTH),  # header count u32: no longer the command's
    "flags": (4, Status.UNSUPPORTED),  # header FLAGS u32
    "seq": (8, Status.BAD_MEASUREMENT),  # header seq, low byte: the nonce changes
    "seq-high": (15, Status.BAD_MEASUREMENT),  # header seq, high byte: newer, still refused
    "gpa": (AEAD_HDR + 8 + 1, Status.INVALID_ADDRESS),  # page 1's GPA 0x5000 -> 0x1000
    "ciphertext-first": (_T0 + 7, Status.BAD_MEASUREMENT),
    "ciphertext-last": (_T0 + 2 * AEAD_RECORD + 4000, Status.BAD_MEASUREMENT),
    "tag-first": (_T0 + PAGE_SIZE, Status.BAD_MEASUREMENT),
    "tag-last": (_T0 + 3 * AEAD_RECORD - 1, Status.BAD_MEASUREMENT),
}


@pytest.mark.parametrize("where", sorted(_AEAD_TAMPER))
def test_tampered_aead_packet_refused_and_nothing_written(world: World, where: str) -> None:
    pfns = [4, 5, 6]
    pt = random_pages(3, 9)
    world.write(np.array(pfns), pt)
    world.start()
    n = world.send(Batching.AEAD, pfns)
    assert n == _T0 + 3 * AEAD_RECORD
    pos, status = _AEAD_TAMPER[where]
    world.trans.arr[pos] ^= 0x40
    before = world.dmem.arr.copy()
    with pytest.raises(PspError) as e:
        world.recv(Batching.AEAD, pfns, n)
    assert status_of(e) == status, e.value
    # nothing written: not even the pages before the one whose tag failed
    assert np.array_equal(world.dmem.arr, before)
    # The untampered packet is still accepted, and the refused one counted for nothing.
    world.trans.arr[pos] ^= 0x40
    world.recv(Batching.AEAD, pfns, n)
    world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem)[pfns], pt)


def test_aead_packet_is_the_documented_format(world: World) -> None:
    """The firmware's aead packet, checked byte for byte against AES-GCM computed here
    from the session's TEK and TIK and the documented layout and derivation."""
    import hmac
    import struct

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    pfns = [7, 2, 30]
    pt = random_pages(3, 13)
    world.write(np.array(pfns), pt)
    world.start()
    a = world.send(Batching.AEAD, [1])  # seq 0: page 1
    n = world.send(Batching.AEAD, pfns, a)  # seq 1, 2, 3
    keys = world.keys()
    gcm = AESGCM(hmac.digest(keys.tik, b"\x17" + keys.tek, "sha256")[:16])
    pkt = world.trans.arr[a : a + n].tobytes()
    assert pkt[:16] == struct.pack("<IIQ", 3, 0, 1)
    assert pkt[16:40] == b"".join(struct.pack("<Q", p * PAGE_SIZE) for p in pfns)
    for i, p in enumerate(pfns):
        seq = 1 + i
        rec = pkt[40 + i * AEAD_RECORD : 40 + (i + 1) * AEAD_RECORD]
        nonce = struct.pack("<QI", seq, 0)
        aad = b"\x16" + struct.pack("<QQ", seq, p * PAGE_SIZE)
        assert rec == gcm.encrypt(nonce, pt[i].tobytes(), aad)
        assert len(rec) - PAGE_SIZE == AEAD_TAG
    # the plaintext is nowhere in the packet
    assert all(pt[i, :64].tobytes() not in pkt for i in range(3))


def test_tampered_session_refused_no_guest_created(world: World) -> None:
    s = world.src.send_start(world.h, world.dst.export_certs())
    before = world.dmem.arr.copy()
    for pos in (0, 0x10, 0x30, 0x40, 0x60):  # nonce, WRAP_TK, WRAP_IV, WRAP_MAC, POLICY_MAC
        blob = bytearray(s.session)
        blob[pos + 1] ^= 0x80
        with pytest.raises(PspError) as e:
            world.dst.receive_start(world.d, NPAGES, dataclasses.replace(s, session=bytes(blob)))
        assert status_of(e) == Status.BAD_MEASUREMENT
    with pytest.raises(PspError) as e:  # the hypervisor drops NOSEND from the policy
        world.dst.receive_start(world.d, NPAGES, dataclasses.replace(s, policy=s.policy | NOSEND))
    assert status_of(e) == Status.BAD_MEASUREMENT
    with pytest.raises(PspError) as e:  # the session under another platform's PDH
        world.dst.receive_start(
            world.d, NPAGES, dataclasses.replace(s, sender_pdh=world.dst.export_certs().pdh)
        )
    assert status_of(e) == Status.BAD_MEASUREMENT
    with pytest.raises(PspError) as e:
        world.dst.receive_start(world.d, NPAGES, dataclasses.replace(s, session=s.session + b"x"))
    assert status_of(e) == Status.INVALID_LENGTH
    assert np.array_equal(world.dmem.arr, before) and not world.dst._guests
    world.dst.receive_start(world.d, NPAGES, s)  # the genuine session still works


# --- sequenced formats (the sg and aead extensions): integrity ---------------------------


def gpa_pos(mode: Batching, i: int) -> int:
    """Offset of page ``i``'s GPA (u64 LE) in a packet of ``mode`` at offset 0."""
    return HDR + SG_HDR + SG_ENTRY * i if mode is Batching.SG else AEAD_HDR + 8 * i


@pytest.mark.parametrize("mode", SEQUENCED)
def test_sg_replay_refused(world: World, mode: Batching) -> None:
    world.start()
    n = world.send(mode, [1, 2])
    world.recv(mode, [1, 2], n)
    snap = world.dmem.arr.copy()
    with pytest.raises(PspError) as e:
        world.recv(mode, [1, 2], n)  # the same packet again
    assert status_of(e) == Status.BAD_MEASUREMENT and "replayed" in str(e.value)
    assert np.array_equal(world.dmem.arr, snap)


@pytest.mark.parametrize("mode", SEQUENCED)
def test_sg_stale_reorder_refused(world: World, mode: Batching) -> None:
    world.write(np.array([3, 4]), random_pages(2, 1))
    world.start()
    old = world.send(mode, [4, 3], 0)  # seq 0, 1
    world.write(np.array([3]), random_pages(1, 2))  # the guest dirties page 3
    new_off = old
    new = world.send(mode, [3], new_off)  # seq 2
    world.recv(mode, [3], new, new_off)  # newer copy arrives first...
    snap = world.dmem.arr.copy()
    with pytest.raises(PspError) as e:
        world.recv(mode, [4, 3], old, 0)  # ...then the stale one
    assert status_of(e) == Status.BAD_MEASUREMENT and "pfn 3" in str(e.value)
    # refused whole: page 4 in it was fresh, and is not written either
    assert np.array_equal(world.dmem.arr, snap)


@pytest.mark.parametrize("mode", SEQUENCED)
def test_sg_reorder_of_distinct_pages_is_fine(world: World, mode: Batching) -> None:
    pt = random_pages(2, 4)
    world.write(np.array([1, 2]), pt)
    world.start()
    a = world.send(mode, [1], 0)
    b = world.send(mode, [2], a)
    world.recv(mode, [2], b, a)
    world.recv(mode, [1], a, 0)
    world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))
    world.src.send_finish(world.h)
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem)[[1, 2]], pt)


@pytest.mark.parametrize("mode", SEQUENCED)
def test_sg_redirect_refused(world: World, mode: Batching) -> None:
    world.start()
    n = world.send(mode, [1, 2])
    snap = world.dmem.arr.copy()
    with pytest.raises(PspError) as e:
        world.recv(mode, [1, 9], n)  # hypervisor points page 2 at pfn 9
    assert status_of(e) == Status.INVALID_ADDRESS and "redirected" in str(e.value)
    with pytest.raises(PspError) as e:
        world.recv(mode, [2, 1], n)  # or swaps them
    assert status_of(e) == Status.INVALID_ADDRESS
    # Rewriting the GPA inside the packet too: the sg header MAC, or the page's GCM tag
    # (the GPA is in its AAD), no longer verifies.
    p = gpa_pos(mode, 1)
    assert world.trans.arr[p : p + 8].tobytes() == (2 * PAGE_SIZE).to_bytes(8, "little")
    world.trans.arr[p : p + 8] = np.frombuffer((9 * PAGE_SIZE).to_bytes(8, "little"), dtype=np.uint8)
    with pytest.raises(PspError) as e:
        world.recv(mode, [1, 9], n)
    assert status_of(e) == Status.BAD_MEASUREMENT
    # And swapping both GPAs in the packet, to match a swapped command, as well.
    world.trans.arr[p : p + 8] = np.frombuffer((1 * PAGE_SIZE).to_bytes(8, "little"), dtype=np.uint8)
    world.trans.arr[gpa_pos(mode, 0) : gpa_pos(mode, 0) + 8] = np.frombuffer(
        (2 * PAGE_SIZE).to_bytes(8, "little"), dtype=np.uint8
    )
    with pytest.raises(PspError) as e:
        world.recv(mode, [2, 1], n)
    assert status_of(e) == Status.BAD_MEASUREMENT
    assert np.array_equal(world.dmem.arr, snap)


@pytest.mark.parametrize("mode", SEQUENCED)
def test_sg_drop_detected_at_finish(world: World, mode: Batching) -> None:
    pt = random_pages(3, 6)
    world.write(np.array([1, 2, 3]), pt)
    world.start()
    a = world.send(mode, [1, 2], 0)
    b = world.send(mode, [3], a)
    trailer = world.src.send_trailer(world.h)
    world.recv(mode, [1, 2], a, 0)  # packet b never delivered
    with pytest.raises(PspError) as e:
        world.dst.receive_finish(world.hd, trailer)
    assert status_of(e) == Status.BAD_MEASUREMENT and "dropped" in str(e.value)
    assert world.dst.guest_status(world.hd)[0] == GuestState.RUPDATE  # cannot run
    with pytest.raises(PspError) as e:
        world.dst.memory_key(world.hd)
    assert status_of(e) == Status.INVALID_GUEST_STATE
    forged = bytearray(trailer)
    forged[0] = 2  # claim only 2 pages were sent
    with pytest.raises(PspError) as e:
        world.dst.receive_finish(world.hd, bytes(forged))
    assert status_of(e) == Status.BAD_MEASUREMENT and "MAC" in str(e.value)
    for bad in (trailer[:-1], trailer + b"\0"):
        with pytest.raises(PspError) as e:
            world.dst.receive_finish(world.hd, bad)
        assert status_of(e) == Status.INVALID_LENGTH
    flipped = bytearray(trailer)
    flipped[20] ^= 1  # the MAC itself
    with pytest.raises(PspError) as e:
        world.dst.receive_finish(world.hd, bytes(flipped))
    assert status_of(e) == Status.BAD_MEASUREMENT
    assert world.dst.guest_status(world.hd)[0] == GuestState.RUPDATE
    world.recv(mode, [3], b, a)
    world.dst.receive_finish(world.hd, trailer)
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem)[[1, 2, 3]], pt)


@pytest.mark.parametrize("mode", SEQUENCED)
def test_trailer_of_another_session_refused(fws: tuple[Firmware, Firmware], mode: Batching) -> None:
    # Same pages, same count, same format, another session: its TIK differs.
    ws = [World(*fws), World(*fws)]
    try:
        trailers = []
        for w in ws:
            w.start()
            n = w.send(mode, [1, 2])
            w.recv(mode, [1, 2], n)
            trailers.append(w.src.send_trailer(w.h))
        assert trailers[0][:8] == trailers[1][:8] and trailers[0] != trailers[1]
        with pytest.raises(PspError) as e:
            ws[0].dst.receive_finish(ws[0].hd, trailers[1])
        assert status_of(e) == Status.BAD_MEASUREMENT
        ws[0].dst.receive_finish(ws[0].hd, trailers[0])
    finally:
        for w in ws:
            w.close()


def test_page_mode_has_seves_gap_and_finish_closes_it(world: World) -> None:
    # Faithful SEV: a page-mode packet is bound to nothing, so RECEIVE_UPDATE_DATA accepts
    # a redirect or a replay. The stream digest in the finish trailer catches it before
    # the guest can run: the destination did not import the last version of every page
    # sent, exactly where it was sent.
    pt = random_pages(2, 8)
    world.write(np.array([1, 2]), pt)
    world.start()
    old = world.send(Batching.PAGE, [1])
    world.recv(Batching.PAGE, [1], old)
    world.write(np.array([1]), pt[1:2])  # the guest rewrites page 1...
    new = world.send(Batching.PAGE, [1], old)  # ...and the new version is sent
    world.recv(Batching.PAGE, [1], new, old)
    world.recv(Batching.PAGE, [7], old)  # an attacker redirects the old packet to pfn 7
    world.recv(Batching.PAGE, [1], old)  # and replays it over the new page 1
    with pytest.raises(PspError) as e:
        world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))
    assert status_of(e) == Status.BAD_MEASUREMENT and "replayed, misplaced" in str(e.value)
    assert world.dst.guest_status(world.hd)[0] == GuestState.RUPDATE  # it can never run


def test_page_mode_stream_that_arrived_whole_finishes(world: World) -> None:
    """Every page's last version, where it was sent, in any order: RECEIVE_FINISH passes."""
    pt = random_pages(3, 9)
    world.write(np.array([1, 2, 3]), pt)
    world.start()
    offs, off = [], 0
    for p in (1, 2, 3):
        n = world.send(Batching.PAGE, [p], off)
        offs.append((p, off, n))
        off += n
    for p, o, n in reversed(offs):
        world.recv(Batching.PAGE, [p], n, o)
    world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem)[1:4], pt)


# --- a session is bound to one packet format -------------------------------------------
#
# Without the binding, an sg/aead session could be downgraded: a page-format packet (the
# VMSA packet is one, and it verifies under the session's keys) fed to RECEIVE_UPDATE_DATA
# is accepted as a private page, bound to no address and no sequence number.


def _other_formats(mode: Batching) -> list[tuple[Batching, list[int]]]:
    """Commands in every packet format but ``mode``'s."""
    out = [(Batching.PAGE, [1]), (Batching.CONTIG, [1, 2]), (Batching.SG, [1]), (Batching.AEAD, [1])]
    if mode is Batching.CONTIG:
        mode = Batching.PAGE
    return [
        (m, p) for m, p in out
        if m is not mode and not (mode is Batching.PAGE and m is Batching.CONTIG)
    ]


@pytest.mark.parametrize("mode", SEQUENCED)
def test_source_refuses_another_format_after_the_first(world: World, mode: Batching) -> None:
    pt = random_pages(4, 21)
    world.write(np.arange(4), pt)
    world.start()
    a = world.send(mode, [2, 0])
    snap = world.trans.arr.copy()
    for other, pfns in _other_formats(mode):
        with pytest.raises(PspError) as e:
            world.send(other, pfns, a)
        assert status_of(e) == Status.INVALID_PARAM and "bound" in str(e.value), other
        with pytest.raises(PspError) as e:  # nor through the queue
            world.src.send_update_data_queue(
                world.h, other, np.array(pfns), np.array([0, len(pfns)]), world.ts, a
            )
        assert status_of(e) == Status.INVALID_PARAM, other
    assert np.array_equal(world.trans.arr, snap)  # nothing was written to the wire
    # The session goes on in its own format; the refusals consumed no sequence numbers.
    b = world.send(mode, [1, 3], a)
    world.recv(mode, [2, 0], a, 0)
    world.recv(mode, [1, 3], b, a)
    trailer = world.src.send_trailer(world.h)
    assert int.from_bytes(trailer[:8], "little") == 4
    world.dst.receive_finish(world.hd, trailer)
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem)[:4], pt)


@pytest.mark.parametrize("first", [Batching.PAGE, Batching.CONTIG])
def test_sev_session_mixes_page_and_contig_only(world: World, first: Batching) -> None:
    pt = random_pages(8, 22)
    world.write(np.arange(8), pt)
    world.start()
    plan = [(first, [0]), (Batching.PAGE, [1])]  # a one-page contig packet is a page packet
    plan += [(Batching.CONTIG, [2, 3, 4]), (Batching.PAGE, [5]), (Batching.CONTIG, [6, 7])]
    off, sent = 0, []
    for mode, pfns in plan:
        n = world.send(mode, pfns, off)
        sent.append((mode, pfns, off, n))
        off += n
        for other in SEQUENCED:  # no upgrade (nor downgrade) in the middle of a session
            with pytest.raises(PspError) as e:
                world.send(other, [1], off)
            assert status_of(e) == Status.INVALID_PARAM
    trailer = world.src.send_trailer(world.h)
    assert int.from_bytes(trailer[:8], "little") == 0  # no sequenced page sent
    for mode, pfns, o, n in sent:
        world.recv(mode, pfns, n, o)
    for other in SEQUENCED:  # the destination is bound too
        n = packet_size(other, 1)
        with pytest.raises(PspError) as e:
            world.recv(other, [1], n, 0)
        assert status_of(e) == Status.INVALID_PARAM
    world.dst.receive_finish(world.hd, trailer)  # a page session's trailer works
    got = world.read(world.dst, world.hd, world.dmem)
    assert np.array_equal(got[:8], pt) and not np.any(world.dmem.pages()[8:])  # none written


def test_sev_session_with_every_packet_dropped_fails_at_finish(world: World) -> None:
    # The trailer says the sender moved SEV packets; a destination that received none
    # does not match it (it would have had to see at least one).
    world.start()
    world.send(Batching.CONTIG, [0, 1])
    trailer = world.src.send_trailer(world.h)
    with pytest.raises(PspError) as e:
        world.dst.receive_finish(world.hd, trailer)
    assert status_of(e) == Status.BAD_MEASUREMENT
    assert world.dst.guest_status(world.hd)[0] == GuestState.RUPDATE


def test_empty_session_round_trips(fws: tuple[Firmware, Firmware]) -> None:
    # No data at all, only the VMSA: the trailer's "no format" matches a destination that
    # received no data either.
    w = World(*fws, policy=ES)
    try:
        pt = random_pages(1, 23)
        w.write(np.array([30]), pt)
        w.start()
        v = w.src.send_update_vmsa(w.h, 30, w.ts, 0)
        trailer = w.src.send_trailer(w.h)
        w.dst.receive_update_vmsa(w.hd, 30, w.td, 0, v)
        w.dst.receive_finish(w.hd, trailer)
        assert np.array_equal(w.read(w.dst, w.hd, w.dmem)[30], pt[0])
    finally:
        w.close()


@pytest.mark.parametrize("mode", SEQUENCED)
def test_destination_refuses_page_format_after_sequenced_data(
    fws: tuple[Firmware, Firmware], mode: Batching
) -> None:
    w = World(*fws, policy=ES)
    try:
        pt = random_pages(NPAGES, 24)
        w.write(np.arange(NPAGES), pt)
        w.start()
        a = w.send(mode, [5, 6], 0)
        v = w.src.send_update_vmsa(w.h, 30, w.ts, a)
        trailer = w.src.send_trailer(w.h)
        w.recv(mode, [5, 6], a, 0)
        snap = w.dmem.arr.copy()
        # The VMSA packet, a genuine SEV packet under this session's keys, fed back as
        # private page 5 (which sg/aead sent) or any other page: refused.
        for m, pfn in [(Batching.PAGE, 5), (Batching.CONTIG, 5), (Batching.PAGE, 7)]:
            with pytest.raises(PspError) as e:
                w.recv(m, [pfn], v, a)
            assert status_of(e) == Status.INVALID_PARAM and "bound" in str(e.value)
        with pytest.raises(PspError) as e:  # nor through the queue
            w.dst.receive_update_data_queue(
                w.hd, Batching.PAGE, np.array([5]), np.array([0, 1]), w.td, a, v
            )
        assert status_of(e) == Status.INVALID_PARAM
        assert np.array_equal(w.dmem.arr, snap)
        # The VMSA still goes its own way, and the migration completes.
        w.dst.receive_update_vmsa(w.hd, 30, w.td, a, v)
        w.dst.receive_finish(w.hd, trailer)
        got = w.read(w.dst, w.hd, w.dmem)
        assert np.array_equal(got[[5, 6, 30]], pt[[5, 6, 30]])
    finally:
        w.close()


@pytest.mark.parametrize("mode", [*SEQUENCED, None])
def test_stream_rewritten_to_page_format_fails_at_finish(
    fws: tuple[Firmware, Firmware], mode: Batching | None
) -> None:
    """The hypervisor rewrites the stream to SEV's format from its first packet: it feeds
    the genuine VMSA packet as private page 5 (which the sender sent by sg/aead), so the
    destination's session is bound to SEV's format and takes it. RECEIVE_FINISH with the
    sender's genuine trailer must fail, before the guest can run. ``None``: the sender sent
    no data at all, only the VMSA."""
    w = World(*fws, policy=ES)
    try:
        pt = random_pages(NPAGES, 25)
        w.write(np.arange(NPAGES), pt)
        w.start()
        off = 0
        if mode is not None:
            off = a = w.send(mode, [5, 6], 0)
        v = w.src.send_update_vmsa(w.h, 30, w.ts, off)
        trailer = w.src.send_trailer(w.h)
        w.recv(Batching.PAGE, [5], v, off)  # the VMSA as page 5: verifies, as in SEV
        if mode is not None:
            with pytest.raises(PspError) as e:  # the genuine data no longer fits the session
                w.recv(mode, [5, 6], a, 0)
            assert status_of(e) == Status.INVALID_PARAM
        w.dst.receive_update_vmsa(w.hd, 30, w.td, off, v)
        with pytest.raises(PspError) as e:
            w.dst.receive_finish(w.hd, trailer)
        assert status_of(e) == Status.BAD_MEASUREMENT
        assert w.dst.guest_status(w.hd)[0] == GuestState.RUPDATE
        with pytest.raises(PspError) as e:
            w.dst.memory_key(w.hd)  # the guest cannot run
        assert status_of(e) == Status.INVALID_GUEST_STATE
    finally:
        w.close()


@pytest.mark.parametrize("mode", SEQUENCED)
def test_queue_is_many_full_commands(world: World, mode: Batching) -> None:
    pt = random_pages(6, 12)
    pfns = np.array([9, 2, 30, 4, 5, 17])
    world.write(pfns, pt)
    world.start()
    bounds = np.array([0, 1, 3, 6])
    total = world.src.send_update_data_queue(world.h, mode, pfns, bounds, world.ts, 0)
    sizes = [packet_size(mode, k) for k in (1, 2, 3)]
    assert total == sum(sizes)
    offs = np.cumsum([0, *sizes[:-1]])
    if mode is Batching.SG:
        ivs = {world.trans.arr[o + 4 : o + 20].tobytes() for o in offs}
        assert len(ivs) == 3  # each queued command has its own IV (and MAC)
        bad = int(offs[1]) + 30  # in the second packet's header MAC
    else:
        heads = [world.trans.arr[o : o + AEAD_HDR].tobytes() for o in offs]
        # each queued command has its own header: its count and first sequence number
        assert heads == [
            k.to_bytes(4, "little") + bytes(4) + s.to_bytes(8, "little")
            for k, s in ((1, 0), (2, 1), (3, 3))
        ]
        bad = int(offs[1]) + AEAD_HDR + 2 * 8 + AEAD_RECORD + 30  # page 1's ciphertext
    # A queue refused at its second packet reports which one; the first was applied.
    world.trans.arr[bad] ^= 1
    with pytest.raises(PspError) as e:
        world.dst.receive_update_data_queue(world.hd, mode, pfns, bounds, world.td, 0, total)
    assert status_of(e) == Status.BAD_MEASUREMENT and "queued command 1 of 3" in str(e.value)
    world.trans.arr[bad] ^= 1
    with pytest.raises(PspError) as e:  # replaying the whole queue: its first packet is stale
        world.dst.receive_update_data_queue(world.hd, mode, pfns, bounds, world.td, 0, total)
    assert "queued command 0 of 3" in str(e.value)
    for i in (1, 2):
        world.recv(mode, pfns[bounds[i] : bounds[i + 1]], sizes[i], int(offs[i]))
    world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem)[pfns], pt)


@pytest.mark.parametrize("mode", list(Batching))
def test_receive_finish_returns_the_measurement_of_what_was_imported(
    world: World, mode: Batching
) -> None:
    from cvmig.psp.measure import measure_digest, page_measure

    pt = random_pages(world.npages, seed=7)
    pfns = np.arange(world.npages)
    world.write(pfns, pt)
    world.start()
    step = 1 if mode is Batching.PAGE else 4
    off = 0
    for lo in range(0, world.npages, step):
        chunk = pfns[lo : lo + step]
        n = world.send(mode, chunk, off)
        world.dst.receive_update_data(world.hd, mode, chunk, world.td, off, n)
        off += n
    got = world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))
    assert got == measure_digest(page_measure(pt, pfns))
    # and it depends on every page: one changed byte anywhere changes it
    pt2 = pt.copy()
    pt2[world.npages // 2, 123] ^= 1
    assert got != measure_digest(page_measure(pt2, pfns))
    # the guest on the destination holds exactly that plaintext under its new VEK
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem), pt)


@pytest.mark.parametrize("mode", [Batching.SG, Batching.AEAD])
def test_a_refused_forged_packet_does_not_pick_the_sessions_format(
    world: World, mode: Batching
) -> None:
    """Garbage fed as a page packet first is refused, and the genuine stream still goes
    through: only a packet that verifies binds the session's format."""
    world.start()
    n = world.send(mode, [1, 2])
    garbage = packet_size(Batching.PAGE, 1)
    world.trans.arr[n : n + garbage] = 0xA5
    with pytest.raises(PspError):
        world.recv(Batching.PAGE, [3], garbage, n)
    world.recv(mode, [1, 2], n)
    world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))


@pytest.mark.parametrize("fmt", list(Batching))
def test_the_packet_format_is_negotiated_at_start(fws: tuple[Firmware, Firmware],
                                                  fmt: Batching) -> None:
    """SEND_START/RECEIVE_START bind the session to the batching mode's packet format
    before any data moves: the source refuses every other format from the first packet
    on, and so does the destination; SEV's page/contig keep SEV's 128-byte blob."""
    w = World(*fws)
    try:
        s = w.start(fmt)
        sev = fmt in (Batching.PAGE, Batching.CONTIG)
        assert len(s.session) == (128 if sev else 128 + 36)
        for other in Batching:
            if (other in (Batching.PAGE, Batching.CONTIG)) == sev and (sev or other is fmt):
                continue
            with pytest.raises(PspError) as e:
                w.send(other, [1])
            assert e.value.status == Status.INVALID_PARAM, other
            with pytest.raises(PspError) as e:
                w.recv(other, [1], packet_size(other, 1))
            assert e.value.status == Status.INVALID_PARAM, other
        n = w.send(fmt, [1])
        w.recv(fmt, [1], n)  # the negotiated format itself moves
    finally:
        w.close()


def test_a_changed_negotiation_is_refused_at_receive_start(
    fws: tuple[Firmware, Firmware],
) -> None:
    """Whoever carries the session blob cannot change the format it negotiates: not by
    flipping the format code, not by stripping the extension (a SEV blob then says SEV's
    format, and the aead the stream announces is refused), not by announcing another."""
    w = World(*fws)
    try:
        s = w.src.send_start(w.h, w.dst.export_certs(), Batching.AEAD)
        flipped = s.session[:128] + (2).to_bytes(4, "little") + s.session[132:]
        cases = [
            (dataclasses.replace(s, session=flipped), Batching.SG),
            (dataclasses.replace(s, session=s.session[:128]), Batching.AEAD),
            (s, Batching.SG),
            (s, Batching.PAGE),
            (dataclasses.replace(s, session=s.session + b"x"), Batching.AEAD),
        ]
        for bad, announced in cases:
            with pytest.raises(PspError) as e:
                w.dst.receive_start(w.d, w.npages, bad, announced)
            assert e.value.status in (Status.BAD_MEASUREMENT, Status.INVALID_LENGTH), announced
        w.hd = w.dst.receive_start(w.d, w.npages, s, Batching.AEAD)  # the real one goes
        n = w.send(Batching.AEAD, [1, 2])
        w.recv(Batching.AEAD, [1, 2], n)
    finally:
        w.close()
