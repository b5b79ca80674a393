"""Properties of the Mélange solver, checked from the outside on small generated instances.

Each generated instance is a plain config dict with integer demand weights, integer rates and integer
throughputs, so every load is a small rational number and a float tolerance of 1e-9 separates "fits" from
"does not fit" without ambiguity. Expected values are computed here from that dict (never from the package's
own helpers), so a test fails when the solver, its presolve or its post-processing is wrong.
"""
from __future__ import annotations

import importlib.util
import itertools
import math

import pulp
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from melange_sky.core.config import parse_config
from melange_sky.errors import InfeasibleAllocation
from melange_sky.solver.model import SharedCap, SolverOptions, build_model, run_model
from melange_sky.solver.result import solve

HAS_HIGHS = importlib.util.find_spec("highspy") is not None
#: Capacity slack for the brute force (loads are small rationals; 1e-9 only absorbs float rounding).
FIT = 1e-9
#: Slack for checking solver output (MILP solvers work to ~1e-7 feasibility; split shares come back rounded).
SLACK = 1e-6
#: Cost comparisons: prices have two decimals and counts are small, so costs differ by >= 0.01 or not at all.
COST = 1e-6

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMULATION_NAMES = ("slices", "paper", "split")


# ---- instances -----------------------------------------------------------------------------------------------------
@st.composite
def instances(draw, max_rows=3, max_cols=3, max_gpus=4, max_slices=3, max_rate=12, limits=False):
    """A valid config dict: every bucket with demand has at least one GPU type that can serve it.

    With `limits`, GPU types may carry min_count and max_count (so some instances have no feasible fleet)."""
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    weights = [[draw(st.integers(0, 4)) for _ in range(cols)] for _ in range(rows)]
    if not any(any(row) for row in weights):
        weights[draw(st.integers(0, rows - 1))][draw(st.integers(0, cols - 1))] = 1
    n_gpus = draw(st.integers(1, max_gpus))
    gpus = {}
    for k in range(n_gpus):
        spec = {"cost": draw(st.integers(10, 400)) / 100,
                "tputs": [[draw(st.integers(0, 12)) for _ in range(cols)] for _ in range(rows)]}
        if limits:
            min_count = draw(st.integers(0, 2)) if draw(st.booleans()) else 0
            if min_count:
                spec["min_count"] = min_count
            max_count = draw(st.none() | st.integers(min_count, min_count + 3))
            if max_count is not None:
                spec["max_count"] = max_count
        gpus[f"G{k}-x"] = spec
    names = list(gpus)
    for i, j in itertools.product(range(rows), range(cols)):  # config validation rejects unservable demand
        if weights[i][j] and not any(gpus[g]["tputs"][i][j] for g in names):
            gpus[names[draw(st.integers(0, n_gpus - 1))]]["tputs"][i][j] = draw(st.integers(1, 12))
    data = {"workload_distribution": weights, "total_request_rate": draw(st.integers(1, max_rate)),
            "slice_factor": draw(st.integers(1, max_slices)), "gpu_info": gpus}
    headroom = draw(st.sampled_from([None, 1.0, 0.9, 0.8, 0.75, 0.5]))
    if headroom is not None:
        data["headroom"] = headroom
    return data


def small_instances(limits=False):
    """Instances small enough to enumerate every slice assignment (<= 6 buckets, <= 3 GPU types, S <= 3)."""
    return instances(max_rows=2, max_cols=3, max_gpus=3, max_slices=3, limits=limits)


# ---- plain-Python view of a config dict (independent of melange_sky) --------------------------------------------
def headroom(data: dict) -> float:
    return data.get("headroom", 1.0)


def demand(data: dict) -> dict[tuple[int, int], float]:
    """Rate (req/s) of every bucket with demand: its share of the normalised distribution times the total."""
    weights = data["workload_distribution"]
    total = sum(map(sum, weights))
    return {(i, j): w / total * data["total_request_rate"]
            for i, row in enumerate(weights) for j, w in enumerate(row) if w > 0}


def tput(data: dict, gpu: str, bucket: tuple[int, int]) -> float:
    return data["gpu_info"][gpu]["tputs"][bucket[0]][bucket[1]]


def fleet_cost(data: dict, counts: dict[str, int]) -> float:
    return sum(data["gpu_info"][g]["cost"] * n for g, n in counts.items())


def load_alone(data: dict, gpu: str) -> float:
    """GPUs' worth of work if `gpu` served every bucket with demand it can serve."""
    return sum(r / tput(data, gpu, b) for b, r in demand(data).items() if tput(data, gpu, b) > 0)


# ---- running the solver ------------------------------------------------------------------------------------------
def optimum(data: dict, formulation: str = "slices", solver: str | None = None):
    """The solve result (default solver unless named), or None when the solver reports that no fleet fits."""
    options = SolverOptions() if solver is None else SolverOptions(name=solver)
    try:
        return solve(parse_config(data), formulation, options, compare=False)
    except InfeasibleAllocation:
        return None


def cost_or_none(result) -> float | None:
    return None if result is None else result.cost


