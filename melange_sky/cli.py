"""The `melange-sky` command line: parse options, call the library, print. No solver, SQL or SkyPilot code here."""
from __future__ import annotations

import json
import os
import sys

import click

from . import __version__
from .errors import MelangeError

DEBUG_KEY = "melange_sky.debug"


class MelangeGroup(click.Group):
    """Turns library errors into one `Error: ...` line and their exit code; a traceback only with --debug."""

    def invoke(self, ctx: click.Context):
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
            if _debug(ctx):
                raise
            click.echo(f"Error: internal error: {type(exc).__name__}: {exc}. Rerun with --debug for the traceback "
                       f"and please report it.", err=True)
            ctx.exit(1)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.meta.get(DEBUG_KEY)) or os.environ.get("MELANGE_SKY_DEBUG", "") not in ("", "0")


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[DEBUG_KEY] = True


debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                            help="Show the full traceback when something fails.")


def _warn(messages) -> None:
    for message in messages:
        click.echo(f"Warning: {message}", err=True)


@click.group(cls=MelangeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="melange-sky")
@debug_option
def main() -> None:
    """melange-sky: the cheapest mix of GPU types for serving an LLM, deployed with SkyPilot.

    Given a workload histogram (request sizes), a request rate and each GPU type's price and profiled
    throughput, it solves Mélange's integer program for the cheapest fleet.

    \b
    Start with:
      melange-sky solve examples/example.json
    """


@main.command()
@click.argument("config", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", default="melange_result.json", show_default=True, type=click.Path(path_type=str),
              help="Where to write the result, in the original Mélange shape: {\"A10G\": 3, ..., \"cost\": 6.7}.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result record (with the routing table) "
                                                      "as JSON on stdout instead of the table.")
@click.option("--formulation", type=click.Choice(["slices", "paper", "split"]), default="slices", show_default=True,
              help="slices: the paper's optimum at the config's slice_factor (fast form); paper: the paper's literal "
                   "ILP, for cross-checking; split: buckets divided among GPU types in any proportion (never dearer).")
@click.option("--solver", "solver_name", type=click.Choice(["highs", "cbc"]), default="highs", show_default=True,
              help="MILP solver: HiGHS, or CBC (PuLP's bundled binary, or --solver-path).")
@click.option("--solver-path", type=click.Path(dir_okay=False, path_type=str),
              help="A CBC binary to use (implies --solver cbc), e.g. /opt/homebrew/opt/cbc/bin/cbc.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds the solver may search; if it stops early it reports the best fleet and the proven gap.")
@click.option("--headroom", type=float, help="Highest planned utilisation of any GPU, in (0, 1] (overrides the "
                                             "config's `headroom`; default 1).")
@click.option("--rate", type=float, help="Total request rate in req/s (overrides `total_request_rate`).")
@debug_option
def solve(config: str, output: str, as_json: bool, formulation: str, solver_name: str, solver_path: str | None,
          time_limit: float, headroom: float | None, rate: float | None) -> None:
    """Find the cheapest GPU mix for CONFIG (a Mélange config JSON).

    Prints the fleet (count, $/h and utilisation per GPU type), the single-GPU-type fleets and the saving, and
    writes melange_result.json.

    \b
    Examples:
      melange-sky solve examples/example.json
      melange-sky solve config.json --formulation split --rate 50 --json
    """
    from .config import load_config, with_overrides
    from .report import format_solve, write_json
    from .solver import SolverOptions
    from .solver import solve as run_solve

    if solver_path:
        solver_name = "cbc"
    cfg = with_overrides(load_config(config), rate=rate, headroom=headroom)
    _warn(cfg.warnings)
    result = run_solve(cfg, formulation, SolverOptions(name=solver_name, path=solver_path, time_limit=time_limit))
    write_json(output, result.original_output())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_solve(result))
    if result.status != "optimal":
        _warn([f"the solver hit --time-limit {time_limit:g} s before proving this fleet optimal"])
    click.echo(f"Wrote {output}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
