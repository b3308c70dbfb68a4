"""Where a benchmark ran: printed with every result, stored in every JSON record."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, object]:
    """A small, JSON-ready description of this machine."""
    import cryptography
    import numpy

    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "numpy": numpy.__version__,
    }


def machine_line() -> str:
    m = machine_info()
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}"
    )


class SideBySideLog:
    """A side-by-side bench's lines: each echoed as it comes (call it), the first two the
    machine and how to read ``measures``; `write` keeps them in a .log beside its JSON."""

    def __init__(self, measures: str) -> None:
        self.lines: list[str] = []
        self(machine_line())
        self(f"note: ratios are what counts here; absolute {measures} move with the "
             "machine's load")

    def __call__(self, line: str) -> None:
        import click

        click.echo(line)
        self.lines.append(line)

    def write(self, json_path: Path, record: dict[str, Any]) -> None:
        """``record`` as JSON at ``json_path`` (with the machine and the time), the lines
        in the .log beside it."""
        import click

        full = {"machine": machine_info(), **record,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(full, indent=2) + "\n")
        json_path.with_suffix(".log").write_text("\n".join(self.lines) + "\n")
        click.echo(f"wrote {json_path} and {json_path.with_suffix('.log')}")
