"""The Mélange MILP: variables, constraints and the solver that runs them.

Notation (as in the paper): bucket b has rate r[b] req/s; GPU type g costs c[g] $/h and serves at most t[b, g]
req/s of bucket b, so sending all of b to g loads it with r[b] / t[b, g] GPUs' worth of work. y[g] counts GPUs.

Three formulations share that model and differ only in how a bucket may be divided among GPU types:

* ``slices`` (default; ``auto`` picks ``split`` under a spot block: `resolve_formulation`): b is cut into
  S = slice_factor equal slices, each served whole by one type. Slices of a bucket are interchangeable, so an
  integer n[b, g] in 0..S (how many of b's slices go to g) replaces the paper's S binaries per (b, g): the
  same optimum without the symmetry that makes branch-and-bound slow.
* ``paper``: the paper's literal ILP, binary x[b, k, g] per slice k. Kept to cross-check ``slices``.
* ``split``: any fraction x[b, g] in [0, 1] (the S -> infinity limit). Never dearer; x is a router's table.

With `--per-offer`, one GPU entry becomes a column per offer (price and quota each); those columns form one GPU
type: an integer count y of the type, spread over its offers by counts z. For a given integer y the cheapest spread
is a min-cost problem whose only constraints are sum(z) = y and each offer's bounds: its matrix is totally unimodular,
so its optimum is integral and is the cheapest-first fill (`_fill_cheapest`). The continuous z are therefore exact,
and the model keeps one integer per type however many offers there are. A quota shared by several columns (a
cloud's regional GPU quota, `SharedCap`) breaks that structure (it weighs columns by their GPUs per instance and may
span types), so the columns under one get integer counts: exact again, at the price of more integers.

Under a `spot` block one GPU entry is two types, reliable (on-demand, owned) and spot, each with its own count
(the floor reads the reliable one, the regional spread the spot one), but they serve as one class: work is assigned
to the GPU, and its capacity is the sum of both counts (`serving_classes`). For `split` that is exact (a class's share
divides among its types by counts); for `slices` a slice goes to a GPU whichever market holds the instance, as it
already goes to a GPU whichever offer. It halves the assignment variables the markets would double.

The dominance presolve (`dominated_gpus`) drops columns no optimal fleet needs. A column that is one offer of a type
may only be dropped for a cheaper uncapped offer of the same type, or together with its whole type: its share of
the work cannot move to another type on its own, since work is assigned to types, not offers.

PuLP is imported inside the functions that use it: `melange-sky --help` never pays for it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from melange_sky._signals import deliver, signals_held
from melange_sky.core.config import Bucket, Config, GpuSpec, pinned_gpus
from melange_sky.errors import AllocationCheckError, SolverError

SOLVERS = ("highs", "cbc")


class Formulation(StrEnum):
    """How a bucket's traffic may be divided among GPU types (see the module's docstring)."""

    SLICES = "slices"
    PAPER = "paper"
    SPLIT = "split"


AUTO = "auto"  # the CLI's default formulation: see resolve_formulation


def resolve_formulation(config: Config, formulation: Formulation | str) -> Formulation:
    """`auto` is `slices` (the paper's model, whole slices per GPU type), except under a `spot` block: markets double
    the types and `slices` there is often not proven within seconds, where `split` (never dearer) is proven at once
    (bench/solve_bench.py --markets-only: split optimal on all 10 instances, median 0.31 s, slowest 0.79 s; slices
    proven on 6 of 10 in 30 s). An explicit formulation is kept as given."""
    if formulation == AUTO:
        return Formulation.SPLIT if config.spot is not None else Formulation.SLICES
    try:
        return Formulation(formulation)
    except ValueError:
        raise SolverError(f"unknown formulation {formulation!r}; choose one of {AUTO}, "
                          f"{', '.join(f.value for f in Formulation)}") from None


class SolveStatus(StrEnum):
    OPTIMAL = "optimal"  # proven optimal
    FEASIBLE = "feasible"  # the time limit stopped the search before optimality was proven
    INFEASIBLE = "infeasible"
#: (Both solvers stop within 0.01% of the bound by default, which may leave a dearer fleet.)
OPTIMALITY_GAP_ABS = 1e-6
#: Share of HiGHS's effort spent on primal heuristics (its default is 0.05). On the benchmark the bound is reached
#: early and the time goes into finding a fleet that meets it; 0.3 roughly halved the median (bench/solve_bench.py).
HIGHS_HEURISTIC_EFFORT = 0.3
#: How long `solve_split_first` looks for whole slices at the `split` counts before it searches in full.
SPLIT_FIRST_FIT_SECONDS = 2.0
#: HiGHS's heuristic effort in `slices` after `split`'s bound: the bound is known, so the search is for a fleet that
#: meets it (issue 20's market instances: 6-7 s instead of 8-19 s where one exists, measured on seeds 1, 2, 8).
BOUNDED_HEURISTIC_EFFORT = 1.0
#: How long past its time limit the bounded `slices` search (`solve_split_first`) may run before it is stopped from
#: outside. That search runs HiGHS's sub-MIP heuristics at full effort, and a sub-MIP checks neither HiGHS's time
#: limit everywhere in its presolve (ERGO-Code/HiGHS#2226, #1501) nor the user interrupt (polled by the top-level
#: MIP only): in bench/solve_bench.py's Table 6 a RINS -> RENS -> root-reduced-cost chain twice ran for minutes past
#: a 30 s limit. So that search runs in a child process (`run_model_watched`), killed at limit + grace, and its
#: result is the best fleet it reported. Without those sub-MIPs it cannot stall so, but its fleets are worse: seeds 3
#: and 4 of Table 6 ended at the limit 3.4% and 4.1% above split's bound (with them: seed 3 0.04% above, seed 4 proven).
WATCHDOG_GRACE_SECONDS = 2.0
#: HiGHS options for `split` under a spot block. Its root LP is within 0.1-0.5% of the optimum and the tree is small
#: (a few hundred nodes); HiGHS's sub-MIP heuristics (RINS, RENS) and its restarts took most of the time. Without
#: them the median market instance of bench/solve_bench.py solves in 0.7 s instead of 1.9 s (measured side by side).
#: Cuts are separated at the root only: in the tree they cost more than they prune (~8% less CPU on seeds 1-20).
#: One thread: HiGHS 1.16's parallel tree search (a second worker) spent ~20% more CPU for no shorter wall time on
#: an idle 2-core machine, and waits when the cores are shared (wall median 1.14 -> 1.07 s at load 7, seeds 21-40).
MARKET_SPLIT_TUNING: dict[str, float | bool] = {"mip_heuristic_effort": 0.05, "mip_heuristic_run_rins": False,
                                                "mip_heuristic_run_rens": False, "mip_allow_restart": False,
                                                "mip_allow_cut_separation_at_nodes": False, "threads": 1}


#: Largest load coefficient (a bucket's req/s over one GPU's req/s on it: GPUs' worth of work) a model may hold.
#: HiGHS refuses matrix values from 1e15 (its `large_matrix_value`; PuLP then fails with an IndexError), and its
#: feasibility tolerance (1e-7) on a share becomes 1e-7 x coefficient GPUs of error: 100 GPUs at 1e9, the ratio to
#: the model's unit coefficients past which its results stop being counts. Such a coefficient means a GPU doing
#: next to nothing for its bucket (tputs 1e-300) or a rate no fleet could meet.
MAX_LOAD_COEFFICIENT = 1e9


def check_coefficients(config: Config) -> None:
    """Refuse, naming the tputs cell, a model whose load coefficients the solver cannot count with
    (`MAX_LOAD_COEFFICIENT`): SolverError before HiGHS fails on it obscurely."""
    for b in config.buckets:
        rate = config.bucket_rate(b)
        if rate <= 0:
            continue
        for g in config.gpus:
            tput = g.tput(b)
            if tput > 0 and rate / tput > MAX_LOAD_COEFFICIENT:
                raise SolverError(f"{config.source}: {g.field_path}.tputs[{b[0]}][{b[1]}] is {tput:g} req/s, so "
                                  f"bucket {config.bucket_name(b)}'s {rate:g} req/s would take {rate / tput:.3g} "
                                  f"GPUs of it, more than the solver can count ({MAX_LOAD_COEFFICIENT:g}): check "
                                  f"the request rate, or set that tput to 0 if the GPU cannot serve the bucket")


def _pulp() -> Any:
    """PuLP, imported on first use (~0.3 s, kept off `--help`) so that a Ctrl-C meanwhile is never lost.

    PuLP probes optional solvers inside bare `except:` clauses (HiGHS among them): a Ctrl-C landing there would be
    swallowed and HiGHS recorded as missing, and one in HiGHS's own import (numpy's) could leave it half loaded. So a
    Ctrl-C (or SIGTERM, SIGHUP) while HiGHS and then PuLP load is held until they have, then delivered."""
    if "pulp" in sys.modules:
        return sys.modules["pulp"]
    with signals_held() as held:
        with contextlib.suppress(ImportError):
            import highspy  # noqa: F401, PLC0415 - see the docstring
        import pulp  # noqa: PLC0415 - see the docstring
    deliver(held)
    return pulp


@dataclass(frozen=True)
class SolverOptions:
    """Which MILP solver runs the model. HiGHS by default: PuLP's bundled CBC 2.10.3 sometimes returns a dearer fleet
    labelled optimal (a preprocessing bug, reproduced in tests). `path` points at a CBC binary elsewhere."""

    name: str = "highs"
    path: str | None = None
    time_limit: float | None = None
    msg: bool = False


@dataclass(frozen=True)
class SharedCap:
    """At most `cap` GPUs across several columns together: a quota pattern ("azure:eastus") matching several
    offers, as clouds count quotas (GPUs per region, not instances per instance type). `columns` maps each column
    to its GPUs per instance."""

    name: str  # where it comes from, for messages: "gpu_info.A100-80GB.quotas.azure:eastus"
    columns: tuple[tuple[str, int], ...]
    cap: int

    def gpus(self, counts: dict[str, int]) -> int:
        return sum(k * counts.get(column, 0) for column, k in self.columns)


@dataclass
class ModelVariables:
    """The decision variables, keyed by domain names, and each (bucket, GPU type) share as an expression of them.

    A "type" is a group of columns that serve identically (one GPU at several offers: same tputs, other prices and
    quotas); `members` lists each type's columns and `offer` holds the per-column counts of multi-column types."""

    count: dict[str, Any]  # y[t]: instances of type t
    assign: dict[tuple, Any]  # n[b, t] (slices), x[b, k, t] (paper) or x[b, t] (split)
    share: dict[tuple[Bucket, str], Any]  # fraction of bucket b served by type t, as a PuLP expression
    members: dict[str, list[GpuSpec]] = field(default_factory=dict)  # type -> its columns
    offer: dict[str, Any] = field(default_factory=dict)  # z[g]: instances of column g (types with several columns)
    integral: frozenset[str] = frozenset()  # columns whose z is an integer (under a shared cap)
    classes: dict[str, list[str]] = field(default_factory=dict)  # serving class -> its types (`serving_classes`)


