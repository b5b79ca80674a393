"""`profile`: each bucket's max throughput under the SLO, measured on a running OpenAI-compatible server."""
from __future__ import annotations

import json

import click

from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.options import bucket_edge_options
from melange_sky.cli.text import format_profile, format_profile_event
from melange_sky.core.buckets import parse_edges
from melange_sky.core.config_doc import edges_for_config, read_config_object, write_config
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.errors import ProfileError
from melange_sky.inputs.profile import parse_cells, profile_endpoint
from melange_sky.inputs.profile_result import (BucketStatus, Estimate, ProfileEvent, ProfileSettings, ProfileSize,
                                               config_edges, merge_profile)


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
        warn(write_config(output, result.to_dict()))
        click.echo(f"Wrote {output}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_profile(result))
    result.check_usable(into)  # only zeros: exit non-zero, and never overwrite a GPU's tputs with them
    if config is not None and into and gpu:
        merged = merge_profile(config, result, gpu, cost, source=into, price=catalog_pricer())
        warn(merged.warnings)
        warn(write_config(into, merged.data))
        click.echo(f"Wrote {gpu}'s tputs into {into}", err=True)
