"""Inputs the solver cannot count with (QA2 item 4): huge rates, tiny tputs, absurd costs are one-line errors
(exit 2) before any model is built, never HiGHS's or PuLP's crash; a solve with no solution blames no time limit
it did not reach."""
from __future__ import annotations

import pytest

from conftest import REPO
from melange_sky.core.config import parse_config
from melange_sky.errors import InfeasibleAllocation, SolverError
from melange_sky.solver.model import SolverOptions, _pulp, run_model
from melange_sky.solver.result import replica_lower_bound, solve_fleet

EXAMPLE_PATH = str(REPO / "examples" / "example.json")


def assert_one_error_line(result, *parts: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    for part in parts:
        assert part in result.stderr, result.stderr


def test_a_rate_no_fleet_under_max_replicas_can_serve_is_refused_before_solving(cli):
    result = cli("solve", EXAMPLE_PATH, "--rate", "1e16")
    assert_one_error_line(result, "at least 375,000,000,000,000 replicas", "above --max-replicas 500")


def test_the_replica_bound_is_the_fleet_all_on_the_fastest_gpu(example):
    config = parse_config({**example, "total_request_rate": 1e6})
    assert replica_lower_bound(config) == pytest.approx(37_500)  # the optimum there is 37,500 x A100-80GB
    with pytest.raises(InfeasibleAllocation, match="at least 37,500 replicas"):
        solve_fleet(config, "slices", max_replicas=37_499)
    assert solve_fleet(config, "slices", max_replicas=37_500).replicas == 37_500


def test_a_gpu_that_serves_next_to_nothing_is_refused_by_the_replica_bound(cli, write_config, example):
    example.update(workload_distribution=[[1.0]], input_buckets=[1, 100], output_buckets=[1, 100],
                   gpu_info={"A10G": {"cost": 1.01, "tputs": [[1e-300]]}})
    assert_one_error_line(cli("solve", write_config(example)), "at least 3e+301 replicas", "--max-replicas 500")


def test_a_tiny_tput_beside_a_fast_gpu_names_its_cell(cli, write_config, example):
    example["gpu_info"]["A10G"]["tputs"][0][0] = 1e-300
    assert_one_error_line(cli("solve", write_config(example)), "gpu_info.A10G.tputs[0][0] is 1e-300 req/s",
                          "set that tput to 0")


def test_without_max_replicas_a_huge_rate_is_a_solver_error_not_a_crash(example):
    config = parse_config({**example, "total_request_rate": 1e16})
    with pytest.raises(SolverError, match="more than the solver can count"):
        solve_fleet(config, "slices")


def test_a_cost_beyond_any_price_is_refused_in_validation(cli, write_config, example):
    example["gpu_info"]["A10G"]["cost"] = 1e300
    assert_one_error_line(cli("solve", write_config(example)), "gpu_info.A10G.cost",
                          "must be at most 1e+06 $/h per GPU, got 1e+300")


def test_a_sweep_to_an_absurd_rate_marks_it_infeasible_in_short_numbers(cli):
    result = cli("sweep", EXAMPLE_PATH, "--rates", "30,1e308")
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    row = next(line.split() for line in result.stdout.splitlines() if line.lstrip().startswith("1e+308"))
    assert row[1:5] == ["infeasible"] * 4
    assert "A10G alone: infeasible at 1 of 2 rate(s), first at 1e+308 req/s: needs 4e+307 replicas" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) < 300


def test_a_model_highs_refuses_is_a_solver_error():
    pulp = _pulp()
    model = pulp.LpProblem("refused", pulp.LpMinimize)
    count, used = model.add_variable("count", 0, None, pulp.LpInteger), model.add_variable("used", 0, 1)
    model += count
    model += count - 1e16 * used >= 0
    model += used >= 1
    with pytest.raises(SolverError, match="coefficient out of its range"):
        run_model(model, SolverOptions())


def test_no_solution_well_before_the_time_limit_does_not_blame_it():
    pulp = _pulp()
    model = pulp.LpProblem("infinite_cost", pulp.LpMinimize)
    count = model.add_variable("count", 0, None, pulp.LpInteger)
    model += 1e300 * count  # HiGHS reads a cost from 1e20 as infinite
    model += count >= 1
    with pytest.raises(SolverError, match="found no solution") as error:
        run_model(model, SolverOptions(time_limit=60))
    assert "time limit" not in str(error.value)
