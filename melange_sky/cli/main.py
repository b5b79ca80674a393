"""The `melange-sky` command group: one-line errors with their exit codes, `--debug`, and the top-level help.

The commands live beside it, one module per room they drive (plan, inputs, fleet); each parses, calls the library
and prints. No solver, SQL or SkyPilot code in this package."""
from __future__ import annotations

import importlib
import io
import logging
import os
import select
import sys
from typing import Any

import click

from melange_sky import __version__
from melange_sky._signals import deliver, signals_held
from melange_sky.errors import MelangeError

DEBUG_KEY = "melange_sky.debug"
LOGS_KEY = "melange_sky.logs"
INTERRUPTED = 130  # the exit code of a Ctrl-C, SIGTERM or SIGHUP, wherever it lands (README: exit codes)

# Where each command lives (a module of this package). A command's module is imported when that command runs, or
# when the help lists them all: `melange-sky solve` does not pay for the engine's, the router's or the fleet's
# imports, and neither does each of the many short CLI runs a script or a test makes.
COMMAND_MODULES = {
    "catalog": "plan", "plan": "plan", "solve": "plan", "sweep": "sweep",
    "workload": "workload", "profile": "profile",
    "estimate": "estimate", "emulate": "emulate", "simulate": "simulate", "replay": "replay",
    "up": "fleet", "status": "fleet", "down": "fleet", "watch": "watch", "serve": "serve",
}


def load_commands(module: str) -> None:
    """Import a command module (its decorators register its commands on `main`). A Ctrl-C is held meanwhile and
    raised right after: raised in the middle of an import it could leave a C extension half-initialised."""
    with signals_held() as held:
        importlib.import_module(f"melange_sky.cli.{module}")
    deliver(held)


class MelangeGroup(click.Group):
    """Turns library errors into one `Error: ...` line and their exit code; a traceback only with --debug."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Click's own usage errors (a bad option, a missing argument) as one line too, exit code 2."""
        if not standalone_mode:  # a caller that handles Click's exceptions itself
            return super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "melange-sky"
            click.echo(f"Error: {exc.format_message()} (see `{where} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort as exc:  # Click turns a Ctrl-C into Abort: the documented exit code is 130, not 1
            if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
                click.echo("Interrupted.", err=True)
                sys.exit(INTERRUPTED)
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except KeyboardInterrupt:  # outside Click's own handler (while it builds the context)
            click.echo("Interrupted.", err=True)
            sys.exit(INTERRUPTED)
        # Without standalone mode Click returns an exit code (from ctx.exit) instead of exiting: exit with it.
        sys.exit(rv if isinstance(rv, int) else 0)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            load_commands(COMMAND_MODULES[cmd_name])
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context):
        if _debug(ctx):  # MELANGE_SKY_DEBUG=1 (--debug itself turns them on as it is parsed)
            _show_library_logs(ctx)
        try:
            return super().invoke(ctx)
        except MelangeError as exc:
            if _debug(ctx):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
            if isinstance(exc, BrokenPipeError) and _stdout_gone():  # not a bug: the reader closed our stdout;
                raise  # Click's main exits 1 quietly on EPIPE (and pacifies the flush at shutdown)
            if _debug(ctx):
                raise
            click.echo(f"Error: internal error: {type(exc).__name__}: {exc}. Rerun with --debug for the traceback "
                       f"and please report it.", err=True)
            ctx.exit(1)


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (`melange-sky status | head -1`): then a BrokenPipeError is
    the reader's choice, not our bug."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # no real descriptor (a test's runner)
        return False


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.meta.get(DEBUG_KEY)) or os.environ.get("MELANGE_SKY_DEBUG", "") not in ("", "0")


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[DEBUG_KEY] = True
        _show_library_logs(ctx)


class _StderrLog(logging.Handler):
    """A library log record as one line on the current stderr: "[skypilot] Failed to fetch ..."."""

    def emit(self, record: logging.LogRecord) -> None:
        name = "skypilot" if record.name.endswith(".sky") else record.name
        click.echo(f"[{name}] {record.getMessage()}", err=True)


def _show_library_logs(ctx: click.Context) -> None:
    """With --debug, melange-sky's library logs (SkyPilot's own lines among them) go to stderr until the command
    ends; without it they are dropped (the library only logs, it never prints)."""
    if ctx.meta.get(LOGS_KEY):
        return
    logger = logging.getLogger("melange_sky")
    handler, level = _StderrLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    ctx.meta[LOGS_KEY] = True

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)
        ctx.meta.pop(LOGS_KEY, None)

    ctx.call_on_close(restore)


debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                            help="Show the full traceback when something fails, and SkyPilot's own log lines.")


def warn(messages) -> None:
    for message in messages:
        click.echo(f"Warning: {message}", err=True)


@click.group(cls=MelangeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="melange-sky")
@debug_option
def main() -> None:
    """melange-sky: the cheapest mix of GPU types for serving an LLM, deployed with SkyPilot.

    Given a workload histogram (request sizes), a request rate and each GPU type's price and profiled
    throughput, it solves Mélange's integer program for the cheapest fleet, and deploys it as one SkyPilot
    cluster per replica, across clouds.

    \b
    The workflow:
      melange-sky solve examples/example.json          # the cheapest mix, and what it saves
      melange-sky plan examples/example.json           # + one SkyPilot task per replica
      melange-sky up examples/example.json --dryrun    # what `up` would launch, validated
      melange-sky up examples/example.json             # launch it (needs `sky check` to pass)
      melange-sky status / melange-sky down example    # watch / tear down
    Inputs: `melange-sky workload TRACE` (histogram), `melange-sky profile` (tputs), `melange-sky catalog` (offers).
    """
