"""What stopping costs, besides moving the last dirty pages: measured, remembered, counted.

The downtime of a migration is the pages still dirty at the pause plus a fixed part that
no batching shortens: the vCPUs' pause acknowledgement, their VMSAs through both secure
processors, the page-state frame and the finish trailer, the destination's RECEIVE_FINISH
and the start of its vCPUs, and the lease grant that lets them run (a round trip). The
switch-over rule (`cvmig.migration.driver`) counts it; this module says how much it is.

Each part is measured by the engine on every migration (the source times its own, the
destination reports its own in its verification frame) and kept per host in a small file
(``$CVMIG_STOP_COSTS``, default ``~/.cache/cvmig/stop-costs.json``; ``none`` keeps nothing),
keyed by the PSP cost profile and the vCPU count. The next migration counts a high
quantile of the recent measurements, so one slow stop (a noisy neighbour) does not make
every later migration hesitate, and a few do. Before any measurement, the defaults below
(measured on the development machine, docs/results/stop-costs.json) plus the profile's
firmware cost of the commands involved stand in.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cvmig.guest.vcpu import SLICE

KEEP = 8  # measurements kept per key and part
QUANTILE = 0.75  # the share of recent stops the estimate covers
MAX_SAMPLE_S = 1.0  # a part measured longer than this was a fault, not a cost: clipped
ENV = "CVMIG_STOP_COSTS"


@dataclass
class StopCosts:
    """Seconds each fixed part of the stop takes (the downtime without the dirty pages)."""

    pause: float = 0.0  # pause request -> every vCPU acknowledged, no write in flight
    vcpu_state: float = 0.0  # SEND_UPDATE_VMSA for each vCPU, the page-state frame
    trailer: float = 0.0  # the finish trailer, the shared-page digest, FINISH out
    finish: float = 0.0  # destination: FINISH in -> RECEIVE_FINISH, restore -> CONFIRM out
    grant: float = 0.0  # CONFIRM out -> the source's grant in -> the vCPUs running there
    # not a cost but how the guest sees it: its gap runs from the start of its last
    # timeslice before the pause (at most one slice, guest.vcpu.SLICE, before it) to its
    # vCPUs running after the resume
    slice: float = 0.0

    def total(self) -> float:
        return (self.pause + self.vcpu_state + self.trailer + self.finish + self.grant
                + self.slice)

    def as_ms(self) -> dict[str, float]:
        return {k: round(v * 1000, 2) for k, v in asdict(self).items()}

    @classmethod
    def from_ms(cls, d: dict[str, object]) -> StopCosts:
        names = {f.name for f in fields(cls)}
        return cls(**{k: float(v) / 1000 for k, v in d.items()
                      if k in names and isinstance(v, int | float)})


# the parts a stop measures (the slice is how the guest sees it, not a cost)
MEASURED_PARTS = tuple(f.name for f in fields(StopCosts) if f.name != "slice")


def default_costs(vcpus: int, command_s: float = 0.0) -> StopCosts:
    """Before any measurement: what this machine's engine took (idle guest, no cost
    profile; medians), plus ``command_s`` per firmware command a stop needs (a VMSA per
    vCPU at each end, the trailer, RECEIVE_FINISH) on profiled hardware."""
    return StopCosts(
        pause=0.002 + 0.0005 * vcpus,
        vcpu_state=(0.002 + 2 * command_s) * vcpus,
        trailer=0.002 + command_s,
        # RECEIVE_FINISH and the restore: the standby vCPU processes take up their state
        # (~4 ms for two here, quiet; more when the machine is loaded, as a process must
        # be woken per vCPU): the default errs long (it costs pre-copy time, not the promise)
        finish=0.015 + 0.005 * vcpus + command_s,
        grant=0.004,
        slice=SLICE,
    )


def _path() -> Path | None:
    env = os.environ.get(ENV)
    if env is not None:
        return None if env in ("", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cvmig" / "stop-costs.json"


def _key(profile: str, vcpus: int) -> str:
    return f"{profile}/{vcpus}"


def _load() -> dict[str, dict[str, list[float]]]:
    path = _path()
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _quantile(xs: list[float], q: float) -> float:
    if len(xs) == 1:
        return xs[0]
    return float(statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1])


def estimate(profile: str, vcpus: int, command_s: float = 0.0) -> tuple[StopCosts, int]:
    """The stop costs to count for a migration, and how many measurements back them
    (0: the defaults). Parts never measured keep their default."""
    est = default_costs(vcpus, command_s)
    hist = _load().get(_key(profile, vcpus), {})
    n = 0
    for name in MEASURED_PARTS:
        xs = [float(x) for x in hist.get(name, []) if isinstance(x, int | float)]
        if xs:
            setattr(est, name, _quantile(xs, QUANTILE))
            n = max(n, len(xs))
    return est, n


def record(profile: str, vcpus: int, measured: StopCosts) -> None:
    """Add one migration's measurements (parts measured as 0 are left out)."""
    path = _path()
    if path is None:
        return
    data = _load()
    hist = data.setdefault(_key(profile, vcpus), {})
    for name in MEASURED_PARTS:
        v = getattr(measured, name)
        if v > 0:
            hist[name] = [*hist.get(name, []), min(v, MAX_SAMPLE_S)][-KEEP:]
    with contextlib.suppress(OSError):  # a cache: losing it costs accuracy, nothing else
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
