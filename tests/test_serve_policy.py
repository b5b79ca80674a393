"""The router's pure parts, without a socket: routing table documents, request sizes, the size-aware policy
(shares by smooth weighted round-robin, spills, refusals), replica health and the observed workload."""
from __future__ import annotations

import copy
import json
import random
import sys
from collections import Counter

import pytest

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES
from melange_sky.core.config import load_config
from melange_sky.errors import ServeError
from melange_sky.serve.observed import ObservedWorkload
from melange_sky.serve.policy import NoReplica, Replica, SizeAwarePolicy
from melange_sky.serve.routes import (bucket_edges, name_replicas, normalise_url, parse_replica_arg, parse_routes,
                                      routes_from_plan, routes_from_solve)
from melange_sky.serve.tokens import Kind, Sizer, load_tokenizer, output_tokens
from melange_sky.solver.result import solve

#: 3 input x 2 output buckets, three GPU types with fractional shares. L4 cannot serve long outputs of long
#: prompts, A10G neither; only A100-80GB serves bucket (2, 1).
DOC = {
    "version": 1, "source": "test plan",
    "input_buckets": [1, 100, 1000, 4000], "output_buckets": [1, 50, 500],
    "workload_distribution": [[0.3, 0.1], [0.2, 0.2], [0.1, 0.1]],
    "total_request_rate": 10.0,
    "gpus": {
        "A10G": {"planned": 2, "tputs": [[4, 2], [3, 1], [1, 0]]},
        "L4": {"planned": 2, "tputs": [[4, 2], [3, 1], [1, 0]]},
        "A100-80GB": {"planned": 1, "tputs": [[20, 10], [15, 8], [8, 4]]},
    },
    "routing": [
        {"bucket": [0, 0], "shares": {"A10G": 0.5, "L4": 0.5}},
        {"bucket": [0, 1], "shares": {"A10G": 0.3, "A100-80GB": 0.7}},
        {"bucket": [1, 0], "shares": {"L4": 0.8, "A100-80GB": 0.2}},
        {"bucket": [1, 1], "shares": {"A100-80GB": 1.0}},
        {"bucket": [2, 0], "shares": {"A10G": 0.25, "L4": 0.25, "A100-80GB": 0.5}},
        {"bucket": [2, 1], "shares": {"A100-80GB": 1.0}},
    ],
    "replicas": [
        {"name": "a10g-0", "gpu": "A10G", "url": "http://127.0.0.1:1"},
        {"name": "a10g-1", "gpu": "A10G", "url": "http://127.0.0.1:2"},
        {"name": "l4-0", "gpu": "L4", "url": "http://127.0.0.1:3"},
        {"name": "l4-1", "gpu": "L4", "url": "http://127.0.0.1:4"},
        {"name": "a100-0", "gpu": "A100-80GB", "url": "http://127.0.0.1:5"},
    ],
}
#: A prompt length (characters) and max_tokens inside each bucket.
PROMPT_CHARS = {0: 4 * 50, 1: 4 * 500, 2: 4 * 2000}
MAX_TOKENS = {0: 20, 1: 200}


def make(doc=None, seed=0) -> SizeAwarePolicy:
    routes = parse_routes(copy.deepcopy(doc or DOC))
    replicas = [Replica(r.name, r.gpu, r.url) for r in routes.replicas]
    return SizeAwarePolicy(routes, replicas, Sizer(), random.Random(seed))


def body(kind: Kind, row: int, col: int | None, **extra) -> dict:
    text = "x" * PROMPT_CHARS[row]
    data = ({"prompt": text} if kind is Kind.COMPLETIONS
            else {"messages": [{"role": "user", "content": text}]})
    if col is not None:
        data["max_tokens"] = MAX_TOKENS[col]
    return {"model": "m", **data, **extra}


def replica(policy: SizeAwarePolicy, name: str) -> Replica:
    return next(r for r in policy.replicas if r.name == name)


