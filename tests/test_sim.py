"""The simulator (melange_sky/sim): hand-checked timing on one replica, serve's own routing policy, seeded arrivals,
runs of pure-decode steps equal to stepping, a fleet's stored plan, the headroom search and the CLI."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from melange_sky.core.config import load_config
from melange_sky.core.slo import Slos
from melange_sky.deploy.plan import make_plan
from melange_sky.engine import CLIENT_ENDPOINT, Engine, load_model
from melange_sky.fleet.ledger import Ledger, ReplicaState
from melange_sky.fleet.reconcile import new_replica
from melange_sky.serve.policy import SizeAwarePolicy
from melange_sky.sim import (Arrivals, ArrivalsError, find_headroom, parse_burst, plan_from_config,
                             plan_from_fleet, poisson_arrivals, simulate, trace_arrivals)
from melange_sky.solver.result import solve

MODEL = "llama-2-7b"
#: One A100-80GB is enough for 1 req/s: a one-replica plan.
ONE = {"name": "one", "workload_distribution": [[1.0]], "input_buckets": [1, 1024], "output_buckets": [1, 256],
       "total_request_rate": 1, "gpu_info": {"A100-80GB": {"cost": 3.67, "tputs": [[16]]}},
       "deployment": {"model": MODEL}}
#: Two types and two buckets; `split` divides buckets between the types in proportions the solve chooses.
MIX = {"name": "mix", "workload_distribution": [[0.6, 0.4]], "input_buckets": [1, 512],
       "output_buckets": [1, 64, 256], "total_request_rate": 12,
       "gpu_info": {"A10G": {"cost": 1.0, "tputs": [[4, 1.5]]}, "A100-80GB": {"cost": 3.6, "tputs": [[16, 6]]}},
       "deployment": {"model": MODEL}}


def arrivals(*requests: tuple[float, int, int], duration: float | None = None) -> Arrivals:
    times, prompts, outputs = (list(x) for x in zip(*requests))
    return Arrivals(times, prompts, outputs, duration or max(times) or 1.0, "test arrivals")


@pytest.fixture
def one_plan(write_config):
    return plan_from_config(load_config(write_config(ONE)))


@pytest.fixture
def mix_config(write_config):
    return load_config(write_config(MIX, "mix.json"))


# ---- timing: one replica, by hand --------------------------------------------------------------------------------
def test_one_replica_ttft_and_tpot_are_the_engines_step_times(one_plan):
    """Request A (100 prompt, 5 output) at 0; B (200, 3) arrives in the middle of A's first decode step and joins
    at the next step boundary. Expected times come from stepping a reference engine in that order."""
    ref = Engine(load_model(MODEL), "A100-80GB")
    now, first, done = 0.0, {}, {}

    def step() -> float:
        nonlocal now
        s = ref.step()
        now += s.duration_s
        first.update((r, now) for r in s.first_token)
        done.update((r, now) for r in s.finished)
        return s.duration_s

    ref.add("A", 100, 5, endpoint=CLIENT_ENDPOINT)  # simulate charges what replay's completions cost the API server
    step()  # A's prefill: its first token at its end
    b_at = now + step() / 2  # B arrives in the middle of the next (decode) step ...
    # ... and joins the step after it (through the API server, from when it came)
    ref.add("B", 200, 3, at=b_at, endpoint=CLIENT_ENDPOINT)
    while ref.has_work:
        step()
    result = simulate(one_plan, arrivals((0.0, 100, 5), (b_at, 200, 3)), Slos(tpot_ms=None))
    a, b = result.records
    assert a.ttft_s == pytest.approx(first["A"], rel=1e-9)
    assert a.latency_s == pytest.approx(done["A"], rel=1e-9)
    assert a.tpot_s == pytest.approx((done["A"] - first["A"]) / 4, rel=1e-9)
    assert b.ttft_s == pytest.approx(first["B"] - b_at, rel=1e-9)
    assert b.latency_s == pytest.approx(done["B"] - b_at, rel=1e-9)
    assert b.ttft_s > first["A"] / 2  # B waited for the step boundary, then its own prefill
    assert (a.replica, b.replica) == ("a100-80gb-0", "a100-80gb-0")
    replica = result.replicas[0]
    assert replica.requests == 2 and replica.steps == result.steps
    assert result.end_s == pytest.approx(done["B"])  # the run ends with the last token
    assert replica.busy_share == pytest.approx(1.0)  # it never sat idle: a request in it from 0 to the end
    assert 1 <= replica.mean_batch <= 2 and 0 < replica.kv_cache_mean <= replica.kv_cache_peak < 0.01


def test_runs_of_decode_steps_give_the_same_answer_as_stepping(write_config):
    """A busy mix whose KV caches run out (the deployment's num_gpu_blocks_override: 300 blocks), so requests are
    preempted and recomputed: skipping pure-decode runs changes nothing."""
    busy = {**MIX, "total_request_rate": 30, "deployment": {"model": MODEL, "num_gpu_blocks_override": 300}}
    plan = plan_from_config(load_config(write_config(busy, "busy.json")))
    assert all("300 KV blocks" in m.description for m in plan.engines.values())  # the config's engine settings
    offered = poisson_arrivals(30, 60, [[0.6, 0.4]], [1, 512], [1, 64, 256], seed=3)
    fast = simulate(plan, offered, Slos())
    slow = simulate(plan, offered, Slos(), skip=False)
    assert fast.steps == slow.steps
    assert sum(r.preemptions for r in slow.replicas) > 0  # the case that matters: KV exhaustion
    for x, y in zip(fast.records, slow.records):
        assert (x.replica, x.ok) == (y.replica, y.ok)
        assert x.ttft_s == pytest.approx(y.ttft_s, rel=1e-9, abs=1e-9)
        assert x.latency_s == pytest.approx(y.latency_s, rel=1e-9, abs=1e-9)


# ---- routing: serve's policy, not a copy -----------------------------------------------------------------------------
def test_each_buckets_split_follows_the_plans_routing_table(mix_config):
    from melange_sky.deploy.plan import PlanSettings

    plan = plan_from_config(mix_config, PlanSettings(formulation="split", compare=False))
    shares = plan.routes.shares
    assert any(len(s) == 2 for s in shares.values()), "the split plan divides a bucket between the two types"
    result = simulate(plan, poisson_arrivals(12, 120, [[0.6, 0.4]], [1, 512], [1, 64, 256], seed=1), Slos())
    for bucket, planned in shares.items():
        served = Counter(r.gpu for r in result.records if r.bucket == bucket)
        total = sum(served.values())
        for gpu, share in planned.items():
            assert abs(served[gpu] - share * total) <= 1.0  # smooth weighted round-robin: within one request
    overall = result.share_per_gpu
    for gpu, share in result.planned_share_per_gpu.items():
        assert overall[gpu] == pytest.approx(share, abs=len(shares) / len(result.records))


def test_the_simulation_runs_serves_policy_class(one_plan, mix_config, monkeypatch):
    plan = plan_from_config(mix_config)
    offered = poisson_arrivals(12, 60, [[0.6, 0.4]], [1, 512], [1, 64, 256], seed=2)
    before = {r.name: r.requests for r in simulate(plan, offered, Slos()).replicas}
    assert sum(1 for n in before.values() if n) > 2  # least-in-flight spreads requests over a type's replicas
    # serve's policy now always picks a type's last replica: a simulator with its own copy would not notice
    original = SizeAwarePolicy.choose

    def last_replica(self, target, exclude=()):
        choice = original(self, target, exclude)
        return choice._replace(replica=self.by_gpu[choice.replica.gpu][-1])

    monkeypatch.setattr(SizeAwarePolicy, "choose", last_replica)
    after = {r.name: r.requests for r in simulate(plan, offered, Slos()).replicas}
    last = {gpu: names[-1] for gpu, names in _names_by_gpu(plan).items()}
    assert {n for n, k in after.items() if k} == set(last.values())


def _names_by_gpu(plan) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for r in plan.replicas:
        names.setdefault(r.gpu, []).append(r.name)
    return names


# ---- arrivals --------------------------------------------------------------------------------------------------------
def test_poisson_arrivals_are_seeded_and_sized_inside_their_buckets():
    dist, ins, outs = [[0.7, 0.0], [0.0, 0.3]], [1, 100, 1000], [1, 50, 500]
    a = poisson_arrivals(20, 300, dist, ins, outs, seed=7)
    assert a.times == poisson_arrivals(20, 300, dist, ins, outs, seed=7).times
    assert a.prompts == poisson_arrivals(20, 300, dist, ins, outs, seed=7).prompts
    assert a.times != poisson_arrivals(20, 300, dist, ins, outs, seed=8).times
    assert abs(len(a) - 6000) < 4 * math.sqrt(6000)
    small = sum(1 for p, o in zip(a.prompts, a.outputs) if p < 100 and o < 50)
    large = sum(1 for p, o in zip(a.prompts, a.outputs) if 100 <= p <= 1000 and 50 <= o <= 500)
    assert small + large == len(a)  # only the two buckets with weight, lengths inside their edges
    assert small / len(a) == pytest.approx(0.7, abs=0.03)
    assert a.times == sorted(a.times) and a.times[-1] < 300


def test_bursts_keep_the_mean_and_concentrate_arrivals():
    burst = parse_burst("3,60,300")
    assert burst.low_factor == pytest.approx(0.5)
    a = poisson_arrivals(10, 3000, [[1.0]], [1, 10], [1, 10], seed=0, burst=burst)
    assert len(a) / 3000 == pytest.approx(10, rel=0.05)
    on = sum(1 for t in a.times if t % 300 < 60)
    assert on / 600 == pytest.approx(30, rel=0.08) and (len(a) - on) / 2400 == pytest.approx(5, rel=0.08)
    for bad in ("x", "0.5", "2,400,300", "6,60,300"):
        with pytest.raises(ArrivalsError):
            parse_burst(bad)


def test_trace_arrivals_use_timestamps_relative_to_the_first(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1_700_000_010.5, "input_len": 50, "output_len": 20},
            {"timestamp": 1_700_000_000.0, "input_len": 30, "output_len": 10},
            {"timestamp": 1_700_000_100.0, "input_len": 70, "output_len": 0}]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = trace_arrivals(str(trace))
    assert a.times == [0.0, 10.5, 100.0] and a.prompts == [30, 50, 70] and a.outputs == [10, 20, 1]
    assert any("0 prompt or output" in w for w in a.warnings)
    cut = trace_arrivals(str(trace), duration_s=50)
    assert cut.times == [0.0, 10.5] and cut.duration_s == 50
    csv = tmp_path / "t.csv"
    csv.write_text("t,p,g\n0,5,6\n2000,7,8\n")
    from melange_sky.inputs.trace_formats import ColumnChoice, TimeUnit

    b = trace_arrivals(str(csv), columns=ColumnChoice("p", "g", "t", TimeUnit("ms")))
    assert b.times == [0.0, 2.0] and b.prompts == [5, 7]


def test_a_trace_without_timestamps_needs_a_rate(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"input_len": 5, "output_len": 6}\n' * 50)
    with pytest.raises(ArrivalsError, match="--rate"):
        trace_arrivals(str(trace))
    a = trace_arrivals(str(trace), rate=5.0, seed=1)
    assert len(a) == 50 and a.times == sorted(a.times) and a.times[0] == 0.0


# ---- a running fleet's plan ---------------------------------------------------------------------------------------
def test_a_fleets_stored_plan_and_up_replicas_are_simulated(tmp_path, mix_config):
    ledger = Ledger(tmp_path / "home")
    stored = make_plan(mix_config, solve(mix_config, "slices", compare=False))
    ledger.save_fleet("mix", "digest", stored.to_dict())
    for replica in stored.replicas:
        ledger.add_replica("mix", new_replica(replica, 0))
    planned = Counter(r.gpu for r in stored.replicas)
    plan = plan_from_fleet("mix", ledger)
    assert plan.counts == dict(planned) and any("no replica" in n for n in plan.notes)
    up = stored.replicas[0]
    ledger.transition(up.cluster, ReplicaState.LAUNCHING)
    ledger.transition(up.cluster, ReplicaState.UP, endpoint="10.0.0.1:8000")
    plan = plan_from_fleet("mix", ledger)
    assert plan.counts == {up.gpu: 1}  # only what runs
    assert plan.routes.shares == plan_from_config(mix_config).routes.shares
    result = simulate(plan, poisson_arrivals(2, 30, [[0.6, 0.4]], [1, 512], [1, 64, 256]), Slos())
    assert {r.gpu for r in result.records if r.ok} == {up.gpu}


# ---- headroom --------------------------------------------------------------------------------------------------------
def test_find_headroom_pads_a_plan_whose_tputs_are_optimistic(write_config):
    """tputs that claim 70 req/s per A100-80GB for short chats: at 120 req/s the unpadded plan (2 replicas) queues;
    the search finds the least padding whose plan meets 99%."""
    config = load_config(write_config({
        "name": "tight", "workload_distribution": [[1.0]], "input_buckets": [1, 256], "output_buckets": [1, 128],
        "total_request_rate": 120, "gpu_info": {"A100-80GB": {"cost": 3.67, "tputs": [[70]]}},
        "deployment": {"model": MODEL}}))
    offered = poisson_arrivals(120, 40, [[1.0]], [1, 256], [1, 128], seed=0)
    advice = find_headroom(config, offered, Slos(tpot_ms=60, ttft_ms=1000), target=0.99)
    assert not advice.unpadded.meets and advice.unpadded.plan.counts == {"A100-80GB": 2}
    assert advice.chosen is not None and advice.chosen.meets
    assert advice.chosen.headroom < 1 and advice.chosen.plan.counts["A100-80GB"] > 2
    assert advice.extra_cost == pytest.approx(3.67 * (advice.chosen.plan.counts["A100-80GB"] - 2))
    looser = [t for t in advice.trials if t.headroom > advice.chosen.headroom]
    assert all(not t.meets for t in looser)


# ---- the command -----------------------------------------------------------------------------------------------------
def test_simulate_json_has_the_shared_keys(cli, write_config):
    path = write_config(MIX, "mix.json")
    result = cli("simulate", path, "--rate", "6", "--duration", "60", "--ttft-slo-ms", "2000", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    for key in ("attainment", "requests", "ttft_ms", "tpot_ms", "latency_ms", "per_gpu", "per_bucket", "per_minute",
                "per_replica", "verdict", "plan"):
        assert key in doc, key
    assert set(doc["latency_ms"]) == {"p50", "p90", "p99"}
    assert doc["slos"]["ttft_ms"] == 2000 and doc["slos"]["tpot_ms"] is None
    assert doc["requests"] == sum(g["requests"] for g in doc["per_bucket"].values())


def test_simulate_report_and_its_errors(cli, write_config, monkeypatch, tmp_path):
    path = write_config(ONE, "one.json")
    result = cli("simulate", path, "--rate", "1", "--duration", "30")
    assert result.exit_code == 0, result.stderr
    for text in ("Attainment:", "Per GPU type", "Per bucket", "Per minute", "Per replica", "Verdict: meets"):
        assert text in result.stdout
    assert cli("simulate", path).exit_code == 2  # neither --trace nor --rate
    assert cli("simulate", path, "--rate", "1", "--burst", "9,60,300").exit_code == 2
    monkeypatch.setenv("MELANGE_SKY_HOME", str(tmp_path / "empty-home"))
    missing = cli("simulate", "no-such-fleet", "--rate", "1")
    assert missing.exit_code == 2 and "no fleet named 'no-such-fleet'" in missing.stderr


def test_solve_points_at_simulate_when_the_plan_can_be_simulated(cli, write_config):
    routable = cli("solve", write_config(MIX, "mix.json"))
    assert routable.exit_code == 0, routable.stderr
    assert "melange-sky simulate " in routable.stderr and "mix.json --trace FILE" in routable.stderr
    no_edges = {**MIX, "input_buckets": None, "output_buckets": None}
    no_edges = {k: v for k, v in no_edges.items() if v is not None}
    plain = cli("solve", write_config(no_edges, "plain.json"))
    assert plain.exit_code == 0, plain.stderr
    assert "simulate" not in plain.stderr  # its routes need bucket edges: no pointer at a command that would fail


def test_simulate_a_trace_planned_for_its_busy_minutes_with_a_plot(cli, write_config, tmp_path):
    """A trace alternating 2 and 10 req/s by the minute: --rate-percentile 95 plans for the busy minutes (more
    replicas than the config's 6 req/s), and --plot draws the run."""
    import random

    rng = random.Random(5)
    rows, t = [], 0.0
    for minute in range(4):
        rate = 2 if minute % 2 == 0 else 10
        while True:
            t += rng.expovariate(rate)
            if t >= 60 * (minute + 1):
                t = 60.0 * (minute + 1)
                break
            rows.append(f"{t:.3f},{rng.randint(20, 400)},{rng.randint(10, 60)}")
    trace = tmp_path / "trace.csv"
    trace.write_text("timestamp,input_len,output_len\n" + "\n".join(rows) + "\n")
    path = write_config({**MIX, "total_request_rate": 6}, "mix.json")
    base = json.loads(cli("simulate", path, "--trace", str(trace), "--json").stdout)
    png = tmp_path / "run.png"
    peak = cli("simulate", path, "--trace", str(trace), "--rate-percentile", "95", "--json", "--plot", str(png))
    assert peak.exit_code == 0, peak.stderr
    doc = json.loads(peak.stdout)
    assert doc["requests"] == base["requests"] == len(rows)
    assert sum(doc["plan"]["counts"].values()) > sum(base["plan"]["counts"].values())
    assert [m["requests"] for m in doc["per_minute"]] == [m["requests"] for m in base["per_minute"]]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_a_fleet_by_name(cli, write_config, monkeypatch, tmp_path, mix_config):
    home = tmp_path / "home"
    monkeypatch.setenv("MELANGE_SKY_HOME", str(home))
    with Ledger(home) as ledger:
        stored = make_plan(mix_config, solve(mix_config, "slices", compare=False))
        ledger.save_fleet("mix", "digest", stored.to_dict())
    result = cli("simulate", "mix", "--rate", "4", "--duration", "30", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["plan"]["source"] == "fleet mix"
    assert doc["plan"]["counts"] == dict(Counter(r.gpu for r in stored.replicas))
    assert cli("simulate", "mix", "--rate", "4", "--find-headroom").exit_code == 2  # re-planning needs a CONFIG


def test_an_instance_of_two_gpus_is_two_data_parallel_replicas(write_config):
    """vllm.j2 serves gpus / TP data-parallel engines on one instance: the simulator runs one engine for each."""
    config = load_config(write_config({
        "name": "dp", "workload_distribution": [[1.0]], "input_buckets": [1, 256], "output_buckets": [1, 128],
        "total_request_rate": 10, "deployment": {"model": MODEL},
        "gpu_info": {"A100-80GB": {"cost": 7.35, "tputs": [[40]], "instance_type": "Standard_NC48ads_A100_v4"}}}))
    plan = plan_from_config(config)
    assert plan.counts == {"A100-80GB": 1}
    assert [r.name for r in plan.replicas] == ["a100-80gb-0", "a100-80gb-1"]
    result = simulate(plan, poisson_arrivals(10, 20, [[1.0]], [1, 256], [1, 128]), Slos())
    assert all(r.requests > 0 for r in result.replicas)


def test_speed_divides_every_time_as_emulate_speed_does(write_config):
    one = [(0.0, 100, 5), (0.01, 300, 8)]
    slow = simulate(plan_from_config(load_config(write_config(ONE))), arrivals(*one), Slos())
    fast = simulate(plan_from_config(load_config(write_config(ONE)), speed=4), arrivals(*[(t / 4, p, o)
                                                                                         for t, p, o in one]), Slos())
    for x, y in zip(slow.records, fast.records):
        assert y.ttft_s == pytest.approx(x.ttft_s / 4, rel=1e-9)
        assert y.latency_s == pytest.approx(x.latency_s / 4, rel=1e-9)


def test_sweep_shows_each_rates_simulated_attainment(cli, write_config):
    path = write_config(MIX, "mix.json")
    result = cli("sweep", path, "--rates", "3,6", "--simulate", "30", "--json")
    assert result.exit_code == 0, result.stderr
    points = json.loads(result.stdout)["points"]
    assert [p["rate"] for p in points] == [3, 6]
    assert all(0 < p["simulated_attainment"] <= 1 for p in points)
    table = cli("sweep", path, "--rates", "3", "--simulate", "30", "--ttft-slo-ms", "5000")
    assert table.exit_code == 0, table.stderr
    assert "attainment" in table.stdout.splitlines()[2]
