"""The PSP process and its mailbox: end to end, status codes, clients, cost, confidentiality."""

from __future__ import annotations

import os
import pathlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmig.psp import certs as C
from cvmig.psp.api import PAGE_SIZE, Batching, GuestState, PspError, Status
from cvmig.psp.firmware import Firmware
from cvmig.psp.mailbox import (
    GUEST_STATUS,
    MailboxClient,
    PspProcess,
    PspServer,
    fetch_memory_key,
    serve_in_thread,
)
from cvmig.psp.memcrypt import MemoryCipher
from cvmig.psp.testing import ShmRegion

NPAGES = 64
TRANS = 2 << 20


def _format(mode: Batching) -> Batching:
    """The packet format a mode moves: page and contig share SEV's; a session has one."""
    return Batching.PAGE if mode in (Batching.PAGE, Batching.CONTIG) else mode


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("pki")
    C.AmdRoot.generate().save(d / "amd-root")
    C.Owner.generate().save(d / "owner")
    return d


@pytest.fixture(scope="module")
def hosts(pki_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PspProcess, PspProcess]]:
    d = tmp_path_factory.mktemp("sock")
    a = PspProcess(str(d / "a.sock"), pki=str(pki_dir)).start()
    b = PspProcess(str(d / "b.sock"), pki=str(pki_dir), max_contig_bytes=256 * PAGE_SIZE).start()
    yield a, b
    a.stop()
    b.stop()
    assert not (d / "a.sock").exists()  # the PSP cleans up its socket


def guest_write(socket_path: str, handle: int, mem: ShmRegion, pfns: np.ndarray, pt: np.ndarray) -> None:
    """A vCPU's view: key from the memory controller, encrypt into its own memory."""
    ct = np.empty_like(pt)
    MemoryCipher(fetch_memory_key(socket_path, handle)).encrypt_pages(pfns, pt, ct)
    mem.pages()[pfns] = ct


def guest_read(socket_path: str, handle: int, mem: ShmRegion, npages: int) -> np.ndarray:
    out = np.empty((npages, PAGE_SIZE), dtype=np.uint8)
    MemoryCipher(fetch_memory_key(socket_path, handle)).decrypt_pages(
        np.arange(npages), mem.pages(npages), out
    )
    return out


def test_process_end_to_end(hosts: tuple[PspProcess, PspProcess]) -> None:
    a_host, b_host = hosts
    with ShmRegion(NPAGES * PAGE_SIZE) as gm, ShmRegion(NPAGES * PAGE_SIZE) as dm, \
            ShmRegion(TRANS) as ta, ShmRegion(TRANS) as tb, a_host.client() as a, b_host.client() as b:
        g, ra = a.map_region(gm.name, gm.size), a.map_region(ta.name, TRANS)
        d, rb = b.map_region(dm.name, dm.size), b.map_region(tb.name, TRANS)
        h = a.launch(g, NPAGES, 0x1)
        assert a.guest_status(h) == (GuestState.RUNNING, 0x1)
        assert not np.any(guest_read(a_host.socket_path, h, gm, NPAGES))
        pt = np.random.default_rng(7).integers(0, 256, (NPAGES, PAGE_SIZE), dtype=np.uint8)
        guest_write(a_host.socket_path, h, gm, np.arange(NPAGES), pt)
        sess = a.send_start(h, b.export_certs())
        hd = b.receive_start(d, NPAGES, sess)
        assert b.limits()["max_contig_bytes"] == 256 * PAGE_SIZE
        # Bulk: contig runs of 4, then a queue of runs, then pages (one SEV-format session).
        off = 0
        runs = [list(range(i, i + 4)) for i in range(0, 32, 4)]
        sizes = [a.send_update_data(h, Batching.CONTIG, np.array(r), ra, off + 0) for r in runs[:1]]
        tb.arr[: sizes[0]] = ta.arr[: sizes[0]]  # "the wire"
        b.receive_update_data(hd, Batching.CONTIG, np.array(runs[0]), rb, 0, sizes[0])
        n = a.send_update_data_queue(
            h, Batching.CONTIG, np.arange(4, 32), np.arange(0, 29, 4), ra, 0
        )
        tb.arr[:n] = ta.arr[:n]
        b.receive_update_data_queue(hd, Batching.CONTIG, np.arange(4, 32), np.arange(0, 29, 4), rb, 0, n)
        for p in range(NPAGES - 1, 31, -1):  # backwards: order does not matter here
            n = a.send_update_data(h, Batching.PAGE, np.array([p]), ra, 0)
            tb.arr[:n] = ta.arr[:n]
            b.receive_update_data(hd, Batching.PAGE, np.array([p]), rb, 0, n)
        trailer = a.send_trailer(h)
        b.receive_finish(hd, trailer)
        a.send_finish(h)
        assert a.guest_status(h)[0] == GuestState.SENT
        with pytest.raises(PspError) as e:
            fetch_memory_key(a_host.socket_path, h)  # a SENT guest never runs again
        assert e.value.status == Status.INVALID_GUEST_STATE
        assert np.array_equal(guest_read(b_host.socket_path, hd, dm, NPAGES), pt)
        st = b.platform_status()
        assert st["api"] == f"{C.API_MAJOR}.{C.API_MINOR}" and st["profile"] == "none"
        cmds = st["commands"]
        assert isinstance(cmds, dict) and cmds["RECEIVE_UPDATE_DATA_QUEUE"] == 1
        for c in (a, b):
            c.decommission(h if c is a else hd)


