"""`workload`: the config's workload histogram and request rate from a trace, or from what a router observed."""
from __future__ import annotations

import json

import click

from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.options import bucket_edge_options
from melange_sky.cli.text import format_matrix
from melange_sky.core.buckets import parse_edges
from melange_sky.core.config_doc import edges_for_config, read_config_object, write_config
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.errors import TraceError
from melange_sky.inputs.router_workload import fetch_observed, observed_workload
from melange_sky.inputs.trace import read_trace
from melange_sky.inputs.trace_formats import ColumnChoice, TimeUnit
from melange_sky.inputs.trace_rates import parse_rate_percentile
from melange_sky.inputs.workload import RateSource, WorkloadResult, merge_workload

#: Above this p95 / mean ratio of the per-minute rate, the report says how much planning for the mean would miss.
_BURSTY = 1.25
#: Below this many complete minutes, p95 and p99 are the busiest minute or two, and the report says so.
_FEW_MINUTES = 20


@main.command()
@click.argument("trace", type=click.Path(path_type=str), required=False)
@click.option("--from", "router_url", metavar="URL", help="Instead of a TRACE: the workload a `melange-sky serve` "
              "router observed (its GET /workload: requests per bucket by reported usage over its window, and the "
              "arrival rate: requests / the seconds since its first request, or its window once that is older; "
              "idle time before the first request is not counted): its endpoint as `up` prints it, with or without "
              "/v1, e.g. http://127.0.0.1:8080/v1. A sample shorter than the window is warned about, loudly when "
              "its rate is written (--into, -o).")
@click.option("--api-key", envvar="MELANGE_SKY_API_KEY", metavar="KEY", help="With --from: the router's key "
              "[env MELANGE_SKY_API_KEY]; never written to a file.")
@click.option("--cacert", type=click.Path(dir_okay=False, path_type=str), metavar="FILE", help="With --from "
              "https://...: the certificate the router must present (its deployment.router.tls certfile, e.g. a "
              "self-signed one); default: the system's CAs.")
@bucket_edge_options("--into")
@click.option("--rate", default="auto", show_default=True, help="Total request rate in req/s, or auto: the mean "
              "rate between the trace's first and last timestamp.")
@click.option("--rate-percentile", metavar="P", help="Write this percentile of the per-minute arrival rate into "
              "total_request_rate instead of the mean (95, p99, max): a fleet sized on the mean saturates in every "
              "burst. From the timestamps, or with --from the router's per-minute arrivals.")
@click.option("--input-column", metavar="NAME", help="The column (CSV) or key (JSONL; a.b for nested) holding "
              "prompt tokens, when it is not one of the recognised names.")
