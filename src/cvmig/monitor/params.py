"""Migration parameters and capabilities in QMP's names, mapped onto MigrationParams.

QEMU's names keep QEMU's meaning; cvmig's own knobs carry the ``x-`` prefix, as QEMU
marks its experimental ones. Defaults come from MigrationParams and ThrottleParams, so
the monitor and ``cvmig migrate`` cannot drift apart. One difference from QEMU, on
purpose: max-bandwidth defaults to 0 (unlimited), not 128 MiB/s, which would hide the
secure processor's cost that this project measures.

A set is checked whole against the merged result and applied all or nothing, as
``migrate_params_check`` does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from cvmig.migration.driver import MigrationParams, Switchover, TimeoutAction
from cvmig.migration.throttle import ThrottleKind, ThrottleParams
from cvmig.monitor.protocol import QMPError
from cvmig.monitor.schema import Schema, check_enum, check_value
from cvmig.psp.api import Batching

# name -> (QAPI type, default)
_D = MigrationParams()
_T = _D.throttle_params
PARAMS: dict[str, tuple[str, Any]] = {
    "downtime-limit": ("uint64", _D.downtime_limit_ms),
    "max-bandwidth": ("size", _D.max_bandwidth),
    "throttle-trigger-threshold": ("uint8", _T.throttle_trigger_threshold),
    "cpu-throttle-initial": ("uint8", _T.cpu_throttle_initial),
    "cpu-throttle-increment": ("uint8", _T.cpu_throttle_increment),
    "cpu-throttle-tailslow": ("bool", _T.cpu_throttle_tailslow),
    "max-cpu-throttle": ("uint8", _T.max_cpu_throttle),
    "vcpu-dirty-limit": ("uint64", _T.vcpu_dirty_limit),
    "x-batching": ("str", str(_D.batching)),
    "x-batch-cap": ("uint32", _D.batch_cap),  # 0 = the batching mode's default
    "x-queue": ("bool", _D.queue),
    "x-throttle": ("str", "auto"),  # auto = from the capabilities
    "x-precopy-throttle": ("int", -1 if _T.precopy_throttle is None else _T.precopy_throttle),
    "x-precopy-target-ratio": ("number", _T.precopy_target_ratio),
    "x-max-rounds": ("uint32", _D.max_rounds),
    "x-timeout": ("number", _D.timeout_s),  # seconds
    "x-timeout-action": ("str", str(_D.timeout_action)),
    "x-switchover": ("str", str(_D.switchover)),  # qemu | firmware (the downtime estimate)
}
SCHEMA: Schema = {name: (kind, False) for name, (kind, _) in PARAMS.items()}
_ENUMS: dict[str, tuple[str, ...]] = {
    "x-batching": tuple(m.value for m in Batching),
    "x-throttle": ("auto", *(k.value for k in ThrottleKind)),
    "x-timeout-action": tuple(a.value for a in TimeoutAction),
    "x-switchover": tuple(w.value for w in Switchover),
}

# QEMU 9.1 parameters with no meaning here: named, so the error says so rather than
# calling a real QEMU parameter "unexpected"
UNSUPPORTED_PARAMS = frozenset({
    "announce-initial", "announce-max", "announce-rounds", "announce-step", "tls-creds",
    "tls-hostname", "tls-authz", "avail-switchover-bandwidth", "x-checkpoint-delay",
    "multifd-channels", "multifd-compression", "multifd-zlib-level", "multifd-zstd-level",
    "multifd-qatzip-level", "xbzrle-cache-size", "max-postcopy-bandwidth",
    "block-bitmap-mapping", "x-vcpu-dirty-limit-period", "mode", "zero-page-detection",
    "direct-io",
})

# MigrationCapability, in QAPI order (qapi/migration.json, 9.1); all off by default
CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram",
    "x-colo", "release-ram", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
    "switchover-ack", "dirty-limit", "mapped-ram",
)
SUPPORTED_CAPABILITIES = frozenset({"auto-converge", "events", "dirty-limit"})


class Settings:
    """What migrate-set-parameters and migrate-set-capabilities have set so far."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {name: default for name, (_, default) in PARAMS.items()}
        self.caps: dict[str, bool] = dict.fromkeys(CAPABILITIES, False)

    # -- parameters ---------------------------------------------------------------------
    def query_parameters(self) -> dict[str, Any]:
        return dict(self.values)

    def set_parameters(self, args: dict[str, Any]) -> None:
        new = dict(self.values)
        for name, value in args.items():
            if name in PARAMS:
                new[name] = check_value(name, PARAMS[name][0], value)
                if name in _ENUMS:
                    check_enum(name, value, _ENUMS[name])
            elif name in UNSUPPORTED_PARAMS:
                raise QMPError(f"Parameter '{name}' is not supported by cvmig")
            else:
                raise QMPError(f"Parameter '{name}' is unexpected")
        build_params(new, self.caps)  # all or nothing: a bad mix changes nothing
        self.values = new

    # -- capabilities -------------------------------------------------------------------
    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": c, "state": s} for c, s in self.caps.items()]

    def set_capabilities(self, items: list[Any]) -> None:
        new = dict(self.caps)
        for i, item in enumerate(items):
            check_value(f"capabilities[{i}]", "object", item)
            for key in item:
                if key not in ("capability", "state"):
                    raise QMPError(f"Parameter 'capabilities[{i}].{key}' is unexpected")
            for key in ("capability", "state"):
                if key not in item:
                    raise QMPError(f"Parameter 'capabilities[{i}].{key}' is missing")
            cap = check_value(f"capabilities[{i}].capability", "str", item["capability"])
            state = check_value(f"capabilities[{i}].state", "bool", item["state"])
            if cap not in CAPABILITIES:
                raise QMPError(f"Parameter 'capability' does not accept value '{cap}'")
            if state and cap not in SUPPORTED_CAPABILITIES:
                raise QMPError(f"Capability '{cap}' is not supported by cvmig "
                               f"(supported: {', '.join(sorted(SUPPORTED_CAPABILITIES))})")
            new[cap] = state
        if new["dirty-limit"] and new["auto-converge"]:
            # QEMU's own words (migrate_caps_check)
            raise QMPError("dirty-limit conflicts with auto-converge either of then available "
                           "currently")
        self.caps = new

    # -- the engine's view --------------------------------------------------------------
    def params(self) -> MigrationParams:
        return build_params(self.values, self.caps)


