"""The optional authenticated, encrypted channel: mutual TLS 1.3 with X.509 certificates.

Credentials use QEMU's ``tls-creds-x509`` directory layout, so one directory per host
serves both roles::

    DIR/ca-cert.pem                          the CA that signed every host's certificates
    DIR/server-cert.pem  DIR/server-key.pem  this host as a destination (TLS server)
    DIR/client-cert.pem  DIR/client-key.pem  this host as a source (TLS client)

Both sides present a certificate and check the peer's against ``ca-cert.pem``. The source
also checks that the destination's certificate names the host it connects to (or
``hostname``, QEMU's ``tls-hostname``); the destination checks that the source's
certificate names one of ``authz`` (its CN or a DNS/IP subject alternative name; QEMU's
``tls-authz``, here a list of identities rather than an object id), any if empty.

After the handshake the server sends a one-byte verdict (and why, if it refuses), so a
source whose certificate the destination rejects learns it in `client_wrap`, as a
`TlsError`, rather than later as a broken stream: in TLS 1.3 the client's handshake ends
before the server has judged the client's certificate.

The handshake and the verdict are bounded as a whole by the socket's timeout (a peer that
trickles bytes cannot stretch it). The server sends no session tickets: after the
handshake nothing but application data flows. One thread may read while another writes
(the migration's sender and its ACK reader do): `TlsSocket` serialises the TLS calls.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
FILES = (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)
LAYOUT = ("expected QEMU's x509 layout: " + ", ".join(FILES)
          + " (create a test CA and host certificates with `cvmig pki DIR`)")
DEFAULT_TIMEOUT_S = 10.0  # for a socket without a timeout: a handshake is always bounded
TLS_FIRST_BYTE = 0x16  # a TLS record carrying a handshake (the ClientHello)

T = TypeVar("T")
_OK, _REFUSED = 0, 1
_MAX_REASON = 255


class TlsError(Exception):
    """A TLS handshake or check failed; the message says what and what to do."""


class TlsSocket(ssl.SSLSocket):
    """A TLS socket that one thread may read while another writes, and that can be handed
    on with bytes already read put back.

    OpenSSL does not allow one connection's SSL_read and SSL_write to run at the same
    time, and the migration reads and writes each connection from two threads (pages
    one way, acknowledgements the other). So every TLS operation here runs non-blocking,
    one at a time under a lock, and the waiting for the socket happens outside the lock,
    bounded by the timeout the caller set (``settimeout`` keeps the descriptor
    non-blocking and only records it).

    `unread`: the destination's listener reads a source's HELLO to vet it (a TLS stream
    cannot be peeked), and the migration then reads it again from here."""

    _unread = b""
    _timeout: float | None = None  # the caller's; the descriptor itself stays non-blocking
    _lock: threading.Lock

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> TlsSocket:
        self = super()._create(*args, **kwargs)  # type: ignore[misc]
        self._lock = threading.Lock()
        return self

    def settimeout(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = value
        super().settimeout(0.0)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def _io(self, op: Callable[[], T], what: str) -> T:
        timeout = self._timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                try:
                    return op()
                except ssl.SSLWantReadError:
                    if timeout == 0:
                        raise
                    rd = True
                except ssl.SSLWantWriteError:
                    if timeout == 0:
                        raise
                    rd = False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"The {what} operation timed out")
            fd = self.fileno()
            if fd < 0:  # closed by another thread while we waited: as a plain socket says
                raise OSError(errno.EBADF, "the TLS connection is closed")
            select.select([fd] if rd else [], [] if rd else [fd], [], left)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        if not self._unread:
            return self._io(partial(super().recv_into, buffer, nbytes, flags), "read")
        view = memoryview(buffer).cast("B")
        n = min(nbytes or len(view), len(view), len(self._unread))
        view[:n] = self._unread[:n]
        self._unread = self._unread[n:]
        return n

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if not self._unread:
            return self._io(partial(super().recv, buflen, flags), "read")
        data, self._unread = self._unread[:buflen], self._unread[buflen:]
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        return self._io(partial(super().send, data, flags), "write")

    def sendall(self, data: Any, flags: int = 0) -> None:
        with memoryview(data) as view, view.cast("B") as left:
            while left:
                n = self.send(left, flags)
                left = left[n:]

    def do_handshake(self, block: bool = False) -> None:
        self._io(super().do_handshake, "handshake")

    def pending(self) -> int:
        with self._lock:
            return len(self._unread) + super().pending()

    def unread(self, data: bytes) -> None:
        self._unread = bytes(data) + self._unread


@dataclass(frozen=True)
class TlsCreds:
    """A host's credential directory (see module) and whom it accepts."""

    directory: Path
    authz: tuple[str, ...] = ()  # allowed peer identities (CN/SAN); () = any our CA signed
    hostname: str | None = None  # the name the destination's certificate must carry

    @classmethod
    def load(cls, directory: str | Path, authz: Sequence[str] = (),
             hostname: str | None = None) -> TlsCreds:
        """Check the directory now, before any work: ValueError names what is wrong."""
        d = Path(directory).expanduser()
        if not d.is_dir():
            raise ValueError(f"--tls-creds {directory}: not a directory; {LAYOUT}")
        missing = [f for f in FILES if not (d / f).is_file()]
        if missing:
            raise ValueError(f"--tls-creds {directory}: missing {', '.join(missing)}; {LAYOUT}")
        names = tuple(a.strip() for a in authz)
        if any(not a for a in names):
            raise ValueError("--tls-authz: an empty identity; give NAME[,NAME...]")
        if hostname is not None and not hostname.strip():
            raise ValueError("--tls-hostname: empty")
        creds = cls(d.resolve(), names, hostname.strip() if hostname else None)
        # parse every file now, so a bad one is named here, not mid-migration
        creds._context(server=True)
        creds._context(server=False)
        return creds

    def _context(self, server: bool) -> ssl.SSLContext:
        cert, key = (SERVER_CERT, SERVER_KEY) if server else (CLIENT_CERT, CLIENT_KEY)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the server asks for a client cert
        if server:
            ctx.num_tickets = 0  # no post-handshake messages: see module
        ctx.sslsocket_class = TlsSocket
        try:
            ctx.load_verify_locations(cafile=str(self.directory / CA_CERT))
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"{self.directory / CA_CERT}: not a readable PEM CA "
                             f"certificate ({_reason(e)}); {LAYOUT}") from None
        try:
            ctx.load_cert_chain(str(self.directory / cert), str(self.directory / key))
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"{self.directory / cert} / {key}: not a readable PEM "
                             f"certificate and matching key ({_reason(e)}); {LAYOUT}") from None
        return ctx


