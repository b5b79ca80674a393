"""The price catalog: GPU names, offers and their order, GCP's host + GPU pricing, SkyPilot's own catalog files,
the `catalog` command, and the real SkyPilot accepting every bundled offer offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from melange_sky.deploy.catalog import (BUNDLED_DIR, HOSTED_CATALOG_URL, KNOWN_CLOUDS, Catalog, canonical_gpu,
                                        skypilot_catalog_dir, skypilot_schema_version)
from melange_sky.errors import CatalogError


@pytest.fixture
def bundled() -> Catalog:
    """The bundled snapshot only, whatever SkyPilot has downloaded on this machine."""
    return Catalog(skypilot_dir=None)


@pytest.mark.parametrize("spelling", ["A100-80GB", "A100-80", "A100_80GB", "a100-80gb", "A100 80GB",
                                      "nvidia-a100-80gb"])
def test_spellings_of_a100_80gb_resolve_to_one_name(spelling):
    assert canonical_gpu(spelling) == "A100-80GB"


@pytest.mark.parametrize("spelling, name", [("H100-80GB", "H100"), ("a10g", "A10G"), ("A100-40GB", "A100"),
                                            ("l40s", "L40S"), ("Tesla T4", "T4")])
def test_other_aliases_resolve_to_skypilot_names(spelling, name):
    assert canonical_gpu(spelling) == name


def test_unknown_gpu_is_one_line_naming_close_names(bundled):
    with pytest.raises(CatalogError) as info:
        bundled.offers("A10X")
    message = str(info.value)
    assert "\n" not in message
    assert "unknown GPU 'A10X'" in message and "'A10G'" in message


def test_gpu_without_offer_in_the_asked_clouds_says_so(bundled):
    with pytest.raises(CatalogError, match=r"no offer for GPU 'A10G' in azure, gcp"):
        bundled.offers("A10G", ["azure", "gcp"])


def test_offers_are_sorted_by_price_per_gpu(bundled):
    offers = bundled.offers()
    per_gpu = [o.price_per_gpu for o in offers]
    assert per_gpu == sorted(per_gpu)
    assert {o.cloud for o in offers} == set(KNOWN_CLOUDS)


def test_equal_prices_prefer_the_original_melange_offer(bundled):
    # g5.xlarge costs $1.006/h in three AWS regions; Mélange's mapping (us-west-2) comes first.
    first = bundled.offers("A10G")[0]
    assert (first.cloud, first.region, first.instance_type, first.price) == ("aws", "us-west-2", "g5.xlarge", 1.006)


def test_bundled_snapshot_covers_the_required_gpus_and_clouds(bundled):
    for gpu in ("T4", "L4", "A10G", "L40S", "A100", "A100-80GB", "H100"):
        assert bundled.offers(gpu), gpu
    assert {o.cloud for o in bundled.offers("A100-80GB")} == {"aws", "azure", "gcp", "lambda"}
    assert {o.cloud for o in bundled.offers("H100")} == {"aws", "azure", "gcp", "lambda"}
    azure = next(o for o in bundled.offers("A100-80GB", ["azure"]) if o.region == "eastus" and o.gpu_count == 1)
    assert (azure.instance_type, azure.price) == ("Standard_NC24ads_A100_v4", 3.673)


def test_cloud_filter_keeps_only_those_clouds(bundled):
    assert {o.cloud for o in bundled.offers("A100-80GB", ["gcp", "azure"])} == {"gcp", "azure"}
    with pytest.raises(CatalogError, match="unknown cloud 'gpc'; did you mean 'gcp'"):
        bundled.offers("T4", ["gpc"])


def test_spot_listing_keeps_offers_with_a_spot_price_sorted_by_it(bundled):
    spot = bundled.offers("A10G", use_spot=True)
    assert spot and all(o.spot_price is not None for o in spot)
    assert [o.spot_price_per_gpu for o in spot] == sorted(o.spot_price_per_gpu for o in spot)


def test_gcp_price_is_host_vm_plus_gpu_on_a_host_skypilot_accepts(bundled):
    t4 = bundled.offers("T4", ["gcp"])[0]
    # n1-standard-4 has 15 GB (< 16 GB for a T4), so the host is n1-highmem-4: $0.236606 + $0.35.
    assert t4.instance_type == "n1-highmem-4" and t4.price == pytest.approx(0.586606)
    a100 = bundled.offers("A100", ["gcp"])[0]
    assert a100.instance_type == "a2-highgpu-1g" and a100.price == pytest.approx(0.73948 + 2.933908)


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_skypilot_catalog_on_this_machine_wins_over_the_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path))
    sky_dir = tmp_path / ".sky" / "catalogs" / skypilot_schema_version()
    assert skypilot_catalog_dir() == sky_dir
    _write(sky_dir / "aws" / "vms.csv",
           "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,"
           "AvailabilityZone,Arch\n"
           "g5.xlarge,A10G,1.0,4.0,16.0,,0.9,0.5,us-east-1,use1-az1,x86_64\n"
           "g5.xlarge,A10G,1.0,4.0,16.0,,0.9,0.3,us-east-1,use1-az2,x86_64\n"
           "g6f.2xlarge,L4,0.25,8.0,32.0,,0.475,0.17,us-east-1,use1-az1,x86_64\n"
           "m6i.large,,,2.0,8.0,,0.096,0.04,us-east-1,use1-az1,x86_64\n")
    catalog = Catalog()
    [offer] = catalog.offers("A10G", ["aws"])
    assert (offer.price, offer.spot_price, offer.source) == (0.9, 0.3, "skypilot")  # cheapest spot over its zones
    assert catalog.offers(None, ["aws"]) == [offer]  # fractional GPUs and CPU-only rows are not offers
    assert {o.source for o in catalog.offers("A100-80GB", ["azure"])} == {"bundled"}  # no azure file there
    assert catalog.describe(["aws"]) == {"aws": str(sky_dir / "aws" / "vms.csv")}
    assert catalog.describe(["azure"])["azure"].endswith("(bundled snapshot, 2025-11 prices)")


def test_skypilot_gcp_catalog_joins_gpu_rows_to_host_vms(tmp_path):
    _write(tmp_path / "gcp" / "vms.csv",
           "InstanceType,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,AvailabilityZone,Price,"
           "SpotPrice\n"
           "g2-standard-4,4.0,16.0,,,,us-east4,us-east4-a,0.2,0.08\n"
           "g2-standard-8,8.0,32.0,,,,us-east4,us-east4-a,0.3,0.1\n"
           ",,,L4,1,,us-east4,us-east4-a,0.6,0.2\n"
           ",,,L4,1,,europe-west4,europe-west4-a,0.6,0.2\n"  # no host VM in that zone: no offer
           ",,,tpu-v5p-8,1,,us-east4,us-east4-a,9.0,3.0\n")
    [offer] = Catalog(skypilot_dir=tmp_path).offers("L4", ["gcp"])
    assert (offer.instance_type, offer.region) == ("g2-standard-4", "us-east4")
    assert (offer.price, offer.spot_price) == (pytest.approx(0.8), pytest.approx(0.28))


def test_gpus_on_gcp_machine_families_we_do_not_model_are_left_out_not_put_on_n1_hosts(tmp_path):
    _write(tmp_path / "gcp" / "vms.csv",
           "InstanceType,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,AvailabilityZone,Price,"
           "SpotPrice\n"
           "n1-highmem-64,64.0,416.0,,,,us-central1,us-central1-a,3.8,1.0\n"
           "n1-highmem-4,4.0,26.0,,,,us-central1,us-central1-a,0.24,0.05\n"
           ",,,H200,8,,us-central1,us-central1-a,80.0,30.0\n"  # SkyPilot puts H200 on a3-ultragpu-8g only
           ",,,T4,1,,us-central1,us-central1-a,0.35,0.1\n")
    catalog = Catalog(skypilot_dir=tmp_path)
    assert {o.gpu for o in catalog.offers(None, ["gcp"])} == {"T4"}
    assert catalog.offers("T4", ["gcp"])[0].instance_type == "n1-highmem-4"


def test_schema_version_is_read_without_importing_sky():
    code = ("import sys; from melange_sky.deploy.catalog import skypilot_schema_version as v; print(v()); "
            "assert 'sky' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    import importlib.util
    constants = importlib.util.find_spec("sky").submodule_search_locations[0] + "/skylet/constants.py"
    assert f"CATALOG_SCHEMA_VERSION = '{done.stdout.strip()}'" in open(constants).read()


def test_only_the_clouds_asked_for_are_read(monkeypatch):
    import melange_sky.deploy.catalog as catalog_module

    read = []
    original = catalog_module.read_vms_csv
    monkeypatch.setattr(catalog_module, "read_vms_csv", lambda path, cloud, source: read.append(cloud) or
                        original(path, cloud, source))
    catalog = Catalog(skypilot_dir=None)
    assert catalog.offers("A10G", ["aws"]) and read == ["aws"]
    catalog.offers("A10G", ["aws"])
    assert read == ["aws"]  # each cloud's file is read once


def test_catalog_command_prints_a_table_cheapest_first(cli):
    result = cli("catalog", "a100_80gb", "--cloud", "azure", "--cloud", "gcp")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["GPU", "cloud", "region"]
    assert "Standard_NC24ads_A100_v4" in lines[1] and "3.673" in lines[1]
    assert "a2-ultragpu-1g" in result.stdout
    assert "aws" not in "".join(lines[1:lines.index("")])


def test_catalog_command_json_is_the_offers(cli):
    result = cli("catalog", "A10G", "--json")
    assert result.exit_code == 0, result.stderr
    offers = json.loads(result.stdout)
    assert offers[0]["instance_type"] == "g5.xlarge" and offers[0]["accelerators"] == "A10G:1"
    assert [o["price_per_gpu"] for o in offers] == sorted(o["price_per_gpu"] for o in offers)


def test_catalog_command_unknown_gpu_is_one_error_line(cli):
    result = cli("catalog", "A100-40X")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: unknown GPU 'A100-40X'")
    assert "Traceback" not in result.stderr


def test_catalog_command_for_a_gpu_the_snapshot_lacks_says_how_to_get_skypilots_full_catalog(cli, tmp_path,
                                                                                             monkeypatch):
    # A machine where SkyPilot has no catalog (the session HOME has one once a test seeded it: sky_catalog_home).
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path / "no-sky-catalog"))
    result = cli("catalog", "H200")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: the bundled catalog snapshot (2025-11 prices, a few regions) has no offer for "
                           "'H200' in aws, azure, gcp, lambda; SkyPilot's full catalog (every region) may have it")
    assert f"{HOSTED_CATALOG_URL}/{skypilot_schema_version()}/<cloud>/vms.csv into {skypilot_catalog_dir()}/<cloud>/" \
        in line
    assert "did you mean" not in line


def test_a_gpu_missing_from_skypilots_own_catalog_names_that_catalog(tmp_path):
    _write(tmp_path / "aws" / "vms.csv",
           "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,"
           "AvailabilityZone,Arch\n"
           "g5.xlarge,A10G,1.0,4.0,16.0,,0.9,0.5,us-east-1,use1-az1,x86_64\n")
    with pytest.raises(CatalogError) as info:
        Catalog(skypilot_dir=tmp_path).offers("H200", ["aws"])
    assert str(info.value) == f"no offer for GPU 'H200' in aws (SkyPilot's catalog in {tmp_path})"


def test_a_skypilot_catalog_missing_a_column_is_one_error_naming_the_file_and_column_not_a_dropped_cloud(
        cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path))
    path = skypilot_catalog_dir() / "aws" / "vms.csv"
    _write(path, "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,PriceUSD,SpotPrice,Region,"
                 "AvailabilityZone\n"
                 "g5.xlarge,A10G,1.0,4,16,,1.006,0.4,us-west-2,usw2-az1\n")
    for args in (("catalog", "--cloud", "aws"), ("catalog", "A10G")):
        result = cli(*args)
        assert result.exit_code == 2, result.stdout
        [line] = result.stderr.splitlines()
        assert line.startswith(f"Error: the catalog {path} has no 'Price' column (its header: InstanceType,")
        assert "bundled catalog snapshot" not in line


def test_a_gcp_catalog_missing_its_host_vm_columns_names_them(tmp_path):
    _write(tmp_path / "gcp" / "vms.csv", "InstanceType,AcceleratorName,AcceleratorCount,Price,SpotPrice,Region\n"
                                         ",L4,1,0.6,0.2,us-east4\n")
    with pytest.raises(CatalogError, match="has no 'AvailabilityZone', 'vCPUs', 'MemoryGiB' columns"):
        Catalog(skypilot_dir=tmp_path).offers("L4", ["gcp"])


def test_a_skypilot_catalog_with_a_utf8_bom_and_extra_columns_is_read_as_skypilot_reads_it(tmp_path):
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "vms.csv").write_bytes(  # Excel's UTF-8 BOM first
        b"\xef\xbb\xbfInstanceType,AcceleratorName,AcceleratorCount,Price,SpotPrice,Region,SomethingNew\n"
        b"g5.xlarge,A10G,1.0,1.006,0.4,us-west-2,x\n")
    [offer] = Catalog(skypilot_dir=tmp_path).offers("A10G", ["aws"])
    assert (offer.instance_type, offer.region, offer.price, offer.spot_price) == ("g5.xlarge", "us-west-2", 1.006, 0.4)


def test_solve_warns_on_a_gpu_the_catalog_does_not_know_and_still_solves(cli, write_config, example):
    example["gpu_info"]["RTX4090"] = {"cost": 0.5, "tputs": [[1, 1], [1, 1]]}
    result = cli("solve", write_config(example))
    assert result.exit_code == 0, result.stderr
    assert "Warning: " in result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "RTX4090" in line]
    assert warning.startswith("Warning: ") and "gpu_info.RTX4090: unknown GPU 'RTX4090'" in warning
    assert "RTX4090" in result.stdout  # solved at its config cost
    plan = cli("plan", write_config(example), "-o", "out")
    assert plan.exit_code == 2 and "gpu_info.RTX4090: unknown GPU 'RTX4090'" in plan.stderr


def test_catalog_command_never_imports_skypilot(tmp_path):
    code = ("import sys; from melange_sky.cli import main\n"
            "try:\n    main(['catalog', 'A10G'])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'sky' not in sys.modules, 'sky was imported'\n")
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # pandas, inside SkyPilot's GCP catalog
def test_real_skypilot_accepts_and_prices_every_bundled_offer(sky_catalog_home):
    """Each bundled offer, given to SkyPilot 0.14 as cloud + instance type + region + accelerators, validates
    offline against the seeded snapshot and costs what the catalog says (on demand and on spot)."""
    import sky

    assert str(skypilot_catalog_dir()).startswith(str(sky_catalog_home))
    failures = []
    for offer in Catalog(skypilot_dir=None).offers():
        cloud = sky.CLOUD_REGISTRY.from_str(offer.cloud)
        try:
            resources = sky.Resources(cloud=cloud, instance_type=offer.instance_type, region=offer.region,
                                      accelerators=offer.accelerators)
            task = sky.Task(run="echo ok")
            task.set_resources(resources)
            task.validate()
            assert cloud.get_feasible_launchable_resources(resources).resources_list
            assert resources.get_cost(3600) == pytest.approx(offer.price)
            if offer.spot_price is not None:
                spot = resources.copy(use_spot=True)
                assert spot.get_cost(3600) == pytest.approx(offer.spot_price)
        except Exception as exc:  # collect every rejected row, not just the first
            failures.append(f"{offer.key} {offer.accelerators}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
    assert (BUNDLED_DIR / "common" / "accelerators.csv").is_file()


def test_a_gpu_missing_from_both_skypilots_file_and_the_snapshot_names_each_and_asks_only_for_the_missing_files(
        tmp_path):
    _write(tmp_path / "aws" / "vms.csv",
           "InstanceType,AcceleratorName,AcceleratorCount,Price,SpotPrice,Region\n"
           "g5.xlarge,A10G,1.0,0.9,0.5,us-east-1\n")
    with pytest.raises(CatalogError) as info:
        Catalog(skypilot_dir=tmp_path).offers("H200", ["aws", "azure"])
    message = str(info.value)
    assert message.startswith("the bundled catalog snapshot (2025-11 prices, a few regions) has no offer for 'H200' "
                              f"in azure (nor has SkyPilot's catalog for aws in {tmp_path}); ")
    assert "/azure/vms.csv into " in message and "/aws/vms.csv" not in message
