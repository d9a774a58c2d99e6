"""Parse a `fedgate ...` command line with the real CLI without running it."""

from __future__ import annotations

from collections.abc import Sequence

import click

from fedgate import cli


def parse(argv: Sequence[str], name: str = "fedgate") -> click.Context:
    """The context `fedgate <argv>` would run with; raises click's error on a bad or missing
    option. Subcommands are resolved through `get_command`, so lazily loaded ones count."""
    command: click.Command = cli.main
    args = list(argv)
    while args and isinstance(command, click.Group):
        sub = command.get_command(click.Context(command), args[0])
        if sub is None:
            break
        command, args = sub, args[1:]
    return command.make_context(name, args)