def build_model(config: Config, formulation: Formulation | str, relax: bool = False,
                caps: Sequence[SharedCap] = ()):
    """The MILP for `formulation` as (model, variables). `relax` makes every variable continuous; `caps` bound
    the GPUs of several columns together."""
    pulp = _pulp()
    check_coefficients(config)

    integer = pulp.LpContinuous if relax else pulp.LpInteger
    binary = pulp.LpContinuous if relax else pulp.LpBinary
    S = config.slice_factor
    rate = {b: config.bucket_rate(b) for b in config.buckets}
    demand = [b for b in config.buckets if rate[b] > 0]
    dominated = dominated_gpus(config, caps)
    columns = [g for g in config.gpus if g.name not in dominated]
    shared = {column for cap in caps for column, _ in cap.columns} | _spread_columns(config)
    members = offer_groups(columns)
    classes = serving_classes(members)
    gpus = [members[groups[0]][0] for groups in classes.values()]  # one per class: its tputs serve for all
    servers = {b: [g for g in gpus if g.tput(b) > 0] for b in demand}
    label = {g.name: f"{k}_{_safe(g.name)}" for k, g in enumerate(config.gpus)}

    model = pulp.LpProblem(f"melange_{formulation}", pulp.LpMinimize)
    y: dict[str, Any] = {}
    z: dict[str, Any] = {}
    cost_terms = []
    for name, group in members.items():
        if len(group) == 1:
            y[name] = model.add_variable(f"y_{label[name]}", lowBound=group[0].min_count,
                                         upBound=group[0].max_count, cat=integer)
            cost_terms.append(group[0].cost * y[name])
            continue
        # One GPU at several offers: an integer count of the type, spread over its offers by counts that are
        # continuous (exact, see the module's docstring) except under a shared cap.
        bounds = [g.max_count for g in group if g.max_count is not None]
        y[name] = model.add_variable(f"y_{label[name]}", lowBound=sum(g.min_count for g in group),
                                     upBound=sum(bounds) if len(bounds) == len(group) else None, cat=integer)
        for g in group:
            z[g.name] = model.add_variable(f"z_{label[g.name]}", lowBound=g.min_count, upBound=g.max_count,
                                           cat=integer if g.name in shared else pulp.LpContinuous)
            cost_terms.append(g.cost * z[g.name])
        model += pulp.lpSum(z[g.name] for g in group) == y[name], f"offers_{label[name]}"
    model += pulp.lpSum(cost_terms), "cost_per_hour"
    for k, cap in enumerate(caps):
        used = [(z[c] if c in z else y[c], n) for c, n in cap.columns if c in z or c in y]
        if used:
            model += pulp.lpSum(n * var for var, n in used) <= cap.cap, f"shared_cap_{k}"

    assign: dict[tuple, Any] = {}
    share: dict[tuple[Bucket, str], Any] = {}
    for b in demand:
        i, j = b
        if formulation == Formulation.SLICES:
            for g in servers[b]:
                assign[b, g.name] = model.add_variable(f"n_{i}_{j}_{label[g.name]}", 0, S, integer)
                share[b, g.name] = assign[b, g.name] * (1.0 / S)
            model += pulp.lpSum(assign[b, g.name] for g in servers[b]) == S, f"serve_{i}_{j}"
        elif formulation == Formulation.PAPER:
            for k in range(S):
                for g in servers[b]:
                    assign[b, k, g.name] = model.add_variable(f"x_{i}_{j}_{k}_{label[g.name]}", 0, 1, binary)
                model += pulp.lpSum(assign[b, k, g.name] for g in servers[b]) == 1, f"serve_{i}_{j}_{k}"
            for g in servers[b]:
                share[b, g.name] = pulp.lpSum(assign[b, k, g.name] for k in range(S)) * (1.0 / S)
        else:  # split
            for g in servers[b]:
                assign[b, g.name] = model.add_variable(f"x_{i}_{j}_{label[g.name]}", 0, 1, pulp.LpContinuous)
                share[b, g.name] = assign[b, g.name]
            model += pulp.lpSum(assign[b, g.name] for g in servers[b]) == 1, f"serve_{i}_{j}"

    for g in gpus:
        load = pulp.lpSum(share[b, g.name] * (rate[b] / g.tput(b)) for b in demand if (b, g.name) in share)
        model += load <= config.headroom * pulp.lpSum(y[name] for name in classes[g.name]), \
            f"capacity_{label[g.name]}"
    if config.spot is not None:
        _add_markets(model, config, members, y, z, demand, rate, label)
    return model, ModelVariables(count=y, assign=assign, share=share, members=members, offer=z,
                                 integral=frozenset(shared & set(z)), classes=classes)