# ---- shares ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(Kind))
def test_realised_shares_are_within_5_percent_of_the_plan_over_2000_requests(kind):
    policy = make()
    cells = [(i, j) for i in range(3) for j in range(2)]
    weights = [DOC["workload_distribution"][i][j] for i, j in cells]
    rng = random.Random(7)
    served: dict[tuple[int, int], Counter] = {cell: Counter() for cell in cells}
    for _ in range(2000):
        i, j = rng.choices(cells, weights)[0]
        target = policy.target(body(kind, i, j), kind)
        assert target.lane.label == f"{i}:{j}"
        choice = policy.choose(target)
        assert not choice.spilled
        served[(i, j)][choice.replica.gpu] += 1
    for route in DOC["routing"]:
        cell = tuple(route["bucket"])
        total = sum(served[cell].values())
        assert total > 100
        for gpu in DOC["gpus"]:
            assert abs(served[cell][gpu] / total - route["shares"].get(gpu, 0.0)) <= 0.05, (cell, served[cell])


def test_round_robin_is_smooth_and_deterministic_even_at_low_rates():
    picks = []
    policy = make()
    for _ in range(10):
        picks.append(policy.choose(policy.target(body(Kind.COMPLETIONS, 0, 1), Kind.COMPLETIONS)).replica.gpu)
    again = make(seed=99)  # a different tie-break seed changes replicas, never the GPU type sequence
    assert [again.choose(again.target(body(Kind.COMPLETIONS, 0, 1), Kind.COMPLETIONS)).replica.gpu
            for _ in range(10)] == picks
    assert Counter(picks) == {"A100-80GB": 7, "A10G": 3}
    for n in range(1, 11):  # every prefix is within one request of its planned split
        assert abs(picks[:n].count("A10G") - 0.3 * n) < 1


def test_replicas_of_a_type_share_its_load_by_least_in_flight_with_random_ties():
    policy = make()
    a0, a1 = replica(policy, "a10g-0"), replica(policy, "a10g-1")
    a0.in_flight = 3
    target = policy.target(body(Kind.COMPLETIONS, 0, 0), Kind.COMPLETIONS)
    chosen = [policy.choose(target).replica for _ in range(20)]
    assert a0 not in chosen  # the busier A10G is never chosen while the other is idle ...
    assert any(r is a1 for r in chosen)
    a0.in_flight = 0
    names = Counter(policy.choose(target).replica.name for _ in range(400))
    assert names["a10g-0"] > 50 and names["a10g-1"] > 50  # ... and ties go either way


def test_a_replica_already_tried_is_not_chosen_again_for_the_request():
    policy = make()
    target = policy.target(body(Kind.COMPLETIONS, 1, 1), Kind.COMPLETIONS)  # only A100-80GB is planned there
    first = policy.choose(target).replica
    assert first.gpu == "A100-80GB"
    second = policy.choose(target, exclude=[first])
    assert second.replica.gpu in ("A10G", "L4") and second.spilled


# ---- spills and refusals ---------------------------------------------------------------------------------------------
def test_a_type_without_healthy_replicas_spills_to_the_planned_others_in_proportion():
    policy = make()
    for name in ("l4-0", "l4-1"):
        replica(policy, name).ejected = True
    target = policy.target(body(Kind.COMPLETIONS, 2, 0), Kind.COMPLETIONS)  # A10G .25, L4 .25, A100 .5
    choices = [policy.choose(target) for _ in range(300)]
    assert all(c.spilled for c in choices)
    gpus = Counter(c.replica.gpu for c in choices)
    assert gpus == {"A10G": 100, "A100-80GB": 200}


def test_with_no_planned_type_left_types_that_can_serve_the_bucket_take_it():
    policy = make()
    replica(policy, "a100-0").ejected = True
    target = policy.target(body(Kind.CHAT, 1, 1), Kind.CHAT)  # planned: A100-80GB only
    choices = [policy.choose(target) for _ in range(100)]
    assert all(c.spilled for c in choices)
    # A10G and L4 both serve it (tputs 1 each, 2 planned each): half each
    assert Counter(c.replica.gpu for c in choices) == {"A10G": 50, "L4": 50}


