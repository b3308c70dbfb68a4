"""What migrate-set-parameters and migrate-set-capabilities have set: the QMP face of
`cvmig.migration.parameters`, where every parameter is declared (name, type, range,
default, whether it may change during a migration).

Here only what is QMP's: the JSON types, as QEMU's input visitor checks them, and the
errors in QEMU's words. A set is checked whole against the merged result and applied all
or nothing, as ``migrate_params_check`` does.
"""

from __future__ import annotations

from typing import Any

from cvmig.migration import parameters as P
from cvmig.migration.driver import MigrationParams
from cvmig.monitor.protocol import QMPError
from cvmig.monitor.schema import Schema, check_value

# the QMP type of each parameter (an enum travels as a string)
SCHEMA: Schema = {p.name: ("str" if p.kind == "enum" else p.kind, False) for p in P.TABLE}


class Settings:
    """Parameters and capabilities as set so far."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = dict(P.DEFAULTS)
        self.caps: dict[str, bool] = dict.fromkeys(P.CAPABILITY_NAMES, False)

    # -- parameters ---------------------------------------------------------------------
    def query_parameters(self) -> dict[str, Any]:
        return dict(self.values)

    def set_parameters(self, args: dict[str, Any], *, migrating: bool = False) -> \
            MigrationParams:
        """Apply ``args``; the engine's parameters they make. While ``migrating``, only the
        live ones may change."""
        changes: dict[str, Any] = {}
        for name, value in args.items():
            p = P.PARAMS.get(name)
            if p is None:
                if name in P.UNSUPPORTED_PARAMS:
                    raise QMPError(f"Parameter '{name}' is not supported by cvmig")
                raise QMPError(f"Parameter '{name}' is unexpected")
            if p.nullable:  # QEMU's StrOrNull: null resets it to ""
                if value is not None and not isinstance(value, str):
                    raise QMPError(f"Invalid parameter type for '{name}', expected: StrOrNull")
                value = "" if value is None else value
            changes[name] = check_value(name, SCHEMA[name][0], value)
        try:
            new, params = P.merge(self.values, changes, self.caps, migrating=migrating)
        except ValueError as e:  # ParamError in QEMU's words, or the engine's reason
            raise QMPError(str(e)) from None
        self.values = new
        return params

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
            if cap not in P.CAPABILITY_NAMES:
                raise QMPError(f"Parameter 'capability' does not accept value '{cap}'")
            if state and cap not in P.SUPPORTED_CAPABILITIES:
                raise QMPError(f"Capability '{cap}' is not supported by cvmig "
                               f"(supported: {', '.join(sorted(P.SUPPORTED_CAPABILITIES))})")
            new[cap] = state
        if new["dirty-limit"] and new["auto-converge"]:
            # QEMU's own words (migrate_caps_check)
            raise QMPError("dirty-limit conflicts with auto-converge either of then available "
                           "currently")
        self.caps = new

    # -- the engine's view --------------------------------------------------------------
    def params(self) -> MigrationParams:
        try:
            return P.build(self.values, self.caps)
        except ValueError as e:
            raise QMPError(str(e)) from None
