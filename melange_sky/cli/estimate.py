"""`estimate`: a GPU's performance without the GPU, from the engine model (melange_sky.engine)."""
from __future__ import annotations

import dataclasses
import json
import time

import click

from melange_sky.core.slo import DEFAULT_TPOT_SLO_MS
from melange_sky._io import write_config_json
from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.text import format_matrix
from melange_sky.core.config_doc import read_config_object
from melange_sky.core.slo import ProfileSize, Slos
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.engine import BUNDLED_MODELS, GPU_NAMES, Engine, EngineError, EngineSettings, load_model
from melange_sky.engine.calibrate import calibrate
from melange_sky.engine.estimate import BucketRate, GpuTable, PointResult, max_rates, merge_tables, run_point
from melange_sky.inputs.profile_result import config_edges



@main.command()
@click.option("--model", help=f"A bundled model ({', '.join(BUNDLED_MODELS)}; Hugging Face ids of these work too), "
                              f"or the path to a Hugging Face config.json or a folder holding one [table mode: "
                              f"default deployment.model].")
@click.option("--gpu", help=f"Point mode: the GPU type ({', '.join(GPU_NAMES)}).")
@click.option("--gpus", help="Table mode: comma-separated GPU types, e.g. L4,A10G,A100-80GB,H100.")
@click.option("--tp", type=click.IntRange(min=1), help="Tensor-parallel GPUs per replica [default: "
              "deployment.tensor_parallel_size, else 1].")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp8"]), help="Weight type [default: deployment.dtype, "
              "else bf16]; fp8 runs on FP8 tensor cores where the GPU has them, else as weight-only FP8.")
@click.option("--input-tokens", type=click.IntRange(min=1), help="Point mode: prompt tokens per request.")
@click.option("--output-tokens", type=click.IntRange(min=1), help="Point mode: output tokens per request "
              "(generated in full, as with ignore_eos).")
@click.option("--concurrency", type=click.IntRange(min=1), help="Point mode, closed loop: requests kept in flight "
              "(--concurrency N --requests N is an offline batch).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Point mode, open loop: Poisson "
              "arrivals, req/s.")
@click.option("--requests", type=click.IntRange(min=1), help="Point mode: requests to complete [default: "
              "max(concurrency, 200), or max(200, 60 s of arrivals)].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=str), metavar="CONFIG",
              help="Table mode: the config whose buckets (input_buckets/output_buckets, or Mélange's defaults) and "
                   "deployment engine settings to use; gpu_info may be absent.")
@click.option("--tpot-slo-ms", type=click.FloatRange(min=0, min_open=True),
              help=f"Table mode: SLO on the mean time per output token, ms [default: {DEFAULT_TPOT_SLO_MS:g} when "
                   f"no other SLO is given].")
@click.option("--ttft-slo-ms", type=click.FloatRange(min=0, min_open=True),
              help="Table mode: SLO on the time to first token at --ttft-percentile, ms.")
@click.option("--ttft-percentile", type=click.FloatRange(0, 100, min_open=True, max_open=True), default=90.0,
              show_default=True, help="Percentile --ttft-slo-ms holds at.")
@click.option("--latency-slo-ms", type=click.FloatRange(min=0, min_open=True),
              help="Table mode: SLO on the whole request's latency at --latency-percentile, ms.")
@click.option("--latency-percentile", type=click.FloatRange(0, 100, min_open=True, max_open=True), default=90.0,
              show_default=True, help="Percentile --latency-slo-ms holds at.")
@click.option("--size", type=click.Choice([s.value for s in ProfileSize]), default="mid", show_default=True,
              help="Table mode: the length each bucket is run at (as `profile --size`).")
@click.option("--into", type=click.Path(dir_okay=False, path_type=str), metavar="CONFIG",
              help="Table mode: write each GPU's tputs (and a catalog cost where it has none) into this config.")
