"""How long one engine step takes on a GPU: a roofline basis with a few coefficients (llm-d BLIS's "trained physics"
shape, inference-sim/inference-sim sim/latency/trained_physics_model.go), so a new GPU needs only its datasheet.

For a batch of P prefill tokens (chunks) and D decoding requests, per GPU of a TP group:

    T = max(T_gemm, T_weights)          linear layers: compute-bound (prefill) or weight-read-bound (decode)
      + T_attention                      prefill attention FLOPs, quadratic in the chunk's context
      + T_kv                             KV cache reads (decode context, earlier chunks) and writes (new tokens)
      + T_allreduce                      TP: two all-reduces of the hidden state per layer
      + L * layer_us + B * request_us + step_us      per-layer, per-request and per-step overheads

T_gemm = 2 FLOPs x matmul parameters x tokens (+ the LM head for sampled tokens) / (peak x gemm_mfu);
T_weights = weight bytes / (bandwidth x weight_bw_eff); T_attention = 4 x heads x head_dim x sum over chunks of
t (c + t/2) / (peak x attn_mfu) per layer; T_kv = KV bytes touched / (bandwidth x kv_bw_eff);
T_allreduce = 2 L (latency + tokens x hidden x 2 bytes x 2(tp-1)/tp / (link bandwidth x link_eff)).

BLIS adds its compute and memory terms; taking the max of GEMM compute and weight reads is the roofline itself (a
GEMM streams its weights once however many tokens it multiplies), so the coefficients keep their physical meaning
(an efficiency) instead of absorbing the overlap. Every coefficient below is a physical efficiency or overhead with
its source; none was fitted to the benchmark points the accuracy bench reports. `--calibrate` refits a GPU's
coefficients on one real profile (engine/calibrate.py) and later runs use that fit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from melange_sky.engine.hardware import GpuSpec
from melange_sky.engine.models import ModelSpec, normalise_dtype


@dataclass(frozen=True)
class Coefficients:
    """The step-time model's coefficients: efficiencies (0..1) of the datasheet peaks, and overheads (µs)."""

    # Weight reads reach ~80% of datasheet DRAM bandwidth: copy kernels reach 85-90% on A100/H100 (NVIDIA's
    # nvbandwidth, BabelStream results), skinny decode GEMMs less; BLIS's trained β₃ ≈ 1.4 on H100 (71%) brackets it.
    weight_bw_eff: float = 0.80
    # Paged-attention KV reads: BLIS's trained decode-memory correction β₂ᵦ ≈ 1.9 on H100 traces -> 1/1.9 ≈ 0.53.
    kv_bw_eff: float = 0.53
    # Prefill GEMMs: cuBLAS BF16 GEMMs at LLM shapes reach 60-70% of dense peak (NVIDIA's H100/A100 GEMM
    # benchmarks; MLPerf-class inference MFU); 0.6 for the realistic lower end.
    gemm_mfu: float = 0.60
    # Prefill attention: FlashAttention-2 reaches 50-73% of peak forward on A100 (Dao 2023, "FlashAttention-2"),
    # causal, variable-length and paged batches less: 0.45.
    attn_mfu: float = 0.45
    # All-reduce: NCCL / vLLM custom all-reduce reach ~70% of one-way link bandwidth on large messages
    # (nccl-tests bus bandwidth on NVLink/PCIe systems).
    link_eff: float = 0.70
    # Latency of one all-reduce of a small message: vLLM's custom all-reduce on NVLink ~5-10 µs (vLLM PR #2192);
    # NCCL over PCIe ~20-30 µs (nccl-tests small-message latency). Keyed by GpuSpec.link.
    allreduce_nvlink_us: float = 8.0
    allreduce_pcie_us: float = 25.0
    # Overheads from BLIS's trained-physics defaults (trained on vLLM H100 step traces): β₅ per layer ≈ 32 µs,
    # β₆ per request in the batch ≈ 4 µs, β₇ per step ≈ 126 µs.
    layer_us: float = 32.0
    request_us: float = 4.0
    step_us: float = 126.0
    # The API server (one Python process in front of the engine: request parsing and tokenization, then
    # detokenizing and streaming each output token), a serial server: BLIS's trained α₂ ≈ 46 µs per output token
    # ("OutputTokenProcessingTime"); per request, what is left of the 15.7 ms per request of vLLM PR #12287's
    # frontend-bound V1 run (Llama-3.2-1B on an A100, 63.6 req/s of 202 output tokens, before its optimisations)
    # after 202 x 46 µs: 6.4 ms.
    frontend_request_ms: float = 6.4
    frontend_token_us: float = 46.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Coefficients:
        names = {f.name for f in fields(cls)}
        return replace(cls(), **{k: float(v) for k, v in data.items() if k in names})


