"""`workload`: the config's workload histogram and request rate from a trace, or from what a router observed."""
from __future__ import annotations

import json

import click

from melange_sky._io import write_config_json
from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.options import bucket_edge_options
from melange_sky.cli.text import format_workload
from melange_sky.core.buckets import parse_edges
from melange_sky.core.config_doc import edges_for_config, read_config_object
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.errors import TraceError
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
