"""`replay`: a trace sent to a live endpoint at its timestamps, and what was measured in `simulate`'s report shape."""
from __future__ import annotations

import json
import sys
import time

import click

from melange_sky.cli.main import INTERRUPTED, debug_option, main, warn
from melange_sky.cli.options import bucket_edge_options
from melange_sky.cli.simulate import DEFAULT_TPOT_SLO_MS, format_report, per_request_slo_options
from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, parse_edges
from melange_sky.core.config import load_config
from melange_sky.core.slo import Slos
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.inputs.arrivals import trace_arrivals
from melange_sky.inputs.replay import PromptKind, ReplayProgress, ReplayResult, ReplaySettings, replay
from melange_sky.inputs.trace_formats import ColumnChoice, TimeUnit
from melange_sky.serve.routes import bucket_edges


@main.command("replay")
@click.argument("trace", type=click.Path(dir_okay=False, path_type=str))
@click.option("--endpoint", required=True, metavar="URL", help="Base URL of the OpenAI-compatible endpoint (a "
              "melange-sky router, vLLM, ...), e.g. http://127.0.0.1:8080.")
@click.option("--api-key", envvar="MELANGE_SKY_API_KEY", help="Bearer token for the endpoint "
              "[env MELANGE_SKY_API_KEY]; never written anywhere.")
@click.option("--model", help="Model name to ask for [default: the first the endpoint lists at /v1/models].")
@click.option("--speedup", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Send X times faster: arrival times divided by X (the report is in the wall-clock time it ran).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Only the trace's first S seconds "
              "of arrivals (as `simulate --duration`); each sent request is waited for.")
@click.option("--max-requests", type=click.IntRange(min=1), help="Only the trace's first N requests.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="The trace's sizes, as Poisson arrivals "
              "at R req/s instead of its timestamps (as `simulate --trace FILE --rate R`).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompts' words (and of --rate's "
              "arrivals).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=str), metavar="CONFIG",
              help="Bucket each request with this config's edges (the plan's buckets, as `simulate` does).")
@bucket_edge_options(None)
@click.option("--gpu", help="The GPU type to report a plain server's requests under (a melange-sky router names "
              "each request's own in its X-Melange-Gpu header).")
@click.option("--prompt", "prompt_kind", type=click.Choice([k.value for k in PromptKind]), default="words",
              show_default=True, help="Send each prompt as N random one-token words (any server; a router "
                                      "estimates their count) or N token ids (counted exactly by a router).")
@click.option("--no-ignore-eos", is_flag=True, help="Do not send \"ignore_eos\": true (for servers that reject it).")
@click.option("--timeout", "request_timeout", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True, help="Seconds one request may take in all; longer counts as unanswered.")
@click.option("--cacert", type=click.Path(exists=True, dir_okay=False, path_type=str), metavar="PEM",
              help="Trust only this certificate (or CA) for an https endpoint (a router's own).")
@per_request_slo_options
@click.option("--input-column", metavar="NAME", help="The trace's column holding prompt tokens.")
@click.option("--output-column", metavar="NAME", help="The trace's column holding completion tokens.")
@click.option("--time-column", metavar="NAME", help="The trace's column holding arrival times.")
@click.option("--time-unit", type=click.Choice([u.value for u in TimeUnit]), default="auto", show_default=True,
              help="The unit of the trace's numeric times (as `workload`).")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "csv"]), default="auto", show_default=True,
              help="The trace's format (as `workload`).")
@click.option("--skip-bad", is_flag=True, help="Skip the trace's broken rows and count them.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (simulate's keys: attainment, "
              "requests, ttft_ms, tpot_ms, latency_ms, per_gpu, per_bucket, per_minute, ...; and replay).")
