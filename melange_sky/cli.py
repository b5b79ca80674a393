"""The `melange-sky` command line: parse options, call the library, print. No solver, SQL or SkyPilot code here."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass

import click

from . import __version__
from .errors import MelangeError
from .fleet import DEFAULT_MAX_ROUNDS, DEFAULT_PARALLEL

DEBUG_KEY = "melange_sky.debug"


class MelangeGroup(click.Group):
    """Turns library errors into one `Error: ...` line and their exit code; a traceback only with --debug."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Click's own usage errors (a bad option, a missing argument) as one line too, exit code 2."""
        if not standalone_mode:  # a caller that handles Click's exceptions itself
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "melange-sky"
            click.echo(f"Error: {exc.format_message()} (see `{where} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        # Without standalone mode Click returns an exit code (from ctx.exit) instead of exiting: exit with it.
        sys.exit(rv if isinstance(rv, int) else 0)

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


@dataclass(frozen=True)
class SolveArgs:
    """The options every command that solves shares (solve, plan, up)."""

    formulation: str
    solver_name: str
    solver_path: str | None
    time_limit: float
    headroom: float | None
    rate: float | None

    def load(self, path: str, name: str | None = None):
        from .config import load_config, with_overrides

        config = with_overrides(load_config(path), rate=self.rate, headroom=self.headroom)
        if name:
            config = dataclasses.replace(config, name=name)
        _warn(config.warnings)
        return config

    @property
    def solver(self):
        from .solver import SolverOptions

        return SolverOptions(name="cbc" if self.solver_path else self.solver_name, path=self.solver_path,
                             time_limit=self.time_limit)


def solve_options(command):
    """Add the solve options to a command; it receives them as one `solve_args: SolveArgs`."""
    options = [
        click.option("--formulation", type=click.Choice(["slices", "paper", "split"]), default="slices",
                     show_default=True, help="slices: the paper's optimum at the config's slice_factor (fast form); "
                     "paper: the paper's literal ILP, for cross-checking; split: buckets divided among GPU types in "
                     "any proportion (never dearer)."),
        click.option("--solver", "solver_name", type=click.Choice(["highs", "cbc"]), default="highs",
                     show_default=True, help="MILP solver: HiGHS, or CBC (PuLP's bundled binary, or --solver-path)."),
        click.option("--solver-path", type=click.Path(dir_okay=False, path_type=str),
                     help="A CBC binary to use (implies --solver cbc), e.g. /opt/homebrew/opt/cbc/bin/cbc."),
        click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
                     help="Seconds the solver may search; if it stops early it reports the best fleet and the "
                          "proven gap."),
        click.option("--headroom", type=float, help="Highest planned utilisation of any GPU, in (0, 1] (overrides "
                                                    "the config's `headroom`; default 1)."),
        click.option("--rate", type=float, help="Total request rate in req/s (overrides `total_request_rate`)."),
    ]

    @functools.wraps(command)
    def wrapper(*args, formulation, solver_name, solver_path, time_limit, headroom, rate, **kwargs):
        solve_args = SolveArgs(formulation, solver_name, solver_path, time_limit, headroom, rate)
        return command(*args, solve_args=solve_args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@main.command()
@click.argument("config", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", default="melange_result.json", show_default=True, type=click.Path(path_type=str),
              help="Where to write the result, in the original Mélange shape: {\"A10G\": 3, ..., \"cost\": 6.7}.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result record (with the routing table) "
                                                      "as JSON on stdout instead of the table.")
@solve_options
@debug_option
def solve(config: str, output: str, as_json: bool, solve_args: SolveArgs) -> None:
    """Find the cheapest GPU mix for CONFIG (a Mélange config JSON).

    Prints the fleet (count, $/h and utilisation per GPU type), the single-GPU-type fleets and the saving, and
    writes melange_result.json.

    \b
    Examples:
      melange-sky solve examples/example.json
      melange-sky solve config.json --formulation split --rate 50 --json
    """
    from .report import format_solve, write_json
    from .solver import solve as run_solve

    result = run_solve(solve_args.load(config), solve_args.formulation, solve_args.solver)
    write_json(output, result.original_output())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_solve(result))
    _warn_time_limit(result, solve_args)
    click.echo(f"Wrote {output}", err=True)


