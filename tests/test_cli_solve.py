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
    assert record["lower_bound"] == pytest.approx(4.68) and record["gap"] == 0  # proven: no gap


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


# ---- issue 12: solve shows what plan makes; guards; output hygiene --------------------------------------------------
SPOT = {"name": "spot", "workload_distribution": [[0.2, 0.1], [0.5, 0.2]], "total_request_rate": 50,
        "slice_factor": 1, "gpu_info": {"L4": {"tputs": [[2, 1], [5, 2]], "use_spot": True},
                                        "A100-80GB": {"tputs": [[20, 20], [40, 20]], "use_spot": True}}}


@pytest.mark.parametrize("per_offer", [(), ("--per-offer",)])
def test_solve_gives_the_fleet_and_prices_plan_makes_with_spot_offers(cli, write_config, tmp_path, per_offer):
    # A100-80GB's only spot offers are 8-GPU instances: solve once counted single GPUs at an eighth of their price.
    path = write_config(SPOT)
    solved = json.loads(cli("solve", path, "--json", *per_offer).stdout)
    planned = json.loads(cli("plan", path, "--json", "-o", str(tmp_path / "plan"), *per_offer).stdout)
    assert solved["counts"] == planned["solve"]["counts"]
    assert solved["cost"] == pytest.approx(planned["cost"])
    prices = {g["name"]: g["price"] for g in solved["gpus"]}
    assert all(r["price"] == prices[r["gpu"]] for r in planned["replicas"])  # one price per replica


def test_solve_counts_8_gpu_instances_and_says_so(cli, write_config):
    data = {**SPOT, "gpu_info": {"A100-80GB": SPOT["gpu_info"]["A100-80GB"]}, "total_request_rate": 240}
    out = cli("solve", write_config(data), "-o", "r.json").stdout
    assert "A100-80GB (8-GPU instance)" in out


def test_a_fleet_above_max_replicas_is_one_line_exit_2_and_writes_nothing(cli, tmp_path):
    result = cli("solve", EXAMPLE_PATH, "--rate", "1e6")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "above --max-replicas 500" in result.stderr
    assert not (tmp_path / "melange_result.json").exists()
    assert cli("solve", EXAMPLE_PATH, "--rate", "1000", "--max-replicas", "100", "--json").exit_code == 0


def test_json_writes_no_file_unless_o_is_given(cli, tmp_path):
    assert cli("solve", EXAMPLE_PATH, "--json").exit_code == 0
    assert not (tmp_path / "melange_result.json").exists()
    assert cli("solve", EXAMPLE_PATH, "--json", "-o", "r.json").exit_code == 0
    assert json.loads((tmp_path / "r.json").read_text())["cost"] == pytest.approx(6.7)


def test_table_stays_aligned_for_short_gpu_names_and_large_counts(cli, write_config):
    data = {"workload_distribution": [[1.0]], "total_request_rate": 30000, "slice_factor": 1,
            "gpu_info": {"L4": {"cost": 0.8, "tputs": [[100]]}, "T4": {"cost": 0.5, "tputs": [[40]]}}}
    out = cli("solve", write_config(data), "-o", "r.json").stdout.splitlines()
    header = next(line for line in out if line.strip().startswith("GPU"))
    table = out[out.index(header):out.index("Single-GPU-type fleets:")]
    rows = [line for line in table if line.strip().split(" ")[0] in ("L4", "T4", "total")]
    assert len(rows) == 3
    for column, lines in (("count", rows), ("$/h each", rows[:2]), ("$/h ", rows)):  # numbers end under headers
        end = header.rindex(column) + len(column.strip())
        for row in lines:
            assert row[end - 1] != " " and (len(row) == end or row[end] == " "), (column, row)
    assert "300" in rows[-1] and "$175,200/month" in "\n".join(out)


def test_a_comparison_cut_short_by_its_time_limit_says_so_and_gives_its_cost_as_a_bound():
    import dataclasses

    from melange_sky.cli.text import format_solve
    from melange_sky.core.config import parse_config
    from melange_sky.solver.result import solve

    data = {"workload_distribution": [[1.0]], "total_request_rate": 10, "slice_factor": 10, "spot": {"floor": 0.5},
            "gpu_info": {"A10G": {"cost": 1.0, "tputs": [[1]], "use_spot": False},
                         "A10G-spot": {"cost": 0.4, "tputs": [[1]], "use_spot": True}}}
    result = solve(parse_config(data, source="test.json"))
    assert result.markets is not None and result.markets.cut_short == ()
    assert "cut short" not in format_solve(result)  # 5 on demand + 5 spot = $7/h; all on demand $10, floor 0 $4
    cut = dataclasses.replace(
        result, markets=dataclasses.replace(result.markets, cut_short=("on_demand", "no_floor")),
        baselines=[dataclasses.replace(b, proven=False) for b in result.baselines])
    text = format_solve(cut)
    assert "All on-demand: at most $10.00/h; spot saves up to $3.00/h (cut short: not proven optimal; a " \
           "comparison gets at most 3 s)." in text
    assert "The floor costs at least $3.00/h (with floor 0: at most $4.00/h; cut short:" in text
    assert "A10G          10 x $1.00 = $10.00/h  <- cheapest  (cut short: not proven optimal; a comparison" in text
    assert cut.to_dict()["markets"]["cut_short"] == ["on_demand", "no_floor"]
    stopped = format_solve(dataclasses.replace(result, status="feasible", lower_bound=6.5))
    assert "between $6.50/h and $7.00/h. Raise --time-limit to keep searching, or use --formulation split" in stopped


@pytest.mark.parametrize("terminal", [True, False])
def test_solve_names_each_solve_on_a_terminals_stderr_and_erases_it_and_says_nothing_on_a_pipe(monkeypatch,
                                                                                                terminal):
    import io

    from melange_sky.cli import plan
    from melange_sky.core.config import parse_config
    from melange_sky.solver.result import solve

    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    stderr = Stderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    data = {"workload_distribution": [[1.0]], "total_request_rate": 10, "slice_factor": 10, "spot": {"floor": 0.5},
            "gpu_info": {"A10G": {"cost": 1.0, "tputs": [[1]], "use_spot": False},
                         "A10G-spot": {"cost": 0.4, "tputs": [[1]], "use_spot": True}}}
    with plan._status_line() as progress:
        solve(parse_config(data, source="test.json"), progress=progress)
    if not terminal:
        assert progress is None and stderr.getvalue() == ""
        return
    shown = stderr.getvalue().split("\r\033[K")
    assert shown[1].startswith("solving the fleet (slices)... (0 s so far)")
    assert any(line.startswith("the same fleet with floor 0...") for line in shown)
    assert shown[-1] == ""  # erased at the end


def test_the_default_formulation_is_slices_and_split_under_a_spot_block_and_an_explicit_one_is_kept(cli):
    """Markets double the types and `slices` there is often not proven in seconds; `split` is (solve_bench)."""
    spot = str(REPO / "docs" / "spot-config.json")
    chosen = {}
    for name, args in {"plain": [EXAMPLE_PATH], "spot": [spot, "--per-offer"],
                       "spot, slices asked": [spot, "--per-offer", "--formulation", "slices", "--time-limit", "5"]
                       }.items():
        result = cli("solve", *args, "--json", "-o", "/dev/null")
        assert result.exit_code == 0, result.stderr
        chosen[name] = json.loads(result.stdout)["formulation"]
    assert chosen == {"plain": "slices", "spot": "split", "spot, slices asked": "slices"}
