"""Solver benchmark for melange-sky: how fast the Mélange integer program is solved on realistic instances.

Run it from anywhere with the package installed (``pip install -e .``):

    python bench/solve_bench.py                 # full run: about 16 minutes on 2 cores
    python bench/solve_bench.py --quick         # smoke run: 3 seeds and short time limits, about 2 minutes
    python bench/solve_bench.py --seeds 20      # more instances (seeds 1..20) in Tables 1 and 2

Markdown goes to stdout and one progress line per solve to stderr, so
``python bench/solve_bench.py > bench.md`` leaves just the report in ``bench.md``. It prints:

* the machine: cores, CPU model, Python and PuLP versions;
* Table 1: the default ``slices`` formulation and ``split`` with the default solver (HiGHS), solved to proven
  optimality under a time limit: median / p90 / max solve seconds, how many proved optimal, how many of the 40
  columns the dominance presolve keeps, then one row per instance;
* Table 2: the same instances with per-offer quotas (``max_count``), which the presolve cannot drop, with CBC and
  HiGHS;
* Table 3: ``slices`` against the paper's literal ``paper`` formulation, with a cost cross-check;
* Table 4: a ``slice_factor`` sweep (1, 2, 4, 8, 16) for ``slices``;
* Table 5: wall time of the ``melange-sky`` CLI run as a subprocess.

Instances are generated deterministically from a seed (``random.Random(seed)``): 60 buckets (10 input-length x 6
output-length buckets) and 40 GPU offers (8 GPU types x 5 clouds, each cloud pricing a type at its list price x a
random factor in [0.8, 1.35]), slice_factor 8. Throughputs come from a roofline model of serving a 13B-parameter
model (prefill bound by FP16 compute, decode by memory bandwidth, batch size by the memory left for the KV cache),
with +-10% profiling noise, and are 0 where a GPU cannot hold a bucket's longest context. The workload is an
Arena-like long tail (share proportional to random x 0.6^i x 0.6^j); the request rate is drawn so that an
all-A100-80GB fleet would need 10-60 GPUs. Solve times are ``SolveResult.solve_seconds``: the solver's wall time
(writing the model, running the solver, reading the solution), without building the PuLP model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pulp

from melange_sky.core.config import Config, Market, SpotPolicy, parse_config
from melange_sky.solver.model import Formulation, SolverOptions, dominated_gpus
from melange_sky.solver.result import solve, solve_fleet

DEFAULT_SOLVER = SolverOptions().name  # what `melange-sky solve` uses

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "example.json"

INPUT_EDGES = (1, 25, 100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000)
OUTPUT_EDGES = (1, 25, 100, 250, 500, 1000, 2000)
CLOUDS = ("aws", "gcp", "azure", "lambda", "runpod")
PRICE_FACTOR = (0.8, 1.35)  # a cloud prices a GPU type at its list price x a factor in this range
TAIL = 0.6  # workload share of bucket (i, j) is proportional to random x TAIL^i x TAIL^j
REFERENCE_GPU = "A100-80GB"
REFERENCE_FLEET = (10, 60)  # the rate is drawn so that an all-REFERENCE_GPU fleet has this many GPUs
QUOTAS_PER_TYPE = 3  # of a GPU type's 5 offers, how many get a max_count in the quota instances (60%)
QUOTA_RANGE = (1, 6)
SLICE_FACTORS = (1, 2, 4, 8, 16)

# The served model: 13B parameters with 8-bit weights and an FP16 KV cache of 800 KiB per token.
PARAMS = 13e9
WEIGHT_BYTES = 13e9
KV_BYTES_PER_TOKEN = 800 * 1024
MAX_BATCH = 64  # concurrent sequences per GPU (the serving engine's max_num_seqs)
MEMORY_UTILISATION = 0.9
COMPUTE_EFFICIENCY = 0.4
BANDWIDTH_EFFICIENCY = 0.7
PROFILING_NOISE = 0.1  # throughput x uniform(1 - noise, 1 + noise) per (GPU type, bucket)


@dataclass(frozen=True)
class GpuType:
    """A GPU's on-demand list price and the hardware figures the throughput model needs."""

    name: str
    price: float  # $/h for one GPU
    memory_gb: float
    tflops: float  # dense FP16 tensor TFLOP/s
    bandwidth_gbs: float  # memory bandwidth, GB/s