def _warn_time_limit(result, solve_args: SolveArgs) -> None:
    if result.status != "optimal":
        _warn([f"the solver hit --time-limit {solve_args.time_limit:g} s before proving this fleet optimal"])


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
    from .catalog import default_catalog
    from .report import format_offers

    cat = default_catalog()
    offers = cat.offers(gpu, clouds or None)
    if as_json:
        click.echo(json.dumps([o.to_dict() for o in offers], indent=2))
    else:
        click.echo(format_offers(offers, cat.describe(sorted({o.cloud for o in offers}))))


def bucket_edge_options(command):
    """--input-buckets / --output-buckets, shared by `workload` and `profile`."""
    command = click.option("--output-buckets", metavar="EDGES", help="Output-length bucket edges in tokens (default: "
                           "the config's with --into, else Mélange's 1,25,100,250,500,1000,2000).")(command)
    return click.option("--input-buckets", metavar="EDGES", help="Input-length bucket edges in tokens, "
                        "comma-separated (default: the config's with --into, else Mélange's "
                        "1,25,100,250,500,1000,2000,4000,8000).")(command)


@main.command()
@click.argument("trace", type=click.Path(path_type=str))
@bucket_edge_options
@click.option("--rate", default="auto", show_default=True, help="Total request rate in req/s, or auto: the mean "
              "rate between the trace's first and last timestamp.")
@click.option("--skip-bad", is_flag=True, help="Skip broken rows and count them, instead of stopping at the first.")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "csv"]), default="auto", show_default=True,
              help="Trace format; auto: by extension (.jsonl, .csv, also .gz), else by the first character.")
@click.option("--into", type=click.Path(dir_okay=False, path_type=str), metavar="CONFIG",
              help="Merge into this config (in place, unless -o): replaces workload_distribution, "
                   "total_request_rate and the bucket edges, keeps everything else. In place, a merge that would "
                   "make the config invalid (buckets that no longer fit its tputs) is refused.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str),
              help="Write the config keys (with --into: the merged config) to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the full histogram record (counts, shares, rate, "
                                                      "overflow, skipped rows) as JSON on stdout.")
@debug_option
def workload(trace: str, input_buckets: str | None, output_buckets: str | None, rate: str, skip_bad: bool,
             fmt: str, into: str | None, output: str | None, as_json: bool) -> None:
    """Turn a request trace (JSONL or CSV) into a workload histogram for a config.

    Each row needs prompt and completion token counts: input_len/output_len, prompt_tokens/completion_tokens,
    input_tokens/output_tokens, or an OpenAI-style "usage" object; an optional "timestamp" (epoch seconds, or
    milliseconds/microseconds, recognised by size; or ISO-8601) gives the request rate. The file is streamed:
    memory does not grow with its length.

    \b
    Examples:
      melange-sky workload requests.jsonl
      melange-sky workload requests.csv --rate 30 -o workload.json
      melange-sky workload requests.jsonl.gz --into config.json --skip-bad
      melange-sky workload requests.jsonl --input-buckets 1,100,1000,8000 --output-buckets 1,100,2000 --json
    """
    from .errors import TraceError
    from .report import format_workload, write_config_json
    from .workload import edges_for_config, merge_workload, parse_edges, read_config_object, read_trace

    given_rate: float | None = None
    if rate.strip().lower() != "auto":
        try:
            given_rate = float(rate)
        except ValueError:
            raise TraceError(f"--rate must be auto or a number of requests per second, got {rate!r}") from None
    config = read_config_object(into) if into else None
    in_edges, out_edges = edges_for_config(
        config, parse_edges(input_buckets, "--input-buckets") if input_buckets else None,
        parse_edges(output_buckets, "--output-buckets") if output_buckets else None, into or "<config>")
    result = read_trace(trace, input_edges=in_edges, output_edges=out_edges, rate=given_rate, skip_bad=skip_bad,
                        fmt=None if fmt == "auto" else fmt)
    _warn(result.warnings)
    written = None
    if config is not None and into:
        merged = merge_workload(config, result, source=into, in_place=not output)
        _warn(merged.warnings)
        written = output or into
        write_config_json(written, merged.data)
    elif output:
        written = output
        write_config_json(written, result.config_fragment())
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "written": written}, indent=2))
    else:
        click.echo(format_workload(result))
    if written:
        click.echo(f"Wrote {written}", err=True)


@main.command()
@click.option("--endpoint", required=True, metavar="URL", help="Base URL of the OpenAI-compatible server (vLLM, "
              "SGLang), e.g. http://10.0.0.5:8000. Nothing but this host and port is contacted.")