def test_no_replica_that_can_serve_the_bucket_is_refused_with_the_reason():
    policy = make()
    a100 = replica(policy, "a100-0")
    a100.ejected = a100.down = True
    a100.last_error = "cannot connect: Connection refused"
    target = policy.target(body(Kind.COMPLETIONS, 2, 1), Kind.COMPLETIONS)
    with pytest.raises(NoReplica) as info:
        policy.choose(target)
    reason = info.value.reason
    assert "(bucket 2:1: input 1000-4000, output 50-500 tokens)" in reason
    assert "A100-80GB: 1 replica(s), 1 down (last error: cannot connect: Connection refused)" in reason
    assert "A10G cannot serve it (tputs 0)" in reason and "L4 cannot serve it (tputs 0)" in reason


def test_a_type_in_the_plan_without_replicas_is_skipped_and_named_when_nothing_is_left():
    doc = copy.deepcopy(DOC)
    doc["replicas"] = [r for r in doc["replicas"] if r["gpu"] != "A100-80GB"]
    policy = make(doc)
    target = policy.target(body(Kind.COMPLETIONS, 2, 1), Kind.COMPLETIONS)
    with pytest.raises(NoReplica, match="A100-80GB has no replica"):
        policy.choose(target)


# ---- request sizes ---------------------------------------------------------------------------------------------------
def test_lengths_past_the_edges_go_to_the_nearest_bucket():
    policy = make()
    huge = policy.target({"prompt": "x" * 400_000, "max_tokens": 100_000}, Kind.COMPLETIONS)
    assert huge.lane.label == "2:1"
    tiny = policy.target({"prompt": "", "max_tokens": 0}, Kind.COMPLETIONS)
    assert tiny.lane.label == "0:0"


def test_without_max_tokens_a_request_is_routed_by_its_input_row_weighted_by_the_output_distribution():
    policy = make()
    target = policy.target(body(Kind.COMPLETIONS, 0, None), Kind.COMPLETIONS)
    assert target.lane.label == "0:*" and target.output_tokens is None
    # row 0: outputs 0.3 / 0.1 -> A10G (.3 * .5 + .1 * .3) / .4, L4 .3 * .5 / .4, A100 .1 * .7 / .4
    assert target.lane.shares() == pytest.approx({"A10G": 0.45, "L4": 0.375, "A100-80GB": 0.175})
    gpus = Counter(policy.choose(target).replica.gpu for _ in range(400))
    assert gpus == {"A10G": 180, "L4": 150, "A100-80GB": 70}


def test_max_completion_tokens_wins_over_max_tokens():
    assert output_tokens({"max_tokens": 10, "max_completion_tokens": 300}) == 300
    assert output_tokens({"max_tokens": 10}) == 10
    assert output_tokens({"max_tokens": True}) is None and output_tokens({}) is None


def test_prompt_tokens_are_characters_over_four_with_chat_contents_joined_and_token_ids_exact():
    sizer = Sizer()
    assert sizer.prompt_tokens({"prompt": "x" * 400}, Kind.COMPLETIONS) == (100, 100.0)
    chat = {"messages": [{"role": "system", "content": "x" * 199},
                         {"role": "user", "content": [{"type": "text", "text": "y" * 200},
                                                      {"type": "image_url", "image_url": {"url": "u"}}]}]}
    assert sizer.prompt_tokens(chat, Kind.CHAT) == (100, 100.0)
    assert sizer.prompt_tokens({"prompt": [1, 2, 3]}, Kind.COMPLETIONS) == (3, 3.0)
    assert sizer.prompt_tokens({"prompt": [[1, 2], [1, 2, 3, 4]]}, Kind.COMPLETIONS) == (4, 4.0)
    assert sizer.prompt_tokens({"prompt": None}, Kind.COMPLETIONS) == (0, 0.0)


