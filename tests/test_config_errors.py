"""Bad input gets one line naming the file and the field, exit code 2, and no traceback (unless --debug)."""
from __future__ import annotations

import math

import pytest

from conftest import REPO
from melange_sky import ConfigError, load_config, parse_config
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.deploy.plan import deployment_from_config

SHIPPED_CONFIGS = sorted([*(REPO / "examples").glob("*.json"), *(REPO / "examples").glob("*.yaml"),
                          *(REPO / "tests" / "data").glob("*.json")])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Warning:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_file_is_named(cli, tmp_path):
    result = cli("solve", str(tmp_path / "nope.json"))
    assert_one_line_error(result, "nope.json", "no such file")


@pytest.mark.parametrize("text, fragment", [
    ("", "file is empty"),
    ("   \n", "file is empty"),
    ("{", "not valid JSON"),
    ("{\"gpu_info\": }", "not valid JSON: Expecting value (line 1, column 14)"),
    ("[1, 2]", "must be a JSON object"),
    ("42", "must be a JSON object"),
])
def test_unreadable_json_is_reported_with_position(cli, write_config, text, fragment):
    result = cli("solve", write_config(text))
    assert_one_line_error(result, "config.json", fragment)


@pytest.mark.parametrize("key", ["workload_distribution", "total_request_rate", "gpu_info"])
def test_missing_required_key_is_named(cli, write_config, example, key):
    del example[key]
    assert_one_line_error(cli("solve", write_config(example)), f"config.json: {key}: missing")


@pytest.mark.parametrize("key, typo", [("total_request_rate", "total_request_rte"),
                                        ("workload_distribution", "workload_distributions"),
                                        ("gpu_info", "gpuinfo")])
def test_a_misspelt_required_key_is_named_with_the_spelling_it_needs(cli, write_config, example, key, typo):
    example[typo] = example.pop(key)
    assert_one_line_error(cli("solve", write_config(example)),
                          f"config.json: {key}: missing (required); the config has {typo!r}: did you mean {key!r}?")


def test_a_misspelt_tputs_is_named_with_the_spelling_it_needs(cli, write_config, example):
    example["gpu_info"]["A10G"]["tput"] = example["gpu_info"]["A10G"].pop("tputs")
    assert_one_line_error(cli("solve", write_config(example)),
                          "gpu_info.A10G.tputs: missing (required); the config has 'tput': did you mean 'tputs'?")


def test_missing_gpu_field_is_named(cli, write_config, example):
    del example["gpu_info"]["A10G"]["tputs"]  # (a missing cost is filled from the catalog: see test_offers.py)
    assert_one_line_error(cli("solve", write_config(example)), "gpu_info.A10G.tputs: missing")


@pytest.mark.parametrize("mutate, fragment", [
    (lambda c: c["gpu_info"]["A10G"].__setitem__("tputs", [[2, 1], [5]]), "gpu_info.A10G.tputs[1]: has 1 columns"),
    (lambda c: c["gpu_info"]["A10G"].__setitem__("tputs", [[2, 1]]), "gpu_info.A10G.tputs: is 1x2 but"),
    (lambda c: c["gpu_info"]["A100-80GB"].__setitem__("tputs", [[1, 2, 3], [4, 5, 6]]),
     "gpu_info.A100-80GB.tputs: is 2x3 but workload_distribution is 2x2"),
    (lambda c: c.__setitem__("workload_distribution", [[0.5, 0.5], [1.0]]), "workload_distribution[1]: has 1"),
    (lambda c: c.__setitem__("workload_distribution", []), "workload_distribution: must be a non-empty array"),
    (lambda c: c.__setitem__("workload_distribution", [[]]), "workload_distribution[0]: must be a non-empty"),
    (lambda c: c["gpu_info"]["A10G"].__setitem__("tputs", "fast"), "gpu_info.A10G.tputs: must be a non-empty"),
])
def test_ragged_or_mismatched_matrices_are_rejected(cli, write_config, example, mutate, fragment):
    mutate(example)
    assert_one_line_error(cli("solve", write_config(example)), fragment)


@pytest.mark.parametrize("field, value, fragment", [
    ("tputs", -1, "gpu_info.A10G.tputs[1][0]: must be a number >= 0"),
    ("tputs", "5", "gpu_info.A10G.tputs[1][0]: must be a number, got string"),
    ("tputs", True, "gpu_info.A10G.tputs[1][0]: must be a number, got boolean"),
    ("tputs", None, "gpu_info.A10G.tputs[1][0]: must be a number, got null"),
])
def test_bad_throughput_cell_is_named_by_index(cli, write_config, example, field, value, fragment):
    example["gpu_info"]["A10G"]["tputs"][1][0] = value
    assert_one_line_error(cli("solve", write_config(example)), fragment)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected(cli, write_config, example, literal):
    text = write_config(example).replace("config.json", "config.json")
    raw = open(text).read().replace('"cost": 1.01', f'"cost": {literal}')
    result = cli("solve", write_config(raw))
    assert_one_line_error(result, "gpu_info.A10G.cost: must be a finite number")


