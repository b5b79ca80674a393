"""The fleet router's SkyPilot task: the `deployment.router` block, the CPU offer it runs on, the rendered task
(secrets by name only, port, the shipped package), real SkyPilot's offline validation, and that `serve` runs on a
host with only the packages the task installs."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from melange_sky import load_config
from melange_sky.backends import ValidationLevel
from melange_sky.deploy.catalog import Catalog
from melange_sky.deploy.plan import CLUSTER_NAME_RE, MAX_CLUSTER_NAME
from melange_sky.deploy.router_config import DEFAULT_ROUTER_PORT, RouterSpec, router_spec
from melange_sky.deploy.router_task import (ADMIN_TOKEN_SECRET, CLIENT_KEY_SECRET, ROUTER_REQUIREMENTS,
                                            build_router_plan, choose_router_offer, cpu_offers, package_source_dir,
                                            router_cluster_name)
from melange_sky.errors import ConfigError, InvalidTask
from test_router_tls import make_pair

AWS_HEADER = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region," \
             "AvailabilityZone,Arch"
GCP_HEADER = "InstanceType,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,AvailabilityZone,Price," \
             "SpotPrice"
AZURE_HEADER = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region," \
               "Generation"


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    """A small catalog with known prices: AWS dearer than GCP, a cheaper region away from the replicas, rows that
    are no CPU offer (GPU instances, Arm) and rows a default choice must skip (burstable, 1 vCPU), all cheaper."""
    files = {
        "aws": [AWS_HEADER,
                "c6i.large,,,2.0,4.0,,0.085,,us-east-1,use1-az1,x86_64",
                "c6i.large,,,2.0,4.0,,0.090,,us-west-2,usw2-az1,x86_64",
                "c6i.large,,,2.0,4.0,,0.092,,us-west-2,usw2-az2,x86_64",
                "m6i.xlarge,,,4.0,16.0,,0.192,,us-west-2,usw2-az1,x86_64",
                "g5.xlarge,A10G,1.0,4.0,16.0,,0.010,,us-west-2,usw2-az1,x86_64",
                "t3.medium,,,2.0,4.0,,0.0416,,us-west-2,usw2-az1,x86_64",
                "c7g.large,,,2.0,4.0,,0.0725,,us-west-2,usw2-az1,arm64",
                "c6i.small,,,1.0,4.0,,0.040,,us-west-2,usw2-az1,x86_64"],
        "gcp": [GCP_HEADER,
                "e2-standard-2,2.0,8.0,,,,us-central1,us-central1-a,0.067006,",
                "e2-medium,2.0,4.0,,,,us-central1,us-central1-a,0.033503,",
                ",,,T4,1,,us-central1,us-central1-a,0.35,",
                "g2-standard-4,4.0,16.0,,,,us-central1,us-central1-a,0.0100,"],  # has an L4 the row does not name
        "azure": [AZURE_HEADER,
                  "Standard_D2as_v5,,,2,8,,0.086,,eastus,2",
                  "Standard_B2s,,,2,4,,0.0416,,eastus,2",
                  "Standard_D2ps_v5,,,2,8,,0.077,,eastus,2"],
    }
    for cloud, rows in files.items():
        (tmp_path / "cat" / cloud).mkdir(parents=True)
        (tmp_path / "cat" / cloud / "vms.csv").write_text("\n".join(rows) + "\n")
    return Catalog(skypilot_dir=None, bundled_dir=tmp_path / "cat")


def config_with(write_config, example, router=None, name="demo"):
    data = {**example, "name": name}
    if router is not None:
        data["deployment"] = {"router": router}
    return load_config(write_config(data))


# ---- the deployment.router block ----------------------------------------------------------------------------------

def test_an_absent_block_means_a_chosen_offer_on_port_8080(write_config, example):
    assert router_spec(config_with(write_config, example)) == RouterSpec(port=DEFAULT_ROUTER_PORT)
    assert DEFAULT_ROUTER_PORT == 8080


def test_the_block_keeps_its_pins_and_normalises_cpus(write_config, example):
    spec = router_spec(config_with(write_config, example, {"cloud": "AWS", "region": "us-west-2", "cpus": 4,
                                                           "port": 9000, "use_spot": False}))
    assert spec == RouterSpec(cloud="aws", region="us-west-2", cpus="4", port=9000)
    assert router_spec(config_with(write_config, example, {"cpus": " 2+ "})).cpus == "2+"


@pytest.mark.parametrize(("router", "message"), [
    ({"prot": 8080}, "deployment.router.prot: unknown key; did you mean 'port'?"),
    ({"zone": "a"}, "deployment.router.zone: unknown key; known keys: cloud, region, instance_type, cpus, port"),
    ({"port": 0}, "deployment.router.port: must be an integer port in 1..65535, got 0"),
    ({"port": "8080"}, "deployment.router.port: must be an integer port in 1..65535, got '8080'"),
    ({"port": True}, "deployment.router.port: must be an integer port in 1..65535, got True"),
    ({"cloud": "aw"}, "deployment.router.cloud: unknown cloud 'aw'; did you mean 'aws'?"),
    ({"cpus": "two"}, "deployment.router.cpus: must be a vCPU count such as 2 or \"2+\""),
    ({"cpus": 0}, "deployment.router.cpus: must be a vCPU count"),
    ({"instance_type": "c6i.large", "cpus": 2}, "deployment.router.cpus: give instance_type or cpus, not both"),
    ({"instance_type": ""}, "deployment.router.instance_type: must be a non-empty string"),
    ({"use_spot": True}, "deployment.router.use_spot: must be false, got True: the router is the fleet's only"),
    (["aws"], "deployment.router: must be an object"),
])
def test_a_bad_block_is_one_line_naming_the_file_and_field(write_config, example, router, message):
    with pytest.raises(ConfigError) as caught:
        router_spec(config_with(write_config, example, router))
    text = str(caught.value)
    assert text.startswith("config.json: " + message) or f"config.json: {message}" in text, text
    assert re.match(r"^\S*config\.json: ", text) and "\n" not in text
    assert caught.value.exit_code == 2


# ---- the offer ----------------------------------------------------------------------------------------------------

def test_the_router_follows_the_cloud_with_most_replicas_even_when_another_is_cheaper(catalog):
    offer, reason = choose_router_offer(RouterSpec(), ["gcp", "aws", "aws", "aws"], catalog)
    assert (offer.cloud, offer.region, offer.instance_type, offer.price) == ("aws", "us-east-1", "c6i.large", 0.085)
    assert reason == "near the replicas: 3 of 4 in aws"


def test_within_the_cloud_the_router_goes_to_the_region_with_most_replicas(catalog):
    offer, reason = choose_router_offer(
        RouterSpec(), [("aws", "us-west-2"), ("aws", "us-west-2"), ("aws", "us-east-1"), ("gcp", "us-central1")],
        catalog)
    # us-east-1 is cheaper, but two of the three AWS replicas are in us-west-2; the cheaper of its two zones' prices
    assert (offer.region, offer.instance_type, offer.price) == ("us-west-2", "c6i.large", 0.090)
    assert reason == "near the replicas: 2 of 4 in aws us-west-2"


def test_a_tie_between_clouds_goes_to_the_cheapest_offer(catalog):
    offer, _ = choose_router_offer(RouterSpec(), ["aws", "azure", "gcp"], catalog)
    assert (offer.cloud, offer.instance_type) == ("gcp", "e2-standard-2")
    offer, _ = choose_router_offer(RouterSpec(), ["azure", "aws"], catalog)
    assert (offer.cloud, offer.instance_type, offer.price) == ("aws", "c6i.large", 0.085)  # Azure's is 0.086


def test_a_cloud_without_cpu_offers_is_passed_over(catalog):
    offer, reason = choose_router_offer(RouterSpec(), ["lambda", "lambda", "azure"], catalog)
    assert (offer.cloud, offer.instance_type) == ("azure", "Standard_D2as_v5")
    offer, reason = choose_router_offer(RouterSpec(), ["lambda"], catalog)
    assert offer.instance_type == "e2-standard-2" and reason == "the cheapest CPU offer"
    offer, _ = choose_router_offer(RouterSpec(), ["lambda"], catalog, clouds=["lambda", "aws", "azure"])
    assert (offer.cloud, offer.price) == ("aws", 0.085)  # within the config's clouds


def test_a_default_choice_skips_gpu_burstable_arm_and_one_vcpu_instances(catalog):
    chosen = {choose_router_offer(RouterSpec(), [cloud], catalog)[0].instance_type for cloud in ("aws", "gcp",
                                                                                                  "azure")}
    assert chosen == {"c6i.large", "e2-standard-2", "Standard_D2as_v5"}
    # ... which the CPU offer listing itself keeps (only GPU rows and Arm rows with an Arch column are not CPU offers)
    listed = {o.instance_type for o in cpu_offers(catalog)}
    assert {"t3.medium", "c6i.small", "e2-medium", "Standard_B2s", "Standard_D2ps_v5"} <= listed
    assert not {"g5.xlarge", "c7g.large", "g2-standard-4"} & listed


def test_pins_win_over_the_replicas(catalog):
    offer, reason = choose_router_offer(RouterSpec(cloud="aws", region="us-west-2", instance_type="t3.medium"),
                                        ["gcp", "gcp"], catalog)
    assert (offer.cloud, offer.region, offer.instance_type, offer.price) == ("aws", "us-west-2", "t3.medium", 0.0416)
    assert reason == "pinned by deployment.router"
    offer, reason = choose_router_offer(RouterSpec(cloud="azure"), ["gcp", "gcp"], catalog)
    assert offer.instance_type == "Standard_D2as_v5"
    assert reason == "the cheapest CPU offer within deployment.router's pins"
    offer, _ = choose_router_offer(RouterSpec(instance_type="c6i.large"), ["gcp"], catalog)
    assert (offer.cloud, offer.region) == ("aws", "us-east-1")


def test_cpus_choose_the_size(catalog):
    assert choose_router_offer(RouterSpec(cpus="4+"), ["aws"], catalog)[0].instance_type == "m6i.xlarge"
    assert choose_router_offer(RouterSpec(cpus="2"), ["aws"], catalog)[0].instance_type == "c6i.large"
    assert choose_router_offer(RouterSpec(cpus="1+"), ["aws"], catalog)[0].instance_type == "c6i.small"


@pytest.mark.parametrize(("spec", "message"), [
    (RouterSpec(cloud="aws", instance_type="c6i.lrage"),
     "config.json: deployment.router.instance_type: CPU instance type 'c6i.lrage' is unknown to the catalog ("),
    (RouterSpec(cloud="gcp", instance_type="c6i.large"),
     "config.json: deployment.router.instance_type: 'c6i.large' is not offered with these pins; it is in "
     "aws:us-east-1, aws:us-west-2"),
    (RouterSpec(cloud="aws", region="eu-north-9"), "config.json: deployment.router.region: no CPU offer in "
                                                   "'eu-north-9' ("),
    (RouterSpec(cloud="aws", region="us-west2"), "config.json: deployment.router.region: no CPU offer in "
                                                 "'us-west2' ("),
    (RouterSpec(cloud="gcp", cpus="64+"), "config.json: deployment.router.cpus: no CPU offer with 64+ vCPUs in gcp"),
])
def test_a_pin_the_catalog_cannot_meet_is_one_line(catalog, spec, message):
    with pytest.raises(ConfigError) as caught:
        choose_router_offer(spec, ["aws"], catalog, "config.json")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    if "lrage" in message:
        assert "did you mean 'c6i.large'" in str(caught.value)
    if "us-west2" in message:
        assert "did you mean 'us-west-2'" in str(caught.value)


def test_the_bundled_snapshot_has_a_cpu_offer_in_each_cloud_replicas_use():
    bundled = Catalog(skypilot_dir=None)
    chosen = {cloud: choose_router_offer(RouterSpec(), [cloud], bundled)[0] for cloud in ("aws", "gcp", "azure")}
    assert {c: (o.instance_type, o.price) for c, o in chosen.items()} == {
        "aws": ("c6i.large", 0.085), "gcp": ("e2-standard-2", 0.067006), "azure": ("Standard_D2as_v5", 0.086)}
    assert all(o.source == "bundled" for o in chosen.values())


# ---- the rendered task --------------------------------------------------------------------------------------------

def test_the_task_names_its_secrets_and_holds_no_value(write_config, example, catalog, monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_SECRET, "admin-token-value-8f2c")
    monkeypatch.setenv(CLIENT_KEY_SECRET, "client-key-value-41d7")
    config = config_with(write_config, example)
    with_key = build_router_plan(config, ["aws"], api_key=True, catalog=catalog)
    assert with_key.task["secrets"] == {ADMIN_TOKEN_SECRET: None, CLIENT_KEY_SECRET: None}
    assert with_key.secrets == (ADMIN_TOKEN_SECRET, CLIENT_KEY_SECRET)
    assert "--no-auth" not in with_key.task["run"]
    without = build_router_plan(config, ["aws"], api_key=False, catalog=catalog)
    assert without.task["secrets"] == {ADMIN_TOKEN_SECRET: None}
    assert without.task["run"].rstrip().endswith("--no-auth")
    for plan in (with_key, without):
        for text in (plan.yaml, json.dumps(plan.to_dict())):
            assert "admin-token-value-8f2c" not in text and "client-key-value-41d7" not in text


def test_a_replica_key_in_another_secret_is_sent_upstream(write_config, example, catalog):
    plan = build_router_plan(config_with(write_config, example), ["aws"], api_key=True,
                             upstream_key_secret="REPLICA_KEY", catalog=catalog)
    assert plan.task["secrets"] == {ADMIN_TOKEN_SECRET: None, CLIENT_KEY_SECRET: None, "REPLICA_KEY": None}
    assert 'export MELANGE_SKY_UPSTREAM_API_KEY="${REPLICA_KEY:?secret REPLICA_KEY is empty}"' in plan.task["run"]
    keyless = build_router_plan(config_with(write_config, example), ["aws"], api_key=False,
                                upstream_key_secret=CLIENT_KEY_SECRET, catalog=catalog)
    assert keyless.task["secrets"] == {ADMIN_TOKEN_SECRET: None, CLIENT_KEY_SECRET: None}
    assert f"unset {CLIENT_KEY_SECRET}" in keyless.task["run"]  # sent to the replicas, not asked of clients


def test_the_task_runs_serve_pushed_on_the_block_port_from_the_offer(write_config, example, catalog):
    plan = build_router_plan(config_with(write_config, example, {"port": 9443}, name="Llama Chat"), ["gcp"],
                             catalog=catalog)
    assert plan.cluster == "llama-chat-router" == plan.task["name"]
    assert plan.task["resources"] == {"cloud": "gcp", "region": "us-central1", "instance_type": "e2-standard-2",
                                      "use_spot": False, "ports": [9443]}
    assert plan.port == 9443 and plan.price == 0.067006 and plan.offer == "gcp:us-central1:e2-standard-2"
    assert "exec python -m melange_sky serve --pushed --host 0.0.0.0 --port 9443" in plan.task["run"]
    assert plan.to_dict()["task"] == plan.task and plan.to_dict()["reason"] == "near the replicas: 1 of 1 in gcp"
    with_cpus = build_router_plan(config_with(write_config, example, {"cpus": "4+"}), ["aws"], catalog=catalog)
    assert with_cpus.task["resources"]["cpus"] == "4+" and with_cpus.instance_type == "m6i.xlarge"


def test_the_task_ships_this_package_and_installs_only_the_router_requirements(write_config, example, catalog):
    plan = build_router_plan(config_with(write_config, example), ["aws"], catalog=catalog)
    (remote, local), = plan.task["file_mounts"].items()
    assert Path(local) == package_source_dir() and (Path(local) / "__main__.py").is_file()
    assert remote == "~/melange-sky-router/src/melange_sky"
    assert 'export PYTHONPATH="$ROUTER_DIR/src' in plan.task["run"] and 'ROUTER_DIR="$HOME/melange-sky-router"' in \
        plan.task["run"]
    install = [line for line in plan.task["setup"].splitlines() if " pip install " in line]
    assert len(install) == 1 and install[0].endswith(" ".join(f"'{r}'" for r in ROUTER_REQUIREMENTS))


def test_the_router_requirements_are_the_versions_tested_here():
    """The pins in the task must admit what this venv runs the tests with (else the router runs untested code)."""
    for line in ROUTER_REQUIREMENTS:
        requirement = Requirement(line)
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed), f"{requirement} does not admit the tested {installed}"


def test_the_router_cluster_name_is_valid_and_bounded():
    assert router_cluster_name("Demo Fleet") == "demo-fleet-router"
    assert router_cluster_name("42") == "f42-router"
    long_a, long_b = router_cluster_name("x" * 80 + "a"), router_cluster_name("x" * 80 + "b")
    assert long_a != long_b
    for name in (long_a, long_b):
        assert len(name) <= MAX_CLUSTER_NAME and CLUSTER_NAME_RE.match(name) and name.endswith("-router")


# ---- real SkyPilot, offline ---------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:The inplace keyword")  # pandas, inside SkyPilot's GCP catalog
def test_real_skypilot_validates_the_router_task_in_each_cloud(write_config, example, sky_catalog_home, tmp_path):
    from melange_sky.fleet.skypilot import SkyPilotBackend

    backend = SkyPilotBackend()
    config = config_with(write_config, example)
    for cloud in ("aws", "gcp", "azure"):
        plan = build_router_plan(config, [cloud], api_key=True, catalog=Catalog(skypilot_dir=None))
        result = backend.validate(plan.task)
        assert result.level is ValidationLevel.FULL, (cloud, result)
        assert plan.instance_type in result.detail, result.detail
    cert, key = make_pair(tmp_path, "router")  # with TLS: the certificate and key as file mounts (they must exist)
    tls = load_config(write_config({**example, "deployment": {"router": {"tls": {"certfile": str(cert),
                                                                                 "keyfile": str(key)}}}}))
    assert backend.validate(build_router_plan(tls, ["aws"], catalog=Catalog(skypilot_dir=None)).task).level \
        is ValidationLevel.FULL
    wrong = build_router_plan(config, ["aws"], catalog=Catalog(skypilot_dir=None)).task
    wrong = {**wrong, "resources": {**wrong["resources"], "instance_type": "c6i.lrage"}}
    with pytest.raises(InvalidTask):
        backend.validate(wrong)


@pytest.mark.filterwarnings("ignore:The inplace keyword")
def test_real_skypilot_prices_every_bundled_cpu_offer_as_we_do(sky_catalog_home):
    import sky

    failures = []
    for offer in cpu_offers(Catalog(skypilot_dir=None)):
        resources = sky.Resources(cloud=sky.CLOUD_REGISTRY.from_str(offer.cloud), instance_type=offer.instance_type,
                                  region=offer.region)
        if resources.get_cost(3600) != pytest.approx(offer.price):
            failures.append(f"{offer.key}: SkyPilot ${resources.get_cost(3600)}/h, ours ${offer.price}/h")
    assert not failures, "\n".join(failures)


# ---- the router's host: only the packages the task installs -------------------------------------------------------

BLOCKER = textwrap.dedent("""\
    import importlib.abc, importlib.machinery, json, os, runpy, sys
    # "org": the standard library's own probe for Jython (copy.py), not a package
    allowed = set(json.loads(os.environ["ROUTER_TEST_ALLOWED"])) | set(sys.stdlib_module_names) | {"melange_sky", "org"}
    class OnlyAllowed(importlib.abc.MetaPathFinder):
        \"\"\"Every finder but the builtin and frozen ones, behind a check: a package outside `allowed` is absent
        (find_spec answers None, as on a host without it; probes such as yarl's find_spec("pydantic_core") see
        the same).\"\"\"
        def __init__(self, finders):
            self.finders = finders
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] not in allowed:
                print(f"ABSENT {name}", file=sys.stderr)
                return None
            for finder in self.finders:
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    return spec
            return None
        def invalidate_caches(self):
            for finder in self.finders:
                getattr(finder, "invalidate_caches", lambda: None)()
    keep = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter)
    sys.meta_path[:] = [*keep, OnlyAllowed([f for f in sys.meta_path if f not in keep])]
    flag, target, *rest = sys.argv[1:]
    if flag == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"))
    else:
        assert flag == "-m", sys.argv
        sys.argv = [target, *rest]
        sys.path.insert(0, os.getcwd())
        import melange_sky
        print(f"MELANGE_SKY_FROM {os.path.dirname(melange_sky.__file__)}", file=sys.stderr)
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    """)


def _distributions(requirements: list[str]) -> set[str]:
    """The distributions `pip install requirements` brings (on this Python, no extras), by normalised name."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in seen or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo.extend(Requirement(r) for r in importlib.metadata.distribution(name).requires or [])
    return seen


