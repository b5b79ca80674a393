"""`emulate`: an OpenAI-compatible server that runs the engine model of a GPU in real time (no GPU needed)."""
from __future__ import annotations

import click

from melange_sky.cli.main import debug_option, main


@main.command()
@click.option("--model", required=True, help="A bundled model name (llama-3.1-8b, qwen2.5-7b, ...), a Hugging Face "
                                             "id of one, or a path to a config.json (or a folder holding one).")
@click.option("--gpu", required=True, help="GPU type, as the catalog spells it (A10G, L4, A100-80GB, H100, ...).")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True, help="Tensor-parallel GPUs.")
@click.option("--data-parallel-size", "--dp", "data_parallel_size", type=click.IntRange(min=1), default=1,
              show_default=True, metavar="N",
              help="N engines of --tp GPUs behind one server (vLLM's --data-parallel-size: an instance of N x TP "
                   "GPUs), each request sent where vLLM's load balancer would send it.")
@click.option("--dtype", default="bf16", show_default=True, help="Weights: bf16, fp16 or fp8.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=str), metavar="CONFIG",
              help="Take the engine settings (max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, "
                   "max_model_len, ...) from this config's `deployment`; vLLM's defaults otherwise.")
@click.option("--speed", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, metavar="X",
              help="Run the GPU X times faster: every step time is divided by X (rates x X, times / X).")
@click.option("--served-model-name", metavar="NAME", help="The model name clients send [default: --model as given].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port; the URL is printed).")
@click.option("--api-key", envvar="MELANGE_SKY_API_KEY", metavar="KEY",
              help="Clients must send 'Authorization: Bearer KEY' on /v1/* (as vLLM's --api-key) "
                   "[env MELANGE_SKY_API_KEY].")
@debug_option
@click.pass_context
def emulate(ctx: click.Context, model: str, gpu: str, tp: int, data_parallel_size: int, dtype: str,
            config: str | None, speed: float, served_model_name: str | None, host: str, port: int,
            api_key: str | None) -> None:
    """Serve an emulated vLLM: the engine model of MODEL on GPU, in real time, behind an OpenAI-compatible API.

    Requests join the engine's batch at a step boundary and each step's tokens come out at its end, on the model's
    step times (continuous batching, chunked prefill, the KV cache and its preemptions), as a vLLM server on that
    GPU would send them. The text is filler words. POST /v1/completions and /v1/chat/completions (streaming or
    not, usage, stream_options.include_usage), GET /v1/models, /health, /metrics (vllm:num_requests_running,
    vllm:num_requests_waiting, vllm:kv_cache_usage_perc). For `profile`, `serve` and fleets on one machine.

    \b
    Examples:
      melange-sky emulate --model llama-3.1-8b --gpu A10G --port 8000
      melange-sky emulate --model qwen2.5-7b --gpu H100 --speed 10 --port 0
      melange-sky emulate --model llama-3.1-8b --gpu A10G --tp 2 --data-parallel-size 2   # an A10G:4 instance
      melange-sky profile --endpoint http://127.0.0.1:8000 --model llama-3.1-8b --buckets 0:0
    """
    from melange_sky.engine import emulator  # noqa: PLC0415 - aiohttp and the engine: kept off --help

    ready = emulator.prepare(model, gpu, tp=tp, dtype=dtype, speed=speed, config=config,
                             served_model_name=served_model_name, host=host, port=port, api_key=api_key,
                             data_parallel_size=data_parallel_size)
    click.echo(ready.summary)
    code = emulator.run(ready.emulator, ready.settings,
                        on_listening=lambda url: click.echo(f"Listening on {url}  (Ctrl-C or SIGTERM stops)"))
    ctx.exit(code)
