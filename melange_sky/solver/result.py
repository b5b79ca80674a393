"""A solve end to end: run the model, turn its values into a checked `SolveResult`, and compare it with what
teams do today (one GPU type alone).

Every allocation is re-checked after solving (load <= headroom * count per type, shares of each bucket sum
to 1); one that fails is a bug and raises `AllocationCheckError`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from melange_sky.core.config import Bucket, Config
from melange_sky.errors import AllocationCheckError, InfeasibleAllocation, SolverError
from melange_sky.solver.model import (Formulation, SolverOptions, SolveStatus, build_model, cheapest_spread,
                                     extract_allocation, lp_bound, max_servable_fraction, offer_groups, run_model)

#: Relative slack allowed when re-checking a solved allocation (MILP solvers work to ~1e-9 feasibility).
CHECK_TOLERANCE = 1e-6


@dataclass(frozen=True)
class GpuAllocation:
    """How many GPUs of one type the plan buys, and how hard they are planned to work."""

    name: str
    count: int
    price: float
    load: float  # GPUs' worth of work routed to this type
    utilisation: float | None  # load / count; None when count is 0

    @property
    def cost(self) -> float:
        return self.count * self.price


@dataclass(frozen=True)
class Route:
    """Where one bucket's requests go: share of the bucket per GPU type (shares sum to 1)."""

    bucket: Bucket
    name: str
    rate: float
    shares: dict[str, float]


@dataclass(frozen=True)
class Baseline:
    """The fleet one GPU type alone would need, or why that type alone cannot serve the workload."""

    gpu: str
    count: int | None
    cost: float | None
    reason: str | None = None


@dataclass(frozen=True)
class Alternative:
    """A cheaper fleet another formulation finds (shown so the user can choose it)."""

    formulation: Formulation
    cost: float
    counts: dict[str, int]


@dataclass(frozen=True)
class SolveResult:
    """Everything later stages (plan, up, router, simulator) need from a solve."""

    name: str
    source: str
    formulation: Formulation
    slice_factor: int
    headroom: float
    total_request_rate: float
    solver: str
    status: SolveStatus  # optimal, or feasible: the time limit stopped the search before a proof
    solve_seconds: float
    gpus: list[GpuAllocation]
    routing: list[Route]
    baselines: list[Baseline]
    lower_bound: float | None = None  # proven: no fleet under this formulation costs less
    alternative: Alternative | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def cost(self) -> float:
        return sum(g.cost for g in self.gpus)

    @property
    def counts(self) -> dict[str, int]:
        return {g.name: g.count for g in self.gpus}

    @property
    def best_baseline(self) -> Baseline | None:
        feasible = [b for b in self.baselines if b.cost is not None]
        return min(feasible, key=lambda b: b.cost or 0.0) if feasible else None

    @property
    def saving(self) -> float | None:
        """$/h the mix saves against the cheapest single-GPU-type fleet."""
        best = self.best_baseline
        return None if best is None or best.cost is None else best.cost - self.cost

    def original_output(self) -> dict[str, Any]:
        """The original Mélange `melange_result.json` shape: count per GPU type plus total `cost`."""
        return {**self.counts, "cost": round(self.cost, 6)}

    def to_dict(self) -> dict[str, Any]:
        best = self.best_baseline
        return {
            "name": self.name,
            "config": self.source,
            "formulation": self.formulation,
            "slice_factor": self.slice_factor,
            "headroom": self.headroom,
            "total_request_rate": self.total_request_rate,
            "solver": self.solver,
            "status": self.status,
            "solve_seconds": round(self.solve_seconds, 4),
            "cost": round(self.cost, 6),
            "counts": self.counts,
            "gpus": [{**asdict(g), "cost": round(g.cost, 6)} for g in self.gpus],
            "routing": [{"bucket": list(r.bucket), "name": r.name, "rate": r.rate, "shares": r.shares}
                        for r in self.routing],
            "baselines": [asdict(b) for b in self.baselines],
            "best_baseline": best.gpu if best else None,
            "saving": None if self.saving is None else round(self.saving, 6),
            "saving_pct": (None if best is None or best.cost is None or self.saving is None
                           else round(100 * self.saving / best.cost, 2)),
            "lower_bound": None if self.lower_bound is None else round(self.lower_bound, 6),
            "alternative": asdict(self.alternative) if self.alternative else None,
            "warnings": list(self.warnings),
        }