@pytest.mark.parametrize("cost, fragment", [(-1, "must be a positive number, got -1"), (0, "must be a positive")])
def test_non_positive_cost_is_rejected(cli, write_config, example, cost, fragment):
    example["gpu_info"]["A10G"]["cost"] = cost
    assert_one_line_error(cli("solve", write_config(example)), "gpu_info.A10G.cost: " + fragment)


def test_negative_share_is_rejected(cli, write_config, example):
    example["workload_distribution"][0][1] = -0.1
    assert_one_line_error(cli("solve", write_config(example)), "workload_distribution[0][1]: must be a number >= 0")


def test_all_zero_distribution_is_rejected(cli, write_config, example):
    example["workload_distribution"] = [[0, 0], [0, 0]]
    assert_one_line_error(cli("solve", write_config(example)), "workload_distribution: all shares are zero")


@pytest.mark.parametrize("value, fragment", [
    (2.5, "slice_factor: must be an integer >= 1, got 2.5"),
    (0, "slice_factor: must be an integer >= 1, got 0"),
    (-3, "slice_factor: must be an integer >= 1"),
    ("4", "slice_factor: must be an integer >= 1, got \"4\""),
])
def test_bad_slice_factor_is_rejected(cli, write_config, example, value, fragment):
    example["slice_factor"] = value
    assert_one_line_error(cli("solve", write_config(example)), fragment)


@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_rate_is_rejected(cli, write_config, example, value):
    example["total_request_rate"] = value
    assert_one_line_error(cli("solve", write_config(example)), "total_request_rate: must be a positive number")


def test_infinite_rate_is_rejected(cli, write_config, example):
    raw = open(write_config(example)).read().replace('"total_request_rate": 30', '"total_request_rate": Infinity')
    assert_one_line_error(cli("solve", write_config(raw)), "total_request_rate: must be a finite number, got inf")


def test_duplicate_gpu_names_in_list_form_are_rejected(cli, write_config, example):
    example["gpu_info"] = [{"name": "A10G", **example["gpu_info"]["A10G"]},
                           {"name": "A10G", **example["gpu_info"]["A100-80GB"]}]
    assert_one_line_error(cli("solve", write_config(example)), "gpu_info[1].name: duplicate GPU name 'A10G'")


def test_duplicate_gpu_keys_in_dict_form_are_rejected(cli, write_config):
    raw = ('{"workload_distribution": [[1]], "total_request_rate": 1, "gpu_info": '
           '{"A10G": {"cost": 1, "tputs": [[1]]}, "A10G": {"cost": 2, "tputs": [[1]]}}}')
    assert_one_line_error(cli("solve", write_config(raw)), "duplicate key 'A10G'")


def test_bucket_no_gpu_can_serve_is_named(cli, write_config, example):
    example["gpu_info"]["A10G"]["tputs"][0][1] = 0
    example["gpu_info"]["A100-80GB"]["tputs"][0][1] = 0
    assert_one_line_error(cli("solve", write_config(example)), "workload_distribution[0][1]", "bucket (0, 1)",
                          "no GPU can serve it")


def test_bucket_without_demand_needs_no_server(cli, write_config, example):
    example["workload_distribution"][0][1] = 0
    example["gpu_info"]["A10G"]["tputs"][0][1] = 0
    example["gpu_info"]["A100-80GB"]["tputs"][0][1] = 0
    assert cli("solve", write_config(example)).exit_code == 0


def test_bucket_edges_name_the_unservable_bucket_in_tokens(cli, write_config, example):
    example.update(input_buckets=[1, 25, 100], output_buckets=[1, 25, 100])
    for gpu in example["gpu_info"].values():
        gpu["tputs"][1][0] = 0
    assert_one_line_error(cli("solve", write_config(example)), "input 25-100, output 1-25 tokens")


def test_max_count_infeasibility_says_which_limits(cli, write_config, example):
    example["gpu_info"]["A10G"]["max_count"] = 5  # A10G alone needs 12 for the whole load
    example["gpu_info"]["A100-80GB"]["max_count"] = 0
    result = cli("solve", write_config(example))
    assert_one_line_error(result, "config.json: no fleet fits the max_count limits (A10G <= 5, A100-80GB <= 0)",
                          "at most 41.7% of the load (12.5 of 30 req/s)")