def _begin(sock: socket.socket, creds: TlsCreds,
           server: bool) -> tuple[ssl.SSLContext, float | None, float]:
    """A handshake's context, ``sock``'s timeout (restored after it) and the deadline
    that bounds the handshake as a whole."""
    timeout = sock.gettimeout()
    deadline = time.monotonic() + (timeout or DEFAULT_TIMEOUT_S)
    try:
        ctx = creds._context(server=server)
    except ValueError as e:
        raise TlsError(str(e)) from None
    return ctx, timeout, deadline


def client_wrap(sock: socket.socket, creds: TlsCreds | None,
                server_hostname: str) -> socket.socket:
    """``sock`` itself without creds; else a mutually authenticated TLS 1.3 client socket,
    handshake done and the server's verdict heard, within ``sock``'s timeout."""
    if creds is None:
        return sock
    name = creds.hostname or server_hostname
    ctx, timeout, deadline = _begin(sock, creds, server=False)
    ctx.check_hostname = True
    tls = ctx.wrap_socket(sock, server_hostname=name, do_handshake_on_connect=False)
    try:
        _bounded(tls, tls.do_handshake, deadline)
        verdict = recv_exact(tls, 2, deadline)
        if verdict[0] != _OK:
            why = recv_exact(tls, verdict[1], deadline).decode("utf-8", "replace")
            raise TlsError(f"TLS: the destination refused us: {why}")
    except ssl.SSLCertVerificationError as e:
        tls.close()
        what = (e.verify_message or _reason(e)).rstrip(".")
        hint = ("its certificate does not name "
                f"{name!r}: pass --tls-hostname NAME (the name in its certificate)"
                if "hostname" in what.lower() or "ip address" in what.lower()
                else "are both hosts' certificates signed by the same CA (ca-cert.pem)?")
        raise TlsError(f"TLS: the destination's certificate was rejected ({what}); {hint}") \
            from None
    except ssl.SSLError as e:
        tls.close()
        what = ("the destination rejected our certificate" if _is_alert(e)
                else "the destination does not speak TLS as we do")
        raise TlsError(f"TLS handshake failed: {what} ({_reason(e)}); check that both sides "
                       f"use --tls-creds with certificates from the same CA") from None
    except (OSError, EOFError) as e:
        tls.close()
        raise TlsError(f"TLS handshake failed: {_reason(e)}; does the destination use "
                       f"--tls-creds?") from None
    except TlsError:
        tls.close()
        raise
    tls.settimeout(timeout)
    return tls


