"""Configs in YAML (.yaml / .yml), read everywhere a JSON config is: same validation, errors with line numbers, and
`--into` writing YAML back (with the old file kept as .bak when the rewrite drops its comments)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from melange_sky import ConfigError
from melange_sky.core.config import load_config
from melange_sky.core.config_doc import read_config_object

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_YAML = REPO / "examples" / "example.yaml"

BROKEN_TPUTS = """\
# a comment
workload_distribution:
  - [0.2, 0.1]
  - [0.5, 0.2]
total_request_rate: 30
gpu_info:
  A10G:
    cost: 1.01
    tputs: [[2, 1],
            [-1, 2]]
  A100-80GB:
    cost: 3.67
    tputs:
      - [20, 20]
      - [40, 20]
"""


def _error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Warning:")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def test_the_yaml_copy_of_the_example_solves_to_the_same_fleet_as_the_json(cli, tmp_path):
    result = cli("solve", str(EXAMPLE_YAML), "--json", "-o", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("Warning") == 0
    record = json.loads(result.stdout)
    assert record["cost"] == pytest.approx(6.70, abs=1e-9)
    assert json.loads((tmp_path / "r.json").read_text()) == {"A10G": 3, "A100-80GB": 1, "cost": pytest.approx(6.70)}
    assert load_config(EXAMPLE_YAML).gpus == load_config(REPO / "examples" / "example.json").gpus


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".YAML"])
def test_yaml_is_chosen_by_the_file_name(cli, tmp_path, suffix):
    path = tmp_path / f"config{suffix}"
    path.write_text(EXAMPLE_YAML.read_text())
    human = cli("solve", str(path), "-o", str(tmp_path / "r.json"))
    assert human.exit_code == 0, human.stderr
    assert "6.70" in human.stdout


def test_a_bad_value_in_yaml_names_the_file_line_and_field(cli, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(BROKEN_TPUTS)
    line = _error_line(cli("solve", str(path)))
    assert line == (f"Error: {path}:10: gpu_info.A10G.tputs[1][0]: must be a number >= 0 (0 means this GPU cannot "
                    f"serve the bucket), got -1")


def test_a_missing_key_in_yaml_gets_the_line_of_its_entry(cli, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(BROKEN_TPUTS.replace("    tputs: [[2, 1],\n            [-1, 2]]\n", ""))
    assert _error_line(cli("solve", str(path))) == f"Error: {path}:7: gpu_info.A10G.tputs: missing (required)"


def test_an_unknown_key_in_yaml_is_an_error_at_its_line(cli, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE_YAML.read_text() + "slice_facter: 2\n")
    result = cli("solve", str(path), "-o", str(tmp_path / "r.json"))
    assert result.exit_code == 2, result.stderr
    assert _error_line(result).startswith(f"Error: {path}:19: slice_facter: unknown key; did you mean 'slice_factor'?")


def test_x_keys_are_notes_at_every_level_of_a_yaml_config_even_as_anchors(cli, tmp_path):
    path = tmp_path / "config.yaml"
    text = EXAMPLE_YAML.read_text().replace("gpu_info:\n", "gpu_info:\n  x-shared: &cheap {cost: 1.01}\n", 1)
    text = text.replace("    cost: 1.01 ", "    <<: *cheap ", 1)
    assert "<<: *cheap" in text
    path.write_text("x-owner: the inference team\n" + text + "deployment:\n  x-why: pinned for the demo\n")
    result = cli("solve", str(path), "-o", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.stderr
    assert "x-" not in result.stderr


@pytest.mark.parametrize("text, fragment", [
    ("workload_distribution: [[1]\ntotal_request_rate: 3\n", ":2:1: not valid YAML: "),
    ("a: 1\n b: 2\n", ":2:3: not valid YAML: mapping values are not allowed"),
    ("gpu_info:\n\t- A10G\n", ":2:1: not valid YAML: a tab where YAML does not allow one: indent with spaces"),
    ("a: 1\n---\nb: 2\n", ":2:1: not valid YAML: expected a single document in the stream, but found another document"),
    ("a: !!python/object:os.system x\n", ":1:4: not valid YAML: could not determine a constructor"),
])
def test_a_yaml_syntax_error_is_one_line_with_line_and_column(cli, tmp_path, text, fragment):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    line = _error_line(cli("solve", str(path)))
    assert line.startswith(f"Error: {path}{fragment}"), line


@pytest.mark.parametrize("text, fragment", [
    ("", "file is empty, expected a YAML mapping"),
    ("# only a comment\n", "has no YAML document"),
    ("- 1\n- 2\n", "must be a YAML mapping with workload_distribution"),
    ("total_request_rate: 3\ntotal_request_rate: 4\n", ":2: duplicate key 'total_request_rate'"),
    ("a: &x [1, *x]\n", ":1: a[1]: refers to itself (recursive alias)"),
    ("{[1]: 2}\n", ":1: a key must be a plain name"),
])
def test_yaml_documents_json_could_not_hold_are_refused_in_one_line(cli, tmp_path, text, fragment):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert fragment in _error_line(cli("solve", str(path)))


def test_yaml_numbers_read_as_json_would(tmp_path):
    text = EXAMPLE_YAML.read_text().replace("total_request_rate: 30 ", "total_request_rate: 3e1")
    assert "3e1" in text
    path = tmp_path / "config.yml"
    path.write_text(text)
    assert load_config(path).total_request_rate == 30.0


def test_yaml_anchors_and_merge_keys_work_and_a_key_may_override_its_merge(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("""\
workload_distribution: [[1]]
total_request_rate: 4
gpu_info:
  A10G: &base {cost: 1.01, tputs: [[2]]}
  L4:
    <<: *base
    cost: 0.8