def test_the_estimate_is_corrected_by_reported_usage_within_bounds_per_endpoint():
    sizer = Sizer()
    for _ in range(200):  # CJK-like text: the server counts 2 tokens where chars/4 says 1
        sizer.observe(Kind.CHAT, 100.0, 200)
    assert sizer.corrections[Kind.CHAT] == pytest.approx(2.0, rel=0.01)
    assert sizer.corrections[Kind.COMPLETIONS] == 1.0
    assert sizer.prompt_tokens({"messages": [{"role": "user", "content": "x" * 400}]}, Kind.CHAT)[0] == 200
    for _ in range(500):  # absurd reports move it only to the bound
        sizer.observe(Kind.COMPLETIONS, 100.0, 100_000)
    assert sizer.corrections[Kind.COMPLETIONS] == pytest.approx(4.0)
    sizer.observe(Kind.COMPLETIONS, 2.0, 1)  # tiny prompts teach nothing
    assert sizer.corrections[Kind.COMPLETIONS] == pytest.approx(4.0)


def test_a_tokenizer_json_counts_prompts_exactly(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    sizer = Sizer(load_tokenizer(path))
    assert sizer.prompt_tokens({"prompt": "hello world " * 30}, Kind.COMPLETIONS)[0] == 60
    with pytest.raises(ServeError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ServeError, match="not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "bad.json")


def test_without_the_tokenizers_package_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ServeError, match=r"pip install 'melange-sky\[tokenizers\]'"):
        load_tokenizer(tmp_path / "tokenizer.json")


# ---- the routes document ---------------------------------------------------------------------------------------------
def test_a_routes_document_round_trips():
    routes = parse_routes(copy.deepcopy(DOC))
    assert parse_routes(json.loads(json.dumps(routes.to_dict()))) == routes
    assert routes.shares[(0, 1)] == {"A10G": 0.3, "A100-80GB": 0.7}


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["routing"][0]["shares"].update({"T4": 0.1}), r"routing\[0\].shares.T4: is not in gpus"),
    (lambda d: d["routing"][5]["shares"].update({"L4": 0.5}), "routes to a GPU type whose tputs for the bucket is 0"),
    (lambda d: d.update(input_buckets=[1, 100]), r"workload_distribution: must be a 1x2 matrix"),
    (lambda d: d.update(output_buckets=[50, 1]), "output_buckets: edges must increase"),
    (lambda d: d["replicas"].append(dict(d["replicas"][0])), r"replicas\[5\].name: 'a10g-0' is used twice"),
    (lambda d: d["replicas"][0].update(url="http://h:1/v1"), "give the server's base URL"),
    (lambda d: d["routing"].append({"bucket": [3, 0], "shares": {}}), "inside the 3x2 buckets"),
])
def test_a_bad_routes_document_is_refused_naming_the_field(change, message):
    doc = copy.deepcopy(DOC)
    change(doc)
    with pytest.raises(ServeError, match=message):
        parse_routes(doc, "pushed")


def test_a_config_without_edges_must_have_the_default_shape(write_config, example):
    with pytest.raises(ServeError, match="not Mélange's default 8x6: add input_buckets and output_buckets"):
        bucket_edges(load_config(write_config(example)))
    example["workload_distribution"] = [[1 / 48] * 6 for _ in range(8)]
    for gpu in example["gpu_info"].values():
        gpu["tputs"] = [[5] * 6 for _ in range(8)]
    assert bucket_edges(load_config(write_config(example))) == (DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES)


def test_routes_from_a_solve_carry_its_shares_counts_and_edges(write_config, example):
    example.update(input_buckets=[1, 100, 1000], output_buckets=[1, 50, 500])
    config = load_config(write_config(example))
    result = solve(config, "split", compare=False)
    routes = routes_from_solve(config, result, name_replicas([("A10G", "http://a:1"), ("A100-80GB", "http://b:1")]))
    assert {g.name: g.planned for g in routes.gpus} == {"A10G": 1, "A100-80GB": 1}
    assert routes.shares[(1, 0)] == pytest.approx({"A10G": 1 / 3, "A100-80GB": 2 / 3})
    assert [r.name for r in routes.replicas] == ["a10g-0", "a100-80gb-0"]