def _top_level_modules(distributions: set[str]) -> set[str]:
    return {module for module, dists in importlib.metadata.packages_distributions().items()
            if any(re.sub(r"[-_.]+", "-", d).lower() in distributions for d in dists)}


@pytest.fixture
def router_host(tmp_path, write_config, example):
    """A HOME laid out as the task leaves its host: the file mounts copied, and a 'venv' whose python admits only the
    standard library, melange_sky and what ROUTER_REQUIREMENTS installs. Returns (HOME, env, the task)."""
    plan = build_router_plan(config_with(write_config, example), ["aws"], api_key=True,
                             catalog=Catalog(skypilot_dir=None))
    home = tmp_path / "host"
    for remote, local in plan.task["file_mounts"].items():
        assert remote.startswith("~/")
        shutil.copytree(local, home / remote[2:], ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "blocker.py").write_text(BLOCKER)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "python").write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'blocker.py'} \"$@\"\n")
    (shim / "python").chmod(0o755)
    venv_bin = home / "melange-sky-router" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(f'export PATH="{shim}:$PATH"\n')
    allowed = _top_level_modules(_distributions(list(ROUTER_REQUIREMENTS)))
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "ROUTER_TEST_ALLOWED": json.dumps(sorted(allowed))}
    return home, env, plan.task