GPU_TYPES = (
    GpuType("T4", 0.53, 16, 65, 320),
    GpuType("L4", 0.70, 24, 121, 300),
    GpuType("A10G", 1.01, 24, 125, 600),
    GpuType("L40S", 1.86, 48, 362, 864),
    GpuType("A100-40GB", 2.95, 40, 312, 1555),
    GpuType("A100-80GB", 3.67, 80, 312, 2039),
    GpuType("H100", 7.52, 80, 989, 3350),
    GpuType("H200", 9.50, 141, 989, 4800),
)


# ---- instances --------------------------------------------------------------------------------------------------

def throughput(gpu: GpuType, input_tokens: float, output_tokens: float, longest_context: float) -> float:
    """Max req/s of one GPU on requests of this size; 0 when its KV cache cannot hold `longest_context` tokens."""
    kv_tokens = (gpu.memory_gb * 1e9 * MEMORY_UTILISATION - WEIGHT_BYTES) / KV_BYTES_PER_TOKEN
    if kv_tokens < longest_context:
        return 0.0
    batch = min(MAX_BATCH, kv_tokens / (input_tokens + output_tokens))
    mean_context = input_tokens + output_tokens / 2  # while decoding
    step_seconds = ((WEIGHT_BYTES + batch * mean_context * KV_BYTES_PER_TOKEN)
                    / (gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY))
    decode_tokens_per_second = batch / step_seconds
    prefill_tokens_per_second = gpu.tflops * 1e12 * COMPUTE_EFFICIENCY / (2 * PARAMS)
    return 1.0 / (input_tokens / prefill_tokens_per_second + output_tokens / decode_tokens_per_second)


def throughput_matrix(gpu: GpuType, rng: random.Random) -> list[list[float]]:
    """req/s per (input bucket, output bucket) at the bucket's midpoint lengths, with profiling noise."""
    matrix = []
    for i in range(len(INPUT_EDGES) - 1):
        row = []
        for j in range(len(OUTPUT_EDGES) - 1):
            tput = throughput(gpu, (INPUT_EDGES[i] + INPUT_EDGES[i + 1]) / 2,
                              (OUTPUT_EDGES[j] + OUTPUT_EDGES[j + 1]) / 2, INPUT_EDGES[i + 1] + OUTPUT_EDGES[j + 1])
            row.append(round(tput * rng.uniform(1 - PROFILING_NOISE, 1 + PROFILING_NOISE), 4) if tput else 0.0)
        matrix.append(row)
    return matrix


def make_instance(seed: int, slice_factor: int = 8, quotas: bool = False) -> dict[str, Any]:
    """A config dict in the Mélange JSON format. One seed gives the same workload, throughputs, prices and rate
    whatever `slice_factor` and `quotas` are; `quotas` adds random max_counts on top."""
    rng = random.Random(seed)
    rows, cols = len(INPUT_EDGES) - 1, len(OUTPUT_EDGES) - 1
    weights = [[rng.random() * TAIL ** i * TAIL ** j for j in range(cols)] for i in range(rows)]
    total = sum(map(sum, weights))
    distribution = [[round(w / total, 8) for w in row] for row in weights]
    tputs = {gpu.name: throughput_matrix(gpu, rng) for gpu in GPU_TYPES}
    gpu_info = {f"{gpu.name}@{cloud}": {"cost": round(gpu.price * rng.uniform(*PRICE_FACTOR), 4),
                                        "tputs": tputs[gpu.name]}
                for gpu in GPU_TYPES for cloud in CLOUDS}
    reference_gpus_per_rate = sum(share / tput for shares, tput_row in zip(distribution, tputs[REFERENCE_GPU])
                                  for share, tput in zip(shares, tput_row))
    rate = round(rng.uniform(*REFERENCE_FLEET) / reference_gpus_per_rate, 3)
    if quotas:
        quota_rng = random.Random(f"{seed}-quotas")
        for gpu in GPU_TYPES:  # every type keeps 2 unlimited offers, so every instance stays feasible
            for cloud in quota_rng.sample(CLOUDS, QUOTAS_PER_TYPE):
                gpu_info[f"{gpu.name}@{cloud}"]["max_count"] = quota_rng.randint(*QUOTA_RANGE)
    return {"name": f"bench-{seed}{'-quotas' if quotas else ''}", "workload_distribution": distribution,
            "total_request_rate": rate, "slice_factor": slice_factor, "gpu_info": gpu_info,
            "input_buckets": list(INPUT_EDGES), "output_buckets": list(OUTPUT_EDGES)}