def _add_markets(model: Any, config: Config, members: dict[str, list[GpuSpec]], y: dict[str, Any],
                 z: dict[str, Any], demand: list[Bucket], rate: dict[Bucket, float], label: dict[str, str]) -> None:
    """The spot block's two rules (see the module's docstring): the floor, a second assignment w[b, t] over the
    reliable types only, and the regional spread of spot GPUs."""
    pulp = _pulp()
    assert config.spot is not None
    floor, kappa = config.spot.floor, config.spot.max_region_share
    reliable = [group[0] for group in members.values() if group[0].reliable]
    if floor > 0:
        w: dict[tuple[Bucket, str], Any] = {}
        for b in demand:
            i, j = b
            for g in reliable:
                if g.tput(b) > 0:
                    w[b, g.name] = model.add_variable(f"w_{i}_{j}_{label[g.name]}", 0, 1, pulp.LpContinuous)
            model += pulp.lpSum(w[b, g.name] for g in reliable if (b, g.name) in w) >= floor, f"floor_{i}_{j}"
        for g in reliable:
            load = pulp.lpSum(w[b, g.name] * (rate[b] / g.tput(b)) for b in demand if (b, g.name) in w)
            model += load <= config.headroom * y[g.name], f"reliable_capacity_{label[g.name]}"
    if kappa < 1:
        spot = [(g, z[g.name] if g.name in z else y[g.name]) for group in members.values() for g in group
                if not g.reliable and (g.name in z or g.name in y)]
        everywhere = pulp.lpSum(gpus_per_instance(g) * v for g, v in spot)
        kept = kept_spot_gpus(config)
        for region in sorted({spot_region(g) for g, _ in spot}):
            here = pulp.lpSum(gpus_per_instance(g) * v for g, v in spot if spot_region(g) == region)
            model += here <= kappa * everywhere + (1 - kappa) * kept.get(region, 0), f"region_share_{_safe(region)}"


