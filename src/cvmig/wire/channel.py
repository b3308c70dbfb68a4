"""One migration channel over a TCP socket: frames out with scatter-gather, frames in
straight into the caller's buffers.

The socket may be a TLS one (`cvmig.wire.tls`): an ``ssl.SSLSocket`` has no ``sendmsg``,
so a frame's small buffers (header, metadata) are joined and every buffer goes out with
``sendall`` (no copy in Python; the encryption is the copy), bytes may wait decrypted in
the SSL object where ``select`` cannot see them (`Channel.wait_readable` looks there
first), and a shutdown must leave the SSL object in place (`shutdown`)."""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from cvmig.wire.frames import (
    HEADER_SIZE,
    FrameType,
    Header,
    ProtocolError,
    check_meta,
    decode_header,
    encode_header,
    json_meta,
    parse_json,
)

_IOV_MAX = 1024
_COALESCE = 4096  # over TLS, buffers smaller than this are joined, to fill TLS records


class PeerGone(ConnectionError):
    """The peer closed the connection or it broke."""


@dataclass
class Frame:
    header: Header
    meta: bytes

    @property
    def type(self) -> FrameType:
        return self.header.type

    def json(self) -> dict[str, object]:
        return parse_json(self.header, self.meta)


class Channel:
    """Frames over a connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- sending ------------------------------------------------------------------------
    def send(
        self,
        ftype: FrameType,
        meta: bytes | memoryview | Sequence[bytes | memoryview] = b"",
        data: Sequence[memoryview | bytes] = (),
    ) -> int:
        """Send one frame; ``meta`` (one buffer or several) and ``data`` buffers go out as
        they are, without being copied."""
        metas = [meta] if isinstance(meta, bytes | bytearray | memoryview) else list(meta)
        data_len = sum(memoryview(d).nbytes for d in data)
        bufs: list[bytes | memoryview] = [encode_header(ftype, metas, data_len)]
        bufs.extend(m for m in metas if memoryview(m).nbytes)
        bufs.extend(d for d in data if memoryview(d).nbytes)
        total = sum(memoryview(b).nbytes for b in bufs)
        if self.tls:
            self._sendall_tls(bufs)
        else:
            self._sendmsg_all(bufs, total)
        self.bytes_sent += total
        return total

    def send_json(self, ftype: FrameType, obj: object, data: Sequence[memoryview | bytes] = ()) -> int:
        return self.send(ftype, json_meta(obj), data)

    def _sendmsg_all(self, bufs: list[bytes | memoryview], total: int) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        left = total
        try:
            while left:
                n = self.sock.sendmsg(views[:_IOV_MAX])
                left -= n
                while n:
                    head = views[0]
                    if n >= len(head):
                        n -= len(head)
                        views.pop(0)
                    else:
                        views[0] = head[n:]
                        n = 0
        except (BrokenPipeError, ConnectionResetError) as e:
            raise PeerGone(f"peer closed the connection while sending: {e}") from None
        except TimeoutError:
            raise PeerGone("peer stopped reading (send timed out)") from None

    def _sendall_tls(self, bufs: list[bytes | memoryview]) -> None:
        """Each large buffer as it is; runs of small ones joined into one write (one TLS
        record rather than one per header)."""
        small: list[bytes | memoryview] = []
        try:
            for b in bufs:
                if memoryview(b).nbytes < _COALESCE:
                    small.append(b)
                    continue
                if small:
                    self.sock.sendall(b"".join(small))
                    small.clear()
                self.sock.sendall(b)
            if small:
                self.sock.sendall(b"".join(small))
        except (BrokenPipeError, ConnectionResetError) as e:
            raise PeerGone(f"peer closed the connection while sending: {e}") from None
        except TimeoutError:
            raise PeerGone("peer stopped reading (send timed out)") from None
        except ssl.SSLError as e:
            raise PeerGone(f"TLS connection failed while sending: {_ssl_reason(e)}") from None

    # -- receiving ----------------------------------------------------------------------
    def recv_into(self, buf: memoryview) -> None:
        """Fill ``buf`` exactly from the stream."""
        view = buf.cast("B") if buf.format != "B" else buf
        got = 0
        try:
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise PeerGone("peer closed the connection")
                got += n
        except ConnectionResetError as e:
            raise PeerGone(f"connection reset: {e}") from None
        except TimeoutError:
            raise PeerGone("peer went silent (receive timed out)") from None
        except ssl.SSLError as e:
            raise PeerGone(f"TLS connection failed: {_ssl_reason(e)}") from None
        self.bytes_received += got

    def recv_header(self) -> Header:
        raw = bytearray(HEADER_SIZE)
        self.recv_into(memoryview(raw))
        return decode_header(raw)

    def recv_meta(self, h: Header) -> bytes:
        meta = bytearray(h.meta_len)
        if h.meta_len:
            self.recv_into(memoryview(meta))
        check_meta(h, meta)
        return bytes(meta)

    def recv_frame(self, max_data: int = 0) -> Frame:
        """Receive a frame whose data (at most ``max_data`` bytes) is returned in meta's tail.

        For control frames; bulk frames use recv_header/recv_meta/recv_into directly.
        """
        h = self.recv_header()
        meta = self.recv_meta(h)
        if h.data_len > max_data:
            raise ProtocolError(f"unexpected {h.data_len} data bytes on a {h.type.name} frame")
        if h.data_len:
            data = bytearray(h.data_len)
            self.recv_into(memoryview(data))
            meta += bytes(data)
        return Frame(h, meta)

    def expect(self, *types: FrameType, max_data: int = 0) -> Frame:
        f = self.recv_frame(max_data)
        if f.type is FrameType.ERROR or f.type is FrameType.CANCEL:
            raise RemoteError(f.type, str(f.json().get("message", "no reason given")))
        if f.type not in types:
            names = " or ".join(t.name for t in types)
            raise ProtocolError(f"expected {names}, got {f.type.name}")
        return f

    def readable(self) -> bool:
        """Whether the peer has sent something (e.g. an ERROR) we have not read."""
        return self.wait_readable(0)

    def wait_readable(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` s until there is something to read (or end of file);
        over TLS, bytes already decrypted count (``select`` cannot see them)."""
        if self.tls and self.sock.pending():  # type: ignore[attr-defined]
            return True
        r, _, _ = select.select([self.sock], [], [], timeout)
        return bool(r)

    def close(self) -> None:
        try:
            shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def shutdown(sock: socket.socket, how: int) -> None:
    """``sock.shutdown(how)``, but a TLS socket keeps its SSL object (``SSLSocket.shutdown``
    drops it: what is sent afterwards would go out in plaintext, and what is read would be
    taken for plaintext). Wakes a thread blocked reading or writing, as for plain TCP."""
    socket.socket.shutdown(sock, how)


def _ssl_reason(e: ssl.SSLError) -> str:
    if e.reason:
        return str(e.reason).replace("_", " ").lower()
    return str(e)


class RemoteError(Exception):
    """The peer reported an error or cancelled."""

    def __init__(self, ftype: FrameType, message: str) -> None:
        self.ftype = ftype
        self.message = message
        who = "cancelled" if ftype is FrameType.CANCEL else "failed"
        super().__init__(f"peer {who}: {message}")


def parse_uri(uri: str) -> tuple[str, int]:
    """'tcp:HOST:PORT' -> (host, port), with a clear error otherwise."""
    if not uri.startswith("tcp:"):
        raise ValueError(f"migration URI must be tcp:HOST:PORT, got {uri!r}")
    host, sep, port = uri[4:].rpartition(":")
    if not sep or not host:
        raise ValueError(f"migration URI must be tcp:HOST:PORT, got {uri!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"port in {uri!r} must be a number, got {port!r}") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"port in {uri!r} must be 0..65535")
    return host, p
