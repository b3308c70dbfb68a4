"""PNG plots of a `cvmig bench paper` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

_MODES = ("page", "queue", "contig", "contig-qemu", "contig64", "sg")
_THROTTLES = ("none", "auto-converge", "precopy", "dirty-limit")


def _order(m: dict[str, Any]) -> tuple[int, int]:
    """Throttle groups in a fixed order (none first), batching modes within each."""
    return (_THROTTLES.index(m["throttle"]) if m["throttle"] in _THROTTLES else 99,
            _MODES.index(m["mode"]) if m["mode"] in _MODES else 99)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _label(m: dict[str, Any]) -> str:
    return f"{m['mode']}\n{m['throttle']}"


def plot_times(summary: list[dict[str, Any]], out: Path) -> list[Path]:
    """Migration time and downtime per configuration, one figure per profile."""
    paths = []
    for profile in sorted({m["profile"] for m in summary}):
        rows = [m for m in summary if m["profile"] == profile]
        workloads = sorted({m["workload"] for m in rows})
        fig, axes = plt.subplots(len(workloads), 2, figsize=(14, 3.2 * len(workloads)),
                                 squeeze=False)
        for i, wl in enumerate(workloads):
            sel = sorted((m for m in rows if m["workload"] == wl), key=_order)
            labels = [_label(m) for m in sel]
            for j, (key, title) in enumerate((("total_ms", "migration time (ms)"),
                                              ("downtime_ms", "downtime (ms)"))):
                ax = axes[i][j]
                colors = ["tab:gray" if m["mode"] == "page" and m["throttle"] == "none"
                          else "tab:blue" for m in sel]
                ax.bar(range(len(sel)), [m[key] for m in sel], color=colors)
                ax.set_xticks(range(len(sel)), labels, fontsize=7)
                ax.set_title(f"{wl} — {title}", fontsize=9)
                if key == "downtime_ms":
                    ax.axhline(300, color="tab:red", lw=0.8, ls="--", label="downtime-limit")
                    ax.legend(fontsize=7)
        fig.suptitle(f"cvmig bench paper — PSP profile {profile} (gray: page baseline)")
        paths.append(_save(fig, out / f"time_downtime_{profile}.png"))
    return paths


def _pick_dirtier(results: list[dict[str, Any]], profile: str,
                  fastest: bool = False) -> str | None:
    """The dirtier nearest the transfer rate, or the fastest one."""
    wls = sorted({r["row"]["workload"] for r in results
                  if r["row"]["profile"] == profile and r["row"]["workload"].startswith("dirtier")},
                 key=lambda w: -_frac(results, w) if fastest else abs(_frac(results, w) - 1.0))
    return wls[0] if wls else None


def _frac(results: list[dict[str, Any]], wl: str) -> float:
    for r in results:
        if r["row"]["workload"] == wl:
            return float(r["row"].get("dirty_fraction", 0.0))
    return 0.0


def plot_rounds(results: list[dict[str, Any]], out: Path) -> Path | None:
    """Pages sent per round for the dirtier nearest the transfer rate."""
    wl = _pick_dirtier(results, "none")
    if wl is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4))
    for r in results:
        row, rep = r["row"], r["report"]
        if rep is None or row["profile"] != "none" or row["workload"] != wl or row["rep"] != 0:
            continue
        pages = [x["pages"] for x in rep["rounds"]]
        if row["throttle"] == "none":
            a.plot(range(len(pages)), pages, marker="o", label=row["mode"])
        if row["mode"] == "page":
            b.plot(range(len(pages)), pages, marker="o", label=row["throttle"])
    for ax, title in ((a, "by batching mode (no throttle)"), (b, "by throttle (page mode)")):
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (0 = bulk, last = stop-and-copy)")
        ax.set_ylabel("pages sent")
        ax.set_title(f"{wl}: pages per round, {title}", fontsize=9)
        ax.legend(fontsize=8)
    return _save(fig, out / "pages_per_round.png")


def plot_firmware(results: list[dict[str, Any]], out: Path) -> Path | None:
    """Firmware µs per page against pages per command, as the engine saw it."""
    pts: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        row = r["row"]
        if row["status"] != "completed" or not row.get("psp_commands"):
            continue
        pts.setdefault(f"{row['profile']}:{row['mode']}", []).append(
            (row["pages_per_command"], row["psp_us_per_page"]))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, xy in sorted(pts.items()):
        ax.scatter([x for x, _ in xy], [y for _, y in xy], label=name, s=18)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pages per firmware command")
    ax.set_ylabel("firmware µs per page (mailbox included)")
    ax.set_title("Per-page firmware cost falls with the batch", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, out / "firmware_us_per_page.png")


def plot_guest(results: list[dict[str, Any]], out: Path) -> Path | None:
    """Guest throughput over time under each throttle policy (page mode, the dirtier that
    dirties fastest: where throttling has to act)."""
    wl = _pick_dirtier(results, "none", fastest=True)
    if wl is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        row, rep = r["row"], r["report"]
        if rep is None or row["profile"] != "none" or row["workload"] != wl or \
                row["mode"] != "page" or row["rep"] != 0:
            continue
        tl = rep["guest"]["timeline"]
        if len(tl) < 2:
            continue
        xs, ys = [], []
        j = 0
        for t1, o1 in tl:  # rate over a trailing window of >= 0.2 s: per-chunk rates are noise
            while j + 1 < len(tl) and t1 - tl[j + 1][0] >= 0.2:
                j += 1
            t0, o0 = tl[j]
            if t1 - t0 >= 0.2:
                xs.append(t1)
                ys.append((o1 - o0) / (t1 - t0))
        ax.plot(xs, ys, label=f"{row['throttle']} (before: {row['ops_before']:.0f}/s)")
    ax.set_xlabel("seconds since migration start")
    ax.set_ylabel("guest pages written per second")
    ax.set_title(f"{wl}: what the guest keeps under each throttle policy", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out / "guest_throughput.png")


def plot_all(results: list[dict[str, Any]], summary: list[dict[str, Any]],
             out: Path) -> list[Path]:
    paths = plot_times(summary, out)
    for f in (plot_rounds, plot_firmware, plot_guest):
        p = f(results, out)
        if p is not None:
            paths.append(p)
    return paths
