"""`workload` and `profile`: the config's inputs from a trace and from a running server."""
from __future__ import annotations

import json

import click

from melange_sky._io import write_config_json
from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.options import bucket_edge_options
from melange_sky.cli.text import format_profile, format_profile_event, format_workload
from melange_sky.core.buckets import parse_edges
from melange_sky.core.config_doc import edges_for_config, read_config_object
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.errors import ProfileError, TraceError
from melange_sky.inputs.profile import parse_cells, profile_endpoint
from melange_sky.inputs.profile_result import (BucketStatus, Estimate, ProfileEvent, ProfileSettings, ProfileSize,
                                               config_edges, merge_profile)
from melange_sky.inputs.trace import fetch_observed, merge_workload, observed_workload, read_trace


@main.command()
@click.argument("trace", type=click.Path(path_type=str), required=False)
@click.option("--from", "router_url", metavar="URL", help="Instead of a TRACE: the workload a `melange-sky serve` "
              "router observed (its GET /workload: requests per bucket by reported usage over its window, and the "
              "arrival rate), e.g. http://127.0.0.1:8080.")
@click.option("--api-key", envvar="MELANGE_SKY_API_KEY", metavar="KEY", help="With --from: the router's key "
              "[env MELANGE_SKY_API_KEY]; never written to a file.")
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
def workload(trace: str | None, router_url: str | None, api_key: str | None, input_buckets: str | None,
             output_buckets: str | None, rate: str, skip_bad: bool, fmt: str, into: str | None, output: str | None,
             as_json: bool) -> None:
    """Turn a request trace (JSONL or CSV), or what a router observed (--from URL), into a workload histogram.

    Each row needs prompt and completion token counts: input_len/output_len, prompt_tokens/completion_tokens,
    input_tokens/output_tokens, or an OpenAI-style "usage" object; an optional "timestamp" (epoch seconds, or
    milliseconds/microseconds, recognised by size; or ISO-8601) gives the request rate. The file is streamed:
    memory does not grow with its length. With --from URL, the counts and the arrival rate come from a
    `melange-sky serve` router (GET URL/workload), bucketed with the edges it routes by.

    \b
    Examples:
      melange-sky workload requests.jsonl
      melange-sky workload requests.csv --rate 30 -o workload.json
      melange-sky workload requests.jsonl.gz --into config.json --skip-bad
      melange-sky workload requests.jsonl --input-buckets 1,100,1000,8000 --output-buckets 1,100,2000 --json
      melange-sky workload --from http://127.0.0.1:8080 --into config.json
    """
    if bool(trace) == bool(router_url):
        raise click.UsageError("give a TRACE file, or --from URL (a `melange-sky serve` router)")
    if router_url and (input_buckets or output_buckets or skip_bad or fmt != "auto"):
        raise click.UsageError("--from counts with the router's own bucket edges: --input-buckets, "
                               "--output-buckets, --skip-bad and --format apply to a TRACE")
    given_rate: float | None = None
    if rate.strip().lower() != "auto":
        try:
            given_rate = float(rate)
        except ValueError:
            raise TraceError(f"--rate must be auto or a number of requests per second, got {rate!r}") from None
    config = read_config_object(into) if into else None
    if router_url:
        source, observed = fetch_observed(router_url, api_key)
        result = observed_workload(observed, source, given_rate)
    else:
        assert trace is not None
        in_edges, out_edges = edges_for_config(
            config, parse_edges(input_buckets, "--input-buckets") if input_buckets else None,
            parse_edges(output_buckets, "--output-buckets") if output_buckets else None, into or "<config>")
        result = read_trace(trace, input_edges=in_edges, output_edges=out_edges, rate=given_rate,
                            skip_bad=skip_bad, fmt=None if fmt == "auto" else fmt)
    warn(result.warnings)
    written = None
    if config is not None and into:
        merged = merge_workload(config, result, source=into, in_place=not output, price=catalog_pricer())
        warn(merged.warnings)
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
@click.option("--size", type=click.Choice([s.value for s in ProfileSize]), default="mid", show_default=True,
              help="Length each bucket is profiled at: its midpoint, or its largest length (conservative).")
@click.option("--estimate", type=click.Choice([e.value for e in Estimate]), default="fit", show_default=True,
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
    if bool(into) != bool(gpu):
        raise ProfileError("--into CONFIG and --gpu NAME go together: which GPU type's tputs to set in which config")
    settings = ProfileSettings(
        tpot_slo_ms=tpot_slo_ms, requests_per_step=requests_per_step, start_rate=start_rate, max_rate=max_rate,
        min_rate=min(min_rate, start_rate), bisect_steps=bisect_steps, request_timeout=request_timeout,
        size=ProfileSize(size), estimate=Estimate(estimate), ignore_eos=not no_ignore_eos, api_key=api_key)
    given_in = parse_edges(input_buckets, "--input-buckets") if input_buckets else None
    given_out = parse_edges(output_buckets, "--output-buckets") if output_buckets else None
    config = read_config_object(into) if into else None
    if config is not None and into:
        in_edges, out_edges = config_edges(config, given_in, given_out, into)
    else:
        in_edges, out_edges = edges_for_config(None, given_in, given_out)
    chosen = parse_cells(cells, (len(in_edges) - 1, len(out_edges) - 1))

    def show(event: ProfileEvent) -> None:
        line = format_profile_event(event)
        if line and not quiet:
            click.echo(line, err=True)

    result = profile_endpoint(endpoint, model, input_edges=in_edges, output_edges=out_edges, cells=chosen,
                              settings=settings, on_progress=show)
    failed = [b for b in result.buckets if b.status in (BucketStatus.FAILED, BucketStatus.SLO_NOT_MET)]
    warn([f"bucket {b.cell[0]}:{b.cell[1]} {b.status}: {b.message} "
           f"({'kept from the config' if into and b.status == BucketStatus.FAILED else '0 in tputs'})" for b in failed])
    warn(result.warnings)
    if output:
        write_config_json(output, result.to_dict())
        click.echo(f"Wrote {output}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_profile(result))
    result.check_usable(into)  # only zeros: exit non-zero, and never overwrite a GPU's tputs with them
    if config is not None and into and gpu:
        merged = merge_profile(config, result, gpu, cost, source=into, price=catalog_pricer())
        warn(merged.warnings)
        write_config_json(into, merged.data)
        click.echo(f"Wrote {gpu}'s tputs into {into}", err=True)
