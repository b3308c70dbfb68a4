"""The optional mutual-TLS channel: `cvmig pki`'s certificates, handshakes that refuse the
wrong peer with one clear line on both sides, real migrations over TLS, and a destination
that a plaintext or slow client cannot delay. Real sockets, real certificates."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cvmig.guest.vm import GuestConfig
from cvmig.guest.workloads import parse_workload
from cvmig.migration.destination import listen
from cvmig.migration.driver import MigrationParams
from cvmig.migration.host import Host
from cvmig.migration.listener import NEEDS_TLS_MESSAGE, Listener
from cvmig.migration.session import DestinationProcess, tls_args
from cvmig.migration.source import MigrationFailed, SourceVM, migrate_out
from cvmig.pki import create, pki
from cvmig.psp.api import GuestState, Policy
from cvmig.wire.channel import Channel, RemoteError
from cvmig.wire.frames import VERSION, FrameType
from cvmig.wire.tls import FILES, TlsCreds, TlsError, client_wrap, peer_identities, server_wrap
from tests.test_migration_failures import cancel_within_a_second, migrate_in_background

MiB = 1 << 20
HELLO = {"version": VERSION, "role": "source", "capabilities": ["page"]}


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with hosts localhost and hostb; a rogue CA's localhost; and 'mixed': our CA
    (so it trusts our destinations) with the rogue's client certificate."""
    root = tmp_path_factory.mktemp("pki")
    create(root / "ca", ["localhost", "hostb"], days=2)
    create(root / "rogue", ["localhost"], days=2)
    mixed = root / "mixed"
    mixed.mkdir()
    for f in FILES:
        src = root / "rogue" / "localhost" / f
        if f == "ca-cert.pem":
            src = root / "ca" / "localhost" / f
        (mixed / f).write_bytes(src.read_bytes())
    return root


@pytest.fixture
def host() -> Iterator[Host]:
    with Host("source") as h:
        yield h


def _boot(host: Host) -> SourceVM:
    cfg = GuestConfig(memory=16 * MiB, vcpus=1,
                      workload=parse_workload("dirtier:rate=2000,pattern=hotcold"))
    return SourceVM.boot(host, cfg, int(Policy.NODBG | Policy.ES))


def _ops(vm: SourceVM) -> int:
    return sum(s.ops for s in vm.guest.stats())


def _still_running(vm: SourceVM) -> None:
    assert vm.host.psp is not None
    assert vm.host.psp.guest_status(vm.handle)[0] is GuestState.RUNNING
    before, deadline = _ops(vm), time.monotonic() + 10
    while _ops(vm) <= before:
        assert time.monotonic() < deadline, "the guest does not run on the source"
        time.sleep(0.01)  # polling the vCPUs' counters, deadline-bound


def _one_line(msg: str) -> None:
    assert msg and "\n" not in msg and "Traceback" not in msg, msg