@debug_option
def replay_command(trace: str, endpoint: str, api_key: str | None, model: str | None, speedup: float,
                   duration: float | None, max_requests: int | None, rate: float | None, seed: int,
                   config_path: str | None, input_buckets: str | None, output_buckets: str | None, gpu: str | None,
                   prompt_kind: str, no_ignore_eos: bool, request_timeout: float, cacert: str | None,
                   tpot_slo_ms: float | None, ttft_slo_ms: float | None, ttft_percentile: float,
                   latency_slo_ms: float | None, latency_percentile: float, target: float,
                   input_column: str | None, output_column: str | None, time_column: str | None, time_unit: str,
                   fmt: str, skip_bad: bool, as_json: bool) -> None:
    """Replay a trace against a live endpoint and report SLO attainment as `simulate` does.

    Open loop: each request goes out at its timestamp (divided by --speedup) whatever the server is doing, with its
    sizes: a prompt of its prompt tokens, max_tokens its output tokens with ignore_eos, streamed through
    /v1/completions. What was measured (TTFT, TPOT, latency per request; attainment overall, per GPU type as a
    melange-sky router names it, per bucket and per minute; the verdict) prints in `simulate`'s shape, so a
    simulation of the plan and a replay of the fleet compare line by line. Ctrl-C stops sending, cancels the
    requests in flight and prints the report of those that finished (exit 130).

    \b
    Examples:
      melange-sky replay requests.jsonl --endpoint http://127.0.0.1:8080 --config config.json
      melange-sky replay requests.jsonl --endpoint http://127.0.0.1:8080 --max-requests 500 --ttft-slo-ms 2000
      melange-sky replay requests.jsonl --endpoint http://10.0.0.5:8000 --gpu A10G --speedup 2 --json
    """
    if config_path and (input_buckets or output_buckets):
        raise click.UsageError("give --config or --input-buckets/--output-buckets, not both")
    if config_path:
        config = load_config(config_path, price=catalog_pricer())
        warn(config.warnings)
        in_edges, out_edges = bucket_edges(config)
    else:
        in_edges = parse_edges(input_buckets, "--input-buckets") if input_buckets else DEFAULT_INPUT_EDGES
        out_edges = parse_edges(output_buckets, "--output-buckets") if output_buckets else DEFAULT_OUTPUT_EDGES
    if tpot_slo_ms is None and ttft_slo_ms is None and latency_slo_ms is None:
        tpot_slo_ms = DEFAULT_TPOT_SLO_MS
    slos = Slos(tpot_ms=tpot_slo_ms, ttft_ms=ttft_slo_ms, ttft_percentile=ttft_percentile,
                latency_ms=latency_slo_ms, latency_percentile=latency_percentile)
    settings = ReplaySettings(endpoint=endpoint, api_key=api_key, model=model, speedup=speedup,
                              max_requests=max_requests, request_timeout=request_timeout,
                              prompt=PromptKind(prompt_kind), ignore_eos=not no_ignore_eos, gpu=gpu,
                              input_edges=in_edges, output_edges=out_edges, cafile=cacert, seed=seed)
    columns = ColumnChoice(input_column, output_column, time_column, TimeUnit(time_unit))
    arrivals = trace_arrivals(trace, columns=columns, fmt=None if fmt == "auto" else fmt, skip_bad=skip_bad,
                              rate=rate, duration_s=duration, seed=seed)
    progress = _Progress()
    result = replay(arrivals, slos, settings, target=target, progress=progress)
    progress.done(result)
    warn(list(result.notes))
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else format_replay(result))
    if result.interrupted:
        click.echo("Interrupted.", err=True)
        sys.exit(INTERRUPTED)


class _Progress:
    """A line on a terminal's stderr every few seconds (nothing when stderr is a file or a pipe)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.shown = False
        self.started = time.monotonic()

    def __call__(self, p: ReplayProgress) -> None:
        if not self.enabled:
            return
        self.shown = True
        click.echo(f"replay: {p.sent:,} of {p.total:,} requests sent, {p.finished:,} finished, {p.in_flight:,} in "
                   f"flight; {p.elapsed_s:,.0f} of {p.span_s:,.0f} s", err=True)

    def done(self, result: ReplayResult) -> None:
        if self.shown:
            click.echo(f"replay: done in {result.wall_s:.1f} s", err=True)


def format_replay(result: ReplayResult) -> str:
    """The `replay` report: what was sent where, the attainment report (simulate's lines), the verdict."""
    offered = result.arrivals
    head = f"Replayed {result.sent:,} requests against {result.endpoint}" + (
        f" (model {result.model})" if result.model else "")
    due = []  # what was not sent, and why
    if result.sent < result.offered:
        due.append(f"{'interrupted' if result.interrupted else 'stopped'} after {result.sent:,} of "
                   f"{result.offered:,}")
    if result.offered < len(result.arrivals):
        due.append(f"the first {result.offered:,} of the trace's {len(result.arrivals):,}")
    if due:
        head += ": " + ", ".join(due)
    lines = [head, f"  traffic: {offered.description}; {offered.mean_rate:.3g} req/s on average"]
    lag = result.send_lag_ms
    lines.append(f"  sent {result.sent:,} in {result.wall_s:,.1f} s; sends late by p50 {lag['p50']:.1f} ms, p99 "
                 f"{lag['p99']:.1f} ms" + (f"; interrupted: {result.cancelled:,} in flight cancelled, not reported"
                                           if result.interrupted else ""))
    lines.append("")
    lines += format_report(result.report)
    lines += ["", f"Verdict: {result.report.verdict}."]
    return "\n".join(lines)