def lp_bound(data: dict) -> float | None:
    """Optimal cost with every variable continuous (None when even that is infeasible)."""
    model, _ = build_model(parse_config(data), "split", relax=True)
    status, _ = run_model(model, SolverOptions())
    return pulp.value(model.objective) if status == "optimal" else None


def assert_same_cost(a: float | None, b: float | None) -> None:
    assert (a is None) == (b is None), (a, b)
    if a is not None:
        assert a == pytest.approx(b, abs=COST)


# ---- brute force ---------------------------------------------------------------------------------------------------
def compositions(total: int, parts: int):
    """Every tuple of `parts` non-negative integers summing to `total`."""
    return [c for c in itertools.product(range(total + 1), repeat=parts) if sum(c) == total]


def brute_force_cheapest(data: dict, cost_of=None) -> tuple[float, dict[str, int]] | None:
    """Cheapest fleet under the slices model by enumeration, or None when no count vector can serve the load.

    Enumerates every way to hand each bucket's S slices to the GPU types that can serve it (bucket by bucket,
    merging equal partial load vectors), turns each total load vector into the count vector it needs, then
    walks every count vector y in [min_count, bound] (bound = what the type alone would need, capped by
    max_count) in order of cost and returns the first y that some assignment fits into. `cost_of(k, n)` replaces
    cost x n as the price of n GPUs of type k (a type spread over several offers)."""
    names = list(data["gpu_info"])
    S, h = data["slice_factor"], headroom(data)
    specs = [data["gpu_info"][g] for g in names]
    low = [spec.get("min_count", 0) for spec in specs]

    loads = {(0.0,) * len(names)}
    for b, rate in demand(data).items():
        servers = [k for k, g in enumerate(names) if tput(data, g, b) > 0]
        ways = []  # the load vector of every way to split this bucket's slices among its servers
        for split in compositions(S, len(servers)):
            way = [0.0] * len(names)
            for k, n in zip(servers, split):
                way[k] = n / S * rate / tput(data, names[k], b)
            ways.append(way)
        loads = {tuple(round(a + w, 12) for a, w in zip(load, way)) for load in loads for way in ways}
    needs = minimal({tuple(max(lo, math.ceil(l / h - FIT)) for lo, l in zip(low, load)) for load in loads})

    ranges = []
    for k, g in enumerate(names):
        high = max(low[k], math.ceil(load_alone(data, g) / h - FIT))
        if "max_count" in specs[k]:
            high = min(high, specs[k]["max_count"])
        ranges.append(range(low[k], high + 1))
    cost_of = cost_of or (lambda k, n: specs[k]["cost"] * n)
    price = {y: sum(cost_of(k, n) for k, n in enumerate(y)) for y in itertools.product(*ranges)}
    for y in sorted(price, key=price.get):
        if any(all(n <= m for n, m in zip(need, y)) for need in needs):
            return price[y], dict(zip(names, y))
    return None