def kept_spot_gpus(config: Config) -> dict[str, int]:
    """Spot GPUs each region must hold whatever the plan (its spot columns' min_count: replicas a re-plan keeps, or
    the user's). The spread rule lets a region's share rise to them: here <= kappa * everywhere + (1 - kappa) * kept,
    i.e. what a region adds beyond its kept GPUs is at most kappa of every other spot GPU. With nothing kept it is
    the plain rule; it is the convex hull of "here <= max(kappa * everywhere, kept)", and a re-plan that adds no spot
    to a region always meets it, so a kept replica never makes the model infeasible."""
    kept: dict[str, int] = {}
    for g in config.gpus:
        if not g.reliable and g.min_count:
            kept[spot_region(g)] = kept.get(spot_region(g), 0) + gpus_per_instance(g) * g.min_count
    return kept


def spot_region(gpu: GpuSpec) -> str:
    """The region a spot column's preemptions come together in ("aws:us-east-1")."""
    return f"{gpu.cloud or 'any'}:{gpu.region or 'any'}"


def _spread_columns(config: Config) -> set[str]:
    """Spot columns under the regional spread: their counts are integers (the spread weighs them across types)."""
    if config.spot is None or config.spot.max_region_share >= 1:
        return set()
    return {g.name for g in config.gpus if not g.reliable}


def gpus_per_instance(gpu: GpuSpec) -> int:
    """GPUs in one instance of a column bound to an offer ("A100-80GB:8" -> 8); 1 for an unbound entry, whose
    counts are GPUs."""
    if gpu.entry is None or not gpu.accelerators:
        return 1
    return pinned_gpus(gpu.accelerators) or 1


@dataclass(frozen=True)
class SplitFirst:
    """`solve_split_first`'s outcome: the `slices` model solved (or stopped by the time limit), and the proven
    lower bound it started from (the `split` optimum)."""

    status: SolveStatus
    seconds: float
    variables: ModelVariables
    bound: float
    split: ModelVariables  # split's own optimum (the bound), for a caller that also reports it
    split_seconds: float


def solve_split_first(config: Config, options: SolverOptions, caps: Sequence[SharedCap] = ()) -> SplitFirst | None:
    """`slices` proven from its relaxation: `split` lets a bucket be divided in any proportion, so its optimum L is a
    lower bound on `slices`. Solve `split` (fast: its shares are continuous), then look for whole slices that fit the
    same counts; a fleet found at cost L is optimal with no search. Else solve `slices` with the valid cut
    cost >= L, which gives the search its bound from the start (and the result its gap, should the time limit stop
    it). None when `split` itself stops short (infeasible or out of time): the caller solves `slices` as usual and
    explains. Seconds are all three solves'."""
    pulp = _pulp()

    relaxed, split = build_model(config, Formulation.SPLIT, caps=caps)
    status, seconds = run_model(relaxed, options, tuning=split_tuning(config), dive_start=config.spot is not None)
    if status is not SolveStatus.OPTIMAL:
        return None
    split_seconds = seconds
    bound = pulp.value(relaxed.objective) or 0.0
    # Whole slices for the relaxation's counts: a fit costs L, so it is optimal with no search.
    model, variables = build_model(config, Formulation.SLICES, caps=caps)
    for name, var in [*variables.count.items(), *((n, v) for n, v in variables.offer.items()
                                                   if n in variables.integral)]:
        value = round(pulp.value(split.count[name] if name in split.count else split.offer[name]) or 0)
        var.lowBound = var.upBound = value
    limit = min(SPLIT_FIRST_FIT_SECONDS, options.time_limit or SPLIT_FIRST_FIT_SECONDS)
    started = time.perf_counter()
    try:
        fit_status, _ = run_model(model, dataclasses.replace(options, time_limit=limit))
    except SolverError:  # none found within the limit
        fit_status = SolveStatus.INFEASIBLE
    seconds += time.perf_counter() - started
    if fit_status in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE) and \
            (pulp.value(model.objective) or 0.0) <= bound + OPTIMALITY_GAP_ABS:
        return SplitFirst(SolveStatus.OPTIMAL, seconds, variables, bound, split, split_seconds)
    model, variables = build_model(config, Formulation.SLICES, caps=caps)
    model += model.objective >= bound - OPTIMALITY_GAP_ABS, "split_bound"
    left = None if options.time_limit is None else max(options.time_limit - seconds, 1.0)
    status, more = run_model_watched(model, dataclasses.replace(options, time_limit=left),
                                     heuristic_effort=BOUNDED_HEURISTIC_EFFORT)
    return SplitFirst(status, seconds + more, variables, bound, split, split_seconds)


def offer_groups(gpus: list[GpuSpec]) -> dict[str, list[GpuSpec]]:
    """The GPU types of the model: the offers of one config entry (`--per-offer` columns of one GPU with the same
    GPUs per instance, so the same tputs) form one type whose instances are spread over its offers; every other
    column is a type of its own, as in the paper (two entries are two types even when their tputs are equal)."""
    types: dict[tuple, list[GpuSpec]] = {}
    for g in gpus:
        key = (g.entry, g.tputs, g.reliable) if g.entry is not None else (g.name,)
        types.setdefault(key, []).append(g)
    return {group[0].name: group for group in types.values()}