@click.option("--model", required=True, help="Model name as the server knows it (see URL/v1/models).")
@click.option("--tpot-slo-ms", type=float, default=120.0, show_default=True,
              help="SLO on the mean time per output token, in milliseconds.")
@bucket_edge_options
@click.option("--buckets", "cells", default="all", show_default=True, metavar="all|I:J,...",
              help="Which buckets to measure: all, or 0-based cells such as 0:0,0:1,2:* (a whole row); the others "
                   "are 0 in tputs (with --into they keep their previous values).")
@click.option("--requests-per-step", type=click.IntRange(min=1), default=50, show_default=True,
              help="Measured requests per rate tried (plus a warm-up and a filler of at most as many).")
@click.option("--start-rate", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="First rate tried, req/s; it doubles while the SLO holds, then bisects.")
@click.option("--max-rate", type=click.FloatRange(min=0, min_open=True), default=512.0, show_default=True,
              help="Highest rate tried, req/s.")
@click.option("--min-rate", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True,
              help="Lowest rate tried before a bucket is reported as SLO not met, req/s.")
@click.option("--bisect-steps", type=click.IntRange(min=0), default=4, show_default=True,
              help="Bisections between the last passing and the first failing rate.")
@click.option("--timeout", "request_timeout", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True, help="Seconds one streamed request may take at least (a bucket with long "
                                      "outputs gets 3x their time at the SLO); longer counts as a timeout.")
@click.option("--size", type=click.Choice(["mid", "upper"]), default="mid", show_default=True,
              help="Length each bucket is profiled at: its midpoint, or its largest length (conservative).")
@click.option("--estimate", type=click.Choice(["fit", "pass"]), default="fit", show_default=True,
              help="tputs value: fit: where a line through the measured TPOT of the steps around the SLO meets it "
                   "(steadier); pass: the highest rate that passed.")
@click.option("--no-ignore-eos", is_flag=True, help="Do not send \"ignore_eos\": true (for servers that reject it).")
@click.option("--api-key", envvar="MELANGE_SKY_API_KEY", help="Bearer token for the server "
                                                              "[env MELANGE_SKY_API_KEY]; never written to a file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str),
              help="Write the full profile (tputs, per-bucket steps, TTFT/TPOT/latency percentiles) as JSON.")
@click.option("--into", type=click.Path(dir_okay=False, path_type=str), metavar="CONFIG",
              help="Set --gpu's tputs in this config (in place); gpu_info may be a dict or a list.")