def minimal(vectors: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The vectors no other vector is componentwise below (enough to decide "fits in y" for any y)."""
    kept: list[tuple[int, ...]] = []
    for v in sorted(vectors, key=sum):
        if not any(all(a <= b for a, b in zip(k, v)) for k in kept):
            kept.append(v)
    return kept


# ---- outside checks of one allocation ------------------------------------------------------------------------------
def assert_allocation_valid(data: dict, result, formulation: str) -> None:
    """The allocation serves every bucket, fits every GPU type's capacity and respects count limits."""
    names = list(data["gpu_info"])
    rates = demand(data)
    h, S = headroom(data), data["slice_factor"]
    assert result.status == "optimal"
    assert set(result.counts) == set(names)
    routes = {r.bucket: r for r in result.routing}
    assert set(rates) <= set(routes), "a bucket with demand has no route"

    load = dict.fromkeys(names, 0.0)
    for b, rate in rates.items():
        route = routes[b]
        assert route.rate == pytest.approx(rate)
        assert sum(route.shares.values()) == pytest.approx(1.0, abs=SLACK)
        for g, share in route.shares.items():
            assert share >= 0
            assert share == 0 or tput(data, g, b) > 0, f"bucket {b} routed to {g}, which has tput 0 for it"
            if formulation != "split":  # whole slices: every share is a multiple of 1/S
                assert share * S == pytest.approx(round(share * S), abs=SLACK)
            if share:
                load[g] += share * rate / tput(data, g, b)

    for alloc in result.gpus:
        spec = data["gpu_info"][alloc.name]
        assert isinstance(alloc.count, int)
        assert alloc.price == spec["cost"]
        assert spec.get("min_count", 0) <= alloc.count
        assert alloc.count <= spec.get("max_count", alloc.count)
        assert load[alloc.name] <= h * alloc.count + SLACK, f"{alloc.name} over capacity"
        assert alloc.load == pytest.approx(load[alloc.name], abs=SLACK)
    assert result.cost == pytest.approx(fleet_cost(data, result.counts), abs=COST)


# ---- 1. slices == paper ------------------------------------------------------------------------------------------
@PROPERTY
@given(instances(limits=True))
def test_slices_and_paper_formulations_reach_the_same_optimal_cost(data):
    assert_same_cost(cost_or_none(optimum(data, "slices")), cost_or_none(optimum(data, "paper")))


# ---- 2. split <= slices, LP <= everything --------------------------------------------------------------------------
@PROPERTY
@given(instances(limits=True))
def test_split_is_never_dearer_than_slices_and_lp_relaxation_bounds_every_formulation(data):
    costs = {f: cost_or_none(optimum(data, f)) for f in FORMULATION_NAMES}
    event(f"feasible: {', '.join(f for f, c in costs.items() if c is not None) or 'none'}")
    bound = lp_bound(data)
    if costs["split"] is None:  # split relaxes the sliced forms: nothing fits them either
        assert costs["slices"] is None and costs["paper"] is None
    elif costs["slices"] is not None:
        assert costs["split"] <= costs["slices"] + COST
    for formulation, cost in costs.items():
        if cost is not None:
            assert bound is not None, f"LP relaxation infeasible but {formulation} found a fleet"
            assert bound <= cost + COST, formulation


@PROPERTY
@given(instances())
def test_solve_with_compare_reports_a_lower_bound_and_the_cheaper_split_fleet(data):
    config = parse_config(data)
    result = solve(config, "slices")
    split = solve(config, "split", compare=False)
    assert lp_bound(data) - COST <= result.lower_bound <= result.cost + COST
    assert result.lower_bound >= split.cost - COST  # the split optimum is a proven bound too
    if split.cost < result.cost - COST:
        assert result.alternative is not None
        assert result.alternative.cost == pytest.approx(split.cost, abs=COST)
        assert fleet_cost(data, result.alternative.counts) == pytest.approx(split.cost, abs=COST)
    else:
        assert result.alternative is None


# ---- 3. brute force ----------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_instances(limits=True))
def test_slices_optimum_equals_brute_force_enumeration_and_infeasibility_matches(data):
    expected = brute_force_cheapest(data)
    event("infeasible" if expected is None else "feasible")
    result = optimum(data, "slices")
    if expected is None:
        assert result is None, f"brute force finds no fleet, solver returned {result and result.counts}"
    else:
        assert result is not None, f"solver says infeasible, brute force found {expected[1]}"
        assert result.cost == pytest.approx(expected[0], abs=COST), (result.counts, expected[1])


def test_brute_force_itself_sees_slice_infeasibility_that_split_avoids():
    # 15 req/s of one bucket, two GPUs each capped at one 10 req/s instance: whole slices (S=1) cannot fit,
    # halves (S=2) can. Guards the brute force (and solve) against trivially returning "feasible".
    data = {"workload_distribution": [[1]], "total_request_rate": 15, "slice_factor": 1,
            "gpu_info": {"A": {"cost": 1.0, "tputs": [[10]], "max_count": 1},
                         "B": {"cost": 2.0, "tputs": [[10]], "max_count": 1}}}
    assert brute_force_cheapest(data) is None
    with pytest.raises(InfeasibleAllocation):
        solve(parse_config(data), "slices")
    assert optimum(data, "split").counts == {"A": 1, "B": 1}
    data["slice_factor"] = 2
    assert brute_force_cheapest(data) == (3.0, {"A": 1, "B": 1})
    assert optimum(data, "slices").cost == pytest.approx(3.0)


@pytest.mark.parametrize("formulation, data, cost, counts", [
    # 9 req/s in 2 slices of 4.5: a slice loads A (2 req/s) with 2.25 GPUs, B (4 req/s) with 1.125. Both slices on
    # B need 3 B (3.00); one each needs 3 A + 2 B (5.00); both on A exceed A's max_count. CBC paper says 5.00.
    ("paper", {"workload_distribution": [[1]], "total_request_rate": 9, "slice_factor": 2,
               "gpu_info": {"A": {"cost": 1.0, "tputs": [[2]], "max_count": 3},
                            "B": {"cost": 1.0, "tputs": [[4]], "max_count": 3}}},
     3.0, {"A": 0, "B": 3}),
    # Found by the HiGHS-vs-CBC property: CBC slices says 2 A + 4 B (1.00), the optimum is 3 A + 3 B (0.90).
    ("slices", {"workload_distribution": [[3, 1, 1]], "total_request_rate": 12, "slice_factor": 2, "headroom": 0.5,
                "gpu_info": {"A": {"cost": 0.1, "tputs": [[5, 9, 6]], "max_count": 3},
                             "B": {"cost": 0.2, "tputs": [[3, 0, 3]]}}},
     0.9, {"A": 3, "B": 3}),
])
def test_default_solver_finds_the_optimum_where_bundled_cbc_preprocessing_does_not(formulation, data, cost, counts):
    # PuLP's bundled CBC 2.10.3 answers these with a dearer fleet labelled "optimal" (its preprocessing wrongly fixes
    # variables): the reason HiGHS is the default solver.
    assert brute_force_cheapest(data) == (pytest.approx(cost), counts)
    assert solve(parse_config(data), formulation, compare=False).cost == pytest.approx(cost)


# ---- 4. invariants of every returned allocation --------------------------------------------------------------------
@PROPERTY
@given(instances(limits=True), st.sampled_from(FORMULATION_NAMES))
def test_every_returned_allocation_serves_all_demand_within_capacity_and_limits(data, formulation):
    result = optimum(data, formulation)
    if result is not None:
        assert_allocation_valid(data, result, formulation)


# ---- 5. baselines ------------------------------------------------------------------------------------------------
@PROPERTY
@given(instances())
def test_baselines_are_single_type_fleets_and_the_mix_is_never_dearer(data):
    result = solve(parse_config(data), "slices", compare=False)
    rates, h = demand(data), headroom(data)
    by_gpu = {b.gpu: b for b in result.baselines}
    assert set(by_gpu) == set(data["gpu_info"])
    for g, spec in data["gpu_info"].items():
        baseline = by_gpu[g]
        if any(tput(data, g, b) == 0 for b in rates):
            assert baseline.count is None and baseline.cost is None and baseline.reason
        else:
            load = sum(r / tput(data, g, b) for b, r in rates.items())
            assert baseline.count == math.ceil(load / h - FIT)
            assert baseline.cost == pytest.approx(baseline.count * spec["cost"])
            assert baseline.reason is None
    feasible = [b.cost for b in result.baselines if b.cost is not None]
    if feasible:
        assert result.cost <= min(feasible) + COST


# ---- 6. dominance presolve -----------------------------------------------------------------------------------------
@PROPERTY
@given(instances(), st.data())
def test_a_dearer_copy_of_a_gpu_changes_nothing_and_is_never_bought(data, extra):
    names = list(data["gpu_info"])
    original = names[extra.draw(st.integers(0, len(names) - 1), label="copied GPU")]
    copy = {"cost": data["gpu_info"][original]["cost"] + extra.draw(st.integers(1, 200), label="cents more") / 100,
            "tputs": [list(row) for row in data["gpu_info"][original]["tputs"]]}
    position = extra.draw(st.integers(0, len(names)), label="position of the copy")
    items = list(data["gpu_info"].items())
    items.insert(position, ("copy", copy))
    with_copy = {**data, "gpu_info": dict(items)}
    for formulation in ("slices", "split"):
        before, after = optimum(data, formulation), optimum(with_copy, formulation)
        assert after.cost == pytest.approx(before.cost, abs=COST), formulation
        assert after.counts["copy"] == 0, formulation


# ---- 7. hand-computed cases --------------------------------------------------------------------------------------
def one_bucket(rate: float, gpus: dict, slice_factor: int = 1, **extra) -> dict:
    return {"workload_distribution": [[1]], "total_request_rate": rate, "slice_factor": slice_factor,
            "gpu_info": {name: {"cost": cost, "tputs": [[t]]} for name, (cost, t) in gpus.items()}, **extra}


@pytest.mark.parametrize("data, cost, counts", [
    # one type: 10 req/s at 4 req/s per GPU is 2.5 GPUs of work -> 3 GPUs
    (one_bucket(10, {"A": (2.0, 4)}), 6.0, {"A": 3}),
    # headroom 0.5 doubles it: 2.5 / 0.5 = 5 GPUs
    (one_bucket(10, {"A": (2.0, 4)}, headroom=0.5), 10.0, {"A": 5}),
    # A costs 0.10 per req/s, B 0.125: 4 x A (4.00) beats 2 x B (5.00) and any mix (3 A + 1 B = 5.50)
    (one_bucket(40, {"A": (1.0, 10), "B": (2.5, 20)}), 4.0, {"A": 4, "B": 0}),
    # 25 req/s: whole-bucket A needs 3 (3.00), B needs 2 (5.00)
    (one_bucket(25, {"A": (1.0, 10), "B": (2.5, 20)}), 3.0, {"A": 3, "B": 0}),
    # B is cheaper per request (0.05 vs 0.15 $/h per req/s), but 5 req/s needs just one GPU of either: A wins
    (one_bucket(5, {"A": (1.5, 10), "B": (2.0, 40)}), 1.5, {"A": 1, "B": 0}),
    # each GPU serves only one of two buckets: the mix is one of each, and neither alone is a baseline
    ({"workload_distribution": [[0.5, 0.5]], "total_request_rate": 20,
      "gpu_info": {"A": {"cost": 1.0, "tputs": [[10, 0]]}, "B": {"cost": 2.0, "tputs": [[0, 10]]}}},
     3.0, {"A": 1, "B": 1}),
])
@pytest.mark.parametrize("formulation", ["slices", "paper"])
def test_hand_computed_optimum(data, cost, counts, formulation):
    result = solve(parse_config(data), formulation)
    assert result.cost == pytest.approx(cost)
    assert result.counts == counts


def test_two_single_bucket_gpus_have_no_single_type_baseline():
    data = {"workload_distribution": [[0.5, 0.5]], "total_request_rate": 20,
            "gpu_info": {"A": {"cost": 1.0, "tputs": [[10, 0]]}, "B": {"cost": 2.0, "tputs": [[0, 10]]}}}
    result = solve(parse_config(data), "slices")
    assert all(b.count is None and b.reason for b in result.baselines)
    assert result.best_baseline is None and result.saving is None


def test_max_count_below_the_load_is_infeasible():
    data = one_bucket(20, {"A": (1.0, 10)})  # needs 2 GPUs of A
    data["gpu_info"]["A"]["max_count"] = 1
    with pytest.raises(InfeasibleAllocation):
        solve(parse_config(data))
    data["gpu_info"]["A"]["max_count"] = 2
    assert solve(parse_config(data)).counts == {"A": 2}


MELANGE_EXAMPLE = {
    "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2]]},
                 "A100-80GB": {"cost": 3.67, "tputs": [[20, 20], [40, 20]]}},
    "workload_distribution": [[0.2, 0.1], [0.5, 0.2]],
    "total_request_rate": 30,
    "slice_factor": 1,
}


