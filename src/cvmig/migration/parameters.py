"""Every migration parameter and capability, declared once.

``TABLE`` holds each parameter's QMP name, type, range, default, unit, help and whether it
may change while a migration runs. Derived from it, and from nothing else:

- the options of ``cvmig migrate`` (`cvmig.migration.cli`);
- migrate-set-parameters' checks and query-migrate-parameters' reply (`cvmig.monitor`);
- the parameters' part of query-qmp-schema (`cvmig.monitor.introspect`);
- the engine's `MigrationParams` (``build``).

QEMU's names keep QEMU's meaning, defaults and error wording (migration/options.c,
``migrate_params_check``); cvmig's own knobs carry the ``x-`` prefix, as QEMU marks its
experimental ones. One default differs by front end, on purpose: max-bandwidth is QEMU's
128 MiB/s over QMP (a tool that relies on QEMU's default gets QEMU's behaviour) but
unlimited for ``cvmig migrate``, where a cap would hide the secure processor's cost that
the command exists to measure.

Checks come in one place, ``check_all``: each value against its own range, then the rules
that join several (max-cpu-throttle against cpu-throttle-initial, the batch cap against
the batching mode), then the engine's own validation; a set is applied all or nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cvmig.migration.driver import MigrationParams, Switchover, TimeoutAction
from cvmig.migration.throttle import ThrottleKind, ThrottleParams
from cvmig.psp.api import Batching

# QAPI kinds: integers carry their width, as QEMU's input visitor checks it
INT_KINDS = ("int", "uint8", "uint32", "uint64", "size")
KINDS = (*INT_KINDS, "number", "bool", "str", "enum")
SAME = object()  # cli_default: the same as the QMP default


class ParamError(ValueError):
    """A value out of range, in QEMU's words: "Parameter 'max_cpu_throttle' expects ..."."""

    def __init__(self, name: str, rule: str) -> None:
        # QEMU's messages name the parameter as its C field (max_cpu_throttle)
        super().__init__(f"Parameter '{name.replace('-', '_')}' {rule}")
        self.name, self.rule = name, rule


@dataclass(frozen=True)
class Param:
    name: str  # QMP name
    kind: str  # one of KINDS
    default: Any  # QMP's (QEMU's) default
    help: str
    unit: str = ""
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()  # kind "enum"
    live: bool = False  # may change while a migration runs; it applies from the next send
    cli: tuple[str, ...] = ()  # `cvmig migrate` option names; () = QMP only
    cli_default: Any = SAME
    cli_choices: tuple[str, ...] = ()  # when the CLI offers fewer than QMP
    nullable: bool = False  # migrate-set-parameters takes null too (QEMU's StrOrNull)
    rule: str = ""  # QEMU's words for the range, when they are not the generic ones
    engine: str | None = None  # MigrationParams field (dotted); None: wired elsewhere
    to_engine: Callable[[Any], Any] | None = None

    @property
    def default_cli(self) -> Any:
        return self.default if self.cli_default is SAME else self.cli_default

    def expects(self) -> str:
        if self.rule:
            return self.rule
        if self.kind == "number":
            return f"expects a number in the range of {self.lo:g} to {self.hi:g}"
        return f"expects an integer in the range of {self.lo:g} to {self.hi:g}"  # QEMU's

    def check(self, value: Any) -> Any:
        """The value if it is in range (its JSON type is the caller's check)."""
        if self.kind == "enum" and value not in self.choices:
            raise ParamError(self.name, f"does not accept value '{value}' "
                                        f"(allowed: {', '.join(self.choices)})")
        if self.kind in (*INT_KINDS, "number") and (
                (self.lo is not None and value < self.lo)
                or (self.hi is not None and value > self.hi)):
            raise ParamError(self.name, self.expects())
        return value


def _pct(lo: int, hi: int) -> dict[str, Any]:
    return {"lo": lo, "hi": hi, "unit": "%"}


