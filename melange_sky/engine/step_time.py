"""How long one engine step takes on a GPU: a roofline basis with a few coefficients (llm-d BLIS's "trained physics"
shape, inference-sim/inference-sim sim/latency/trained_physics_model.go), so a new GPU needs only its datasheet.

For a batch of P prefill tokens (chunks) and D decoding requests, per GPU of a TP group:

    T = max(T_gemm, T_weights)          linear layers: compute-bound (prefill) or weight-read-bound (decode)
      + T_attention                      prefill attention FLOPs, quadratic in the chunk's context
      + T_kv                             KV cache reads (decode context, earlier chunks) and writes (new tokens)
      + T_allreduce                      TP: two all-reduces of the hidden state per layer
      + L * (layer_us + 4 small_gemm_us) + B * request_us + step_us      per-layer, per-request, per-step overheads

T_gemm = 2 FLOPs x matmul parameters x tokens (+ the LM head for sampled tokens) / (achievable matmul x gemm_mfu);
T_weights = weight bytes / (achievable bandwidth x weight_bw_eff); T_attention = 4 x heads x head_dim x sum over
chunks of t (c + t/2) / (achievable FlashAttention x attn_mfu) per layer; T_kv = KV bytes touched / (achievable
bandwidth x kv_bw_eff);
T_allreduce = 2 L x the time of one all-reduce of tokens x hidden x 2 bytes: a measured curve of time against message
size where one exists (MI300X: vLLM's custom all-reduce, RCCL above 8 MB), else latency + bytes x 2(tp-1)/tp /
(link bandwidth x link_eff).

The efficiencies are relative to what microbenchmarks measure each GPU reaching (hardware.py: maximum achievable
matmul FLOP/s, triad bandwidth, FlashAttention-2 forward), not to its datasheet: how far a GPU is from its datasheet
is a property of the GPU (an H100 SXM's best BF16 matmul is 80% of its peak, an MI300X's 51%), what is left (the
shapes of a forward pass, the kernels between GEMMs, paging) is a property of the engine and is shared.

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
    """The step-time model's coefficients: efficiencies (0..1) of the GPU's ACHIEVABLE figures (GpuSpec.gemm_tflops,
    achievable_bandwidth_gbs, achievable_attention_tflops: measured microbenchmarks), and overheads (µs)."""

    # Weight reads: decode GEMVs stream the weights at ~93% of triad bandwidth. Until the achievable figures were in
    # the hardware table this was 0.80 of the datasheet, chosen below the 85-90% that copy kernels reach on A100/H100
    # (NVIDIA's nvbandwidth, BabelStream); over the measured NVIDIA triad/datasheet ratio (0.86, hardware.py) that
    # is 0.93. Brackets: BLIS's trained β₃ ≈ 1.4 on H100 (0.71 of datasheet = 0.80 of H100's 2.97 TB/s triad) and a
    # pure copy (1.0).
    weight_bw_eff: float = 0.93
    # Paged-attention KV reads: BLIS's trained decode-memory correction β₂ᵦ ≈ 1.9 on H100 traces -> 1/1.9 of the
    # H100's 3.35 TB/s datasheet = 1.76 TB/s, which is 0.59 of its measured 2.97 TB/s triad.
    kv_bw_eff: float = 0.59
    # Prefill GEMMs and the kernels between them: 0.72 of the maximum achievable matmul rate. cuBLAS BF16 GEMMs at
    # LLM shapes reach 60-70% of dense peak on A100/H100 (NVIDIA's GEMM benchmarks; MLPerf-class inference MFU),
    # formerly taken as 0.6 of the datasheet; over the NVIDIA MAMF/datasheet ratio (0.83, hardware.py) that is 0.72.
    # Large LLM-shaped GEMMs alone reach the best-shape rate (Azure's cuBLASLt 6144x12288x12288 is 99% of 8192^3 on
    # A100); the rest is norms, activations, rotary embeddings and the KV write between them, and chunk edges.
    # Small batches are not charged a ramp: below the roofline's ridge the weight-read term is the step's cost.
    # One efficiency for every generation, checked for Hopper: Vidur's per-operator profiles of Llama-2-7B
    # (microsoft/vidur, data/profiling/compute/{a100,h100}/meta-llama/Llama-2-7b-hf/mlp.csv, 4096 tokens, TP 1)
    # time its four projections at 7.30 ms a layer on A100 and 2.20 ms on H100: 227 TFLOP/s (0.84 of MAMF) and 754
    # (0.95); with the layer's norms, rotary, activation and residual add, 208 (0.77) and 641 (0.81). Hopper's GEMMs
    # reach no smaller share of their ceiling than Ampere's, so no per-generation factor is modelled. A prefill-bound
    # vLLM V1 run on Hopper (vLLM PR #12093: Llama-3.1-8B, 1000 x 2048/128 offline, 16384-token budget, FA3: 14.24
    # req/s; the rate rules out an A100) is predicted at 12.7 req/s, 11% slow, not fast.
    gemm_mfu: float = 0.72
    # Prefill attention: variable-length, paged, causal chunks reach 0.78 of a dense FlashAttention-2 forward
    # benchmark (formerly 0.45 of the A100's peak, set from Dao 2023's 50-73% forward on A100; Azure measures 58%
    # on A100, so 0.45/0.58 = 0.78 of it). On Hopper the benchmark is FlashAttention-3's, the kernel vLLM V1 runs.
    attn_mfu: float = 0.78
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
    # The API server (one Python process in front of the engine: HTTP and request validation, the chat template and
    # tokenization, then detokenizing and streaming each output token), a serial server on one core. Per chat request
    # (the default): BLIS's trained α₀ ≈ 15.6 ms ("QueueingTime": HTTP parsing, request validation, queue insertion)
    # plus α₁ ≈ 0.78 ms ("PostDecodeFixedOverhead": finishing the response), from vLLM H100 serving traces
    # (inference-sim/inference-sim docs/guide/latency-models.md, trained-physics defaults); per output token BLIS's
    # α₂ ≈ 46 µs ("OutputTokenProcessingTime"). GPUStack's bursts of 1000 chat requests of 128/4 tokens (vLLM 0.11)
    # took 22.7 s on an H100: 1000 x 16.4 ms in the API server, the burst then reaching the engine together
    # (engine.py), plus the ~6 s its prefills take there (bench/results/estimate_accuracy.md).
    frontend_request_ms: float = 15.6 + 0.78
    # A plain completions request costs the server less (no chat template, smaller response objects): vLLM PR
    # #12287's frontend-bound V1 run of completions (Llama-3.2-1B, A100) served 63.6 req/s of 202 output tokens,
    # 15.7 ms a request with its tokens, 6.4 ms without them (202 x 46 µs). `for_endpoint("completions")` uses it.
    frontend_completion_request_ms: float = 6.4
    frontend_token_us: float = 46.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def for_endpoint(self, endpoint: str) -> Coefficients:
        """These coefficients for clients of one OpenAI endpoint: "chat" (chat completions, the default costs) or
        "completions" (plain completions: the API server's cheaper per-request cost)."""
        if endpoint == "chat":
            return self
        if endpoint == "completions":
            return replace(self, frontend_request_ms=self.frontend_completion_request_ms)
        raise ValueError(f"unknown endpoint {endpoint!r} (chat or completions)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Coefficients:
        names = {f.name for f in fields(cls)}
        return replace(cls(), **{k: float(v) for k, v in data.items() if k in names})


DEFAULT_COEFFICIENTS = Coefficients()
#: The OpenAI endpoint melange-sky's own load generators send to (`profile` and `replay`: POST /v1/completions,
#: melange_sky/inputs/http.py COMPLETIONS_PATH): what table mode (which answers `profile`'s question) and the simulator
#: (which `replay` checks) charge the API server per request, so that an estimate and a profile of one server agree.
CLIENT_ENDPOINT = "completions"
_GEMMS_PER_LAYER = 4  # QKV, attention output, gate/up, down projections (vLLM fuses QKV and gate/up)

# One all-reduce of a message of B bytes (the hidden state of a step's tokens, 16-bit) as measured, where a kernel
# benchmark of the all-reduce vLLM runs exists: (bytes, µs) points, linear between them and past the last two. A
# decode step's all-reduce is 16 KB (one token of an 8192-wide model) to a few MB: there the time is neither the
# small-message latency nor bytes over the link's bandwidth (the model's form for the other links), but a curve.
# MI300X (Infinity Fabric, a full mesh of 7 links of 64 GB/s one way per GPU): vLLM's custom all-reduce, the
# "baseline" column of vLLM PR #19744's kernel table (ROCm quick all-reduce, June 2025; TP 4): 7.18 µs at 2 KB, 7.26
# at 16 KB, 7.58 at 32 KB, 14.39 at 256 KB, 14.65 at 512 KB, 22.91 at 1 MB, 36.64 at 2 MB, 63.86 at 4 MB, 118.31 at
# 8 MB, 230.48 at 16 MB; TP 2: the "vllm cr" column of ROCm/aiter PR #801 (7.53 µs at 16 KB, 8.70 at 128 KB, 11.45
# at 256 KB, 17.13 at 512 KB, 28.15 at 1 MB, 49.67 at 2 MB, 93.79 at 4 MB, 181.43 at 8 MB, 355.91 at 16 MB). TP 8:
# no custom all-reduce table was found, TP 4's is used up to 8 MB (vLLM's custom all-reduce takes messages up to
# 8 MB, vllm/distributed/device_communicators/custom_all_reduce.py max_size; vLLM PR #39080's TP 8 table on the newer
# MI355X, 6.3 µs at 24 KB, 16.0 at 768 KB, 24.2 at 1.5 MB, is of the same size); above it RCCL runs, and its time is
# bytes x 2 (n - 1) / n over RCCL's bus bandwidth measured on 8 MI300X (Azure AI-benchmarking-guide,
# Azure_Results/ND_MI300X_v5_results.md, RCCL AllReduce: 171.46 GB/s at 16 MB, 230.35 at 32 MB, 266.34 at 64 MB,
# 290.81 at 128 MB, 302.80 at 256 MB, 308.89 at 512 MB, 313.92 at 1 GB). TP 2 and 4 past 16 MB: their last segment.
_KB, _MB = 1024, 1024 * 1024
_RCCL_8 = tuple((mb * _MB, mb * _MB * 1.75 / (gbs * 1e3)) for mb, gbs in (
    (16, 171.46), (32, 230.35), (64, 266.34), (128, 290.81), (256, 302.80), (512, 308.89), (1024, 313.92)))
_CUSTOM_4 = ((2 * _KB, 7.18), (16 * _KB, 7.26), (32 * _KB, 7.58), (256 * _KB, 14.39), (512 * _KB, 14.65),
             (_MB, 22.91), (2 * _MB, 36.64), (4 * _MB, 63.86), (8 * _MB, 118.31))
_ALLREDUCE_US: dict[tuple[str, int], tuple[tuple[int, float], ...]] = {
    ("infinity-fabric", 2): ((16 * _KB, 7.53), (128 * _KB, 8.70), (256 * _KB, 11.45), (512 * _KB, 17.13),
                             (_MB, 28.15), (2 * _MB, 49.67), (4 * _MB, 93.79), (8 * _MB, 181.43),
                             (16 * _MB, 355.91)),
    ("infinity-fabric", 4): _CUSTOM_4 + ((16 * _MB, 230.48),),
    ("infinity-fabric", 8): _CUSTOM_4 + _RCCL_8,
}


def _allreduce_table(link: str, tp: int) -> tuple[tuple[int, float], ...] | None:
    """The measured all-reduce curve for this link at the largest measured TP size <= tp, or None."""
    sizes = [n for (name, n) in _ALLREDUCE_US if name == link and n <= tp]
    return _ALLREDUCE_US[(link, max(sizes))] if sizes else None


def _interpolate(table: tuple[tuple[int, float], ...], x: float) -> float:
    """Piecewise-linear through the table's points, flat below the first, extended along the last segment."""
    if x <= table[0][0]:
        return table[0][1]
    for (x0, y0), (x1, y1) in zip(table, table[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = table[-2], table[-1]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


class StepCost:
    """The step-time model for one (model, GPU, TP, dtype): constants precomputed, `seconds()` is a few flops."""

    def __init__(self, model: ModelSpec, gpu: GpuSpec, tp: int = 1, dtype: str = "bf16", kv_dtype_bytes: int = 2,
                 coefficients: Coefficients = DEFAULT_COEFFICIENTS):
        self.model, self.gpu, self.tp, self.dtype = model, gpu, tp, normalise_dtype(dtype)
        self.kv_dtype_bytes, self.coefficients = kv_dtype_bytes, coefficients
        c, m, g = coefficients, model, gpu
        fp8 = g.fp8_gemm_tflops if self.dtype == "fp8" else None
        peak = (fp8 or g.gemm_tflops) * 1e12  # FP8 weights without FP8 tensor cores run as W8A16: BF16 math
        bw = g.achievable_bandwidth_gbs * 1e9
        # seconds per token through the linear layers, and per sampled token through the LM head
        self._gemm_s_per_token = 2 * m.matmul_params / tp / (peak * c.gemm_mfu)
        self._head_s_per_token = 2 * m.hidden_size * m.vocab_size / tp / (peak * c.gemm_mfu)
        self._weights_s = m.weight_bytes(self.dtype) / tp / (bw * c.weight_bw_eff)
        # attention FLOPs per unit of t (c + t/2), all layers, this GPU's heads (always 16-bit)
        heads = max(1, m.num_heads // tp)
        attention = g.achievable_attention_tflops * 1e12
        self._attn_s_per_unit = 4 * heads * m.head_dim * m.num_layers / (attention * c.attn_mfu)
        self._kv_s_per_token = m.kv_bytes_per_token(tp, kv_dtype_bytes) / (bw * c.kv_bw_eff)
        self._ar_fixed_s = self._ar_s_per_token = 0.0
        self._ar_table: tuple[tuple[int, float], ...] | None = None
        if tp > 1:
            self._ar_table = _allreduce_table(g.link, tp)
            if self._ar_table is None:
                latency = c.allreduce_nvlink_us if g.link == "nvlink" else c.allreduce_pcie_us
                link = g.link_gbs * c.link_eff
                per_token = m.hidden_size * 2 * 2 * (tp - 1) / tp / (link * 1e9)
                self._ar_fixed_s = 2 * m.num_layers * latency * 1e-6
                self._ar_s_per_token = 2 * m.num_layers * per_token
            self._ar_bytes_per_token = m.hidden_size * 2  # the hidden state of one token, 16-bit activations
            self._ar_calls = 2 * m.num_layers
        # the linear layers' kernels per layer (QKV, output, gate/up, down projections), each paying the GPU's
        # small-GEMM time (hardware.py) on top of the per-layer overhead
        self._fixed_s = (m.num_layers * (c.layer_us + _GEMMS_PER_LAYER * g.small_gemm_us) + c.step_us) * 1e-6
        self._request_s = c.request_us * 1e-6

    def decode_line(self, decodes: int) -> tuple[float, float]:
        """(a, b): a pure-decode step of `decodes` requests attending to `context` tokens in all takes
        a + b x context seconds (what lets the estimator jump over many decode steps at once)."""
        if decodes <= 0:
            return 0.0, 0.0
        a = self.seconds(decodes=decodes, sampled=decodes, requests=decodes)
        return a, self._kv_s_per_token

    def allreduce_seconds(self, tokens: int) -> float:
        """The tensor-parallel all-reduces of a step of `tokens` tokens (two per layer; 0 without TP)."""
        if self._ar_table is None:
            return self._ar_fixed_s + tokens * self._ar_s_per_token if tokens > 0 else 0.0
        return self._ar_calls * _interpolate(self._ar_table, tokens * self._ar_bytes_per_token) * 1e-6

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
        allreduce = self.allreduce_seconds(tokens)
        overhead = self._fixed_s + requests * self._request_s
        return linear + attention + kv + allreduce + overhead


__all__ = ["CLIENT_ENDPOINT", "DEFAULT_COEFFICIENTS", "Coefficients", "StepCost"]
