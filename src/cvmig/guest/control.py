"""The control block a guest's vCPUs share with the hypervisor (no guest secrets in it).

One POSIX shm object per guest holding, for each vCPU, the fields the hypervisor sets
(throttle, dirty limit) and those the vCPU publishes (pid, run state, progress counters,
heartbeat, a ring of recent heartbeats, a progress stamp for long work), plus the
byte-per-page dirty map used by the ``dmap`` tracker. Aligned 8-byte fields: single
stores, so readers never see torn values.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets

import numpy as np

STARTING, RUNNING, PAUSED, STOPPED = 0, 1, 2, 3
STATE_NAMES = {STARTING: "starting", RUNNING: "running", PAUSED: "paused", STOPPED: "stopped"}
NO_LIMIT = -1.0

RING = 16384  # heartbeats kept per vCPU: about 160 s at one per 10 ms slice

VCPU_DTYPE = np.dtype(
    [
        ("pid", "<i8"),
        ("state", "<i8"),
        ("ops", "<u8"),  # workload operations (dirtier: page writes; sqlite: transactions; idle: slices)
        ("pages_written", "<u8"),  # page writes issued to guest memory
        ("heartbeat", "<f8"),  # CLOCK_MONOTONIC of the last slice's start
        ("hb_count", "<i8"),  # heartbeats written into the ring so far
        ("throttle", "<f8"),  # set by the hypervisor: fraction p in [0, 0.99]
        ("dirty_limit", "<f8"),  # set by the hypervisor: pages/s, NO_LIMIT = none
        ("run_time", "<f8"),  # seconds of vCPU run time (excludes throttle sleep, pause)
        ("throttle_time", "<f8"),  # seconds slept by the throttle
        ("failed", "<i8"),  # 1 once the workload raised; it then idles
        # CLOCK_MONOTONIC of the last progress of long work (digest, check): a busy vCPU
        # passes no slice boundary, so without this it would look hung
        ("busy", "<f8"),
        ("_pad", "<i8", (4,)),
    ]
)
assert VCPU_DTYPE.itemsize == 128


def _layout(nvcpus: int, npages: int) -> tuple[int, int, int, int]:
    v = nvcpus * VCPU_DTYPE.itemsize
    r = nvcpus * RING * 8
    d = -(-npages // 4096) * 4096
    return v, r, d, v + r + d


class ControlBlock:
    def __init__(self, name: str, nvcpus: int, npages: int, owner: bool) -> None:
        self.name = name
        self.owner = owner
        v, r, d, total = _layout(nvcpus, npages)
        path = os.path.join("/dev/shm", name)
        if owner:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, total)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self._mm: mmap.mmap | None = mmap.mmap(fd, total, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.vcpu: np.ndarray = np.frombuffer(self._mm, dtype=VCPU_DTYPE, count=nvcpus)
        self.ring: np.ndarray = np.frombuffer(
            self._mm, dtype=np.float64, count=nvcpus * RING, offset=v
        ).reshape(nvcpus, RING)
        self.dmap: np.ndarray = np.frombuffer(self._mm, dtype=np.uint8, count=npages, offset=v + r)
        if owner:
            self.vcpu["dirty_limit"] = NO_LIMIT

    @classmethod
    def create(cls, prefix: str, nvcpus: int, npages: int) -> ControlBlock:
        return cls(f"{prefix}-ctl-{secrets.token_hex(4)}", nvcpus, npages, owner=True)

    @classmethod
    def attach(cls, name: str, nvcpus: int, npages: int) -> ControlBlock:
        return cls(name, nvcpus, npages, owner=False)

    def unlink(self) -> None:
        """Remove the name once every vCPU has it mapped: the block lives as long as the
        mappings do, and a host killed outright leaves nothing behind in /dev/shm."""
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", self.name))

    def close(self) -> None:
        if self._mm is None:
            return
        self.vcpu = self.ring = self.dmap = np.empty(0)
        mm, self._mm = self._mm, None
        with contextlib.suppress(BufferError):
            mm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", self.name))
