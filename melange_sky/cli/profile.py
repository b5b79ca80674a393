"""`profile`: each bucket's max throughput under the SLOs, measured on a running OpenAI-compatible server."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import click

from melange_sky.core.slo import DEFAULT_TPOT_SLO_MS
from melange_sky._io import write_config_json
from melange_sky.cli.fleet import launcher_output, terminations_interrupt
from melange_sky.cli.main import INTERRUPTED, debug_option, main, warn
from melange_sky.cli.options import backend_option, bucket_edge_options
from melange_sky.cli.text import format_event, format_matrix
from melange_sky.core.buckets import parse_edges
from melange_sky.core.config_doc import edges_for_config, per_gpu_tputs, read_config_object, write_config
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.errors import LaunchError, ProfileError
from melange_sky.fleet.backends import load_backend
from melange_sky.fleet.ledger import Ledger
from melange_sky.fleet.profile_launch import (DEFAULT_READY_TIMEOUT, LaunchProfileReport, LaunchProfileRequest,
                                              merge_profiles, profile_launched)
from melange_sky.fleet.reports import ReplicaEvent
from melange_sky.inputs.profile import parse_cells, profile_endpoint
from melange_sky.inputs.profile_result import (BucketStatus, Estimate, EventKind, ProfileEvent, ProfileResult,
                                               ProfileSettings, ProfileSize, config_edges, merge_profile, server_gpus,
                                               slo_label)



@main.command()
@click.option("--endpoint", metavar="URL", help="Base URL of the OpenAI-compatible server (vLLM, "
              "SGLang), e.g. http://10.0.0.5:8000. Nothing but this host and port is contacted.")
@click.option("--launch", "launch", metavar="GPU[,GPU...]", help="Instead of --endpoint: launch one replica of each "
              "GPU type through the launcher (the config's template and engine settings), profile them all at once, "
              "and tear them down (on success, failure or Ctrl-C). Prints what it cost.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=str), metavar="CONFIG",
              help="With --launch: the config whose deployment (template, engine settings), clouds and buckets to "
                   "use [default: --into's].")
@backend_option
@click.option("--calibrate", "calibrate_fits", is_flag=True, help="With --launch: refit each GPU type's engine-model "
              "coefficients on its profile (as `estimate --calibrate`), where the engine model knows the GPU; not "
              "on the local launcher (its replicas are the engine model itself) unless --force.")
@click.option("--force", is_flag=True, help="With --launch --calibrate: save each fit even from the local launcher's "
              "emulated replicas, or when it misses its profile by more than the 25% a fit may leave.")
@click.option("--ready-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_READY_TIMEOUT,
              show_default=True, help="With --launch: seconds a launched replica may take to answer its readiness "
                                      "path (deployment.readiness_path).")
@click.option("--model", required=True, help="Model name as the server knows it (see URL/v1/models); with --launch, "
                                             "the model the replicas serve (deployment.model).")
@click.option("--tpot-slo-ms", type=click.FloatRange(min=0, min_open=True),
              help=f"SLO on the mean time per output token, ms [default: {DEFAULT_TPOT_SLO_MS:g} when no other SLO "
                   f"is given].")
@click.option("--ttft-slo-ms", type=click.FloatRange(min=0, min_open=True),
              help="SLO on the time to first token at --ttft-percentile, ms (queueing shows here, not in TPOT).")
@click.option("--ttft-percentile", type=click.FloatRange(0, 100, min_open=True, max_open=True), default=90.0,
              show_default=True, help="Percentile --ttft-slo-ms holds at.")
@click.option("--latency-slo-ms", type=click.FloatRange(min=0, min_open=True),
              help="SLO on the whole request's latency at --latency-percentile, ms.")
@click.option("--latency-percentile", type=click.FloatRange(0, 100, min_open=True, max_open=True), default=90.0,
              show_default=True, help="Percentile --latency-slo-ms holds at.")
@bucket_edge_options("--config, else --into")
@click.option("--buckets", "cells", default="all", show_default=True, metavar="all|I:J,...",
              help="Which buckets to measure: all, or 0-based cells such as 0:0,0:1,2:* (a whole row); the others "
                   "are 0 in tputs (with --into they keep their previous values).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True),
              help="Time cap per bucket; a bucket that hits it keeps the best rate it had and is marked cut_short.")
@click.option("--max-step-seconds", type=click.FloatRange(min=0, min_open=True),
              help="Time cap per rate tried [default: 30 s or 15 request durations at the SLO, the larger]; a step "
                   "that hits it undecided is judged on what it has and marked cut short.")
@click.option("--requests-per-step", type=click.IntRange(min=1), default=20, show_default=True,
              help="Measured requests per rate tried, at least (a step usually measures more: see above).")
@click.option("--start-rate", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="First rate tried, req/s; it doubles while the SLOs hold, then bisects. With --launch and no "
                   "--start-rate: 0.8x the engine model's estimate (of the slowest bucket), where it knows the GPU.")
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
              help="tputs value: fit: where a line through the measured statistic of the steps around the SLO meets "
                   "it (steadier); pass: the highest rate that passed.")
@click.option("--no-ignore-eos", is_flag=True, help="Do not send \"ignore_eos\": true (for servers that reject it).")
@click.option("--api-key", envvar="MELANGE_SKY_API_KEY", help="Bearer token for the server "
                                                              "[env MELANGE_SKY_API_KEY]; never written to a file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str),
              help="Write the full profile (tputs, headroom, per-bucket steps, TTFT/TPOT/latency) as JSON; with "
                   "--launch, one file per GPU type: {gpu} in the name is replaced by it.")
@click.option("--into", type=click.Path(dir_okay=False, path_type=str), metavar="CONFIG",
              help="Set --gpu's tputs in this config (in place); gpu_info may be a dict or a list. With --launch: "
                   "every GPU type's.")
@click.option("--gpu", help="GPU type name the endpoint runs on: recorded in the profile (-o, --json), which "
              "`estimate --calibrate` checks; for --into, the entry whose tputs to set (added to gpu_info if "
              "missing).")
@click.option("--cost", type=click.FloatRange(min=0, min_open=True), help="$/h of --gpu, for --into.")
@click.option("--server-gpus", "gpus_given", type=click.IntRange(min=1), metavar="N",
              help="GPUs the endpoint's server runs on (tensor-parallel x data-parallel): tputs are per GPU, so its "
                   "rates / N go into --into [default: the --gpu entry's accelerators pin in --into (GPU:N), else "
                   "deployment.tensor_parallel_size, else 1].")
@click.option("--json", "as_json", is_flag=True, help="Print the full profile as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No estimate or progress lines on stderr.")
@debug_option
def profile(endpoint: str | None, launch: str | None, config_path: str | None, backend: str | None,
            calibrate_fits: bool, force: bool, ready_timeout: float, model: str, tpot_slo_ms: float | None,
            ttft_slo_ms: float | None, ttft_percentile: float,
            latency_slo_ms: float | None, latency_percentile: float, input_buckets: str | None,
            output_buckets: str | None, cells: str, max_minutes: float | None, max_step_seconds: float | None,
            requests_per_step: int, start_rate: float, max_rate: float, min_rate: float, bisect_steps: int,
            request_timeout: float, size: str, estimate: str, no_ignore_eos: bool, api_key: str | None,
            output: str | None, into: str | None, gpu: str | None, cost: float | None, gpus_given: int | None,
            as_json: bool, quiet: bool) -> None:
    """Measure one GPU type's tputs (max req/s per bucket within the SLOs) from a running model server.

    Per bucket it streams synthetic requests of the bucket's size with Poisson arrivals at rising rates, then
    bisects, and reports the highest rate at which every SLO given holds (--tpot-slo-ms, --ttft-slo-ms,
    --latency-slo-ms; mean TPOT 120 ms when none is given), which SLO set it, and TTFT / latency percentiles.

    \b
    Each rate is measured in steady state:
    - arrivals keep going for as long as the step needs, and the server starts
      at the load the SLO allows (rate x latency at the SLO requests in flight);
    - only requests started once in flight has settled count (Little's law:
      in flight = rate x latency);
    - a step ends when each SLO's estimate (a ~95% interval from batch means)
      decides pass or fail, so steps far from the limit are short and steps
      near it long; a step at its time cap is judged on what it has and
      marked cut short.
    Steps last a few request durations: seconds for short outputs, minutes
    for long outputs at a slow TPOT. An estimate of the total time is shown
    first, then a line per rate tried (-q silences both).

    Errors and timeouts are reported per bucket (up to 10% errors per rate are tolerated); an HTTP 4xx on the
    first request (wrong URL or model) stops at once, and a profile in which no bucket could be measured exits
    non-zero without touching --into. The report suggests a config `headroom` from the measured variability.

    \b
    Examples:
      melange-sky profile --endpoint http://10.0.0.5:8000 --model meta-llama/Llama-2-7b-chat-hf
      melange-sky profile --endpoint URL --model M --ttft-slo-ms 500 --tpot-slo-ms 50 --max-minutes 10
      melange-sky profile --endpoint URL --model M --buckets 0:*,1:* -o a10g.json
      melange-sky profile --endpoint URL --model M --into config.json --gpu A10G --cost 1.01
      melange-sky profile --endpoint URL --model M --into config.yaml --gpu A100-80GB --server-gpus 2
      melange-sky profile --launch A10G,L4 --model M --config config.json --into config.json
    """
    if bool(endpoint) == bool(launch):
        raise click.UsageError("give --endpoint URL (a server that runs) or --launch GPU[,GPU...] (launch, profile, "
                               "tear down), one of them")
    if not launch and (config_path or backend or calibrate_fits):
        raise click.UsageError("--config, --backend and --calibrate go with --launch")
    if force and not calibrate_fits:
        raise click.UsageError("--force goes with --launch --calibrate (it saves a fit the checks would refuse)")
    if launch and (gpu or cost or gpus_given):
        raise click.UsageError("--gpu, --cost and --server-gpus go with --endpoint: with --launch each GPU type's own "
                               "tputs are set (per GPU of its replica's instance), priced from the config or the "
                               "catalog")
    if not launch and into and not gpu:
        raise ProfileError("--into CONFIG needs --gpu NAME: which GPU type's tputs to set in the config")
    if tpot_slo_ms is None and ttft_slo_ms is None and latency_slo_ms is None:
        tpot_slo_ms = DEFAULT_TPOT_SLO_MS
    settings = ProfileSettings(
        tpot_slo_ms=tpot_slo_ms, ttft_slo_ms=ttft_slo_ms, ttft_percentile=ttft_percentile,
        latency_slo_ms=latency_slo_ms, latency_percentile=latency_percentile, requests_per_step=requests_per_step,
        start_rate=start_rate, max_rate=max_rate, min_rate=min(min_rate, start_rate), bisect_steps=bisect_steps,
        max_step_seconds=max_step_seconds, max_minutes=max_minutes, request_timeout=request_timeout,
        size=ProfileSize(size), estimate=Estimate(estimate), ignore_eos=not no_ignore_eos, api_key=api_key)
    given_in = parse_edges(input_buckets, "--input-buckets") if input_buckets else None
    given_out = parse_edges(output_buckets, "--output-buckets") if output_buckets else None
    if launch:
        _launched(launch, model, config_path or into, into, backend, calibrate_fits, force, ready_timeout, settings,
                  given_in, given_out, cells, output, as_json, quiet)
        return
    assert endpoint is not None
    config, in_edges, out_edges, chosen = _buckets(into, given_in, given_out, cells)
    server = server_gpus(config, gpu, gpus_given, into or "<config>")  # before measuring: a wrong N is an error

    def show(event: ProfileEvent) -> None:
        line = format_profile_event(event)
        if line and not quiet:
            click.echo(line, err=True)

    result = profile_endpoint(endpoint, model, input_edges=in_edges, output_edges=out_edges, cells=chosen,
                              settings=settings, on_progress=show)
    if gpu:  # what it was measured on, for `estimate --calibrate` to check
        result = dataclasses.replace(result, gpu=gpu)
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
        click.echo(format_profile(result, server.count))
    result.check_usable(into)  # only zeros: exit non-zero, and never overwrite a GPU's tputs with them
    if config is not None and into and gpu:
        merged = merge_profile(config, result, gpu, cost, source=into, price=catalog_pricer(), gpus=server.count)
        warn(merged.warnings)
        warn(write_config(into, merged.data))  # YAML stays YAML (a .bak keeps its comments), as workload --into
        per_gpu = f" (per GPU: the server's rates / {server.text()})" if server.count > 1 else ""
        click.echo(f"Wrote {gpu}'s tputs into {into}{per_gpu}", err=True)



def _buckets(source: str | None, given_in, given_out, cells):
    """The config at `source` (None without one), the bucket edges to profile (its own, or the ones given) and the
    cells chosen among them: what both ways of profiling start from."""
    config = read_config_object(source) if source else None
    if config is not None and source:
        in_edges, out_edges = config_edges(config, given_in, given_out, source)
    else:
        in_edges, out_edges = edges_for_config(None, given_in, given_out)
    return config, in_edges, out_edges, parse_cells(cells, (len(in_edges) - 1, len(out_edges) - 1))

def _launched(launch: str, model: str, source: str | None, into: str | None, backend: str | None,
              calibrate_fits: bool, force: bool, ready_timeout: float, settings: ProfileSettings,
              given_in: tuple[int, ...] | None, given_out: tuple[int, ...] | None, cells: str, output: str | None,
              as_json: bool, quiet: bool) -> None:
    """`profile --launch`: launch, profile, tear down (`fleet.profile_launch`), then print and write."""
    gpus = tuple(dict.fromkeys(g.strip() for g in launch.split(",") if g.strip()))
    if not gpus:
        raise click.UsageError("--launch: no GPU type given (e.g. --launch A10G,L4)")
    if output and len(gpus) > 1 and "{gpu}" not in output:
        raise click.UsageError("-o with several GPU types: put {gpu} in the file name (e.g. -o profile-{gpu}.json)")
    config, in_edges, out_edges, chosen = _buckets(source, given_in, given_out, cells)
    name = str(config.get("name") or "") if config else ""
    request = LaunchProfileRequest(gpus=gpus, model=model, input_edges=tuple(in_edges), output_edges=tuple(out_edges),
                                   settings=settings, config=config, source=source or "<profile --launch>",
                                   name=name or (Path(source).stem if source else "melange"), cells=chosen,
                                   ready_timeout=ready_timeout,
                                   start_at_estimate=click.get_current_context().get_parameter_source("start_rate")
                                   is not click.core.ParameterSource.COMMANDLINE)

    def note(line: str) -> None:
        if not quiet:
            click.echo(f"  {line}", err=True)

    def show(gpu: str, event: ProfileEvent) -> None:
        line = format_profile_event(event)
        if line and not quiet:
            click.echo(f"  {gpu}: {line}", err=True)

    def replica(event: ReplicaEvent) -> None:
        if not quiet:
            click.echo(format_event(event), err=True)

    launcher = load_backend(backend)
    if not quiet:
        click.echo(f"Launching {', '.join(gpus)} ({launcher.name}) to profile {model}; every replica is torn down "
                   f"at the end (Ctrl-C too)", err=True)
    with Ledger() as ledger, launcher_output(), terminations_interrupt():
        report = profile_launched(request, launcher, ledger, os.environ, calibrate_fits=calibrate_fits,
                                  force_fits=force,
                                  on_replica=replica, on_profile=show, on_note=note)
    for gpu in report.gpus:
        if gpu.result is not None:
            warn(gpu.result.warnings)
            if gpu.calibration is not None:
                warn(gpu.calibration.warnings)  # a fit saved because of --force says so loudly
            if output:
                path = output.replace("{gpu}", gpu.gpu)
                write_config_json(path, gpu.result.to_dict())
                click.echo(f"Wrote {path}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_launched(report))
    if report.left:
        raise LaunchError(report.fleet, f"could not tear down {', '.join(report.left)}: run `melange-sky down "
                                        f"{report.fleet}`")
    if report.interrupted:
        click.echo("Interrupted: every replica was torn down; nothing written.", err=True)
        sys.exit(INTERRUPTED)
    if into and config is not None and any(g.result is not None for g in report.gpus):
        merged = merge_profiles(config, report, into)
        warn(merged.warnings)
        warn(write_config(into, merged.data))  # YAML stays YAML (a .bak keeps its comments), as workload --into
        written = [g.gpu for g in report.gpus if g.result is not None]
        shared = [f"{g.gpu}'s / {g.gpus}" for g in report.gpus if g.result is not None and g.gpus > 1]
        per_gpu = (f" (per GPU: a replica's rates / its instance's GPUs: {', '.join(shared)})" if shared else "")
        click.echo(f"Wrote the tputs of {', '.join(written)} into {into}{per_gpu}", err=True)
    if report.failed:
        sys.exit(1)


def format_launched(report: LaunchProfileReport) -> str:
    """`profile --launch`'s report: each GPU type's profile, one line per GPU type that has none, the cost."""
    lines: list[str] = []
    for gpu in report.gpus:
        if gpu.result is not None:
            lines += [f"{gpu.gpu} ({gpu.cluster}):", format_profile(gpu.result, gpu.gpus), ""]
    if report.speed != 1:
        lines.append(f"The {report.launcher} launcher ran each GPU {report.speed:g}x faster than real: profiled with "
                     f"the SLOs / {report.speed:g}, rates / {report.speed:g} above (the real GPU's).")
    for gpu in report.gpus:
        if gpu.result is None:
            lines.append(f"{gpu.gpu}: not profiled: {gpu.error}")
        if gpu.calibration is not None:
            lines.append(gpu.calibration.text())
        if gpu.calibration_note:
            lines.append(gpu.calibration_note)
    parts = [f"{g.gpu} ${g.price:.4g}/h x {_minutes(g.seconds)} = ${g.cost:.2f}" for g in report.gpus]
    emulated = " (the catalog's prices; the local launcher bills nothing)" if report.launcher == "local" else ""
    lines.append(f"Profiling cost: {'; '.join(parts)}; total ${report.cost:.2f}{emulated}")
    lines.append(f"Torn down: {', '.join(report.teardown.removed) or 'nothing was up'}" if report.teardown else
                 "Torn down: nothing")
    return "\n".join(lines)


# ---- text ----------------------------------------------------------------------------------------------------------
def _num(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _times(ms: float | None, speed: float) -> float | None:
    return None if ms is None else ms * speed


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def format_profile(result: ProfileResult, gpus: int = 1) -> str:
    """The `melange-sky profile` report: one line per measured bucket, the headroom to plan with, then the tputs
    matrix to paste: per GPU, the rates of a server of `gpus` GPUs / `gpus`."""
    settings = result.settings
    # An emulator run `speed` times faster than real was measured at its own scale; the table shows the real GPU's,
    # as the SLOs in the heading and req/s (tputs) are.
    speed = result.speed if result.speed and result.speed > 0 else 1.0
    lines = [f"Profile of {result.model} at {result.endpoint}: {settings.slo_text()}, {_minutes(result.seconds)}", ""]
    header = (f"  {'bucket':<7} {'input':>11} {'output':>11} {'req/s':>8}  {'limit':<12} {'passed at':>9} "
              f"{'TPOT ms':>7} {'TTFT p50/p99 ms':>17} {'latency p50/p99 ms':>19} {'time':>8}  status")
    lines.append(header)
    for b in result.buckets:
        if b.status == BucketStatus.NOT_MEASURED:
            continue
        best = b.best
        ttft = f"{_num(_times(best.p50_ttft_ms, speed))}/{_num(_times(best.p99_ttft_ms, speed))}" if best else "-"
        latency = (f"{_num(_times(best.p50_latency_ms, speed), '.0f')}/"
                   f"{_num(_times(best.p99_latency_ms, speed), '.0f')}" if best else "-")
        tpot = _num(_times(best.mean_tpot_ms, speed)) if best else "-"
        passed_at = f"{best.rate / speed:.3g}" if best else "-"
        limit = slo_label(b.limit, settings) if b.limit is not None and b.status.has_tput else "-"
        status = b.status if b.status == BucketStatus.OK else f"{b.status}: {b.message}"
        lines.append(f"  {b.cell[0]}:{b.cell[1]:<5} {f'{b.input_range[0]}-{b.input_range[1]}':>11} "
                     f"{f'{b.output_range[0]}-{b.output_range[1]}':>11} {b.tput:>8.3g}  {limit:<12} {passed_at:>9} "
                     f"{tpot:>7} {ttft:>17} {latency:>19} {_minutes(b.seconds):>8}  {status}")
    lines.append("  (input/output: bucket ranges in tokens, profiled at their midpoint unless --size upper; req/s: "
                 "the estimate in tputs; limit: the SLO that set it; TPOT/TTFT/latency: measured at the highest "
                 "rate that passed)")
    if speed != 1:
        lines.append(f"  (measured on an emulator {speed:g}x faster than real: passed at / {speed:g} and "
                     f"TPOT/TTFT/latency x {speed:g}, the real GPU's scale, as the SLOs and req/s are)")
    skipped = result.not_measured
    if skipped:
        lines.append(f"Not measured (0 in tputs): {', '.join(f'{i}:{j}' for i, j in skipped)}")
    headroom = result.headroom
    if headroom is not None:
        lines.append(f"Measured variability: plan with headroom <= {math.floor(100 * headroom) / 100:.2f} (each "
                     f"bucket's tput is known within about {100 * (1 - headroom):.0f}%; bursty traffic needs less, "
                     f"see docs/inputs.md, 'Planning with a profile')")
    if gpus == 1:
        lines += ["", "tputs for this GPU type (req/s per bucket; paste into gpu_info, or use --into CONFIG --gpu "
                      "NAME):", format_matrix("tputs", result.tputs)]
    else:
        lines += ["", f"tputs for this GPU type, per GPU (req/s per bucket: the {gpus}-GPU server's above / {gpus}; "
                      f"paste into gpu_info, or use --into CONFIG --gpu NAME):",
                  format_matrix("tputs", per_gpu_tputs(result.tputs, gpus))]
    return "\n".join(lines)


def format_profile_event(event: ProfileEvent) -> str | None:
    """One progress line for a live display of `profile`."""
    if event.kind == EventKind.ESTIMATE and event.seconds is not None:
        bound = f" (at most {_minutes(event.max_seconds)} with --max-minutes)" if event.max_seconds else ""
        return (f"Profiling {event.total} bucket(s): about {_minutes(event.seconds)} expected{bound}; a step lasts "
                f"a few request durations")
    where = (f"[{event.index}/{event.total}] bucket {event.cell[0]}:{event.cell[1]} "
             f"({event.prompt_tokens} in / {event.output_tokens} out tokens)")
    if event.kind == EventKind.BUCKET_START:
        return f"{where}: measuring"
    if event.kind == EventKind.STEP and event.step is not None:
        s = event.step
        mark = "✓" if s.passed else "⨯"
        load = f", {s.in_flight:.3g} in flight" if s.in_flight is not None else ""
        return f"{where}: {mark} {s.rate:.3g} req/s: {s.reason} ({s.measured} measured{load}, {s.seconds:.1f} s)"
    if event.kind == EventKind.BUCKET_DONE and event.bucket is not None:
        b = event.bucket
        took = f", {_minutes(b.seconds)}"
        if b.status in (BucketStatus.OK, BucketStatus.CAPPED):
            limit = f" (limit: {b.limit})" if b.limit is not None and b.status == BucketStatus.OK else ""
            return f"{where}: {b.tput:.3g} req/s{limit}" + (" (capped)" if b.status == "capped" else "") + took
        return f"{where}: {b.status}: {b.message}{took}"
    return None
