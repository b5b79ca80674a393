"""Templates and the bundled catalog are found from a plain (non-editable) install and from a source checkout.

Both run a separate `python -S` whose sys.path is exactly the code under test plus the venv's site-packages
(given explicitly, so its .pth files, including the editable install's import hook, are not processed): the
package can only come from where the test puts it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

from conftest import REPO

EXAMPLE_PATH = str(REPO / "examples" / "example.json")
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
EXAMPLE_FILES = ["skypilot_A100-80GB_0.yaml", "skypilot_A10G_0.yaml", "skypilot_A10G_1.yaml", "skypilot_A10G_2.yaml"]

PROBE = r"""
import json, sys
from pathlib import Path

import melange_sky
from melange_sky import load_config
from melange_sky.deploy.catalog import Catalog
from melange_sky.deploy.plan import PlanSettings, build_plan, write_plan
from melange_sky.deploy.render import builtin_template_dir, builtin_templates

catalog = Catalog(skypilot_dir=None)
plan = build_plan(load_config(sys.argv[1]), PlanSettings(catalog=catalog, compare=False))
written = write_plan(plan, sys.argv[2], ("skypilot",))
print(json.dumps({
    "package": melange_sky.__file__,
    "template_dir": str(builtin_template_dir()),
    "templates": builtin_templates(),
    "catalog": [str(catalog.path(cloud)[0]) for cloud in ("aws", "azure", "gcp", "lambda")],
    "a10g": [[o.cloud, o.region, o.instance_type, o.price] for o in catalog.offers("A10G")],
    "written": sorted(p.name for p in written),
    "sky_imported": "sky" in sys.modules,
}))
"""


def isolated_python(args: list[str], code_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`python -S ARGS` seeing only `code_root` and the venv's site-packages, in `cwd`, with a fresh HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MELANGE_SKY", "SKY_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(code_root), SITE_PACKAGES]), HOME=str(cwd / "home"),
               PYTHONDONTWRITEBYTECODE="1")
    (cwd / "home").mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_a_plain_wheel_install_finds_templates_and_the_bundled_catalog(tmp_path):
    # Build from a copy, so the build leaves no build/ or egg-info behind in the checkout.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "tests",
        ".mypy_cache", ".ruff_cache", ".grimp_cache", ".import_linter_cache", "site"))  # caches and the built docs
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = dist.glob("melange_sky-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    shutil.rmtree(source)  # nothing may be read from the build tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    probe = elsewhere / "probe.py"
    probe.write_text(PROBE)
    found = json.loads(isolated_python([str(probe), EXAMPLE_PATH, str(elsewhere / "out")], site,
                                       elsewhere).stdout)
    assert Path(found["package"]).is_relative_to(site)
    assert Path(found["template_dir"]) == site / "melange_sky" / "templates"
    assert {"vllm", "sglang"} <= set(found["templates"])
    assert all(Path(p).is_relative_to(site / "melange_sky" / "data" / "catalogs") and Path(p).is_file()
               for p in found["catalog"])
    assert ["aws", "us-west-2", "g5.xlarge", 1.006] in found["a10g"]
    assert found["written"] == EXAMPLE_FILES
    assert not found["sky_imported"]

    # The installed command line too (templates by name, the bundled catalog since HOME has no SkyPilot catalog).
    isolated_python(["-m", "melange_sky.cli", "plan", EXAMPLE_PATH, "--template", "sglang", "-o", "cli"], site,
                    elsewhere)
    task = yaml.safe_load((elsewhere / "cli" / "skypilot_A10G_0.yaml").read_text())
    assert "sglang.launch_server" in task["run"] and task["resources"]["instance_type"] == "g5.xlarge"


def test_a_source_checkout_finds_its_templates(tmp_path):
    """`python -m melange_sky.cli plan` with only the checkout on PYTHONPATH (no install), run from elsewhere."""
    done = isolated_python(["-c", "import melange_sky, melange_sky.deploy.render as r; "
                                  "print(melange_sky.__file__); print(r.builtin_template_dir()); "
                                  "print(','.join(r.builtin_templates()))"], REPO, tmp_path)
    package, template_dir, templates = done.stdout.split()
    assert Path(package).is_relative_to(REPO)
    assert Path(template_dir).resolve() == REPO / "templates"
    assert {"vllm", "sglang"} <= set(templates.split(","))

    for template in ("vllm", "sglang"):
        isolated_python(["-m", "melange_sky.cli", "plan", EXAMPLE_PATH, "-f", "skypilot", "--template", template,
                         "-o", template], REPO, tmp_path)
        assert sorted(p.name for p in (tmp_path / template).iterdir() if p.name != ".melange-sky-plan.json") \
            == EXAMPLE_FILES
        run = yaml.safe_load((tmp_path / template / "skypilot_A10G_0.yaml").read_text())["run"]
        assert ("vllm serve" if template == "vllm" else "sglang.launch_server") in run
