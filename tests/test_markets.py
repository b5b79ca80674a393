"""Markets in the plan: spot beside on-demand under a `spot` block (a floor of reliable capacity, spot spread over
regions), and owned GPUs on Kubernetes. Tiny instances whose answers can be checked by hand, against a catalog
written here (so the prices are known), plus a property test of the invariants on random instances."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest

from melange_sky.core.config import Market, SpotPolicy, parse_config
from melange_sky.deploy.catalog import Catalog
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.deploy.plan import PlanSettings, build_plan, solve_offers
from melange_sky.errors import ConfigError
from melange_sky.solver.model import spot_region
from melange_sky.solver.result import solve

HEADER = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region," \
         "AvailabilityZone,Arch"
# A10G: $1/h on demand in two regions, spot $0.40 (us-east-1, cheapest of two zones) and $0.50 (us-west-2).
# L4: spot at or above on-demand in one region, no spot price in the other: never a spot offer.
ROWS = """g5.xlarge,A10G,1.0,4.0,16.0,,1.0,0.45,us-east-1,use1-az1,x86_64
g5.xlarge,A10G,1.0,4.0,16.0,,1.0,0.40,us-east-1,use1-az2,x86_64
g5.xlarge,A10G,1.0,4.0,16.0,,1.0,0.50,us-west-2,usw2-az1,x86_64
g6.xlarge,L4,1.0,4.0,16.0,,0.8,0.9,us-east-1,use1-az1,x86_64
g6.xlarge,L4,1.0,4.0,16.0,,0.8,,us-west-2,usw2-az1,x86_64
"""


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "vms.csv").write_text(HEADER + "\n" + ROWS)
    return Catalog(skypilot_dir=None, bundled_dir=tmp_path)


def config(gpus: dict, spot: dict | None = None, rate: float = 10.0, catalog: Catalog | None = None):
    """One bucket at `rate` req/s in 10 slices; a GPU with tputs [[1]] serves 1 req/s, so the counts are easy to
    check. GPU entries without a cost are priced from `catalog`."""
    data = {"workload_distribution": [[1.0]], "total_request_rate": rate, "slice_factor": 10, "clouds": ["aws"],
            "gpu_info": gpus}
    if spot is not None:
        data["spot"] = spot
    return parse_config(data, source="test.json", price=catalog_pricer(catalog) if catalog else None)


def solved(cfg, catalog, per_offer: bool = False):
    return solve_offers(cfg, PlanSettings(catalog=catalog, per_offer=per_offer, max_replicas=None))


def by_market(result) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in result.gpus:
        counts[g.market] = counts.get(g.market, 0) + g.count
    return counts


def test_spot_is_bought_above_the_floor_and_the_saving_and_floor_cost_are_against_re_solved_fleets(catalog):
    # 10 req/s, 1 req/s per A10G: 10 GPUs. Floor 0.5: 5 on demand ($5) + 5 spot at $0.40 ($2) = $7/h;
    # all on demand $10/h; with floor 0, 10 spot = $4/h, so the floor costs $3/h.
    result = solved(config({"A10G": {"tputs": [[1]]}}, {"floor": 0.5}, catalog=catalog), catalog)
    assert by_market(result) == {"on_demand": 5, "spot": 5}
    assert result.cost == pytest.approx(7.0)
    spot = next(g for g in result.gpus if g.market == Market.SPOT)
    assert (spot.name, spot.cloud, spot.region, spot.price) == ("A10G:spot", "aws", "us-east-1", 0.40)
    markets = result.markets
    assert markets is not None
    assert markets.on_demand_cost == pytest.approx(10.0)
    assert markets.no_floor_cost == pytest.approx(4.0)
    assert markets.reliable_share == pytest.approx(0.5)
    data = result.to_dict()["markets"]
    assert data["spot_saving"] == pytest.approx(3.0) and data["floor_cost"] == pytest.approx(3.0)


def test_the_floor_holds_reliable_replicas_alone_carry_it_in_every_bucket(catalog):
    # Two buckets; the reliable GPUs' capacity must cover 70% of each one's load by themselves.
    data = {"workload_distribution": [[0.5, 0.5]], "total_request_rate": 10, "slice_factor": 10, "clouds": ["aws"],
            "gpu_info": {"A10G": {"tputs": [[1, 2]]}}, "spot": {"floor": 0.7}}
    result = solved(parse_config(data, source="t.json", price=catalog_pricer(catalog)), catalog)
    reliable = sum(g.count for g in result.gpus if g.market != Market.SPOT)
    # A10G work for 70% of both buckets: 0.7 x (5/1 + 5/2) = 5.25 GPUs -> 6 reliable GPUs.
    assert reliable == 6
    assert result.markets is not None and result.markets.reliable_share >= 0.7
    assert result.cost == pytest.approx(6 * 1.0 + 2 * 0.40)  # 7.5 GPUs of work: 6 reliable + 2 spot


def test_no_region_holds_more_than_its_share_of_the_spot_gpus(catalog):
    # Per offer, spot A10G is in us-east-1 ($0.40) and us-west-2 ($0.50): at most half in one region.
    spread = {"floor": 0.2, "max_region_share": 0.5}
    result = solved(config({"A10G": {"tputs": [[1]]}}, spread, catalog=catalog), catalog, per_offer=True)
    spot = {(g.cloud, g.region): g.count for g in result.gpus if g.market == Market.SPOT and g.count}
    assert spot == {("aws", "us-east-1"): 4, ("aws", "us-west-2"): 4}
    assert by_market(result)["on_demand"] == 2
    assert result.markets is not None and result.markets.spot_gpus == {"aws:us-east-1": 4, "aws:us-west-2": 4}


def test_a_lone_spot_region_under_a_share_below_one_buys_no_spot(catalog):
    # Without --per-offer an entry's cheapest spot offer is one region: a share of 0.5 leaves spot nowhere to go.
    spread = {"floor": 0.2, "max_region_share": 0.5}
    result = solved(config({"A10G": {"tputs": [[1]]}}, spread, catalog=catalog), catalog)
    assert by_market(result) == {"on_demand": 10, "spot": 0}


def test_no_spot_offer_where_the_catalog_spot_price_is_missing_or_not_below_on_demand(catalog):
    result = solved(config({"L4": {"tputs": [[1]]}}, {"floor": 0.5}, catalog=catalog), catalog, per_offer=True)
    assert [g.market for g in result.gpus] == ["on_demand", "on_demand"]
    assert result.cost == pytest.approx(10 * 0.8)


def test_owned_gpus_at_cost_zero_are_used_first_within_their_cap(catalog):
    gpus = {"A10G": {"tputs": [[1]]},
            "A10G-own": {"cloud": "kubernetes", "accelerators": "A10G:1", "cost": 0, "max_count": 3,
                         "tputs": [[1]]}}
    result = solved(config(gpus, {"floor": 0.5}, catalog=catalog), catalog)
    owned = next(g for g in result.gpus if g.market == Market.OWNED)
    assert (owned.count, owned.cloud, owned.price) == (3, "kubernetes", 0.0)
    # Floor 5 GPUs of reliable work: 3 owned + 2 on demand; the other 5 on spot at $0.40.
    assert by_market(result) == {"on_demand": 2, "spot": 5, "owned": 3}
    assert result.cost == pytest.approx(2 * 1.0 + 5 * 0.40)
    assert result.markets is not None and result.markets.reliable_share == pytest.approx(0.5)


def test_owned_gpus_count_as_reliable_without_a_spot_block(catalog):
    gpus = {"A10G": {"tputs": [[1]]},
            "mine": {"cloud": "kubernetes", "accelerators": "A10G:1", "cost": 0.2, "quotas": {"kubernetes": 4},
                     "tputs": [[1]]}}
    result = solved(config(gpus, catalog=catalog), catalog)
    assert by_market(result) == {"on_demand": 6, "owned": 4}


def test_a_pinned_use_spot_is_respected(catalog):
    gpus = {"A10G": {"tputs": [[1]], "use_spot": False}, "L4": {"tputs": [[1]], "use_spot": False}}
    result = solved(config(gpus, {"floor": 0.5}, catalog=catalog), catalog)
    assert {g.market for g in result.gpus} == {Market.ON_DEMAND}
    gpus = {"A10G": {"tputs": [[1]], "use_spot": True}, "L4": {"tputs": [[1]]}}
    result = solved(config(gpus, {"floor": 0.5}, catalog=catalog), catalog)
    a10g = [g for g in result.gpus if g.entry == "A10G"]
    assert [(g.name, g.market) for g in a10g] == [("A10G", Market.SPOT)]
    # The floor falls on L4 on demand (5 GPUs, $4); A10G spot carries the rest (5 x $0.40).
    assert result.cost == pytest.approx(5 * 0.8 + 5 * 0.40)
    alone = {b.gpu: b for b in result.baselines}  # spot alone cannot keep a floor: no single-type fleet of it
    assert alone["A10G"].cost is None and "nothing reliable to carry the floor" in (alone["A10G"].reason or "")
    assert alone["L4"].cost == pytest.approx(10 * 0.8)


def test_a_config_without_a_spot_block_is_planned_as_before(catalog):
    result = solved(config({"A10G": {"tputs": [[1]]}, "L4": {"tputs": [[1]]}}, catalog=catalog), catalog)
    assert [(g.name, g.market, g.count) for g in result.gpus] == [("A10G", "on_demand", 0), ("L4", "on_demand", 10)]
    assert result.markets is None and "markets" not in result.to_dict()


def test_spot_replicas_render_as_spot_tasks_and_owned_ones_on_kubernetes(catalog):
    gpus = {"A10G": {"tputs": [[1]]},
            "own": {"cloud": "kubernetes", "region": "my-cluster", "accelerators": "A10G:1", "cost": 0,
                    "max_count": 1, "tputs": [[1]]}}
    plan = build_plan(config(gpus, {"floor": 0.5}, catalog=catalog), PlanSettings(catalog=catalog, compare=False))
    markets = {r.market: r for r in plan.replicas}
    assert markets["spot"].task["resources"]["use_spot"] is True
    assert markets["on_demand"].task["resources"]["use_spot"] is False
    owned = markets["owned"].task["resources"]
    assert (owned["cloud"], owned["region"], owned["accelerators"]) == ("kubernetes", "my-cluster", "A10G:1")
    assert "instance_type" not in owned
    assert {r["market"] for r in plan.to_dict()["replicas"]} == {"spot", "on_demand", "owned"}


@pytest.mark.filterwarnings("ignore:The inplace keyword")
def test_real_skypilot_takes_a_spot_task_and_reads_an_owned_one_up_to_its_cluster(catalog, sky_catalog_home):
    """Offline, SkyPilot validates a spot task fully against the catalog. A kubernetes task needs a cluster to be
    feasible: without a kubeconfig SkyPilot parses it (schema, resources) and then finds no cluster to run it."""
    pytest.importorskip("kubernetes")
    from melange_sky.errors import InvalidTask
    from melange_sky.fleet.skypilot import SkyPilotBackend, ValidationLevel

    gpus = {"A10G": {"tputs": [[1]]},
            "own": {"cloud": "kubernetes", "accelerators": "A10G:1", "cost": 0, "max_count": 1, "tputs": [[1]]}}
    bundled = Catalog(skypilot_dir=None)
    plan = build_plan(config(gpus, {"floor": 0.5}, catalog=bundled), PlanSettings(catalog=bundled, compare=False))
    backend = SkyPilotBackend()
    spot = next(r for r in plan.replicas if r.market == "spot")
    assert backend.validate(spot.task).level is ValidationLevel.FULL
    owned = next(r for r in plan.replicas if r.market == "owned")
    with pytest.raises(InvalidTask, match="no Kubernetes offer matches"):
        backend.validate(owned.task)


def test_solve_json_names_each_column_market_cloud_and_region(cli, write_config):
    path = write_config({"workload_distribution": [[1.0]], "total_request_rate": 10, "clouds": ["aws"],
                         "gpu_info": {"A10G": {"tputs": [[1]]}}, "spot": {"floor": 0.5}})
    result = cli("solve", path, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {(g["name"], g["market"], g["cloud"]) for g in data["gpus"]} == {
        ("A10G", "on_demand", "aws"), ("A10G:spot", "spot", "aws")}
    assert all(g["region"] for g in data["gpus"])
    assert set(data["markets"]) >= {"floor", "reliable_share", "max_region_share", "spot_gpus", "on_demand_cost",
                                    "spot_saving", "no_floor_cost", "floor_cost", "cost", "count"}
    assert data["markets"]["floor"] == 0.5 and data["markets"]["reliable_share"] >= 0.5
    table = cli("solve", path)
    assert "market" in table.stdout and "spot saves" in table.stdout and "The floor costs" in table.stdout


@pytest.mark.parametrize(("spot", "message"), [
    ({"floor": 1.5}, "spot.floor: must be in [0, 1]"),
    ({"max_region_share": 0}, "spot.max_region_share: must be in (0, 1]"),
    ({"flor": 0.5}, "did you mean 'floor'"),
    ([0.5], "spot: must be an object"),
])
def test_a_bad_spot_block_is_an_error_naming_its_field(spot, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config({"A10G": {"tputs": [[1]], "cost": 1}}, spot)


@pytest.mark.parametrize(("entry", "message"), [
    ({"cloud": "kubernetes", "cost": 0, "tputs": [[1]]}, "max_count: missing"),
    ({"cloud": "kubernetes", "max_count": 2, "tputs": [[1]]}, "cost: missing"),
    ({"cloud": "kubernetes", "cost": -1, "max_count": 2, "tputs": [[1]]}, "cost: must be a number >= 0"),
    ({"cloud": "ssh", "cost": 0, "max_count": 2, "use_spot": True, "tputs": [[1]]}, "use_spot: must be false"),
])
def test_owned_gpus_need_a_cost_and_a_cap(entry, message):
    with pytest.raises(ConfigError, match=message):
        config({"own": entry})


def test_property_markets_never_cost_more_than_on_demand_and_keep_floor_and_spread():
    """Random small instances (fixed seed): the plan is never dearer than all on-demand, its reliable replicas
    carry the floor of every bucket, and no region holds more than its share of the spot GPUs."""
    rng = random.Random(20)
    for case in range(12):
        rows, cols = rng.randint(1, 3), rng.randint(1, 3)
        gpus = {}
        for k in range(rng.randint(1, 3)):
            tputs = [[round(rng.uniform(0.5, 5), 3) for _ in range(cols)] for _ in range(rows)]
            gpus[f"G{k}"] = {"cost": round(rng.uniform(0.5, 4), 3), "tputs": tputs}
        data = {"workload_distribution": [[rng.random() + 0.01 for _ in range(cols)] for _ in range(rows)],
                "total_request_rate": rng.uniform(2, 30), "slice_factor": rng.choice([1, 2, 4]), "gpu_info": gpus}
        base = parse_config(data, source=f"case-{case}.json")
        columns = []
        for g in base.gpus:  # each entry on demand, and spot in one of three regions at a discount
            on_demand = dataclasses.replace(g, entry=g.name, cloud="aws", region="r0", market=Market.ON_DEMAND)
            columns.append(on_demand)
            for region in rng.sample(["r0", "r1", "r2"], 2):
                columns.append(dataclasses.replace(on_demand, name=f"{g.name}@{region}:spot", region=region,
                                                   cost=round(g.cost * rng.uniform(0.3, 0.9), 3), use_spot=True,
                                                   market=Market.SPOT, max_count=rng.choice([None, 3])))
        policy = SpotPolicy(floor=rng.choice([0.0, 0.3, 0.5, 1.0]), max_region_share=rng.choice([0.5, 0.7, 1.0]))
        cfg = dataclasses.replace(base, gpus=tuple(columns), spot=policy)
        for formulation in ("slices", "split"):
            result = solve(cfg, formulation, compare=False)
            markets = result.markets
            assert markets is not None and markets.on_demand_cost is not None
            assert result.cost <= markets.on_demand_cost + 1e-6, (case, formulation)
            assert markets.reliable_share >= policy.floor - 1e-6, (case, formulation)
            spot = {g.name: g.count for g in result.gpus if g.market == Market.SPOT}
            for region in {spot_region(cfg.gpu(n)) for n in spot}:
                here = sum(n for name, n in spot.items() if spot_region(cfg.gpu(name)) == region)
                assert here <= policy.max_region_share * sum(spot.values()) + 1e-9, (case, formulation, region)


def kept_spot_config(kept: int, regions: tuple[str, ...]):
    """One bucket, 10 req/s at 1 req/s per GPU: A10G on demand at $1 and spot at $0.40 in `regions`, the first
    region holding `kept` spot replicas a re-plan keeps (its min_count)."""
    base = config({"A10G": {"tputs": [[1]], "cost": 1.0}})
    on_demand = dataclasses.replace(base.gpus[0], entry="A10G", cloud="aws", region="r0", market=Market.ON_DEMAND)
    spot = [dataclasses.replace(on_demand, name=f"A10G@{region}:spot", region=region, cost=0.40, use_spot=True,
                                market=Market.SPOT, min_count=kept if k == 0 else 0)
            for k, region in enumerate(regions)]
    return dataclasses.replace(base, gpus=(on_demand, *spot), spot=SpotPolicy(floor=0.2, max_region_share=0.5))


def test_spot_kept_in_a_lone_region_is_planned_not_infeasible_and_no_more_is_added_there():
    # All spot in one region is over a 0.5 share, but 3 replicas already run there: they stay, nothing joins them.
    result = solve(kept_spot_config(3, ("r0",)), compare=False)
    assert by_market(result) == {"on_demand": 7, "spot": 3}


def test_a_region_holding_kept_spot_adds_at_most_its_share_of_the_other_spot_gpus():
    # 8 spot GPUs to place (floor 0.2 of 10 is on demand); r0 keeps 4: r0 - 4 <= 0.5 x (r0 + r1 - 4), so r0 = 6,
    # r1 = 2 (with nothing kept the plain rule gives 4 + 4, here 4 + 4 too: both cost the same).
    result = solve(kept_spot_config(4, ("r0", "r1")), compare=False)
    spot = {g.region: g.count for g in result.gpus if g.market == Market.SPOT}
    assert spot["r0"] >= 4 and spot["r0"] - 4 <= 0.5 * (sum(spot.values()) - 4) + 1e-9
    assert sum(spot.values()) == 8 and result.markets is not None
    assert result.markets.spot_gpus == {f"aws:{r}": n for r, n in spot.items() if n}


def test_solve_with_markets_solves_split_once_and_reports_it_as_the_bound_and_the_cheaper_alternative(monkeypatch):
    # Mélange's example with a spot A10G at $0.40 beside the on-demand one, floor 0.5, one slice per bucket:
    # slices $4.87/h, split $4.07/h (1 spot A10G + 1 A100). Slices starts from split's optimum, and `solve` reports
    # that same solve (its bound and its alternative) instead of solving split a second time.
    from melange_sky.solver import model, result as result_module

    data = {"workload_distribution": [[0.2, 0.1], [0.5, 0.2]], "total_request_rate": 30, "slice_factor": 1,
            "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2]], "use_spot": False},
                         "A10G-spot": {"cost": 0.4, "tputs": [[2, 1], [5, 2]], "use_spot": True},
                         "A100-80GB": {"cost": 3.67, "tputs": [[20, 20], [40, 20]], "use_spot": False}},
            "spot": {"floor": 0.5}}
    cfg = parse_config(data, source="test.json")
    builds = []

    def counted(config, formulation, *args, **kwargs):
        if config.gpus == cfg.gpus and config.spot == cfg.spot and formulation == "split" and \
                not kwargs.get("relax", args[0] if args else False):
            builds.append(formulation)
        return build_model(config, formulation, *args, **kwargs)

    build_model = model.build_model
    monkeypatch.setattr(model, "build_model", counted)
    monkeypatch.setattr(result_module, "build_model", counted)
    result = solve(cfg, "slices")
    assert builds == ["split"]
    assert result.cost == pytest.approx(4.87) and result.status == "optimal"
    assert result.lower_bound == pytest.approx(4.07)
    assert result.alternative is not None and result.alternative.cost == pytest.approx(4.07)
    assert {name: n for name, n in result.alternative.counts.items() if n} == {"A10G-spot": 1, "A100-80GB": 1}
    assert result.markets is not None and result.markets.cut_short == ()