TABLE: tuple[Param, ...] = (
    # -- QEMU's, with QEMU's defaults ------------------------------------------------
    Param("downtime-limit", "uint64", 300, "Longest pause the switch-over may take.",
          unit="ms", lo=0, hi=2_000_000, live=True, cli=("--downtime-limit",),
          rule="expects an integer in the range of 0 to (2000 * 1000) ms",
          engine="downtime_limit_ms"),
    Param("max-bandwidth", "size", 134217728,
          "Pre-copy rate cap (K/M/G suffixes); 0 = unlimited (QMP's default: QEMU's "
          "128 MiB/s).",
          unit="bytes/s", lo=0, live=True, cli=("--max-bandwidth",), cli_default=0,
          engine="max_bandwidth"),
    Param("throttle-trigger-threshold", "uint8", 50,
          "auto-converge and dirty-limit start when a period dirties more than this share "
          "of what it sent.", **_pct(1, 100), live=True, cli=("--throttle-trigger-threshold",),
          engine="throttle_params.throttle_trigger_threshold"),
    Param("cpu-throttle-initial", "uint8", 20, "auto-converge's first throttle.",
          **_pct(1, 99), live=True, cli=("--cpu-throttle-initial",),
          engine="throttle_params.cpu_throttle_initial"),
    Param("cpu-throttle-increment", "uint8", 10, "auto-converge's step.", **_pct(1, 99),
          live=True, cli=("--cpu-throttle-increment",),
          engine="throttle_params.cpu_throttle_increment"),
    Param("cpu-throttle-tailslow", "bool", False,
          "auto-converge steps less as the dirty rate nears the threshold.", live=True,
          cli=("--cpu-throttle-tailslow",), engine="throttle_params.cpu_throttle_tailslow"),
    Param("max-cpu-throttle", "uint8", 99, "Highest throttle any policy applies.",
          **_pct(1, 99), live=True, cli=("--max-cpu-throttle",),
          engine="throttle_params.max_cpu_throttle"),
    Param("vcpu-dirty-limit", "uint64", 1, "dirty-limit's per-vCPU dirty rate.",
          unit="MB/s", lo=1, live=True, cli=("--vcpu-dirty-limit",),
          rule="must be greater than 1 MB/s", engine="throttle_params.vcpu_dirty_limit"),
    # QEMU's TLS parameters: here a credentials directory (QEMU's x509 layout), the
    # destination's expected name, and the identities a destination admits (comma-
    # separated); the connection is made with them, so they cannot change mid-migration.
    # Their command-line options are declared with the TLS code (cli: none here).
    Param("tls-creds", "str", "", "TLS credentials directory ('' = no TLS).",
          nullable=True),
    Param("tls-hostname", "str", "", "Name the destination's certificate must carry "
          "('' = the host connected to).", nullable=True),
    Param("tls-authz", "str", "", "Identities a destination admits, comma-separated "
          "('' = any the CA signed).", nullable=True),
    # -- cvmig's own ---------------------------------------------------------------------
    Param("x-batching", "enum", Batching.AEAD.value,
          "page: one page per firmware command (baseline); contig: runs of contiguous "
          "pages; sg: scatter-gather, a MAC per page; aead: scatter-gather, an AES-GCM tag "
          "per page (fastest).", choices=tuple(m.value for m in Batching),
          cli=("--batching", "-b"), engine="batching", to_engine=Batching),
    Param("x-batch-cap", "uint32", 0,
          "Pages per command; 0 = the mode's default (contig 4 = 16 KiB, the SEV limit; sg "
          "and aead 256).", unit="pages", lo=0, hi=4096, cli=("--batch-cap", "--cap"),
          engine="batch_cap"),
    Param("x-queue", "bool", False,
          "Many commands behind one mailbox doorbell (CSV ring style).", live=True,
          cli=("--queue",), engine="queue"),
    Param("x-throttle", "enum", "auto",
          "auto-converge throttles only a guest that dirties faster than the link carries; "
          "none reproduces the baseline. QMP's auto follows the capabilities.",
          choices=("auto", *(k.value for k in ThrottleKind)), cli=("--throttle",),
          cli_default=ThrottleKind.AUTO_CONVERGE.value,
          cli_choices=tuple(k.value for k in ThrottleKind), engine="throttle"),
    Param("x-precopy-throttle", "int", -1,
          "precopy policy: a fixed throttle instead of an adaptive one (-1).", unit="%",
          lo=-1, hi=99, live=True, cli=("--precopy-throttle", "--throttle-pct"),
          rule="expects -1 (adaptive) or an integer in the range of 0 to 99 %",
          engine="throttle_params.precopy_throttle",
          to_engine=lambda v: None if v == -1 else v),
    Param("x-precopy-target-ratio", "number", 0.5,
          "adaptive precopy: hold the dirty rate to this share of the transfer rate (the "
          "lower of what was sent since the last sync and what dirty pages go again at).",
          lo=0.0, hi=1.0, live=True, cli=("--precopy-target-ratio",),
          rule="expects a number above 0 and at most 1",
          engine="throttle_params.precopy_target_ratio", to_engine=float),
    Param("x-max-rounds", "uint32", 0,
          "Stop-and-copy after this many iterative rounds (0 = no cap).", lo=0,
          hi=0xFFFF_FFFF, live=True, cli=("--max-rounds",), engine="max_rounds"),
    Param("x-timeout", "number", 0.0, "Pre-copy time before the timeout action; 0 = none.",
          unit="s", lo=0.0, hi=1e9, live=True, cli=("--timeout",), cli_default=120.0,
          engine="timeout_s", to_engine=float),
    Param("x-timeout-action", "enum", TimeoutAction.CANCEL.value,
          "What the timeout does: cancel, or force the stop-and-copy.",
          choices=tuple(a.value for a in TimeoutAction), live=True,
          cli=("--timeout-action",), engine="timeout_action", to_engine=TimeoutAction),
    Param("x-switchover", "enum", MigrationParams().switchover.value,
          "Downtime estimate for the switch: qemu = remaining bytes / last round's "
          "bandwidth; firmware = the measured cost of stopping, the frames in flight and "
          "the commands the dirty set needs x measured cost per command and per byte.", choices=tuple(s.value for s in Switchover), live=True,
          cli=("--switchover",), engine="switchover", to_engine=Switchover),
)
PARAMS: dict[str, Param] = {p.name: p for p in TABLE}
DEFAULTS: dict[str, Any] = {p.name: p.default for p in TABLE}
CLI_DEFAULTS: dict[str, Any] = {p.name: p.default_cli for p in TABLE}

