"""Guest memory: one POSIX shared-memory object of 4 KiB pages, plus the page-state map.

Layout of the object ``/dev/shm/<name>``::

    [0, size)                 the guest's pages: ciphertext for private pages (under the
                              VEK, address-tweaked), plaintext for shared pages
    [size, size + state_len)  page_state: one byte per page, PRIVATE=0 / SHARED=1

The PSP maps ``(name, size)``, i.e. only the pages; the hypervisor and the vCPUs map both.
``PRIVATE == 0`` so a fresh object is all private, as SEV launches a guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import secrets
import threading
import time

import numpy as np

PAGE_SIZE = 4096
PRIVATE = 0
SHARED = 1

MIN_MEMORY = 16 * 1024 * 1024
_MADV_POPULATE_WRITE = 23  # not exported by Python 3.11's mmap module
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_SHM_DIR = "/dev/shm"


def machine_memory() -> int:
    """Bytes of guest memory this machine can hold: MemAvailable (no swap here)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _state_len(npages: int) -> int:
    return -(-npages // PAGE_SIZE) * PAGE_SIZE


def check_size(size_bytes: int) -> None:
    """Raise ValueError when ``size_bytes`` cannot be a guest's memory here."""
    if size_bytes % PAGE_SIZE:
        raise ValueError(f"guest memory must be a multiple of {PAGE_SIZE} bytes, got {size_bytes}")
    if size_bytes < MIN_MEMORY:
        raise ValueError(f"guest memory must be at least {MIN_MEMORY >> 20} MiB, got {size_bytes} bytes")
    avail = machine_memory()
    if size_bytes > avail:
        raise ValueError(
            f"guest memory of {size_bytes >> 20} MiB exceeds what this machine has available "
            f"({avail >> 20} MiB)"
        )


def populate_mapping(mm: mmap.mmap) -> None:
    """Fault every page of a mapping in now, off the critical path (platform.md §7)."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except OSError:
        # Older kernels: touch one byte per page instead.
        view = np.frombuffer(mm, dtype=np.uint8)
        view[::PAGE_SIZE] |= 0
        del view


class Populator:
    """Faults a mapping's pages in on a thread of its own, in ascending 64 MiB steps, so a
    large memory's first-touch cost overlaps other work instead of preceding it (a page
    touched before the thread gets there simply faults in where it is touched)."""

    STEP = 64 << 20

    def __init__(self, mm: mmap.mmap, size: int) -> None:
        holder = ctypes.c_char.from_buffer(mm)
        self._base = ctypes.addressof(holder)
        del holder  # keep only the address: the mapping may be closed once we have stopped
        self._size = size
        self._stop = threading.Event()
        self.done = threading.Event()
        self.cpu_s = 0.0  # CPU the faulting took (this thread's, the kernel's work included)
        self._thread = threading.Thread(target=self._run, name="cvmig-populate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.thread_time()
        try:
            for off in range(0, self._size, self.STEP):
                if self._stop.is_set():
                    return
                n = min(self.STEP, self._size - off)
                # ctypes releases the GIL: the engine's threads run on meanwhile
                if _libc.madvise(self._base + off, n, _MADV_POPULATE_WRITE) != 0:
                    return  # an old kernel: pages fault in where they are first written
        finally:
            self.cpu_s = time.thread_time() - t0
            self.done.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current step (before the mapping may be closed)."""
        self._stop.set()
        self._thread.join(timeout)


class GuestMemory:
    """A guest's memory as every party maps it."""

    def __init__(self, name: str, npages: int, fd: int, owner: bool) -> None:
        self.name = name
        self.npages = npages
        self.size = npages * PAGE_SIZE
        self.owner = owner
        self._mm: mmap.mmap | None = mmap.mmap(fd, self.size + _state_len(npages), mmap.MAP_SHARED)
        os.close(fd)
        self.pages: np.ndarray = np.frombuffer(self._mm, dtype=np.uint8, count=self.size).reshape(
            npages, PAGE_SIZE
        )
        self.page_state: np.ndarray = np.frombuffer(
            self._mm, dtype=np.uint8, count=npages, offset=self.size
        )

    @classmethod
    def create(cls, size_bytes: int, *, populate: bool = True, name: str | None = None) -> GuestMemory:
        """A new, zero-filled guest memory of ``size_bytes`` (all pages private)."""
        check_size(size_bytes)
        npages = size_bytes // PAGE_SIZE
        name = name or f"cvmig-guest-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size_bytes + _state_len(npages))
        except BaseException:
            os.close(fd)
            os.unlink(os.path.join(_SHM_DIR, name))
            raise
        mem = cls(name, npages, fd, owner=True)
        if populate:
            assert mem._mm is not None
            populate_mapping(mem._mm)
        return mem

    @classmethod
    def attach(cls, name: str, npages: int) -> GuestMemory:
        """Map an existing guest memory by its shm name."""
        fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR)
        need = npages * PAGE_SIZE + _state_len(npages)
        if os.fstat(fd).st_size < need:
            os.close(fd)
            raise ValueError(f"shm {name!r} is smaller than {npages} pages plus their page state")
        return cls(name, npages, fd, owner=False)

    def populate(self) -> None:
        """Pre-fault this process's mapping of the pages (each process has its own PTEs)."""
        if self._mm is not None:
            populate_mapping(self._mm)

    def populate_in_background(self) -> Populator:
        """Pre-fault the pages on a thread; `Populator.stop` it before `close`."""
        assert self._mm is not None
        return Populator(self._mm, self.size)

    @property
    def address(self) -> int:
        """Virtual address of page 0 in this process (for uffd registration)."""
        return int(self.pages.ctypes.data)

    def close(self) -> None:
        """Unmap (numpy views taken from ``pages``/``page_state`` must be dropped first)."""
        if self._mm is None:
            return
        self.pages = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        self.page_state = np.empty(0, dtype=np.uint8)
        mm, self._mm = self._mm, None
        try:
            mm.close()
        except BufferError:
            # A view is still alive somewhere; the mapping goes when it does.
            pass

    def unlink(self) -> None:
        """Remove the shm name (the mappings stay valid until closed)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(_SHM_DIR, self.name))

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        return f"GuestMemory({self.name!r}, npages={self.npages})"