def serving_classes(members: dict[str, list[GpuSpec]]) -> dict[str, list[str]]:
    """Types that serve as one: the spot and the reliable types of one GPU entry (same tputs) under a spot block.
    Work is assigned to a class, whose capacity is the sum of its types' counts; each type keeps its own count
    (the floor reads the reliable ones). For `split` this is exact: a class's share divides among its types in
    proportion to their counts. For `slices` a slice goes to a GPU, whichever market its instance is bought in, as
    it already goes to a GPU whichever offer (the router spreads a column's share by instances). Without a spot
    block every class is one type."""
    classes: dict[tuple, list[str]] = {}
    for name, group in members.items():
        g = group[0]
        key = (g.entry, g.tputs) if g.entry is not None else (name,)
        classes.setdefault(key, []).append(name)
    return {names[0]: names for names in classes.values()}


def dominated_gpus(config: Config, caps: Sequence[SharedCap] = ()) -> dict[str, str]:
    """Columns no optimal fleet needs, each mapped to one that dominates it: no dearer, at least as fast on every
    bucket with demand, and uncapped (no max_count, under no shared cap) while the dominated one has no min_count.
    Moving a dominated type's work onto its dominator never raises the cost, so dropping it is exact; it shrinks
    multi-cloud problems where one GPU is offered at several prices (40 offers of 8 GPUs become 8 columns).

    An offer of a multi-offer type (`offer_groups`) is dropped only for a dominating offer of its own type, or with
    its whole type when one column outside dominates every offer of it: the work of one offer alone cannot move to
    another type (a type's work is shared by its offers), so a cheaper uncapped G2 does not make G1's dearer uncapped
    offer unnecessary while G1 also has a cheap capped one."""
    demand = [b for b in config.buckets if config.bucket_rate(b) > 0]
    order = {g.name: k for k, g in enumerate(config.gpus)}
    shared = {column for cap in caps for column, _ in cap.columns}
    markets = config.spot is not None

    def dominates(h: GpuSpec, g: GpuSpec) -> bool:
        if markets and not (h.reliable and g.reliable):  # spot is bound by the spread, reliable by the floor
            return False
        if h is g or h.max_count is not None or h.name in shared or g.min_count > 0 or h.cost > g.cost:
            return False
        if any(h.tput(b) < g.tput(b) for b in demand):
            return False
        strictly = h.cost < g.cost or any(h.tput(b) > g.tput(b) for b in demand)
        return strictly or order[h.name] < order[g.name]

    result = {}
    for group in offer_groups(list(config.gpus)).values():
        names = {g.name for g in group}
        outside = [h for h in config.gpus if h.name not in names] if len(group) > 1 else list(config.gpus)
        by = next((h for h in outside if all(dominates(h, g) for g in group)), None)
        for g in group:
            within = by or next((h for h in group if dominates(h, g)), None)
            if within is not None:
                result[g.name] = within.name
    return result


def split_tuning(config: Config) -> dict[str, float | bool]:
    """HiGHS options for a `split` model of `config` (`MARKET_SPLIT_TUNING` under a spot block, else none)."""
    return dict(MARKET_SPLIT_TUNING) if config.spot is not None else {}


def run_model(model, options: SolverOptions, heuristic_effort: float = HIGHS_HEURISTIC_EFFORT,
              tuning: dict[str, float | bool] | None = None, dive_start: bool = False,
              on_incumbent: Callable[[list[float]], None] | None = None) -> tuple[SolveStatus, float]:
    """Solve `model` in place; return its status and the wall seconds it took (the dive's included).
    `heuristic_effort`: HiGHS's share of effort on primal heuristics; `tuning`: more HiGHS options; `dive_start`:
    hand HiGHS a first fleet from a dive of its LP relaxation (`dive_for_a_start`); `on_incumbent`: hears each
    improving fleet HiGHS finds (its column values, in `model.variables()`'s order). CBC ignores all four."""
    pulp = _pulp()

    solver = make_solver(options, heuristic_effort, tuning, dive_start)
    solver.on_incumbent = on_incumbent
    started = time.perf_counter()
    try:
        with _quiet_stdout(options.name == "highs" and not options.msg):
            model.solve(solver)
    except pulp.PulpSolverError as exc:
        raise SolverError(f"{options.name} failed: {exc}") from exc
    except IndexError as exc:  # PuLP reads row values HiGHS never made: it refuses matrix values from 1e15
        raise SolverError(f"{options.name} returned no usable solution: the model has a coefficient out of its "
                          f"range (1e15 or more)") from exc
    seconds = time.perf_counter() - started
    if model.sol_status == pulp.LpSolutionOptimal:
        return SolveStatus.OPTIMAL, seconds
    if model.sol_status == pulp.LpSolutionIntegerFeasible:
        return SolveStatus.FEASIBLE, seconds
    if model.status == pulp.LpStatusInfeasible or model.sol_status == pulp.LpSolutionInfeasible:
        return SolveStatus.INFEASIBLE, seconds
    status = _highs_status(model) if options.name == "highs" else None
    timed_out = (status == "Time limit reached" if status is not None
                 else options.time_limit is not None and seconds >= options.time_limit)
    limit = f" within the {options.time_limit:g} s time limit" if timed_out and options.time_limit else ""
    raise SolverError(f"{options.name} found no solution{limit} (status: {status or pulp.LpStatus[model.status]})")


def _highs_status(model: Any) -> str | None:
    """HiGHS's own model status of a solved PuLP model ("Time limit reached", "Model error"), or None if unknown:
    PuLP folds several into "Not Solved", and only the time limit is about time."""
    highs = getattr(model, "solverModel", None)
    if highs is None:
        return None
    try:
        return str(highs.modelStatusToString(highs.getModelStatus()))
    except Exception:  # noqa: BLE001 - a status is a detail of a message; never fail the message for it
        return None


