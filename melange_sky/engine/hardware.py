"""What a GPU can do: its datasheet (memory, memory bandwidth, dense tensor-core TFLOPs, the link TP uses) and what
microbenchmarks measure it actually reaching (matmul TFLOP/s, copy/triad bandwidth, FlashAttention forward TFLOP/s).

The step-time model's efficiencies are relative to the ACHIEVABLE figures, not the datasheet: how far a GPU is from its
datasheet differs by architecture (power and clock limits: an H100 SXM's best matmul is 80% of its 989 TFLOP/s, an
MI300X's 51% of 1,307; HBM triad is 77% of datasheet on MI300X, 89% on H100), so one efficiency of the datasheet for
every GPU flatters the GPUs furthest from theirs. Where no measurement was found, the achievable figure is the
datasheet times a documented default ratio (the mean of the measured NVIDIA rows).

Every figure carries its source. Peak FLOPs are the DENSE figures (datasheets also print a 2x "with sparsity" number
that no LLM kernel reaches). Names are the catalog's (SkyPilot's) spellings, so `--gpu a100_80gb` and a config's
`"A100-80GB"` find the same row; "H100" is the SXM part clouds rent, "H100-PCIE" the PCIe card.

A new GPU is a new row: the step-time model (step_time.py) needs nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

from melange_sky.core.gpus import canonical_gpu, did_you_mean, gpu_key
from melange_sky.engine.errors import EngineError
from melange_sky.errors import CatalogError

MIB = 1024 ** 2


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's datasheet figures (per GPU, not per board)."""

    name: str  # the catalog's spelling
    memory_gb: float  # datasheet capacity, GB (what messages print)
    memory_bytes: int  # the total CUDA reports (nvidia-smi memory.total), what gpu_memory_utilization applies to
    bandwidth_gbs: float  # peak DRAM bandwidth, GB/s
    bf16_tflops: float  # dense FP16/BF16 tensor-core peak, TFLOP/s
    fp8_tflops: float | None  # dense FP8 tensor-core peak; None where the GPU has no FP8 tensor cores
    link: str  # what a tensor-parallel all-reduce runs over: "nvlink", "pcie", "infinity-fabric"
    link_gbs: float  # that link's bandwidth per GPU, one direction, GB/s
    bf16: bool = True  # has BF16 (Turing and Volta run FP16 instead; same peak for the model)
    # Measured (microbenchmark) figures; None: not measured, the datasheet x the default ratio below is used.
    mamf_tflops: float | None = None  # maximum achievable BF16/FP16 matmul TFLOP/s (best shape)
    fp8_mamf_tflops: float | None = None  # the same for FP8 matmuls
    stream_gbs: float | None = None  # achievable DRAM bandwidth (STREAM/BabelStream triad), GB/s
    attention_tflops: float | None = None  # FlashAttention-2 forward TFLOP/s (long sequence, BF16/FP16)
    # What one decode-sized GEMM kernel takes beyond streaming its weights at the triad rate (µs): kernel start, the
    # split-K reduction and the tail that a GEMM too small to fill the GPU cannot hide. 0 where the per-layer
    # overhead of the step-time model (BLIS's, trained on H100) already holds it.
    small_gemm_us: float = 0.0

    @property
    def gemm_tflops(self) -> float:
        """Achievable dense BF16/FP16 matmul TFLOP/s."""
        return self.mamf_tflops or self.bf16_tflops * DEFAULT_MAMF_RATIO

    @property
    def fp8_gemm_tflops(self) -> float | None:
        """Achievable FP8 matmul TFLOP/s; None without FP8 tensor cores."""
        if self.fp8_tflops is None:
            return None
        return self.fp8_mamf_tflops or self.fp8_tflops * DEFAULT_FP8_MAMF_RATIO

    @property
    def achievable_bandwidth_gbs(self) -> float:
        """Achievable DRAM bandwidth (triad), GB/s."""
        return self.stream_gbs or self.bandwidth_gbs * DEFAULT_STREAM_RATIO

    @property
    def achievable_attention_tflops(self) -> float:
        """What a FlashAttention forward kernel reaches on this GPU, TFLOP/s."""
        return self.attention_tflops or self.bf16_tflops * DEFAULT_ATTENTION_RATIO

    @property
    def has_fp8(self) -> bool:
        """Whether FP8 weights run on FP8 tensor cores (Ada, Hopper, CDNA3); elsewhere vLLM runs FP8 weights as
        weight-only (Marlin W8A16): half the weight bytes, BF16 compute."""
        return self.fp8_tflops is not None


