"""Templates and plans: names, files, secrets and template errors, through the public plan/render functions."""
from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from melange_sky import load_config, solve
from melange_sky.errors import ConfigError, TemplateError
from melange_sky.deploy.plan import (CLUSTER_NAME_RE, MAX_CLUSTER_NAME, cluster_name, deployment_from_config, make_plan,
                              write_plan)
from melange_sky.deploy.render import builtin_templates, load_template, render


def pinned(config, **pins):
    """The config with every GPU pinned to an offer (what catalog binding does), without needing the catalog."""
    return dataclasses.replace(config, gpus=tuple(dataclasses.replace(g, **pins) for g in config.gpus))


@pytest.fixture
def example_plan(write_config, example):
    config = pinned(load_config(write_config(example)), cloud="aws", region="us-west-2")
    return make_plan(config, solve(config, compare=False))


def test_builtin_templates_are_vllm_and_sglang():
    assert {"vllm", "sglang"} <= set(builtin_templates())


def test_one_task_per_replica_with_original_file_names(example_plan):
    assert [r.file_name for r in example_plan.replicas] == [
        "skypilot_A10G_0.yaml", "skypilot_A10G_1.yaml", "skypilot_A10G_2.yaml", "skypilot_A100-80GB_0.yaml"]
    assert [r.cluster for r in example_plan.replicas] == [
        "config-a10g-0", "config-a10g-1", "config-a10g-2", "config-a100-80gb-0"]


def test_rendered_task_carries_offer_model_port_and_secret_reference(example_plan):
    task = example_plan.replicas[0].task
    assert task["name"] == "config-a10g-0"
    assert task["resources"] == {"cloud": "aws", "region": "us-west-2", "accelerators": "A10G:1",
                                 "use_spot": False, "ports": 8000}
    assert task["envs"]["MODEL_NAME"] == "meta-llama/Llama-2-7b-chat-hf"
    assert task["secrets"] == {"HF_TOKEN": None}
    assert task["service"]["readiness_probe"]["path"] == "/health"
    assert "vllm serve" in task["run"]


