"""Plans whose solve columns are offers of a GPU entry (a `spot` block's "A10G:spot", `--per-offer`'s
"A100-80GB@azure:eastus") simulate and serve as `up` routes them, and simulate's and replay's headers say what ran:
the fleet header, an interrupted replay, a trace that runs out before --duration, --find-headroom with --headroom."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest

from conftest import REPO
from melange_sky.cli.replay import format_replay
from melange_sky.cli.simulate import format_headroom, format_simulation
from melange_sky.core.attainment import RequestRecord, summarise
from melange_sky.core.config import Market, load_config
from melange_sky.core.slo import Slos
from melange_sky.deploy.plan import PlanSettings, build_plan, solve_offers
from melange_sky.fleet.ledger import Ledger
from melange_sky.inputs.arrivals import trace_arrivals
from melange_sky.inputs.replay import ReplayResult
from melange_sky.serve.routes import routes_from_plan, routes_from_solve
from melange_sky.sim import HeadroomAdvice, HeadroomTrial, plan_from_config, poisson_arrivals, simulate

MULTICLOUD = str(REPO / "examples" / "multicloud.json")
#: The original example under a `spot` block (as the QA report's myspot.json): A10G on-demand and A10G:spot columns.
SPOT = {"name": "myspot", "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2]]},
                                       "A100-80GB": {"cost": 3.67, "tputs": [[20, 20], [40, 20]]}},
        "workload_distribution": [[0.2, 0.1], [0.5, 0.2]], "total_request_rate": 8, "slice_factor": 1,
        "input_buckets": [1, 256, 2048], "output_buckets": [1, 128, 1024],
        "spot": {"floor": 0.3, "max_region_share": 1}, "deployment": {"model": "llama-2-7b"}}
FAST = PlanSettings(formulation="split", compare=False)


@pytest.fixture
def spot_config(write_config):
    return load_config(write_config(SPOT, "myspot.json"))


def _by_entry(result, value) -> dict[str, float]:
    """`value(column)` summed per GPU entry over the solve's columns that have replicas."""
    total: dict[str, float] = {}
    for g in result.gpus:
        if g.count:
            total[g.entry or g.name] = total.get(g.entry or g.name, 0) + value(g)
    return total


# ---- markets and offers: routes and plans per GPU entry ------------------------------------------------------------
def test_a_spot_plan_is_simulated_per_gpu_entry_with_its_spot_replicas_counted(spot_config):
    plan = plan_from_config(spot_config, FAST)
    result = plan.result
    assert result is not None and any(g.market == Market.SPOT and g.count for g in result.gpus)  # a real spot plan
    assert plan.counts == _by_entry(result, lambda g: g.count)
    spot = _by_entry(result, lambda g: g.count if g.market == Market.SPOT else 0)
    assert plan.spot_counts == {entry: n for entry, n in spot.items() if n}
    assert sum(plan.spot_counts.values()) == result.market_count(Market.SPOT)
    assert Counter(r.gpu for r in plan.replicas) == Counter(plan.counts)  # replicas named by entry, one per GPU
    assert set(plan.engines) == set(plan.counts) <= {"A10G", "A100-80GB"}
    assert plan.cost_per_hour == pytest.approx(result.cost)
    # each bucket's shares are the columns' summed into their entry
    for route in result.routing:
        merged: dict[str, float] = {}
        for column, share in route.shares.items():
            entry = next(g.entry or g.name for g in result.gpus if g.name == column)
            merged[entry] = merged.get(entry, 0.0) + share
        assert plan.routes.shares[route.bucket] == pytest.approx({e: s for e, s in merged.items() if s > 0})
    assert any("never preempted" in note for note in plan.notes)
    fleet = " + ".join(f"{n}x {gpu}" + (f" ({plan.spot_counts[gpu]} spot)" if plan.spot_counts.get(gpu) else "")
                       for gpu, n in plan.counts.items())
    assert plan.describe() == f"{fleet}, ${result.cost:.2f}/h"