@click.option("--gpu", help="GPU type name the endpoint runs on, for --into (added to gpu_info if missing).")
@click.option("--cost", type=click.FloatRange(min=0, min_open=True), help="$/h of --gpu, for --into.")
@click.option("--json", "as_json", is_flag=True, help="Print the full profile as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@debug_option
def profile(endpoint: str, model: str, tpot_slo_ms: float, input_buckets: str | None, output_buckets: str | None,
            cells: str, requests_per_step: int, start_rate: float, max_rate: float, min_rate: float,
            bisect_steps: int, request_timeout: float, size: str, estimate: str, no_ignore_eos: bool,
            api_key: str | None,
            output: str | None, into: str | None, gpu: str | None, cost: float | None, as_json: bool,
            quiet: bool) -> None:
    """Measure one GPU type's tputs (max req/s per bucket within a TPOT SLO) from a running model server.

    Per bucket it streams synthetic requests of the bucket's size (Poisson arrivals) at rising rates, then
    bisects, and reports the highest rate whose mean time per output token meets --tpot-slo-ms, with TTFT and
    latency percentiles. Errors and timeouts are reported per bucket (up to 10% errors per rate are tolerated);
    an HTTP 4xx on the first request (wrong URL or model) stops at once, and a profile in which no bucket could
    be measured exits non-zero without touching --into.

    \b
    Examples:
      melange-sky profile --endpoint http://10.0.0.5:8000 --model meta-llama/Llama-2-7b-chat-hf
      melange-sky profile --endpoint http://10.0.0.5:8000 --model M --buckets 0:*,1:* -o a10g.json
      melange-sky profile --endpoint http://10.0.0.5:8000 --model M --into config.json --gpu A10G --cost 1.01
    """
    from .errors import ProfileError
    from .profiler import ProfileSettings, config_edges, merge_profile, parse_cells, profile_endpoint
    from .report import format_profile, format_profile_event, write_config_json
    from .workload import edges_for_config, parse_edges, read_config_object

    if bool(into) != bool(gpu):
        raise ProfileError("--into CONFIG and --gpu NAME go together: which GPU type's tputs to set in which config")
    settings = ProfileSettings(
        tpot_slo_ms=tpot_slo_ms, requests_per_step=requests_per_step, start_rate=start_rate, max_rate=max_rate,
        min_rate=min(min_rate, start_rate), bisect_steps=bisect_steps, request_timeout=request_timeout, size=size,
        estimate=estimate, ignore_eos=not no_ignore_eos, api_key=api_key)
    given_in = parse_edges(input_buckets, "--input-buckets") if input_buckets else None
    given_out = parse_edges(output_buckets, "--output-buckets") if output_buckets else None
    config = read_config_object(into) if into else None
    if config is not None and into:
        in_edges, out_edges = config_edges(config, given_in, given_out, into)
    else:
        in_edges, out_edges = edges_for_config(None, given_in, given_out)
    chosen = parse_cells(cells, (len(in_edges) - 1, len(out_edges) - 1))

    def show(event) -> None:
        line = format_profile_event(event)
        if line and not quiet:
            click.echo(line, err=True)

    result = profile_endpoint(endpoint, model, input_edges=in_edges, output_edges=out_edges, cells=chosen,
                              settings=settings, on_progress=show)
    failed = [b for b in result.buckets if b.status in ("failed", "slo_not_met")]
    _warn([f"bucket {b.cell[0]}:{b.cell[1]} {b.status}: {b.message} "
           f"({'kept from the config' if into and b.status == 'failed' else '0 in tputs'})" for b in failed])
    _warn(result.warnings)
    if output:
        write_config_json(output, result.to_dict())
        click.echo(f"Wrote {output}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_profile(result))
    result.check_usable(into)  # only zeros: exit non-zero, and never overwrite a GPU's tputs with them
    if config is not None and into and gpu:
        merged = merge_profile(config, result, gpu, cost, source=into)
        _warn(merged.warnings)
        write_config_json(into, merged.data)
        click.echo(f"Wrote {gpu}'s tputs into {into}", err=True)


def plan_options(command):
    """Options shared by `plan` and `up`: how a config becomes replicas."""
    options = [
        click.option("--per-offer", is_flag=True, help="Make every (GPU, offer) pair its own column in the solve, "
                     "so per-offer quotas (gpu_info.<GPU>.quotas) spread the fleet across clouds and regions."),
        click.option("--template", metavar="NAME|PATH", help="Task template: vllm (default), sglang, or a Jinja "
                     "file of your own (overrides deployment.template)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _plan_settings(solve_args: SolveArgs, per_offer: bool, template: str | None, compare: bool = True):
    from .plan import PlanSettings

    return PlanSettings(formulation=solve_args.formulation, solver=solve_args.solver, per_offer=per_offer,
                        template=template, compare=compare)


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
    them all.

    \b
    Examples:
      melange-sky plan examples/example.json -f skypilot
      melange-sky plan examples/multicloud.json --per-offer -o fleet/
      melange-sky plan config.json --template sglang --json
    """
    from .plan import build_plan, stale_task_files, write_plan
    from .report import format_plan

    cfg = solve_args.load(config)
    result = build_plan(cfg, _plan_settings(solve_args, per_offer, template))
    _warn([w for w in result.result.warnings if w not in cfg.warnings])
    written = write_plan(result, output_dir, tuple(formats) or ("skypilot", "json"))
    stale = stale_task_files(result, output_dir)
    if stale:
        _warn([f"{output_dir}: {len(stale)} task file(s) not from this plan: {', '.join(stale[:5])}"
               + (" ..." if len(stale) > 5 else "") + "; delete them before launching by hand"])
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_plan(result))
    _warn_time_limit(result.result, solve_args)
    click.echo(f"Wrote {len(written)} file(s) to {output_dir}", err=True)


def _launcher_output():
    """What a launcher prints (SkyPilot says "Running on cluster: ...") goes to stderr with the progress lines, so
    stdout holds only this command's own output (and stays parseable with --json)."""
    return contextlib.redirect_stdout(sys.stderr)


@contextlib.contextmanager
def _terminations_interrupt():
    """SIGTERM and SIGHUP (a closed terminal, a killed job) stop `up` the way Ctrl-C does: launches cancelled, every
    replica's true state recorded. Previous handlers are restored after."""
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    saved = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _backend_option(command):
    return click.option("--backend", metavar="NAME|MODULE:CLASS", help="Launcher to use (default: skypilot, or "
                        "$MELANGE_SKY_BACKEND): a `melange_sky.backends` entry point or a module:Class path.")(command)


def _confirm(question: str, yes: bool) -> bool:
    """Ask before spending money or deleting; never wait on a missing stdin."""
    if yes:
        return True
    if not sys.stdin or not sys.stdin.isatty():
        raise click.UsageError(f"{question} Refusing without confirmation: no terminal to ask on; pass -y.")
    return click.confirm(question, abort=True)


@main.command()
@click.argument("config", type=click.Path(dir_okay=True, path_type=str))
@click.option("--name", "fleet_name", help="Fleet name (default: the config's `name`, else its file name).")
@click.option("--dryrun", is_flag=True, help="Plan and validate every task with SkyPilot, launch nothing, write "
                                             "nothing: says what would be launched.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation before launching.")
@click.option("--parallel", type=click.IntRange(min=1), default=DEFAULT_PARALLEL, show_default=True,
              help="Launches in flight at once.")
@click.option("--max-rounds", type=click.IntRange(min=1), default=DEFAULT_MAX_ROUNDS, show_default=True,
              help="Launch rounds at most: the first, plus one re-plan after each round that found an offer "
                   "without capacity (1: never re-plan).")
@click.option("--retry-until-up", is_flag=True, help="Let SkyPilot keep retrying an offer until it has capacity "
                                                     "(instead of re-planning onto other offers).")
@click.option("--idle-minutes-to-autostop", "-i", type=click.IntRange(min=0),
              help="Stop (with --down: tear down) each cluster after this many idle minutes.")
@click.option("--down", "autodown", is_flag=True, help="Tear clusters down instead of stopping them when idle "
                                                       "(needs --idle-minutes-to-autostop).")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON on stdout (needs -y when "
                                                      "anything is to be launched or torn down).")
@_backend_option
@plan_options
@solve_options
@debug_option
def up(config: str, fleet_name: str | None, dryrun: bool, yes: bool, parallel: int, max_rounds: int,
       retry_until_up: bool, idle_minutes_to_autostop: int | None, autodown: bool, as_json: bool,
       backend: str | None, per_offer: bool, template: str | None, solve_args: SolveArgs) -> None:
    """Launch the cheapest mixed fleet for CONFIG: one SkyPilot cluster per replica, across clouds.

    Every replica is recorded in the ledger ($MELANGE_SKY_HOME, default ~/.melange-sky) before its launch is
    requested. Launches run in parallel; an offer without capacity is re-planned onto others. Rerunning `up`
    resumes: replicas already up are kept, missing ones launched, nothing duplicated.

    \b
    Examples:
      melange-sky up examples/example.json --dryrun
      HF_TOKEN=hf_... melange-sky up config.json -y --idle-minutes-to-autostop 60
    """
    from .backends import load_backend
    from .fleet import Fleet, UpOptions, config_hash, secrets_from_env
    from .ledger import Ledger
    from .plan import PlanRequest, build_plan, deployment_from_config
    from .report import format_dryrun, format_event, format_preview, format_up

    if autodown and idle_minutes_to_autostop is None:
        raise click.UsageError("--down needs --idle-minutes-to-autostop")
    cfg = solve_args.load(config, fleet_name)
    settings = _plan_settings(solve_args, per_offer, template)
    warned = set(cfg.warnings)

    def planner(request: PlanRequest):
        plan = build_plan(cfg, settings if request == PlanRequest() else dataclasses.replace(settings, compare=False),
                          request)
        _warn([w for w in plan.result.warnings if w not in warned])
        warned.update(plan.result.warnings)
        return plan

    on_event = None if as_json else (lambda event: click.echo(format_event(event), err=True))
    if dryrun:  # writes nothing: no ledger is created on a machine that has none
        fleet = Fleet(load_backend(backend), Ledger() if Ledger.exists() else None, on_event)
        with _launcher_output():
            report = fleet.dryrun(cfg.name, planner, os.environ)
        click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_dryrun(report))
        return
    secrets = secrets_from_env(deployment_from_config(cfg, template).secrets, os.environ)

    stdout = sys.stdout  # the preview is this command's output, not the launcher's

    def confirm(preview, notes) -> bool:
        if not as_json:
            click.echo(format_preview(preview, notes), file=stdout)
        if not (preview.launch or preview.remove):
            return True
        if as_json and not yes:  # a prompt would corrupt the JSON on stdout
            raise click.UsageError("up --json would launch or tear down replicas: pass -y as well")
        actions = [f"launch {len(preview.launch)} replica(s) (+${preview.launch_cost:.2f}/h)"] if preview.launch else []
        actions += [f"tear down {len(preview.remove)} that are not serving"] if preview.remove else []
        return _confirm(f"Fleet {preview.plan.fleet}: {' and '.join(actions)}?", yes)

    options = UpOptions(parallel=parallel, max_rounds=max_rounds, retry_until_up=retry_until_up,
                        idle_minutes_to_autostop=idle_minutes_to_autostop, down=autodown)
    digest = config_hash(dataclasses.asdict(cfg), settings.formulation, per_offer, template)
    with Ledger() as ledger, _launcher_output(), _terminations_interrupt():
        report = Fleet(load_backend(backend), ledger, on_event).up(cfg.name, planner, secrets, digest, options,
                                                                  confirm)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_up(report))
    if report.interrupted:
        sys.exit(130)
    if not report.complete:
        sys.exit(1)


@main.command()
@click.argument("fleet_name", metavar="[FLEET]", required=False)
@click.option("--refresh", is_flag=True, help="Ask the launcher (SkyPilot) for each cluster's live state and "
                                              "endpoint first, and record it.")
@click.option("--json", "as_json", is_flag=True, help="Print fleets and replicas as JSON on stdout.")
@_backend_option
@debug_option
def status(fleet_name: str | None, refresh: bool, as_json: bool, backend: str | None) -> None:
    """Show every fleet (or FLEET): replicas, their state, endpoint and $/h, from the ledger.

    \b
    Examples:
      melange-sky status
      melange-sky status llama2-chat --refresh --json
    """
    from .backends import load_backend
    from .fleet import Fleet
    from .ledger import Ledger
    from .report import format_status

    with Ledger() as ledger, _launcher_output():
        report = Fleet(load_backend(backend) if refresh else None, ledger).status_report(fleet_name, refresh)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_status(report))


@main.command()
@click.argument("fleet_name", metavar="[FLEET]", required=False)
@click.option("--all", "all_fleets", is_flag=True, help="Tear down every fleet in the ledger.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--purge", is_flag=True, help="Forget clusters SkyPilot cannot tear down cleanly (may leave cloud "
                                            "resources behind: check your cloud console).")
@click.option("--parallel", type=click.IntRange(min=1), default=DEFAULT_PARALLEL, show_default=True,
              help="Teardowns in flight at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON on stdout.")
@_backend_option
@debug_option
def down(fleet_name: str | None, all_fleets: bool, yes: bool, purge: bool, parallel: int, as_json: bool,
         backend: str | None) -> None:
    """Tear down FLEET (or --all): every replica's cluster, concurrently.

    A cluster the launcher no longer knows counts as gone. The fleet leaves the ledger only when all its
    clusters are gone; failures are kept and retried by the next `down`. A fleet that is not in the ledger
    (already down) is a no-op.

    \b
    Examples:
      melange-sky down llama2-chat
      melange-sky down --all -y
    """
    from .backends import load_backend
    from .fleet import Fleet
    from .ledger import Ledger
    from .report import format_down, format_event

    if all_fleets == bool(fleet_name):
        raise click.UsageError("name one FLEET or pass --all")
    with Ledger() as ledger:
        names = [f.name for f in ledger.fleets()] if all_fleets else [fleet_name]
        known = [n for n in names if ledger.get_fleet(n) is not None]
        if known:
            _confirm(f"Tear down {', '.join(known)}? Their clusters and disks are deleted.", yes)
        fleet = Fleet(load_backend(backend) if known else None, ledger, on_event=None if as_json else
                      (lambda event: click.echo(format_event(event), err=True)))
        with _launcher_output():
            reports = [fleet.down(name, purge=purge, parallel=parallel) for name in names]
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2) if as_json
                   else "\n".join(format_down(r) for r in reports) or "No fleets in the ledger: nothing to tear down.")
    if any(r.failed for r in reports):
        sys.exit(1)
    if any(r.busy for r in reports):
        sys.exit(3)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