def solve(config: Config, formulation: Formulation | str = Formulation.SLICES,
          options: SolverOptions = SolverOptions(), compare: bool = True) -> SolveResult:
    """Find the cheapest fleet. With `compare`, also the LP lower bound and a cheaper `split` alternative."""
    try:
        formulation = Formulation(formulation)
    except ValueError:
        raise SolverError(f"unknown formulation {formulation!r}; choose one of "
                          f"{', '.join(f.value for f in Formulation)}") from None
    model, variables = build_model(config, formulation)
    status, seconds = run_model(model, options)
    if status is SolveStatus.INFEASIBLE:
        raise InfeasibleAllocation(f"{config.source}: {explain_infeasible(config, formulation, options)}")
    counts, routing = extract_allocation(config, variables)
    result = make_result(config, formulation, options, status, seconds, counts, routing)
    if not compare:
        return result
    # The best proven lower bound: the LP relaxation, or the split optimum (split relaxes slices and paper).
    bounds = [lp_bound(config, options)]
    alternative = None
    if formulation is Formulation.SPLIT:
        bounds.append(result.cost if status is SolveStatus.OPTIMAL else None)
    else:
        split = solve(config, Formulation.SPLIT, options, compare=False)
        bounds.append(split.cost if split.status is SolveStatus.OPTIMAL else None)
        if split.cost < result.cost - 1e-9:
            alternative = Alternative(Formulation.SPLIT, split.cost, split.counts)
    lower_bound = max((b for b in bounds if b is not None), default=None)
    return dataclasses.replace(result, lower_bound=lower_bound, alternative=alternative)


def make_result(config: Config, formulation: Formulation, options: SolverOptions, status: SolveStatus,
                seconds: float,
                counts: dict[str, int], routing: dict[Bucket, dict[str, float]]) -> SolveResult:
    """Build the result record and check it: a result that fails its own check is a bug, not an output."""
    check_allocation(config, counts, routing)
    loads = _loads(config, routing)
    gpus = [GpuAllocation(name=g.name, count=counts[g.name], price=g.cost, load=loads[g.name],
                          utilisation=(loads[g.name] / counts[g.name]) if counts[g.name] else None)
            for g in config.gpus]
    routes = [Route(bucket=b, name=config.bucket_name(b), rate=config.bucket_rate(b), shares=routing[b])
              for b in config.buckets if b in routing]
    return SolveResult(name=config.name, source=config.source, formulation=formulation,
                       slice_factor=config.slice_factor, headroom=config.headroom,
                       total_request_rate=config.total_request_rate, solver=options.name, status=status,
                       solve_seconds=seconds, gpus=gpus, routing=routes, baselines=baselines(config),
                       warnings=list(config.warnings))


def check_allocation(config: Config, counts: dict[str, int], routing: dict[Bucket, dict[str, float]]) -> None:
    """Raise `AllocationCheckError` unless every bucket is fully routed and no type is planned over headroom."""
    problems = []
    for b in config.buckets:
        if config.bucket_rate(b) <= 0:
            continue
        shares = routing.get(b, {})
        if abs(sum(shares.values()) - 1.0) > CHECK_TOLERANCE:
            problems.append(f"bucket {config.bucket_name(b)} shares sum to {sum(shares.values())!r}")
        for g, s in shares.items():
            if config.gpu(g).tput(b) <= 0 and s > 0:
                problems.append(f"bucket {config.bucket_name(b)} routed to {g}, which cannot serve it")
    for g, load in _loads(config, routing).items():
        capacity = counts[g] * config.headroom
        if load > capacity + CHECK_TOLERANCE * max(1.0, capacity):
            problems.append(f"{g} load {load:.6g} exceeds {counts[g]} x headroom {config.headroom:g}")
    for gpu in config.gpus:
        if counts[gpu.name] < gpu.min_count or (gpu.max_count is not None and counts[gpu.name] > gpu.max_count):
            problems.append(f"{gpu.name} count {counts[gpu.name]} outside its min/max_count")
    if problems:
        raise AllocationCheckError("internal error, please report: the solved allocation fails its check: "
                                   + "; ".join(problems))


