"""One migration from start to report: boot the source, find or start the destination,
migrate, verify, and describe it all in QEMU's words."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from cvmig.guest.vm import GuestConfig
from cvmig.migration.driver import MigrationParams, Observer
from cvmig.migration.host import Host, busy_cpu_seconds
from cvmig.migration.messages import clean
from cvmig.migration.report import full_report
from cvmig.migration.source import (
    MigrationFailed,
    MigrationInDoubt,
    Outcome,
    SourceVM,
    guest_ops,
    migrate_out,
)
from cvmig.psp.api import Batching, Policy
from cvmig.psp.child import ENV as LIFELINE_ENV
from cvmig.wire.protocol import IO_TIMEOUT_S
from cvmig.wire.tls import TlsCreds

DEFAULT_POLICY = int(Policy.NODBG | Policy.ES)


@dataclass
class MigrateOptions:
    guest: GuestConfig
    params: MigrationParams = field(default_factory=MigrationParams)
    psp_profile: str = "none"
    policy: int = DEFAULT_POLICY
    warmup_s: float = 1.0  # the guest runs this long before migration: "throughput before"
    io_timeout_s: float = IO_TIMEOUT_S  # silence from the destination while pages stream
    tls: TlsCreds | None = None  # mutual TLS; a local destination uses the same creds
    prestart: bool = True  # a local destination starts its vCPU processes before we connect


class DestinationProcess:
    """`cvmig vm --incoming` as a child process on this machine (a second host)."""

    def __init__(self, psp_profile: str = "none", host: str = "127.0.0.1",
                 contig_cap: int = 4, extra: list[str] | None = None) -> None:
        cmd = [sys.executable, "-m", "cvmig", "vm", "--incoming", f"tcp:{host}:0",
               "--psp-profile", psp_profile, "--max-contig-pages", str(contig_cap),
               "--once", "--announce", *(extra or [])]
        # its lifeline: it reads end of file when we die, even by kill -9, and the
        # destination then ends (with its PSP and vCPUs, which watch it the same way)
        ours, theirs = socket.socketpair()
        env = os.environ.copy()
        env[LIFELINE_ENV] = str(theirs.fileno())
        try:
            # a session of its own: a terminal's Ctrl-C reaches only us, and we cancel
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=env, pass_fds=(theirs.fileno(),),
                                         start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._lifeline = ours
        line = self._read_event(timeout=60.0)
        if line.get("event") != "listening":
            self.close()
            raise MigrationFailed(f"destination did not start: {clean(line)}")
        self.port = int(line["port"])
        self.uri = f"tcp:{host}:{self.port}"
        self.pid = self.proc.pid

    def _read_event(self, timeout: float) -> dict[str, Any]:
        """Its next event; if none comes within ``timeout`` s it is killed, and its end
        is the event (readline has no timeout of its own)."""
        assert self.proc.stdout is not None
        timer = threading.Timer(timeout, self.proc.kill)
        timer.daemon = True
        timer.start()
        try:
            return self._next_event(timeout)
        finally:
            timer.cancel()

    def _next_event(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                self.proc.wait(timeout)
                return {"event": "exited", "code": self.proc.returncode,
                        "stderr": err[-2000:]}
            try:
                return dict(json.loads(line))
            except (ValueError, TypeError):
                continue  # not one of its events (a stray line on its stdout)

    def result(self, timeout: float = 120.0) -> dict[str, Any]:
        """The destination's last word (migrated or failed), then wait for it to exit."""
        ev = self._read_event(timeout)
        self.proc.wait(timeout)
        return ev

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        self._lifeline.close()


def tls_args(tls: TlsCreds | None) -> list[str]:
    """`cvmig vm` options for a local destination with the same TLS credentials."""
    if tls is None:
        return []
    return ["--tls-creds", str(tls.directory)] + (
        ["--tls-authz", ",".join(tls.authz)] if tls.authz else [])


def contig_cap(params: MigrationParams) -> int:
    """The contig cap both PSPs must allow for these parameters (at least the spec's)."""
    return max(4, params.cap) if params.batching is Batching.CONTIG else 4


