"""`cvmig migrate` and `cvmig vm`: the user's way in."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import click

from cvmig.migration.driver import MigrationParams
from cvmig.migration.listener import HANDSHAKE_TIMEOUT_S
from cvmig.migration.parameters import (
    CLI_DEFAULTS,
    INT_KINDS,
    PARAMS,
    TABLE,
    Param,
    ParamError,
    build,
)
from cvmig.pki import load_tls, tls_options
from cvmig.psp.api import Policy
from cvmig.units import parse_size
from cvmig.wire.protocol import IO_TIMEOUT_S

DEFAULT_WORKLOAD = "dirtier:rate=5000,pattern=hotcold"
# The report's optimizations are the default (the parameter table's); `--batching page
# --throttle none --timeout 0` is the baseline.


class SizeParam(click.ParamType):
    """A byte count in QEMU's size grammar (`cvmig.units`)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeParam()

_POLICY_BITS = {"nodbg": Policy.NODBG, "noks": Policy.NOKS, "es": Policy.ES,
                "nosend": Policy.NOSEND, "domain": Policy.DOMAIN, "sev": Policy.SEV}


def parse_policy(text: str) -> int:
    """'nodbg,es' or a number like 0x5 -> the guest policy."""
    t = text.strip().lower()
    try:
        return int(t, 0)
    except ValueError:
        pass
    bits = 0
    for part in filter(None, (p.strip() for p in t.split(","))):
        if part not in _POLICY_BITS:
            raise ValueError(f"unknown policy flag {part!r}; allowed: "
                             f"{', '.join(_POLICY_BITS)} or a number")
        bits |= _POLICY_BITS[part]
    return bits | Policy.ES  # vCPU state moves as a VMSA: the guest is SEV-ES


def guest_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--memory", "-m", type=SIZE, default="256M", show_default=True,
                     help="Guest memory (K/M/G suffixes)."),
        click.option("--vcpus", type=click.IntRange(1, 64), default=2, show_default=True),
        click.option("--workload", "-w", default=DEFAULT_WORKLOAD, show_default=True,
                     help="idle | dirtier:rate=N,pattern=uniform|hotcold|sequential,... | "
                          "sqlite:accounts=N"),
        click.option("--tracker", type=click.Choice(["auto", "uffd", "dmap"]), default="auto",
                     show_default=True, help="Dirty tracking: kernel uffd or byte map."),
        click.option("--policy", default="nodbg,es", show_default=True,
                     help="Guest policy flags (nodbg,noks,es,nosend,domain,sev) or a number."),
    ]):
        f = opt(f)
    return f


def psp_option(f: Any) -> Any:
    return click.option("--psp-profile", default="none", show_default=True,
                        help="Secure-processor cost profile: none, or a hardware profile "
                             "(see `cvmig bench psp --help`).")(f)


class _InRange(click.ParamType):
    """One table parameter (`cvmig.migration.parameters`): its type, then its range."""

    def __init__(self, p: Param) -> None:
        self.p = p
        self.name = {"uint8": "integer", "uint32": "integer", "uint64": "integer",
                     "int": "integer", "number": "number", "size": "size", "str": "text"}.get(
            p.kind, p.kind)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        p = self.p
        try:
            if p.kind == "size":
                v: Any = SIZE.convert(value, param, ctx)
            elif p.kind == "number":
                v = float(value)
            elif p.kind in INT_KINDS:
                v = int(value)
            else:
                v = value
            return p.check(v)
        except ValueError as e:
            self.fail(e.rule if isinstance(e, ParamError) else f"{value!r} is not a {self.name}",
                      param, ctx)


def _option(p: Param) -> Any:
    """The `cvmig migrate` option for table parameter ``p``: --NAME (x- dropped), an
    alias where an older name exists, its default and help from the table."""
    key = p.name.removeprefix("x-").replace("-", "_")
    names = list(p.cli)
    unit = f" [{p.unit}]" if p.unit and p.unit != "%" else (" [%]" if p.unit else "")
    if p.kind == "bool":
        longs = [n for n in names if n.startswith("--")]
        flags = "/".join(f"{n}/--no-{n[2:]}" for n in longs)
        return click.option(flags, key, default=p.default_cli, show_default=True,
                            help=p.help)
    kind: Any = (click.Choice(list(p.cli_choices or p.choices)) if p.kind == "enum"
                 else _InRange(p))
    return click.option(*names, key, type=kind, default=p.default_cli, show_default=True,
                        help=p.help + unit)


