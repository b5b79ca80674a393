"""A solve end to end: run the model, turn its values into a checked `SolveResult`, and compare it with what
teams do today (one GPU type alone).

Every allocation is re-checked after solving (load <= headroom * count per type, shares of each bucket sum
to 1, shared caps kept); one that fails is a bug and raises `AllocationCheckError`.

A baseline is the cheapest fleet of one GPU entry alone, solved by the same model with every column the mix may use
for it (every offer, quota and instance size with `--per-offer`): a mix of one GPU type then saves nothing against
itself.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from melange_sky.core.config import Bucket, Config, GpuSpec, Market
from melange_sky.errors import AllocationCheckError, InfeasibleAllocation, SolverError
from melange_sky.solver.model import (Formulation, SharedCap, SolverOptions, SolveStatus, build_model,
                                     extract_allocation, gpus_per_instance, kept_spot_gpus, lp_bound,
                                     max_servable_fraction, resolve_formulation, run_model, run_model_watched,
                                     solve_split_first, split_tuning, spot_region)

#: Relative slack allowed when re-checking a solved allocation (MILP solvers work to ~1e-9 feasibility).
CHECK_TOLERANCE = 1e-6
MARKETS = (Market.ON_DEMAND, Market.SPOT, Market.OWNED)
#: Two fleets' $/h closer than this are the same cost (solvers stop within 1e-6 of the optimum).
SAME_COST = 1e-6
#: Time limit of each comparison solve (a single-GPU-type baseline, all on-demand, floor 0): they explain the
#: plan, so a slow one is cut short and says so (its cost is then the best fleet found, an upper bound) instead of
#: holding the answer for the full --time-limit.
COMPARISON_SECONDS = 3.0

#: `solve`'s progress callback: called with what it starts next ("the single-GPU-type fleets"), for a CLI to show.
Progress = Callable[[str], None]


def _silent(_: str) -> None:
    """The default progress callback: a library function never prints."""


@dataclass(frozen=True)
class GpuAllocation:
    """How many GPUs of one type the plan buys, and how hard they are planned to work."""

    name: str
    count: int
    price: float
    load: float  # GPUs' worth of work routed to this type
    utilisation: float | None  # load / count; None when count is 0
    gpus_per_instance: int = 1  # GPUs in one instance of this column (bound to an 8-GPU offer: 8; counts instances)
    entry: str | None = None  # the config's GPU entry, when this column is one offer of it (`--per-offer`)
    cloud: str | None = None  # where its replicas run (None: a GPU the catalog does not know, solved as given)
    region: str | None = None
    market: str = Market.ON_DEMAND  # on_demand, spot or owned (`core.config.Market`)

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

    gpu: str  # the GPU entry
    count: int | None  # instances
    cost: float | None
    reason: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # column -> instances, where they are (offers, sizes)
    proven: bool = True  # False: COMPARISON_SECONDS stopped it; cost is the best fleet found (an upper bound)


@dataclass(frozen=True)
class Alternative:
    """A cheaper fleet another formulation finds (shown so the user can choose it)."""

    formulation: Formulation
    cost: float
    counts: dict[str, int]


@dataclass(frozen=True)
class MarketReport:
    """What a `spot` block did to the plan: the floor asked and the reliable share planned (the most of every
    bucket the on-demand and owned replicas alone can carry), the spot GPUs per region, and the same config solved
    all on-demand (no spot columns) and with no floor, for what spot saves and what the floor costs."""

    floor: float
    max_region_share: float
    reliable_share: float
    spot_gpus: dict[str, int]  # region ("aws:us-east-1") -> spot GPUs there
    on_demand_cost: float | None  # the same config with no spot offers; None if none fits (or none found in time)
    no_floor_cost: float | None  # the same config with floor 0; None if none found in time
    cut_short: tuple[str, ...] = ()  # "on_demand", "no_floor": stopped by COMPARISON_SECONDS (cost: an upper bound)


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
    markets: MarketReport | None = None  # with a `spot` block

    @property
    def cost(self) -> float:
        return sum(g.cost for g in self.gpus)

    def market_cost(self, market: str) -> float:
        return sum(g.cost for g in self.gpus if g.market == market)

    def market_count(self, market: str) -> int:
        return sum(g.count for g in self.gpus if g.market == market)

    @property
    def gap(self) -> float | None:
        """$/h between this fleet and the proven lower bound: 0 when proven optimal, None when no bound is known
        for a fleet the time limit stopped."""
        if self.status is SolveStatus.OPTIMAL:
            return 0.0
        return None if self.lower_bound is None else max(self.cost - self.lower_bound, 0.0)

    @property
    def counts(self) -> dict[str, int]:
        return {g.name: g.count for g in self.gpus}

    @property
    def best_baseline(self) -> Baseline | None:
        feasible = [b for b in self.baselines if b.cost is not None]
        return min(feasible, key=lambda b: b.cost or 0.0) if feasible else None

    @property
    def replicas(self) -> int:
        """Instances in the fleet: one cluster each."""
        return sum(g.count for g in self.gpus)

    @property
    def saving(self) -> float | None:
        """$/h the mix saves against the cheapest single-GPU-type fleet (0 when that fleet is the mix itself)."""
        best = self.best_baseline
        if best is None or best.cost is None:
            return None
        saving = best.cost - self.cost
        return 0.0 if abs(saving) < SAME_COST else saving

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
            "gap": None if self.gap is None else round(self.gap, 6),
            "alternative": asdict(self.alternative) if self.alternative else None,
            "warnings": list(self.warnings),
            **({} if self.markets is None else {"markets": self._markets_dict(self.markets)}),
        }

    def _markets_dict(self, m: MarketReport) -> dict[str, Any]:
        return {"floor": m.floor, "reliable_share": round(m.reliable_share, 6),
                "max_region_share": m.max_region_share, "spot_gpus": m.spot_gpus,
                "cost": {market: round(self.market_cost(market), 6) for market in MARKETS},
                "count": {market: self.market_count(market) for market in MARKETS},
                "on_demand_cost": None if m.on_demand_cost is None else round(m.on_demand_cost, 6),
                "spot_saving": None if m.on_demand_cost is None else round(m.on_demand_cost - self.cost, 6),
                "no_floor_cost": None if m.no_floor_cost is None else round(m.no_floor_cost, 6),
                "floor_cost": None if m.no_floor_cost is None else round(self.cost - m.no_floor_cost, 6),
                "cut_short": list(m.cut_short)}


def solve(config: Config, formulation: Formulation | str = Formulation.SLICES,
          options: SolverOptions = SolverOptions(), compare: bool = True,
          caps: Sequence[SharedCap] = (), max_replicas: int | None = None,
          progress: Progress | None = None) -> SolveResult:
    """Find the cheapest fleet and the single-GPU-type baselines. With `compare`, also the LP lower bound and a
    cheaper `split` alternative. `caps` bound the GPUs of several columns together (quotas across offers); a fleet
    of more than `max_replicas` instances raises InfeasibleAllocation (before baselines and comparisons).

    Each model is solved once: under a spot block `slices` starts from `split`'s optimum, which is then also the
    lower bound and the alternative. The comparisons (baselines, all on-demand, floor 0) run with at most
    COMPARISON_SECONDS each and say when that stopped them. `progress` hears what starts next."""
    note = progress or _silent
    formulation = resolve_formulation(config, formulation)
    check_replica_bound(config, max_replicas)
    note(f"solving the fleet ({formulation})")
    result, split = _fleet_and_split(config, formulation, options, caps)
    _check_replicas(config, result, max_replicas)
    quick = comparison_options(options)
    note("single-GPU-type fleets")
    result = dataclasses.replace(result, baselines=baselines(config, formulation, quick, caps, note))
    if config.spot is not None:
        result = dataclasses.replace(result, markets=market_report(config, result, formulation, quick, caps, note))
    if not compare:
        return result
    # The best proven lower bound: the LP relaxation, or the split optimum (split relaxes slices and paper).
    note("lower bound")
    bounds = [lp_bound(config, options, caps)]
    alternative = None
    if formulation is Formulation.SPLIT:
        bounds.append(result.cost if result.status is SolveStatus.OPTIMAL else None)
    else:
        if split is None:
            note("the split alternative")
            try:
                split = solve_fleet(config, Formulation.SPLIT, quick, caps)
            except SolverError:  # no split fleet within the comparison's time: no bound, no alternative
                split = None
        if split is not None:
            bounds.append(split.cost if split.status is SolveStatus.OPTIMAL else None)
            if split.cost < result.cost - 1e-9:
                alternative = Alternative(Formulation.SPLIT, split.cost, split.counts)
    lower_bound = max((b for b in [*bounds, result.lower_bound] if b is not None), default=None)
    return dataclasses.replace(result, lower_bound=lower_bound, alternative=alternative)


def comparison_options(options: SolverOptions) -> SolverOptions:
    """`options` with the time limit of one comparison solve (COMPARISON_SECONDS, or less under --time-limit)."""
    limit = COMPARISON_SECONDS if options.time_limit is None else min(options.time_limit, COMPARISON_SECONDS)
    return dataclasses.replace(options, time_limit=limit)


def solve_fleet(config: Config, formulation: Formulation | str, options: SolverOptions = SolverOptions(),
                caps: Sequence[SharedCap] = (), max_replicas: int | None = None) -> SolveResult:
    """The cheapest fleet alone, without `solve`'s baselines and comparisons (for a caller that solves one config
    under several formulations and needs its baselines once: a sweep's mix and split). InfeasibleAllocation says
    why when no fleet fits, or when it has more than `max_replicas` instances."""
    formulation = resolve_formulation(config, formulation)
    check_replica_bound(config, max_replicas)
    result, _ = _fleet_and_split(config, formulation, options, caps)
    _check_replicas(config, result, max_replicas)
    return result


def _fleet_and_split(config: Config, formulation: Formulation, options: SolverOptions,
                     caps: Sequence[SharedCap]) -> tuple[SolveResult, SolveResult | None]:
    """The cheapest fleet, and `split`'s optimum when it was solved on the way (`slices` under a spot block starts
    from it: `solve_split_first`), so that `solve` need not solve it again."""
    fast = (solve_split_first(config, options, caps)
            if config.spot is not None and formulation is Formulation.SLICES else None)
    if fast is not None:
        status, seconds, variables = fast.status, fast.seconds, fast.variables
    elif config.spot is not None and formulation is not Formulation.SPLIT:
        # `split` stopped short (or `paper`): the whole search, which stalls as the bounded one can, watched as it is
        model, variables = build_model(config, formulation, caps=caps)
        status, seconds = run_model_watched(model, options)
    else:
        model, variables = build_model(config, formulation, caps=caps)
        status, seconds = run_model(model, options,
                                    tuning=split_tuning(config) if formulation is Formulation.SPLIT else None,
                                    dive_start=formulation is Formulation.SPLIT and config.spot is not None)
    if status is SolveStatus.INFEASIBLE:
        raise InfeasibleAllocation(f"{config.source}: {explain_infeasible(config, formulation, options, caps)}")
    counts, routing = extract_allocation(config, variables)
    result = make_result(config, formulation, options, status, seconds, counts, routing, caps)
    if fast is None:
        return result, None
    # split's optimum bounds slices: a search the time limit stopped says its gap
    result = dataclasses.replace(result, lower_bound=min(fast.bound, result.cost))
    counts, routing = extract_allocation(config, fast.split)
    split = make_result(config, Formulation.SPLIT, options, SolveStatus.OPTIMAL, fast.split_seconds, counts,
                        routing, caps)
    return result, split


def replica_lower_bound(config: Config) -> float:
    """Instances any fleet needs at least: each bucket's req/s on its fastest GPU at headroom, summed (a type's
    count carries at least its load / headroom, and no share of a bucket is served faster)."""
    needed = 0.0
    for b in config.buckets:
        rate = config.bucket_rate(b)
        best = max((g.tput(b) for g in config.gpus), default=0.0)
        if rate > 0 and best > 0:
            needed += rate / (best * config.headroom)
    return needed


def check_replica_bound(config: Config, max_replicas: int | None) -> None:
    """InfeasibleAllocation before any model is built when every fleet has more than `max_replicas` instances
    (`replica_lower_bound`): no need to solve for the answer, nor to hand the solver numbers it cannot count with
    (a rate of 1e16 req/s, a tput of 1e-300)."""
    if max_replicas is None:
        return
    bound = replica_lower_bound(config)
    if bound > max_replicas + 1e-9:
        at_least = f"{math.ceil(bound - 1e-9):,}" if bound < 1e15 else f"{bound:.3g}"
        raise InfeasibleAllocation(f"{config.source}: any fleet at {config.total_request_rate:g} req/s has at least "
                                   f"{at_least} replicas (each bucket on its fastest GPU), above --max-replicas "
                                   f"{max_replicas}: check the request rate and tputs, or raise --max-replicas")


def _check_replicas(config: Config, result: SolveResult, max_replicas: int | None) -> None:
    if max_replicas is not None and result.replicas > max_replicas:
        fleet = ", ".join(f"{g.count:,} x {g.name}" for g in result.gpus if g.count)
        raise InfeasibleAllocation(f"{config.source}: the cheapest fleet at {config.total_request_rate:g} req/s has "
                                   f"{result.replicas:,} replicas ({fleet}), above --max-replicas {max_replicas}: "
                                   f"check the request rate, or raise --max-replicas")


def make_result(config: Config, formulation: Formulation, options: SolverOptions, status: SolveStatus,
                seconds: float, counts: dict[str, int], routing: dict[Bucket, dict[str, float]],
                caps: Sequence[SharedCap] = ()) -> SolveResult:
    """Build the result record (baselines left to `solve`) and check it: a result that fails its own check is a
    bug, not an output."""
    check_allocation(config, counts, routing, caps)
    loads = _loads(config, routing)
    gpus = [GpuAllocation(name=g.name, count=counts[g.name], price=g.cost, load=loads[g.name],
                          utilisation=(loads[g.name] / counts[g.name]) if counts[g.name] else None,
                          gpus_per_instance=gpus_per_instance(g), entry=g.entry, cloud=g.cloud, region=g.region,
                          market=g.market or (Market.SPOT if g.use_spot else Market.ON_DEMAND))
            for g in config.gpus]
    routes = [Route(bucket=b, name=config.bucket_name(b), rate=config.bucket_rate(b), shares=routing[b])
              for b in config.buckets if b in routing]
    return SolveResult(name=config.name, source=config.source, formulation=formulation,
                       slice_factor=config.slice_factor, headroom=config.headroom,
                       total_request_rate=config.total_request_rate, solver=options.name, status=status,
                       solve_seconds=seconds, gpus=gpus, routing=routes, baselines=[],
                       warnings=list(config.warnings))


def check_allocation(config: Config, counts: dict[str, int], routing: dict[Bucket, dict[str, float]],
                     caps: Sequence[SharedCap] = ()) -> None:
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
    for cap in caps:
        if cap.gpus(counts) > cap.cap:
            problems.append(f"{cap.name}: {cap.gpus(counts)} GPUs over its cap {cap.cap}")
    if config.spot is not None:
        spot = {g.name: gpus_per_instance(g) * counts[g.name] for g in config.gpus if not g.reliable}
        kappa, kept = config.spot.max_region_share, kept_spot_gpus(config)
        for region in {spot_region(g) for g in config.gpus if not g.reliable}:
            here = sum(n for name, n in spot.items() if spot_region(config.gpu(name)) == region)
            if here > kappa * sum(spot.values()) + (1 - kappa) * kept.get(region, 0) + CHECK_TOLERANCE:
                problems.append(f"{here} of {sum(spot.values())} spot GPUs in {region}, over max_region_share "
                                f"{kappa:g}" + (f" with {kept[region]} kept there" if region in kept else ""))
    if problems:
        raise AllocationCheckError("internal error, please report: the solved allocation fails its check: "
                                   + "; ".join(problems))


def market_report(config: Config, result: SolveResult, formulation: Formulation, options: SolverOptions,
                  caps: Sequence[SharedCap] = (), progress: Progress | None = None) -> MarketReport:
    """The `spot` block's outcome for `result`: the reliable share planned, spot GPUs per region, and the same
    config solved all on-demand and with floor 0 (what spot saves, what the floor costs), each within `options`'
    time limit (`cut_short` names those it stopped)."""
    assert config.spot is not None
    note = progress or _silent
    counts = result.counts
    reliable = [dataclasses.replace(g, min_count=0, max_count=counts[g.name]) for g in config.gpus
                if g.reliable and counts[g.name]]
    share = 0.0
    if reliable:  # an LP over the planned reliable replicas: the most of every bucket they alone can carry
        alone = dataclasses.replace(config, gpus=tuple(reliable), spot=None)
        if all(any(g.tput(b) > 0 for g in reliable) for b in config.buckets if config.bucket_rate(b) > 0):
            share = min(1.0, max_servable_fraction(alone, options))
    if share < config.spot.floor - CHECK_TOLERANCE:
        raise AllocationCheckError(f"internal error, please report: the reliable replicas carry {share:.6g} of "
                                   f"every bucket, below the floor {config.spot.floor:g}")
    spot_gpus: dict[str, int] = {}
    for g in config.gpus:
        if not g.reliable and counts[g.name]:
            spot_gpus[spot_region(g)] = spot_gpus.get(spot_region(g), 0) + counts[g.name] * gpus_per_instance(g)
    names = {g.name for g in config.gpus if g.reliable}
    on_demand = dataclasses.replace(config, gpus=tuple(g for g in config.gpus if g.reliable), spot=None)
    own_caps = [dataclasses.replace(cap, columns=tuple((c, n) for c, n in cap.columns if c in names))
                for cap in caps if any(c in names for c, _ in cap.columns)]
    no_floor = dataclasses.replace(config, spot=dataclasses.replace(config.spot, floor=0.0))
    note("the same fleet all on-demand")
    on_demand_cost, on_demand_proven = _best_cost(on_demand, formulation, options, own_caps)
    no_floor_cost: float | None = result.cost
    no_floor_proven = result.status is SolveStatus.OPTIMAL
    if config.spot.floor > 0:
        note("the same fleet with floor 0")
        no_floor_cost, no_floor_proven = _best_cost(no_floor, formulation, options, caps)
        if no_floor_cost is None or no_floor_cost > result.cost:  # the plan itself meets floor 0
            no_floor_cost = result.cost
    cut_short = tuple(name for name, cost, proven in (("on_demand", on_demand_cost, on_demand_proven),
                                                       ("no_floor", no_floor_cost, no_floor_proven))
                      if cost is not None and not proven)
    return MarketReport(floor=config.spot.floor, max_region_share=config.spot.max_region_share,
                        reliable_share=share, spot_gpus=dict(sorted(spot_gpus.items())),
                        on_demand_cost=on_demand_cost, no_floor_cost=no_floor_cost, cut_short=cut_short)


def _best_cost(config: Config, formulation: Formulation, options: SolverOptions,
               caps: Sequence[SharedCap]) -> tuple[float | None, bool]:
    """The cheapest fleet's $/h within `options`' time limit, and whether it is proven optimal; (None, False) when
    no fleet fits, or none was found in time."""
    if not config.gpus:
        return None, False
    try:
        fleet = solve_fleet(config, formulation, options, caps)
    except (InfeasibleAllocation, SolverError):  # SolverError: no fleet found within the time limit
        return None, False
    return fleet.cost, fleet.status is SolveStatus.OPTIMAL


def baselines(config: Config, formulation: Formulation | str = Formulation.SLICES,
              options: SolverOptions = SolverOptions(), caps: Sequence[SharedCap] = (),
              progress: Progress | None = None) -> list[Baseline]:
    """Single-GPU-type fleets (what teams do today): per GPU entry, the cheapest fleet of it alone under the same
    model, with every column of it (with `--per-offer`: every offer, quota and instance size). One plain column is
    ceil(total load / headroom) instances; several, or shared caps, are solved (within `options`' time limit: a
    baseline it stops is not `proven`)."""
    note = progress or _silent
    entries: dict[str, list[GpuSpec]] = {}
    for g in config.gpus:
        entries.setdefault(g.entry or g.name, []).append(g)
    demand = [b for b in config.buckets if config.bucket_rate(b) > 0]
    result = []
    for label, columns in entries.items():
        blocked = next((b for b in demand if all(g.tput(b) <= 0 for g in columns)), None)
        if blocked is not None:
            result.append(Baseline(label, None, None,
                                   f"cannot serve bucket {config.bucket_name(blocked)} (tputs 0)"))
            continue
        names = {g.name for g in columns}
        own_caps = [dataclasses.replace(cap, columns=tuple((c, n) for c, n in cap.columns if c in names))
                    for cap in caps if any(c in names for c, _ in cap.columns)]
        limit = (f"its max_count {columns[0].max_count}" if len(columns) == 1 and not own_caps
                 else f"the quotas of its {len(columns)} offer{'s' if len(columns) > 1 else ''}")
        if config.spot is not None and config.spot.floor > 0 and not any(g.reliable for g in columns):
            result.append(Baseline(label, None, None, f"only spot offers: nothing reliable to carry the floor "
                                                      f"{config.spot.floor:g}"))
            continue
        if len(columns) == 1 and not own_caps and config.spot is None:
            gpu = columns[0]
            load = sum(config.bucket_rate(b) / gpu.tput(b) for b in demand)
            if not math.isfinite(load / config.headroom):
                result.append(Baseline(label, None, None, f"needs {load / config.headroom:g} replicas"))
                continue
            count = max(math.ceil(load / config.headroom - 1e-9), gpu.min_count)
            if gpu.max_count is not None and count > gpu.max_count:
                result.append(Baseline(label, None, None, f"needs {count}, above {limit}"))
            else:
                result.append(Baseline(label, count, count * gpu.cost, counts={gpu.name: count}))
            continue
        alone = dataclasses.replace(config, gpus=tuple(columns))
        note(f"single-GPU-type fleets: {label}")
        try:
            fleet = solve_fleet(alone, Formulation(formulation), options, own_caps)
        except InfeasibleAllocation:
            result.append(Baseline(label, None, None, f"the load does not fit {limit}"))
            continue
        except SolverError:  # the time limit stopped it before any fleet
            result.append(Baseline(label, None, None, f"no fleet found within {options.time_limit or 0:g} s",
                                   proven=False))
            continue
        result.append(Baseline(label, fleet.replicas, fleet.cost,
                               counts={name: n for name, n in fleet.counts.items() if n},
                               proven=fleet.status is SolveStatus.OPTIMAL))
    return result


def explain_infeasible(config: Config, formulation: Formulation, options: SolverOptions,
                       caps: Sequence[SharedCap] = ()) -> str:
    """Say why no fleet fits. Only `max_count` and shared caps can cause it (config validation rules out
    unservable buckets)."""
    capped = [g for g in config.gpus if g.max_count is not None]
    limits = ", ".join([f"{g.name} <= {g.max_count}" for g in capped]
                       + [f"{cap.name} <= {cap.cap} GPUs" for cap in caps]) or "none"
    for b in config.buckets:
        servers = [g for g in config.gpus if g.tput(b) > 0]
        if config.bucket_rate(b) > 0 and all(g.max_count == 0 for g in servers):
            names = ", ".join(g.name for g in servers)
            return (f"no fleet fits: bucket {config.bucket_name(b)} can only be served by {names}, "
                    f"whose max_count is 0")
    fraction = max_servable_fraction(config, options, caps)
    if fraction < 1 - 1e-6:
        return (f"no fleet fits the max_count limits ({limits}): they can serve at most {100 * fraction:.1f}% of "
                f"the load ({fraction * config.total_request_rate:.4g} of {config.total_request_rate:g} req/s). "
                f"Raise a max_count{' or quota' if caps or any(g.quotas for g in capped) else ''}, add a GPU type, "
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