def test_routes_from_a_solve_are_the_routes_up_stores_for_the_same_plan(spot_config):
    """`serve --config` and `simulate CONFIG` route as the fleet's router does: the same table as the stored plan."""
    solved = routes_from_solve(spot_config, solve_offers(spot_config, FAST))
    stored = routes_from_plan(build_plan(spot_config, FAST).to_dict(), source=spot_config.source)
    assert solved.shares == stored.shares and solved.gpus == stored.gpus
    assert (solved.input_edges, solved.output_edges, solved.distribution) == (
        stored.input_edges, stored.output_edges, stored.distribution)


def test_simulate_cli_runs_a_spot_config(cli, write_config):
    result = cli("simulate", write_config(SPOT, "myspot.json"), "--rate", "8", "--duration", "5", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["plan"]["spot_counts"] and set(doc["plan"]["counts"]) <= {"A10G", "A100-80GB"}
    assert "never preempted" in result.stderr


def test_simulate_per_offer_runs_the_multicloud_example_as_solve_per_offer_plans_it(cli):
    assert "--per-offer" in cli("simulate", MULTICLOUD, "--rate", "60", "--duration", "2").stderr  # the hint
    solved = json.loads(cli("solve", MULTICLOUD, "--per-offer", "--json").stdout)
    result = cli("simulate", MULTICLOUD, "--per-offer", "--rate", "60", "--duration", "2", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert plan["cost_per_hour"] == pytest.approx(solved["cost"])
    entries = Counter()
    for g in solved["gpus"]:
        entries[g["entry"] or g["name"]] += g["count"]
    assert plan["counts"] == {e: n for e, n in entries.items() if n}
    assert "@" not in "".join(r["gpu"] for r in plan["replicas"])


def test_sweep_simulates_per_offer_plans(cli):
    result = cli("sweep", MULTICLOUD, "--per-offer", "--rates", "30", "--simulate", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["points"][0]["simulated_attainment"] is not None


def test_serve_config_routes_the_plan_solve_makes_with_its_spot_columns(cli, write_config, monkeypatch):
    from melange_sky.serve import server  # noqa: PLC0415

    monkeypatch.setattr(server, "run", lambda router, **_: 0)  # the table is printed before listening
    path = write_config(SPOT, "myspot.json")
    solved = json.loads(cli("solve", path, "--json").stdout)
    planned = Counter()
    for g in solved["gpus"]:
        planned[g["entry"] or g["name"]] += g["count"]
    result = cli("serve", "--config", path, "--replica", "A10G=http://127.0.0.1:1")
    assert result.exit_code == 0, result.stderr
    row = next(line.split() for line in result.stdout.splitlines() if line.strip().startswith("A10G "))
    assert row[:3] == ["A10G", str(planned["A10G"]), "1"]


# ---- headers ---------------------------------------------------------------------------------------------------------
def test_a_fleets_simulation_header_has_no_empty_parenthesis(cli, tmp_path, monkeypatch, spot_config):
    home = tmp_path / "home"
    monkeypatch.setenv("MELANGE_SKY_HOME", str(home))
    with Ledger(home) as ledger:  # what `up` stores: spot columns, replicas named by entry
        ledger.save_fleet("myspot", "digest", build_plan(spot_config, FAST).to_dict())
    result = cli("simulate", "myspot", "--rate", "4", "--duration", "5")
    assert result.exit_code == 0, result.stderr
    head = result.stdout.splitlines()[0]
    assert head.endswith("/h (headroom 100%)") and "(," not in head and "spot)" in head


def test_the_simulation_header_names_only_what_is_known(spot_config):
    plan = plan_from_config(spot_config, FAST)
    run = simulate(plan, poisson_arrivals(2, 3, plan.routes.distribution, plan.routes.input_edges,
                                          plan.routes.output_edges), Slos())
    first = format_simulation(run).splitlines()[0]
    assert first.endswith("(planned for 8 req/s, headroom 100%)")
    no_solve = dataclasses.replace(run, plan=dataclasses.replace(plan, result=None, headroom=None))
    assert format_simulation(no_solve).splitlines()[0] == f"Simulated {plan.describe()}"


def test_the_headroom_advice_names_the_solve_that_plans_it_per_offer_when_searched_so(spot_config):
    plan = plan_from_config(spot_config, FAST)
    run = simulate(plan, poisson_arrivals(2, 3, plan.routes.distribution, plan.routes.input_edges,
                                          plan.routes.output_edges), Slos())
    advice = HeadroomAdvice(0.99, HeadroomTrial(1.0, plan, run), HeadroomTrial(0.8, plan, run), [], 0.5)
    assert "Plan with it: melange-sky solve s.json --per-offer --headroom 0.8 " in format_headroom(advice, "s.json",
                                                                                                   True)
    assert "Plan with it: melange-sky solve s.json --headroom 0.8 " in format_headroom(advice, "s.json")


def _replay_result(trace: str, *, offered: int, sent: int, interrupted: bool) -> ReplayResult:
    arrivals = trace_arrivals(trace)
    done = [RequestRecord.answered(arrivals.times[k], "A10G", None, (0, 0), 10, 3, 0.01, 0.05) for k in range(2)]
    return ReplayResult(report=summarise(done, Slos()), endpoint="http://127.0.0.1:1", model="m", arrivals=arrivals,
                        offered=offered, sent=sent, cancelled=sent - len(done), interrupted=interrupted, wall_s=5.0,
                        send_lag_ms={"p50": 0.0, "p99": 0.0, "max": 0.0})


def _trace(tmp_path, n: int, gap_s: float) -> str:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"timestamp": k * gap_s, "input_len": 10, "output_len": 5}) + "\n"
                            for k in range(n)))
    return str(path)