def test_max_count_zero_on_only_server_names_the_bucket(cli, write_config, example):
    example["gpu_info"]["A10G"]["tputs"][1][1] = 0
    example["gpu_info"]["A100-80GB"]["max_count"] = 0
    assert_one_line_error(cli("solve", write_config(example)), "bucket (1, 1)", "A100-80GB", "max_count is 0")


def test_slices_that_cannot_pack_suggest_split(cli, write_config):
    # One bucket of 3 req/s; each GPU type serves 2 req/s and only one of each may be bought: 4 req/s of capacity,
    # but a whole slice (slice_factor 1) does not fit on either type.
    config = {"workload_distribution": [[1]], "total_request_rate": 3, "slice_factor": 1,
              "gpu_info": {"a": {"cost": 1, "tputs": [[2]], "max_count": 1},
                           "b": {"cost": 1, "tputs": [[2]], "max_count": 1}}}
    result = cli("solve", write_config(config))
    assert_one_line_error(result, "--formulation split")
    assert cli("solve", write_config(config), "--formulation", "split").exit_code == 0


@pytest.mark.parametrize("edges, fragment", [
    ([1, 25], "input_buckets: has 2 edges, so 1 input buckets, but workload_distribution has 2"),
    ([1, 100, 25], "input_buckets[2]: must be greater than input_buckets[1]"),
    ([1], "input_buckets: must be an array of at least 2"),
])
def test_bad_bucket_edges_are_rejected(cli, write_config, example, edges, fragment):
    example["input_buckets"] = edges
    assert_one_line_error(cli("solve", write_config(example)), fragment)


def test_min_count_above_max_count_is_rejected(cli, write_config, example):
    example["gpu_info"]["A10G"].update(min_count=3, max_count=2)
    assert_one_line_error(cli("solve", write_config(example)), "gpu_info.A10G.max_count: is 2, below min_count 3")


@pytest.mark.parametrize("option, value, fragment", [
    ("--rate", "-1", "--rate: must be a positive number"),
    ("--rate", "inf", "--rate: must be a finite number"),
    ("--headroom", "1.5", "--headroom: must be in (0, 1]"),
    ("--headroom", "0", "--headroom: must be in (0, 1]"),
])
def test_bad_overrides_are_rejected(cli, write_config, example, option, value, fragment):
    assert_one_line_error(cli("solve", write_config(example), option, value), fragment)


def test_debug_shows_the_traceback(cli, write_config, example):
    del example["gpu_info"]
    result = cli("solve", write_config(example), "--debug")
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)


def test_a_misspelt_optional_key_is_an_error_with_the_key_it_looks_like(cli, write_config, example):
    example["slice_factr"] = 2  # silently solving at slice_factor 1 would be the wrong answer
    assert_one_line_error(cli("solve", write_config(example)),
                          "config.json: slice_factr: unknown key; did you mean 'slice_factor'?", "x-")


@pytest.mark.parametrize("where, key, fragment", [
    (("gpu_info", "A10G"), "max_cout", "gpu_info.A10G.max_cout: unknown key; did you mean 'max_count'?"),
    ((), "zzz", "zzz: unknown key; known keys: workload_distribution, total_request_rate"),
])
def test_unknown_keys_are_errors_at_every_level(cli, write_config, example, where, key, fragment):
    block = example
    for part in where:
        block = block[part]
    block[key] = 1
    assert_one_line_error(cli("solve", write_config(example)), fragment)


def test_x_keys_are_the_users_notes_at_every_level(cli, write_config, example, tmp_path):
    example["gpu_info"]["A10G"]["quotas"] = {"aws": 4}
    plain = cli("solve", write_config(example), "-o", str(tmp_path / "plain.json"))
    example["x-note"] = "from the March trace"
    example["gpu_info"]["A10G"]["x-note"] = {"any": ["shape"]}
    example["gpu_info"]["x-note"] = "not a GPU"
    example["gpu_info"]["A10G"]["quotas"]["x-note"] = "asked for 8"
    example["deployment"] = {"x-note": "v2 rollout", "router": {"x-note": "near the users"}}
    result = cli("solve", write_config(example), "-o", str(tmp_path / "noted.json"))
    assert (plain.exit_code, result.exit_code) == (0, 0), result.stderr
    assert "x-note" not in result.stderr
    assert (tmp_path / "noted.json").read_text() == (tmp_path / "plain.json").read_text()


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_still_loads_with_its_deployment(path):
    config = load_config(path, price=catalog_pricer())
    deployment_from_config(config)
    assert config.warnings == ()


