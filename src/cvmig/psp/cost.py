"""Cost profiles: the timing of real secure-processor hardware, applied in the PSP process.

A profile makes each mailbox message take at least

    t = t_doorbell + Σ over its firmware commands (t_fixed + guest bytes / bandwidth)

of wall time (the emulator's own work runs inside that time, as firmware work does inside
a hardware command; if the emulator is slower, its own time stands). The PSP serves one
message at a time, so the cost is serialized per host, like `sev_cmd_mutex` on Linux.
A queued message (many commands, one doorbell) pays t_doorbell once.

Calibration of ``sev-2020`` (sev-protocol.md §3, §10): the only public figure is QEMU's
own estimate of 350-450 pages/s on AMD's 2020 prototype (one KVM ioctl and one
SEND_UPDATE_DATA per 4 KiB page), i.e. 2.2-2.9 ms per page, hardware unstated. We
attribute all of it to the PSP path (so the profile is pessimistic: it also carries KVM's
pinning and copies and QEMU's stream work) and take the midpoint, 400 pages/s = 2.5 ms.
No source splits it into fixed and per-byte parts. The firmware's structure (§3.2) puts
mailbox, checks, TRNG, key/IV loads, MAC finalisation, scratch zeroing and the interrupt
in the fixed part and only DMA and the cipher/MAC passes in the per-byte part; we assume
the fixed part dominates, 80 %: t_doorbell = 0.3 ms (mailbox write, interrupt, wake-up),
t_fixed = 1.7 ms, and the remaining 0.5 ms per 4 KiB page gives 8.2 MB/s for the data
path. Then contig batching of 4 pages costs 0.3 + 1.7 + 2.0 = 4.0 ms (1.0 ms per page,
2.5x the page rate) - a prediction to be checked against the IPSJ report's figures.
Other profiles can be given as ``"fixed_us:doorbell_us:mb_per_s"``, e.g. ``"1700:300:8.2"``.

Stop costs (what a switch-over costs besides the pages: `cvmig.migration.stopcost`) on a
profile are an assumption, stated: this machine's measured software parts (pause, vCPU
restore, the lease grant) plus the profile's price of the firmware commands a stop issues
(SEND/RECEIVE_UPDATE_VMSA per vCPU, the trailer, RECEIVE_FINISH): 6 x 2.5 ms = 15 ms more
for two vCPUs at ``sev-2020``. No public figure times these commands; on hardware, KVM's
vCPU restore is far cheaper than starting our vCPU processes, so this errs long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class CostProfile:
    name: str
    t_doorbell: float = 0.0  # seconds per mailbox message
    t_fixed: float = 0.0  # seconds per firmware command
    bandwidth: float = 0.0  # guest bytes per second through the data path; 0 = free

    def duration(self, ncommands: int, nbytes: int) -> float:
        """Modelled seconds for one mailbox message of ``ncommands`` moving ``nbytes``."""
        t = self.t_doorbell + ncommands * self.t_fixed
        if self.bandwidth > 0:
            t += nbytes / self.bandwidth
        return t

    @property
    def is_free(self) -> bool:
        return self.t_doorbell == 0 and self.t_fixed == 0 and self.bandwidth == 0

    def spec(self) -> str:
        """A string ``parse`` turns back into this profile (to pass to a child process)."""
        if self.name in PROFILES:
            return self.name
        return f"{self.t_fixed * 1e6:g}:{self.t_doorbell * 1e6:g}:{self.bandwidth / 1e6:g}"


PROFILES: dict[str, CostProfile] = {
    "none": CostProfile("none"),
    "sev-2020": CostProfile("sev-2020", t_doorbell=300e-6, t_fixed=1700e-6, bandwidth=8.192e6),
}


def parse(spec: str | CostProfile) -> CostProfile:
    """A profile by name (``none``, ``sev-2020``) or ``fixed_us:doorbell_us:mb_per_s``."""
    if isinstance(spec, CostProfile):
        return spec
    if spec in PROFILES:
        return PROFILES[spec]
    parts = spec.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        fixed, door, mbps = (float(p) for p in parts)
        if min(fixed, door, mbps) < 0:
            raise ValueError
    except ValueError:
        names = ", ".join(PROFILES)
        raise ValueError(
            f"unknown PSP cost profile {spec!r}: use one of {names} or fixed_us:doorbell_us:mb_per_s"
        ) from None
    return CostProfile(spec, t_doorbell=door * 1e-6, t_fixed=fixed * 1e-6, bandwidth=mbps * 1e6)


def wait_until(deadline: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``deadline``: coarse sleep, fine spin."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        if left > 300e-6:
            time.sleep(left - 200e-6)