def migrate_local_or_remote(
    opts: MigrateOptions,
    uri: str | None = None,
    observer: Observer | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    log: IO[str] | None = None,
) -> dict[str, Any]:
    """Boot a source guest, migrate it to ``uri`` (or to a fresh local destination
    process), and return the report. Raises MigrationFailed with the guest left running
    on the source (and then shut down here, since this call owns it)."""
    from cvmig.bench.machine import machine_info

    opts.params.validate()
    opts.guest.validate()
    dest: DestinationProcess | None = None
    started = False
    cap = contig_cap(opts.params)
    with Host("source", opts.psp_profile, contig_cap=cap) as host:
        vm = SourceVM.boot(host, opts.guest, opts.policy)
        try:
            if uri is None:
                # its vCPU processes start before it says it listens: off the clock, as
                # a QEMU destination started with -incoming before `migrate`
                prestart = ["--vcpus", str(opts.guest.vcpus)] if opts.prestart else \
                    ["--no-prestart"]
                dest = DestinationProcess(opts.psp_profile, contig_cap=cap,
                                          extra=[*prestart, *tls_args(opts.tls)])
                uri = dest.uri
            ops0, t0, cpu0 = guest_ops(vm.guest), time.monotonic(), vm.guest.cpu_seconds()
            _run_for(vm, opts.warmup_s, should_cancel)
            ops1, t1, cpu1 = guest_ops(vm.guest), time.monotonic(), vm.guest.cpu_seconds()
            busy1 = busy_cpu_seconds()
            if should_cancel():
                raise MigrationFailed("migration cancelled before it started")
            started = True
            outcome = migrate_out(vm, uri, opts.params, observer, should_cancel,
                                  io_timeout=opts.io_timeout_s, tls=opts.tls)
        except MigrationInDoubt as e:
            if e.hold is not None:
                e.hold.release()  # this call owns the copy and ends here (see cli.migrate)
            vm.shutdown()
            raise
        except BaseException:
            vm.shutdown()
            raise
        finally:
            dest_result: dict[str, Any] = {}
            if dest is not None:
                # one we never connected to has no last word to wait for
                try:
                    dest_result = dest.result() if started else {}
                except Exception:  # noqa: BLE001 - a report without it is still a report
                    dest_result = {}
                dest.close()
        tracker = vm.guest.tracker_kind
    return _report(opts, outcome, tracker, (ops0, t0, ops1, t1), (cpu0, cpu1, busy1),
                   dest_result, machine_info())


def _run_for(vm: SourceVM, seconds: float,
             should_cancel: Callable[[], bool] = lambda: False) -> None:
    """Let the guest run for a while: the warm-up is part of the measurement."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not should_cancel():
        time.sleep(min(left, 0.1))


def _report(opts: MigrateOptions, out: Outcome, tracker: str,
            before: tuple[float, float, float, float], cpu: tuple[float, float, float],
            dest: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    ops0, t0, ops1, t1 = before
    p = out.progress
    verified: dict[str, Any] = dict(out.verified or dest.get("report", {}))
    during_ops = out.ops_at_pause - ops1
    during_s = max(p.pause_time - t1, 1e-9) if p.pause_time else 0.0
    after_s = float(verified.get("verify_time", 0.0) or 0.0)
    gap = float(verified.get("observed_gap", 0.0) or 0.0)
    guest = {
        "ops-per-s-before": round((ops1 - ops0) / max(t1 - t0, 1e-9), 1),
        "ops-per-s-during": round(during_ops / during_s, 1) if during_s else 0.0,
        "ops-per-s-after": round(float(verified.get("ops_after", 0)) / after_s, 1)
        if after_s else 0.0,
        "observed-gap-ms": round(gap * 1000, 3),
        # host cores the vCPUs kept busy: a small host's migration shares them
        "cpu-cores-before": round((cpu[1] - cpu[0]) / max(t1 - t0, 1e-9), 3),
        "cpu-cores-during": round((out.cpu_at_pause - cpu[1]) / during_s, 3)
        if during_s else 0.0,
        # (seconds since migration start, guest operations so far), one point per chunk sent
        "timeline": [[round(t - p.start, 4), o - ops1] for t, o in out.timeline],
        "workload": str(opts.guest.workload),
        "memory": opts.guest.memory,
        "vcpus": opts.guest.vcpus,
    }
    dest_digest = str(out.confirm.get("digest", ""))
    verify = {
        "memory": "match" if dest_digest and dest_digest == out.source_digest else
        {"mismatch": {"source": out.source_digest, "destination": dest_digest}},
        "source-digest": out.source_digest,
        "destination-digest": dest_digest,
        "workload": verified.get("check", {}),
    }
    rep = full_report(p, opts.params, psp_profile=opts.psp_profile, tracker=tracker,
                      guest=guest, verify=verify, machine=machine)
    # what the migration took from this host's cores (the model's contention, on a host
    # whose guest and migration share them): busy cores from the start to the pause, and
    # what the destination spent meanwhile starting its vCPUs and faulting its memory in
    rep["x-host-cpu"] = {
        "cores": os.cpu_count() or 1,
        "busy-cores-precopy": round((out.busy_at_pause - cpu[2]) / during_s, 3)
        if during_s and out.busy_at_pause else None,
        "destination-start-cpu-s": verified.get("start_cpu_s"),
        # from START to its first import: the destination readying itself
        "destination-ready-s": verified.get("ready_s"),
    }
    return rep
