"""`melange-sky solve` end to end on the original example: answers, files, JSON and options."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

EXAMPLE_PATH = str(REPO / "examples" / "example.json")


def test_default_answer_matches_the_original_tool(cli, tmp_path):
    result = cli("solve", EXAMPLE_PATH)
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "melange_result.json").read_text()) == {"A10G": 3, "A100-80GB": 1, "cost": 6.7}
    assert "6.70" in result.stdout
    assert "Wrote melange_result.json" in result.stderr


@pytest.mark.parametrize("formulation, expected", [
    ("slices", {"A10G": 3, "A100-80GB": 1, "cost": 6.7}),
    ("paper", {"A10G": 3, "A100-80GB": 1, "cost": 6.7}),
    ("split", {"A10G": 1, "A100-80GB": 1, "cost": 4.68}),
])
def test_each_formulation_gives_its_known_optimum(cli, tmp_path, formulation, expected):
    out = tmp_path / "out.json"
    result = cli("solve", EXAMPLE_PATH, "--formulation", formulation, "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text()) == expected


def test_table_shows_baselines_saving_and_cheaper_split(cli):
    out = cli("solve", EXAMPLE_PATH).stdout
    assert "A10G          12 x $1.01 = $12.12/h" in out
    assert "A100-80GB      2 x $3.67 = $7.34/h  <- cheapest" in out
    assert "The mix saves $0.64/h (8.7%) against 2 x A100-80GB." in out
    assert "--formulation split would cost $4.68/h (saves $2.02/h, 30.1%)" in out


def test_json_prints_full_record_with_routing_table(cli):
    result = cli("solve", EXAMPLE_PATH, "--formulation", "split", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)  # stdout holds nothing but the JSON
    assert record["counts"] == {"A10G": 1, "A100-80GB": 1}
    assert record["status"] == "optimal" and record["solver"] == "highs"
    routes = {tuple(r["bucket"]): r["shares"] for r in record["routing"]}
    assert routes[(1, 0)]["A10G"] == pytest.approx(1 / 3, abs=1e-6)
    assert routes[(1, 0)]["A100-80GB"] == pytest.approx(2 / 3, abs=1e-6)
    assert routes[(0, 0)] == {"A100-80GB": 1.0}
    assert record["best_baseline"] == "A100-80GB" and record["saving"] == pytest.approx(7.34 - 4.68)
    assert {b["gpu"]: b["count"] for b in record["baselines"]} == {"A10G": 12, "A100-80GB": 2}
    assert record["lower_bound"] == pytest.approx(4.68)


def test_rate_override_scales_the_fleet(cli):
    record = json.loads(cli("solve", EXAMPLE_PATH, "--rate", "60", "--json").stdout)
    assert record["total_request_rate"] == 60
    assert record["cost"] > 6.7


def test_headroom_keeps_every_gpu_below_it(cli):
    record = json.loads(cli("solve", EXAMPLE_PATH, "--headroom", "0.8", "--json").stdout)
    assert record["headroom"] == 0.8
    assert all(g["utilisation"] is None or g["utilisation"] <= 0.8 + 1e-9 for g in record["gpus"])
    assert record["cost"] > 6.7


def test_json_stdout_is_clean_of_the_highs_banner():
    # HiGHS prints a banner on fd 1 whatever PuLP's msg says; --json output must stay parseable by a pipe.
    done = subprocess.run([sys.executable, "-m", "melange_sky.cli", "solve", EXAMPLE_PATH, "--json", "-o", os.devnull],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["solver"] == "highs"


def test_cbc_solver_agrees_on_the_example(cli):
    result = cli("solve", EXAMPLE_PATH, "--solver", "cbc", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["counts"] == {"A10G": 3, "A100-80GB": 1} and record["solver"] == "cbc"


def test_solver_path_runs_that_cbc_binary(cli):
    import pulp

    result = cli("solve", EXAMPLE_PATH, "--solver-path", pulp.PULP_CBC_CMD.pulp_cbc_path, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["cost"] == pytest.approx(6.7) and record["solver"] == "cbc"


def test_solver_path_that_is_not_executable_is_a_clean_error(cli, tmp_path):
    fake = tmp_path / "cbc"
    fake.write_text("not a binary")
    result = cli("solve", EXAMPLE_PATH, "--solver-path", str(fake))
    assert result.exit_code == 2 and result.stderr.startswith("Error: --solver-path")


def test_unwritable_output_is_a_clean_error(cli, tmp_path):
    result = cli("solve", EXAMPLE_PATH, "-o", str(tmp_path / "missing" / "out.json"))
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("Error: cannot write") and "Traceback" not in result.stderr


def test_help_explains_options(cli):
    result = cli("solve", "--help")
    for option in ("--formulation", "--solver", "--solver-path", "--headroom", "--rate", "--json", "--debug",
                   "--time-limit", "melange_result.json"):
        assert option in result.stdout


def test_solve_plan_and_help_never_import_skypilot():
    code = ("import sys; from melange_sky.cli import main\n"
            "for args in (['--help'], ['solve', '--help'], ['solve', sys.argv[1], '-o', sys.argv[2]],\n"
            "             ['plan', sys.argv[1], '-o', sys.argv[2] + '.d'], ['up', '--help'], ['down', '--help']):\n"
            "    try: main(args)\n"
            "    except SystemExit as e: assert not e.code, e.code\n"
            "assert 'sky' not in sys.modules, 'sky was imported'\n")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-c", code, EXAMPLE_PATH, f"{tmp}/r.json"], capture_output=True,
                              text=True)
    assert done.returncode == 0, done.stderr
