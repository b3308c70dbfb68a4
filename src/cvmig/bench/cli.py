"""`cvmig bench ...`: reproducible measurements, each printing the machine it ran on."""

from __future__ import annotations

import importlib

import click

_BENCHES: dict[str, str] = {
    "psp": "cvmig.bench.psp:psp",
    "paper": "cvmig.bench.paper:paper",
}


class _LazyBench(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_BENCHES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _BENCHES.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command)
        return cmd


@click.group(cls=_LazyBench)
def bench() -> None:
    """Benchmarks: rerun them anywhere; ratios are measured side by side in one run."""