# -- cvmig pki ---------------------------------------------------------------------------
def test_pki_output_parses_and_chains(pkidir: Path) -> None:
    ca = x509.load_pem_x509_certificate((pkidir / "ca" / "ca-cert.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for h in ("localhost", "hostb"):
        d = pkidir / "ca" / h
        assert sorted(p.name for p in d.iterdir()) == sorted(FILES)
        assert (d / "ca-cert.pem").read_bytes() == (pkidir / "ca" / "ca-cert.pem").read_bytes()
        for cert_name, key_name in (("server-cert.pem", "server-key.pem"),
                                    ("client-cert.pem", "client-key.pem")):
            cert = x509.load_pem_x509_certificate((d / cert_name).read_bytes())
            assert cert.issuer == ca.subject
            pub = ca.public_key()
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            assert cert.signature_hash_algorithm is not None
            pub.verify(cert.signature, cert.tbs_certificate_bytes,
                       ec.ECDSA(cert.signature_hash_algorithm))  # raises if not chained
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert h in san.get_values_for_type(x509.DNSName)
            assert stat.S_IMODE((d / key_name).stat().st_mode) == 0o600
        TlsCreds.load(d)  # Python's ssl takes them as they are
    assert stat.S_IMODE((pkidir / "ca" / "ca-key.pem").stat().st_mode) == 0o600
    local = x509.load_pem_x509_certificate(
        (pkidir / "ca" / "localhost" / "server-cert.pem").read_bytes())
    ips = local.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(a) for a in ips.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def test_pki_refuses_bad_input_in_one_line(pkidir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for args, words in (
            ([str(pkidir / "ca"), "--hosts", "hostb"], "already holds"),
            ([str(tmp_path / "x"), "--hosts", "bad name"], "neither a host name"),
            ([str(tmp_path / "x"), "--hosts", "a,,b"], "empty name"),
            ([str(tmp_path / "x"), "--days", "0"], "--days")):
        r = runner.invoke(pki, args)
        assert r.exit_code == 1, r.output
        assert words in r.output and "Traceback" not in r.output, r.output
    # a new host later, signed by the same CA
    r = runner.invoke(pki, [str(pkidir / "ca"), "--hosts", "hostc"])
    assert r.exit_code == 0, r.output
    c = x509.load_pem_x509_certificate((pkidir / "ca" / "hostc" / "client-cert.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((pkidir / "ca" / "ca-cert.pem").read_bytes())
    assert c.issuer == ca.subject


# -- handshakes --------------------------------------------------------------------------
def _handshake(client: TlsCreds, server: TlsCreds,
               name: str = "hostb") -> tuple[str | list[str], str | list[str]]:
    """(client's result, server's result): the peer's identities, or the error's text."""
    srv = socket.create_server(("127.0.0.1", 0))
    out: dict[str, str | list[str]] = {}

    def serve() -> None:
        conn, _ = srv.accept()
        conn.settimeout(5.0)
        try:
            tls = server_wrap(conn, server)
            out["server"] = peer_identities(tls)
            tls.close()
        except TlsError as e:
            out["server"] = str(e)

    t = threading.Thread(target=serve)
    t.start()
    sock = socket.create_connection(srv.getsockname(), timeout=5.0)
    try:
        tls = client_wrap(sock, client, name)
        client_out: str | list[str] = peer_identities(tls)
        tls.close()
    except TlsError as e:
        client_out = str(e)
    t.join(10)
    srv.close()
    return client_out, out["server"]


def test_a_mutual_handshake_names_both_peers(pkidir: Path) -> None:
    a = TlsCreds.load(pkidir / "ca" / "localhost")
    b = TlsCreds.load(pkidir / "ca" / "hostb", authz=["localhost"])
    c, s = _handshake(a, b)
    assert c == ["hostb"]
    assert s == ["localhost", "127.0.0.1", "::1"]


@pytest.mark.parametrize("client, server, authz, name, client_says, server_says", [
    # the source's CA does not know the destination: it refuses first
    ("rogue/localhost", "ca/hostb", (), "hostb", "destination's certificate was rejected",
     "the source rejected our certificate"),
    # the source trusts the destination, but its own certificate is another CA's
    ("mixed", "ca/hostb", (), "hostb", "the destination rejected our certificate",
     "source's certificate was rejected"),
    # a good certificate, but not one the destination admits
    ("ca/localhost", "ca/hostb", ("hostc",), "hostb", "not in the destination's tls-authz",
     "not in the destination's tls-authz"),
    # the destination's certificate does not name the host connected to
    ("ca/localhost", "ca/hostb", (), "127.0.0.1", "--tls-hostname",
     "the source rejected our certificate"),
])
def test_the_wrong_peer_is_refused_in_one_line_on_both_sides(
        pkidir: Path, client: str, server: str, authz: tuple[str, ...], name: str,
        client_says: str, server_says: str) -> None:
    c, s = _handshake(TlsCreds.load(pkidir / client), TlsCreds.load(pkidir / server, authz),
                      name)
    assert isinstance(c, str) and isinstance(s, str), (c, s)
    _one_line(c)
    _one_line(s)
    assert client_says in c, c
    assert server_says in s, s


def test_a_handshake_is_bounded_as_a_whole(pkidir: Path) -> None:
    """A client that trickles its ClientHello a byte at a time cannot stretch the
    server's handshake past the socket's timeout (each byte would reset a per-call one)."""
    srv = socket.create_server(("127.0.0.1", 0))
    sock = socket.create_connection(srv.getsockname(), timeout=5.0)
    conn, _ = srv.accept()
    conn.settimeout(1.0)
    stop = threading.Event()

    def trickle() -> None:
        for b in b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 10:
            if stop.wait(0.3):  # a slow client, on purpose
                return
            try:
                sock.send(bytes([b]))
            except OSError:
                return

    t = threading.Thread(target=trickle)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(TlsError, match="timed out"):
        server_wrap(conn, TlsCreds.load(pkidir / "ca" / "hostb"))
    assert time.monotonic() - t0 < 2.5
    stop.set()
    t.join(5)
    sock.close()
    srv.close()


# -- bad credentials: named before any work -----------------------------------------------
def test_bad_tls_creds_are_named_before_work_starts(pkidir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in FILES:
        (broken / f).write_bytes((pkidir / "ca" / "hostb" / f).read_bytes())
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ca-cert.pem").write_bytes((pkidir / "ca" / "ca-cert.pem").read_bytes())
    (broken / "server-cert.pem").write_text("not a certificate\n")
    cases = [
        (["migrate", "--tls-creds", str(tmp_path / "nowhere")], "not a directory"),
        (["migrate", "--tls-creds", str(partial)], "missing server-cert.pem"),
        (["migrate", "--tls-creds", str(broken)], "server-cert.pem"),
        (["migrate", "--tls-authz", "x"], "need --tls-creds"),
        (["vm", "--incoming", "tcp:127.0.0.1:0", "--tls-creds", str(partial)],
         "missing server-cert.pem"),
        (["resolve", "tcp:127.0.0.1:1", "--keep", "--tls-creds", str(partial)],
         "missing server-cert.pem"),
    ]
    for args, words in cases:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "cvmig", *args], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        err = r.stderr.strip().splitlines()[-1]
        assert words in err and "Traceback" not in r.stderr, (args, r.stderr)
        assert "QEMU's x509 layout" in err or "need --tls-creds" in err
        assert time.monotonic() - t0 < 20  # no guest was booted, nothing was waited for


# -- whole migrations ----------------------------------------------------------------------
def test_a_migration_over_tls_completes_and_verifies(pkidir: Path, host: Host) -> None:
    dst_creds = TlsCreds.load(pkidir / "ca" / "hostb", authz=["localhost"])
    dest = DestinationProcess(extra=tls_args(dst_creds))
    try:
        vm = _boot(host)
        out = migrate_out(vm, dest.uri, MigrationParams(), io_timeout=20,
                          tls=TlsCreds.load(pkidir / "ca" / "localhost", hostname="hostb"))
        assert out.source_digest and out.confirm.get("digest") == out.source_digest
        ev = dest.result()
        assert ev["event"] == "migrated", ev
        assert ev["report"]["check"]["ok"], ev
    finally:
        dest.close()


def _tls_listener(creds: TlsCreds, timeout: float = 5.0) -> tuple[Listener, list[str]]:
    notes: list[str] = []
    return Listener(listen("127.0.0.1", 0), timeout, notes.append, tls=creds), notes


@pytest.mark.parametrize("source, authz, source_says, dest_says", [
    ("rogue/localhost", (), "destination's certificate was rejected",
     "the source rejected our certificate"),
    ("ca/localhost", ("hostc",), "not in the destination's tls-authz",
     "not in the destination's tls-authz"),
])
def test_a_refused_source_keeps_its_guest_running(
        pkidir: Path, host: Host, source: str, authz: tuple[str, ...], source_says: str,
        dest_says: str) -> None:
    front, notes = _tls_listener(TlsCreds.load(pkidir / "ca" / "hostb", authz))
    with front:
        vm = _boot(host)
        try:
            with pytest.raises(MigrationFailed) as e:
                migrate_out(vm, f"tcp:127.0.0.1:{front.port}", MigrationParams(),
                            io_timeout=10,
                            tls=TlsCreds.load(pkidir / source, hostname="hostb"))
            _one_line(str(e.value))
            assert source_says in str(e.value), e.value
            _still_running(vm)
            deadline = time.monotonic() + 5
            while not notes:
                assert time.monotonic() < deadline, "the destination said nothing"
                time.sleep(0.01)  # the vetting thread notes it as it ends
            _one_line(notes[0])
            assert dest_says in notes[0], notes
            assert front.take(timeout=0) is None  # nothing reached the migration
        finally:
            vm.shutdown()


def test_a_plaintext_source_is_refused_and_delays_no_real_migration(
        pkidir: Path, host: Host) -> None:
    # a handshake timeout far longer than the migration: were the handshakes served one
    # at a time, the slow clients opened first would hold the real source up for 30 s
    dest = DestinationProcess(extra=[*tls_args(TlsCreds.load(pkidir / "ca" / "hostb")),
                                     "--handshake-timeout", "30"])
    port = dest.port
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)
    trickle = socket.create_connection(("127.0.0.1", port), timeout=5)
    trickle.sendall(b"\x16")  # the first byte of a ClientHello, then nothing
    plain = Channel(socket.create_connection(("127.0.0.1", port), timeout=5))
    plain.send_json(FrameType.HELLO, HELLO)
    try:
        with pytest.raises(RemoteError) as e:
            plain.expect(FrameType.HELLO)
        assert e.value.message == NEEDS_TLS_MESSAGE
        vm = _boot(host)
        t0 = time.monotonic()
        migrate_out(vm, dest.uri, MigrationParams(), io_timeout=20,
                    tls=TlsCreds.load(pkidir / "ca" / "localhost", hostname="hostb"))
        assert time.monotonic() - t0 < 20
        assert dest.result()["event"] == "migrated"
    finally:
        for s in (idle, trickle, plain.sock):
            s.close()
        dest.close()


def test_a_plaintext_source_is_told_in_one_line(pkidir: Path) -> None:
    """What `cvmig migrate` prints when it forgets --tls-creds."""
    dest = DestinationProcess(extra=tls_args(TlsCreds.load(pkidir / "ca" / "hostb")))
    try:
        r = subprocess.run([sys.executable, "-m", "cvmig", "migrate", "--to", dest.uri,
                            "-m", "16M", "--vcpus", "1", "-w", "idle", "--warmup", "0", "-q"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        first = r.stderr.strip().splitlines()[0]
        assert "requires TLS" in first and "--tls-creds" in first, r.stderr
        assert "kept running on the source" in r.stderr
    finally:
        dest.close()


def test_qmp_tls_parameters(pkidir: Path, tmp_path: Path) -> None:
    """migrate-set-parameters checks tls-creds when set (a directory here, QEMU takes an
    object id) and reports the values back; null resets them."""
    from cvmig.monitor.testing import RawQMP, VmProcess

    dst = VmProcess(str(tmp_path / "d.sock"), ["--incoming", "tcp:127.0.0.1:0"])
    try:
        with RawQMP(dst.qmp_path) as q:
            r = q.cmd("migrate-set-parameters", {"tls-creds": str(tmp_path / "nowhere")})
            desc = r["error"]["desc"]
            _one_line(desc)
            assert "tls-creds" in desc and "not a directory" in desc, r
            assert q.ok("query-migrate-parameters")["tls-creds"] == ""
            q.ok("migrate-set-parameters", {"tls-creds": str(pkidir / "ca" / "hostb"),
                                            "tls-authz": "localhost"})
            params = q.ok("query-migrate-parameters")
            assert params["tls-creds"] == str(pkidir / "ca" / "hostb")
            assert params["tls-authz"] == "localhost"
        # the listener now requires TLS: a plaintext source is told so
        plain = Channel(socket.create_connection(("127.0.0.1", dst.port), timeout=5))
        plain.send_json(FrameType.HELLO, HELLO)
        with pytest.raises(RemoteError, match="requires TLS"):
            plain.expect(FrameType.HELLO)
        plain.close()
    finally:
        dst.close()


def test_the_listener_hands_on_the_hello_it_read(pkidir: Path) -> None:
    """Over TLS the HELLO cannot be peeked: the listener reads it and puts it back, so the
    migration reads it as if untouched."""
    front, _ = _tls_listener(TlsCreds.load(pkidir / "ca" / "hostb"))
    with front:
        raw = socket.create_connection(("127.0.0.1", front.port), timeout=5)
        tls = client_wrap(raw, TlsCreds.load(pkidir / "ca" / "localhost"), "hostb")
        ch = Channel(tls)
        ch.send_json(FrameType.HELLO, HELLO)
        ch.send(FrameType.PAGE_STATE, b"x" * 100_000)  # more behind it, same stream
        conn = front.take(timeout=5)
        assert conn is not None
        theirs = Channel(conn)
        assert theirs.expect(FrameType.HELLO).json() == HELLO
        f = theirs.recv_frame(max_data=0)
        assert f.type is FrameType.PAGE_STATE and f.meta == b"x" * 100_000
        theirs.close()
        ch.close()


def test_qmp_migrates_over_tls_and_a_wrong_identity_fails(pkidir: Path, tmp_path: Path) -> None:
    """Both sides' tls-* set through QMP: a source the destination's tls-authz does not
    name fails with the reason in query-migrate and keeps running; named, it migrates."""
    from cvmig.monitor.testing import RawQMP, VmProcess

    dst = VmProcess(str(tmp_path / "d.sock"), ["--incoming", "tcp:127.0.0.1:0",
                                               "--tls-creds", str(pkidir / "ca" / "hostb"),
                                               "--tls-authz", "hostc"])
    try:
        src = VmProcess(str(tmp_path / "s.sock"), ["--memory", "16M", "--vcpus", "1",
                                                   "--workload", "dirtier:rate=1000"])
    except BaseException:
        dst.close()
        raise
    try:
        with RawQMP(src.qmp_path) as s, RawQMP(dst.qmp_path) as d:
            assert d.ok("query-migrate-parameters")["tls-authz"] == "hostc"
            s.ok("migrate-set-parameters", {"tls-creds": str(pkidir / "ca" / "localhost"),
                                            "tls-hostname": "hostb"})
            uri = f"tcp:127.0.0.1:{dst.port}"
            s.ok("migrate", {"uri": uri})
            info = s.poll("query-migrate", lambda i: i.get("status") in ("completed", "failed"),
                          timeout=60)
            assert info["status"] == "failed", info
            _one_line(info["error-desc"])
            assert "tls-authz" in info["error-desc"], info
            assert s.ok("query-status")["running"]
            d.ok("migrate-set-parameters", {"tls-authz": "hostc,localhost"})
            s.ok("migrate", {"uri": uri})
            info = s.poll("query-migrate", lambda i: i.get("status") in ("completed", "failed"),
                          timeout=60)
            assert info["status"] == "completed", info
            d.poll("query-status", lambda st: st["running"], timeout=30)
    finally:
        src.close()
        dst.close()


def test_a_second_tls_source_is_told_the_destination_is_busy(pkidir: Path) -> None:
    """The busy refusal goes out over TLS, to a source that passed the TLS checks."""
    front, _ = _tls_listener(TlsCreds.load(pkidir / "ca" / "hostb"))
    client = TlsCreds.load(pkidir / "ca" / "localhost")
    with front:
        first = Channel(client_wrap(socket.create_connection(("127.0.0.1", front.port),
                                                             timeout=5), client, "hostb"))
        first.send_json(FrameType.HELLO, HELLO)
        taken = front.take(timeout=5)
        assert taken is not None
        second = Channel(client_wrap(socket.create_connection(("127.0.0.1", front.port),
                                                              timeout=5), client, "hostb"))
        second.send_json(FrameType.HELLO, HELLO)
        with pytest.raises(RemoteError, match="busy"):
            second.expect(FrameType.HELLO)
        second.close()
        taken.close()
        first.close()


def test_a_tls_source_to_a_plaintext_destination_is_told_in_one_line(pkidir: Path) -> None:
    notes: list[str] = []
    with Listener(listen("127.0.0.1", 0), 5.0, notes.append) as front:
        raw = socket.create_connection(("127.0.0.1", front.port), timeout=5)
        with pytest.raises(TlsError) as e:
            client_wrap(raw, TlsCreds.load(pkidir / "ca" / "localhost"), "localhost")
        _one_line(str(e.value))
        assert "does the destination use --tls-creds" in str(e.value), e.value
        deadline = time.monotonic() + 5
        while not notes:
            assert time.monotonic() < deadline, "the destination said nothing"
            time.sleep(0.01)  # the vetting thread notes it as it ends
        assert "a TLS client, but this destination has no --tls-creds" in notes[0], notes


@pytest.mark.parametrize("stage", ["handshake", "hello"])
def test_a_cancel_ends_a_tls_wait_within_a_second(pkidir: Path, host: Host, stage: str) -> None:
    """A destination that stops answering in the middle of the TLS handshake, or after it
    (no HELLO): a cancel ends the wait within a second, through the TLS socket too, and
    the guest runs on at the source."""
    server_creds = TlsCreds.load(pkidir / "ca" / "hostb")
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    vm = _boot(host)
    cancel = threading.Event()
    t, errors = migrate_in_background(
        vm, f"tcp:127.0.0.1:{port}", cancel.is_set,
        tls=TlsCreds.load(pkidir / "ca" / "localhost", hostname="hostb"))
    conn: socket.socket | None = None
    try:
        conn, _ = srv.accept()
        conn.settimeout(10)
        if stage == "hello":  # the handshake completes; then nothing more comes
            conn = server_wrap(conn, server_creds)
        else:  # the ClientHello is read and never answered
            assert conn.recv(1, socket.MSG_PEEK)
        cancel_within_a_second(cancel, t, errors)
        _still_running(vm)
    finally:
        cancel.set()
        t.join(20)
        if conn is not None:
            conn.close()
        srv.close()
        vm.shutdown()