""")
    config = load_config(path)
    assert [(g.name, g.cost, g.tputs) for g in config.gpus] == [("A10G", 1.01, ((2.0,),)), ("L4", 0.8, ((2.0,),))]


def test_a_date_where_a_number_belongs_is_a_one_line_error(cli, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE_YAML.read_text().replace("slice_factor: 1", "slice_factor: 2025-01-01"))
    assert "slice_factor: must be an integer >= 1, got \"2025-01-01\"" in _error_line(cli("solve", str(path)))


def test_a_yaml_file_under_a_json_name_gets_a_hint(cli, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(EXAMPLE_YAML.read_text())
    assert "a YAML config needs a name ending in .yaml or .yml" in _error_line(cli("solve", str(path)))


def test_plan_reads_yaml(cli, tmp_path):
    result = cli("plan", str(EXAMPLE_YAML), "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["solve"]["cost"] == pytest.approx(6.70)


def _trace(tmp_path: Path) -> Path:
    path = tmp_path / "t.jsonl"
    rows = [(10, 10)] * 1 + [(10, 200)] * 3 + [(500, 10)] * 4 + [(500, 200)] * 2
    path.write_text("".join(json.dumps({"prompt_tokens": i, "completion_tokens": o, "timestamp": k * 0.25}) + "\n"
                            for k, (i, o) in enumerate(rows)))
    return path


def _yaml_config(tmp_path: Path, comments: bool) -> Path:
    text = EXAMPLE_YAML.read_text() + "input_buckets: [1, 100, 1000]\noutput_buckets: [1, 100, 1000]\n"
    if not comments:
        text = "\n".join(line.split("#")[0].rstrip() for line in text.splitlines() if not line.startswith("#"))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_workload_into_a_yaml_config_writes_yaml_back(cli, tmp_path):
    path = _yaml_config(tmp_path, comments=False)
    result = cli("workload", str(_trace(tmp_path)), "--into", str(path))
    assert result.exit_code == 0, result.stderr
    assert "Warning" not in result.stderr
    assert not path.with_name("config.yaml.bak").exists()
    text = path.read_text()
    assert not text.lstrip().startswith("{")  # YAML, not JSON
    assert "- [0.1, 0.3]" in text  # a matrix row per line
    merged = load_config(path)
    assert merged.workload_distribution == ((0.1, 0.3), (0.4, 0.2))
    assert [g.name for g in merged.gpus] == ["A10G", "A100-80GB"]


def test_rewriting_a_yaml_config_with_comments_keeps_the_old_file_and_says_so(cli, tmp_path):
    path = _yaml_config(tmp_path, comments=True)
    before = path.read_text()
    result = cli("workload", str(_trace(tmp_path)), "--into", str(path))
    assert result.exit_code == 0, result.stderr
    backup = path.with_name("config.yaml.bak")
    assert f"Warning: {path}: rewritten without its comments (PyYAML cannot keep them); the previous file, " \
           f"comments and all, is {backup}" in result.stderr
    assert backup.read_text() == before
    assert load_config(path).workload_distribution == ((0.1, 0.3), (0.4, 0.2))


def test_workload_into_yaml_with_a_json_output_writes_json_and_leaves_the_yaml_alone(cli, tmp_path):
    path = _yaml_config(tmp_path, comments=True)
    before = path.read_text()
    out = tmp_path / "merged.json"
    result = cli("workload", str(_trace(tmp_path)), "--into", str(path), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert path.read_text() == before
    assert json.loads(out.read_text())["workload_distribution"] == [[0.1, 0.3], [0.4, 0.2]]


def test_into_reads_yaml_with_the_same_one_line_errors(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n b: 2\n")
    with pytest.raises(ConfigError, match=r"config.yaml:2:3: not valid YAML"):
        read_config_object(path)
    with pytest.raises(ConfigError, match="no such file \\(--into needs an existing config\\)"):
        read_config_object(tmp_path / "missing.yml")


def test_help_and_json_configs_do_not_import_pyyaml():
    code = ("import sys; from melange_sky.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "from melange_sky.core.config import load_config\n"
            f"load_config({str(REPO / 'examples' / 'example.json')!r})\n"
            "print('yaml' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