# Sources (vendor datasheets; the dense column):
#  T4      NVIDIA T4 datasheet (nvidia.com/.../tesla-t4/t4-tensor-core-datasheet-951643.pdf): 16 GB GDDR6, 320 GB/s,
#          FP16 mixed precision 65 TFLOPS; no BF16/FP8. PCIe Gen3 x16: 15.75 GB/s per direction.
#  L4      NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4/): 24 GB GDDR6, 300 GB/s, BF16 242 TFLOPS* and FP8
#          485 TFLOPS* (*with sparsity) -> 121 / 242.5 dense. PCIe Gen4 x16: 31.5 GB/s per direction.
#  A10G    AWS G5 (aws.amazon.com/ec2/instance-types/g5/): 24 GB GDDR6, 600 GB/s. NVIDIA publishes no A10G sheet; the
#          A10G is an A10 die with fewer tensor-core clocks/SMs enabled: ~70 TFLOPS dense BF16 (the figure AWS and
#          cloud GPU comparisons quote; e.g. Modal's and Baseten's GPU guides), against the A10's 125.
#  A10     NVIDIA A10 datasheet (nvidia.com/en-us/data-center/products/a10-gpu/): 24 GB GDDR6, 600 GB/s, BF16 125
#          TFLOPS dense (250 sparse). PCIe Gen4 x16.
#  L40S    NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s/): 48 GB GDDR6, 864 GB/s, BF16 362.05 dense (733
#          sparse), FP8 733 dense (1,466 sparse). PCIe Gen4 x16.
#  V100    NVIDIA V100 datasheet (images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-
#          1165301-r5.pdf), SXM2: 16/32 GB HBM2, 900 GB/s, tensor 125 TFLOPS (FP16); NVLink 300 GB/s total
#          (6 links x 25 GB/s x 2 directions -> 150 GB/s one way).
#  A100    NVIDIA A100 datasheet (nvidia.com/.../a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), SXM:
#          40 GB HBM2 1,555 GB/s; 80 GB HBM2e 2,039 GB/s; BF16 312 dense (624 sparse); NVLink 600 GB/s (300 one way).
#  H100    NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100/), SXM: 80 GB HBM3, 3.35 TB/s, BF16 989 dense
#          (1,979 sparse), FP8 1,979 dense; NVLink 900 GB/s (450 one way). PCIe: 80 GB HBM2e, 2.0 TB/s, BF16 756
#          dense, FP8 1,513 dense; PCIe Gen5 x16: 63 GB/s one way.
#  H200    NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200/), SXM: 141 GB HBM3e, 4.8 TB/s, same Hopper
#          compute as the H100 SXM (BF16 989, FP8 1,979 dense); NVLink 900 GB/s.
#  A6000   NVIDIA RTX A6000 datasheet (nvidia.com/content/dam/en-zz/Solutions/design-visualization/quadro-product-
#          literature/proviz-print-nvidia-rtx-a6000-datasheet-us-nvidia-1454980-r9-web.pdf): 48 GB GDDR6 with ECC,
#          768 GB/s, tensor performance 309.7 TFLOPS with sparsity -> 154.8 dense FP16/BF16 (GA102, third-generation
#          tensor cores: no FP8). PCIe Gen4 x16 (its NVLink bridge joins 2 cards at 112.5 GB/s both ways; clouds rent
#          it on PCIe).
#  L40     NVIDIA L40 datasheet (nvidia.com/en-us/data-center/l40/): 48 GB GDDR6 with ECC, 864 GB/s, BF16/FP16 181.05
#          dense (362.1 sparse), FP8 362 dense (724 sparse); PCIe Gen4 x16, no NVLink. The L40S's memory and die with
#          half its tensor rate.
#  GH200   NVIDIA GH200 Grace Hopper Superchip datasheet (nvidia.com/en-us/data-center/grace-hopper-superchip/): a
#          Hopper GPU (the H100's: FP16/BF16 tensor 1,979 and FP8 3,958 TFLOPS with sparsity -> 989 / 1,979 dense)
#          with 96 GB HBM3 at 4 TB/s (the GH200 480GB clouds rent, e.g. Lambda's 1x GH200) or 144 GB HBM3e at
#          4.9 TB/s; NVLink-C2C 900 GB/s to the Grace CPU; GPU to GPU over NVLink (900 GB/s, 450 one way) only
#          inside an NVLink Switch system (NVL32), else over the network. This row is the 96 GB HBM3 part.
#  B200    NVIDIA HGX B200 datasheet (nvidia.com/en-us/data-center/hgx/, 8 GPUs, figures with sparsity): 1.44 TB
#          HBM3e (180 GB per GPU), 64 TB/s (8 TB/s per GPU), FP16/BF16 36 PFLOPS (4.5 per GPU -> 2,250 dense),
#          FP8 72 PFLOPS (9 per GPU -> 4,500 dense), fifth-generation NVLink 1.8 TB/s per GPU (900 one way).
#          Sourced: those datasheet figures and its memory.total. Not sourced: anything measured (matmul, triad,
#          attention): the default ratios below, fitted on Ampere and Hopper, stand in, so a B200 estimate is a
#          datasheet estimate until calibrated (`estimate --calibrate`).
#  MI300X  AMD Instinct MI300X data sheet (amd.com/.../instinct-mi300x-data-sheet.pdf): 192 GB HBM3, 5.3 TB/s, FP16/BF16
#          1,307.4 TFLOPS dense, FP8 2,614.9 dense; Infinity Fabric 7 links x 64 GB/s one way = 448 GB/s.
#
# Achievable figures (measured; the ratio to the datasheet in brackets):
#  MAMF = "Maximum Achievable Matmul FLOPS", BF16 torch.matmul at the best of a brute-force search of shapes, mean of
#          100 iterations (Stas Bekman, ml-engineering, compute/accelerator/README.md, "Maximum Achievable Matmul FLOPS
#          comparison table", 2025): A100 SXM 271.2 (86.9%), A100 PCIe 252.9 (81.1%), H100 SXM 794.5 (80.3%; "H200 is
#          the same"), MI300X 668.4 (51.4%, ROCm 6.3, PYTORCH_TUNABLEOP_ENABLED=1; the table's earlier ROCm 6.2 row was
#          781.9). FP8: H100 SXM 1,402.6 (70.9%), H200 SXM 1,453.4 (73.4%).
#  Azure AI-benchmarking-guide (github.com/Azure/AI-benchmarking-guide, Azure_Results/*_results.md; mirrored at
#          samuel-bohman/AI-benchmarking-guide): HBM triad ND A100 v4 (A100-SXM4-80GB) 1.70 TB/s (83%), ND H100 v5
#          2.97 TB/s (89%), ND H200 v5 4.15 TB/s (86%), ND MI300X v5 4.09 TB/s (77%); FlashAttention-2 forward (batch
#          2, sequence 8192) A100 179.5 TFLOP/s (hdim 64, 58%), H100 327.9 (hdim 128, 33%), H200 329.3 (33%), MI300X
#          328.6 (hdim 64, 25%); hipBLASLt FP8 on MI300X 1,159 TFLOP/s at 8192^3 (44%) (no FP8 MAMF row for MI300X).
#  Attention on Hopper: vLLM V1 runs FlashAttention-3 there (vllm/attention/utils/fa_utils.py get_flash_attn_version:
#          version 3 when the compute capability's major is 9 and vllm-flash-attn has FA3; since vLLM PR #12093,
#          January 2025, vLLM 0.7), not FA2: FA3 forward, FP16, hdim 128, sequence 8192 reaches 661 TFLOP/s on H100
#          SXM (Shah et al. 2024, "FlashAttention-3", Table 2; 740 at best, 75%), against FA2's 328 on the same setup
#          (33%). H100/H200 rows carry 661; the H100 PCIe its 67% share of its own 756. Older vLLM ran FA2 on Hopper;
#          with prompts of 2-4k tokens attention is 3-6% of a prefill's FLOPs, so that choice moves a run a few %.
#  A100 40 GB: the MAMF row is the A100 SXM die (same clocks either memory size); its triad is taken at the 80 GB
#          part's measured 83% of datasheet.
#  Small GEMMs on MI300X: ROCm/aiter PR #1092 ("[MI300X] tune Gemm performance for llama 70b/405b", Sept 2025) times
#          Llama-3.1-70B's TP 8 QKV projection in FP8 (m x n x k = 1..64 x 1280 x 8192, 10.5 MB of weights): 10.7 µs
#          with tuned CK kernels (17.6 µs untuned) where the triad rate streams 10.5 MB in 2.6 µs: 8.1 µs more per GEMM
#          (the tuned figure, the smaller one). No such table was found for NVIDIA GPUs; there the per-layer overhead
#          BLIS trained on H100 step traces holds what their small GEMMs cost.
#  GH200: its GPU is the H100 SXM's die at the same clocks, so it carries the H100 SXM's measured matmul figures
#          and FlashAttention-3's Hopper figure; its HBM3 triad is not measured (the default ratio).
#  Not measured (T4, L4, A10G, A10, A6000, L40, L40S, V100, B200, H100 PCIe's matmul and triad): datasheet x the
#          default ratios below.
#: Default achievable/datasheet ratios where no measurement exists: the mean of the measured NVIDIA rows above
#: (MAMF: A100 SXM 0.869, A100 PCIe 0.811, H100 SXM 0.803 -> 0.83; FP8: H100 0.709, H200 0.734 -> 0.72; triad:
#: A100 0.83, H100 0.89, H200 0.86 -> 0.86; FlashAttention-2 forward: the A100's 0.58 for the pre-Hopper GPUs,
#: the Hopper rows carry FlashAttention-3's figure).
DEFAULT_MAMF_RATIO = 0.83
DEFAULT_FP8_MAMF_RATIO = 0.72
DEFAULT_STREAM_RATIO = 0.86
DEFAULT_ATTENTION_RATIO = 0.58
# memory_bytes: nvidia-smi's memory.total (MiB) on cloud instances with ECC on (the total torch.cuda.mem_get_info
# reports, which is what vLLM multiplies by gpu_memory_utilization); MI300X: rocm-smi's 192 GiB. The rows added later
# quote nvidia-smi as published in users' run logs: "NVIDIA RTX A6000, 49140 MiB", "NVIDIA L40, 46068 MiB",
# "NVIDIA GH200 480GB, 97871 MiB", "NVIDIA B200, 183359 MiB".
_TABLE: tuple[GpuSpec, ...] = (
    GpuSpec("T4", 16, 15360 * MIB, 320, 65, None, "pcie", 15.75, bf16=False),
    GpuSpec("L4", 24, 23034 * MIB, 300, 121, 242.5, "pcie", 31.5),
    GpuSpec("A10G", 24, 23028 * MIB, 600, 70, None, "pcie", 31.5),
    GpuSpec("A10", 24, 23028 * MIB, 600, 125, None, "pcie", 31.5),
    GpuSpec("L40S", 48, 46068 * MIB, 864, 362.05, 733, "pcie", 31.5),
    GpuSpec("L40", 48, 46068 * MIB, 864, 181.05, 362, "pcie", 31.5),
    GpuSpec("A6000", 48, 49140 * MIB, 768, 154.8, None, "pcie", 31.5),
    GpuSpec("V100", 16, 16160 * MIB, 900, 125, None, "nvlink", 150, bf16=False),
    GpuSpec("V100-32GB", 32, 32510 * MIB, 900, 125, None, "nvlink", 150, bf16=False),
    GpuSpec("A100", 40, 40960 * MIB, 1555, 312, None, "nvlink", 300, mamf_tflops=271.2, stream_gbs=1555 * 0.83,
            attention_tflops=179.5),
    GpuSpec("A100-80GB", 80, 81920 * MIB, 2039, 312, None, "nvlink", 300, mamf_tflops=271.2, stream_gbs=1700,
            attention_tflops=179.5),
    GpuSpec("H100", 80, 81559 * MIB, 3350, 989, 1979, "nvlink", 450, mamf_tflops=794.5, fp8_mamf_tflops=1402.6,
            stream_gbs=2970, attention_tflops=661),
    GpuSpec("H100-PCIE", 80, 81559 * MIB, 2000, 756, 1513, "pcie", 63, attention_tflops=756 * 661 / 989),
    GpuSpec("H200", 141, 143771 * MIB, 4800, 989, 1979, "nvlink", 450, mamf_tflops=794.5, fp8_mamf_tflops=1453.4,
            stream_gbs=4150, attention_tflops=661),
    GpuSpec("GH200", 96, 97871 * MIB, 4000, 989, 1979, "nvlink", 450, mamf_tflops=794.5, fp8_mamf_tflops=1402.6,
            attention_tflops=661),
    GpuSpec("B200", 180, 183359 * MIB, 8000, 2250, 4500, "nvlink", 900),
    GpuSpec("MI300X", 192, 192 * 1024 * MIB, 5300, 1307.4, 2614.9, "infinity-fabric", 448, mamf_tflops=668.4,
            fp8_mamf_tflops=1159, stream_gbs=4090, attention_tflops=328.6, small_gemm_us=10.7 - 2.6),
)
_BY_NAME = {g.name: g for g in _TABLE}
#: The GPU types the engine model knows, in the catalog's spelling.
GPU_NAMES: tuple[str, ...] = tuple(g.name for g in _TABLE)
# Spellings that core.gpus folds into one catalog name but whose datasheets differ.
_OWN_KEYS = {"H100PCIE": "H100-PCIE", "H100PCIE80GB": "H100-PCIE", "H100SXM": "H100", "H100SXM5": "H100",
             "A10040GB": "A100", "A100SXM": "A100", "A100SXM80GB": "A100-80GB", "V10016GB": "V100",
             "MI300X": "MI300X", "MI300": "MI300X", "H200SXM": "H200", "H200141GB": "H200",
             "RTXA6000": "A6000", "GH200480GB": "GH200", "B200SXM": "B200"}


def gpu_spec(name: str | GpuSpec) -> GpuSpec:
    """The datasheet row for `name`, however it is spelled ("a100_80gb", "NVIDIA H100 SXM"); EngineError if the
    engine model has no datasheet for it."""
    if isinstance(name, GpuSpec):
        return name
    key = gpu_key(name)
    own = _OWN_KEYS.get(key) or {gpu_key(g): g for g in GPU_NAMES}.get(key)
    if own is not None:
        return _BY_NAME[own]
    try:
        canonical = canonical_gpu(name)
    except CatalogError:
        canonical = None
    if canonical in _BY_NAME:
        return _BY_NAME[canonical]
    raise EngineError(f"no datasheet for GPU {name!r}{did_you_mean(name, list(GPU_NAMES))} (the engine model knows "
                      f"{', '.join(GPU_NAMES)})")


__all__ = ["GPU_NAMES", "GpuSpec", "gpu_spec"]
