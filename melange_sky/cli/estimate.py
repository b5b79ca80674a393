"""`estimate`: a GPU's performance without the GPU, from the engine model (melange_sky.engine)."""
from __future__ import annotations

import dataclasses
import json
import time

import click
from click.core import ParameterSource

from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.text import format_matrix
from melange_sky.core.buckets import parse_edges
from melange_sky.core.config_doc import check_gpu_entries, read_config_object, write_config
from melange_sky.core.slo import DEFAULT_TPOT_SLO_MS, ProfileSize, Slos
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.deploy.plan import DEFAULT_MODEL
from melange_sky.engine import BUNDLED_MODELS, GPU_NAMES, Engine, EngineError, EngineSettings, gpu_spec, load_model
from melange_sky.engine.calibrate import calibrate
from melange_sky.engine.calibration import MAX_FIT_ERROR, poor_fit_warning
from melange_sky.engine.estimate import BucketRate, GpuTable, PointResult, max_rates, merge_tables, run_point
from melange_sky.engine.models import normalise_dtype
from melange_sky.inputs.profile_result import config_edges

#: Options each mode reads (besides --model, --tp, --dtype, --json, --quiet and --debug); any other one given is an
#: error naming it, not silently ignored (QA 11).
POINT_OPTIONS = ("gpu", "input_tokens", "output_tokens", "concurrency", "rate", "requests", "seed")
TABLE_OPTIONS = ("gpus", "config_path", "into", "tpot_slo_ms", "ttft_slo_ms", "ttft_percentile", "latency_slo_ms",
                 "latency_percentile", "size", "input_buckets", "output_buckets", "seed")
CALIBRATE_OPTIONS = ("gpu", "profile_path", "force")
MODES = {
    "point": (POINT_OPTIONS, "point mode (--gpu) runs the one workload --input-tokens and --output-tokens give"),
    "table": (TABLE_OPTIONS, "table mode (--gpus, --config) runs each bucket of the config at its own lengths and "
                             "finds its highest rate"),
    "calibrate": (CALIBRATE_OPTIONS, "--calibrate fits --gpu's coefficients to a profile (with --model, --tp, "
                                     "--dtype)"),
}


@main.command()
@click.option("--model", help=f"A bundled model ({', '.join(BUNDLED_MODELS)}; Hugging Face ids of these work too), "
                              f"or the path to a Hugging Face config.json or a folder holding one [table mode: "
                              f"default deployment.model, else {DEFAULT_MODEL}, as plan and up deploy].")
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
@click.option("--input-buckets", metavar="EDGES", help="Table mode: input-length bucket edges in tokens, "
              "comma-separated [default: the config's input_buckets, else Mélange's 1,25,100,250,500,1000,2000,4000,"
              "8000]; needed for a config whose matrices are not that 8x6 grid and that gives no edges.")
@click.option("--output-buckets", metavar="EDGES", help="Table mode: output-length bucket edges in tokens [default: "
              "the config's output_buckets, else Mélange's 1,25,100,250,500,1000,2000].")
@click.option("--into", type=click.Path(dir_okay=False, path_type=str), metavar="CONFIG",
              help="Table mode: write each GPU's tputs (and a catalog cost where it has none) into this config.")
@click.option("--calibrate", "profile_path", type=click.Path(exists=True, dir_okay=False, path_type=str),
              metavar="PROFILE", help="Refit --gpu's coefficients on a profile record (`profile -o`) measured on a "
              "real server of that GPU type running --model; later estimates and emulations use the fit. A record "
              "that says it measured another GPU type or model, or the local launcher's emulator, is refused.")