@click.option("--output-column", metavar="NAME", help="The column or key holding completion tokens.")
@click.option("--time-column", metavar="NAME", help="The column or key holding each request's arrival time.")
@click.option("--time-unit", type=click.Choice([u.value for u in TimeUnit]), default="auto", show_default=True,
              help="Unit of numeric times; auto: epoch seconds, or ms/us when too large for seconds (a recognised "
                   "format sets its own: BurstGPT s, Mooncake ms).")
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
def workload(trace: str | None, router_url: str | None, api_key: str | None, cacert: str | None,
             input_buckets: str | None,
             output_buckets: str | None, rate: str, rate_percentile: str | None, input_column: str | None,
             output_column: str | None, time_column: str | None, time_unit: str, skip_bad: bool, fmt: str,
             into: str | None, output: str | None, as_json: bool) -> None:
    """Turn a request trace (JSONL or CSV), or what a router observed (--from URL), into a workload histogram.

    Each row needs prompt and completion token counts: input_len/output_len, prompt_tokens/completion_tokens,
    input_tokens/output_tokens, an OpenAI-style "usage" object, the columns of a recognised public trace (Azure
    LLM inference 2023/2024, BurstGPT, Mooncake), or the columns named with --input-column/--output-column. An
    optional "timestamp" (epoch seconds, or milliseconds/microseconds, recognised by size; or ISO-8601) gives the
    mean request rate and the per-minute peaks (p50/p95/p99/max). The file is streamed: memory does not grow with
    its length. With --from URL, the counts and the arrival rate come from a `melange-sky serve` router
    (GET URL/workload), bucketed with the edges it routes by.

    \b
    Examples:
      melange-sky workload requests.jsonl
      melange-sky workload requests.csv --rate 30 -o workload.json
      melange-sky workload AzureLLMInferenceTrace_conv.csv --rate-percentile 95 --into config.json
      melange-sky workload requests.jsonl.gz --into config.json --skip-bad
      melange-sky workload log.csv --input-column prompt_len --output-column gen_len --time-column t --time-unit ms
      melange-sky workload requests.jsonl --input-buckets 1,100,1000,8000 --output-buckets 1,100,2000 --json
      melange-sky workload --from http://127.0.0.1:8080 --rate-percentile 95 --into config.json
    """
    if bool(trace) == bool(router_url):
        raise click.UsageError("give a TRACE file, or --from URL (a `melange-sky serve` router)")
    columns = ColumnChoice(input_column, output_column, time_column, TimeUnit(time_unit))
    if cacert and not router_url:
        raise click.UsageError("--cacert applies to --from URL")
    if router_url and (input_buckets or output_buckets or skip_bad or fmt != "auto" or columns.names_columns
                       or columns.time_unit is not TimeUnit.AUTO):
        raise click.UsageError("--from counts with the router's own bucket edges: --input-buckets, "
                               "--output-buckets, --skip-bad, --format and the --*-column/--time-unit options "
                               "apply to a TRACE")
    given_rate: float | None = None
    if rate.strip().lower() != "auto":
        try:
            given_rate = float(rate)
        except ValueError:
            raise TraceError(f"--rate must be auto or a number of requests per second, got {rate!r}") from None
    percentile = parse_rate_percentile(rate_percentile) if rate_percentile is not None else None
    if given_rate is not None and percentile is not None:
        raise click.UsageError("give --rate or --rate-percentile, not both")
    config = read_config_object(into) if into else None
    observed: dict | None = None
    if router_url:
        source, observed = fetch_observed(router_url, api_key, cafile=cacert)
        result = observed_workload(observed, source, given_rate, percentile)
    else:
        assert trace is not None
        in_edges, out_edges = edges_for_config(
            config, parse_edges(input_buckets, "--input-buckets") if input_buckets else None,
            parse_edges(output_buckets, "--output-buckets") if output_buckets else None, into or "<config>")
        result = read_trace(trace, input_edges=in_edges, output_edges=out_edges, rate=given_rate,
                            skip_bad=skip_bad, fmt=None if fmt == "auto" else fmt, columns=columns,
                            rate_percentile=percentile)
    warn(result.warnings)
    written = None
    if config is not None and into:
        merged = merge_workload(config, result, source=into, in_place=not output, price=catalog_pricer(),
                                target=output)
        warn(merged.warnings)
        written = output or into
        warn(write_config(written, merged.data))
    elif output:
        written = output
        warn(write_config(written, result.config_fragment()))
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "written": written}, indent=2))
    else:
        span = _span(observed)
        window = observed.get("window_s") if observed is not None else None
        short = span if span is not None and isinstance(window, (int, float)) and span < window else None
        click.echo(format_workload(result, short))
    if written:
        click.echo(f"Wrote {written}", err=True)
        loud = _short_sample_written(result, observed, written)
        if loud:
            warn([loud])


def _span(observed: dict | None) -> float | None:
    span = observed.get("span_s") if observed is not None else None
    return float(span) if isinstance(span, (int, float)) and not isinstance(span, bool) else None


def _short_sample_written(result: WorkloadResult, observed: dict | None, written: str) -> str | None:
    """The loud warning when a router's mean rate over less than its window went into a file someone will plan
    with: the mean of a few seconds is easy to miss among the other lines."""
    span, window = _span(observed), observed.get("window_s") if observed is not None else None
    if (observed is None or span is None or not isinstance(window, (int, float)) or span >= window
            or result.rate is None or result.rate_source != RateSource.OBSERVED or result.rate_percentile is not None):
        return None
    arrivals = observed.get("arrivals")
    counted = f"{arrivals} requests in" if isinstance(arrivals, int) else "arrivals over"
    return (f"{written} now has total_request_rate {result.rate:.4g} req/s: the router's {counted} only "
            f"{span:.{1 if span < 10 else 0}f} s of traffic ({window:.0f} s window); check it before planning on "
            f"it, or write your own with --rate")


