"""The migration report: QEMU's query-migrate names at the top level, cvmig's own below."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from cvmig.migration.driver import MigrationParams, Progress
from cvmig.psp.api import PAGE_SIZE


def query_migrate(p: Progress) -> dict[str, Any]:
    """MigrationInfo as QEMU fills it in for the current status (qapi/migration.json)."""
    info: dict[str, Any] = {"status": p.status}
    if p.status in ("none", "setup", "failed", "cancelled", "cancelling"):
        if p.error:
            info["error-desc"] = p.error
        if p.status == "cancelling":
            info.update(_times(p))
        return info
    info.update(_times(p))
    completed = p.status == "completed"
    if completed:  # QEMU: over the whole transfer at completion, else the last window
        mbps = p.transferred * 8 / max(p.total_time - p.setup_time, 1e-9) / 1e6
    else:
        mbps = p.bandwidth * 8 / 1e6
    info["ram"] = {
        "transferred": p.transferred,
        "remaining": 0 if completed else p.remaining_pages * PAGE_SIZE,
        "total": p.total_pages * PAGE_SIZE,
        "duplicate": 0,  # private pages are ciphertext: no zero-page detection (as in SEV)
        "normal": p.pages_sent,
        "normal-bytes": p.pages_sent * PAGE_SIZE,
        "dirty-sync-count": p.dirty_sync_count,
        "mbps": round(mbps, 3),
        "pages-per-second": int(p.pages_per_second),
        "dirty-pages-rate": 0 if completed else int(p.dirty_pages_rate),
        "page-size": PAGE_SIZE,
        "precopy-bytes": sum(r.bytes for r in p.rounds if r.kind != "stop-and-copy"),
        "downtime-bytes": sum(r.bytes for r in p.rounds if r.kind == "stop-and-copy"),
        "postcopy-bytes": 0,
    }
    if p.throttle_pct:
        info["cpu-throttle-percentage"] = p.throttle_pct
    return info


def _times(p: Progress) -> dict[str, Any]:
    out: dict[str, Any] = {
        "total-time": int(p.total_time * 1000),
        "setup-time": int(p.setup_time * 1000),
    }
    if p.status == "completed":
        out["downtime"] = int(p.downtime * 1000)
    else:
        out["expected-downtime"] = int(p.expected_downtime_ms)
    return out


def full_report(
    p: Progress,
    params: MigrationParams,
    *,
    psp_profile: str,
    tracker: str,
    guest: dict[str, Any],
    verify: dict[str, Any],
    machine: dict[str, Any],
) -> dict[str, Any]:
    rep = query_migrate(p)
    psp_pages = sum(r.pages for r in p.rounds)
    rep["rounds"] = [
        {**asdict(r), "mbps": round(r.bandwidth * 8 / 1e6, 3)} for r in p.rounds
    ]
    rep["psp"] = {
        "commands": p.psp_commands,
        "doorbells": p.psp_doorbells,
        "pages": psp_pages,
        "time-ms": round(p.psp_seconds * 1000, 3),
        "us-per-page": round(p.psp_seconds * 1e6 / psp_pages, 3) if psp_pages else 0.0,
        "profile": psp_profile,
    }
    rep["x-switchover"] = p.switchover
    if p.status == "completed":
        # QEMU's `downtime` is whole ms, cut down: 8.9 ms reads 8. A stop of a few ms
        # (most here) wants the fraction: a model's error, a claim's spread
        rep["x-downtime-ms"] = round(p.downtime * 1000, 3)
    # each sync's own time, ms: the dirty log's harvest and the decision on it (the last:
    # the stop's, in the downtime); what the model counts per sync (`Costs.sync`)
    rep["x-sync-ms"] = [round(t * 1000, 3) for t in p.sync_seconds]
    rep["x-stop"] = {"expected-downtime-ms": round(p.expected_downtime_ms, 1),
                     "costs-counted-ms": p.stop_costs, "costs-measured-ms": p.stop_costs_measured,
                     "cap": p.stop_cap}  # the switch-over rule's view (migration/stopcost.py)
    rep["guest"] = guest
    rep["verify"] = verify
    rep["params"] = {
        "downtime-limit": params.downtime_limit_ms,
        "max-bandwidth": params.max_bandwidth,
        "x-batching": str(params.batching),
        "x-batch-cap": params.cap,
        "x-queue": params.queue,
        "x-throttle": str(params.throttle),
        **{k.replace("_", "-"): v for k, v in asdict(params.throttle_params).items()},
        "x-max-rounds": params.max_rounds,
        "x-timeout": params.timeout_s,
        "x-timeout-action": str(params.timeout_action),
        "x-switchover": str(params.switchover),
        "x-dirty-tracker": tracker,
    }
    rep["machine"] = machine
    return rep


def downtime_ms(rep: dict[str, Any]) -> float:
    """A completed migration's downtime in ms, with its fraction where the report has it
    (reports written before it had: QEMU's whole ms)."""
    return float(rep.get("x-downtime-ms", rep["downtime"]))
