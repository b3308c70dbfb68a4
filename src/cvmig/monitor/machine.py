"""The VM behind a monitor: its run state, its guest, and at most one migration at a time.

Monitor commands and the migration thread meet here, under one lock. A command that does
not fit the state is refused with a QMPError and changes nothing. Where cvmig differs
from QEMU it is stricter, because its guest cannot do what QEMU's could:

- ``stop``/``cont`` are refused while a migration is in progress (QEMU allows them): the
  migration owns the vCPUs, and a guest paused by the user would be resumed by a
  rollback or at the destination.
- ``migrate`` needs a running guest, for the same reason.
- after a completed migration the guest is released (its PSP context is SENT): ``cont``
  is refused instead of starting a second copy.
- once ``migrate`` starts, only the live parameters may change (downtime-limit,
  max-bandwidth, the throttle's, most ``x-`` ones: `cvmig.migration.parameters`); they
  apply from the driver's next send. The others were agreed with the destination.

Events go through ``emit`` (name, data); the monitor sends them to its clients. MIGRATION
and MIGRATION_PASS need the ``events`` capability, as in QEMU; STOP and RESUME do not.
They go out at the moments they name, in QEMU's order: the source's STOP when its vCPUs
have stopped, then MIGRATION device; its MIGRATION completed when the destination owns
the guest; the destination's RESUME when its vCPUs run, then MIGRATION completed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from cvmig.guest.vm import GuestConfig
from cvmig.migration.destination import VERIFY_WAIT_S, listen, migrate_in
from cvmig.migration.driver import MigrationParams, ParamsFeed, Progress
from cvmig.migration.host import Host
from cvmig.migration.listener import HANDSHAKE_TIMEOUT_S, Listener
from cvmig.migration.live import IN_PROGRESS, Clock, RateMeter, migration_info, sync_count
from cvmig.migration.messages import clean
from cvmig.migration.source import (
    MigrationFailed,
    MigrationInDoubt,
    SourceHold,
    SourceVM,
    migrate_out,
)
from cvmig.monitor.params import Settings
from cvmig.monitor.protocol import QMPError
from cvmig.psp.api import Batching
from cvmig.wire.channel import parse_uri, shutdown
from cvmig.wire.tls import TlsCreds, TlsError, own_name

Emit = Callable[[str, dict[str, Any] | None], None]


def _no_emit(name: str, data: dict[str, Any] | None) -> None:
    pass


@dataclass
class Job:
    """One migration, outgoing or incoming, as query-migrate reports it."""

    incoming: bool = False
    status: str = "none"
    progress: Progress = field(default_factory=Progress)
    params: MigrationParams | None = None
    meter: RateMeter = field(default_factory=RateMeter)
    error: str = ""
    passes: int = 0  # MIGRATION_PASS events sent
    in_doubt: str = ""  # why the guest is held paused, in doubt (migration README)
    hold: SourceHold | None = None  # outgoing, in doubt: the paused copy kept here
    clock: Clock = field(default_factory=Clock)  # when its MIGRATION events went out
    feed: ParamsFeed | None = None  # outgoing: where live parameter changes go
    guest_gap_s: float | None = None  # the longest pause the guest itself saw

    @property
    def outgoing_in_progress(self) -> bool:
        return not self.incoming and self.status in IN_PROGRESS


class Machine:
    """A source VM (boot) or a destination waiting for one (listen); either can later
    migrate its guest out."""

    def __init__(self, host: Host, emit: Emit = _no_emit, contig_cap: int = 4) -> None:
        self.host = host
        self.contig_cap = contig_cap  # the largest contig command this host's PSP takes
        self.emit = emit
        self.lock = threading.RLock()
        self.settings = Settings()
        self.vm: SourceVM | None = None
        self.runstate = "prelaunch"
        self.job = Job()
        self._worker: threading.Thread | None = None
        self._cancel = threading.Event()
        self._closing = threading.Event()
        self._listener: Listener | None = None
        self._conn: socket.socket | None = None
        self._deferred: float | None = None  # --incoming defer: the handshake timeout

    # -- state changes (caller holds the lock) ------------------------------------------
    def _status(self, status: str) -> None:
        if status != self.job.status:
            self.job.status = status
            if status in ("setup", "active", "completed"):  # the figures' time marks
                setattr(self.job.clock, status, time.monotonic())
            if self.settings.caps["events"]:
                self.emit("MIGRATION", {"status": status})

    def _runstate(self, state: str, event: str | None = None) -> None:
        self.runstate = state
        if event is not None:
            self.emit(event, None)

    # -- lifecycle ----------------------------------------------------------------------
    def boot(self, config: GuestConfig, policy: int) -> None:
        """A source: boot a fresh guest here."""
        vm = SourceVM.boot(self.host, config, policy)
        with self.lock:
            self.vm = vm
            self._runstate("running")

    def listen(self, addr: str, port: int,
               handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> int:
        """A destination: wait for a guest on addr:port (0: any free port); the port.
        Connections are vetted concurrently (`cvmig.migration.listener`): one that does
        not say HELLO as a source within ``handshake_timeout`` s is dropped, a second
        source while a guest comes in is refused as busy."""
        srv = Listener(listen(addr, port), handshake_timeout, tls=self._tls_creds())
        self._listener = srv
        with self.lock:
            self.runstate = "inmigrate"
            self.job = Job(incoming=True)
            self._status("setup")  # QEMU: -incoming puts the migration in setup at once
        self._worker = threading.Thread(target=self._incoming, args=(srv,),
                                        name="cvmig-incoming", daemon=True)
        self._worker.start()
        return srv.port

    def defer(self, handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        """A destination whose address comes later, with migrate-incoming (QEMU's
        ``-incoming defer``): parameters such as TLS can be set before it listens."""
        with self.lock:
            self.runstate = "inmigrate"
            self.job = Job(incoming=True)
            self._deferred = handshake_timeout

    def migrate_incoming(self, uri: str) -> None:
        with self.lock:
            if self._listener is not None:
                raise QMPError("The incoming migration has already been started")  # QEMU's
            if self._deferred is None:
                raise QMPError("'-incoming' was not specified on the command line")  # QEMU's
            if self._closing.is_set():
                raise QMPError("The VM is shutting down")
            try:
                addr, port = parse_uri(uri)
            except ValueError as e:
                raise QMPError(str(e)) from None
            try:
                self.listen(addr, port, self._deferred)
            except OSError as e:
                raise QMPError(f"Failed to bind socket: {e.strerror or e}") from None

    def socket_address(self) -> list[dict[str, Any]]:
        """query-migrate's socket-address on a destination: where it listens."""
        srv = self._listener
        if srv is None:
            return []
        host, port = srv.srv.getsockname()[:2]
        family = "ipv6" if srv.srv.family == socket.AF_INET6 else "ipv4"
        return [{"port": str(port), family: True, "host": host, "type": "inet"}]

    def close(self, timeout: float = 120.0) -> None:
        """Quit: cancel what runs, wait for it to roll back, shut the guest down."""
        self._closing.set()
        self._cancel.set()
        if self._listener is not None:
            self._listener.close()  # wakes a worker waiting for a source at once
        if self._conn is not None:
            with contextlib.suppress(OSError):
                shutdown(self._conn, socket.SHUT_RDWR)  # wakes recv() at once
        if self._worker is not None:
            self._worker.join(timeout)  # not under the lock: the worker needs it to finish
        with self.lock:
            if self.vm is not None:
                self.vm.shutdown()
                self.vm = None
            self.runstate = "shutdown"

    # -- run state ----------------------------------------------------------------------
    def query_status(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {"running": self.runstate == "running",
                                   "status": self.runstate}
            if self.job.in_doubt:
                out["x-in-doubt"] = self.job.in_doubt
            return out

    def resolve(self, keep: bool) -> None:
        """x-migrate-resolve: an operator's decision for an incoming guest held in doubt,
        delivered as `cvmig resolve` delivers it, through this host's own listener."""
        from cvmig.migration.resolve import resolve_in_doubt

        with self.lock:
            hold = self.job.hold
        if hold is not None:  # outgoing: keep = run it here again; discard = release it
            try:
                hold.keep() if keep else hold.release()
            except MigrationFailed as e:
                raise QMPError(str(e)) from None
            self._held_decided(self.job, hold)
            return
        with self.lock:
            if not self.job.in_doubt or self._listener is None:
                raise QMPError("No guest is held in doubt here")
            host, port = self._listener.srv.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        tls = self._tls_creds()
        if tls is not None:  # to our own listener: our certificate names it
            tls = TlsCreds(tls.directory, tls.authz, own_name(tls))
        try:
            resolve_in_doubt(f"tcp:{host}:{port}", keep, tls=tls)
        except (OSError, RuntimeError, TlsError) as e:
            raise QMPError(f"the decision could not be delivered: {e}") from None

    def _await_arrival(self) -> None:
        """An incoming guest runs (RESUME went out) before its arrival check ends and it
        is handed to this machine; a command that needs the guest waits for that."""
        with self.lock:
            arriving = self.job.incoming and self.vm is None and self.runstate == "running"
            worker = self._worker
        if arriving and worker is not None and worker is not threading.current_thread():
            worker.join(VERIFY_WAIT_S + 5.0)  # the check's own bound, and some

    def stop(self) -> None:
        self._await_arrival()
        with self.lock:
            if self.job.outgoing_in_progress:
                raise QMPError(f"Cannot stop the guest while a migration is in progress "
                               f"(status '{self.job.status}'); use migrate_cancel first")
            if self.runstate == "inmigrate":
                raise QMPError("The guest has not arrived yet: cvmig starts an incoming "
                               "guest when its migration completes; stop it after that")
            if self.runstate != "running" or self.vm is None:
                return  # QEMU: stopping a stopped VM does nothing
            self.vm.guest.pause()
            self._runstate("paused", "STOP")

    def cont(self) -> None:
        with self.lock:
            if self.job.outgoing_in_progress:
                raise QMPError(f"Cannot resume the guest while a migration is in progress "
                               f"(status '{self.job.status}')")
            if self.runstate == "inmigrate":
                return  # QEMU sets autostart; cvmig always starts an incoming guest
            if self.runstate == "postmigrate":
                raise QMPError("The guest has migrated away: its secure-processor context "
                               "here is SENT and can never run again")
            if self.runstate == "running":
                return  # QEMU: nothing to do
            if self.vm is None:
                raise QMPError(f"There is no guest to resume (status '{self.runstate}')")
            self.vm.guest.resume()
            self._runstate("running", "RESUME")

    # -- migration ----------------------------------------------------------------------
    def migrate(self, uri: str) -> None:
        self._await_arrival()
        with self.lock:
            if self.job.outgoing_in_progress:
                raise QMPError("There's a migration process in progress")  # QEMU's words
            if self.runstate == "inmigrate":
                raise QMPError("Guest is waiting for an incoming migration")  # QEMU's words
            if self.runstate == "postmigrate" or self.vm is None:
                raise QMPError(f"There is no guest here to migrate (status '{self.runstate}')")
            if self.runstate != "running":
                raise QMPError("cvmig migrates a running guest only: 'cont' it first")
            if self._closing.is_set():
                raise QMPError("The VM is shutting down")
            try:
                parse_uri(uri)
            except ValueError as e:
                raise QMPError(str(e)) from None
            params = self.settings.params()
            tls = self._tls_creds()
            if params.batching is Batching.CONTIG and params.cap > self.contig_cap:
                raise QMPError(f"x-batch-cap {params.cap} is over this host's contig limit of "
                               f"{self.contig_cap} pages (cvmig vm --max-contig-pages)")
            feed = ParamsFeed()  # migrate-set-parameters reaches the running driver here
            job = Job(params=replace(params, updates=feed), feed=feed)
            self.job = job
            self._cancel.clear()
            self._status("setup")
            self._worker = threading.Thread(target=self._outgoing,
                                            args=(job, job.params, self.vm, uri, tls),
                                            name="cvmig-migrate", daemon=True)
            self._worker.start()

    def migrate_cancel(self) -> None:
        with self.lock:
            # QEMU: always succeeds. Stop-and-copy cannot be cancelled here: the driver
            # no longer looks, and the destination may already run the guest.
            if not self.job.incoming and self.job.status in ("setup", "active"):
                self._cancel.set()
                self._status("cancelling")

    def query_migrate(self) -> dict[str, Any]:
        with self.lock:
            job = self.job
        if job.incoming:  # QEMU's destination: its status, and where it listens
            info: dict[str, Any] = {} if job.status == "none" else {"status": job.status}
            if job.status == "failed" and job.error:
                info["error-desc"] = job.error
            if job.status != "completed" and (where := self.socket_address()):
                info["socket-address"] = where
            if job.in_doubt:
                info["x-in-doubt"] = job.in_doubt
            return info
        out = migration_info(job.status, job.progress, job.params, job.meter, error=job.error,
                             clock=job.clock, guest_gap_s=job.guest_gap_s)
        if job.in_doubt:  # released, not yet heard taken: our copy is held, paused
            out["x-in-doubt"] = job.in_doubt
        return out

    def set_parameters(self, args: dict[str, Any]) -> None:
        with self.lock:
            job = self.job
            migrating = job.outgoing_in_progress
            before = dict(self.settings.values)
            params = self.settings.set_parameters(args, migrating=migrating)
            try:
                tls = self._tls_creds()  # a bad directory is named now, not at 'migrate'
            except QMPError:
                self.settings.values = before  # all or nothing
                raise
            if self._listener is not None:
                self._listener.tls = tls  # from the next connection on, as QEMU's authz
            if migrating and job.feed is not None:
                # as QEMU: from the next round (here: the next send) of this migration
                job.params = replace(params, updates=job.feed)
                job.feed.put(job.params)

    def _tls_creds(self) -> TlsCreds | None:
        """tls-creds (a directory here, not QEMU's object id), tls-authz (a comma-separated
        list of identities, not an authz object) and tls-hostname, checked."""
        v = self.settings.values
        if not v["tls-creds"]:
            return None
        authz = [a for a in v["tls-authz"].split(",") if a.strip()]
        try:
            return TlsCreds.load(v["tls-creds"], authz, v["tls-hostname"] or None)
        except ValueError as e:
            raise QMPError(str(e).replace("--tls-creds", "tls-creds")) from None

    def set_capabilities(self, items: list[Any]) -> None:
        with self.lock:
            if self.job.outgoing_in_progress:
                raise QMPError("There's a migration process in progress")  # QEMU's words
            self.settings.set_capabilities(items)

    # -- workers ------------------------------------------------------------------------
    def _in_doubt(self, job: Job, message: str) -> None:
        with self.lock:
            job.in_doubt = message
            if self.settings.caps["events"]:
                self.emit("MIGRATION", {"status": job.status, "x-in-doubt": message})

    def _observe(self, job: Job, event: str, p: Progress) -> None:
        """The driver's observer, on the migration thread: keep it short."""
        job.progress = p
        if event == "chunk" or (event == "status" and p.status == "active"):
            # "active" is the baseline: the first chunk then already gives a rate
            job.meter.add(time.monotonic(), p.transferred, p.pages_sent)
        with self.lock:
            if job is not self.job:
                return
            while job.passes < sync_count(p):
                job.passes += 1  # QEMU: one MIGRATION_PASS per bitmap sync, from 1
                if self.settings.caps["events"]:
                    self.emit("MIGRATION_PASS", {"pass": job.passes})
            if event == "paused":  # the vCPUs have stopped: STOP, then device (QEMU's order)
                self._runstate("finish-migrate", "STOP")
                self._status("device")
            elif event == "handed-off":  # the destination owns the guest: completed
                self._runstate("postmigrate")
                self._status("completed")
            elif event == "status" and p.status in ("setup", "active") and \
                    job.status != "cancelling":
                self._status(p.status)

    def _outgoing(self, job: Job, params: MigrationParams, vm: SourceVM, uri: str,
                  tls: TlsCreds | None = None) -> None:
        try:
            # in doubt, the retries are ours (below), so that x-in-doubt shows at once
            outcome = migrate_out(vm, uri, params, partial(self._observe, job),
                                  self._cancel.is_set, resolve_window_s=0.0, tls=tls)
        except MigrationInDoubt as e:
            if e.hold is None:  # nothing held here (cannot happen after a release)
                with self.lock:
                    job.error = clean(e)
                    self._status("failed")
                return
            with self.lock:
                job.in_doubt, job.hold = clean(e), e.hold
            # keep telling the destination; OWNED releases the copy here, and an
            # operator's x-migrate-resolve (either way) ends this as well
            while not e.hold.decided and not self._closing.is_set():
                if e.hold.retry(5.0, self._closing.is_set):
                    break
            self._held_decided(job, e.hold)
            return
        except BaseException as e:  # noqa: BLE001 - every end must leave a queryable state
            with self.lock:
                if self._cancel.is_set():
                    self._status("cancelled")
                else:
                    job.error = clean(e) if isinstance(e, MigrationFailed) else \
                        clean(f"{type(e).__name__}: {e}")
                    self._status("failed")
                if self.runstate == "finish-migrate":  # rolled back: the guest runs here
                    if vm.guest.paused:
                        self._runstate("paused")
                    else:
                        self._runstate("running", "RESUME")
            return
        with self.lock:
            job.progress = outcome.progress
            gap = outcome.verified.get("observed_gap")
            if isinstance(gap, int | float):
                job.guest_gap_s = float(gap)
            self.vm = None  # SEND_FINISH done; the guest runs at the destination now
            self._runstate("postmigrate")
            self._status("completed")  # if "handed-off" did not say so already

    def _held_decided(self, job: Job, hold: SourceHold) -> None:
        """An outgoing guest held in doubt was decided: show where it runs."""
        with self.lock:
            if job.hold is not hold or not hold.decided:
                return
            job.hold, job.in_doubt = None, ""
            if hold.decided == "released":
                self.vm = None  # SEND_FINISH done; the guest runs at the destination
                self._runstate("postmigrate")
                self._status("completed")
            else:
                job.error = "kept at the source by an operator after an in-doubt release"
                self._status("failed")
                self._runstate("running", "RESUME")

    def _incoming(self, srv: Listener) -> None:
        try:
            while not self._closing.is_set():
                conn = srv.take()
                if conn is None:
                    return  # the listener was closed: quitting
                with self.lock:
                    if self._closing.is_set():
                        conn.close()
                        return
                    self._conn = conn
                    job = Job(incoming=True, status="setup")
                    self.job = job
                    self._status("active")
                try:
                    ivm = migrate_in(self.host, conn, decisions=srv.take_decision,
                                     on_in_doubt=partial(self._in_doubt, job),
                                     on_event=partial(self._incoming_event, job))
                except BaseException as e:  # noqa: BLE001 - keep listening for another try
                    with self.lock:
                        self._conn = None
                        job.error = clean(e)
                        job.in_doubt = ""
                        self._status("failed")
                        if self.runstate == "running":  # it ran here, then was discarded
                            self._runstate("inmigrate", "STOP")
                        self.runstate = "inmigrate"
                    srv.idle()
                    # a source that comes meanwhile is served once they are up
                    if not self._closing.is_set():
                        self.host.vcpu_pool.refill()
                    continue
                with self.lock:
                    self._conn = None
                    job.in_doubt = ""
                    if self._closing.is_set():
                        ivm.shutdown(self.host)
                        return
                    # the received guest is a source-to-be: it may migrate on from here
                    self.vm = SourceVM(self.host, ivm.guest.config, ivm.guest, ivm.handle,
                                       ivm.memory)
                    self._status("completed")  # if "owned" did not say so already
                    if self.runstate != "running":
                        self._runstate("running", "RESUME")
                return
        finally:
            srv.close()

    def _incoming_event(self, job: Job, event: str) -> None:
        """migrate_in's moments, as they happen: RESUME when the vCPUs run here (QEMU's
        order: before MIGRATION completed), STOP when held in doubt, MIGRATION completed
        once the source has released the guest to us."""
        with self.lock:
            if job is not self.job:
                return
            if event == "resumed":
                self._runstate("running", "RESUME")
            elif event == "paused":
                self._runstate("paused", "STOP")
            elif event == "owned":
                job.in_doubt = ""  # the source's decision (or an operator's) reached us
                self._status("completed")