#: A stored plan solved per offer: two A10G columns (two regions) that route as one GPU type.
PER_OFFER_PLAN = {
    "solve": {"counts": {"A10G@aws:us-west-2": 1, "A10G@aws:us-east-1": 1, "A100-80GB": 1},
              "total_request_rate": 30,
              "routing": [{"bucket": [0, 0], "shares": {"A10G@aws:us-west-2": 0.25, "A10G@aws:us-east-1": 0.25,
                                                        "A100-80GB": 0.5}}]},
    "router": {"input_buckets": [1, 100], "output_buckets": [1, 50], "workload_distribution": [[1.0]],
               "tputs": {"A10G@aws:us-west-2": [[2]], "A10G@aws:us-east-1": [[2]], "A100-80GB": [[20]]},
               "entries": {"A10G@aws:us-west-2": "A10G", "A10G@aws:us-east-1": "A10G", "A100-80GB": "A100-80GB"}},
}


def test_a_per_offer_plan_is_routed_by_gpu_entry():
    plan = copy.deepcopy(PER_OFFER_PLAN)
    replicas = name_replicas([("A10G", "http://a:1"), ("T4", "http://t:1")])
    routes = routes_from_plan(plan, replicas, "fleet f")
    assert routes.shares[(0, 0)] == {"A10G": 0.5, "A100-80GB": 0.5}
    assert {g.name: g.planned for g in routes.gpus} == {"A10G": 2, "A100-80GB": 1}
    assert [r.name for r in routes.replicas] == ["a10g-0"]
    assert routes.warnings == ("t4-0 (T4) is not a GPU type of the plan: not routed to",)
    with pytest.raises(ServeError, match="re-run `melange-sky up CONFIG`"):
        routes_from_plan({"solve": plan["solve"]}, (), "fleet old")


def test_replica_arguments_and_urls():
    assert parse_replica_arg("a100_80gb=10.0.0.6:8000", ["A10G", "A100-80GB"]) == ("A100-80GB",
                                                                                  "http://10.0.0.6:8000")
    assert normalise_url("https://h.example:8443/") == "https://h.example:8443"
    with pytest.raises(ServeError, match="not a GPU type of the config"):
        parse_replica_arg("H100=http://h:1", ["A10G"])
    with pytest.raises(ServeError, match="expected GPU=URL"):
        parse_replica_arg("http://h:1", ["A10G"])
    with pytest.raises(ServeError, match="credentials in the URL"):
        normalise_url("http://user:pw@h:1")
    with pytest.raises(ServeError, match="is given twice"):
        name_replicas([("A10G", "http://h:1"), ("A10G", "http://h:1")])


# ---- the observed workload -------------------------------------------------------------------------------------------
def test_the_observed_workload_counts_reported_sizes_over_a_sliding_window():
    now = [0.0]
    observed = ObservedWorkload((1, 100, 1000), (1, 50, 500), window_s=60, clock=lambda: now[0])
    for _ in range(3):
        observed.arrival()
        observed.record(50, 10, reported=True)
    observed.arrival()
    observed.record(5000, 10_000, reported=False)  # past the edges: the nearest bucket
    now[0] = 30.0
    doc = observed.to_dict()
    assert doc["counts"] == [[3, 0], [0, 1]] and doc["requests"] == 4
    assert doc["workload_distribution"] == [[0.75, 0.0], [0.0, 0.25]]
    assert doc["total_request_rate"] == pytest.approx(4 / 30, rel=1e-5)
    assert doc["usage_source"] == {"reported": 3, "estimated": 1}
    assert (doc["input_overflow"], doc["output_overflow"], doc["input_underflow"]) == (1, 1, 0)
    assert (doc["input_buckets"], doc["output_buckets"], doc["window_s"]) == ([1, 100, 1000], [1, 50, 500], 60)
    now[0] = 100.0  # everything recorded at t=0 has left the 60 s window
    observed.arrival()
    observed.record(150, 100, reported=True)
    doc = observed.to_dict()
    assert doc["counts"] == [[0, 0], [0, 1]] and doc["arrivals"] == 1
    assert doc["span_s"] == pytest.approx(59.0)  # from the oldest live slot (1 s each) to now
