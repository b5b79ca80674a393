"""The vLLM engine settings the model runs with: vLLM's defaults, or what the config's `deployment` sets.

Names are vLLM's own (`vllm serve --max-num-seqs` is `max_num_seqs` here and in a config's `deployment`), so the
deployed server and the estimate run the same engine. Defaults, from vLLM's source (vllm/engine/arg_utils.py
`EngineArgs.get_batch_defaults`, V1 engine, OpenAI server usage context, v0.9-v0.11):
  * GPUs with >= 70 GiB that are not A100s (H100, H200, MI300X): max_num_batched_tokens 8192, max_num_seqs 1024;
  * every other GPU (A100 included, vLLM PR #17885): max_num_batched_tokens 2048, max_num_seqs 256;
  * gpu_memory_utilization 0.9 and block_size 16 (vllm/config CacheConfig); chunked prefill always on and prefix
    caching on by default in V1 (`_set_default_args_v1`); max_model_len: the model's max_position_embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from melange_sky.engine.errors import EngineError
from melange_sky.engine.hardware import GpuSpec
from melange_sky.engine.models import ModelSpec, normalise_dtype
from melange_sky.errors import ConfigError

GIB = 1024 ** 3
#: The `deployment` keys the engine model reads (vLLM's flag names, underscored), with their types.
ENGINE_SETTING_KEYS: dict[str, type] = {
    "max_num_seqs": int,
    "max_num_batched_tokens": int,
    "gpu_memory_utilization": float,
    "block_size": int,
    "max_model_len": int,
    "enable_chunked_prefill": bool,
    "tensor_parallel_size": int,
    "dtype": str,
    "kv_cache_dtype": str,
    "num_gpu_blocks_override": int,
    "enable_prefix_caching": bool,
}
_BLOCK_SIZES = (1, 8, 16, 32, 64, 128)  # vLLM's --block-size choices
_KV_DTYPES = {"auto": None, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1,
              "fp8_e5m2": 1}


@dataclass(frozen=True)
class EngineSettings:
    """vLLM engine flags; None means vLLM's default for the GPU and model (see `resolve`)."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    tensor_parallel_size: int | None = None  # None: the engine's `tp` argument
    dtype: str | None = None  # None: the engine's `dtype` argument
    kv_cache_dtype: str = "auto"  # "auto": the weights' 16-bit type; "fp8": 1 byte per element
    num_gpu_blocks_override: int | None = None  # vLLM's --num-gpu-blocks-override: the KV cache's size in blocks
    enable_prefix_caching: bool = True  # V1's default: a preempted request finds its blocks again if not evicted

    def __post_init__(self) -> None:
        problems = settings_problems(self)
        if problems:
            field, message = problems[0]
            raise ConfigError("engine settings", field, message)

    @classmethod
    def from_deployment(cls, deployment: dict[str, Any] | None, source: str = "<config>") -> EngineSettings:
        """The settings a config's `deployment` sets (other keys are ignored: they belong to the template).
        ConfigError naming `deployment.<key>` for a wrong type or value."""
        if not deployment:
            return cls()
        if not isinstance(deployment, dict):
            raise ConfigError(source, "deployment", "must be an object")
        values: dict[str, Any] = {}
        for key, kind in ENGINE_SETTING_KEYS.items():
            if key not in deployment or deployment[key] is None:
                continue
            value = deployment[key]
            ok = (isinstance(value, bool) if kind is bool else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else
                  isinstance(value, int | float) and not isinstance(value, bool) if kind is float else
                  isinstance(value, str))
            if not ok:
                raise ConfigError(source, f"deployment.{key}", f"must be {_kind_text(kind)}, got {value!r}")
            values[key] = float(value) if kind is float else value
        settings = cls.__new__(cls)
        for f in fields(cls):
            object.__setattr__(settings, f.name, values.get(f.name, f.default))
        problems = settings_problems(settings)
        if problems:
            field, message = problems[0]
            raise ConfigError(source, f"deployment.{field}", message)
        return settings

    def to_deployment(self) -> dict[str, Any]:
        """The settings that differ from the defaults, as `deployment` keys (what `vllm serve` flags to render)."""
        defaults = EngineSettings()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(defaults, f.name)}

    def vllm_args(self) -> list[str]:
        """The `vllm serve` flags for the settings that differ from vLLM's defaults, so the deployed server runs the
        engine the estimate modelled (dtype fp8 is vLLM's `--quantization fp8`)."""
        args: list[str] = []
        for key, value in self.to_deployment().items():
            if key == "dtype":
                dtype = normalise_dtype(value)
                args += ["--quantization", "fp8"] if dtype == "fp8" else \
                    ["--dtype", {"bf16": "bfloat16", "fp16": "float16"}[dtype]]
            elif isinstance(value, bool):
                args.append(f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}")
            else:
                args += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
        return args

    def resolve(self, gpu: GpuSpec, model: ModelSpec) -> EngineSettings:
        """These settings with every default filled in for `gpu` and `model`, as vLLM would."""
        big = gpu.memory_bytes >= 70 * GIB and not gpu.name.startswith("A100")
        seqs = self.max_num_seqs or (1024 if big else 256)
        max_len = self.max_model_len or model.max_position_embeddings
        batched = self.max_num_batched_tokens or (8192 if big else 2048)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens is None:
            batched = max(batched, max_len)  # vLLM: without chunking, a whole prompt must fit one step
        batched = max(batched, seqs) if self.max_num_batched_tokens is None else batched
        return replace(self, max_num_seqs=seqs, max_num_batched_tokens=batched, max_model_len=max_len)

    @property
    def kv_dtype_bytes(self) -> int | None:
        """Bytes per KV cache element; None for "auto" (the weights' 16-bit type: 2)."""
        return _KV_DTYPES[self.kv_cache_dtype.lower()]