@pytest.mark.parametrize("formulation", ["slices", "paper"])
def test_original_melange_example_sliced(formulation):
    result = solve(parse_config(MELANGE_EXAMPLE), formulation)
    assert result.cost == pytest.approx(6.70)
    assert result.counts == {"A10G": 3, "A100-80GB": 1}
    assert result.alternative is not None and result.alternative.cost == pytest.approx(4.68)
    assert result.lower_bound == pytest.approx(4.68)
    assert {b.gpu: b.count for b in result.baselines} == {"A10G": 12, "A100-80GB": 2}


def test_original_melange_example_split():
    result = solve(parse_config(MELANGE_EXAMPLE), "split")
    assert result.cost == pytest.approx(4.68)
    assert result.counts == {"A10G": 1, "A100-80GB": 1}
    shares = {r.bucket: r.shares for r in result.routing}
    assert shares[1, 0]["A10G"] == pytest.approx(1 / 3, abs=SLACK)
    assert shares[1, 0]["A100-80GB"] == pytest.approx(2 / 3, abs=SLACK)
    for bucket in [(0, 0), (0, 1), (1, 1)]:  # one A10G is full with 1/3 of bucket (1, 0): the rest is A100's
        assert shares[bucket] == {"A100-80GB": pytest.approx(1.0)}
    assert_allocation_valid(MELANGE_EXAMPLE, result, "split")


