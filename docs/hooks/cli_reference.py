"""MkDocs hook: the CLI reference page (cli.md) gets every command's `--help`, rendered from the Click commands
when the site is built, so the reference can never lag the code. A command registered later on
`melange_sky.cli.main` (any `@main.command`) appears with no change here.

Why not mkdocs-click: it pastes docstrings as Markdown, and ours are terminal text (`\\b` blocks of examples,
aligned comments) that Markdown folds into one paragraph. `--help` in a text block is what users see.
"""
from __future__ import annotations

import click

from melange_sky.cli import main

MARKER = "<!-- cli-reference -->"
WIDTH = 100  # fixed, so the page does not depend on the builder's terminal


def _help(command: click.Command, name: str, parent: click.Context | None) -> tuple[str, click.Context]:
    ctx = click.Context(command, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH)
    return command.get_help(ctx), ctx


def cli_reference_markdown() -> str:
    """Markdown for every command of `melange-sky`: the group's --help, then one section per command."""
    top, top_ctx = _help(main, "melange-sky", None)
    parts = ["## melange-sky", "", "```text", top, "```", ""]
    for name in main.list_commands(top_ctx):
        command = main.get_command(top_ctx, name)
        if command is None or command.hidden:
            continue
        text, _ = _help(command, name, top_ctx)
        short = command.get_short_help_str(limit=WIDTH)
        parts += [f"## {name}", "", short, "", "```text", text, "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs' hook signature
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference_markdown())
    return markdown
