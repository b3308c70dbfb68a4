"""Kernel write-protect dirty tracking: userfaultfd async WP + PAGEMAP_SCAN, via ctypes.

Two halves, in two processes (platform.md §1a):

- the **writer** (a vCPU process) creates its own userfaultfd, registers its own mapping of
  guest memory in WP mode with WP_ASYNC, and keeps the fd open for as long as anyone may
  harvest it. WP_ASYNC means the kernel resolves write faults itself: no handler thread.
- the **harvester** (the hypervisor) opens ``/proc/<writer pid>/pagemap`` and issues
  PAGEMAP_SCAN with WP_MATCHING, which returns the written pages *and* write-protects them
  again in one walk: a get-and-clear, KVM dirty-log style. Dirty state lives in each
  writer's page tables, so every writer is scanned and the results are unioned.

Right after registration every page reports WRITTEN; the first get-and-clear arms tracking.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np

PAGE_SIZE = 4096

_NR_USERFAULTFD = 323  # x86_64

_UFFD_API = 0xAA
_FEAT_PAGEFAULT_FLAG_WP = 1 << 0
_FEAT_WP_HUGETLBFS_SHMEM = 1 << 12
_FEAT_WP_UNPOPULATED = 1 << 13
_FEAT_WP_ASYNC = 1 << 15
FEATURES = _FEAT_PAGEFAULT_FLAG_WP | _FEAT_WP_HUGETLBFS_SHMEM | _FEAT_WP_UNPOPULATED | _FEAT_WP_ASYNC

_REGISTER_MODE_WP = 1 << 1
_WRITEPROTECT_MODE_WP = 1 << 0

_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1
_PAGE_IS_WRITTEN = 1 << 1


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
            "category_inverted", "category_mask", "category_anyof_mask", "return_mask",
        )
    ]


_UFFDIO_API = _iowr(_UFFD_API, 0x3F, ctypes.sizeof(_UffdioApi))
_UFFDIO_REGISTER = _iowr(_UFFD_API, 0x00, ctypes.sizeof(_UffdioRegister))
_UFFDIO_WRITEPROTECT = _iowr(_UFFD_API, 0x06, ctypes.sizeof(_UffdioWriteprotect))
_PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(_PmScanArg))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    rc = int(_libc.ioctl(fd, request, ctypes.byref(arg)))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl 0x{request:x}: {os.strerror(err)}")
    return rc


class UffdWriter:
    """The writer half: one per vCPU process, over that process's mapping of guest RAM."""

    def __init__(self, addr: int, length: int) -> None:
        fd = int(_libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"userfaultfd: {os.strerror(err)}")
        self.fd = fd
        self.addr = addr
        self.length = length
        try:
            api = _UffdioApi(api=_UFFD_API, features=FEATURES, ioctls=0)
            _ioctl(fd, _UFFDIO_API, api)
            reg = _UffdioRegister(range=_UffdioRange(addr, length), mode=_REGISTER_MODE_WP)
            _ioctl(fd, _UFFDIO_REGISTER, reg)
        except BaseException:
            os.close(fd)
            raise

    def unprotect(self) -> None:
        """Drop all write protection (dirty logging stopped): no more first-write faults."""
        wp = _UffdioWriteprotect(range=_UffdioRange(self.addr, self.length), mode=0)
        _ioctl(self.fd, _UFFDIO_WRITEPROTECT, wp)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PagemapScanner:
    """The harvester half for one writer: get-and-clear of the pages it wrote."""

    def __init__(self, pid: int, addr: int, length: int, vec_len: int = 1 << 16) -> None:
        self.pid = pid
        self.addr = addr
        self.length = length
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        # page_region records {start, end, categories}, reused across scans
        self._vec = np.zeros((vec_len, 3), dtype=np.uint64)
        self._arg = _PmScanArg()

    def scan(self, clear: bool = True) -> np.ndarray:
        """Page indices (int64, sorted, relative to the mapping) written since the last clear.

        With ``clear`` the same walk write-protects them again (get-and-clear); without it,
        a read-only peek.
        """
        a = self._arg
        vec_len = len(self._vec)
        start, end = self.addr, self.addr + self.length
        runs: list[np.ndarray] = []
        while start < end:
            a.size = ctypes.sizeof(_PmScanArg)
            a.flags = (_PM_SCAN_WP_MATCHING if clear else 0) | _PM_SCAN_CHECK_WPASYNC
            a.start, a.end, a.walk_end = start, end, 0
            a.vec, a.vec_len, a.max_pages = self._vec.ctypes.data, vec_len, 0
            a.category_inverted, a.category_anyof_mask = 0, 0
            a.category_mask = a.return_mask = _PAGE_IS_WRITTEN
            n = _ioctl(self.fd, _PAGEMAP_SCAN, a)
            if n:
                runs.append(self._vec[:n, :2].copy())
            # walk_end can be stale after a walk that finished (kernel quirk, §1a): go on
            # only when the output vector came back full.
            if n < vec_len:
                break
            start = int(a.walk_end)
        if not runs:
            return np.empty(0, dtype=np.int64)
        r = np.concatenate(runs).astype(np.int64)
        first = (r[:, 0] - self.addr) // PAGE_SIZE
        count = (r[:, 1] - r[:, 0]) // PAGE_SIZE
        return _expand_runs(first, count)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _expand_runs(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Runs (first, count) -> every index in them, vectorised."""
    total = int(count.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offs = np.repeat(first - np.concatenate(([0], np.cumsum(count)[:-1])), count)
    return offs + np.arange(total, dtype=np.int64)


def probe() -> str | None:
    """None when uffd WP_ASYNC + PAGEMAP_SCAN works in this process; else why not."""
    mm = mmap.mmap(-1, 4 * PAGE_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(mm, dtype=np.uint8)
    writer: UffdWriter | None = None
    scanner: PagemapScanner | None = None
    try:
        addr = buf.ctypes.data
        writer = UffdWriter(addr, len(buf))
        scanner = PagemapScanner(os.getpid(), addr, len(buf), vec_len=8)
        scanner.scan()  # arms
        buf[2 * PAGE_SIZE] = 1
        got = scanner.scan()
        if got.tolist() != [2]:
            return f"PAGEMAP_SCAN reported {got.tolist()} after a write to page 2"
        return None
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.ENOTTY, errno.EACCES):
            return f"userfaultfd write-protect tracking unavailable: {e}"
        return f"userfaultfd probe failed: {e}"
    finally:
        if scanner is not None:
            scanner.close()
        if writer is not None:
            writer.close()
        del buf
        mm.close()
