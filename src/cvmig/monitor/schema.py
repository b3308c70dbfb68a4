"""Command arguments checked as QEMU's QAPI input visitor checks them, with its messages.

A schema maps a member name to (type, required). Types: ``int``, ``uint8``, ``uint32``,
``uint64``, ``size`` (QEMU's byte counts: uint64), ``number``, ``bool``, ``str``,
``array``, ``object``. JSON has one number type but QAPI two: ``300.0`` is not an integer.
"""

from __future__ import annotations

from typing import Any

from cvmig.monitor.protocol import QMPError

Schema = dict[str, tuple[str, bool]]

_RANGES = {"uint8": 0xFF, "uint32": 0xFFFF_FFFF, "uint64": (1 << 64) - 1,
           "size": (1 << 64) - 1}
_QEMU_NAMES = {"uint8": "uint8_t", "uint32": "uint32_t", "size": "uint64"}  # QEMU 10's words
_EXPECTED = {"int": "integer", "uint8": "integer", "uint32": "integer", "uint64": "integer",
             "size": "integer", "number": "number", "bool": "boolean", "str": "string",
             "array": "array", "object": "object"}


def check_value(name: str, kind: str, value: Any) -> Any:
    """The value, if it has type ``kind``; else QEMU's error for ``name``."""
    bad = QMPError(f"Invalid parameter type for '{name}', expected: {_EXPECTED[kind]}")
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "str":
        if not isinstance(value, str):
            raise bad
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
    elif kind == "array":
        if not isinstance(value, list):
            raise bad
    elif kind == "object":
        if not isinstance(value, dict):
            raise bad
    elif kind in _RANGES:  # unsigned, as QEMU 10's input visitor reads them
        if isinstance(value, bool) or not isinstance(value, int) or \
                not -(1 << 63) <= value < (1 << 64):
            raise QMPError(f"Parameter '{name}' expects uint64")
        value %= 1 << 64  # QEMU takes a negative int64 as its two's complement
        if value > _RANGES[kind]:
            raise QMPError(f"Parameter '{name}' expects {_QEMU_NAMES.get(kind, kind)}")
    else:  # int
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        if not -(1 << 63) <= value < (1 << 63):
            raise QMPError(f"Parameter '{name}' expects int64")
    return value


def check_args(args: dict[str, Any], schema: Schema) -> dict[str, Any]:
    """Known members type-checked in schema order, then missing and unexpected ones."""
    out: dict[str, Any] = {}
    for name, (kind, required) in schema.items():
        if name in args:
            out[name] = check_value(name, kind, args[name])
        elif required:
            raise QMPError(f"Parameter '{name}' is missing")
    for name in args:
        if name not in schema:
            raise QMPError(f"Parameter '{name}' is unexpected")
    return out


def check_enum(name: str, value: str, allowed: list[str] | tuple[str, ...]) -> str:
    if value not in allowed:
        raise QMPError(f"Parameter '{name}' does not accept value '{value}' "
                       f"(allowed: {', '.join(allowed)})")
    return value
