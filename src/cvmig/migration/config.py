"""Guest configuration on the wire, and the sizes users type."""

from __future__ import annotations

import re
from typing import Any

from cvmig.guest.vm import GuestConfig
from cvmig.guest.workloads import parse_workload
from cvmig.wire.frames import ProtocolError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """'256M', '1G', '4096', '1.5G' -> bytes (binary units, as QEMU's -m)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{what} must be a number with an optional K/M/G/T suffix, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def config_to_json(c: GuestConfig) -> dict[str, Any]:
    return {
        "memory": c.memory,
        "vcpus": c.vcpus,
        "workload": str(c.workload),
        "tracker": c.tracker,
        "shared_pages": c.shared_pages,
    }


def config_from_json(obj: object) -> GuestConfig:
    """The source's guest config, validated as if a user had typed it here."""
    if not isinstance(obj, dict):
        raise ProtocolError("guest config must be a JSON object")
    try:
        cfg = GuestConfig(
            memory=int(obj["memory"]),
            vcpus=int(obj["vcpus"]),
            workload=parse_workload(str(obj["workload"])),
            tracker=str(obj.get("tracker", "auto")),
            shared_pages=int(obj.get("shared_pages", 16)),
        )
        cfg.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"guest config from the source is not acceptable here: {e}") from None
    return cfg