@click.option("--force", is_flag=True, help=f"With --calibrate: save the fit even from a profile of another GPU type, "
              f"model or an emulator, or when it still misses the profile's rates by more than "
              f"{100 * MAX_FIT_ERROR:.0f}% (median); every later estimate warns of it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (arrivals).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@debug_option
def estimate(model: str | None, gpu: str | None, gpus: str | None, tp: int | None, dtype: str | None,
             input_tokens: int | None, output_tokens: int | None, concurrency: int | None, rate: float | None,
             requests: int | None, config_path: str | None, tpot_slo_ms: float | None, ttft_slo_ms: float | None,
             ttft_percentile: float, latency_slo_ms: float | None, latency_percentile: float, size: str,
             input_buckets: str | None, output_buckets: str | None, into: str | None, profile_path: str | None,
             force: bool, seed: int, as_json: bool, quiet: bool) -> None:
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
    mode = "calibrate" if profile_path else "table" if (gpus or config_path or into) else "point"
    _check_options(click.get_current_context(), mode)
    if profile_path:
        if not gpu or not model:
            raise EngineError("--calibrate PROFILE needs --gpu (the GPU type it was measured on) and --model")
        result = calibrate(load_model(model), gpu, read_config_object(profile_path), source=profile_path,
                           tp=tp or 1, dtype=dtype or "bf16", force=force)
        warn(result.warnings)
        if as_json:
            click.echo(json.dumps(result.to_json(), indent=2))
        else:
            click.echo(result.text())
        return
    if mode == "table":
        _table(model, gpus, tp, dtype, config_path, into, size, input_buckets, output_buckets, seed, as_json, quiet,
               Slos(tpot_ms=tpot_slo_ms if (tpot_slo_ms or ttft_slo_ms or latency_slo_ms) else DEFAULT_TPOT_SLO_MS,
                    ttft_ms=ttft_slo_ms, ttft_percentile=ttft_percentile, latency_ms=latency_slo_ms,
                    latency_percentile=latency_percentile))
        return
    if not model or not gpu or input_tokens is None or output_tokens is None:
        raise EngineError("point mode needs --model, --gpu, --input-tokens and --output-tokens (and --concurrency or "
                          "--rate); table mode needs --gpus and --config (see --help)")
    engine = Engine(load_model(model), gpu, tp=tp or 1, dtype=dtype or "bf16")
    warn([w for w in [poor_fit_warning(engine.gpu.name)] if w])
    point = run_point(engine, input_tokens=input_tokens, output_tokens=output_tokens, concurrency=concurrency,
                      rate=rate, requests=requests, seed=seed)
    if as_json:
        data = point.to_json()
        if engine.fit_source:
            data["calibration"] = engine.fit_source  # as table mode's --json says it
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(format_point(engine, point, input_tokens, output_tokens, concurrency, rate))


def _check_options(ctx: click.Context, mode: str) -> None:
    """A one-line usage error for an option the chosen mode would ignore (QA 11, 12): the option, and what the mode
    runs instead. --gpu and --gpus together name the conflict."""
    given = [p for p in ctx.command.params if p.name and ctx.get_parameter_source(p.name) in
             (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    names = {p.name for p in given}
    if "gpu" in names and "gpus" in names:
        raise click.UsageError("give --gpu (point mode: one GPU type, one workload) or --gpus (table mode: a config's "
                               "buckets for each GPU type), not both")
    if "force" in names and mode != "calibrate":
        raise click.UsageError("--force goes with --calibrate PROFILE (it saves a fit that misses the profile)")
    if "gpu" in names and mode == "table":
        raise click.UsageError("--gpu is point mode's one GPU type: table mode (--config) takes --gpus (one or more, "
                               "e.g. --gpus A10G)")
    mine, what = MODES[mode]
    others = {name for other, (options, _) in MODES.items() if other != mode for name in options} - set(mine)
    for param in given:
        if param.name in others:
            raise click.UsageError(f"{param.opts[0]} does not apply here: {what}")


def _table(model: str | None, gpus: str | None, tp: int | None, dtype: str | None, config_path: str | None,
           into: str | None, size: str, input_buckets: str | None, output_buckets: str | None, seed: int,
           as_json: bool, quiet: bool, slos: Slos) -> None:
    source = config_path or into
    if not gpus or not source:
        raise EngineError("table mode needs --gpus (e.g. L4,A10G,A100-80GB,H100) and --config CONFIG")
    names = [gpu_spec(g.strip()).name for g in gpus.split(",") if g.strip()]  # an unknown GPU before any work
    config = read_config_object(source)
    deployment = config.get("deployment") if isinstance(config.get("deployment"), dict) else None
    settings = EngineSettings.from_deployment(deployment, source)
    target = config if into is None or into == source else read_config_object(into)
    if into is not None:
        _check_into(into, target, settings, tp, dtype)
    # the deployment's TP against the config's instances, as every command checks it; then what --into would write
    check_gpu_entries(config, source)
    if into is not None:
        check_gpu_entries(target, into, names, catalog_pricer())
    if tp is not None or dtype is not None:  # the command line wins over the deployment
        settings = dataclasses.replace(settings, tensor_parallel_size=tp or settings.tensor_parallel_size,
                                       dtype=dtype or settings.dtype)
    model_name = model or (deployment or {}).get("model")
    if not model_name:
        model_name = DEFAULT_MODEL
        click.echo(f"Note: {source} has no deployment.model: estimating {DEFAULT_MODEL}, the model plan and up "
                   f"deploy without one (pass --model, or set deployment.model)", err=True)
    spec = load_model(str(model_name))
    in_edges, out_edges = config_edges(config, parse_edges(input_buckets, "--input-buckets") if input_buckets
                                       else None,
                                       parse_edges(output_buckets, "--output-buckets") if output_buckets else None,
                                       source)
    started = time.monotonic()

    def progress(gpu: str, done: int, total: int, bucket: BucketRate | None) -> None:
        if not quiet and bucket is not None and done == total:
            click.echo(f"{gpu}: {total} buckets in {time.monotonic() - started:.1f} s", err=True)

    if not quiet:
        click.echo(f"Estimating {len(names)} GPU type(s) x {len(in_edges) - 1}x{len(out_edges) - 1} buckets of "
                   f"{spec.name} ({slos.text()})", err=True)
    replica_gpus = tp or settings.tensor_parallel_size or 1
    tables = max_rates(spec, names, in_edges, out_edges, slos, tp=replica_gpus,
                       dtype=dtype or settings.dtype or "bf16", settings=settings, size=ProfileSize(size),
                       seed=seed, progress=progress)
    warn([w for name, t in tables.items() if t.fit_source and (w := poor_fit_warning(name))])
    if as_json:
        click.echo(json.dumps({"gpus": {name: t.to_json() for name, t in tables.items()}}, indent=2))
    else:
        click.echo(format_tables(tables, spec.name, slos, replica_gpus))
    if into:
        merged = merge_tables(target, tables, in_edges, out_edges, source=into, price=catalog_pricer(),
                              replica_gpus=replica_gpus)
        warn(merged.warnings)
        warn(write_config(into, merged.data))  # YAML stays YAML (a .bak keeps its comments), as workload --into
        written = [n for n, t in tables.items() if t.tputs is not None]
        per_gpu = f" (per GPU: each TP {replica_gpus} replica's rate / {replica_gpus})" if replica_gpus > 1 else ""
        click.echo(f"Wrote the tputs of {', '.join(written) or 'no GPU'} into {into}{per_gpu}", err=True)


def _check_into(into: str, target: dict, settings: EngineSettings, tp: int | None, dtype: str | None) -> None:
    """--into writes tputs for the server the config deploys: a --tp or --dtype other than its deployment's would
    write another server's rates."""
    deployed = {"tp": settings.tensor_parallel_size or 1, "dtype": normalise_dtype(settings.dtype or "bf16")}
    asked = {"tp": tp, "dtype": None if dtype is None else normalise_dtype(dtype)}
    for key, name in (("tp", "tensor_parallel_size"), ("dtype", "dtype")):
        if asked[key] is not None and asked[key] != deployed[key]:
            raise click.UsageError(f"--{key} {asked[key]} is not the deployment's {name} ({deployed[key]}): --into "
                                   f"{into} would write the rates of a server the config does not deploy; set "
                                   f"deployment.{name} to {asked[key]} in the config instead")


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


def format_tables(tables: dict[str, GpuTable], model: str, slos: Slos, replica_gpus: int = 1) -> str:
    """The table-mode report: per GPU type its engine and tputs matrix, or why it has none."""
    per = "req/s per bucket" if replica_gpus == 1 else f"req/s per bucket of one TP {replica_gpus} replica"
    lines = [f"Estimated tputs of {model} ({slos.text()}; {per}, rows: input buckets, columns: output buckets):"]
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
