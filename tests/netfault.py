"""A TCP relay on loopback that can break the stream it carries, for failure tests."""

from __future__ import annotations

import socket
import threading


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
        a, _ = self._srv.accept()
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
