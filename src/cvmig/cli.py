"""The `cvmig` command.

Each part of cvmig owns its subcommands; this file only wires them into one group, lazily,
so that `cvmig --help` stays fast and a part's imports load only when it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

# name -> "module:attribute" of a click command or group
_COMMANDS: dict[str, str] = {
    "migrate": "cvmig.migration.cli:migrate",
    "vm": "cvmig.migration.cli:vm",
    "guest": "cvmig.guest.cli:guest",
    "bench": "cvmig.bench.cli:bench",
    "model": "cvmig.model.cli:model",
    "resolve": "cvmig.migration.resolve:resolve",
    "pki": "cvmig.pki:pki",
}


class LazyGroup(click.Group):
    """A click group whose subcommands ("module:attribute") load only when used."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.lazy)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command)
        return cmd


@click.group(cls=LazyGroup, lazy=_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cvmig")
def main() -> None:
    """Live migration for confidential virtual machines (AMD SEV-style, emulated)."""


if __name__ == "__main__":
    main()
