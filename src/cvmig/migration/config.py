"""Guest configuration on the wire, and the sizes users type."""

from __future__ import annotations

from typing import Any

from cvmig.guest.vm import GuestConfig
from cvmig.guest.workloads import parse_workload
from cvmig.units import parse_size  # the one size grammar (QEMU's)
from cvmig.wire.frames import ProtocolError

__all__ = ["config_from_json", "config_to_json", "parse_size"]


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