def test_an_interrupted_replay_says_how_many_it_sent_of_those_due(tmp_path):
    trace = _trace(tmp_path, 600, 0.2)
    head = format_replay(_replay_result(trace, offered=600, sent=20, interrupted=True)).splitlines()[0]
    assert head == "Replayed 20 requests against http://127.0.0.1:1 (model m): interrupted after 20 of 600"
    head = format_replay(_replay_result(trace, offered=100, sent=20, interrupted=True)).splitlines()[0]
    assert head.endswith(": interrupted after 20 of 100, the first 100 of the trace's 600")
    head = format_replay(_replay_result(trace, offered=600, sent=600, interrupted=False)).splitlines()[0]
    assert head == "Replayed 600 requests against http://127.0.0.1:1 (model m)"


# ---- arrivals --------------------------------------------------------------------------------------------------------
def test_a_trace_at_a_rate_that_runs_out_before_duration_averages_over_its_own_span(tmp_path):
    trace = _trace(tmp_path, 600, 0.2)
    arrivals = trace_arrivals(trace, rate=12, duration_s=75)
    assert len(arrivals) == 600 and arrivals.duration_s == arrivals.times[-1] < 75
    assert arrivals.mean_rate == pytest.approx(12, rel=0.1)  # not 600 / 75 = 8
    assert "the first 75 s" not in arrivals.description
    assert f"the last arrives at {arrivals.times[-1]:.3g} s, before --duration 75" in arrivals.description
    timed = trace_arrivals(trace, duration_s=200)  # at its timestamps: 5 req/s for 119.8 s
    assert timed.duration_s == pytest.approx(119.8) and timed.mean_rate == pytest.approx(600 / 119.8)
    cut = trace_arrivals(trace, duration_s=60)  # a real cut keeps --duration as the span
    assert (len(cut), cut.duration_s, cut.mean_rate) == (300, 60, 5) and "the first 60 s" in cut.description


# ---- flags -----------------------------------------------------------------------------------------------------------
def test_find_headroom_with_headroom_is_a_one_line_error(cli, write_config):
    result = cli("simulate", write_config(SPOT, "myspot.json"), "--rate", "8", "--find-headroom", "--headroom",
                 "0.5")
    assert result.exit_code == 2 and "--find-headroom" in result.stderr and "drop --headroom" in result.stderr