def migration_options(f: Any) -> Any:
    for p in reversed([p for p in TABLE if p.cli]):
        f = _option(p)(f)
    return f


def build_params(o: dict[str, Any]) -> MigrationParams:
    """MigrationParams from the options (ValueError, in one line, if they do not fit)."""
    values = dict(CLI_DEFAULTS)
    for p in TABLE:
        key = p.name.removeprefix("x-").replace("-", "_")
        if p.cli and key in o:
            values[p.name] = o[key]
    try:
        return build(values)
    except ParamError as e:  # name the option, not the QMP parameter
        raise ValueError(f"{PARAMS[e.name].cli[0]} {e.rule}") from None


def build_guest(o: dict[str, Any]) -> Any:
    from cvmig.guest.vm import GuestConfig
    from cvmig.guest.workloads import parse_workload

    cfg = GuestConfig(memory=o["memory"], vcpus=o["vcpus"],
                      workload=parse_workload(o["workload"]), tracker=o["tracker"])
    cfg.validate()
    return cfg


@click.command()
@guest_options
@migration_options
@psp_option
@click.option("--to", "uri", default=None, metavar="tcp:HOST:PORT",
              help="Destination started with `cvmig vm --incoming`; default: a local one.")
@click.option("--warmup", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Seconds the guest runs before migration starts.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the report here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--io-timeout", type=click.FloatRange(1), default=IO_TIMEOUT_S, show_default=True,
              help="Seconds of silence from the destination while pages stream before the "
                   "migration fails (after the pause: 4 s).")
@tls_options
def migrate(**o: Any) -> None:
    """Live-migrate a confidential guest: boot it here, move it to a destination host.

    With no options: a 256 MiB guest running the dirtier moves over loopback to a
    destination process with its own secure processor, and a summary is printed.
    """
    from cvmig.migration.messages import clean
    from cvmig.migration.progress import ProgressView, print_summary
    from cvmig.migration.session import MigrateOptions, migrate_local_or_remote
    from cvmig.migration.source import MigrationFailed, MigrationInDoubt, describe_failure
    from cvmig.wire.channel import parse_uri

    try:
        params = build_params(o)
        params.validate()
        guest = build_guest(o)
        policy = parse_policy(o["policy"])
        if o["uri"]:
            parse_uri(o["uri"])
        _check_profile(o["psp_profile"])
        tls = load_tls(o["tls_creds"], o["tls_authz"], o["tls_hostname"])
        if o["uri"] and o["tls_authz"]:  # the remote destination decides whom it admits
            raise ValueError("--tls-authz is the destination's: give it to `cvmig vm "
                             "--incoming` (with --to, this side checks --tls-hostname)")
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    opts = MigrateOptions(guest=guest, params=params, psp_profile=o["psp_profile"],
                          policy=policy, warmup_s=o["warmup"], io_timeout_s=o["io_timeout"],
                          tls=tls)
    # Ctrl-C (SIGINT, which a terminal sends to the whole foreground process group: our
    # children run in sessions of their own and do not get it) and SIGTERM cancel: the
    # migration rolls back, the guest runs on here until we exit, and we exit as shells do
    # for a signal (128 + its number).
    cancel = threading.Event()
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if not signals:
            click.echo(f"\n{signal.Signals(signum).name}: cancelling the migration; the guest "
                       "keeps running on the source", err=True)
        signals.append(signum)
        cancel.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    view = ProgressView(enabled=not o["quiet"])
    try:
        with view:
            report = migrate_local_or_remote(opts, o["uri"], view.observe, cancel.is_set)
    except MigrationFailed as e:
        if signals:
            name = signal.Signals(signals[0]).name
            click.secho(f"migration cancelled ({name}): {clean(e)}", fg="yellow", err=True)
            click.echo("the guest kept running on the source, nothing lost; it was shut "
                       "down as cvmig exits", err=True)
            sys.exit(128 + signals[0])
        click.secho(f"migration failed: {clean(e)}", fg="red", err=True)
        click.echo("the guest kept running on the source; nothing was lost", err=True)
        sys.exit(1)
    except MigrationInDoubt as e:
        click.secho(clean(e), fg="yellow", err=True)
        click.echo("cvmig migrate cannot hold the source's paused copy past its own exit: it "
                   "was released, so the destination now has the only copy (run the source "
                   "under `cvmig vm` to hold it until you decide)", err=True)
        sys.exit(3)
    except Exception as e:  # noqa: BLE001 - a user sees one line, never a traceback
        click.secho(f"cvmig migrate failed: {clean(describe_failure(e, 'destination'))}",
                    fg="red", err=True)
        sys.exit(128 + signals[0] if signals else 1)
    if o["json_path"]:
        o["json_path"].write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    if signals:
        click.echo(f"{signal.Signals(signals[0]).name} came after the switch-over: the "
                   "migration completed", err=True)
    ok = report["verify"]["memory"] == "match" and report["verify"]["workload"].get("ok", False)
    sys.exit(0 if ok else 2)