# ---- 8. CBC (optional solver) against the default --------------------------------------------------------------
@PROPERTY
@given(instances(limits=True))
def test_cbc_never_beats_the_default_solvers_proven_optimum(data):
    # Bundled CBC occasionally returns a dearer fleet (see above), so only the sound direction is asserted: every CBC
    # fleet is valid, and none is cheaper than the default solver's optimum (that would prove the default wrong).
    default, cbc = optimum(data, "slices"), optimum(data, "slices", "cbc")
    if cbc is not None:
        assert_allocation_valid(data, cbc, "slices")
        assert default is not None, "the default solver called a problem infeasible that CBC solved"
        assert default.cost <= cbc.cost + 1e-9


# ---- one GPU type at several offers (--per-offer columns) -----------------------------------------------------------
def fill_cost(offers: list[tuple[float, int | None]], n: int) -> float:
    """Cheapest price of n instances over offers (price, cap): cheapest first, each up to its cap."""
    total, left = 0.0, n
    for price, cap in sorted(offers, key=lambda o: o[0]):
        take = left if cap is None else min(left, cap)
        total, left = total + take * price, left - take
    return total if left == 0 else math.inf


@st.composite
def spread_instances(draw):
    """A small instance, per GPU type 1-3 offers (price, cap or None), and per type maybe a cap shared by all its
    offers together (a regional quota)."""
    data = draw(small_instances())
    offers = {g: [(draw(st.integers(10, 400)) / 100, draw(st.none() | st.integers(0, 3)))
                  for _ in range(draw(st.integers(1, 3)))] for g in data["gpu_info"]}
    shared = {g: cap for g in data["gpu_info"] if (cap := draw(st.none() | st.integers(0, 4))) is not None}
    return data, offers, shared


#: Issue 12's counterexample: G1's cheap offer is capped at 1, so the second G1 comes from its $0.14 offer: G1 x 2
#: = $0.24. The presolve dropped that offer for G2 ($0.13, as fast, uncapped) and answered G2 x 2 = $0.26.
CAPPED_FILL_CASE = ({"workload_distribution": [[1]], "total_request_rate": 2, "slice_factor": 1,
                     "gpu_info": {"G0-x": {"cost": 1.0, "tputs": [[0]]}, "G1-x": {"cost": 1.0, "tputs": [[1]]},
                                  "G2-x": {"cost": 1.0, "tputs": [[1]]}}},
                    {"G0-x": [(1.0, None)], "G1-x": [(0.14, None), (0.10, 1)], "G2-x": [(0.13, None)]}, {})


def spread_over_offers(data: dict, offers: dict):
    """The config `--per-offer` would make: one column per (type, offer) with the offer's price and cap."""
    import dataclasses

    base = parse_config(data)
    columns = tuple(dataclasses.replace(g, name=f"{g.name}@o{k}", entry=g.name, cost=price, max_count=cap)
                    for g in base.gpus for k, (price, cap) in enumerate(offers[g.name]))
    return dataclasses.replace(base, gpus=columns)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spread_instances())
