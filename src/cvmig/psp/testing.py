"""Helpers for tests and benchmarks of the secure processor (not used by the engine).

`ShmRegion` creates a POSIX shared-memory object by name, as the hypervisor does for guest
memory and transport buffers, and views it as numpy; the PSP maps the same object by name.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import weakref

import numpy as np

from cvmig.psp.api import PAGE_SIZE


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink("/dev/shm/" + name)


class ShmRegion:
    """A named shared-memory object (/dev/shm/<name>) of ``size`` bytes, mapped here.

    The name goes with `close`, or when the region is garbage-collected, or when the
    process exits: a test that fails before it closes its regions leaves none behind (and
    the name carries our pid, so a killed test process's are swept by the next host)."""

    def __init__(self, size: int, prefix: str = "cvmig-psp") -> None:
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self.size = size
        fd = os.open("/dev/shm/" + self.name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._finalizer = weakref.finalize(self, _unlink, self.name)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self._finalizer()
            raise
        finally:
            os.close(fd)
        self.arr = np.frombuffer(self._mm, dtype=np.uint8)

    def pages(self, npages: int | None = None) -> np.ndarray:
        n = self.size // PAGE_SIZE if npages is None else npages
        return self.arr[: n * PAGE_SIZE].reshape(n, PAGE_SIZE)

    def close(self) -> None:
        self.arr = np.empty(0, dtype=np.uint8)
        with contextlib.suppress(BufferError):
            self._mm.close()
        self._finalizer()

    def __enter__(self) -> ShmRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
