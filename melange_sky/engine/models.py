"""A model's shape from its Hugging Face `config.json`: what the engine model needs to count bytes and FLOPs.

`--model` is a bundled name ("llama-3.1-8b", also the Hugging Face id "meta-llama/Llama-3.1-8B-Instruct"), or a path
to a config.json or to a folder holding one. The bundled files in engine/data/models/ are the Hugging Face configs'
own values (the fields the model reads, plus architecture and dtype).

Parameters are counted from the config, as vLLM loads them: embeddings, per layer the attention projections with
grouped-query K/V (plus Qwen2's QKV biases and Qwen3's per-head Q/K norms), the gated MLP (gate, up, down), two norms,
the final norm, and the LM head unless it is tied to the embeddings. Mixture-of-experts models are refused.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from melange_sky.engine.errors import EngineError

#: Bytes per weight for each `--dtype`.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float8": "fp8", "fp8_e4m3": "fp8",
                  "auto": "bf16", "bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder-only transformer's shape (a Hugging Face config's fields)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    torch_dtype: str = "bfloat16"
    qkv_bias: bool = False  # Qwen2 has biases on Q, K and V
    qk_norm: bool = False  # Qwen3 normalises each head's Q and K

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer block (attention, MLP, norms)."""
        d = self.hidden_size
        attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        mlp = 3 * d * self.intermediate_size
        return attn + bias + qk_norm + mlp + 2 * d

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """All parameters (the "8B" of Llama-3.1-8B)."""
        return self.embedding_params + self.num_layers * self.layer_params + self.hidden_size + self.lm_head_params

    @property
    def matmul_params(self) -> int:
        """Parameters every token multiplies through (the blocks' projections and MLP): 2 FLOPs each per token. The
        LM head is counted apart (only sampled tokens go through it); the embedding is a lookup."""
        return self.num_layers * self.layer_params

    def weight_bytes(self, dtype: str = "bf16") -> int:
        """Bytes of weights as loaded at `dtype` (FP8 checkpoints keep embeddings, norms and the LM head at 16 bit,
        as vLLM's FP8 quantisation does)."""
        dtype = normalise_dtype(dtype)
        wide = self.embedding_params + self.lm_head_params + self.num_layers * 2 * self.hidden_size
        narrow = self.params - wide
        return narrow * DTYPE_BYTES[dtype] + wide * 2

    def kv_bytes_per_token(self, tp: int = 1, kv_dtype_bytes: int = 2) -> int:
        """KV cache bytes one token takes on each GPU (K and V, every layer); K/V heads are split over TP, and
        replicated when there are fewer heads than GPUs (vLLM does the same)."""
        heads = max(1, self.num_kv_heads // tp)
        return 2 * self.num_layers * heads * self.head_dim * kv_dtype_bytes


def normalise_dtype(dtype: str) -> str:
    """"bf16", "fp16" or "fp8" for any usual spelling; EngineError otherwise."""
    found = _DTYPE_ALIASES.get(dtype.strip().lower())
    if found is None:
        raise EngineError(f"unknown --dtype {dtype!r}: use bf16, fp16 or fp8")
    return found


def _bundled_dir() -> Any:
    return resources.files("melange_sky.engine").joinpath("data", "models")


def _bundled_files() -> dict[str, Any]:
    return {entry.name[:-5]: entry for entry in _bundled_dir().iterdir() if entry.name.endswith(".json")}


#: Names of the bundled model configs (`--model llama-3.1-8b`).
BUNDLED_MODELS: tuple[str, ...] = tuple(sorted(_bundled_files()))


def _key(name: str) -> str:
    """A model name reduced to compare: the part after the org, lower case, without chat/instruct suffixes."""
    name = name.strip().rstrip("/").split("/")[-1].lower()
    name = re.sub(r"-(instruct|chat|hf|base)\b", "", name)
    name = re.sub(r"-v0\.\d+$", "", name)
    name = re.sub(r"^meta-llama-", "llama-", name).replace("meta-llama-3", "llama-3")
    return name.replace("_", "-")


def load_model(model: str) -> ModelSpec:
    """The ModelSpec for a bundled name, a Hugging Face id of a bundled model, or a path to a config.json (or a
    folder holding one). EngineError, in one line, for anything else."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise EngineError(f"{model}: no config.json in that folder")
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineError(f"{path}: cannot read the model config: {exc}") from exc
        name = config.get("_name_or_path") if isinstance(config, dict) else None
        return model_from_config(config, name=str(name or path.parent.name or model), source=str(path))
    files = _bundled_files()
    key = _key(model)
    found = files.get(key)
    if found is None:
        aliases = {_key(json.loads(f.read_text()).get("_name_or_path", "")): f for f in files.values()}
        found = aliases.get(key)
    if found is None:
        raise EngineError(f"unknown model {model!r}: bundled models are {', '.join(BUNDLED_MODELS)}; for another "
                          f"model pass the path to its Hugging Face config.json (or a folder holding one)")
    config = json.loads(found.read_text())
    return model_from_config(config, name=found.name[:-5])


class _Fields:
    """Reads a Hugging Face config's fields with one-line errors naming the file and the field: a config with
    `hidden_size: -1` must be refused where it is read, not turn into "-0 GB of weights" further on."""

    def __init__(self, config: dict[str, Any], where: str, nested: frozenset[str] = frozenset()):
        self.config = config
        self.where = where
        self.nested = nested  # keys read from the config's text_config (a multimodal model's language model)

    def fail(self, key: str, message: str) -> EngineError:
        field = f"text_config.{key}" if key in self.nested else key
        return EngineError(f"{self.where}: {field}: {message}")

    def positive_int(self, key: str, default: int | None = None) -> int:
        """A whole number >= 1 (an integral float such as 4096.0 too, as JSON writers sometimes give)."""
        value = self.config.get(key)
        if value is None:
            if default is None:
                raise self.fail(key, "missing: not a decoder-only transformer config the engine model can read")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            raise self.fail(key, f"must be a positive integer, got {json.dumps(value)}")
        if value < 1:
            raise self.fail(key, f"must be a positive integer, got {json.dumps(value)}")
        return int(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {json.dumps(value)}")
        return value

    def string(self, *keys: str, default: str) -> str:
        for key in keys:
            value = self.config.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                raise self.fail(key, f"must be a type name such as \"bfloat16\", got {json.dumps(value)}")
            return value
        return default


def model_from_config(config: dict[str, Any], name: str = "model", source: str | None = None) -> ModelSpec:
    """A ModelSpec from a Hugging Face config dict (multimodal configs: their `text_config`). Every field is checked
    (positive whole numbers, K/V heads dividing the query heads, heads dividing the hidden size when the config
    gives no head_dim): EngineError naming `source` (the file; else `name`) and the field."""
    where = source or name
    if not isinstance(config, dict):
        raise EngineError(f"{where}: a model config must be a JSON object")
    nested: frozenset[str] = frozenset()
    if isinstance(config.get("text_config"), dict):
        nested = frozenset(config["text_config"])
        config = {**config, **config["text_config"]}
    experts = next((config[k] for k in _MOE_KEYS if isinstance(config.get(k), int) and config[k] > 1), None)
    if experts is not None:
        raise EngineError(f"{name} is a mixture-of-experts model ({experts} experts): the engine model supports "
                          f"dense models only")
    fields = _Fields(config, where, nested)
    d = fields.positive_int("hidden_size")
    layers = fields.positive_int("num_hidden_layers")
    heads = fields.positive_int("num_attention_heads")
    kv_heads = fields.positive_int("num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise fields.fail("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}: "
                                                 f"grouped-query attention gives each K/V head a whole number of "
                                                 f"query heads")
    if config.get("head_dim") is None and d % heads:
        raise fields.fail("num_attention_heads", f"{heads} does not divide hidden_size {d}, and the config gives no "
                                                 f"head_dim")
    head_dim = fields.positive_int("head_dim", default=d // heads)
    return ModelSpec(
        name=name,
        hidden_size=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=fields.positive_int("intermediate_size"),
        vocab_size=fields.positive_int("vocab_size"),
        tie_word_embeddings=fields.boolean("tie_word_embeddings", False),
        max_position_embeddings=fields.positive_int("max_position_embeddings", default=4096),
        torch_dtype=fields.string("torch_dtype", "dtype", default="bfloat16"),
        qkv_bias=config.get("model_type") == "qwen2" or fields.boolean("attention_bias", False),
        qk_norm=config.get("model_type") == "qwen3",
    )


__all__ = ["BUNDLED_MODELS", "DTYPE_BYTES", "ModelSpec", "load_model", "model_from_config", "normalise_dtype"]
