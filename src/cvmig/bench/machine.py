"""Where a benchmark ran: printed with every result, stored in every JSON record."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable


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


def side_by_side_log(measures: str) -> tuple[Callable[[str], None], list[str]]:
    """A side-by-side bench's ``say`` and the lines it said (for the .log beside its JSON):
    each line echoed as it comes, the first two the machine and how to read ``measures``."""
    import click

    lines: list[str] = []

    def say(line: str) -> None:
        click.echo(line)
        lines.append(line)

    say(machine_line())
    say(f"note: ratios are what counts here; absolute {measures} move with the machine's load")
    return say, lines