def baselines(config: Config) -> list[Baseline]:
    """Single-GPU-type fleets (what teams do today): count = ceil(total load / headroom) of that type. A GPU type
    offered at several offers (`--per-offer`) is one baseline, its instances spread over its offers by price."""
    result = []
    demand = [b for b in config.buckets if config.bucket_rate(b) > 0]
    for group in offer_groups(list(config.gpus)).values():
        gpu = group[0]
        label = gpu.entry or gpu.name if len(group) > 1 else gpu.name
        blocked = next((b for b in demand if gpu.tput(b) <= 0), None)
        if blocked is not None:
            result.append(Baseline(label, None, None,
                                   f"cannot serve bucket {config.bucket_name(blocked)} (tputs 0)"))
            continue
        load = sum(config.bucket_rate(b) / gpu.tput(b) for b in demand)
        count = max(math.ceil(load / config.headroom - 1e-9), sum(g.min_count for g in group))
        spread = cheapest_spread(group, count)
        if spread is None:
            limit = (f"its max_count {gpu.max_count}" if len(group) == 1
                     else f"the quotas of its {len(group)} offers")
            result.append(Baseline(label, None, None, f"needs {count}, above {limit}"))
            continue
        result.append(Baseline(label, count, sum(n * config.gpu(g).cost for g, n in spread.items())))
    return result


def explain_infeasible(config: Config, formulation: Formulation, options: SolverOptions) -> str:
    """Say why no fleet fits. Only `max_count` can cause it (config validation rules out unservable buckets)."""
    capped = [g for g in config.gpus if g.max_count is not None]
    limits = ", ".join(f"{g.name} <= {g.max_count}" for g in capped) or "none"
    for b in config.buckets:
        servers = [g for g in config.gpus if g.tput(b) > 0]
        if config.bucket_rate(b) > 0 and all(g.max_count == 0 for g in servers):
            names = ", ".join(g.name for g in servers)
            return (f"no fleet fits: bucket {config.bucket_name(b)} can only be served by {names}, "
                    f"whose max_count is 0")
    fraction = max_servable_fraction(config, options)
    if fraction < 1 - 1e-6:
        return (f"no fleet fits the max_count limits ({limits}): they can serve at most {100 * fraction:.1f}% of "
                f"the load ({fraction * config.total_request_rate:.4g} of {config.total_request_rate:g} req/s). "
                f"Raise a max_count{' or quota' if any(g.quotas for g in capped) else ''}, add a GPU type, "
                f"or lower total_request_rate"
                + ("; with quotas, --per-offer spreads a GPU over all its offers" if any(
                    g.quotas and g.entry in (None, g.name) for g in capped) else ""))
    return (f"no fleet fits the max_count limits ({limits}) when each bucket is cut into slice_factor "
            f"{config.slice_factor} whole slices ({formulation}); the load itself fits: use --formulation split "
            f"or a larger slice_factor")


def _loads(config: Config, routing: dict[Bucket, dict[str, float]]) -> dict[str, float]:
    loads = {g.name: 0.0 for g in config.gpus}
    for b, shares in routing.items():
        for g, s in shares.items():
            loads[g] += s * config.bucket_rate(b) / config.gpu(g).tput(b)
    return loads
