"""A click group whose subcommands' modules are imported only when one is invoked (or listed).

Every fedgate process (a sidecar in each pod) starts through `fedgate.cli`; the operator
subcommands' imports (CA tooling, GitOps, status scrapers) would otherwise weigh on each
(docs/footprint.md). This is click's documented lazy-loading pattern; it decides nothing else.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import click


class LazyGroup(click.Group):
    """`lazy_subcommands`: command name -> (module, attribute of the click command in it)."""

    def __init__(
        self, *args: Any, lazy_subcommands: Mapping[str, tuple[str, str]] = {}, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands and cmd_name not in self.commands:
            module, attr = self.lazy_subcommands[cmd_name]
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command), f"{module}.{attr} is not a command"
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)