def test_status_codes_cross_the_mailbox(hosts: tuple[PspProcess, PspProcess]) -> None:
    with hosts[0].client() as c:
        with pytest.raises(PspError) as e:
            c.guest_status(999)
        assert e.value.status == Status.INVALID_GUEST and e.value.command == "GUEST_STATUS"
        with pytest.raises(PspError) as e:
            c.map_region("cvmig-psp-no-such-object", 4096)
        assert e.value.status == Status.INVALID_ADDRESS
        with pytest.raises(PspError) as e:
            fetch_memory_key(hosts[0].socket_path, 999)
        assert e.value.status == Status.INVALID_GUEST
        with pytest.raises(PspError) as e:
            c.send_cancel(12345)
        assert e.value.status == Status.INVALID_GUEST
        assert len(c.export_certs().pdh) == 2084  # the connection is still good after errors


def test_malformed_and_unknown_commands(hosts: tuple[PspProcess, PspProcess]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(hosts[0].socket_path)
        s.send(struct.pack("<I", 0x99))
        assert struct.unpack_from("<I", s.recv(4096))[0] == Status.INVALID_COMMAND
        s.send(struct.pack("<I", GUEST_STATUS))  # no handle in the buffer
        assert struct.unpack_from("<I", s.recv(4096))[0] == Status.INVALID_PARAM
        s.send(b"\x01")
        assert struct.unpack_from("<I", s.recv(4096))[0] == Status.INVALID_COMMAND
    with hosts[0].client() as c:  # the PSP survived and still serves
        assert c.platform_status()["api"] == f"{C.API_MAJOR}.{C.API_MINOR}"


def test_many_clients_one_command_at_a_time(hosts: tuple[PspProcess, PspProcess]) -> None:
    host = hosts[0]
    with ShmRegion(4 * PAGE_SIZE * 4) as mem, host.client() as c0:
        base = c0.platform_status()["commands"]
        assert isinstance(base, dict)
        errors: list[BaseException] = []
        handles: list[int] = []

        def worker(i: int) -> None:
            try:
                with MailboxClient(host.socket_path) as c:
                    r = c.map_region(mem.name, mem.size)
                    for _ in range(50):
                        c.guest_status(handles[0])
                    c.unmap_region(r)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        r = c0.map_region(mem.name, mem.size)
        handles.append(c0.launch(r, 4, 0))
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors
        after = c0.platform_status()["commands"]
        assert isinstance(after, dict)
        assert after["GUEST_STATUS"] - base.get("GUEST_STATUS", 0) == 200
        c0.decommission(handles[0])
        c0.unmap_region(r)


def test_process_start_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="unknown PSP cost profile"):
        PspProcess(str(tmp_path / "x.sock"), profile="fast-please")