def run_model_watched(model, options: SolverOptions, heuristic_effort: float = HIGHS_HEURISTIC_EFFORT,
                      tuning: dict[str, float | bool] | None = None,
                      grace: float = WATCHDOG_GRACE_SECONDS) -> tuple[SolveStatus, float]:
    """`run_model` with a time limit that holds: HiGHS runs in a child process, killed `grace` seconds past
    `options.time_limit` if it has not returned by then (see `WATCHDOG_GRACE_SECONDS`); the model then holds the
    best fleet HiGHS reported (status FEASIBLE: not proven), or SolverError says none was found. In process when
    there is no limit to hold, or for CBC (a subprocess of its own). Costs a fork (`_watch_context`)."""
    pulp = _pulp()

    if options.time_limit is None or options.name != "highs":
        return run_model(model, options, heuristic_effort, tuning)
    started = time.perf_counter()
    deadline = time.time() + options.time_limit  # wall clock: the child reads its own limit from it
    context = _watch_context()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_watched_solve, daemon=True, name="melange-sky-highs",
                            args=(sender, model.toDict(), options, deadline, heuristic_effort, tuning, os.getpid()))
    child.start()
    sender.close()
    names: list[str] = []
    best: list[float] | None = None
    outcome: tuple | None = None
    try:
        while outcome is None:
            left = deadline + grace - time.time()
            if left <= 0 or not receiver.poll(left):
                break  # overran: HiGHS stuck where it checks no limit
            try:
                message = receiver.recv()
            except EOFError:  # the child ended without an answer (a crash, a kill from outside)
                child.join(1.0)
                raise SolverError(f"{options.name}'s process ended without an answer (exit code "
                                  f"{child.exitcode})") from None
            if message[0] == "columns":
                names = message[1]
            elif message[0] == "incumbent":
                best = message[1]
            else:
                outcome = message
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()
    seconds = time.perf_counter() - started
    if outcome is not None and outcome[0] == "error":
        raise SolverError(outcome[1])
    values = dict(zip(names, best)) if outcome is None and best is not None else \
        (outcome[2] if outcome is not None else None)
    if values is None:
        raise SolverError(f"{options.name} found no solution within the {options.time_limit:g} s time limit "
                          f"(stopped {seconds - options.time_limit:.1f} s past it)")
    for var in model.variables():
        var.varValue = values.get(var.name)
    status = SolveStatus(outcome[1]) if outcome is not None else SolveStatus.FEASIBLE
    model.status = pulp.LpStatusOptimal if status is not SolveStatus.INFEASIBLE else pulp.LpStatusInfeasible
    model.sol_status = {SolveStatus.OPTIMAL: pulp.LpSolutionOptimal, SolveStatus.FEASIBLE:
                        pulp.LpSolutionIntegerFeasible}.get(status, pulp.LpSolutionInfeasible)
    return status, seconds


def _watch_context() -> Any:
    """Where watched solves start: a fork server that has imported the solver (about 0.3 s, once per process; each
    solve is then a fork of it, ~20 ms instead of a new Python's 0.25 s). A fork of this process instead would copy
    HiGHS's thread pool without its threads. The server ends with this process."""
    import multiprocessing  # noqa: PLC0415 - only watched solves need it

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "pulp", "highspy"])
    return context


