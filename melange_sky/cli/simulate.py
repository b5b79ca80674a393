"""`simulate`: a plan checked against traffic before it is paid for (plan x trace x router policy x engine model)."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

import click

from melange_sky.core.slo import DEFAULT_TPOT_SLO_MS
from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.options import per_offer_option
from melange_sky.core.attainment import DEFAULT_TARGET, AttainmentReport, Group, Percentiles, per_request_text
from melange_sky.core.config import load_config, with_overrides
from melange_sky.core.slo import Slos, percentile
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.deploy.plan import DEFAULT_MAX_REPLICAS, PlanSettings, deployment_from_config
from melange_sky.inputs.trace_formats import ColumnChoice, TimeUnit
from melange_sky.inputs.trace_rates import parse_rate_percentile
from melange_sky.sim import (Arrivals, HeadroomAdvice, HeadroomTrial, SimResult, find_headroom, parse_burst,
                             plan_from_config, plan_from_fleet, poisson_arrivals, simulate, trace_arrivals)
from melange_sky.sim.plot import check_plotting, plot_result
from melange_sky.solver.model import SolverOptions



def per_request_slo_options(command):
    """simulate's and replay's SLO flags (each request's own TPOT, TTFT and latency against its limit, profile's
    percentiles shown beside) and --target: one definition, so the two reports answer the same question."""
    for option in reversed(_PER_REQUEST_SLO_OPTIONS):
        command = option(command)
    return command


_PER_REQUEST_SLO_OPTIONS = [
    click.option("--tpot-slo-ms", type=click.FloatRange(min=0, min_open=True),
                 help=f"SLO on each request's own TPOT ((latency - TTFT) / (output - 1)), ms [default: "
                      f"{DEFAULT_TPOT_SLO_MS:g} when no SLO is given]."),
    click.option("--ttft-slo-ms", type=click.FloatRange(min=0, min_open=True),
                 help="SLO on each request's time to first token, ms."),
    click.option("--ttft-percentile", type=click.FloatRange(0, 100, min_open=True, max_open=True), default=90.0,
                 show_default=True, help="The TTFT percentile shown beside the attainment as profile reads the SLO."),
    click.option("--latency-slo-ms", type=click.FloatRange(min=0, min_open=True),
                 help="SLO on each request's end-to-end latency, ms."),
    click.option("--latency-percentile", type=click.FloatRange(0, 100, min_open=True, max_open=True), default=90.0,
                 show_default=True, help="The latency percentile shown beside the attainment as profile reads it."),
    click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_TARGET, show_default=True,
                 help="The share of requests that must meet every SLO for the verdict to pass."),
]
#: Replicas listed one per line in the report; a larger fleet is summarised per GPU type.
_REPLICAS_LISTED = 24


@main.command("simulate")
@click.argument("plan_source", metavar="CONFIG|FLEET")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="Offer this trace's requests at their timestamps with their sizes (JSONL or CSV, every format "
                   "`workload` reads).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Poisson arrivals at R req/s with sizes "
              "drawn from the plan's histogram (uniform within each bucket's edges); with --trace: the trace's sizes "
              "at this rate instead of its timestamps.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Seconds of arrivals [default: 600 "
              "with --rate; with --trace: the whole trace, or its first S seconds].")
@click.option("--burst", metavar="FACTOR[,ON_S[,PERIOD_S]]", help="With --rate: bursts of FACTOR x the rate for "
              "ON_S seconds (default 60) of every PERIOD_S (default 300), and the rate that keeps the mean between "
              "them; e.g. --burst 2.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the arrivals and the router's "
              "tie-breaks: the same seed gives the same run.")
@click.option("--model", help="The engine model (a bundled name or a config.json) [default: the config's "
              "deployment.model, or the fleet's].")
@click.option("--speed", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Model every GPU X times faster (step times divided by X), as `emulate --speed X`: to compare "
                   "with a fleet of emulators run fast.")
@per_request_slo_options
@click.option("--find-headroom", "find_headroom_", is_flag=True, help="Search the least headroom (highest planned "
              "utilisation) whose plan meets --target on these arrivals, beside the unpadded plan (CONFIG only).")
@click.option("--formulation", type=click.Choice(["auto", "slices", "paper", "split"]), default="auto",
              show_default=True, help="The solve's formulation (as `solve`: auto is slices, or split under a `spot` "
                                      "block).")
@click.option("--solver", "solver_name", type=click.Choice(["highs", "cbc"]), default="highs", show_default=True,
              help="MILP solver (as `solve`).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds the solver may search (as `solve`).")
@click.option("--headroom", type=float, help="Plan at this highest utilisation, in (0, 1] (overrides the config's).")
@click.option("--plan-rate", type=click.FloatRange(min=0, min_open=True), help="Plan for this total request rate "
              "(overrides total_request_rate, as `solve --rate`).")
@click.option("--rate-percentile", metavar="P", help="With --trace: plan for this percentile of the trace's "
              "per-minute arrival rate (95, p99, max), as `workload --rate-percentile` writes it.")
@per_offer_option
@click.option("--max-replicas", type=click.IntRange(min=1), default=DEFAULT_MAX_REPLICAS, show_default=True,
              help="Most replicas a plan may have.")
@click.option("--input-column", metavar="NAME", help="With --trace: the column holding prompt tokens.")
@click.option("--output-column", metavar="NAME", help="With --trace: the column holding completion tokens.")
@click.option("--time-column", metavar="NAME", help="With --trace: the column holding arrival times.")
@click.option("--time-unit", type=click.Choice([u.value for u in TimeUnit]), default="auto", show_default=True,
              help="With --trace: the unit of numeric times (as `workload`).")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "csv"]), default="auto", show_default=True,
              help="With --trace: its format (as `workload`).")
@click.option("--skip-bad", is_flag=True, help="With --trace: skip broken rows and count them.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (keys attainment, requests, ttft_ms, "
              "tpot_ms, latency_ms, per_gpu, per_bucket, per_minute, per_replica, ...).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.png",
              help="Draw the per-minute rate and attainment and each GPU type's latency distribution (needs "
                   "matplotlib: pip install 'melange-sky[plot]').")
@debug_option
def simulate_command(plan_source: str, trace: str | None, rate: float | None, duration: float | None,
                     burst: str | None, seed: int, model: str | None, speed: float, tpot_slo_ms: float | None,
                     ttft_slo_ms: float | None, ttft_percentile: float, latency_slo_ms: float | None,
                     latency_percentile: float, target: float, find_headroom_: bool, formulation: str,
                     solver_name: str, time_limit: float, headroom: float | None, plan_rate: float | None,
                     rate_percentile: str | None, per_offer: bool, max_replicas: int, input_column: str | None,
                     output_column: str | None, time_column: str | None, time_unit: str, fmt: str, skip_bad: bool,
                     as_json: bool, plot: str | None) -> None:
    """Simulate a plan on a trace (or Poisson traffic): SLO attainment before paying for the fleet.

    CONFIG is solved as `solve` solves it (formulation, headroom, rate); FLEET, a running fleet's name, uses its
    stored plan and the replicas the ledger has up. Each replica is the engine model of its GPU type (calibrated
    fits used where saved) running the config's model and engine settings, and requests are routed by the policy
    `serve` runs (bucket, smooth weighted round-robin over the plan's shares, least in flight, spill). A request
    meets the SLOs when its own TTFT, TPOT and latency hold; attainment is the share that do, overall, per GPU
    type, per bucket and per minute, with a verdict against --target.

    \b
    Examples:
      melange-sky simulate config.json --trace requests.jsonl
      melange-sky simulate config.json --rate 30 --duration 3600 --burst 2 --ttft-slo-ms 2000
      melange-sky simulate config.json --trace requests.jsonl --find-headroom
      melange-sky simulate llama2-chat --trace today.jsonl --json
    """
    if not trace and rate is None:
        raise click.UsageError("give --trace FILE or --rate R (or both: the trace's sizes at R req/s)")
    if burst and (trace or rate is None):
        raise click.UsageError("--burst shapes Poisson arrivals: give it with --rate and without --trace")
    if rate_percentile and not trace:
        raise click.UsageError("--rate-percentile reads the trace's per-minute rate: give --trace")
    if rate_percentile and plan_rate is not None:
        raise click.UsageError("give --plan-rate or --rate-percentile, not both")
    if plot:
        check_plotting()
    if tpot_slo_ms is None and ttft_slo_ms is None and latency_slo_ms is None:
        tpot_slo_ms = DEFAULT_TPOT_SLO_MS
    slos = Slos(tpot_ms=tpot_slo_ms, ttft_ms=ttft_slo_ms, ttft_percentile=ttft_percentile,
                latency_ms=latency_slo_ms, latency_percentile=latency_percentile)
    is_config = os.path.exists(plan_source)
    if not is_config and (find_headroom_ or headroom is not None or plan_rate is not None or rate_percentile
                          or per_offer):
        raise click.UsageError(f"{plan_source!r} is not a file: a running fleet's plan is simulated as it stands "
                               f"(--find-headroom, --headroom, --plan-rate, --rate-percentile and --per-offer "
                               f"re-plan a CONFIG)")
    if find_headroom_ and headroom is not None:
        raise click.UsageError("--find-headroom tries headrooms from 1 down to 0.5 itself: drop --headroom (or "
                               "drop --find-headroom to simulate the plan at --headroom H)")
    arrivals: Arrivals | None = None
    if trace:
        columns = ColumnChoice(input_column, output_column, time_column, TimeUnit(time_unit))
        arrivals = trace_arrivals(trace, columns=columns, fmt=None if fmt == "auto" else fmt, skip_bad=skip_bad,
                                  rate=rate, duration_s=duration, seed=seed)
    settings = PlanSettings(formulation=formulation, solver=SolverOptions(name=solver_name, time_limit=time_limit),
                            compare=False, max_replicas=max_replicas, per_offer=per_offer)
    config = None
    if is_config:
        config = load_config(plan_source, price=catalog_pricer())
        deployment_from_config(config)
        warn(config.warnings)
        planned_rate = plan_rate
        if rate_percentile:
            assert arrivals is not None
            p = parse_rate_percentile(rate_percentile)
            if arrivals.minute_rates is None or not arrivals.minute_rates.minutes:
                raise click.UsageError("--rate-percentile needs a trace with at least one complete minute")
            planned_rate = arrivals.minute_rates.percentile(p)
        config = with_overrides(config, rate=planned_rate, headroom=headroom)
        plan = plan_from_config(config, settings, model, speed)
    else:
        plan = plan_from_fleet(plan_source, model=model, speed=speed)
    if arrivals is None:
        assert rate is not None
        routes = plan.routes
        arrivals = poisson_arrivals(rate, duration or 600.0, routes.distribution, routes.input_edges,
                                    routes.output_edges, seed=seed, burst=parse_burst(burst) if burst else None)
    progress = _Progress(len(arrivals), arrivals.duration_s)
    if find_headroom_:
        assert config is not None
        def show(trial: HeadroomTrial) -> None:  # progress on a terminal: the table below has every trial
            if progress.enabled:
                click.echo(f"  headroom {trial.headroom:.3g}: {trial.plan.describe()}: {_pct(trial.attainment)} "
                           f"met every SLO", err=True)

        if progress.enabled:
            click.echo(f"Searching the headroom on {arrivals.description} ...", err=True)
        advice = find_headroom(config, arrivals, slos, settings, target=target, model=model, seed=seed, speed=speed,
                               on_trial=show)
        if as_json:
            chosen = advice.chosen or advice.unpadded
            click.echo(json.dumps({**chosen.result.to_json(), "headroom_search": advice.to_json()}, indent=2))
        else:
            click.echo(format_headroom(advice, config.source, per_offer))
        if plot:
            plot_result((advice.chosen or advice.unpadded).result, plot)
            click.echo(f"Wrote {plot}", err=True)
        return
    result = simulate(plan, arrivals, slos, target=target, seed=seed, progress=progress)
    progress.done()
    warn(list(result.notes))
    if plot:
        plot_result(result, plot)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else format_simulation(result))
    if plot:
        click.echo(f"Wrote {plot}", err=True)


class _Progress:
    """Progress on a terminal's stderr for long runs: a line every few seconds once a run has taken more than two
    (nothing when stderr is a file or a pipe: logs and captured output stay the report alone)."""

    def __init__(self, total: int, duration_s: float):
        self.total = total
        self.duration_s = duration_s
        self.started = time.monotonic()
        self.last = self.started
        self.shown = False
        self.enabled = sys.stderr.isatty()

    def __call__(self, routed: int, total: int, simulated_s: float) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 2.0:
            return
        self.last = now
        self.shown = True
        click.echo(f"simulate: {routed:,} of {total:,} requests routed, {simulated_s:,.0f} of "
                   f"{self.duration_s:,.0f} s simulated ({now - self.started:.0f} s)", err=True)
        sys.stderr.flush()

    def done(self) -> None:
        if self.shown:
            click.echo(f"simulate: done in {time.monotonic() - self.started:.1f} s", err=True)


# ---- the report ------------------------------------------------------------------------------------------------------
def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.2f}%"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _trio(p: Percentiles) -> str:
    return f"{_ms(p.p50)} / {_ms(p.p90)} / {_ms(p.p99)}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> list[str]:
    """Aligned columns: the first left-aligned, the others right-aligned (numbers)."""
    widths = [max([len(h)] + [len(str(row[k])) for row in rows]) for k, h in enumerate(headers)]
    fmt = indent + "  ".join(f"{{:{'<' if k == 0 else '>'}{w}}}" for k, w in enumerate(widths))
    return [fmt.format(*headers).rstrip()] + [fmt.format(*map(str, row)).rstrip() for row in rows]


def _group_row(name: str, group: Group, *shares: float | None) -> list[object]:
    row: list[object] = [name, f"{group.requests:,}", *(_pct(s) for s in shares)]
    return row + [_pct(group.attainment), _trio(group.ttft_ms), _trio(group.tpot_ms), _trio(group.latency_ms)]


def _slo_lines(report: AttainmentReport) -> list[str]:
    lines = [f"SLOs, per request: {per_request_text(report.slos) or 'none'} (target: {_pct(report.target)} of "
             f"requests meet every one)"]
    if report.slo_statistics:
        read = ", ".join(f"{name} {_ms(value)} ms" for name, value in report.slo_statistics.items())
        lines.append(f"As `profile` reads them (a statistic of all requests): {read}")
    return lines


def format_report(report: AttainmentReport, planned: dict[str, float] | None = None) -> list[str]:
    """The attainment report's lines: overall, misses, per GPU type (with `planned`, each type's share by the routing
    table beside the share it served), per bucket, per minute (shared with replay's shape: the same groups in the
    same order)."""
    n = report.requests
    missed = report.missed
    lines = _slo_lines(report) + [
        "",
        f"Attainment: {_pct(report.attainment)} of {n:,} requests met every SLO",
        f"Missed: TTFT {missed['ttft']:,}, TPOT {missed['tpot']:,}, latency {missed['latency']:,}, unanswered "
        f"{missed['unanswered']:,}" + (f" ({report.refused:,} refused by the router)" if report.refused else ""),
        "",
        *_table(["ms", "p50", "p90", "p99"],
                [[name, _ms(p.p50), _ms(p.p90), _ms(p.p99)] for name, p in
                 (("TTFT", report.overall.ttft_ms), ("TPOT", report.overall.tpot_ms),
                  ("latency", report.overall.latency_ms))]),
        "",
        "Per GPU type (ms: p50 / p90 / p99):",
    ]
    answered = sum(g.requests for g in report.per_gpu.values()) or 1
    if planned is None:
        lines += _table(["GPU", "requests", "share", "attainment", "TTFT", "TPOT", "latency"],
                        [_group_row(gpu, g, g.requests / answered) for gpu, g in report.per_gpu.items()])
    else:
        lines += _table(["GPU", "requests", "share", "plan", "attainment", "TTFT", "TPOT", "latency"],
                        [_group_row(gpu, g, g.requests / answered, planned.get(gpu, 0.0))
                         for gpu, g in report.per_gpu.items()])
    lines += ["", "Per bucket (input x output tokens; ms: p50 / p90 / p99):"]
    lines += _table(["bucket", "requests", "attainment", "TTFT", "TPOT", "latency"],
                    [_group_row(_bucket_label(report, b), g) for b, g in report.per_bucket.items()])
    minutes = [m for m in report.per_minute if m.requests]
    summary = report.minute_summary()
    lines += ["", f"Per minute ({len(report.per_minute)} minute(s)): rate " + _rate_range(report)
              + f"; attainment worst {_pct(summary['worst'])}, median {_pct(summary['median'])}, "
              f"{_pct(summary['at_target'])} of minutes at the target"]
    worst = sorted(minutes, key=lambda m: (m.attainment if m.attainment is not None else 1.0, m.index))[:3]
    if worst and (worst[0].attainment or 0) < report.target:
        lines.append("  worst: " + "; ".join(f"minute {m.index}: {m.rate:.3g} req/s, {_pct(m.attainment)}"
                                             for m in worst if (m.attainment or 0) < report.target))
    return lines


def _bucket_label(report: AttainmentReport, bucket: tuple[int, int]) -> str:
    name = report.bucket_names.get(bucket)
    if not name:
        return f"{bucket[0]}:{bucket[1]}"
    # "input 1-256, output 1-128 tokens" -> "1-256 x 1-128"
    parts = name.replace("input ", "").replace("output ", "").replace(" tokens", "").split(", ")
    return " x ".join(parts)


def _rate_range(report: AttainmentReport) -> str:
    rates = sorted(m.rate for m in report.per_minute)
    if not rates:
        return "-"
    return f"{rates[0]:.3g} to {rates[-1]:.3g} req/s (median {percentile(rates, 0.5):.3g})"


def format_simulation(result: SimResult) -> str:
    """The `simulate` report: what ran, the attainment report, the replicas, the verdict."""
    plan, report = result.plan, result.report
    rate = result.plan.result.total_request_rate if result.plan.result is not None else None
    planned = ([f"planned for {rate:g} req/s"] if rate is not None else []) + (
        [f"headroom {100 * plan.headroom:g}%"] if plan.headroom is not None else [])
    head = f"Simulated {plan.describe()}" + (f" ({', '.join(planned)})" if planned else "")
    offered = result.arrivals
    lines = [head, f"  from {plan.source}; traffic: {offered.description}; "
             f"{offered.mean_rate:.3g} req/s on average"]
    for gpu, engine in plan.engines.items():
        lines.append(f"  {gpu}: {engine.description}" + (f" (speed x{engine.speed:g})" if engine.speed != 1 else ""))
    lines.append("")
    lines += format_report(report, result.planned_share_per_gpu)
    lines += ["", "Per replica (busy: share of the run; batch, KV cache and queue: step-time-weighted means):"]
    rows = []
    stats = result.replicas
    if len(stats) > _REPLICAS_LISTED:
        lines[-1] = lines[-1][:-2] + "; min / mean / max over each GPU type's replicas):"
        for gpu in plan.engines:
            mine = [s for s in stats if s.gpu == gpu]
            if not mine:
                continue

            def spread(values: list[float], fmt: str) -> str:
                return " / ".join(format(v, fmt) for v in (min(values), sum(values) / len(values), max(values)))

            rows.append([f"{gpu} x{len(mine)}", spread([s.requests for s in mine], ",.0f"),
                         spread([100 * s.busy_share for s in mine], ".0f"), spread([s.mean_batch for s in mine], ".1f"),
                         spread([100 * s.kv_cache_mean for s in mine], ".0f"),
                         spread([s.mean_queue for s in mine], ".1f"), f"{sum(s.preemptions for s in mine):,}"])
        lines += _table(["replicas", "requests", "busy %", "batch", "KV %", "queue", "preempted"], rows)
    else:
        for s in stats:
            rows.append([s.name, f"{s.requests:,}", f"{100 * s.busy_share:.0f}%", f"{s.mean_batch:.1f}",
                         f"{100 * s.kv_cache_mean:.0f}% / {100 * s.kv_cache_peak:.0f}%",
                         f"{s.mean_queue:.1f} / {s.max_queue}", f"{s.preemptions:,}"])
        lines += _table(["replica", "requests", "busy", "batch", "KV mean / peak", "queue mean / max",
                         "preempted"], rows)
    lines += ["", f"Verdict: {report.verdict}.",
              f"Simulated {result.end_s:,.0f} s of traffic in {result.wall_s:.1f} s ({result.steps:,} engine steps)."]
    return "\n".join(lines)


def format_headroom(advice: HeadroomAdvice, source: str, per_offer: bool = False) -> str:
    """The headroom search: every headroom tried, then the least padding that meets the target beside the
    unpadded plan (and the `solve` command that plans with it)."""
    target = _pct(advice.target)
    rows = [[f"{t.headroom:.3g}", t.plan.describe(), _pct(t.attainment), "yes" if t.meets else "no"]
            for t in sorted(advice.trials, key=lambda t: -t.headroom)]
    lines = [f"Headroom search for {source} (target {target} of requests meeting every SLO):", ""]
    lines += _table(["headroom", "plan", "attainment", "meets"], rows)
    lines.append("")
    unpadded = advice.unpadded
    lines.append(f"Unpadded (headroom 1): {unpadded.plan.describe()}: {_pct(unpadded.attainment)}")
    if advice.chosen is None:
        lines.append(f"No headroom down to {advice.lowest:g} meets {target}: the plan's tputs are too optimistic "
                     f"for this traffic or an SLO cannot be met at any load; check the per-bucket report of "
                     f"`melange-sky simulate {source}`")
    elif advice.chosen is unpadded:
        lines.append(f"The unpadded plan meets {target}: no headroom needed.")
    else:
        chosen = advice.chosen
        lines.append(f"Least headroom that meets {target}: {chosen.headroom:.3g}: {chosen.plan.describe()}: "
                     f"{_pct(chosen.attainment)} (+${advice.extra_cost or 0:.2f}/h)")
        lines.append(f"Plan with it: melange-sky solve {source}{' --per-offer' if per_offer else ''} --headroom "
                     f"{chosen.headroom:.3g} (or set "
                     f"\"headroom\": {chosen.headroom:.3g} in the config)")
    return "\n".join(lines)