def _ranges(edges: tuple[int, ...]) -> list[str]:
    return [f"{edges[k]}-{edges[k + 1]}" for k in range(len(edges) - 1)]


def _percentile_name(p: float) -> str:
    return "max" if p == 100 else f"p{p:g}"


def _rate_lines(result: WorkloadResult, observed_span: float | None = None) -> list[str]:
    """What total_request_rate is, the mean and the per-minute peaks, and which to plan for."""
    pct = result.rate_percentiles
    source = result.rate_source
    if source == RateSource.NONE:
        return ["Rate: unknown (no timestamps; pass --rate)"]
    if source == RateSource.GIVEN:
        first = f"Rate: {result.rate:.4g} req/s (given)"
    elif result.rate_percentile is not None:
        over = f"{pct.minutes:,} minutes" if pct is not None and pct.minutes is not None else "the minutes"
        first = (f"Rate: {result.rate:.4g} req/s (the {_percentile_name(result.rate_percentile)} of the per-minute "
                 f"rate over {over}" + (f"; mean {result.mean_rate:.4g})" if result.mean_rate else ")"))
    elif source == RateSource.OBSERVED:
        over = ("its window" if observed_span is None else
                f"the {observed_span:.{1 if observed_span < 10 else 0}f} s since its first request")
        first = f"Rate: {result.rate:.4g} req/s (arrivals the router counted over {over})"
    else:
        first = f"Rate: {result.rate:.4g} req/s (mean over {result.duration:,.0f} s of timestamps)"
    lines = [first]
    if pct is not None:
        over = f" over {pct.minutes:,} complete minute(s)" if pct.minutes is not None else ""
        lines.append(f"Per-minute rate{over}: p50 {pct.p50:.4g}, p95 {pct.p95:.4g}, p99 {pct.p99:.4g}, "
                     f"max {pct.max:.4g} req/s"
                     + (" (under 20 minutes: p95 and p99 are the busiest minutes)"
                        if pct.minutes is not None and pct.minutes < _FEW_MINUTES else ""))
        ratio = result.burst_ratio
        if result.rate_percentile is None and source != RateSource.GIVEN and ratio is not None and ratio > _BURSTY:
            lines.append(f"Bursty: the p95 minute is {ratio:.2g}x the mean, and a fleet sized on the mean "
                         f"saturates in every such burst; plan for it with --rate-percentile 95")
    elif result.mean_rate is not None and source == RateSource.TIMESTAMPS:
        lines.append("Per-minute rate: unknown (the timestamps span less than one complete minute)")
    return lines


def format_workload(result: WorkloadResult, observed_span: float | None = None) -> str:
    """The `melange-sky workload` report: what was read, the rate and its peaks, the histogram in %, and the keys
    to paste (`observed_span`: the seconds a router's rate is counted over, when shorter than its window)."""
    read = f"{result.format}, {result.columns}" if result.columns else result.format
    lines = [f"{result.rows:,} requests from {result.source} ({read})"
             + (f", {result.skipped:,} broken rows skipped" if result.skipped else "")
             + (f", {result.failed:,} failed requests skipped" if result.failed else "")]
    lines += _rate_lines(result, observed_span)
    cols = _ranges(result.output_edges)
    corner = "input \\ output"
    width = max(len(corner), *(len(r) for r in _ranges(result.input_edges)))
    cell = max(7, *(len(c) for c in cols))
    lines += ["", "Share of requests (%), rows: input tokens, columns: output tokens",
              f"  {corner:<{width}}  " + "  ".join(f"{c:>{cell}}" for c in cols)]
    for name, row in zip(_ranges(result.input_edges), result.distribution):
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{100 * x:>{cell}.2f}" for x in row))
    fragment = result.config_fragment()
    lines += ["", "Config keys (paste into a config, or use --into CONFIG):",
              format_matrix("workload_distribution", fragment["workload_distribution"]) + ","]
    if "total_request_rate" in fragment:
        lines.append(f'"total_request_rate": {fragment["total_request_rate"]},')
    lines.append(f'"input_buckets": {json.dumps(fragment["input_buckets"])},')
    lines.append(f'"output_buckets": {json.dumps(fragment["output_buckets"])}')
    return "\n".join(lines)