def throttle_kind(values: dict[str, Any], caps: dict[str, bool]) -> ThrottleKind:
    """x-throttle when set; else auto-converge or dirty-limit as the capabilities say."""
    if values["x-throttle"] != "auto":
        return ThrottleKind(values["x-throttle"])
    if caps.get("auto-converge"):
        return ThrottleKind.AUTO_CONVERGE
    if caps.get("dirty-limit"):
        return ThrottleKind.DIRTY_LIMIT
    return ThrottleKind.NONE


def build_params(v: dict[str, Any], caps: dict[str, bool]) -> MigrationParams:
    """MigrationParams from QMP values; QMPError with the engine's reason if invalid."""
    pct = v["x-precopy-throttle"]
    if pct != -1 and not 0 <= pct <= 99:
        raise QMPError("Parameter 'x-precopy-throttle' expects -1 (adaptive) or 0..99 %")
    tp = replace(
        ThrottleParams(),
        throttle_trigger_threshold=v["throttle-trigger-threshold"],
        cpu_throttle_initial=v["cpu-throttle-initial"],
        cpu_throttle_increment=v["cpu-throttle-increment"],
        cpu_throttle_tailslow=v["cpu-throttle-tailslow"],
        max_cpu_throttle=v["max-cpu-throttle"],
        vcpu_dirty_limit=v["vcpu-dirty-limit"],
        precopy_throttle=None if pct == -1 else pct,
        precopy_target_ratio=float(v["x-precopy-target-ratio"]),
    )
    p = MigrationParams(
        downtime_limit_ms=v["downtime-limit"],
        max_bandwidth=v["max-bandwidth"],
        batching=Batching(v["x-batching"]),
        batch_cap=v["x-batch-cap"],
        queue=v["x-queue"],
        throttle=throttle_kind(v, caps),
        throttle_params=tp,
        max_rounds=v["x-max-rounds"],
        timeout_s=float(v["x-timeout"]),
        timeout_action=TimeoutAction(v["x-timeout-action"]),
        switchover=Switchover(v["x-switchover"]),
    )
    try:
        p.validate()
    except ValueError as e:
        raise QMPError(str(e)) from None
    return p