DEFAULT_COEFFICIENTS = Coefficients()


class StepCost:
    """The step-time model for one (model, GPU, TP, dtype): constants precomputed, `seconds()` is a few flops."""

    def __init__(self, model: ModelSpec, gpu: GpuSpec, tp: int = 1, dtype: str = "bf16", kv_dtype_bytes: int = 2,
                 coefficients: Coefficients = DEFAULT_COEFFICIENTS):
        self.model, self.gpu, self.tp, self.dtype = model, gpu, tp, normalise_dtype(dtype)
        self.kv_dtype_bytes, self.coefficients = kv_dtype_bytes, coefficients
        c, m, g = coefficients, model, gpu
        peak = (g.fp8_tflops if self.dtype == "fp8" and g.fp8_tflops else g.bf16_tflops) * 1e12
        bw = g.bandwidth_gbs * 1e9
        # seconds per token through the linear layers, and per sampled token through the LM head
        self._gemm_s_per_token = 2 * m.matmul_params / tp / (peak * c.gemm_mfu)
        self._head_s_per_token = 2 * m.hidden_size * m.vocab_size / tp / (peak * c.gemm_mfu)
        self._weights_s = m.weight_bytes(self.dtype) / tp / (bw * c.weight_bw_eff)
        # attention FLOPs per unit of t (c + t/2), all layers, this GPU's heads (always 16-bit: BF16 peak)
        heads = max(1, m.num_heads // tp)
        self._attn_s_per_unit = 4 * heads * m.head_dim * m.num_layers / (g.bf16_tflops * 1e12 * c.attn_mfu)
        self._kv_s_per_token = m.kv_bytes_per_token(tp, kv_dtype_bytes) / (bw * c.kv_bw_eff)
        self._ar_fixed_s = self._ar_s_per_token = 0.0
        if tp > 1:
            latency = c.allreduce_nvlink_us if g.link in ("nvlink", "infinity-fabric") else c.allreduce_pcie_us
            per_token = m.hidden_size * 2 * 2 * (tp - 1) / tp / (g.link_gbs * 1e9 * c.link_eff)
            self._ar_fixed_s = 2 * m.num_layers * latency * 1e-6
            self._ar_s_per_token = 2 * m.num_layers * per_token
        self._fixed_s = (m.num_layers * c.layer_us + c.step_us) * 1e-6
        self._request_s = c.request_us * 1e-6

    def decode_line(self, decodes: int) -> tuple[float, float]:
        """(a, b): a pure-decode step of `decodes` requests attending to `context` tokens in all takes
        a + b x context seconds (what lets the estimator jump over many decode steps at once)."""
        if decodes <= 0:
            return 0.0, 0.0
        a = self.seconds(decodes=decodes, sampled=decodes, requests=decodes)
        return a, self._kv_s_per_token

    def seconds(self, *, prefill_tokens: int = 0, prefill_attention: float = 0.0, prefill_context: int = 0,
                decodes: int = 0, decode_context: int = 0, sampled: int = 0, requests: int = 0) -> float:
        """One step's time. `prefill_attention` = sum of t (c + t/2) over the chunks (t tokens after c cached);
        `prefill_context` = sum of c (KV the chunks read); `decode_context` = sum of the tokens each decode attends
        to; `sampled` = tokens through the LM head; `requests` = requests in the batch."""
        tokens = prefill_tokens + decodes
        if tokens <= 0:
            return 0.0
        gemm = tokens * self._gemm_s_per_token + sampled * self._head_s_per_token
        linear = gemm if gemm > self._weights_s else self._weights_s
        attention = prefill_attention * self._attn_s_per_unit
        kv = (decode_context + prefill_context + prefill_tokens) * self._kv_s_per_token
        allreduce = self._ar_fixed_s + tokens * self._ar_s_per_token
        overhead = self._fixed_s + requests * self._request_s
        return linear + attention + kv + allreduce + overhead


__all__ = ["DEFAULT_COEFFICIENTS", "Coefficients", "StepCost"]
