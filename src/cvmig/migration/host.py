"""A host as the migration engine sees it: its secure processor process, a client to it,
a transport buffer the PSP writes packets into and the socket sends from, and (on a
destination) vCPU processes started ahead of the guest to come."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cvmig.guest.memory import GuestMemory
from cvmig.guest.pool import VcpuPool
from cvmig.migration.leftovers import sweep
from cvmig.psp.api import PAGE_SIZE
from cvmig.psp.mailbox import MailboxClient, PspProcess


def busy_cpu_seconds() -> float:
    """CPU seconds this machine's cores have been busy since boot (/proc/stat; 0 where it
    cannot be read). Over a span, divided by its length: how many cores were kept busy,
    which on a small host is what the guest and the migration share."""
    try:
        with open("/proc/stat", "rb") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user nice system idle iowait irq softirq steal ...: not idle, iowait, steal
    return (sum(v[:3]) + sum(v[5:7])) / os.sysconf("SC_CLK_TCK")


TRANSPORT_SIZE = 24 << 20  # the receive ring (cvmig.wire.protocol: WINDOW slots) fits


@dataclass
class Transport:
    """A transport buffer: shared memory the PSP maps as a DMA target/source."""

    shm: GuestMemory
    region: int

    @property
    def view(self) -> memoryview:
        return memoryview(self.shm.pages.reshape(-1).data)


class Host:
    """One host: a PSP process (one per host) and the hypervisor's client of it."""

    def __init__(self, name: str, psp_profile: str = "none", *, contig_cap: int = 4,
                 psp_owner: str | None = None) -> None:
        """``contig_cap``: pages one contig command may carry here (4 = 16 KiB, the SEV
        spec; more is an extension both hosts must enable). ``psp_owner``: the platform
        owner (OCA) directory, or "self" for a platform owned by no one else."""
        self.name = name
        self.psp_profile = psp_profile
        sweep()  # what hosts killed outright here before left behind
        # our pid in the name: if we and our PSP are both killed, the next host removes it
        self._dir = Path(tempfile.mkdtemp(prefix=f"cvmig-{name}-{os.getpid()}-"))
        self.psp_socket = str(self._dir / "psp.sock")
        # if we are killed outright, the PSP removes the directory and our shm names
        self._psp = PspProcess(self.psp_socket, profile=psp_profile,
                               max_contig_bytes=contig_cap * PAGE_SIZE, owner=psp_owner,
                               remove_dir=str(self._dir))
        self.psp: MailboxClient | None = None
        self.transport: Transport | None = None
        # a destination's vCPU processes, started before a migration arrives (fill it)
        self.vcpu_pool = VcpuPool()

    def start(self) -> Host:
        try:
            self._psp.start()
            self.psp = MailboxClient(self.psp_socket)
            shm = GuestMemory.create(TRANSPORT_SIZE, populate=True)
            try:
                self.transport = Transport(shm, self.psp.map_region(shm.name, shm.size))
            finally:
                shm.unlink()  # both of us have it mapped; a killed host leaves no name behind
        except BaseException:
            self.close()  # `with` does not exit what failed to enter
            raise
        return self

    def close(self) -> None:
        self.vcpu_pool.close()
        if self.transport is not None:
            self.transport.shm.close()
            self.transport.shm.unlink()
            self.transport = None
        if self.psp is not None:
            self.psp.close()
            self.psp = None
        self._psp.stop()
        try:
            for p in self._dir.iterdir():
                p.unlink()
            self._dir.rmdir()
        except OSError:
            pass

    def __enter__(self) -> Host:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