def test_cost_profile_is_applied_per_message(pki_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    root, owner = C.AmdRoot.load(pki_dir / "amd-root"), C.Owner.load(pki_dir / "owner")
    fw = Firmware(C.PlatformIdentity.generate(root, owner), trusted_arks=[root.ark_cert])
    # 15 ms per command, 5 ms per doorbell, 8 MB/s.
    server = PspServer(fw, str(tmp_path / "c.sock"), "15000:5000:8")
    serve_in_thread(server)
    try:
        with MailboxClient(server.socket_path) as c, ShmRegion(4 * PAGE_SIZE) as m:
            r = c.map_region(m.name, m.size)
            t = time.perf_counter()
            h = c.launch(r, 4, 0)
            for _ in range(3):
                c.guest_status(h)
            per = (time.perf_counter() - t) / 4
            assert per >= 20e-3  # doorbell + one command
            # The memory controller is not the PSP: no firmware cost on a key fetch.
            t = time.perf_counter()
            fetch_memory_key(server.socket_path, h)
            assert time.perf_counter() - t < 20e-3
    finally:
        server.stop()


# --- confidentiality ------------------------------------------------------------------


def test_hypervisor_side_sees_no_plaintext_and_no_key(pki_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Plant canaries in guest pages; migrate through the real mailbox with every mode;
    scan every byte the hypervisor side handled: replies, packets, transport buffers,
    session blob, trailer, certificates, and both guests' memory (ciphertext at rest)."""
    root, owner = C.AmdRoot.load(pki_dir / "amd-root"), C.Owner.load(pki_dir / "owner")
    fws = [
        Firmware(C.PlatformIdentity.generate(root, owner), trusted_arks=[root.ark_cert])
        for _ in range(2)
    ]
    servers = [PspServer(fw, str(tmp_path / f"{i}.sock")) for i, fw in enumerate(fws)]
    for s in servers:
        serve_in_thread(s)
    trace: list[bytes] = []
    rng = np.random.default_rng(11)
    canaries = [rng.bytes(16) for _ in range(NPAGES)]
    try:
        with ShmRegion(NPAGES * PAGE_SIZE) as gm, ShmRegion(NPAGES * PAGE_SIZE) as dm, \
                ShmRegion(TRANS) as wire, \
                MailboxClient(servers[0].socket_path, trace) as a, \
                MailboxClient(servers[1].socket_path, trace) as b:
            g, ra = a.map_region(gm.name, gm.size), a.map_region(wire.name, TRANS)
            d, rb = b.map_region(dm.name, dm.size), b.map_region(wire.name, TRANS)
            h = a.launch(g, NPAGES, 0x4)  # ES, so the VMSA path is covered too
            # The guest fills its pages: each has a canary at an odd offset and repeated
            # canary-derived text (low entropy, as real secrets often are).
            pt = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
            for p, cnry in enumerate(canaries):
                pt[p, 100 + p : 116 + p] = np.frombuffer(cnry, dtype=np.uint8)
                pt[p, 2048:2048 + 16 * 64] = np.frombuffer(cnry * 64, dtype=np.uint8)
            guest_write(servers[0].socket_path, h, gm, np.arange(NPAGES), pt)
            vek_src = fetch_memory_key(servers[0].socket_path, h)
            certs_b = b.export_certs()
            sess = a.send_start(h, certs_b)
            hd = b.receive_start(d, NPAGES, sess)
            chan = fws[0]._guests[h].channel
            assert chan is not None
            seen: list[bytes] = []  # everything that went over "the wire"
            plan = [  # one packet format per session: SEV's (sg and aead: the property test)
                (Batching.PAGE, np.array([0])),
                (Batching.CONTIG, np.arange(1, 5)),
                *[(Batching.CONTIG, np.arange(p, min(p + 4, 40))) for p in range(5, 40, 4)],
            ]
            for mode, pfns in plan:
                n = a.send_update_data(h, mode, pfns, ra, 0)
                seen.append(wire.arr[:n].tobytes())
                b.receive_update_data(hd, mode, pfns, rb, 0, n)
            bounds = np.arange(0, 24, 4)
            n = a.send_update_data_queue(h, Batching.CONTIG, np.arange(40, 60), bounds, ra, 0)
            seen.append(wire.arr[:n].tobytes())
            b.receive_update_data_queue(hd, Batching.CONTIG, np.arange(40, 60), bounds, rb, 0, n)
            for pfn in range(60, NPAGES):
                n = a.send_update_vmsa(h, pfn, ra, 0)
                seen.append(wire.arr[:n].tobytes())
                b.receive_update_vmsa(hd, pfn, rb, 0, n)
            trailer = a.send_trailer(h)
            b.receive_finish(hd, trailer)
            a.send_finish(h)
            vek_dst = fetch_memory_key(servers[1].socket_path, hd)
            # The migration worked (so the scan below looks at real traffic).
            assert np.array_equal(guest_read(servers[1].socket_path, hd, dm, NPAGES), pt)

            keys = {
                "VEK(src)": vek_src, "VEK(dst)": vek_dst,
                "VEK(src) halves": vek_src[:16], "VEK(dst) half": vek_dst[16:],
                "PDH private (src)": fws[0].identity.pdh_key.private_numbers().private_value.to_bytes(48, "big"),
                "PDH private (dst)": fws[1].identity.pdh_key.private_numbers().private_value.to_bytes(48, "big"),
            }
            # TEK/TIK: recover them the way the destination does, to look for them too.
            from cvmig.psp.certs import parse_pdh
            from cvmig.psp.session import shared_secret, unwrap

            z = shared_secret(fws[1].identity.pdh_key, parse_pdh(sess.sender_pdh).public_key)
            tk = unwrap(z, sess.policy, sess.session)
            keys.update({"TEK": tk.tek, "TIK": tk.tik, "Z": z})
            hv = {
                "mailbox replies": b"".join(trace),
                "packets": b"".join(seen),
                "transport buffer": wire.arr.tobytes(),
                "session blob": sess.session,
                "trailer": trailer,
                "certificates": certs_b.to_bytes(),
                "source memory": gm.arr.tobytes(),
                "destination memory": dm.arr.tobytes(),
            }
            for where, blob in hv.items():
                for p, cnry in enumerate(canaries):
                    assert cnry not in blob, f"canary of page {p} found in {where}"
                    assert cnry[:8] not in blob, f"half a canary of page {p} in {where}"
                for what, key in keys.items():
                    assert key not in blob, f"{what} found in {where}"
            # Sanity of the scan itself: the canaries are in the plaintext, and the only
            # key the mailbox ever handed out is the one fetch_memory_key asked for.
            assert canaries[3] in pt.tobytes()
            assert vek_src not in b"".join(trace)
    finally:
        for s in servers:
            s.stop()


def test_fetch_memory_key_is_not_a_client_method() -> None:
    # The hypervisor's binding has no way to ask for a VEK.
    assert not any("key" in name for name in dir(MailboxClient) if not name.startswith("_"))


def test_psp_exits_when_its_host_process_dies(pki_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    import subprocess
    import sys

    sock = tmp_path / "orphan.sock"
    code = (
        "import sys; from cvmig.psp.mailbox import PspProcess; "
        f"p = PspProcess({str(sock)!r}, pki={str(pki_dir)!r}).start(); "
        "print(p.pid, flush=True); sys.stdin.readline()"
    )
    host = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert host.stdout is not None and host.stdin is not None
    psp_pid = int(host.stdout.readline())
    host.kill()  # the host dies without stopping its PSP
    host.wait()
    host.stdin.close()
    host.stdout.close()
    # Wait on the PSP process itself (a pidfd becomes readable when it exits).
    fd = os.pidfd_open(psp_pid)
    try:
        ready, _, _ = select.select([fd], [], [], 15)
    finally:
        os.close(fd)
    if not ready:
        os.kill(psp_pid, 9)
        pytest.fail("the PSP outlived its host")
    assert not sock.exists()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_process_to_process(hosts: tuple[PspProcess, PspProcess], data: st.DataObject) -> None:
    """Random pages and pfns, every mode, queued or not, at random transport offsets:
    what the destination guest reads is exactly what the source guest wrote."""
    npages = data.draw(st.integers(4, 48), label="npages")
    a_host, b_host = hosts
    with ShmRegion(npages * PAGE_SIZE) as gm, ShmRegion(npages * PAGE_SIZE) as dm, \
            ShmRegion(TRANS) as wire, a_host.client() as a, b_host.client() as b:
        regions = [a.map_region(gm.name, gm.size), a.map_region(wire.name, TRANS)]
        regions_b = [b.map_region(dm.name, dm.size), b.map_region(wire.name, TRANS)]
        h = a.launch(regions[0], npages, 0)
        pt = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).integers(
            0, 256, (npages, PAGE_SIZE), dtype=np.uint8
        )
        guest_write(a_host.socket_path, h, gm, np.arange(npages), pt)
        hd = b.receive_start(regions_b[0], npages, a.send_start(h, b.export_certs()))
        off = data.draw(st.integers(0, 4096), label="offset")
        sent: set[int] = set()
        first = data.draw(st.sampled_from(list(Batching)), label="format")
        same_format = [m for m in Batching if _format(m) == _format(first)]
        for _ in range(data.draw(st.integers(1, 4), label="ncmds")):
            mode = data.draw(st.sampled_from(same_format), label="mode")
            k = 1 if mode is Batching.PAGE else data.draw(st.integers(1, 4))
            if _format(mode) is not Batching.PAGE:  # scattered formats (sg, aead, ...)
                pfns = np.array(data.draw(st.lists(st.integers(0, npages - 1), min_size=k, max_size=k)))
            else:
                p0 = data.draw(st.integers(0, npages - k))
                pfns = np.arange(p0, p0 + k)
            if data.draw(st.booleans(), label="queue"):
                bounds = np.array([0, len(pfns)])
                n = a.send_update_data_queue(h, mode, pfns, bounds, regions[1], off)
                b.receive_update_data_queue(hd, mode, pfns, bounds, regions_b[1], off, n)
            else:
                n = a.send_update_data(h, mode, pfns, regions[1], off)
                b.receive_update_data(hd, mode, pfns, regions_b[1], off, n)
            sent.update(pfns.tolist())
        b.receive_finish(hd, a.send_trailer(h))
        a.send_finish(h)
        got = guest_read(b_host.socket_path, hd, dm, npages)
        idx = sorted(sent)
        assert np.array_equal(got[idx], pt[idx])
        a.decommission(h)
        b.decommission(hd)
        for c, rs in ((a, regions), (b, regions_b)):
            for r in rs:
                c.unmap_region(r)