@example(CAPPED_FILL_CASE)
def test_a_type_spread_over_priced_and_capped_offers_costs_the_cheapest_fill(case):
    """Per-offer columns of one GPU entry form one type: the optimum is the brute-force optimum over type totals,
    each total priced by filling the cheapest offers first within their quotas, in every formulation."""
    data, offers, shared = case
    config = spread_over_offers(data, offers)
    caps = [SharedCap(f"{g}.quotas", tuple((f"{g}@o{k}", 1) for k in range(len(offers[g]))), cap)
            for g, cap in shared.items()]
    names = list(data["gpu_info"])
    typed = {**data, "gpu_info": {g: {**spec} for g, spec in data["gpu_info"].items()}}
    for g, spec in typed["gpu_info"].items():
        limits = [sum(cap for _, cap in offers[g])] if all(cap is not None for _, cap in offers[g]) else []
        limits += [shared[g]] if g in shared else []
        if limits:
            spec["max_count"] = min(limits)
    expected = brute_force_cheapest(typed, cost_of=lambda k, n: fill_cost(offers[names[k]], n))
    for formulation in ("slices", "paper"):
        try:
            result = solve(config, formulation, compare=False, caps=caps)
        except InfeasibleAllocation:
            result = None
        assert_same_cost(cost_or_none(result), None if expected is None else expected[0])
        if result is not None:
            totals = {g: sum(result.counts[f"{g}@o{k}"] for k in range(len(offers[g]))) for g in names}
            assert fill_cost([(p, c) for p, c in offers[names[0]]], totals[names[0]]) < math.inf
            for g in names:  # within every quota, and routed only to offers that have instances
                for k, (_, cap) in enumerate(offers[g]):
                    assert cap is None or result.counts[f"{g}@o{k}"] <= cap
                assert g not in shared or totals[g] <= shared[g]
            for route in result.routing:
                assert all(result.counts[name] > 0 for name in route.shares)


def test_a_capped_cheap_offer_and_a_dearer_uncapped_one_beat_a_type_between_them():
    """Issue 12: G1 at $0.10 (1 at most) + G1 at $0.14 = $0.24 beats G2 x 2 = $0.26."""
    result = solve(spread_over_offers(*CAPPED_FILL_CASE[:2]), compare=False)
    assert result.cost == pytest.approx(0.24)
    assert {name: n for name, n in result.counts.items() if n} == {"G1-x@o0": 1, "G1-x@o1": 1}


# ---- markets: spot beside on-demand under a spot block -----------------------------------------------------------
@st.composite
def market_instances(draw):
    """A small instance under a spot block: each GPU type on demand in r0 and spot in one or two of r0-r2 at a
    discount (maybe capped), with a floor and a regional share drawn."""
    import dataclasses

    from melange_sky.core.config import Market, SpotPolicy

    base = parse_config(draw(small_instances()))
    columns = []
    for g in base.gpus:
        on_demand = dataclasses.replace(g, entry=g.name, cloud="c", region="r0", market=Market.ON_DEMAND)
        columns.append(on_demand)
        for region in draw(st.lists(st.sampled_from(["r0", "r1", "r2"]), min_size=1, max_size=2, unique=True)):
            columns.append(dataclasses.replace(
                on_demand, name=f"{g.name}@{region}:spot", region=region, use_spot=True, market=Market.SPOT,
                cost=round(g.cost * draw(st.integers(3, 9)) / 10, 2), max_count=draw(st.none() | st.integers(0, 3))))
    policy = SpotPolicy(floor=draw(st.sampled_from([0.0, 0.5, 1.0])),
                        max_region_share=draw(st.sampled_from([0.5, 1.0])))
    return dataclasses.replace(base, gpus=tuple(columns), spot=policy)


def market_cost(config, formulation: str) -> float | None:
    from melange_sky.solver.model import Formulation
    from melange_sky.solver.result import solve_fleet

    try:
        return solve_fleet(config, Formulation(formulation)).cost
    except InfeasibleAllocation:
        return None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(market_instances())