def _kind_text(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]


def settings_problems(s: EngineSettings) -> list[tuple[str, str]]:
    """(field, what is wrong) for each invalid setting, in vLLM's own terms."""
    found: list[tuple[str, str]] = []
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "tensor_parallel_size",
                 "num_gpu_blocks_override"):
        value = getattr(s, name)
        if value is not None and value < 1:
            found.append((name, f"must be at least 1, got {value}"))
    if not 0 < s.gpu_memory_utilization <= 1:
        found.append(("gpu_memory_utilization", f"must be in (0, 1], got {s.gpu_memory_utilization}"))
    if s.block_size not in _BLOCK_SIZES:
        found.append(("block_size", f"must be one of {', '.join(map(str, _BLOCK_SIZES))}, got {s.block_size}"))
    if (s.max_num_seqs is not None and s.max_num_batched_tokens is not None
            and s.max_num_batched_tokens < s.max_num_seqs):
        found.append(("max_num_batched_tokens", f"({s.max_num_batched_tokens}) must be >= max_num_seqs "
                                                f"({s.max_num_seqs}), as vLLM requires"))
    if (not s.enable_chunked_prefill and s.max_num_batched_tokens is not None and s.max_model_len is not None
            and s.max_num_batched_tokens < s.max_model_len):
        found.append(("max_num_batched_tokens", f"({s.max_num_batched_tokens}) must be >= max_model_len "
                                                f"({s.max_model_len}) when enable_chunked_prefill is false"))
    if s.kv_cache_dtype.lower() not in _KV_DTYPES:
        found.append(("kv_cache_dtype", f"must be auto or fp8, got {s.kv_cache_dtype!r}"))
    if s.dtype is not None:
        try:
            normalise_dtype(s.dtype)
        except EngineError as exc:
            found.append(("dtype", str(exc)))
    return found


__all__ = ["ENGINE_SETTING_KEYS", "EngineSettings", "settings_problems"]
