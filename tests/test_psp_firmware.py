"""The in-process firmware: every command, the state machine, policies, tampering, sg integrity."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
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
from cvmig.psp.packet import HDR, SG_ENTRY, SG_HDR
from cvmig.psp.testing import ShmRegion

NPAGES = 32
TRANS = 4 << 20

NODBG, NOKS, ES, NOSEND, DOMAIN, SEV = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20


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

    def start(self) -> SendSession:
        s = self.src.send_start(self.h, self.dst.export_certs())
        self.hd = self.dst.receive_start(self.d, self.npages, s)
        return s

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
    with pytest.raises(ValueError):
        packet_size(Batching.PAGE, 2)


# --- round trips -----------------------------------------------------------------------


def test_round_trip_every_mode_and_vmsa(fws: tuple[Firmware, Firmware]) -> None:
    w = World(*fws, policy=ES | NODBG)
    try:
        pt = random_pages(NPAGES, 1)
        w.write(np.arange(NPAGES), pt)
        w.start()
        assert w.src.guest_status(w.h)[0] == GuestState.SUPDATE
        assert w.dst.guest_status(w.hd) == (GuestState.RUPDATE, ES | NODBG)
        off = 0
        plan: list[tuple[str, list[int], int, int]] = []
        for mode, pfns in [
            (Batching.PAGE, [0]),
            (Batching.CONTIG, [1, 2, 3, 4]),
            (Batching.SG, [9, 5, 31, 7]),
            (Batching.SG, [6]),
        ]:
            n = w.send(mode, pfns, off)
            assert n == packet_size(mode, len(pfns))
            plan.append((mode, pfns, off, n))
            off += n
        n = w.src.send_update_data_queue(
            w.h, Batching.CONTIG, np.array([10, 11, 12, 20, 21]), np.array([0, 3, 5]), w.ts, off
        )
        assert n == packet_size(Batching.CONTIG, 3) + packet_size(Batching.CONTIG, 2)
        qoff, qn = off, n
        off += n
        vn = w.src.send_update_vmsa(w.h, 30, w.ts, off)
        src_vek = w.src.memory_key(w.h)
        trailer = w.src.send_trailer(w.h)
        assert w.src.guest_status(w.h)[0] == GuestState.SUPDATE  # the trailer changes nothing
        w.src.send_finish(w.h)
        assert w.src.guest_status(w.h)[0] == GuestState.SENT
        for mode, pfns, o, n in plan:
            w.recv(mode, pfns, n, o)
        w.dst.receive_update_data_queue(
            w.hd, Batching.CONTIG, np.array([10, 11, 12, 20, 21]), np.array([0, 3, 5]), w.td,
            qoff, qn,
        )
        w.dst.receive_update_vmsa(w.hd, 30, w.td, off, vn)
        w.dst.receive_finish(w.hd, trailer)
        assert w.dst.guest_status(w.hd)[0] == GuestState.RUNNING
        got = w.read(w.dst, w.hd, w.dmem)
        sent = [0, 1, 2, 3, 4, 9, 5, 31, 7, 6, 10, 11, 12, 20, 21, 30]
        assert np.array_equal(got[sent], pt[sent])
        unsent = sorted(set(range(NPAGES)) - set(sent))
        assert not np.any(got[unsent])  # destination memory starts as zero plaintext
        # The destination has its own VEK: same plaintext, different ciphertext.
        assert w.dst.memory_key(w.hd) != src_vek
        assert not np.array_equal(w.dmem.pages()[0], w.gmem.pages()[0])
    finally:
        w.close()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_property_send_here_receive_there(fws: tuple[Firmware, Firmware], data: st.DataObject) -> None:
    npages = data.draw(st.integers(1, 24), label="npages")
    w = World(*fws, npages=npages)
    try:
        seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
        pt = random_pages(npages, seed)
        w.write(np.arange(npages), pt)
        w.start()
        batches: list[tuple[Batching, list[int]]] = []
        for _ in range(data.draw(st.integers(1, 6), label="ncmds")):
            mode = data.draw(st.sampled_from(list(Batching)), label="mode")
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
    [(m, w) for m in Batching for w in ("flags", "iv", "mac", "data")]
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


# --- scatter-gather integrity (the extension) ------------------------------------------


def test_sg_replay_refused(world: World) -> None:
    world.start()
    n = world.send(Batching.SG, [1, 2])
    world.recv(Batching.SG, [1, 2], n)
    snap = world.dmem.arr.copy()
    with pytest.raises(PspError) as e:
        world.recv(Batching.SG, [1, 2], n)  # the same packet again
    assert status_of(e) == Status.BAD_MEASUREMENT and "replayed" in str(e.value)
    assert np.array_equal(world.dmem.arr, snap)


def test_sg_stale_reorder_refused(world: World) -> None:
    world.write(np.array([3]), random_pages(1, 1))
    world.start()
    old = world.send(Batching.SG, [3], 0)
    world.write(np.array([3]), random_pages(1, 2))  # the guest dirties page 3
    new_off = old
    new = world.send(Batching.SG, [3], new_off)
    world.recv(Batching.SG, [3], new, new_off)  # newer copy arrives first...
    snap = world.dmem.arr.copy()
    with pytest.raises(PspError) as e:
        world.recv(Batching.SG, [3], old, 0)  # ...then the stale one
    assert status_of(e) == Status.BAD_MEASUREMENT
    assert np.array_equal(world.dmem.arr, snap)


def test_sg_reorder_of_distinct_pages_is_fine(world: World) -> None:
    pt = random_pages(2, 4)
    world.write(np.array([1, 2]), pt)
    world.start()
    a = world.send(Batching.SG, [1], 0)
    b = world.send(Batching.SG, [2], a)
    world.recv(Batching.SG, [2], b, a)
    world.recv(Batching.SG, [1], a, 0)
    world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))
    world.src.send_finish(world.h)
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem)[[1, 2]], pt)


def test_sg_redirect_refused(world: World) -> None:
    world.start()
    n = world.send(Batching.SG, [1, 2])
    snap = world.dmem.arr.copy()
    with pytest.raises(PspError) as e:
        world.recv(Batching.SG, [1, 9], n)  # hypervisor points page 2 at pfn 9
    assert status_of(e) == Status.INVALID_ADDRESS and "redirected" in str(e.value)
    with pytest.raises(PspError) as e:
        world.recv(Batching.SG, [2, 1], n)  # or swaps them
    assert status_of(e) == Status.INVALID_ADDRESS
    # Rewriting the GPA inside the packet breaks the header MAC.
    world.trans.arr[HDR + SG_HDR + SG_ENTRY : HDR + SG_HDR + SG_ENTRY + 8] = np.frombuffer(
        (9 * PAGE_SIZE).to_bytes(8, "little"), dtype=np.uint8
    )
    with pytest.raises(PspError) as e:
        world.recv(Batching.SG, [1, 9], n)
    assert status_of(e) == Status.BAD_MEASUREMENT
    assert np.array_equal(world.dmem.arr, snap)


def test_sg_drop_detected_at_finish(world: World) -> None:
    world.start()
    a = world.send(Batching.SG, [1, 2], 0)
    b = world.send(Batching.SG, [3], a)
    trailer = world.src.send_trailer(world.h)
    world.recv(Batching.SG, [1, 2], a, 0)  # packet b never delivered
    with pytest.raises(PspError) as e:
        world.dst.receive_finish(world.hd, trailer)
    assert status_of(e) == Status.BAD_MEASUREMENT and "dropped" in str(e.value)
    assert world.dst.guest_status(world.hd)[0] == GuestState.RUPDATE  # cannot run
    forged = bytearray(trailer)
    forged[0] = 2  # claim only 2 pages were sent
    with pytest.raises(PspError) as e:
        world.dst.receive_finish(world.hd, bytes(forged))
    assert status_of(e) == Status.BAD_MEASUREMENT
    world.recv(Batching.SG, [3], b, a)
    world.dst.receive_finish(world.hd, trailer)


def test_page_mode_has_seves_gap(world: World) -> None:
    # Faithful SEV: a page-mode packet is bound to nothing, so a redirect or a replay is
    # accepted. The sg mode exists to close exactly this.
    pt = random_pages(1, 8)
    world.write(np.array([1]), pt)
    world.start()
    n = world.send(Batching.PAGE, [1])
    world.recv(Batching.PAGE, [7], n)  # redirected to pfn 7
    world.recv(Batching.PAGE, [7], n)  # and replayed
    world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))
    world.src.send_finish(world.h)
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem)[7], pt[0])


def test_queue_is_many_full_commands(world: World) -> None:
    pt = random_pages(6, 12)
    pfns = np.array([9, 2, 30, 4, 5, 17])
    world.write(pfns, pt)
    world.start()
    bounds = np.array([0, 1, 3, 6])
    total = world.src.send_update_data_queue(world.h, Batching.SG, pfns, bounds, world.ts, 0)
    sizes = [packet_size(Batching.SG, k) for k in (1, 2, 3)]
    assert total == sum(sizes)
    offs = np.cumsum([0, *sizes[:-1]])
    ivs = {world.trans.arr[o + 4 : o + 20].tobytes() for o in offs}
    assert len(ivs) == 3  # each queued command has its own IV (and MAC)
    # A queue refused at its second packet reports which one; the first was applied.
    world.trans.arr[offs[1] + 30] ^= 1
    with pytest.raises(PspError) as e:
        world.dst.receive_update_data_queue(world.hd, Batching.SG, pfns, bounds, world.td, 0, total)
    assert status_of(e) == Status.BAD_MEASUREMENT and "queued command 1 of 3" in str(e.value)
    world.trans.arr[offs[1] + 30] ^= 1
    with pytest.raises(PspError) as e:  # replaying the whole queue: its first packet is stale
        world.dst.receive_update_data_queue(world.hd, Batching.SG, pfns, bounds, world.td, 0, total)
    assert "queued command 0 of 3" in str(e.value)
    for i in (1, 2):
        world.recv(Batching.SG, pfns[bounds[i] : bounds[i + 1]], sizes[i], int(offs[i]))
    world.dst.receive_finish(world.hd, world.src.send_trailer(world.h))
    assert np.array_equal(world.read(world.dst, world.hd, world.dmem)[pfns], pt)


@pytest.mark.parametrize("mode", [Batching.PAGE, Batching.CONTIG, Batching.SG])
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
