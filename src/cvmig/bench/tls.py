"""`cvmig bench tls`: what mutual TLS costs, measured side by side in one run.

Two measurements, each alternating plain TCP and TLS rep by rep (so that a load that comes
and goes on a shared machine falls on both alike), medians compared as ratios:

- channel: bulk frames (1 MiB of data each, an acknowledgement back for each, as the
  migration sends pages) over loopback: the cost of TLS itself, no PSP in the way;
- migration: the same whole migration (a local destination process, same guest, same
  parameters) with and without --tls-creds: what a user sees, PSP and guest included.

Credentials come from a throw-away `cvmig pki` CA made for the run.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from cvmig.bench.machine import SideBySideLog

MiB = 1 << 20
CHANNEL_FRAME = 1 * MiB


def channel_rate(tls: Any, total: int) -> float:
    """MB/s of bulk frames, one ACK back per frame, over a loopback connection (TLS when
    ``tls`` is a pair of creds (client, server), else plain TCP)."""
    import socket

    from cvmig.wire.channel import Channel
    from cvmig.wire.frames import FrameType
    from cvmig.wire.tls import client_wrap, server_wrap

    client_creds, server_creds = tls if tls else (None, None)
    srv = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        c, _ = srv.accept()
        c.settimeout(30.0)
        accepted.append(server_wrap(c, server_creds))

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    raw = socket.create_connection(srv.getsockname(), timeout=30.0)
    tx = Channel(client_wrap(raw, client_creds, "localhost"))
    t.join(30.0)
    srv.close()
    if not accepted:
        raise click.ClickException("the channel benchmark's handshake did not complete")
    rx = Channel(accepted[0])
    frames = max(1, total // CHANNEL_FRAME)
    data = memoryview(bytearray(CHANNEL_FRAME))
    errors: list[BaseException] = []

    def send() -> None:  # pages one way, acknowledgements the other, as a migration
        try:
            for _ in range(frames):
                tx.send(FrameType.PAGE_STATE, b"", [data])
            for _ in range(frames):
                tx.recv_frame()
        except BaseException as e:  # noqa: BLE001 - reported below, in this thread
            errors.append(e)

    buf = memoryview(bytearray(CHANNEL_FRAME))
    t0 = time.perf_counter()
    s = threading.Thread(target=send, daemon=True)
    s.start()
    for _ in range(frames):
        h = rx.recv_header()
        rx.recv_meta(h)
        rx.recv_into(buf[: h.data_len])
        rx.send(FrameType.HEARTBEAT, b"{}")
    s.join(60.0)
    dt = time.perf_counter() - t0
    tx.close()
    rx.close()
    if errors or s.is_alive():
        raise click.ClickException(f"the channel benchmark failed: {errors[:1] or 'stuck'}")
    return frames * CHANNEL_FRAME / dt / 1e6


def migration_run(memory: int, workload: str, tls: Any) -> dict[str, Any]:
    """One whole migration to a local destination process; its key figures."""
    from cvmig.guest.vm import GuestConfig
    from cvmig.guest.workloads import parse_workload
    from cvmig.migration.parameters import CLI_DEFAULTS, build
    from cvmig.migration.session import MigrateOptions, migrate_local_or_remote

    # `cvmig migrate`'s defaults (aead): the fastest data path is where TLS shows most
    opts = MigrateOptions(guest=GuestConfig(memory=memory, vcpus=2,
                                            workload=parse_workload(workload)),
                          params=build(dict(CLI_DEFAULTS)), warmup_s=0.5, tls=tls)
    t0 = time.monotonic()
    rep = migrate_local_or_remote(opts)
    ram = rep.get("ram", {})
    return {"total_ms": float(rep.get("total-time", 0)),
            "downtime_ms": float(rep.get("downtime", 0)),
            "mbps": float(ram.get("mbps", 0)),
            "transferred": int(ram.get("transferred", 0)),
            "verified": rep.get("verify", {}).get("memory") == "match",
            "wall_s": round(time.monotonic() - t0, 3)}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def summarize(plain: list[dict[str, Any]], tls: list[dict[str, Any]],
              keys: tuple[str, ...], names: tuple[str, str] = ("plain", "tls")) -> dict[str, Any]:
    """Medians and their ratio, and the median of the per-rep ratios (each second-kind run
    against the first-kind run just before it: steadier when the machine's load drifts).
    ``names``: the two kinds' keys in the result."""
    out: dict[str, Any] = {}
    for k in keys:
        p, t = _median(plain, k), _median(tls, k)
        pairs = [b[k] / a[k] for a, b in zip(plain, tls, strict=True) if a[k]]
        out[k] = {names[0]: round(p, 3), names[1]: round(t, 3),
                  "ratio": round(t / p, 3) if p else None,
                  "paired_ratio": round(statistics.median(pairs), 3) if pairs else None}
    return out


@click.command("tls")
@click.option("-m", "--memory", default="256M", show_default=True,
              help="Guest memory for the migration runs.")
@click.option("-w", "--workload", default="idle", show_default=True,
              help="Guest workload (idle: every run moves the same pages).")
@click.option("--reps", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Runs of each kind (plain and TLS alternate); medians are compared.")
@click.option("--channel-mib", type=click.IntRange(16, 8192), default=512, show_default=True,
              help="MiB of bulk frames per channel run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("docs/results/tls.json"), show_default=True,
              help="Results; a log (.log) goes beside it.")
def tls(memory: str, workload: str, reps: int, channel_mib: int, json_path: Path) -> None:
    """What mutual TLS costs: channel throughput and a whole migration, with and without
    TLS, side by side in one run (ratios; the machine is printed)."""
    from cvmig.guest.workloads import parse_workload
    from cvmig.migration.source import MigrationFailed
    from cvmig.pki import create
    from cvmig.units import parse_size
    from cvmig.wire.tls import TlsCreds

    try:
        mem = parse_size(memory)
        parse_workload(workload)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    say = SideBySideLog("rates")
    with tempfile.TemporaryDirectory(prefix="cvmig-bench-tls-") as d:
        create(d, ["localhost"], days=1)
        creds = TlsCreds.load(Path(d) / "localhost")
        pair = (creds, creds)
        chan: dict[str, list[dict[str, Any]]] = {"plain": [], "tls": []}
        for i in range(reps):
            for kind in ("plain", "tls"):
                rate = channel_rate(pair if kind == "tls" else None, channel_mib * MiB)
                chan[kind].append({"mbytes_per_s": rate})
                say(f"channel {kind:5} rep {i + 1}: {rate:8.0f} MB/s")
        migr: dict[str, list[dict[str, Any]]] = {"plain": [], "tls": []}
        for i in range(reps):
            for kind in ("plain", "tls"):
                try:
                    r = migration_run(mem, workload, creds if kind == "tls" else None)
                except MigrationFailed as e:
                    raise click.ClickException(f"{kind} migration failed: {e}") from None
                migr[kind].append(r)
                say(f"migration {kind:5} rep {i + 1}: total {r['total_ms']:8.1f} ms, "
                    f"downtime {r['downtime_ms']:6.1f} ms, {r['mbps']:7.0f} Mbit/s, "
                    f"verified {r['verified']}")
    channel = summarize(chan["plain"], chan["tls"], ("mbytes_per_s",))
    migration = summarize(migr["plain"], migr["tls"], ("total_ms", "downtime_ms", "mbps"))
    say("")
    say(f"median of {reps}          plain        TLS   TLS/plain  paired")
    c = channel["mbytes_per_s"]
    say(f"channel MB/s     {c['plain']:10.0f} {c['tls']:10.0f}   {c['ratio']:9.2f}  "
        f"{c['paired_ratio']:6.2f}")
    for key, label in (("mbps", "migration Mbit/s"), ("total_ms", "total time ms"),
                       ("downtime_ms", "downtime ms")):
        m = migration[key]
        say(f"{label:16} {m['plain']:10.1f} {m['tls']:10.1f}   {m['ratio']:9.2f}  "
            f"{m['paired_ratio']:6.2f}")
    say("paired: the median of each rep's TLS/plain ratio")
    say.write(json_path, {"memory": mem, "workload": workload, "reps": reps,
              "channel_mib": channel_mib, "channel": channel, "migration": migration,
              "runs": {"channel": chan, "migration": migr}})