# QEMU 10's parameters with no meaning here: named, so the error says so rather than
# calling a real QEMU parameter "unexpected"
UNSUPPORTED_PARAMS = frozenset({
    "announce-initial", "announce-max", "announce-rounds", "announce-step",
    "avail-switchover-bandwidth", "x-checkpoint-delay", "multifd-channels",
    "multifd-compression", "multifd-zlib-level", "multifd-zstd-level",
    "multifd-qatzip-level", "xbzrle-cache-size", "max-postcopy-bandwidth",
    "block-bitmap-mapping", "x-vcpu-dirty-limit-period", "mode", "zero-page-detection",
    "direct-io",
})


@dataclass(frozen=True)
class Capability:
    name: str
    supported: bool = False
    help: str = ""
    features: tuple[str, ...] = field(default=())


# MigrationCapability, in QAPI order (qapi/migration.json, QEMU 10.0); all off by default
CAPABILITIES: tuple[Capability, ...] = (
    Capability("xbzrle"), Capability("rdma-pin-all"),
    Capability("auto-converge", True, "x-throttle auto: QEMU's auto-converge"),
    Capability("zero-blocks", features=("deprecated",)),
    Capability("events", True, "MIGRATION and MIGRATION_PASS events"),
    Capability("postcopy-ram"), Capability("x-colo", features=("unstable",)),
    Capability("release-ram"), Capability("return-path"),
    Capability("pause-before-switchover"), Capability("multifd"),
    Capability("dirty-bitmaps"), Capability("postcopy-blocktime"),
    Capability("late-block-activate"), Capability("x-ignore-shared", features=("unstable",)),
    Capability("validate-uuid"), Capability("background-snapshot"),
    Capability("zero-copy-send"), Capability("postcopy-preempt"),
    Capability("switchover-ack"),
    Capability("dirty-limit", True, "x-throttle auto: QEMU's per-vCPU dirty-rate limit"),
    Capability("mapped-ram"),
)
CAPABILITY_NAMES = tuple(c.name for c in CAPABILITIES)
SUPPORTED_CAPABILITIES = frozenset(c.name for c in CAPABILITIES if c.supported)


def throttle_kind(values: dict[str, Any], caps: dict[str, bool]) -> ThrottleKind:
    """x-throttle when set; else auto-converge or dirty-limit as the capabilities say."""
    if values["x-throttle"] != "auto":
        return ThrottleKind(values["x-throttle"])
    if caps.get("auto-converge"):
        return ThrottleKind.AUTO_CONVERGE
    if caps.get("dirty-limit"):
        return ThrottleKind.DIRTY_LIMIT
    return ThrottleKind.NONE


def check_all(values: dict[str, Any]) -> None:
    """Every value in its range, then the rules that join several; ParamError."""
    for p in TABLE:
        p.check(values[p.name])
    if values["max-cpu-throttle"] < values["cpu-throttle-initial"]:
        raise ParamError("max-cpu-throttle", "expects an integer in the range of "
                                             "cpu_throttle_initial to 99")
    if not values["x-precopy-target-ratio"] > 0:
        raise ParamError("x-precopy-target-ratio", PARAMS["x-precopy-target-ratio"].rule)


def build(values: dict[str, Any], caps: dict[str, bool] | None = None) -> MigrationParams:
    """The engine's parameters from a full set of values (QMP names); ParamError, or
    ValueError with the engine's reason, if they do not fit together."""
    check_all(values)
    top: dict[str, Any] = {}
    throttle: dict[str, Any] = {}
    for p in TABLE:
        if p.engine is None:
            continue
        v = values[p.name]
        v = p.to_engine(v) if p.to_engine is not None else v
        if p.engine.startswith("throttle_params."):
            throttle[p.engine.split(".", 1)[1]] = v
        else:
            top[p.engine] = v
    top["throttle"] = throttle_kind(values, caps or {})
    params = MigrationParams(**top, throttle_params=replace(ThrottleParams(), **throttle))
    params.validate()  # the engine's own rules (a batch cap the mode allows, ...)
    return params


def merge(current: dict[str, Any], changes: dict[str, Any], caps: dict[str, bool] | None,
          *, migrating: bool = False) -> tuple[dict[str, Any], MigrationParams]:
    """``current`` with ``changes`` applied, checked whole; nothing changes on an error.
    While migrating, only the live parameters may change (the others are fixed once the
    destination has agreed to them): ParamError names the first that is not."""
    new = dict(current)
    for name, value in changes.items():
        p = PARAMS[name]
        if migrating and not p.live and value != current[name]:
            raise ParamError(name, "cannot change while a migration is in progress; it "
                                   "applies from the next 'migrate'")
        new[name] = value
    return new, build(new, caps)