def _check_profile(name: str) -> None:
    from cvmig.psp.cost import parse

    parse(name)  # ValueError names the profiles allowed


@click.command()
@click.option("--incoming", metavar="tcp:HOST:PORT|defer", default=None,
              help="Wait for a migration on this address (port 0: any free port); with "
                   "--qmp, 'defer' waits for the address from migrate-incoming, as QEMU's "
                   "-incoming defer.")
@psp_option
@click.option("--max-contig-pages", type=click.IntRange(1, 4096), default=4, show_default=True,
              help="Largest contig command this host's PSP accepts (4 = 16 KiB, the SEV "
                   "spec; more is an extension both hosts must enable).")
@click.option("--psp-owner", default=None,
              help="Platform owner (OCA) directory, or 'self' for an unshared owner.")
@click.option("--once", is_flag=True, help="Exit after one incoming migration (and its check).")
@click.option("--announce", is_flag=True,
              help="Print JSON lines (listening, migrated, failed) on stdout for a parent.")
@click.option("--run-after", type=click.FloatRange(0), default=0.0,
              help="With --once: let the guest run this long after the check before exiting.")
@click.option("--qmp", metavar="unix:PATH", default=None,
              help="Serve a QMP monitor on this UNIX socket until `quit`. Without "
                   "--incoming: boot a source VM from the guest options and wait for "
                   "commands (`migrate`, ...).")
@click.option("--handshake-timeout", type=click.FloatRange(0, min_open=True),
              default=HANDSHAKE_TIMEOUT_S, show_default=True,
              help="Seconds a connection to --incoming has to complete its handshake "
                   "before it is dropped.")
@click.option("--io-timeout", type=click.FloatRange(1), default=IO_TIMEOUT_S, show_default=True,
              help="Seconds of silence from the source while pages stream before the "
                   "incoming migration fails (once the source has paused: 4 s).")
@click.option("--prestart/--no-prestart", default=True, show_default=True,
              help="As a destination: start the guest's vCPU processes (--vcpus of them) "
                   "before the migration comes, not while its pages stream in.")