def test_secret_values_from_the_environment_never_reach_the_files(write_config, example, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_sentinel_123")
    config = pinned(load_config(write_config(example)), cloud="aws")
    plan = make_plan(config, solve(config, compare=False))
    for path in write_plan(plan, tmp_path / "out"):
        assert "hf_secret_sentinel_123" not in path.read_text()


def test_a_secret_listed_in_envs_is_rejected(write_config, example):
    example["deployment"] = {"envs": {"HF_TOKEN": "hf_abc"}}
    with pytest.raises(ConfigError, match=r"deployment.envs.HF_TOKEN: is also listed in deployment.secrets"):
        deployment_from_config(load_config(write_config(example)))


def test_yaml_special_characters_in_values_cannot_inject_structure(write_config, example):
    example["deployment"] = {"model": "evil\nresources: {cloud: gcp}", "envs": {"NOTE": "a: b # c\n- d"},
                             "extra_args": ["--max-model-len", "4096; rm -rf /"]}
    config = load_config(write_config(example))
    task = make_plan(config, solve(config, compare=False)).replicas[0].task
    assert task["envs"]["MODEL_NAME"] == "evil\nresources: {cloud: gcp}"
    assert task["envs"]["NOTE"] == "a: b # c\n- d"
    assert "cloud" not in task["resources"]
    assert "'4096; rm -rf /'" in task["run"]  # shell-quoted


@pytest.mark.parametrize("name", ["A10G/../../etc", "..", "my gpu", "A10G/x", "../A10G"])
def test_hostile_gpu_names_never_write_outside_the_output_dir(write_config, example, tmp_path, name):
    example["gpu_info"] = {name: example["gpu_info"]["A10G"], "A100-80GB": example["gpu_info"]["A100-80GB"]}
    config = load_config(write_config(example))
    plan = make_plan(config, solve(config, compare=False))
    out = tmp_path / "out"
    for path in write_plan(plan, out):
        assert path.resolve().parent == out.resolve()
    assert {p.name for p in tmp_path.iterdir()} == {"out", "config.json"}
    assert all(CLUSTER_NAME_RE.match(r.cluster) for r in plan.replicas)


def test_names_that_sanitise_alike_stay_distinct(write_config, example):
    a10g = example["gpu_info"]["A10G"]
    example["gpu_info"] = {"A100/80": a10g, "A100_80": a10g, "A100-80GB": example["gpu_info"]["A100-80GB"]}
    example["gpu_info"]["A100/80"] = {**a10g, "min_count": 1}
    example["gpu_info"]["A100_80"] = {**a10g, "min_count": 1}
    config = load_config(write_config(example))
    plan = make_plan(config, solve(config, compare=False))
    assert len({r.cluster for r in plan.replicas}) == len(plan.replicas)
    assert len({r.file_name for r in plan.replicas}) == len(plan.replicas)


def test_cluster_names_are_valid_lower_case_and_bounded():
    for fleet, gpu in [("Llama2-Chat", "A100-80GB"), ("7b", "H100"), ("x" * 80, "A10G@aws:us-west-2"),
                       ("fleet", "A100/80 GB")]:
        name = cluster_name(fleet, gpu, 11)
        assert CLUSTER_NAME_RE.match(name) and name == name.lower() and len(name) <= MAX_CLUSTER_NAME
    assert cluster_name("x" * 80, "A10G", 1) != cluster_name("x" * 80, "A10G", 2)
    assert cluster_name("x" * 80 + "a", "A10G", 1) != cluster_name("x" * 80 + "b", "A10G", 1)


def test_template_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.j2"
    bad.write_text("name: x\nrun: |\n  {% if %}\n")
    with pytest.raises(TemplateError, match=rf"{bad}:3: template syntax error"):
        load_template(str(bad))


def test_undefined_template_variable_is_named(tmp_path):
    tpl = tmp_path / "t.j2"
    tpl.write_text("name: {{ cluster }}\nrun: echo {{ no_such_thing }}\n")
    with pytest.raises(TemplateError, match=rf"{tpl}:2: undefined template variable: 'no_such_thing' is undefined"):
        render(load_template(str(tpl)), {"cluster": "c"})


def test_template_rendering_non_mapping_yaml_is_an_error(tmp_path):
    tpl = tmp_path / "t.j2"
    tpl.write_text("- just\n- a list\n")
    with pytest.raises(TemplateError, match="expected a YAML mapping"):
        render(load_template(str(tpl)), {})


def test_unknown_builtin_template_lists_the_builtins():
    with pytest.raises(TemplateError, match=r"choose one of (\w+, )*sglang, vllm"):
        load_template("tgi")


def test_user_template_file_gets_the_documented_variables(write_config, example, tmp_path):
    tpl = tmp_path / "mine.j2"
    tpl.write_text("name: {{ cluster | tojson }}\nresources:\n  accelerators: {{ accelerators | tojson }}\n"
                   "run: echo {{ fleet }} {{ gpu }} {{ replica }} {{ gpus }} {{ price }} {{ deployment.team }}\n")
    example["deployment"] = {"template": str(tpl), "extra": {"team": "infra"}, "x-note": "not for templates"}
    config = load_config(write_config(example))
    plan = make_plan(config, solve(config, compare=False))
    assert plan.replicas[-1].task["run"] == "echo config A100-80GB 0 1 3.67 infra"


def test_a_custom_templates_variable_outside_extra_is_an_unknown_key_that_says_where_it_goes(write_config, example):
    example["deployment"] = {"template": "vllm", "team": "infra"}
    with pytest.raises(ConfigError) as caught:
        deployment_from_config(load_config(write_config(example)))
    assert str(caught.value) == (f"{write_config(example)}: deployment.team: unknown key; known keys: template, "
                                 f"model, port, envs, secrets, version, extra_args, readiness_path, api_key_secret, "
                                 f"extra, router, local, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, "
                                 f"block_size, max_model_len, enable_chunked_prefill, tensor_parallel_size, dtype, "
                                 f"kv_cache_dtype, num_gpu_blocks_override, enable_prefix_caching (a custom "
                                 f"template's own variables go under deployment.extra; a "
                                 f"note of your own: start its name with x-)")


@pytest.mark.parametrize("deployment, field", [
    ({"modle": "m"}, "deployment.modle: unknown key; did you mean 'model'?"),
    ({"router": {"prot": 8080}}, "deployment.router.prot: unknown key; did you mean 'port'?"),
    ({"router": {"tls": {"certfile": "/c.pem", "keyfile": "/k.pem", "cafile": "/ca.pem"}}},
     "deployment.router.tls.cafile: unknown key; did you mean 'certfile'?"),
    ({"extra": ["team"]}, "deployment.extra: must be an object"),
])
def test_the_deployment_block_refuses_unknown_keys_at_every_depth(cli, write_config, example, deployment, field):
    example["deployment"] = deployment
    result = cli("solve", write_config(example))  # even `solve`, which never reads the deployment
    assert result.exit_code == 2 and field in result.stderr, result.stderr


def test_sglang_template_and_multi_gpu_instances(write_config, example):
    example["deployment"] = {"template": "sglang", "version": "0.4.6"}
    config = pinned(load_config(write_config(example)), accelerators="A100-80GB:4")
    task = make_plan(config, solve(config, compare=False)).replicas[0].task
    assert "sglang.launch_server" in task["run"] and "--dp-size 4" in task["run"]
    assert '"sglang[all]==0.4.6"' in task["setup"]


def test_plan_json_holds_replicas_offers_and_the_solve(example_plan, tmp_path):
    import json

    write_plan(example_plan, tmp_path, formats=("json",))
    record = json.loads((tmp_path / "melange_plan.json").read_text())
    assert [r["cluster"] for r in record["replicas"]][0] == "config-a10g-0"
    assert record["solve"]["counts"] == {"A10G": 3, "A100-80GB": 1}
    assert json.loads((tmp_path / "melange_result.json").read_text()) == {"A10G": 3, "A100-80GB": 1, "cost": 6.7}
    assert not list(tmp_path.glob("*.yaml"))


def test_written_yaml_round_trips_to_the_task(example_plan, tmp_path):
    write_plan(example_plan, tmp_path, formats=("skypilot",))
    for replica in example_plan.replicas:
        assert yaml.safe_load((tmp_path / replica.file_name).read_text()) == replica.task
    assert os.listdir(tmp_path) and not (tmp_path / "melange_plan.json").exists()


def test_the_router_task_template_is_not_offered_as_a_replica_template(tmp_path):
    from melange_sky.core.config import parse_config
    from melange_sky.deploy.plan import deployment_from_config
    from melange_sky.deploy.render import builtin_templates
    from melange_sky.errors import ConfigError

    assert "router" not in builtin_templates() and {"vllm", "sglang"} <= set(builtin_templates())
    config = parse_config({"workload_distribution": [[1.0]], "total_request_rate": 1,
                           "gpu_info": {"A10G": {"cost": 1.0, "tputs": [[1.0]]}},
                           "deployment": {"template": "router", "router": {"port": 9000}}}, "c.json")
    with pytest.raises(ConfigError, match="deployment.template: 'router' is melange-sky's router task"):
        deployment_from_config(config)
    ok = parse_config({**{"workload_distribution": [[1.0]], "total_request_rate": 1,
                          "gpu_info": {"A10G": {"cost": 1.0, "tputs": [[1.0]]}}},
                       "deployment": {"router": {"port": 9000}}}, "c.json")
    assert deployment_from_config(ok).extra == {}  # the router's block is not a replica template's
