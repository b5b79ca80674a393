"""`solve`, `catalog` and `plan`: from a config to a fleet on paper."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator

import click

from melange_sky._io import write_json
from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.options import (SolveArgs, per_offer_option, plan_options, plan_settings, solve_options,
                                     warn_time_limit)
from melange_sky.cli.text import format_offers, format_plan, format_solve, simulate_hint
from melange_sky.deploy.catalog import default_catalog
from melange_sky.deploy.plan import RESULT_FILE, build_plan, solve_offers
from melange_sky.deploy.plan_files import write_plan_files


@main.command()
@click.argument("config", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", type=click.Path(path_type=str),
              help=f"Where to write the result, in the original Mélange shape: {{\"A10G\": 3, ..., \"cost\": 6.7}} "
                   f"(default {RESULT_FILE}; with --json, only if given).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result record (with the routing table) "
                                                      "as JSON on stdout instead of the table.")
@per_offer_option
@solve_options
@debug_option
def solve(config: str, output: str | None, as_json: bool, per_offer: bool, solve_args: SolveArgs) -> None:
    """Find the cheapest GPU mix for CONFIG (a Mélange config, JSON or YAML).

    Each GPU is bound to a cloud offer as `plan` binds it (spot prices with use_spot, instance sizes, quotas;
    --per-offer as in `plan`), so this is the fleet `plan` makes. Prints the fleet (count, $/h and utilisation per
    GPU type), the single-GPU-type fleets and the saving, and writes melange_result.json.

    \b
    Examples:
      melange-sky solve examples/example.json
      melange-sky solve config.json --formulation split --rate 50 --json
    """
    cfg = solve_args.load(config)
    with _status_line() as progress:
        result = solve_offers(cfg, plan_settings(solve_args, per_offer, None), progress=progress)
    warn([w for w in result.warnings if w not in cfg.warnings])
    output = output or (None if as_json else RESULT_FILE)
    if output:
        write_json(output, result.original_output())
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_solve(result))
    warn_time_limit(result, solve_args)
    if output:
        click.echo(f"Wrote {output}", err=True)
    hint = None if as_json else simulate_hint(config, cfg)
    if hint:
        click.echo(hint, err=True)


@main.command()
@click.argument("gpu", required=False)
@click.option("--cloud", "clouds", multiple=True, metavar="CLOUD",
              help="Only this cloud (aws, azure, gcp, lambda); repeat for several. Default: all.")
@click.option("--json", "as_json", is_flag=True, help="Print the offers as a JSON array instead of the table.")
@debug_option
def catalog(gpu: str | None, clouds: tuple[str, ...], as_json: bool) -> None:
    """List GPU offers (cloud, region, instance type, $/h), cheapest per GPU first.

    GPU may be any common spelling (A100-80GB, a100_80gb, A100-80). Prices come from SkyPilot's downloaded catalogs
    when present (~/.sky/catalogs), else from the snapshot bundled with melange-sky.

    \b
    Examples:
      melange-sky catalog A10G
      melange-sky catalog A100-80GB --cloud azure --cloud gcp --json
    """
    cat = default_catalog()
    offers = cat.offers(gpu, clouds or None)
    if as_json:
        click.echo(json.dumps([o.to_dict() for o in offers], indent=2))
    else:
        click.echo(format_offers(offers, cat.describe(sorted({o.cloud for o in offers}))))


@main.command()
@click.argument("config", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output-dir", "output_dir", default=".", show_default=True,
              type=click.Path(path_type=str), help="Directory for the plan's files (created if missing).")
@click.option("-f", "--format", "formats", type=click.Choice(["skypilot", "json"]), multiple=True,
              help="skypilot: one task YAML per replica (skypilot_<GPU>_<i>.yaml); json: melange_result.json and "
                   "melange_plan.json (the solve plus every replica's offer). Repeatable; default both.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (replicas, offers, solve) as JSON on stdout.")
@plan_options
@solve_options
@debug_option
def plan(config: str, output_dir: str, formats: tuple[str, ...], as_json: bool, per_offer: bool,
         template: str | None, solve_args: SolveArgs) -> None:
    """Solve CONFIG, map each GPU to a cloud offer and render one SkyPilot task per replica.

    Each file launches one replica on its own: `sky launch -c NAME skypilot_A10G_0.yaml --secret HF_TOKEN`
    (secret values come from your environment and are never written to the files). `melange-sky up` launches
    them all. The files an earlier plan wrote in the directory and this one does not are removed (listed in its
    .melange-sky-plan.json; one edited since is kept), so no stale task is left to launch; other files are kept.

    \b
    Examples:
      melange-sky plan examples/example.json -f skypilot
      melange-sky plan examples/multicloud.json --per-offer -o fleet/
      melange-sky plan config.json --template sglang --json
    """
    cfg = solve_args.load(config)
    result = build_plan(cfg, plan_settings(solve_args, per_offer, template))
    warn([w for w in result.result.warnings if w not in cfg.warnings])
    files = write_plan_files(result, output_dir, tuple(formats) or ("skypilot", "json"))
    if files.stale:
        warn([f"{output_dir}: {len(files.stale)} task file(s) not from this plan, kept (not written by melange-sky "
              f"as they are now): {', '.join(files.stale[:5])}" + (" ..." if len(files.stale) > 5 else "")
              + "; delete them before launching by hand"])
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_plan(result))
    warn_time_limit(result.result, solve_args)
    removed = (f"; removed {len(files.removed)} an earlier plan wrote there: {', '.join(files.removed)}"
               if files.removed else "")
    click.echo(f"Wrote {len(files.written)} file(s) to {output_dir}{removed}", err=True)


@contextlib.contextmanager
def _status_line() -> Iterator[Callable[[str], None] | None]:
    """On a terminal, one line on stderr naming the solve that runs now and the seconds so far, rewritten as each
    starts and erased at the end; None (no callback) when stderr is a file or a pipe, so `--json` and scripts see
    nothing. (Drawn when a solve starts, not on a timer: HiGHS holds the interpreter while it runs.)"""
    if not sys.stderr.isatty():
        yield None
        return
    started = time.monotonic()
    shown = False

    def show(what: str) -> None:
        nonlocal shown
        sys.stderr.write(f"\r\033[K{what}... ({time.monotonic() - started:.0f} s so far)")
        sys.stderr.flush()
        shown = True

    try:
        yield show
    finally:
        if shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
