"""The destination's front door: accept connections, find the real source among them.

A destination listens on a TCP port anyone can reach. One connection at a time would let
an idle or a trickling client hold up a real migration, so each connection's handshake is
served on a thread of its own, bounded by ``handshake_timeout`` (default 5 s): it must
send a valid HELLO of a cvmig source — header, CRC and JSON, ``"role": "source"`` — within
that time, or it is dropped. The HELLO is only *peeked* (``MSG_PEEK``): it stays in the
socket for `cvmig.migration.destination.migrate_in`, which runs the handshake itself.
This relies on the source speaking first, as it does: it sends its HELLO on connecting,
before it reads the destination's.

The first valid source is handed to the caller (`Listener.take`), which marks the
listener busy until `Listener.idle`; a source that arrives meanwhile is refused with an
ERROR frame saying the destination is busy, and the migration in progress is unaffected.
A peer that speaks cvmig's framing but not this version is told why in an ERROR frame;
anything else is dropped without a word.

With TLS credentials (``tls``, `cvmig.wire.tls`) the whole TLS handshake, certificate and
``tls-authz`` checks included, happens inside the same bounded vetting, on the
connection's own thread: a slow or plaintext client cannot delay a real migration. A TLS
stream cannot be peeked, so the HELLO is read and put back (`cvmig.wire.tls.TlsSocket`).
A cvmig source that connects in plaintext is told, in a plaintext ERROR frame, that this
destination requires TLS; a client whose certificate is refused learns why from the TLS
layer (`cvmig.wire.tls.client_wrap`).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable

from cvmig.wire.channel import Channel, PeerGone, shutdown
from cvmig.wire.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    FrameType,
    Header,
    ProtocolError,
    check_meta,
    decode_header,
    parse_json,
)
from cvmig.wire.tls import TlsCreds, TlsError, TlsSocket, is_tls_hello, recv_exact, server_wrap

HANDSHAKE_TIMEOUT_S = 5.0
MAX_HELLO_META = 64 << 10  # a HELLO is a small JSON object
BUSY_MESSAGE = "is busy with another incoming migration; try again when it is done"
NEEDS_TLS_MESSAGE = ("requires TLS: connect with --tls-creds (a certificate from the "
                     "destination's CA)")
_ACCEPT_POLL_S = 0.2  # how soon close() is noticed by the accept thread


class Listener:
    """Accepts on ``srv`` and vets each connection's HELLO concurrently (see module)."""

    def __init__(self, srv: socket.socket, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 note: Callable[[str], None] | None = None,
                 tls: TlsCreds | None = None) -> None:
        if handshake_timeout <= 0:
            raise ValueError(f"handshake timeout must be > 0 s, got {handshake_timeout}")
        self.srv = srv
        self.handshake_timeout = handshake_timeout
        self.tls = tls
        self._note = note or (lambda msg: None)
        self._cond = threading.Condition()
        self._ready: deque[socket.socket] = deque()
        self._decisions: deque[socket.socket] = deque()  # for a guest held in doubt
        self._busy = False
        self._closed = False
        self.dropped = 0  # connections that did not complete the handshake in time
        self.refused = 0  # sources refused because a migration was in progress
        self._thread = threading.Thread(target=self._accept_loop, name="cvmig-listener",
                                        daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.srv.getsockname()[1])

    # -- the caller's side -------------------------------------------------------------
    def take(self, timeout: float | None = None) -> socket.socket | None:
        """The next connection whose HELLO is a valid source's, or None after ``timeout``
        seconds (or once closed). The listener is busy from now until `idle`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._ready and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            if self._closed:
                return None
            conn = self._ready.popleft()
            self._busy = True
            late = list(self._ready)
            self._ready.clear()
        for other in late:  # arrived together with the one taken: it came first
            threading.Thread(target=self._refuse, args=(other, BUSY_MESSAGE),
                             name="cvmig-refuse", daemon=True).start()
        return conn

    def take_decision(self, timeout: float) -> socket.socket | None:
        """The next connection that carries a decision for a guest held in doubt (from
        its source, or `cvmig resolve`), its HELLO still unread; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._decisions and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._decisions.popleft() if self._decisions else None

    def idle(self) -> None:
        """The migration handed out by `take` is over: the next source may come in."""
        with self._cond:
            self._busy = False
            late = list(self._decisions)
            self._decisions.clear()
        for c in late:  # decisions for a migration that ended without needing them
            threading.Thread(target=self._refuse, args=(c, "holds no guest in doubt"),
                             name="cvmig-refuse", daemon=True).start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            ready = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()
        for c in ready:
            c.close()
        self._thread.join(2 * _ACCEPT_POLL_S + 1.0)
        with contextlib.suppress(OSError):
            self.srv.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accepting and vetting ---------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                r, _, _ = select.select([self.srv], [], [], _ACCEPT_POLL_S)
                if not r:
                    continue
                conn, peer = self.srv.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(_ACCEPT_POLL_S)  # e.g. out of descriptors: try again shortly
                continue
            threading.Thread(target=self._vet, args=(conn, peer), name="cvmig-handshake",
                             daemon=True).start()

    def _vet(self, conn: socket.socket, peer: object) -> None:
        hello: dict[str, object] = {}
        deadline = time.monotonic() + self.handshake_timeout
        try:
            conn.settimeout(None)  # our waits are select()s with the deadline
            tls = self.tls  # QMP may change it at any time: it applies per connection
            if tls is None:
                why = _await_source_hello(conn, deadline, self.handshake_timeout, hello)
            else:
                conn, why = _await_tls_source(conn, tls, deadline,
                                              self.handshake_timeout, hello)
        except _PlaintextSource:
            self.dropped += 1
            self._note(f"refused plaintext connection from {_addr(peer)}: this destination "
                       "requires TLS")
            self._refuse(conn, NEEDS_TLS_MESSAGE)
            return
        except TlsError as e:
            self.dropped += 1
            self._note(f"refused connection from {_addr(peer)}: {e}")
            return  # server_wrap closed it, and told the client why where it could
        except OSError as e:
            why = f"connection failed: {e.strerror or e}"
        except ProtocolError as e:
            if isinstance(e, _TlsProtocolError):
                conn = e.conn
            self._refuse(conn, f"protocol error: {e}")  # a cvmig peer: tell it why
            self._note(f"refused connection from {_addr(peer)}: {e}")
            return
        if why is not None:
            self.dropped += 1
            self._note(f"dropped connection from {_addr(peer)}: {why}")
            conn.close()
            return
        with self._cond:
            if self._closed:
                conn.close()
                return
            if "decision" in hello:
                if self._busy:  # for the migration in progress: it is, or will be, in doubt
                    self._decisions.append(conn)
                    self._cond.notify_all()
                    return
                message = "holds no guest in doubt: there is nothing to decide"
            elif not self._busy:
                self._ready.append(conn)
                self._cond.notify_all()
                return
            else:
                message = BUSY_MESSAGE
            self.refused += 1
        self._note(f"refused {_addr(peer)}: {message}")
        self._refuse(conn, message)

    def _refuse(self, conn: socket.socket, message: str) -> None:
        """Say why in an ERROR frame and close without a reset: what the peer sent is read
        first, so that it reads our reason rather than ECONNRESET."""
        try:
            _drain(conn)
            conn.settimeout(1.0)
            Channel(conn).send_json(FrameType.ERROR, {"message": message})
            shutdown(conn, socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and conn.recv(65536):
                pass  # until the peer has read it and closed (its CANCEL, then EOF)
        except (OSError, PeerGone):
            pass
        finally:
            conn.close()


def _await_source_hello(conn: socket.socket, deadline: float, timeout: float,
                        hello_out: dict[str, object] | None = None) -> str | None:
    """Wait for a whole HELLO frame from a source, peeked, not read; None when it is there,
    else why the connection is not a source. ProtocolError: a cvmig peer of another
    version (or a broken one) that deserves an answer."""
    need = HEADER_SIZE
    header = None
    seen = -1
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"no handshake within {timeout:g} s"
            # wake only when the bytes we need are there (or at end of file)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            if not select.select([conn], [], [], left)[0]:
                continue
            try:
                data = conn.recv(need, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue  # woken early: look again
            if not data:
                return "closed before its handshake"
            if len(data) < need:
                if len(data) == seen:  # end of file after a partial frame: wait it out
                    time.sleep(0.02)
                seen = len(data)
                continue
            if header is None:
                header = _hello_header(data)
                if header is None:
                    if is_tls_hello(data):
                        return "a TLS client, but this destination has no --tls-creds"
                    return "not a cvmig stream"
                need = HEADER_SIZE + header.meta_len
                seen = -1
                continue
            _check_hello(header, data[HEADER_SIZE:need], hello_out)
            return None
    finally:
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


class _PlaintextSource(Exception):
    """A cvmig source spoke in plaintext to a destination that requires TLS."""


class _TlsProtocolError(ProtocolError):
    """A ProtocolError from a peer vetted over TLS: answer it on ``conn``, its TLS socket."""

    def __init__(self, conn: socket.socket, message: str) -> None:
        super().__init__(message)
        self.conn = conn


def _await_tls_source(conn: socket.socket, creds: TlsCreds, deadline: float, timeout: float,
                      hello_out: dict[str, object]) -> tuple[socket.socket, str | None]:
    """The TLS handshake, then a whole HELLO from a source, read and put back, all by
    ``deadline``: (the TLS socket, None), or (the connection, why it is not a source).
    Raises _PlaintextSource, TlsError (the handshake or the checks failed: closed), or
    _TlsProtocolError (a cvmig peer to answer, over its TLS socket)."""
    first = b""
    while len(first) < 2:  # the first bytes tell TLS from plaintext
        left = deadline - time.monotonic()
        if left <= 0:
            return conn, f"no handshake within {timeout:g} s"
        if not select.select([conn], [], [], left)[0]:
            continue
        try:
            data = conn.recv(2, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        if not data:
            return conn, "closed before its handshake"
        if len(data) == len(first):
            time.sleep(0.02)  # one byte so far and end of file: wait it out, bounded
        first = data
    if first == HEADER.pack(MAGIC, 0, 0, 0, 0, 0, 0)[:2]:
        raise _PlaintextSource
    if not is_tls_hello(first):
        return conn, "not a cvmig stream (nor TLS)"
    conn.settimeout(max(0.001, deadline - time.monotonic()))  # bounds the whole handshake
    tconn = server_wrap(conn, creds)
    assert isinstance(tconn, TlsSocket)
    try:
        raw = recv_exact(tconn, HEADER_SIZE, deadline)
        header = _hello_header(raw)
        if header is None:
            tconn.close()
            return conn, "not a cvmig stream inside TLS"
        meta = recv_exact(tconn, header.meta_len, deadline) if header.meta_len else b""
        _check_hello(header, meta, hello_out)
    except ProtocolError as e:
        raise _TlsProtocolError(tconn, str(e)) from None
    except (TlsError, EOFError, OSError) as e:
        tconn.close()
        why = "closed before its HELLO" if isinstance(e, EOFError) else str(e)
        return conn, f"after TLS: {why}"
    tconn.unread(raw + meta)  # migrate_in reads the HELLO again
    return tconn, None


def _hello_header(data: bytes) -> Header | None:
    """A HELLO's header from a stream's first HEADER_SIZE bytes; None: not cvmig at all.
    ProtocolError: a cvmig peer of another version, or not a HELLO."""
    if HEADER.unpack_from(data)[0] != MAGIC:
        return None
    header = decode_header(data[:HEADER_SIZE])  # ProtocolError: wrong version
    if header.type is not FrameType.HELLO:
        raise ProtocolError(f"expected HELLO, got {header.type.name}")
    if header.data_len or header.meta_len > MAX_HELLO_META:
        raise ProtocolError("HELLO frame of an impossible size")
    return header


def _check_hello(header: Header, meta: bytes, hello_out: dict[str, object] | None) -> None:
    check_meta(header, meta)
    hello = parse_json(header, meta)
    if hello.get("role") not in ("source", "operator"):
        raise ProtocolError("peer is not a cvmig source")
    if hello.get("role") == "operator" and "decision" not in hello:
        raise ProtocolError("an operator's connection must carry a decision")
    if hello_out is not None:
        hello_out.update(hello)


def _drain(conn: socket.socket) -> None:
    """Read what the peer has sent so far (its HELLO), without waiting for more."""
    conn.setblocking(False)
    with contextlib.suppress(BlockingIOError, InterruptedError, ssl.SSLWantReadError):
        while conn.recv(65536):
            pass


def _addr(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