def server_wrap(sock: socket.socket, creds: TlsCreds | None) -> socket.socket:
    """``sock`` itself without creds; else a TLS 1.3 server socket, handshake done, the
    client's certificate checked against our CA and ``creds.authz``, within ``sock``'s
    timeout. A refused client is told why before TlsError is raised here."""
    if creds is None:
        return sock
    ctx, timeout, deadline = _begin(sock, creds, server=True)
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        _bounded(tls, tls.do_handshake, deadline)
        ids = peer_identities(tls)
        if creds.authz and not set(ids) & set(creds.authz):
            who = ", ".join(ids) or "no name"
            why = (f"certificate identity {who} is not in the destination's tls-authz "
                   f"({', '.join(creds.authz)})")
            with contextlib.suppress(OSError, TlsError):
                reason = why.encode()[:_MAX_REASON]
                _send_all(tls, bytes([_REFUSED, len(reason)]) + reason, deadline)
            tls.close()
            raise TlsError(f"TLS: refused the source: {why}")
        _send_all(tls, bytes([_OK, 0]), deadline)
    except ssl.SSLCertVerificationError as e:
        tls.close()
        what = (e.verify_message or _reason(e)).rstrip(".")
        raise TlsError(f"TLS: the source's certificate was rejected ({what}); is it signed "
                       "by this host's CA (ca-cert.pem)?") from None
    except ssl.SSLError as e:
        tls.close()
        what = ("the source rejected our certificate" if _is_alert(e)
                else "the client does not speak TLS as we do")
        raise TlsError(f"TLS handshake failed: {what} ({_reason(e)})") from None
    except OSError as e:
        tls.close()
        raise TlsError(f"TLS handshake failed: {_reason(e)}") from None
    except TlsError:
        tls.close()
        raise
    tls.settimeout(timeout)
    return tls


def peer_identities(tls: socket.socket) -> list[str]:
    """The names the peer's (verified) certificate carries: CN, DNS and IP SANs; none
    for a plain socket."""
    if not isinstance(tls, ssl.SSLSocket):
        return []
    cert: dict[str, Any] = dict(tls.getpeercert() or {})
    names: list[str] = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(str(value))
    for kind, san in cert.get("subjectAltName", ()):
        if kind in ("DNS", "IP Address"):
            v = str(san).strip()
            with contextlib.suppress(ValueError):
                v = str(ipaddress.ip_address(v))  # Python spells IPv6 SANs its own way
            if v not in names:
                names.append(v)
    return names


def own_name(creds: TlsCreds) -> str | None:
    """The first name this host's server certificate carries (CN, else a SAN): what a
    client connecting to our own listener checks the name against."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate((creds.directory / SERVER_CERT).read_bytes())
    except (OSError, ValueError):
        return None
    for attr in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME):
        return str(attr.value)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in san:
        return str(name.value)
    return None


def is_tls_hello(first: bytes) -> bool:
    """Whether a stream's first bytes are a TLS ClientHello's record."""
    return len(first) >= 1 and first[0] == TLS_FIRST_BYTE


# -- bounded steps on a TLS socket --------------------------------------------------------
def _bounded(tls: ssl.SSLSocket, step: Callable[[], T], deadline: float) -> T:
    """Run a non-blocking TLS step until it completes, waiting at most until ``deadline``
    in total (a per-call timeout could be stretched by a peer that trickles bytes)."""
    tls.setblocking(False)
    try:
        while True:
            try:
                return step()
            except ssl.SSLWantReadError:
                want_write = False
            except ssl.SSLWantWriteError:
                want_write = True
            left = deadline - time.monotonic()
            if left <= 0:
                raise TlsError("TLS handshake timed out: the peer did not complete it in "
                               "time (is it a cvmig host using --tls-creds?)")
            r, w = ([], [tls]) if want_write else ([tls], [])
            select.select(r, w, [], left)
    finally:
        with contextlib.suppress(OSError):
            tls.setblocking(True)


def recv_exact(tls: ssl.SSLSocket, n: int, deadline: float) -> bytes:
    """Exactly ``n`` bytes, by ``deadline`` (TlsError) or end of file (EOFError)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = _bounded(tls, partial(tls.recv, n - len(buf)), deadline)
        if not chunk:
            raise EOFError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


def _send_all(tls: ssl.SSLSocket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        n = _bounded(tls, partial(tls.send, view), deadline)
        view = view[n:]


def _is_alert(e: ssl.SSLError) -> bool:
    """The peer sent a TLS alert: it refused us (our certificate, mostly)."""
    return "ALERT" in str(e.reason or "")


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).replace("_", " ").lower()
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