def load_instance(seed: int, slice_factor: int = 8, quotas: bool = False, per_offer: bool = False) -> Config:
    """The instance as a Config. With `per_offer`, the 40 columns are what `--per-offer` makes of 8 GPU entries:
    the 5 offers of a GPU type form one type of the model (`GpuSpec.entry`), spread over its offers by price."""
    data = make_instance(seed, slice_factor, quotas)
    config = parse_config(data, source=data["name"])
    if per_offer:
        config = replace(config, gpus=tuple(replace(g, entry=g.name.split("@")[0]) for g in config.gpus))
    return config


SPOT_DISCOUNT = (0.3, 0.7)  # a spot offer costs its on-demand price x a factor in this range
REGIONS_PER_CLOUD = 2  # each offer is in one of its cloud's regions (drawn), so spot spreads over 10 regions
MARKET_POLICY = SpotPolicy(floor=0.5, max_region_share=0.5)


def load_market_instance(seed: int, slice_factor: int = 8) -> Config:
    """The quota instance (`quotas=True`) with markets, as `--per-offer` binds it under a `spot` block: each of the
    40 offers is an on-demand column and a spot column (spot price = on-demand x a factor in SPOT_DISCOUNT; the
    spot column gets its own quota where the on-demand one has one), in one of its cloud's regions; the reliable
    replicas must carry half of every bucket (floor 0.5) and no region may hold more than half the spot GPUs. 80
    columns, 16 types (8 GPUs x reliable or spot)."""
    config = load_instance(seed, slice_factor, quotas=True, per_offer=True)
    rng = random.Random(f"{seed}-markets")
    columns = []
    for g in config.gpus:
        gpu, cloud = g.name.split("@")
        region = f"r{rng.randrange(REGIONS_PER_CLOUD)}"
        on_demand = replace(g, cloud=cloud, region=region, market=Market.ON_DEMAND)
        spot_cap = None if g.max_count is None else rng.randint(*QUOTA_RANGE)
        spot = replace(on_demand, name=f"{g.name}:spot", cost=round(g.cost * rng.uniform(*SPOT_DISCOUNT), 4),
                       use_spot=True, market=Market.SPOT, max_count=spot_cap)
        columns += [on_demand, spot]
    return replace(config, name=f"bench-{seed}-markets", gpus=tuple(columns), spot=MARKET_POLICY)


def market_cli_config(seed: int) -> dict[str, Any]:
    """The seed's workload and throughputs as a config for `melange-sky solve --per-offer` under the same `spot`
    block: one entry per GPU type (no `@cloud`), so the CLI binds them to its catalog's offers and spot prices (a
    GPU the catalog lacks is solved at its list price, on demand). For timing `solve` end to end."""
    data = make_instance(seed)
    tputs = {name.split("@")[0]: spec["tputs"] for name, spec in data["gpu_info"].items()}
    gpu_info = {gpu.name: {"cost": gpu.price, "tputs": tputs[gpu.name]} for gpu in GPU_TYPES}
    return {**data, "name": f"bench-{seed}-markets-cli", "gpu_info": gpu_info,
            "spot": {"floor": MARKET_POLICY.floor, "max_region_share": MARKET_POLICY.max_region_share}}