def _watched_solve(sender: Any, problem: dict, options: SolverOptions, deadline: float, heuristic_effort: float,
                   tuning: dict[str, float | bool] | None, owner: int) -> None:
    """`run_model_watched`'s child: solve `problem` within what is left before `deadline`, sending each improving
    fleet as HiGHS finds it, then the outcome; end if process `owner` (which watches) is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's: it stops this process

    def end_with_parent() -> None:  # a parent killed outright cannot stop this process: it stops itself
        while True:
            time.sleep(0.5)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # another user's process now holds the id: ours is gone
                os._exit(1)

    threading.Thread(target=end_with_parent, daemon=True, name="melange-sky-orphan-check").start()
    with open(os.devnull, "w") as devnull:  # a clean stdout for --json: nothing of HiGHS's gets through
        os.dup2(devnull.fileno(), 1)
    pulp = _pulp()
    _, model = pulp.LpProblem.fromDict(problem)
    names = [var.name for var in model.variables()]  # PuLP's HiGHS columns, in order
    sender.send(("columns", names))
    limited = dataclasses.replace(options, time_limit=max(deadline - time.time(), 0.01))
    try:
        status, _ = run_model(model, limited, heuristic_effort, tuning,
                              on_incumbent=lambda values: sender.send(("incumbent", values)))
    except SolverError as exc:
        sender.send(("error", str(exc)))
        return
    sender.send(("done", str(status), {var.name: var.varValue for var in model.variables()}))


def make_solver(options: SolverOptions, heuristic_effort: float = HIGHS_HEURISTIC_EFFORT,
                tuning: dict[str, float | bool] | None = None, dive_start: bool = False):
    """A PuLP solver object for `options`, with an actionable error when it cannot run here."""
    pulp = _pulp()

    if options.name == "cbc":
        path = options.path or _bundled_cbc() or shutil.which("cbc")
        if not path:
            raise SolverError("no CBC binary found: install CBC (e.g. `brew install cbc`) and pass --solver-path, "
                              "or use --solver highs")
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise SolverError(f"--solver-path {path}: not an executable file")
        return pulp.COIN_CMD(path=path, msg=options.msg, timeLimit=options.time_limit, gapRel=0.0,
                             gapAbs=OPTIMALITY_GAP_ABS)
    if options.name == "highs":
        if options.path:
            raise SolverError("--solver-path applies to --solver cbc only")
        if not pulp.HiGHS().available():
            raise SolverError("--solver highs needs highspy: pip install highspy (or --solver cbc)")
        params: dict[str, Any] = {"mip_heuristic_effort": heuristic_effort, **(tuning or {})}
        solver = _highs_class()(msg=options.msg, timeLimit=options.time_limit, gapRel=0.0,
                                gapAbs=OPTIMALITY_GAP_ABS, **params)
        solver.dive_start = dive_start
        return solver
    raise SolverError(f"unknown solver {options.name!r}; choose one of {', '.join(SOLVERS)}")


_HIGHS_CLASS: Any = None


def _highs_class() -> Any:
    """PuLP's in-process HiGHS, able to run one model on a thread count of its own (`threads` in the tuning) and
    to start from a dived fleet (`dive_start`).

    HiGHS keeps one thread pool per process, sized by the first run: a later run asking for another count fails.
    Runs here are sequential, so a run that pins its threads gets a fresh pool, and the next run gets a fresh
    default one again (HiGHS's `resetGlobalScheduler`: tens of microseconds)."""
    global _HIGHS_CLASS
    if _HIGHS_CLASS is None:
        pulp = _pulp()

        class MelangeHiGHS(pulp.HiGHS):  # type: ignore[name-defined]
            dive_start = False
            on_incumbent: Callable[[list[float]], None] | None = None

            def callSolver(self, lp: Any) -> None:
                import highspy  # noqa: PLC0415 - loaded with PuLP by _pulp()
                if self.threads is not None:
                    highspy.Highs.resetGlobalScheduler(True)
                try:
                    if self.dive_start:
                        start = dive_for_a_start(lp.solverModel)
                        if start is not None:
                            lp.solverModel.setSolution(start)
                    if self.on_incumbent is not None:
                        hear = self.on_incumbent
                        lp.solverModel.cbMipImprovingSolution += \
                            lambda event: hear([float(v) for v in event.data_out.mip_solution])
                    super().callSolver(lp)
                finally:
                    if self.threads is not None:
                        highspy.Highs.resetGlobalScheduler(True)

        _HIGHS_CLASS = MelangeHiGHS
    return _HIGHS_CLASS


#: A dive gives up (and hands HiGHS no start) after this many LP solves per integer variable, and its polish stops
#: after as many again.
DIVE_SOLVES_PER_INTEGER = 4


def dive_for_a_start(mip: Any) -> Any | None:
    """A feasible solution of the HiGHS model `mip`, for HiGHS to start from; None if the dive finds none.

    Why: under a spot block HiGHS proves `split` in a few hundred nodes, and spent two thirds of its time finding
    the optimum (given it as a start, a solve took a third of the time). Any first fleet helps: its cost prunes the
    tree and bounds HiGHS's own heuristics from the start. The dive: solve the LP relaxation; round up the integer
    variable closest to its ceiling (down if up is infeasible), solve again, until every one is whole; then drop
    one instance at a time, dearest first, while the LP stays feasible. Each LP re-solve is warm (~1 ms). The
    start never changes the answer: HiGHS checks it and still proves optimality."""
    import highspy  # noqa: PLC0415 - loaded with PuLP by _pulp()

    lp = mip.getLp()
    integer = highspy.HighsVarType.kInteger
    ints = [j for j, kind in enumerate(lp.integrality_) if kind == integer] if len(lp.integrality_) else []
    if not ints:
        return None
    relaxed = highspy.Highs()
    relaxed.setOptionValue("output_flag", False)
    threads = mip.getOptionValue("threads")  # (status, value) in the highspy versions setup.cfg allows
    relaxed.setOptionValue("threads", threads[1] if isinstance(threads, tuple) else threads)
    relaxed.passModel(lp)
    for j in ints:
        relaxed.changeColIntegrality(j, highspy.HighsVarType.kContinuous)
    lower, upper, cost = list(lp.col_lower_), list(lp.col_upper_), list(lp.col_cost_)

    def solved() -> bool:
        relaxed.run()
        return relaxed.getModelStatus() == highspy.HighsModelStatus.kOptimal

    if not solved():
        return None
    for _ in range(DIVE_SOLVES_PER_INTEGER * len(ints)):
        x = relaxed.getSolution().col_value
        fractional = [(x[j] - math.floor(x[j] + 1e-9), j) for j in ints]
        fractional = [(f, j) for f, j in fractional if 1e-6 < f < 1 - 1e-6]
        if not fractional:
            break
        _, j = max(fractional)
        lower[j] = math.ceil(x[j] - 1e-9)
        relaxed.changeColBounds(j, lower[j], upper[j])
        if not solved():
            lower[j], upper[j] = lp.col_lower_[j], math.floor(x[j] + 1e-9)
            relaxed.changeColBounds(j, lower[j], upper[j])
            if not solved():
                return None
    else:
        return None
    counts = {j: round(relaxed.getSolution().col_value[j]) for j in ints}
    for j, n in counts.items():
        relaxed.changeColBounds(j, n, n)
    if not solved():
        return None
    tries = DIVE_SOLVES_PER_INTEGER * len(ints)  # the same bound for the polish: a large fleet stays cheap
    for j in sorted(ints, key=lambda j: -cost[j]):  # one fewer of each, dearest first, while it still fits
        while counts[j] - 1 >= lp.col_lower_[j] and tries > 0:
            tries -= 1
            relaxed.changeColBounds(j, counts[j] - 1, counts[j] - 1)
            if not solved():
                relaxed.changeColBounds(j, counts[j], counts[j])
                break
            counts[j] -= 1
    if not solved():
        return None
    start = relaxed.getSolution()
    values = list(start.col_value)
    for j, n in counts.items():
        values[j] = float(n)
    start.col_value = values
    return start


def extract_allocation(config: Config, variables: ModelVariables) -> tuple[dict[str, int], dict]:
    """Integer counts and per-bucket shares from a solved model, rounded clean of solver noise."""
    pulp = _pulp()

    counts = {g.name: 0 for g in config.gpus}
    for name, var in variables.count.items():
        total = int(round(pulp.value(var) or 0))
        group = variables.members.get(name) or [config.gpu(name)]
        if len(group) == 1:
            counts[name] = total
            continue
        fixed = {g.name: int(round(pulp.value(variables.offer[g.name]) or 0)) for g in group
                 if g.name in variables.integral}
        counts.update(fixed)
        counts.update(_fill_cheapest([g for g in group if g.name not in fixed], total - sum(fixed.values())))
    routing: dict[Bucket, dict[str, float]] = {}
    for (b, g), expr in variables.share.items():
        value = min(max(pulp.value(expr) or 0.0, 0.0), 1.0)
        if value > 1e-9:
            routing.setdefault(b, {})[g] = value
    for b, shares in routing.items():  # exact fractions for sliced forms; renormalise solver noise for split
        share_sum = sum(shares.values())
        denominator = config.slice_factor if len(shares) > 1 else 1
        routing[b] = {g: _snap(s / share_sum, denominator) for g, s in shares.items()}
    for b, shares in routing.items():  # a class's share is spread over its offers in proportion to their counts
        spread: dict[str, float] = {}
        for name, share in shares.items():
            group = ([g for member in variables.classes[name] for g in variables.members[member]]
                     if name in variables.classes else variables.members.get(name) or [config.gpu(name)])
            instances = sum(counts[column.name] for column in group)
            for column in group:
                if len(group) == 1 or counts[column.name]:
                    spread[column.name] = share * counts[column.name] / instances if len(group) > 1 else share
        routing[b] = spread
    return counts, routing


def _fill_cheapest(group: list[GpuSpec], total: int) -> dict[str, int]:
    """`total` instances spread over one type's offers at least cost (`cheapest_spread`); an allocation the solver
    returned always fits, so one that does not is a bug."""
    counts = cheapest_spread(group, total)
    if counts is None:
        raise AllocationCheckError(f"internal error, please report: {total} instances do not fit the offers of "
                                   f"{', '.join(g.name for g in group) or 'a GPU type'}")
    return counts


def cheapest_spread(group: list[GpuSpec], total: int) -> dict[str, int] | None:
    """`total` instances of one GPU type spread over its offers at least cost: each offer's min_count, then the
    cheapest offers up to their max_count; None if they do not fit. (The LP may split price ties fractionally;
    this is the integral spread of equal cost.)"""
    counts = {g.name: g.min_count for g in group}
    left = total - sum(counts.values())
    for g in sorted(group, key=lambda g: (g.cost, g.name)):
        room = left if g.max_count is None else min(left, g.max_count - counts[g.name])
        counts[g.name] += max(room, 0)
        left -= max(room, 0)
    return None if left else counts


def max_servable_fraction(config: Config, options: SolverOptions, caps: Sequence[SharedCap] = ()) -> float:
    """Largest share of every bucket's demand that the max_count limits and shared caps can carry (an LP)."""
    pulp = _pulp()

    check_coefficients(config)
    model = pulp.LpProblem("max_servable", pulp.LpMaximize)
    alpha = model.add_variable("alpha", 0, 1)
    model += alpha, "served_fraction"
    demand = [b for b in config.buckets if config.bucket_rate(b) > 0]
    x: dict[tuple[Bucket, str], Any] = {}
    for b in demand:
        for g in config.gpus:
            if g.tput(b) > 0:
                x[b, g.name] = model.add_variable(f"x_{b[0]}_{b[1]}_{len(x)}", 0, 1)
        model += pulp.lpSum(v for (bb, _), v in x.items() if bb == b) == alpha, f"serve_{b[0]}_{b[1]}"
    for k, g in enumerate(config.gpus):
        cap = config.headroom * g.max_count if g.max_count is not None else None
        if cap is not None:
            load = pulp.lpSum(x[b, g.name] * config.bucket_rate(b) / g.tput(b) for b in demand if (b, g.name) in x)
            model += load <= cap, f"capacity_{k}"
    for k, shared in enumerate(caps):
        gpus = [(config.gpu(column), n) for column, n in shared.columns]
        load = pulp.lpSum(n * x[b, g.name] * config.bucket_rate(b) / g.tput(b)
                          for g, n in gpus for b in demand if (b, g.name) in x)
        model += load <= config.headroom * shared.cap, f"shared_cap_{k}"
    run_model(model, SolverOptions(name=options.name, path=options.path))
    return pulp.value(alpha) or 0.0


def lp_bound(config: Config, options: SolverOptions, caps: Sequence[SharedCap] = ()) -> float | None:
    pulp = _pulp()

    model, _ = build_model(config, Formulation.SPLIT, relax=True, caps=caps)
    status, _ = run_model(model, SolverOptions(name=options.name, path=options.path))
    return pulp.value(model.objective) if status is SolveStatus.OPTIMAL else None


def _snap(value: float, denominator: int) -> float:
    """Snap solver noise to the nearest k/denominator when within tolerance (slices give exact fractions)."""
    nearest = round(value * denominator) / denominator
    return nearest if abs(nearest - value) < 1e-7 else value


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name)


def _bundled_cbc() -> str | None:
    """The CBC binary PuLP ships (used through COIN_CMD: PULP_CBC_CMD itself is deprecated in PuLP 3.3)."""
    pulp = _pulp()

    path = getattr(pulp.PULP_CBC_CMD, "pulp_cbc_path", None)
    return path if path and os.path.isfile(path) else None


@contextlib.contextmanager
def _quiet_stdout(enabled: bool) -> Iterator[None]:
    """Silence a C library writing to fd 1 (HiGHS prints a banner whatever PuLP's `msg` says; `--json` needs a
    clean stdout)."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