def test_the_original_melange_list_form_still_loads():
    original = {"gpu_info": [{"name": "A10G", "cost": 1.01, "tputs": [[2, 1], [5, 2]]},
                             {"name": "A100-80GB", "cost": 3.67, "tputs": [[20, 20], [40, 20]]}],
                "workload_distribution": [[0.2, 0.1], [0.5, 0.2]], "total_request_rate": 30, "slice_factor": 1}
    assert [g.name for g in parse_config(original).gpus] == ["A10G", "A100-80GB"]


def test_distribution_off_by_more_than_one_percent_is_normalised_with_warning():
    config = parse_config({"workload_distribution": [[2, 1], [5, 2]], "total_request_rate": 30,
                           "gpu_info": {"g": {"cost": 1, "tputs": [[1, 1], [1, 1]]}}}, source="c.json")
    assert math.isclose(sum(map(sum, config.workload_distribution)), 1.0)
    assert math.isclose(config.workload_distribution[1][0], 0.5)
    assert any("shares sum to 10, not 1; normalised" in w for w in config.warnings)


def test_distribution_off_by_rounding_is_normalised_silently():
    config = parse_config({"workload_distribution": [[0.333, 0.333, 0.333]], "total_request_rate": 1,
                           "gpu_info": {"g": {"cost": 1, "tputs": [[1, 1, 1]]}}})
    assert config.warnings == ()
    assert math.isclose(sum(config.workload_distribution[0]), 1.0)


def test_list_form_and_dict_form_are_equivalent(example):
    as_list = dict(example, gpu_info=[{"name": n, **g} for n, g in example["gpu_info"].items()])
    assert parse_config(as_list).gpus == parse_config(example).gpus


def test_slice_factor_defaults_to_one_as_in_the_original_tool(example):
    del example["slice_factor"]
    assert parse_config(example).slice_factor == 1


def test_integral_float_slice_factor_is_accepted(example):
    example["slice_factor"] = 4.0
    assert parse_config(example).slice_factor == 4


@pytest.mark.parametrize("command", [("solve",), ("plan", "-o", "out"), ("up", "--dryrun"),
                                     ("simulate", "--rate", "5", "--duration", "5"),
                                     ("estimate", "--gpus", "A10G", "--config")])
def test_tensor_parallelism_beyond_an_instances_gpus_is_refused_by_every_command(cli, write_config, example, command):
    """QA 7: TP 3 on single-GPU g5.xlarge instances rendered `--tensor-parallel-size 3` and simulated a triple KV
    cache for the price of one GPU."""
    example["deployment"] = {"tensor_parallel_size": 3}
    path = write_config(example)
    result = cli(*command, path) if command[-1] == "--config" else cli(command[0], path, *command[1:])
    assert_one_line_error(result, "config.json: gpu_info.A10G.accelerators: missing: deployment.tensor_parallel_size "
                                  "is 3, so each replica needs 3 GPUs of one instance, and without an accelerators "
                                  "pin A10G gets single-GPU instances; pin \"A10G:3\"")


def test_an_instance_whose_gpus_tp_does_not_divide_is_refused_naming_its_pin(cli, write_config, example):
    example["deployment"] = {"tensor_parallel_size": 3}
    for name in ("A10G", "A100-80GB"):
        example["gpu_info"][name]["accelerators"] = f"{name}:4"
    assert_one_line_error(cli("plan", write_config(example)),
                          "gpu_info.A10G.accelerators: 'A10G:4' is 4 GPU(s) per instance, which "
                          "deployment.tensor_parallel_size 3 does not divide")


def test_tp_that_divides_the_pinned_gpus_renders_tp_and_data_parallel_engines(cli, write_config, example, tmp_path):
    example["deployment"] = {"tensor_parallel_size": 2}
    example["gpu_info"]["A10G"]["accelerators"] = "A10G:4"
    example["gpu_info"]["A100-80GB"]["accelerators"] = "A100-80GB:2"
    result = cli("plan", write_config(example), "-o", str(tmp_path / "out"), "--rate", "60")
    assert result.exit_code == 0, result.stderr
    runs = {p.name: p.read_text() for p in (tmp_path / "out").glob("skypilot_*.yaml")}
    assert runs and all("--tensor-parallel-size 2" in text for text in runs.values())
    assert all(("--data-parallel-size 2" in text) == name.startswith("skypilot_A10G") for name, text in runs.items())


def test_a_plan_never_renders_tp_an_offer_cannot_hold(example, write_config):
    """The config's check sees the pins; the plan checks the offer each column was bound to as well."""
    import dataclasses

    from melange_sky.deploy.plan import make_plan
    from melange_sky.solver.result import solve

    config = load_config(write_config(example))
    config = dataclasses.replace(config, deployment={"tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match=r"gpu_info\.A10G\.accelerators: 'A10G:1' is 1 GPU\(s\) per instance"):
        make_plan(config, solve(config, compare=False))