# ---- measuring --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One solve of one instance."""

    seed: int
    rate: float
    formulation: str
    solver: str
    status: str
    cost: float
    gpus: int
    seconds: float  # SolveResult.solve_seconds
    kept_columns: int  # offers left after the dominance presolve

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


def run(config: Config, seed: int, formulation: str, solver: str, time_limit: float) -> Run:
    result = solve(config, formulation, SolverOptions(name=solver, time_limit=time_limit), compare=False)
    progress(f"  seed {seed:>3} {formulation:<6} {solver:<5} S={config.slice_factor:<2} {result.status:<8} "
             f"{result.solve_seconds:7.2f} s  ${result.cost:.4f}/h")
    return Run(seed=seed, rate=config.total_request_rate, formulation=formulation, solver=solver,
               status=result.status, cost=result.cost, gpus=sum(result.counts.values()),
               seconds=result.solve_seconds, kept_columns=len(config.gpus) - len(dominated_gpus(config)))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def same_cost(a: float, b: float, rel_tol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-6)


def time_command(argv: list[str], repeats: int) -> float:
    """Median wall seconds of running `argv` as a subprocess (which must succeed)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ---- output -----------------------------------------------------------------------------------------------------

def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(text: str = "") -> None:
    print(text, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def timing_cells(runs: Sequence[Run]) -> list[str]:
    """Proved optimal (count), median, p90 and max solve seconds."""
    times = [r.seconds for r in runs]
    return [f"{sum(r.optimal for r in runs)}/{len(runs)}", f"{statistics.median(times):.2f}",
            f"{percentile(times, 0.9):.2f}", f"{max(times):.2f}"]


def spread(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high} (median {statistics.median(values):g})"


def against(value: float, target: float) -> str:
    return f"< {target:g} s: {'met' if value < target else '**missed**'}"


# ---- the tables -------------------------------------------------------------------------------------------------

def main_table(seeds: Sequence[int], time_limit: float) -> dict[int, Run]:
    """Table 1; returns the slices runs by seed for Table 3 to compare against."""
    progress("Table 1")
    runs: dict[str, list[Run]] = {"slices": [], "split": []}
    for seed in seeds:
        config = load_instance(seed)
        for formulation, results in runs.items():
            results.append(run(config, seed, formulation, DEFAULT_SOLVER, time_limit))
    targets = {"slices": 2.0, "split": 1.0}
    emit(f"## Table 1: multi-cloud instances, {DEFAULT_SOLVER} (the default solver), time limit {time_limit:g} s")
    emit()
    emit(table(["formulation", "proved optimal", "median s", "p90 s", "max s", "target (median)"],
               [[formulation, *timing_cells(results),
                 against(statistics.median(r.seconds for r in results), targets[formulation])]
                for formulation, results in runs.items()]))
    emit()
    tight = sum(same_cost(a.cost, b.cost) for a, b in zip(runs["slices"], runs["split"]))
    emit(f"{len(seeds)} instances, each 60 buckets x 40 offers (8 GPU types x 5 clouds), slice_factor 8. The dominance "
         f"presolve keeps {spread([r.kept_columns for r in runs['slices']])} of the 40 columns. \"Proved optimal\" "
         f"counts solves that finished before the time limit; the others stopped with a feasible fleet and count at "
         f"the time limit. slices costs the same as split (the bound is attained) on {tight}/{len(seeds)} instances.")
    emit()
    rows = [[a.seed, f"{a.rate:g}", a.kept_columns, a.gpus, f"{a.cost:.4f}", a.status, f"{a.seconds:.2f}",
             b.gpus, f"{b.cost:.4f}", b.status, f"{b.seconds:.2f}",
             "yes" if b.cost <= a.cost + 1e-6 else "**NO (bug)**"]
            for a, b in zip(runs["slices"], runs["split"])]
    emit(table(["seed", "req/s", "columns kept", "slices GPUs", "slices $/h", "slices status", "slices s",
                "split GPUs", "split $/h", "split status", "split s", "split <= slices"], rows))
    emit()
    return {r.seed: r for r in runs["slices"]}


def quota_table(seeds: Sequence[int], time_limit: float) -> None:
    """Table 2: per-offer quotas, with CBC and HiGHS."""
    progress("Table 2")
    runs: dict[tuple[str, str], list[Run]] = {(s, f): [] for s in ("cbc", "highs") for f in ("slices", "split")}
    typed: dict[tuple[str, str], list[Run]] = {(s, f): [] for s in ("cbc", "highs") for f in ("slices", "split")}
    for seed in seeds:
        config = load_instance(seed, quotas=True)
        for (solver, formulation), results in runs.items():
            results.append(run(config, seed, formulation, solver, time_limit))
        config = load_instance(seed, quotas=True, per_offer=True)
        for (solver, formulation), results in typed.items():
            results.append(run(config, seed, formulation, solver, time_limit))
    emit(f"## Table 2: the same instances with per-offer quotas (max_count), time limit {time_limit:g} s")
    emit()
    emit("Columns as 40 separate GPU types (as if each offer were its own config entry), and as `--per-offer` "
         "makes them from 8 GPU entries: 8 types, each spread over its 5 offers by price within their quotas.")
    emit()
    emit(table(["columns", "solver", "formulation", "proved optimal", "median s", "p90 s", "max s"],
               [["40 types", solver, formulation, *timing_cells(results)]
                for (solver, formulation), results in runs.items()]
               + [["8 types x 5 offers", solver, formulation, *timing_cells(results)]
                  for (solver, formulation), results in typed.items()]))
    emit()
    # Both solvers run with a zero relative gap (melange_sky.solver.model), so proven optima must agree.
    mismatches = [f"seed {a.seed} {a.formulation}: CBC ${a.cost:.4f}/h vs HiGHS ${b.cost:.4f}/h"
                  for formulation in ("slices", "split")
                  for a, b in zip(runs["cbc", formulation], runs["highs", formulation])
                  if a.optimal and b.optimal and not same_cost(a.cost, b.cost)]
    emit(f"{QUOTAS_PER_TYPE} of the {len(CLOUDS)} offers of each GPU type get a random max_count in "
         f"{QUOTA_RANGE[0]}-{QUOTA_RANGE[1]} ({100 * QUOTAS_PER_TYPE // len(CLOUDS)}% of offers). The presolve keeps "
         f"{spread([r.kept_columns for r in runs['cbc', 'slices']])} of the 40 columns. Optimal costs of CBC and "
         f"HiGHS agree to 1e-4 wherever both proved optimality: "
         + ("yes." if not mismatches else "**NO**: " + "; ".join(mismatches)))
    emit()
    emit("Per instance, slices: " + "; ".join(
        f"seed {a.seed} CBC {a.seconds:.1f} s{'' if a.optimal else ' (limit)'} / HiGHS {b.seconds:.1f} s"
        f"{'' if b.optimal else ' (limit)'}" for a, b in zip(runs["cbc", "slices"], runs["highs", "slices"])) + ".")
    emit()


def paper_table(seeds: Sequence[int], sliced: dict[int, Run], time_limit: float) -> None:
    """Table 3: slices (Table 1's runs) against the paper's literal formulation on the same instances."""
    progress("Table 3")
    rows, speedups, problems = [], [], []
    for seed in seeds:
        paper, fast = run(load_instance(seed), seed, "paper", DEFAULT_SOLVER, time_limit), sliced[seed]
        if not fast.optimal:
            speedup = "n/a (slices hit its limit)"
        else:
            speedups.append(paper.seconds / fast.seconds)
            speedup = f"{'' if paper.optimal else '> '}{speedups[-1]:.1f}x"
        if paper.optimal and fast.optimal:
            costs = "equal" if same_cost(paper.cost, fast.cost) else "**MISMATCH**"
        else:
            costs = "not both proved"
        if costs == "**MISMATCH**" or paper.cost < fast.cost - 1e-6:
            problems.append(f"seed {seed}: paper ${paper.cost:.6f}/h ({paper.status}) vs slices "
                            f"${fast.cost:.6f}/h ({fast.status})")
        rows.append([seed, paper.status, f"{paper.seconds:.2f}", f"{paper.cost:.4f}", fast.status,
                     f"{fast.seconds:.2f}", f"{fast.cost:.4f}", speedup, costs])
    emit(f"## Table 3: `slices` vs the literal `paper` formulation, {DEFAULT_SOLVER}, "
         f"paper time limit {time_limit:g} s")
    emit()
    emit(table(["seed", "paper status", "paper s", "paper $/h", "slices status", "slices s", "slices $/h",
                "speed-up", "costs"], rows))
    emit()
    proved = sum(row[1] == "optimal" for row in rows)
    median = f"{statistics.median(speedups):.1f}x" if speedups else "n/a"
    emit(f"Paper proved optimality on {proved}/{len(seeds)} instances. Median speed-up of slices over paper: "
         f"{median} (\"> \" where paper hit its time limit, so the true speed-up is larger).")
    emit()
    emit("**COST MISMATCH (a bug):** " + "; ".join(problems) if problems else
         "Costs: equal wherever both proved optimal, and paper never found a cheaper fleet than slices.")
    emit()


def slice_factor_table(seeds: Sequence[int], time_limit: float) -> None:
    """Table 4: slices across slice factors. Each factor divides the next, so the cost must never rise."""
    progress("Table 4")
    runs = {s: [run(load_instance(seed, slice_factor=s), seed, "slices", DEFAULT_SOLVER, time_limit) for seed in seeds]
            for s in SLICE_FACTORS}
    emit(f"## Table 4: slice_factor sweep, `slices`, {DEFAULT_SOLVER}, time limit {time_limit:g} s")
    emit()
    emit(table(["slice_factor", "proved optimal", "median s", "p90 s", "max s", "costs ($/h) per seed"],
               [[s, *timing_cells(results), ", ".join(f"{r.cost:.2f}" for r in results)]
                for s, results in runs.items()]))
    emit()
    rises = [f"seed {a.seed}: S={s} ${a.cost:.4f}/h < S={t} ${b.cost:.4f}/h"
             for s, t in zip(SLICE_FACTORS, SLICE_FACTORS[1:])
             for a, b in zip(runs[s], runs[t]) if a.optimal and b.optimal and b.cost > a.cost + 1e-6]
    emit(f"Seeds {', '.join(map(str, seeds))}. Cost never rises with a finer slice factor (where both proved): "
         + ("yes." if not rises else "**NO (a bug)**: " + "; ".join(rises)))
    emit()


def cli_table(repeats: int) -> None:
    """Table 5: the CLI's wall time as a user sees it (interpreter start-up and imports included)."""
    progress("Table 5")
    exe = str(Path(sys.executable).parent / "melange-sky")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        commands = [("melange-sky --help", [exe, "--help"], 0.5),
                    ("melange-sky solve examples/example.json -o <tmpfile>",
                     [exe, "solve", str(EXAMPLE_CONFIG), "-o", str(Path(tmp) / "result.json")], 1.0)]
        for label, argv, target in commands:
            median = time_command(argv, repeats)
            progress(f"  {label}: {median:.3f} s")
            rows.append([f"`{label}`", f"{median:.3f}", against(median, target)])
    emit(f"## Table 5: CLI wall time (median of {repeats} runs as a subprocess)")
    emit()
    emit(table(["command", "median s", "target"], rows))
    emit()


def market_table(seeds: Sequence[int], time_limit: float) -> None:
    """Table 6: the quota instances with markets (`load_market_instance`), the fleet alone (`solve_fleet`: the
    all-on-demand and floor-0 comparisons that `solve` adds are left out)."""
    progress("Table 6")
    runs: dict[str, list[Run]] = {"slices": [], "split": []}
    spot_shares: list[float] = []
    gaps: list[str] = []  # slices: $/h between the fleet and its proven lower bound (split's optimum)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for seed in seeds:
        config = load_market_instance(seed)
        for formulation, results in runs.items():
            result = solve_fleet(config, Formulation(formulation), SolverOptions(time_limit=time_limit))
            if formulation == "slices":
                gaps.append("-" if result.gap is None else f"{result.gap:.4f}")
            progress(f"  seed {seed:>3} {formulation:<6} markets {result.status:<8} {result.solve_seconds:7.2f} s  "
                     f"${result.cost:.4f}/h")
            results.append(Run(seed=seed, rate=config.total_request_rate, formulation=formulation,
                               solver=DEFAULT_SOLVER, status=result.status, cost=result.cost, gpus=result.replicas,
                               seconds=result.solve_seconds, kept_columns=len(config.gpus) - len(
                                   dominated_gpus(config))))
            if formulation == "slices":
                spot = sum(g.cost for g in result.gpus if g.market == Market.SPOT)
                spot_shares.append(spot / result.cost if result.cost else 0.0)
    emit(f"## Table 6: markets (spot beside on-demand, floor {MARKET_POLICY.floor:g}, max_region_share "
         f"{MARKET_POLICY.max_region_share:g}) with per-offer quotas, {DEFAULT_SOLVER}, time limit {time_limit:g} s")
    emit()
    emit("The Table 2 instances as `--per-offer` binds them under a `spot` block: each of the 40 offers is an "
         f"on-demand column and a spot column (spot at {SPOT_DISCOUNT[0]:g}-{SPOT_DISCOUNT[1]:g} x on-demand, with "
         f"its own quota where the on-demand offer has one), each in one of {REGIONS_PER_CLOUD} regions of its "
         "cloud: 80 columns in 16 types (8 GPUs x reliable or spot), serving as 8 classes (a GPU's work goes to "
         "either market). The reliable replicas alone must carry "
         f"{MARKET_POLICY.floor:g} of every bucket; no region may hold more than "
         f"{MARKET_POLICY.max_region_share:g} of the spot GPUs.")
    emit()
    proven = {f: [r for r in results if r.optimal and r.seconds <= 5] for f, results in runs.items()}
    emit(table(["formulation", "proved optimal", "median s", "p90 s", "max s", "target: all proven within 5 s, "
                                                                              "median <= 0.5 s"],
               [[formulation, *timing_cells(results),
                 "met" if len(proven[formulation]) == len(results)
                 and statistics.median(r.seconds for r in results) <= 0.5 else "**not met**"]
                for formulation, results in runs.items()]))
    emit()
    emit(table(["seed", "req/s", "columns kept", "slices status", "slices s", "slices $/h", "slices gap $/h",
                "split status", "split s", "split $/h"],
               [[a.seed, a.rate, a.kept_columns, a.status, f"{a.seconds:.2f}", f"{a.cost:.4f}", gap, b.status,
                 f"{b.seconds:.2f}", f"{b.cost:.4f}"] for a, b, gap in zip(runs["slices"], runs["split"], gaps)]))
    emit()
    emit(f"Load average (1 min) when the table started: {load:.1f} on {os.cpu_count()} cores. A slices fleet the "
         "time limit stopped says its gap: its $/h minus the proven lower bound (split's optimum, where slices "
         "starts).")
    emit()
    emit(f"Spot's share of the slices fleet's $/h: {spread([round(100 * x) for x in spot_shares])} %.")
    emit()


# ---- entry point ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How much to run. Tables 2 and 4 solve many more hard models than Table 1, so they get a shorter limit."""

    seeds: int  # Tables 1 and 2 use seeds 1..seeds
    paper_seeds: int  # Table 3 uses the first paper_seeds of them
    sweep_seeds: int  # Table 4 uses the first sweep_seeds of them
    time_limit: float  # Table 1
    quota_sweep_time_limit: float  # Tables 2 and 4
    paper_time_limit: float  # Table 3
    cli_repeats: int
    markets_only: bool = False


FULL = Plan(seeds=10, paper_seeds=5, sweep_seeds=3, time_limit=60, quota_sweep_time_limit=30, paper_time_limit=60,
            cli_repeats=5)
QUICK = Plan(seeds=3, paper_seeds=2, sweep_seeds=2, time_limit=20, quota_sweep_time_limit=10, paper_time_limit=20,
             cli_repeats=3)


def parse_args(argv: Sequence[str] | None) -> Plan:
    parser = argparse.ArgumentParser(description="Benchmark melange-sky's solver on generated multi-cloud instances "
                                                 "and print Markdown tables (see the module docstring).")
    parser.add_argument("--quick", action="store_true", help="3 seeds and short time limits (a smoke run)")
    parser.add_argument("--seeds", type=int, help=f"instances in Tables 1 and 2, seeds 1..N (default {FULL.seeds})")
    parser.add_argument("--paper-seeds", type=int,
                        help=f"instances in Table 3, where the paper formulation is slow (default {FULL.paper_seeds})")
    parser.add_argument("--sweep-seeds", type=int, help=f"instances in Table 4 (default {FULL.sweep_seeds})")
    parser.add_argument("--time-limit", type=float,
                        help=f"seconds per solve in Table 1 (default {FULL.time_limit:g})")
    parser.add_argument("--quota-sweep-time-limit", type=float,
                        help=f"seconds per solve in Tables 2 and 4 (default {FULL.quota_sweep_time_limit:g})")
    parser.add_argument("--markets-only", action="store_true", help="only Table 6 (markets)")
    parser.add_argument("--write-config", nargs=2, metavar=("SEED", "PATH"),
                        help="write seed SEED's market instance as a config for `melange-sky solve --per-offer` "
                             "(catalog offers and spot prices) to PATH, and exit")
    parser.add_argument("--paper-time-limit", type=float,
                        help=f"seconds per paper solve in Table 3 (default {FULL.paper_time_limit:g})")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {name: getattr(args, name) for name in ("seeds", "paper_seeds", "sweep_seeds", "time_limit",
                                                         "quota_sweep_time_limit", "paper_time_limit")}
    plan = replace(plan, **{name: value for name, value in overrides.items() if value is not None},
                   markets_only=args.markets_only)
    if args.write_config:
        seed, path = args.write_config
        Path(path).write_text(json.dumps(market_cli_config(int(seed)), indent=1) + "\n")
        parser.exit(0, f"Wrote {path}\n")
    if plan.seeds < 1:
        parser.error("--seeds must be at least 1")
    return replace(plan, paper_seeds=min(plan.paper_seeds, plan.seeds), sweep_seeds=min(plan.sweep_seeds, plan.seeds))


def main(argv: Sequence[str] | None = None) -> None:
    plan = parse_args(argv)
    started = time.perf_counter()
    seeds = list(range(1, plan.seeds + 1))
    emit("# melange-sky solver benchmark")
    emit()
    emit(table(["cores", "CPU", "Python", "PuLP", "platform"],
               [[os.cpu_count(), cpu_model(), platform.python_version(), pulp.__version__, platform.platform()]]))
    emit()
    if plan.markets_only:
        market_table(seeds, plan.quota_sweep_time_limit)
        return
    sliced = main_table(seeds, plan.time_limit)
    quota_table(seeds, plan.quota_sweep_time_limit)
    paper_table(seeds[:plan.paper_seeds], sliced, plan.paper_time_limit)
    slice_factor_table(seeds[:plan.sweep_seeds], plan.quota_sweep_time_limit)
    cli_table(plan.cli_repeats)
    market_table(seeds, plan.quota_sweep_time_limit)
    emit(f"Total benchmark wall time: {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
