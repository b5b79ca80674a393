"""The `melange-sky` command line: `main`, whose commands load on first use (cli/main.py's COMMAND_MODULES).

`all_commands()` loads every one, for whatever walks them all (the docs' CLI reference, tests)."""
from __future__ import annotations

import click

from melange_sky.cli.main import COMMAND_MODULES, load_commands, main

__all__ = ["all_commands", "main"]


def all_commands() -> dict[str, click.Command]:
    """Every command by name, each module loaded."""
    for module in sorted(set(COMMAND_MODULES.values())):
        load_commands(module)
    return dict(sorted(main.commands.items()))