def test_the_import_blocker_admits_the_router_requirements_and_not_the_heavy_ones(router_host):
    home, env, _ = router_host
    allowed = set(json.loads(env["ROUTER_TEST_ALLOWED"]))
    assert {"aiohttp", "click", "orjson", "prometheus_client", "uvloop", "yarl", "multidict"} <= allowed
    assert not {"sky", "pulp", "highspy", "jinja2", "yaml", "tokenizers"} & allowed
    shim_python = f'. "{home}/melange-sky-router/venv/bin/activate" && python -c "import jinja2"'
    done = subprocess.run(["bash", "-c", shim_python], env=env, cwd=home, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "ABSENT jinja2" in done.stderr and "No module named 'jinja2'" in done.stderr


def test_the_run_script_starts_serve_with_only_the_router_requirements(router_host):
    """The task's own `run` script, its serve arguments swapped for --help, on a host with the shipped source and
    only ROUTER_REQUIREMENTS: `serve` loads without SkyPilot, PuLP, HiGHS, Jinja or PyYAML."""
    home, env, task = router_host
    script, swapped = re.subn(r"(exec python -m melange_sky serve) .*$", r"\1 --help", task["run"], flags=re.M)
    assert swapped == 1
    done = subprocess.run(["bash", "-c", script], env=env, cwd=home, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: python -m melange_sky serve [OPTIONS]")
    assert "--pushed" in done.stdout
    assert f"MELANGE_SKY_FROM {home}/melange-sky-router/src/melange_sky" in done.stderr


def test_the_run_script_starts_the_pushed_router_with_only_the_router_requirements(router_host):
    """The task's `run` script as rendered, on loopback and a free port instead of 0.0.0.0:8080: the router (aiohttp,
    uvloop, prometheus_client) starts listening on a host with only ROUTER_REQUIREMENTS, then stops on SIGTERM."""
    home, env, task = router_host
    script, swapped = re.subn(r"--host 0\.0\.0\.0 --port \d+", "--host 127.0.0.1 --port 0", task["run"])
    assert swapped == 1
    env = {**env, ADMIN_TOKEN_SECRET: "admin-token-for-this-test", CLIENT_KEY_SECRET: "client-key-for-this-test"}
    router = subprocess.Popen(["bash", "-c", script], env=env, cwd=home, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in router.stdout:  # waits for the event, not a time: the process either listens or ends
            lines.append(line)
            if line.startswith("Listening on http://127.0.0.1:"):
                break
        assert lines and lines[-1].startswith("Listening on"), "".join(lines) + router.stderr.read()
        url = lines[-1].split()[2]
        try:  # it answers (no routes pushed yet: 503); once it has, its SIGTERM handler is in place
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
            with opener.open(f"{url}/health", timeout=60) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status in (200, 503)
        router.send_signal(signal.SIGTERM)  # `exec` made the router the script's own process
        assert router.wait(timeout=60) in (0, 130, 143)
    finally:
        if router.poll() is None:
            router.kill()
            router.wait()
    stderr = router.stderr.read()
    assert "SIGTERM: draining" in stderr and "Error" not in stderr, stderr
    assert "admin-token-for-this-test" not in stderr + "".join(lines)
