"""Templates are untrusted input (a shared config names one in `deployment.template`): they render in a sandbox, and
a replica's rendered resources must be the offer the plan bound, through the public plan command and functions."""
from __future__ import annotations

from pathlib import Path

import pytest

from melange_sky.deploy.render import builtin_templates, load_template, render
from melange_sky.errors import TemplateError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PATH = str(ROOT / "examples" / "example.json")


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---- the sandbox -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expression", [
    'lipsum.__globals__["os"].popen("touch {marker}").read()',
    'cycler.__init__.__globals__.os.system("touch {marker}")',
    '().__class__.__base__.__subclasses__()',
    'envs.update({{"X": "y"}})',
], ids=["lipsum globals", "cycler globals", "object subclasses", "mutating a value"])
def test_a_template_reaching_for_python_is_refused_and_runs_nothing(cli, tmp_path, expression):
    marker = tmp_path / "pwned.txt"
    tpl = tmp_path / "rce.j2"
    tpl.write_text("name: {{ " + expression.format(marker=marker) + " | tojson }}\nresources: {}\nrun: echo\n")
    result = cli("plan", EXAMPLE_PATH, "--template", str(tpl), "-o", str(tmp_path / "out"))
    line = one_error_line(result)
    assert f"{tpl}:1: refused: access to attribute" in line and "sandbox" in line, line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


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
