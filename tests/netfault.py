"""Hostile networks on loopback, for failure tests.

`Relay` forwards bytes and can flip one byte or cut the stream at a byte offset.

`FrameProxy` is a man in the middle that parses cvmig's frames in both directions
(24-byte header, meta, data; see `cvmig.wire.frames`) and applies one `Fault` at a chosen
point of the stream: drop, duplicate, reorder, delay, corrupt a data byte, rewrite the
meta with a valid CRC, oversized length fields with a valid CRC, stall, close, or call a
function there (kill -9 a process at that frame). The point is a frame (direction, type,
occurrence) or a phase of the migration that is visible at the frame level:

- `At(S2D, PAGES, 0)`: the first page frame (the bulk round);
- `Iterative()`: the first page frame that carries a page an earlier one carried (the bulk
  round sends every page once, so this is the first iterative round);
- `BeforeVmsa()`: the last page frame before the first VMSA (the stop-and-copy round's,
  held back until the next frame shows it was the last);
- `At(D2S, CONFIRM, 0)`, `At(S2D, RELEASED, 0)`, ...: the end game.

Everything binds to 127.0.0.1 only. Every wait is bounded; `close` ends every thread.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cvmig.wire.frames import HEADER, HEADER_SIZE, MAGIC, FrameType

S2D = "s2d"  # source -> destination
D2S = "d2s"  # destination -> source

PAGES_HEAD = struct.Struct("<8sBxxxII")  # cvmig.wire.protocol.PagesFrame.HEAD


class Relay:
    """Forwards one connection to ``target``; source->destination bytes can be corrupted
    (one byte flipped at ``flip_at``) or the connection cut after ``cut_after`` bytes."""

    def __init__(self, target: tuple[str, int], *, flip_at: int | None = None,
                 cut_after: int | None = None) -> None:
        self.target = target
        self.flip_at = flip_at
        self.cut_after = cut_after
        self.forwarded = 0
        self.broken = threading.Event()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self.uri = f"tcp:127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        try:
            a, _ = self._srv.accept()
        except OSError:
            return  # closed before anyone connected
        b = socket.create_connection(self.target)
        for src, dst, forward in ((a, b, True), (b, a, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, forward), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if forward:
                    start = self.forwarded
                    end = start + len(data)
                    if self.flip_at is not None and start <= self.flip_at < end:
                        data[self.flip_at - start] ^= 0x5A
                        self.broken.set()
                    if self.cut_after is not None and end > self.cut_after:
                        dst.sendall(data[: self.cut_after - start])
                        self.broken.set()
                        break
                    self.forwarded = end
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._srv.close()


# -- frames ----------------------------------------------------------------------------------


@dataclass
class Frame:
    """One frame as it was read, with header fields that a fault may rewrite."""

    ftype: int
    meta_len: int
    data_len: int
    crc: int
    meta: bytes
    data: bytes
    version: int = 1
    seen: int = -1  # its entry in FrameProxy.log

    @property
    def name(self) -> str:
        try:
            return FrameType(self.ftype).name
        except ValueError:
            return f"type{self.ftype}"

    def is_(self, t: FrameType) -> bool:
        return self.ftype == int(t)

    def header(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.ftype, self.meta_len, self.data_len,
                           self.crc, 0)

    def wire(self) -> list[bytes]:
        return [self.header(), self.meta, self.data]

    def reseal(self) -> None:
        """Recompute the CRC over the (possibly rewritten) header fields and meta, as a
        careful attacker would: the receiver's CRC check then passes."""
        crc = zlib.crc32(struct.pack("<BIQ", self.ftype, self.meta_len, self.data_len))
        self.crc = zlib.crc32(self.meta, crc)

    def json(self) -> dict[str, object] | None:
        """The meta as a JSON object, for control frames; None when it is not one."""
        try:
            obj = json.loads(self.meta)
        except (UnicodeDecodeError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def pfns(self) -> np.ndarray:
        """The pages a PAGES frame carries (empty for anything else)."""
        if not self.is_(FrameType.PAGES) or len(self.meta) < PAGES_HEAD.size:
            return np.zeros(0, np.int64)
        _, _, _, n = PAGES_HEAD.unpack_from(self.meta)
        if len(self.meta) < PAGES_HEAD.size + 8 * n:
            return np.zeros(0, np.int64)
        return np.frombuffer(self.meta, "<i8", n, PAGES_HEAD.size).astype(np.int64)


# -- meta rewrites (for Fault.rewrite); each leaves a valid CRC ------------------------------


def pages_pfn(frame: Frame) -> None:
    """PAGES: the first page claims another address (its neighbour's)."""
    meta = bytearray(frame.meta)
    off = PAGES_HEAD.size
    (pfn,) = struct.unpack_from("<q", meta, off)
    struct.pack_into("<q", meta, off, pfn ^ 1)
    frame.meta = bytes(meta)


def pages_count(frame: Frame) -> None:
    """PAGES: the page count in the head says one page fewer (lengths disagree)."""
    meta = bytearray(frame.meta)
    mode, queued, ncmds, n = PAGES_HEAD.unpack_from(meta)
    PAGES_HEAD.pack_into(meta, 0, mode, queued, ncmds, max(n - 1, 0))
    frame.meta = bytes(meta)


def pages_bounds(frame: Frame) -> None:
    """PAGES: the first command claims one page more than it covers (a length rewrite
    that keeps the meta's size)."""
    meta = bytearray(frame.meta)
    _, _, ncmds, n = PAGES_HEAD.unpack_from(meta)
    off = PAGES_HEAD.size + 8 * n + 8  # bounds[1]
    (b1,) = struct.unpack_from("<q", meta, off)
    struct.pack_into("<q", meta, off, b1 + 1 if ncmds > 1 else b1 - 1)
    frame.meta = bytes(meta)


def vmsa_pfn(frame: Frame) -> None:
    """VMSA: the packet claims another page."""
    (pfn,) = struct.unpack("<q", frame.meta)
    frame.meta = struct.pack("<q", pfn ^ 1)


def ack_count(frame: Frame) -> None:
    """ACK: acknowledges five frames more than were imported."""
    (n,) = struct.unpack("<Q", frame.meta)
    frame.meta = struct.pack("<Q", n + 5)


def page_state_flip(frame: Frame) -> None:
    """PAGE_STATE: the first private page is declared shared (and vice versa)."""
    meta = bytearray(frame.meta)
    meta[0] ^= 1
    frame.meta = bytes(meta)


def json_field(key: str, change: Callable[[object], object]) -> Callable[[Frame], None]:
    """A JSON control frame: ``key`` rewritten by ``change``."""

    def rewrite(frame: Frame) -> None:
        obj = frame.json()
        assert obj is not None, f"{frame.name} meta is not JSON"
        obj[key] = change(obj.get(key))
        frame.meta = json.dumps(obj, separators=(",", ":")).encode()

    rewrite.__name__ = f"json_{key}"
    return rewrite


def flip_hex(value: object) -> object:
    s = str(value)
    return s[:-1] + ("0" if s[-1:] != "0" else "1")


def rewrite_start_npages(frame: Frame) -> None:
    """START: the guest claims one page more. START's meta is JSON followed by data."""
    obj = json.loads(frame.meta)
    obj["npages"] = int(obj["npages"]) + 1
    frame.meta = json.dumps(obj, separators=(",", ":")).encode()


def rewrite_start_batching(frame: Frame) -> None:
    """START: the stream announces SEV's page format instead of the one the session
    negotiated (a downgrade: page packets carry no per-page sequence number)."""
    obj = json.loads(frame.meta)
    obj["batching"] = "page"
    frame.meta = json.dumps(obj, separators=(",", ":")).encode()


# -- where -----------------------------------------------------------------------------------


class Where:
    """A point of the stream. ``matches`` sees each frame once, in stream order."""

    direction: str

    def matches(self, frame: Frame, nth: int, seen: np.ndarray) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class At(Where):
    """The ``nth`` (from 0) frame of type ``ftype`` in ``direction``."""

    direction: str
    ftype: FrameType
    nth: int = 0

    def matches(self, frame: Frame, nth: int, seen: np.ndarray) -> bool:
        return frame.is_(self.ftype) and nth == self.nth

    def __str__(self) -> str:
        return f"{self.direction}:{self.ftype.name}#{self.nth}"


@dataclass(frozen=True)
class Iterative(Where):
    """The first page frame carrying a page that an earlier page frame carried: the bulk
    round sends every page once, so this frame opens the first iterative round (or
    stop-and-copy, if there is none)."""

    direction: str = S2D

    def matches(self, frame: Frame, nth: int, seen: np.ndarray) -> bool:
        if not frame.is_(FrameType.PAGES):
            return False
        pfns = frame.pfns()
        pfns = pfns[(pfns >= 0) & (pfns < len(seen))]
        return bool(seen[pfns].any())

    def __str__(self) -> str:
        return "iterative"


@dataclass(frozen=True)
class BeforeVmsa(Where):
    """The last page frame before the first VMSA frame: the stop-and-copy round's last."""

    direction: str = S2D

    def matches(self, frame: Frame, nth: int, seen: np.ndarray) -> bool:
        return False  # decided by the pump's lookahead

    def __str__(self) -> str:
        return "pages-before-vmsa"


# -- what -------------------------------------------------------------------------------------

KINDS = ("drop", "duplicate", "reorder", "delay", "corrupt_data", "corrupt_meta", "oversize",
         "stall", "close", "call")


@dataclass
class Fault:
    """One fault at one point. ``seconds``: the delay, or how long a stall holds before
    the proxy closes both ways (None: until `FrameProxy.close`). ``rewrite``: the meta
    rewrite of corrupt_meta. ``meta_len``/``data_len``: the oversized header fields.
    ``action``/``forward``: what `call` runs at the frame, and whether the frame then
    goes on."""

    kind: str
    where: Where
    seconds: float | None = 0.0
    rewrite: Callable[[Frame], None] | None = None
    meta_len: int | None = None
    data_len: int | None = None
    action: Callable[[], None] | None = None
    forward: bool = False

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    def __str__(self) -> str:
        extra = ""
        if self.rewrite is not None:
            extra = f"({self.rewrite.__name__})"
        elif self.kind == "oversize":
            extra = f"(meta_len={self.meta_len}, data_len={self.data_len})"
        elif self.kind in ("delay", "stall"):
            extra = f"({self.seconds} s)"
        return f"{self.kind}{extra} at {self.where}"


@dataclass
class Seen:
    """A frame the proxy read, and what became of it."""

    t: float
    direction: str
    name: str
    nth: int
    meta_len: int
    data_len: int
    status: object = None  # a JSON control frame's "status"
    fault: str = ""  # the fault applied to it, if any
    forwarded: bool = False  # it reached the other side (at least once)


class _Eof(Exception):
    pass


class _Stop(Exception):
    pass


@dataclass
class _Conn:
    a: socket.socket  # the source's side
    b: socket.socket  # the destination's side
    counts: dict[tuple[str, int], int] = field(default_factory=dict)
    seen: np.ndarray = field(default_factory=lambda: np.zeros(1 << 16, bool))
    stalled: threading.Event = field(default_factory=threading.Event)
    cut: threading.Event = field(default_factory=threading.Event)  # a stall has ended
    raw: set[str] = field(default_factory=set)  # directions no longer parsed (oversize)


class FrameProxy:
    """Relays connections to ``target`` on 127.0.0.1, frame by frame, applying ``fault``
    once (to the first connection where its point comes). Later connections, and the rest
    of this one, pass unaltered."""

    LOOKAHEAD_S = 2.0  # how long a held page frame waits for the next frame
    REORDER_S = 1.0  # how long a reordered frame waits for the one it swaps with

    def __init__(self, target: tuple[str, int], fault: Fault | None = None) -> None:
        self.target = target
        self.fault = fault
        self.log: list[Seen] = []
        self.fired = threading.Event()
        self.fired_at: float | None = None
        self.stall_ended_at: float | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._conns: list[_Conn] = []
        self._threads: list[threading.Thread] = []
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self.uri = f"tcp:127.0.0.1:{self.port}"
        self._start(self._accept)

    # -- public ---------------------------------------------------------------------------
    def confirms(self, after: float = 0.0) -> list[Seen]:
        """CONFIRM frames the destination sent after ``after`` (whether or not they
        reached the source): it accepted the stream and runs, or is about to run, the
        guest."""
        with self._lock:
            return [s for s in self.log
                    if s.direction == D2S and s.name == "CONFIRM" and s.t >= after]

    def may_have_resumed(self) -> bool:
        """Whether the destination may have resumed the guest: it sent CONFIRM and the
        source's next word reached it (a destination resumes before its CONFIRM, or on
        the source's first answer to it, depending on the protocol's version)."""
        with self._lock:
            first = next((s for s in self.log
                          if s.direction == D2S and s.name == "CONFIRM"), None)
            return first is not None and any(
                s.direction == S2D and s.t > first.t and s.forwarded for s in self.log)

    def frames(self, direction: str, name: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.log if s.direction == direction and s.name == name]

    def close(self) -> None:
        """Cut everything and end every thread (bounded)."""
        self._closing.set()
        _shut(self._srv)  # wakes the accepting thread (close alone does not)
        self._srv.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.cut.set()
            for s in (c.a, c.b):
                _shut(s)
        deadline = time.monotonic() + 10
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        for c in conns:
            c.a.close()
            c.b.close()

    # -- relaying -------------------------------------------------------------------------
    def _start(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name="frameproxy")
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                a, _ = self._srv.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=5)
                b.settimeout(None)
            except OSError:
                _shut(a)
                a.close()
                continue
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Conn(a, b)
            with self._lock:
                self._conns.append(c)
            self._start(self._pump, c, S2D)
            self._start(self._pump, c, D2S)

    def _pump(self, c: _Conn, direction: str) -> None:
        src, dst = (c.a, c.b) if direction == S2D else (c.b, c.a)
        held: Frame | None = None  # a page frame held back by the BeforeVmsa lookahead
        try:
            while not self._closing.is_set():
                if direction in c.raw:
                    self._raw(src, dst, c)
                    return
                try:
                    frame = self._read(src, c, self.LOOKAHEAD_S if held else None)
                except TimeoutError:
                    assert held is not None
                    self._send(dst, c, held)  # nothing followed in time: it was not the last
                    held = None
                    continue
                if frame is None:  # not a cvmig stream: pass the rest through as it is
                    c.raw.add(direction)
                    continue
                nth = self._note(c, direction, frame)
                f = self.fault
                pending = f is not None and not self.fired.is_set()
                if held is not None:
                    if pending and frame.is_(FrameType.VMSA):
                        self._apply(c, direction, src, dst, held, -1)
                        pending = False
                    else:
                        self._send(dst, c, held)
                    held = None
                if pending and f is not None and f.where.direction == direction:
                    if isinstance(f.where, BeforeVmsa) and frame.is_(FrameType.PAGES):
                        held = frame
                        continue
                    if f.where.matches(frame, nth, c.seen):
                        self._apply(c, direction, src, dst, frame, len(self.log) - 1)
                        if frame.is_(FrameType.PAGES):
                            self._mark(c, frame)
                        continue
                if direction == S2D and frame.is_(FrameType.PAGES):
                    self._mark(c, frame)
                self._send(dst, c, frame)
        except _Eof:
            if held is not None:
                self._send_quietly(dst, c, held)
            if not c.stalled.is_set():
                _shut(dst, socket.SHUT_WR)  # the peer closed: pass the close on
        except (_Stop, OSError):
            if not c.stalled.is_set():
                _shut(src)
                _shut(dst)

    def _mark(self, c: _Conn, frame: Frame) -> None:
        pfns = frame.pfns()
        pfns = pfns[(pfns >= 0) & (pfns < len(c.seen))]
        c.seen[pfns] = True

    def _note(self, c: _Conn, direction: str, frame: Frame) -> int:
        key = (direction, frame.ftype)
        nth = c.counts.get(key, 0)
        c.counts[key] = nth + 1
        obj = frame.json() if frame.meta[:1] == b"{" and len(frame.meta) < 1 << 16 else None
        with self._lock:
            frame.seen = len(self.log)
            self.log.append(Seen(time.monotonic(), direction, frame.name, nth,
                                 frame.meta_len, frame.data_len,
                                 None if obj is None else obj.get("status")))
        return nth

    def _apply(self, c: _Conn, direction: str, src: socket.socket, dst: socket.socket,
               frame: Frame, index: int) -> None:
        f = self.fault
        assert f is not None
        with self._lock:
            self.fired_at = time.monotonic()
            if index >= 0:
                self.log[index].fault = f.kind
            else:  # the held frame: the last PAGES entry before this one
                for s in reversed(self.log[:-1]):
                    if s.direction == direction and s.name == "PAGES":
                        s.fault = f.kind
                        break
        self.fired.set()
        k = f.kind
        if k == "drop":
            return
        if k == "duplicate":
            self._send(dst, c, frame)
            self._send(dst, c, frame)
        elif k == "reorder":
            try:
                nxt = self._read(src, c, self.REORDER_S)
            except TimeoutError:
                nxt = None
            if nxt is not None:
                self._note(c, direction, nxt)
                if direction == S2D and nxt.is_(FrameType.PAGES):
                    self._mark(c, nxt)
                self._send(dst, c, nxt)
            self._send(dst, c, frame)
        elif k == "delay":
            self._closing.wait(f.seconds or 0.0)  # the fault itself: hold the stream
            self._send(dst, c, frame)
        elif k == "corrupt_data":
            if frame.data:
                data = bytearray(frame.data)
                data[len(data) // 2] ^= 0x5A
                frame.data = bytes(data)
            else:  # no data: the meta, CRC left as it was
                meta = bytearray(frame.meta)
                meta[len(meta) // 2] ^= 0x5A
                frame.meta = bytes(meta)
            self._send(dst, c, frame)
        elif k == "corrupt_meta":
            assert f.rewrite is not None
            f.rewrite(frame)
            frame.meta_len = len(frame.meta)
            frame.reseal()
            self._send(dst, c, frame)
        elif k == "oversize":
            self._oversize(c, direction, dst, frame, f)
        elif k == "stall":
            c.stalled.set()
            c.cut.wait(f.seconds)  # the fault itself: nothing moves for this long
            self.stall_ended_at = time.monotonic()
            c.cut.set()
            _shut(c.a)
            _shut(c.b)
            raise _Stop
        elif k == "close":
            raise _Stop
        elif k == "call":
            assert f.action is not None
            f.action()
            if f.forward:
                self._send(dst, c, frame)

    def _oversize(self, c: _Conn, direction: str, dst: socket.socket, frame: Frame,
                  f: Fault) -> None:
        """A header whose lengths are larger than the frame, under a valid CRC. A meta_len
        up to 256 MiB is padded so the CRC holds over what the receiver reads; beyond
        that only the header is sent. The stream is no longer framed after this, so this
        direction then passes raw bytes."""
        if f.meta_len is not None:
            frame.meta_len = f.meta_len
            if f.meta_len <= 256 << 20:
                frame.meta = frame.meta.ljust(f.meta_len, b"\0")[: f.meta_len]
        if f.data_len is not None:
            frame.data_len = f.data_len
        frame.reseal()
        if f.meta_len is not None and f.meta_len > 256 << 20:
            dst.sendall(frame.header())
        else:
            for part in frame.wire():
                if part:
                    dst.sendall(part)
        c.raw.add(direction)

    def _raw(self, src: socket.socket, dst: socket.socket, c: _Conn) -> None:
        try:
            while not self._closing.is_set() and not c.stalled.is_set():
                buf = src.recv(1 << 16)
                if not buf:
                    raise _Eof
                dst.sendall(buf)
        except _Eof:
            if not c.stalled.is_set():
                _shut(dst, socket.SHUT_WR)
        except OSError:
            if not c.stalled.is_set():
                _shut(src)
                _shut(dst)

    def _send(self, dst: socket.socket, c: _Conn, frame: Frame) -> None:
        if c.stalled.is_set():  # the other direction stalled the link: nothing moves
            c.cut.wait()
            raise _Stop
        for part in frame.wire():
            if part:
                dst.sendall(part)
        if frame.seen >= 0:
            with self._lock:
                self.log[frame.seen].forwarded = True

    def _send_quietly(self, dst: socket.socket, c: _Conn, frame: Frame) -> None:
        try:
            self._send(dst, c, frame)
        except (_Stop, OSError):
            pass

    def _read(self, s: socket.socket, c: _Conn, timeout: float | None) -> Frame | None:
        """The next whole frame; None if the bytes are not a cvmig header (they are then
        lost to this proxy: the stream is broken anyway). ``timeout``: how long to wait
        for its first byte (TimeoutError)."""
        if timeout is not None:
            r, _, _ = select.select([s], [], [], timeout)
            if not r:
                raise TimeoutError
        head = _recv_exact(s, HEADER_SIZE, self._closing)
        magic, version, ftype, meta_len, data_len, crc, _ = HEADER.unpack(head)
        if magic != MAGIC or meta_len > 256 << 20 or data_len > 256 << 20:
            return None
        meta = _recv_exact(s, meta_len, self._closing)
        data = _recv_exact(s, data_len, self._closing)
        return Frame(ftype, meta_len, data_len, crc, meta, data, version)


def _recv_exact(s: socket.socket, n: int, closing: threading.Event) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[got:])
        if k == 0:
            if closing.is_set():
                raise _Stop
            raise _Eof
        got += k
    return bytes(buf)


def _shut(s: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        s.shutdown(how)
    except OSError:
        pass