@tls_options
@guest_options
def vm(incoming: str | None, psp_profile: str, max_contig_pages: int, psp_owner: str | None,
       once: bool, announce: bool, run_after: float, qmp: str | None,
       handshake_timeout: float, io_timeout: float, tls_creds: str | None,
       tls_authz: str | None, tls_hostname: str | None, prestart: bool,
       **guest: Any) -> None:
    """Run a VM host: a destination waiting for an incoming migration, or (with --qmp)
    a VM controlled through a QMP monitor. Guest options apply to a --qmp source only,
    but for --vcpus: a destination starts that many vCPU processes before the guest
    comes (more if it has more), as QEMU's destination has with -smp and -incoming.

    SIGINT and SIGTERM end it cleanly (an incoming migration is abandoned: the source
    keeps the guest), with exit code 128 + the signal's number."""
    from cvmig.migration.destination import IncomingFailed, listen, migrate_in
    from cvmig.migration.host import Host
    from cvmig.migration.listener import Listener
    from cvmig.migration.messages import clean
    from cvmig.psp.child import Parent
    from cvmig.wire.channel import parse_uri, shutdown

    def say(obj: dict[str, Any]) -> None:
        if announce:
            print(json.dumps(obj), flush=True)
        else:
            click.echo(" ".join(f"{k}={v}" for k, v in obj.items()), err=True)

    def note(msg: str) -> None:
        if not announce:  # a parent reading our events gets only those
            click.echo(msg, err=True)

    try:
        tls = load_tls(tls_creds, tls_authz, tls_hostname)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if qmp is not None:
        tls_params = {"tls-creds": tls_creds or "", "tls-authz": tls_authz or "",
                      "tls-hostname": tls_hostname or ""}
        _vm_with_monitor(qmp, incoming, psp_profile, max_contig_pages, psp_owner, guest, say,
                         handshake_timeout, tls_params, prestart)
        return
    if incoming is None:
        raise click.UsageError("--incoming tcp:HOST:PORT or --qmp unix:PATH is required")
    if incoming == "defer":
        raise click.UsageError("--incoming defer needs --qmp unix:PATH: the address then "
                               "comes with the migrate-incoming command")
    try:
        addr, port = parse_uri(incoming)
        _check_profile(psp_profile)
    except ValueError as e:
        raise click.UsageError(str(e)) from None

    stop = threading.Event()
    ending: list[int] = []  # the signal that ends us
    current: list[Any] = [None]  # the connection of the incoming migration in progress

    def abort(signum: int | None) -> None:
        if signum is not None and not ending:
            ending.append(signum)
        stop.set()
        conn = current[0]
        if conn is not None:
            with contextlib.suppress(OSError):
                shutdown(conn, socket.SHUT_RDWR)  # the incoming migration fails at once

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: abort(signum))
    parent = Parent.from_env()  # started by a local `cvmig migrate`: end with it
    if parent is not None:
        threading.Thread(target=_watch_lifeline, args=(parent, lambda: abort(None)),
                         name="cvmig-lifeline", daemon=True).start()
    code = 0
    with Host("destination", psp_profile, contig_cap=max_contig_pages,
              psp_owner=psp_owner) as host:
        try:
            srv = listen(addr, port)
        except OSError as e:
            raise click.ClickException(f"cannot listen on {incoming}: {e.strerror or e}") from None
        if prestart:
            _prestart(host, guest["vcpus"])
        with Listener(srv, handshake_timeout, note, tls=tls) as front:
            if not stop.is_set():  # a signal during the prestart: never say we listen
                say({"event": "listening", "port": front.port})
            while not stop.is_set():
                conn = front.take(timeout=0.2)
                if conn is None:
                    continue
                current[0] = conn
                if stop.is_set():
                    abort(None)
                try:
                    incoming_vm = migrate_in(
                        host, conn, io_timeout, decisions=front.take_decision,
                        on_in_doubt=lambda m: say({"event": "in-doubt", "message": m}))
                except IncomingFailed as e:
                    current[0] = None
                    say({"event": "failed", "error": clean(e)})
                    if once:
                        code = 1
                        break
                    front.idle()
                    host.vcpu_pool.refill()  # a source that comes meanwhile is served after
                    continue
                current[0] = None
                say({"event": "migrated", "report": incoming_vm.report})
                stop.wait(run_after if once else None)
                incoming_vm.shutdown(host)
                if once:
                    break
                front.idle()
                host.vcpu_pool.refill()
    if ending:
        click.echo(f"cvmig vm: terminating on {signal.Signals(ending[0]).name}", err=True)
        sys.exit(128 + ending[0])
    sys.exit(code)


def _prestart(host: Any, vcpus: int) -> None:
    """Start the vCPU processes of the guest to come before it comes, as QEMU's
    destination has its vCPUs before the migration starts (cvmig.guest.pool)."""
    try:
        host.vcpu_pool.fill(vcpus)
    except RuntimeError as e:
        raise click.ClickException(f"cannot start vCPU processes: {e}") from None


def _watch_lifeline(parent: Any, gone: Any) -> None:
    """Call ``gone`` when the process that started us dies (its end of the lifeline
    closes); it never writes on it."""
    try:
        while True:
            if not select.select([parent.fileno()], [], [])[0]:
                continue
            if not os.read(parent.fileno(), 1):
                break
    except OSError:
        pass
    gone()


def _vm_with_monitor(qmp: str, incoming: str | None, psp_profile: str, contig_cap: int,
                     psp_owner: str | None, guest: dict[str, Any], say: Any,
                     handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                     tls_params: dict[str, str] | None = None, prestart: bool = True) -> None:
    """`cvmig vm --qmp`: a source (boots the guest) or, with --incoming, a destination."""
    from cvmig.monitor.run import StartError, parse_qmp_address, run_vm
    from cvmig.wire.channel import parse_uri

    try:
        path = parse_qmp_address(qmp)
        defer = incoming == "defer"  # QEMU's -incoming defer: migrate-incoming says where
        addr = parse_uri(incoming) if incoming is not None and not defer else None
        config = None if addr is not None or defer else build_guest(guest)
        policy = parse_policy(guest["policy"])
        _check_profile(psp_profile)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        run_vm(path, psp_profile, say, guest=config, policy=policy, incoming=addr,
               contig_cap=contig_cap, psp_owner=psp_owner, handshake_timeout=handshake_timeout,
               parameters=tls_params, defer=defer, prestart_vcpus=int(guest["vcpus"]) if prestart else 0)
    except StartError as e:
        raise click.ClickException(str(e)) from None
