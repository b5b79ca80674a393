"""How many KV cache blocks a GPU holds, as vLLM V1 sizes them at startup.

vLLM (vllm/v1/worker/gpu_worker.py `determine_available_memory`) profiles one forward pass of
`max_num_batched_tokens` dummy tokens and gives the KV cache what is left of `gpu_memory_utilization` x total memory
after the weights, the activation peak of that pass, and the memory allocated outside torch (NCCL, cuBLAS
workspaces). The cache is then cut into blocks of `block_size` tokens (vllm/v1/core/kv_cache_utils.py): a block holds
K and V of every layer, so its bytes per GPU are 2 x layers x KV heads per GPU x head_dim x block_size x bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from melange_sky.engine.errors import DoesNotFit
from melange_sky.engine.hardware import GpuSpec
from melange_sky.engine.models import ModelSpec
from melange_sky.engine.settings import GIB, EngineSettings

# Memory allocated outside torch during vLLM's profiling (cuBLAS/cuDNN workspaces, CUDA graphs pool bookkeeping):
# vLLM's startup log line "non_torch_memory=..." reads ~0.1-0.3 GiB on one GPU; with TP, NCCL's buffers add ~0.5 GiB.
NON_TORCH_BYTES_TP1 = int(0.25 * GIB)
NON_TORCH_BYTES_TP = int(0.75 * GIB)


@dataclass(frozen=True)
class MemoryPlan:
    """How one GPU's memory is split (bytes per GPU) and how many KV blocks that gives."""

    requested: int  # gpu_memory_utilization x total
    weights: int  # weights / TP
    activation: int  # profiled activation peak
    non_torch: int
    block_bytes: int  # one KV block on one GPU
    blocks: int  # KV cache blocks (each block_size tokens)
    block_size: int

    @property
    def kv_bytes(self) -> int:
        return self.requested - self.weights - self.activation - self.non_torch

    @property
    def kv_tokens(self) -> int:
        return self.blocks * self.block_size


def activation_peak_bytes(model: ModelSpec, tp: int, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """The activation peak of vLLM's profiling pass: per token the QKV output, the gated MLP's gate/up output and
    its activation, the hidden and residual streams, all 16-bit and split over TP; plus the sampler's dummy run on
    max_num_seqs rows of FP32 logits and their probabilities (vllm/v1/worker/gpu_model_runner.py `profile_run`)."""
    per_token = (model.q_dim + 2 * model.kv_dim + 3 * model.intermediate_size) / tp + 4 * model.hidden_size
    logits = max_num_seqs * model.vocab_size * 4 * 2
    return int(max_num_batched_tokens * per_token * 2 + logits)


def memory_plan(model: ModelSpec, gpu: GpuSpec, tp: int, dtype: str, settings: EngineSettings) -> MemoryPlan:
    """The KV cache vLLM would allocate; DoesNotFit (an answer) when the weights leave no room for it."""
    s = settings.resolve(gpu, model)
    weights_total = model.weight_bytes(dtype)
    weights = math.ceil(weights_total / tp)
    requested = int(s.gpu_memory_utilization * gpu.memory_bytes)
    activation = activation_peak_bytes(model, tp, s.max_num_batched_tokens or 0, s.max_num_seqs or 0)
    non_torch = NON_TORCH_BYTES_TP if tp > 1 else NON_TORCH_BYTES_TP1
    kv_elem = s.kv_dtype_bytes or 2
    block_bytes = model.kv_bytes_per_token(tp, kv_elem) * s.block_size
    free = requested - weights - activation - non_torch
    blocks = max(0, free // block_bytes)
    if blocks < 1:
        per_gpu = f" ({weights / 1e9:.0f} GB per GPU at TP {tp})" if tp > 1 else ""
        on = f"{tp} x {gpu.memory_gb:g} GB" if tp > 1 else f"{gpu.memory_gb:g} GB"
        if weights > requested:
            why = ""
        else:
            why = f", no room left for a KV cache at gpu_memory_utilization {s.gpu_memory_utilization:g}"
        raise DoesNotFit(f"does not fit: {weights_total / 1e9:.0f} GB of weights{per_gpu} on {on}{why}",
                         weights_total / 1e9, gpu.memory_gb)
    if s.num_gpu_blocks_override is not None:
        blocks = s.num_gpu_blocks_override  # vLLM's override: the profiled size is replaced as is
    return MemoryPlan(requested, weights, activation, non_torch, block_bytes, int(blocks), s.block_size)


__all__ = ["MemoryPlan", "activation_peak_bytes", "memory_plan"]