def test_with_markets_one_gpus_spot_and_on_demand_serving_as_one_class_is_exact_for_split(config):
    """Work goes to a GPU whichever market its instances are in (one class, its capacity the sum of both): for
    split that is the same optimum as a separate type per market, which divides a class's share by counts."""
    import dataclasses

    apart = dataclasses.replace(config, gpus=tuple(
        dataclasses.replace(g, entry=f"{g.entry}#spot") if not g.reliable else g for g in config.gpus))
    cost = market_cost(config, "split")
    event("feasible" if cost is not None else "infeasible")
    assert_same_cost(cost, market_cost(apart, "split"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(market_instances())
def test_with_markets_slices_from_splits_bound_is_the_plain_slices_models_optimum(config):
    """`slices` under a spot block starts from `split`'s optimum (a fit at its counts, else a search bounded by
    it): the same cost as solving the plain slices model, never below the split optimum."""
    model, _ = build_model(config, "slices")
    status, _ = run_model(model, SolverOptions())
    plain = pulp.value(model.objective) if status == "optimal" else None
    fast = market_cost(config, "slices")
    assert_same_cost(fast, plain)
    split = market_cost(config, "split")
    assert split is not None or fast is None  # split relaxes slices
    if fast is not None and split is not None:
        assert split <= fast + COST


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(market_instances(), st.sampled_from(["r0", "r1", "r2"]))
def test_with_markets_a_re_plan_keeping_the_spot_replicas_left_after_a_regional_loss_always_has_a_fleet(config,
                                                                                                        lost):
    """What a re-plan after a spot loss asks (issue 20): the spot columns of one region gone, every other spot
    replica kept (its count as min_count). On-demand is uncapped here, so a fleet always exists: the spread may not
    make the kept replicas infeasible; a region's share rises to what already runs there, and no more is added."""
    import dataclasses

    from melange_sky.solver.model import Formulation, spot_region
    from melange_sky.solver.result import solve_fleet

    try:
        first = solve_fleet(config, Formulation.SPLIT)
    except InfeasibleAllocation:
        return  # a quota of 0 somewhere: nothing to re-plan
    kept = tuple(dataclasses.replace(g, min_count=first.counts[g.name]) if not g.reliable else g
                 for g in config.gpus if g.reliable or g.region != lost)
    again = dataclasses.replace(config, gpus=kept)
    for formulation in (Formulation.SPLIT, Formulation.SLICES):
        result = solve_fleet(again, formulation)  # raises InfeasibleAllocation if the kept replicas broke it
        event(f"kept spot: {sum(g.min_count for g in kept if not g.reliable) > 0}")
        spot = {g.name: g.count for g in result.gpus if g.market == "spot"}
        for g in kept:
            if not g.reliable:
                assert spot[g.name] >= g.min_count
        kappa, total = config.spot.max_region_share, sum(spot.values())
        for region in {spot_region(g) for g in kept if not g.reliable}:
            here = sum(n for name, n in spot.items() if spot_region(again.gpu(name)) == region)
            held = sum(g.min_count for g in kept if not g.reliable and spot_region(g) == region)
            assert here - held <= kappa * (total - held) + SLACK  # what is added keeps the spread


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(market_instances())
def test_with_markets_split_tuned_for_speed_reaches_the_default_highs_optimum(config):
    """`split` under a spot block runs HiGHS without its sub-MIP heuristics and restarts (MARKET_SPLIT_TUNING):
    the same proven optimum as the model solved with HiGHS's defaults."""
    model, _ = build_model(config, "split")
    status, _ = run_model(model, SolverOptions())
    plain = pulp.value(model.objective) if status == "optimal" else None
    event("feasible" if plain is not None else "infeasible")
    assert_same_cost(market_cost(config, "split"), plain)


def seeded_market_instance(seed: int):
    """A fixed instance under a spot block, drawn from `seed` (the bench's market instance in miniature): 2 x 2
    buckets, 3 GPU types at 3 clouds, each offer on demand and spot (spot at 0.3-0.7 x, half of them capped),
    regions r0/r1, floor 0.5, max_region_share 0.5."""
    import dataclasses
    import random

    from melange_sky.core.config import Market, SpotPolicy

    rng = random.Random(seed)
    rows, cols = 2, 2
    weights = [[rng.randint(1, 9) for _ in range(cols)] for _ in range(rows)]
    gpu_info = {}
    for k in range(3):
        speed = rng.uniform(1, 8)
        tputs = [[0 if (i == rows - 1 and k == 0) else round(speed * rng.uniform(0.5, 1.5) * (rows - i), 2)
                  for _ in range(cols)] for i in range(rows)]
        price = round(0.5 * speed * rng.uniform(0.8, 1.3), 2)
        for cloud in ("a", "b", "c"):
            spec = {"cost": round(price * rng.uniform(0.8, 1.35), 2), "tputs": tputs}
            if rng.random() < 0.5:
                spec["max_count"] = rng.randint(1, 4)
            gpu_info[f"G{k}@{cloud}"] = spec
    config = parse_config({"workload_distribution": weights, "total_request_rate": rng.randint(20, 60),
                           "gpu_info": gpu_info}, source=f"seeded-{seed}")
    columns = []
    for g in config.gpus:
        gpu, cloud = g.name.split("@")
        on_demand = dataclasses.replace(g, entry=gpu, cloud=cloud, region=f"r{rng.randrange(2)}",
                                        market=Market.ON_DEMAND)
        columns += [on_demand, dataclasses.replace(
            on_demand, name=f"{g.name}:spot", cost=round(g.cost * rng.uniform(0.3, 0.7), 2), use_spot=True,
            market=Market.SPOT, max_count=None if g.max_count is None else rng.randint(1, 4))]
    return dataclasses.replace(config, gpus=tuple(columns), spot=SpotPolicy(floor=0.5, max_region_share=0.5))


#: The proven optima of `seeded_market_instance(1..8)`: the plain split model under HiGHS's default options, and
#: `solve_fleet` at 15b4c8a (before root-only cuts and one thread in MARKET_SPLIT_TUNING) agree on every one.
SEEDED_MARKET_OPTIMA = {1: 15.14, 2: 17.46, 3: 6.82, 4: 12.38, 5: 13.01, 6: 6.36, 7: 11.83, 8: 7.32}


@pytest.mark.parametrize("seed", sorted(SEEDED_MARKET_OPTIMA))
def test_with_markets_split_tuned_for_speed_keeps_the_optimum_of_the_untuned_model(seed):
    """A speed-up of `split` under a spot block (HiGHS options, its thread count) may change how long a solve
    takes, never its answer: the same proven optimum as before, and the fleet it returns costs that much."""
    from melange_sky.solver.model import Formulation
    from melange_sky.solver.result import solve_fleet

    result = solve_fleet(seeded_market_instance(seed), Formulation.SPLIT)
    assert result.status == "optimal"
    assert result.cost == pytest.approx(SEEDED_MARKET_OPTIMA[seed], abs=COST)
    assert sum(g.count * g.price for g in result.gpus) == pytest.approx(result.cost, abs=COST)


@pytest.mark.parametrize("seed", [1, 4, 5])
def test_with_markets_the_dived_start_is_a_whole_fleet_that_fits_and_costs_no_less_than_the_optimum(seed):
    """The dive hands HiGHS a start (HiGHS would silently drop a bad one, and with it the speed-up): every integer
    variable whole, every row of the model within its bounds, and a cost no lower than the proven optimum."""
    import highspy

    from melange_sky.solver.model import _highs_class, dive_for_a_start

    model, _ = build_model(seeded_market_instance(seed), "split")
    solver = _highs_class()(msg=False)
    solver.createAndConfigureSolver(model)
    solver.buildSolverModel(model)
    mip = model.solverModel
    start = dive_for_a_start(mip)
    assert start is not None
    lp = mip.getLp()
    x = list(start.col_value)
    for j, kind in enumerate(lp.integrality_):
        if kind == highspy.HighsVarType.kInteger:
            assert x[j] == round(x[j])
    for j, value in enumerate(x):
        assert lp.col_lower_[j] - SLACK <= value <= lp.col_upper_[j] + SLACK
    matrix = lp.a_matrix_
    by_row = matrix.format_ == highspy.MatrixFormat.kRowwise
    rows = [0.0] * lp.num_row_
    for outer in range(lp.num_row_ if by_row else lp.num_col_):
        for k in range(matrix.start_[outer], matrix.start_[outer + 1]):
            i, j = (outer, matrix.index_[k]) if by_row else (matrix.index_[k], outer)
            rows[i] += matrix.value_[k] * x[j]
    for i, activity in enumerate(rows):
        assert lp.row_lower_[i] - SLACK <= activity <= lp.row_upper_[i] + SLACK
    cost = sum(c * v for c, v in zip(lp.col_cost_, x)) + lp.offset_
    assert cost >= SEEDED_MARKET_OPTIMA[seed] - COST


def test_a_split_solve_on_one_thread_between_default_solves_leaves_every_solve_proven():
    """HiGHS sizes one thread pool per process at its first run and refuses a run asking for another size; `split`
    under a spot block asks for one thread. Whatever ran before or runs after (here the default pool on either
    side), every solve still runs and proves its optimum."""
    import dataclasses

    from melange_sky.solver.model import Formulation
    from melange_sky.solver.result import solve_fleet

    markets = seeded_market_instance(6)
    plain = dataclasses.replace(markets, gpus=tuple(g for g in markets.gpus if g.reliable), spot=None)
    for config, formulation in [(plain, Formulation.SLICES), (markets, Formulation.SPLIT),
                                (plain, Formulation.SLICES), (markets, Formulation.SPLIT)]:
        assert solve_fleet(config, formulation).status == "optimal"
    assert solve_fleet(markets, Formulation.SPLIT).cost == pytest.approx(SEEDED_MARKET_OPTIMA[6], abs=COST)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(market_instances())
def test_with_markets_solve_reuses_splits_optimum_as_its_bound_and_alternative_and_its_comparisons_are_optima(
        config):
    """`solve` under a spot block solves `split` once, on the way to `slices`: its lower bound and its cheaper
    split alternative are split's own optimum, solved apart; the all-on-demand and floor-0 lines are those
    configs' own optima (proven: nothing here needs the comparison time limit), and the mix is never dearer than a
    proven single-GPU baseline."""
    import dataclasses

    from melange_sky.solver.model import Formulation
    from melange_sky.solver.result import solve_fleet

    try:
        result = solve(config, "slices")
    except InfeasibleAllocation:
        assert market_cost(config, "slices") is None
        return
    split = market_cost(config, "split")
    assert split is not None
    assert_same_cost(result.lower_bound, split)
    if split < result.cost - COST:
        assert result.alternative is not None
        assert_same_cost(result.alternative.cost, split)
    else:
        assert result.alternative is None
    markets = result.markets
    assert markets is not None and markets.cut_short == ()
    on_demand = dataclasses.replace(config, gpus=tuple(g for g in config.gpus if g.reliable), spot=None)
    try:
        expected_on_demand: float | None = solve_fleet(on_demand, Formulation.SLICES).cost
    except InfeasibleAllocation:
        expected_on_demand = None
    assert_same_cost(markets.on_demand_cost, expected_on_demand)
    no_floor = dataclasses.replace(config, spot=dataclasses.replace(config.spot, floor=0.0))
    assert_same_cost(markets.no_floor_cost, market_cost(no_floor, "slices"))
    assert all(b.proven for b in result.baselines)
    assert all(result.cost <= b.cost + COST for b in result.baselines if b.cost is not None)