@click.option("--calibrate", "profile_path", type=click.Path(exists=True, dir_okay=False, path_type=str),
              metavar="PROFILE", help="Refit --gpu's coefficients on a profile record (`profile -o`) measured on a "
              "real server of that GPU type running --model; later estimates and emulations use the fit.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (arrivals).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@debug_option
def estimate(model: str | None, gpu: str | None, gpus: str | None, tp: int | None, dtype: str | None,
             input_tokens: int | None, output_tokens: int | None, concurrency: int | None, rate: float | None,
             requests: int | None, config_path: str | None, tpot_slo_ms: float | None, ttft_slo_ms: float | None,
             ttft_percentile: float, latency_slo_ms: float | None, latency_percentile: float, size: str,
             into: str | None, profile_path: str | None, seed: int, as_json: bool, quiet: bool) -> None:
    """Estimate a GPU's serving performance from a model of vLLM's engine: no GPU needed.

    Point mode, the shape published benchmarks use: throughput, TTFT and TPOT of one workload on one GPU type,
    closed loop (--concurrency) or open loop (--rate). Table mode: each GPU type's `tputs` for a config's buckets
    (the highest Poisson rate per bucket whose SLOs hold at steady state, as `profile` measures a real server).
    How far to trust an estimate: docs/estimate-accuracy.md; calibrate with one real profile: --calibrate.

    \b
    Examples:
      melange-sky estimate --model llama-3.1-8b --gpu A10G --input-tokens 1000 --output-tokens 200 --concurrency 32
      melange-sky estimate --model qwen2.5-7b --gpu H100 --input-tokens 512 --output-tokens 256 --rate 20 --json
      melange-sky estimate --model llama-3.1-8b --gpus L4,A10G,A100-80GB,H100 --config config.json --into config.json
      melange-sky estimate --model llama-3.1-8b --gpu A10G --calibrate a10g-profile.json
    """
    if profile_path:
        if not gpu or not model:
            raise EngineError("--calibrate PROFILE needs --gpu (the GPU type it was measured on) and --model")
        result = calibrate(load_model(model), gpu, read_config_object(profile_path), source=profile_path,
                           tp=tp or 1, dtype=dtype or "bf16")
        if as_json:
            click.echo(json.dumps(result.to_json(), indent=2))
        else:
            click.echo(result.text())
        return
    if gpus or config_path or into:
        _table(model, gpus, tp, dtype, config_path, into, size, seed, as_json, quiet,
               Slos(tpot_ms=tpot_slo_ms if (tpot_slo_ms or ttft_slo_ms or latency_slo_ms) else DEFAULT_TPOT_SLO_MS,
                    ttft_ms=ttft_slo_ms, ttft_percentile=ttft_percentile, latency_ms=latency_slo_ms,
                    latency_percentile=latency_percentile))
        return
    if not model or not gpu or input_tokens is None or output_tokens is None:
        raise EngineError("point mode needs --model, --gpu, --input-tokens and --output-tokens (and --concurrency or "
                          "--rate); table mode needs --gpus and --config (see --help)")
    engine = Engine(load_model(model), gpu, tp=tp or 1, dtype=dtype or "bf16")
    point = run_point(engine, input_tokens=input_tokens, output_tokens=output_tokens, concurrency=concurrency,
                      rate=rate, requests=requests, seed=seed)
    if as_json:
        click.echo(json.dumps(point.to_json(), indent=2))
        return
    click.echo(format_point(engine, point, input_tokens, output_tokens, concurrency, rate))


def _table(model: str | None, gpus: str | None, tp: int | None, dtype: str | None, config_path: str | None,
           into: str | None, size: str, seed: int, as_json: bool, quiet: bool, slos: Slos) -> None:
    source = config_path or into
    if not gpus or not source:
        raise EngineError("table mode needs --gpus (e.g. L4,A10G,A100-80GB,H100) and --config CONFIG")
    config = read_config_object(source)
    deployment = config.get("deployment") if isinstance(config.get("deployment"), dict) else None
    settings = EngineSettings.from_deployment(deployment, source)
    if tp is not None or dtype is not None:  # the command line wins over the deployment
        settings = dataclasses.replace(settings, tensor_parallel_size=tp or settings.tensor_parallel_size,
                                       dtype=dtype or settings.dtype)
    model_name = model or (deployment or {}).get("model")
    if not model_name:
        raise EngineError(f"--model is needed: {source} has no deployment.model")
    spec = load_model(str(model_name))
    in_edges, out_edges = config_edges(config, None, None, source)
    names = [g.strip() for g in gpus.split(",") if g.strip()]
    started = time.monotonic()

    def progress(gpu: str, done: int, total: int, bucket: BucketRate | None) -> None:
        if not quiet and bucket is not None and done == total:
            click.echo(f"{gpu}: {total} buckets in {time.monotonic() - started:.1f} s", err=True)

    if not quiet:
        click.echo(f"Estimating {len(names)} GPU type(s) x {len(in_edges) - 1}x{len(out_edges) - 1} buckets of "
                   f"{spec.name} ({slos.text()})", err=True)
    tables = max_rates(spec, names, in_edges, out_edges, slos, tp=tp or settings.tensor_parallel_size or 1,
                       dtype=dtype or settings.dtype or "bf16", settings=settings, size=ProfileSize(size),
                       seed=seed, progress=progress)
    if as_json:
        click.echo(json.dumps({"gpus": {name: t.to_json() for name, t in tables.items()}}, indent=2))
    else:
        click.echo(format_tables(tables, spec.name, slos))
    if into:
        merged = merge_tables(config if source == into else read_config_object(into), tables, in_edges, out_edges,
                              source=into, price=catalog_pricer())
        warn(merged.warnings)
        write_config_json(into, merged.data)
        written = [n for n, t in tables.items() if t.tputs is not None]
        click.echo(f"Wrote the tputs of {', '.join(written) or 'no GPU'} into {into}", err=True)


def format_point(engine: Engine, point: PointResult, input_tokens: int, output_tokens: int,
                 concurrency: int | None, rate: float | None) -> str:
    """The point-mode report."""
    loop = (f"closed loop, {concurrency} in flight" if concurrency is not None else
            f"open loop, Poisson at {rate:g} req/s")
    lines = [engine.description, *[f"Note: {n}" for n in engine.notes],
             f"{point.requests} requests of {input_tokens} in / {output_tokens} out tokens, {loop}:",
             f"  output tokens/s  {point.output_tokens_per_s:,.1f}",
             f"  requests/s       {point.requests_per_s:,.3f}",
             f"  TTFT ms          mean {point.ttft_ms.mean:,.1f}  p50 {point.ttft_ms.p50:,.1f}  "
             f"p90 {point.ttft_ms.p90:,.1f}",
             f"  TPOT ms          mean {point.tpot_ms.mean:,.2f}  p50 {point.tpot_ms.p50:,.2f}  "
             f"p90 {point.tpot_ms.p90:,.2f}",
             f"  KV cache         {100 * point.kv_cache_use:.0f}% used at peak",
             f"  preempted        {point.preempted}" + (" (requests were evicted and recomputed: KV cache full)"
                                                        if point.preempted else "")]
    return "\n".join(lines)


def format_tables(tables: dict[str, GpuTable], model: str, slos: Slos) -> str:
    """The table-mode report: per GPU type its engine and tputs matrix, or why it has none."""
    lines = [f"Estimated tputs of {model} ({slos.text()}; req/s per bucket, rows: input buckets, columns: output "
             f"buckets):"]
    for name, table in tables.items():
        lines.append("")
        if table.tputs is None:
            lines.append(f"{name}: {table.note}")
            continue
        lines.append(f"{name}: {table.engine}")
        if table.note:
            lines.append(f"  Note: {table.note}")
        lines.append(format_matrix("tputs", table.tputs))
    return "\n".join(lines)
