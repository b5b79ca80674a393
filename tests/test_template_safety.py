"""Templates are untrusted input (a shared config names one in `deployment.template`): they render in a sandbox, and
a replica's rendered resources must be the offer the plan bound, through the public plan command and functions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from melange_sky.deploy.render import BoundOffer, bind_resources, builtin_templates, load_template, render
from melange_sky.errors import TemplateError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PATH = str(ROOT / "examples" / "example.json")


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---- the sandbox -------------------------------------------------------------------------------------------------

def test_the_reviewers_template_running_a_shell_command_is_refused_and_runs_nothing(cli, tmp_path):
    marker = tmp_path / "pwned.txt"
    tpl = tmp_path / "rce.j2"
    tpl.write_text('name: {{ lipsum.__globals__["os"].popen("echo hi > ' + str(marker) + '").read() | tojson }}\n'
                   'resources: {}\nrun: echo\n')
    result = cli("plan", EXAMPLE_PATH, "--template", str(tpl), "-o", str(tmp_path / "out"))
    assert one_error_line(result) == (
        f"Error: {tpl}:1: refused: access to attribute '__globals__' of 'function' object is unsafe (templates "
        f"render in a sandbox: they read the plan's variables and cannot reach Python or change those values)")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("expression, attribute", [
    ('cycler.__init__.__globals__.os.system("touch {marker}")', "__init__"),
    ("().__class__.__base__.__subclasses__()", "__class__"),
    ('"{{0.__class__}}".format(port)', "__class__"),
    ('envs.update({{"X": "y"}})', "update"),
], ids=["cycler globals", "object subclasses", "str.format", "mutating a value"])
def test_a_template_reaching_for_python_is_refused_naming_its_line(tmp_path, expression, attribute):
    marker = tmp_path / "pwned.txt"
    tpl = tmp_path / "t.j2"
    tpl.write_text("name: x\nrun: echo {{ " + expression.format(marker=marker) + " }}\n")
    with pytest.raises(TemplateError, match=rf"^{tpl}:2: refused: access to attribute '{attribute}' .* unsafe"):
        render(load_template(str(tpl)), {"port": 8000, "envs": {}})
    assert not marker.exists()


def test_the_router_template_renders_in_the_same_sandbox():
    # the router task (deploy/router_task.py) loads templates/router.j2 through load_template, as replicas do
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for name in (*builtin_templates(), str(ROOT / "templates" / "router.j2")):
        assert isinstance(load_template(name).jinja.environment, ImmutableSandboxedEnvironment), name


def test_the_sandbox_still_offers_the_filters_the_templates_use(tmp_path):
    tpl = tmp_path / "t.j2"
    tpl.write_text('name: {{ name | tojson }}\nrun: echo {{ arg | shell_quote }} {{ "${%s:?x}" % key }} '
                   '{% for k, v in envs | dictsort %}{{ k }}={{ v }}{% endfor %}\n')
    _, task = render(load_template(str(tpl)), {"name": "a\u2028b", "arg": "x y", "key": "K", "envs": {"B": 2, "A": 1}})
    assert task == {"name": "a\u2028b", "run": "echo 'x y' ${K:?x} A=1B=2"}


def test_a_directory_given_as_template_says_it_is_a_directory(cli, tmp_path):
    result = cli("plan", EXAMPLE_PATH, "--template", str(tmp_path), "-o", str(tmp_path / "out"))
    assert f"template {tmp_path}: is a directory, not a template file" in one_error_line(result)
    with pytest.raises(TemplateError, match="no such file"):
        load_template(str(tmp_path / "missing.j2"))


# ---- the rendered resources are the plan's offer -----------------------------------------------------------------

OFFER = BoundOffer(accelerators="A10G:1", cloud="aws", region="us-west-2", instance_type="g5.xlarge")
WRONG = 'name: {{ cluster | tojson }}\nresources:\n  accelerators: "H100:8"\n  use_spot: true\nrun: echo hi\n'


@pytest.mark.parametrize("command", [("plan", "-o", "out"), ("up", "--dryrun")])
def test_a_template_launching_another_gpu_than_the_plan_is_refused(cli, tmp_path, command):
    tpl = tmp_path / "wrong.j2"
    tpl.write_text(WRONG)
    result = cli(command[0], EXAMPLE_PATH, "--template", str(tpl), *command[1:])
    assert one_error_line(result) == (f"Error: {tpl} renders resources.accelerators 'H100:8' for example-a10g-0, but "
                                      f"the plan bound A10G:1 on aws us-west-2 g5.xlarge, on-demand")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("resources, field", [
    ("", "no resources"),
    ("resources:\n  accelerators: {{ accelerators }}\n  use_spot: true\n", "resources.use_spot true"),
], ids=["no resources", "spot for an on-demand offer"])
def test_a_template_without_resources_or_in_another_market_is_refused(cli, tmp_path, resources, field):
    tpl = tmp_path / "t.j2"
    tpl.write_text("name: {{ cluster | tojson }}\n" + resources + "run: echo hi\n")
    result = cli("plan", EXAMPLE_PATH, "--template", str(tpl), "-o", str(tmp_path / "out"))
    assert f"{tpl} renders {field} for example-a10g-0, but the plan bound A10G:1" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_a_custom_template_leaving_the_offer_out_gets_it_filled_in_and_the_file_says_so(cli, tmp_path):
    tpl = tmp_path / "mine.j2"
    tpl.write_text("# my team's template\nname: {{ cluster | tojson }}\nresources:\n  ports: {{ port }}\n"
                   "run: |\n  echo {{ model }}\n  echo done\n")
    out = tmp_path / "out"
    result = cli("plan", EXAMPLE_PATH, "--template", str(tpl), "-o", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    replicas = json.loads((out / "melange_plan.json").read_text())["replicas"]
    for replica in replicas:
        text = (out / replica["file"]).read_text()
        task = yaml.safe_load(text)
        assert task["resources"] == {"ports": 8000, "cloud": replica["cloud"], "region": replica["region"],
                                     "instance_type": replica["instance_type"],
                                     "accelerators": replica["accelerators"]}
        assert task["run"] == "echo meta-llama/Llama-2-7b-chat-hf\necho done\n"
        assert text.startswith("# my team's template\n# resources completed by melange-sky with the plan's offer")


def test_a_builtin_template_renders_the_whole_offer_itself_so_its_text_is_untouched(cli, tmp_path):
    for template in builtin_templates():
        out = tmp_path / template
        assert cli("plan", EXAMPLE_PATH, "--template", template, "-o", str(out)).exit_code == 0
        for path in out.glob("*.yaml"):
            text = path.read_text()
            assert text.startswith("# Rendered by melange-sky") and "completed by melange-sky" not in text


@pytest.mark.parametrize("resources", [
    {"accelerators": "A10G:1", "cloud": "aws", "region": "us-west-2", "instance_type": "g5.xlarge", "use_spot": False},
    {"accelerators": {"A10G": 1}, "cloud": "AWS", "region": "us-west-2", "zone": "us-west-2a"},
    {"accelerators": "a10g", "infra": "aws/us-west-2/us-west-2a", "ports": [8000]},
    {"infra": "aws"},
    {},
], ids=["all of it", "mapping form, cloud in capitals, a zone", "infra with a zone", "infra without region", "none"])
def test_resources_equal_to_the_offer_in_any_of_skypilots_spellings_pass(resources):
    text, task = bind_resources(load_template("vllm"), "", {"name": "c", "resources": resources}, "c", OFFER)
    bound = task["resources"]
    assert _accelerator_of(bound) == ("a10g", 1.0) and bound.get("use_spot", False) is False
    where = bound["infra"].split("/") if "infra" in bound else [str(bound["cloud"]).lower(), bound["region"]]
    assert where[:2] == ["aws", "us-west-2"] and bound["instance_type"] == "g5.xlarge"
    # what the template said stays (an `infra` naming only the cloud is completed with the region)
    assert {k: v for k, v in bound.items() if k in resources and k != "infra"} == {
        k: v for k, v in resources.items() if k != "infra"}
    assert yaml.safe_load(text) == task if text else task["resources"] is resources


@pytest.mark.parametrize("task, field", [
    ({"resources": {"accelerators": "A10G:2"}}, "resources.accelerators 'A10G:2'"),
    ({"resources": {"accelerators": ["A10G:1", "L4:1"]}}, "resources.accelerators [\"A10G:1\", \"L4:1\"]"),
    ({"resources": {"cloud": "gcp"}}, "resources.cloud 'gcp'"),
    ({"resources": {"region": "us-east-1"}}, "resources.region 'us-east-1'"),
    ({"resources": {"instance_type": "g5.12xlarge"}}, "resources.instance_type 'g5.12xlarge'"),
    ({"resources": {"infra": "aws/us-east-1"}}, "resources.infra 'aws/us-east-1'"),
    ({"resources": {"any_of": [{"accelerators": "A10G:1"}]}}, "resources.any_of (alternatives)"),
    ({"resources": {}, "num_nodes": 2}, "num_nodes 2"),
    ({"resources": "A10G:1"}, "resources as a str, not a mapping"),
])
def test_resources_other_than_the_offer_are_refused_naming_the_field(task, field):
    with pytest.raises(TemplateError) as caught:
        bind_resources(load_template("vllm"), "", {"name": "c", **task}, "c-a10g-0", OFFER)
    assert str(caught.value).startswith(f"{load_template('vllm').path} renders {field} for c-a10g-0, but the plan "
                                        f"bound A10G:1 on aws us-west-2 g5.xlarge, on-demand"), caught.value


def test_a_cloud_the_plan_left_open_cannot_be_pinned_by_the_template():
    offer = BoundOffer(accelerators="A10G:1", use_spot=True)
    with pytest.raises(TemplateError, match=r"renders resources.cloud 'gcp' for c, but the plan bound A10G:1 \(no "
                                            r"cloud pinned\), spot"):
        bind_resources(load_template("vllm"), "", {"resources": {"cloud": "gcp"}}, "c", offer)
    _, task = bind_resources(load_template("vllm"), "", {"resources": {}}, "c", offer)
    assert task["resources"] == {"accelerators": "A10G:1", "use_spot": True}


def _accelerator_of(resources):
    value = resources["accelerators"]
    if isinstance(value, dict):
        ((name, count),) = value.items()
        return name.lower(), float(count)
    name, _, count = value.partition(":")
    return name.lower(), float(count or 1)


def test_a_template_includes_only_files_of_its_own_directory(tmp_path):
    (tmp_path / "part.yaml").write_text("run: echo hi\n")
    (tmp_path / "ok.j2").write_text('name: x\n{% include "part.yaml" %}\n')
    assert render(load_template(str(tmp_path / "ok.j2")), {})[1] == {"name": "x", "run": "echo hi"}
    (tmp_path / "out.j2").write_text('name: x\n{% include "../secret.txt" %}\n')
    (tmp_path.parent / "secret.txt").write_text("run: leaked\n")
    with pytest.raises(TemplateError, match=rf"out.j2:2: includes '../secret.txt', which is not a file of the "
                                            rf"template's own directory \({tmp_path}\)"):
        render(load_template(str(tmp_path / "out.j2")), {})


def test_a_task_completed_with_the_offer_reads_back_the_same_from_its_file():
    task = {"name": "c", "resources": {"ports": 8000},
            "envs": {"PORT": "8000", "B": "yes", "C": "null", "D": "a: b # c", "E": "\u00e9\u2028x"},
            "run": "echo a  \n  echo b\t\n", "setup": "x\n\n\ny"}
    text, bound = bind_resources(load_template("vllm"), "# mine\nname: c\n", task, "c", OFFER)
    assert yaml.safe_load(text) == bound and bound["envs"] == task["envs"] and bound["run"] == task["run"]
    assert bound["resources"] == {"ports": 8000, "accelerators": "A10G:1", "cloud": "aws", "region": "us-west-2",
                                  "instance_type": "g5.xlarge"}
    assert text.startswith("# mine\n# resources completed by melange-sky")
