"""Binding config GPU entries to catalog offers: defaults, pins, clouds, spot, costs, errors, and per-offer quotas
that spread a fleet across clouds when solved."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from conftest import EXAMPLE, REPO
from melange_sky import ConfigError, load_config, parse_config, solve
from melange_sky.errors import InfeasibleAllocation
from melange_sky.deploy.catalog import Catalog
from melange_sky.deploy.offers import bind_offers, catalog_pricer, quota

MULTICLOUD = json.loads((REPO / "examples" / "multicloud.json").read_text())


@pytest.fixture
def bundled() -> Catalog:
    return Catalog(skypilot_dir=None)


def config(data: dict, bundled: Catalog):
    return parse_config(data, source="c.json", price=catalog_pricer(bundled))


def entry(example: dict, gpu: str, **changes) -> dict:
    """`example` with GPU entry `gpu` updated (a key set to None is removed)."""
    data = copy.deepcopy(example)
    data["gpu_info"][gpu].update(changes)
    data["gpu_info"][gpu] = {k: v for k, v in data["gpu_info"][gpu].items() if v is not None}
    return data


def test_example_binds_to_the_original_melange_offers(bundled):
    bound = bind_offers(load_config(REPO / "examples" / "example.json"), bundled)
    a10g, a100 = bound.config.gpus
    assert (a10g.cloud, a10g.region, a10g.instance_type, a10g.accelerators, a10g.cost) == \
        ("aws", "us-west-2", "g5.xlarge", "A10G:1", 1.01)
    assert (a100.cloud, a100.region, a100.instance_type, a100.accelerators, a100.cost) == \
        ("azure", "eastus", "Standard_NC24ads_A100_v4", "A100-80GB:1", 3.67)
    assert bound.offers["A10G"].price == 1.006 and bound.offers["A100-80GB"].price == 3.673
    assert bound.config.warnings == ()  # 1.01 vs 1.006 and 3.67 vs 3.673 are within 10%


def test_bound_example_solves_to_the_original_answer(bundled):
    result = solve(bind_offers(load_config(REPO / "examples" / "example.json"), bundled).config)
    assert result.counts == {"A10G": 3, "A100-80GB": 1} and result.cost == pytest.approx(6.70)


def test_configs_with_every_cost_never_read_a_catalog(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("the catalog was read")

    monkeypatch.setattr(Catalog, "cloud_offers", fail)
    cfg = load_config(REPO / "examples" / "example.json")
    assert [(g.name, g.cost, g.cost_source) for g in cfg.gpus] == [("A10G", 1.01, "config"),
                                                                  ("A100-80GB", 3.67, "config")]


def test_omitted_cost_is_the_catalog_price_per_gpu(bundled):
    cfg = config(entry(EXAMPLE, "A10G", cost=None), bundled)
    a10g = cfg.gpu("A10G")
    assert (a10g.cost, a10g.cost_source) == (1.006, "catalog")
    assert solve(cfg).counts == {"A10G": 3, "A100-80GB": 1}  # the solver sees a price, never a missing cost


def test_omitted_cost_with_no_catalog_price_names_the_cost_field(bundled):
    data = copy.deepcopy(EXAMPLE)
    data["gpu_info"]["A10X"] = {"tputs": [[1, 1], [1, 1]]}
    with pytest.raises(ConfigError) as info:
        config(data, bundled)
    assert info.value.field == "gpu_info.A10X.cost"
    assert "missing" in info.value.message and "'A10G'" in info.value.message


def test_config_cost_wins_and_a_difference_over_10_percent_warns(bundled):
    bound = bind_offers(config(entry(EXAMPLE, "A10G", cost=1.5), bundled), bundled)
    assert bound.config.gpu("A10G").cost == 1.5
    [warning] = bound.config.warnings
    assert "gpu_info.A10G.cost" in warning and "49%" in warning and "g5.xlarge" in warning


def test_pins_choose_cloud_region_and_instance_type(bundled):
    data = entry(EXAMPLE, "A100-80GB", cloud="gcp")
    data = entry(data, "A10G", region="us-east-2")
    bound = bind_offers(config(data, bundled), bundled)
    assert bound.offers["A100-80GB"].key == "gcp:us-central1:a2-ultragpu-1g"
    assert bound.offers["A10G"].key == "aws:us-east-2:g5.xlarge"
    assert len(bound.config.warnings) == 1  # 3.67 against GCP's $5.07/h


def test_pinned_multi_gpu_instance_counts_instances_with_k_times_cost_and_tputs(bundled):
    bound = bind_offers(config(entry(EXAMPLE, "A10G", instance_type="g5.12xlarge"), bundled), bundled)
    a10g = bound.config.gpu("A10G")
    assert (a10g.accelerators, a10g.cost) == ("A10G:4", pytest.approx(4 * 1.01))
    assert a10g.tputs == ((8, 4), (20, 8))


def test_accelerators_pin_selects_the_gpus_per_instance(bundled):
    bound = bind_offers(config(entry(EXAMPLE, "A100-80GB", accelerators="A100-80GB:8", cost=None), bundled),
                        bundled)
    offer = bound.offers["A100-80GB"]
    assert offer.gpu_count == 8 and offer.cloud == "lambda"  # the cheapest 8-GPU instance: $22.32/h
    assert bound.config.gpu("A100-80GB").cost == pytest.approx(22.32)


def test_unknown_pinned_instance_type_says_so(bundled):
    with pytest.raises(ConfigError) as info:
        bind_offers(config(entry(EXAMPLE, "A10G", instance_type="g5.xxlarge"), bundled), bundled)
    assert info.value.field == "gpu_info.A10G.instance_type"
    assert "instance type 'g5.xxlarge' is unknown to the catalog" in info.value.message
    assert "did you mean 'g5.xlarge'" in info.value.message and "\n" not in str(info.value)


def test_pinned_instance_type_of_another_gpu_says_which_gpu_it_has(bundled):
    with pytest.raises(ConfigError, match=r"'g6.xlarge' has L4:1, not A10G"):
        bind_offers(config(entry(EXAMPLE, "A10G", instance_type="g6.xlarge"), bundled), bundled)


def test_clouds_list_limits_the_offers(bundled):
    data = {**copy.deepcopy(EXAMPLE), "clouds": ["gcp", "aws"]}
    bound = bind_offers(config(data, bundled), bundled)
    assert bound.offers["A100-80GB"].cloud == "gcp"  # Azure is not allowed


def test_pin_outside_the_clouds_list_is_an_error(bundled):
    data = {**entry(EXAMPLE, "A100-80GB", cloud="azure"), "clouds": ["aws", "gcp"]}
    with pytest.raises(ConfigError) as info:
        bind_offers(config(data, bundled), bundled)
    assert info.value.field == "gpu_info.A100-80GB.cloud"


def test_unknown_gpu_with_a_cost_fails_binding_with_close_names(bundled):
    data = copy.deepcopy(EXAMPLE)
    data["gpu_info"]["A100-80G-X"] = data["gpu_info"].pop("A100-80GB")
    with pytest.raises(ConfigError) as info:
        bind_offers(config(data, bundled), bundled)
    assert info.value.field == "gpu_info.A100-80G-X" and "unknown GPU" in info.value.message
    assert "'A100-80GB'" in info.value.message


def test_use_spot_binds_and_prices_from_spot(bundled):
    bound = bind_offers(config(entry(EXAMPLE, "A10G", use_spot=True, cost=None), bundled), bundled)
    a10g = bound.config.gpu("A10G")
    assert a10g.use_spot and a10g.cost == pytest.approx(0.377)  # us-east-2's cheapest zone
    assert bound.offers["A10G"].region == "us-east-2"


def test_use_spot_without_any_spot_price_is_an_error(bundled):
    with pytest.raises(ConfigError) as info:
        config(entry(EXAMPLE, "A100-80GB", use_spot=True, cloud="azure", cost=None), bundled)
    assert info.value.field == "gpu_info.A100-80GB.cost" and "no spot price" in info.value.message


def test_quota_takes_the_most_specific_pattern(bundled):
    offer = bundled.offers("A10G", ["aws"])[0]  # aws:us-west-2:g5.xlarge
    quotas = (("aws", 5), ("aws:us-west-2", 2), ("aws:us-east-1", 0))
    assert quota(offer, quotas) == 2
    assert quota(offer, (("aws", 5),)) == 5 and quota(offer, (("gcp", 1),)) is None


def test_bad_quota_is_a_config_error(bundled):
    with pytest.raises(ConfigError) as info:
        config(entry(EXAMPLE, "A10G", quotas={"aws::g5": 1}), bundled)
    assert info.value.field == "gpu_info.A10G.quotas.aws::g5"


def test_per_offer_makes_one_named_column_per_offer(bundled):
    bound = bind_offers(load_config(REPO / "examples" / "example.json"), bundled, per_offer=True)
    names = [g.name for g in bound.config.gpus]
    assert len(names) == len(set(names)) == len(bound.offers)
    assert "A10G@aws:us-east-2" in names and "A10G@aws:us-west-2:g5.12xlarge" in names
    assert all(bound.entries[n] in ("A10G", "A100-80GB") for n in names)
    assert all(g.cloud and g.region and g.instance_type and g.accelerators for g in bound.config.gpus)


def test_per_offer_quotas_spread_the_fleet_over_two_clouds(bundled):
    bound = bind_offers(config(MULTICLOUD, bundled), bundled, per_offer=True)
    result = solve(bound.config, caps=bound.caps)
    used = {name: n for name, n in result.counts.items() if n}
    assert len({bound.offers[name].cloud for name in used}) >= 2, used
    for name, count in used.items():
        cap = bound.config.gpu(name).max_count
        assert cap is None or count <= cap
    azure_a100 = sum(n * bound.offers[c].gpu_count for c, n in used.items()
                     if bound.offers[c].cloud == "azure" and bound.entries[c] == "A100-80GB")
    assert azure_a100 <= 1  # "azure": 1 is one A100-80GB in all of Azure

    # The same fleet without quotas stays in one cloud: the quotas are what spread it.
    data = copy.deepcopy(MULTICLOUD)
    for gpu in data["gpu_info"].values():
        gpu.pop("quotas", None)
    free = bind_offers(config(data, bundled), bundled, per_offer=True)
    unlimited = solve(free.config, caps=free.caps)
    assert len({free.offers[n].cloud for n, c in unlimited.counts.items() if c}) == 1
    assert unlimited.cost <= result.cost


def test_multicloud_example_file_loads_and_plans_across_clouds(bundled):
    cfg = load_config(REPO / "examples" / "multicloud.json", price=catalog_pricer(bundled))
    assert all(g.cost_source == "catalog" for g in cfg.gpus)
    bound = bind_offers(cfg, bundled, per_offer=True)
    assert {o.cloud for o in bound.offers.values()} == {"aws", "azure", "gcp"}


def test_per_offer_baselines_are_one_per_gpu_type_spread_over_its_offers(bundled):
    cfg = load_config(REPO / "examples" / "multicloud.json", price=catalog_pricer(bundled))
    bound = bind_offers(cfg, bundled, per_offer=True)
    result = solve(bound.config, caps=bound.caps)
    baselines = {b.gpu: b for b in result.baselines}
    assert set(baselines) == {g.name for g in cfg.gpus}  # "A100-80GB", not "A100-80GB@gcp:us-central1"
    a100 = baselines["A100-80GB"]  # every instance of the plan is an A100-80GB: the mix cannot beat that baseline
    assert a100.count == 3 and a100.cost == pytest.approx(result.cost)
    assert result.saving == 0.0
    assert "quotas of its 4 offers" in baselines["A10G"].reason


# ---- quotas count GPUs, as clouds do --------------------------------------------------------------------------------
def eastus_a100(rate: float, **pins) -> dict:
    """Only A100-80GB in Azure eastus, where it comes as NC24ads (1 GPU) and NC48ads (2 GPUs); 0.0375 GPUs per req/s."""
    data = copy.deepcopy(MULTICLOUD)
    data["gpu_info"] = {"A100-80GB": {"tputs": [[20, 20], [40, 20]], "region": "eastus",
                                      "quotas": {"azure:eastus": 4}, **pins}}
    data["clouds"], data["total_request_rate"] = ["azure"], rate
    return data


def test_a_region_quota_caps_the_gpus_of_all_its_offers_together(bundled):
    bound = bind_offers(config(eastus_a100(100), bundled), bundled, per_offer=True)  # needs 3.75 GPUs
    assert {o.instance_type for o in bound.offers.values()} == {"Standard_NC24ads_A100_v4", "Standard_NC48ads_A100_v4"}
    result = solve(bound.config, caps=bound.caps)
    assert sum(n * bound.offers[c].gpu_count for c, n in result.counts.items()) == 4
    # 7.5 GPUs do not fit in 4: before, each instance type got the 4 (4 NC24 + 4 NC48 = 12 GPUs)
    bound = bind_offers(config(eastus_a100(200), bundled), bundled, per_offer=True)
    with pytest.raises(InfeasibleAllocation, match=r"gpu_info.A100-80GB.quotas.azure:eastus <= 4 GPUs"):
        solve(bound.config, caps=bound.caps)


def test_a_region_quota_counts_gpus_not_instances_in_the_default_mode(bundled):
    bound = bind_offers(config(eastus_a100(100, accelerators="A100-80GB:2"), bundled), bundled)
    assert bound.config.gpus[0].instance_type == "Standard_NC48ads_A100_v4" and bound.config.gpus[0].max_count == 2


def test_an_instance_type_quota_caps_that_instance_type_alone(bundled):
    data = eastus_a100(100)
    data["gpu_info"]["A100-80GB"]["quotas"] = {"azure:eastus:Standard_NC48ads_A100_v4": 2}
    bound = bind_offers(config(data, bundled), bundled, per_offer=True)
    caps = {bound.offers[g.name].instance_type: g.max_count for g in bound.config.gpus}
    assert caps == {"Standard_NC24ads_A100_v4": None, "Standard_NC48ads_A100_v4": 1} and bound.caps == ()


def test_a_zero_quota_excludes_unless_a_more_specific_pattern_allows(bundled):
    data = entry(EXAMPLE, "A10G", quotas={"aws": 0, "aws:us-east-1": 2})
    bound = bind_offers(config(data, bundled), bundled, per_offer=True)
    a10g = [g for g in bound.config.gpus if g.entry == "A10G"]
    assert a10g and {g.region for g in a10g} == {"us-east-1"}
    if len(a10g) == 1:
        assert a10g[0].max_count == 2
    else:
        assert [(c.name, c.cap, {n for n, _ in c.columns}) for c in bound.caps] == [
            ("gpu_info.A10G.quotas.aws:us-east-1", 2, {g.name for g in a10g})]


def test_solve_prices_a_costless_config_from_the_catalog_without_importing_skypilot(tmp_path):
    data = entry(EXAMPLE, "A10G", cost=None)
    path = tmp_path / "costless.json"
    path.write_text(json.dumps(data))
    code = ("import json, sys; from melange_sky.cli import main\n"
            f"try:\n    main(['solve', {str(path)!r}, '--json', '-o', {str(tmp_path / 'out.json')!r}])\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'sky' not in sys.modules, 'sky was imported'\n")
    env = {**os.environ, "HOME": str(tmp_path)}  # no SkyPilot catalogs there: the bundled snapshot prices A10G
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["counts"] == {"A10G": 3, "A100-80GB": 1}
    assert record["cost"] == pytest.approx(3 * 1.006 + 3.67)
