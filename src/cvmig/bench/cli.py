"""`cvmig bench ...`: reproducible measurements, each printing the machine it ran on."""

from __future__ import annotations

import click

from cvmig.cli import LazyGroup

_BENCHES: dict[str, str] = {
    "psp": "cvmig.bench.psp:psp",
    "paper": "cvmig.bench.paper:paper",
    "prestart": "cvmig.bench.prestart:prestart",
    "qemu": "cvmig.bench.qemu:qemu",
    "tls": "cvmig.bench.tls:tls",
}


@click.group(cls=LazyGroup, lazy=_BENCHES)
def bench() -> None:
    """Benchmarks: rerun them anywhere; ratios are measured side by side in one run."""
