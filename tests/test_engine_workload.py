"""Point mode over per-request lengths (melange_sky.engine.workload_run): a dataset run is not its mean."""
from __future__ import annotations

import pytest

from melange_sky.engine import Coefficients, Engine, EngineError, load_model
from melange_sky.engine.estimate import run_point
from melange_sky.engine.workload_run import Request, run_requests, sample_requests

LLAMA = load_model("llama-3.1-8b")
NO_FRONTEND = Coefficients(frontend_request_ms=0, frontend_token_us=0)


def engine() -> Engine:
    return Engine(LLAMA, "A10G", coefficients=NO_FRONTEND)


def test_copies_of_one_request_measure_what_run_point_measures() -> None:
    same = run_requests(engine(), [Request(300, 40)] * 24, concurrency=8)
    point = run_point(engine(), input_tokens=300, output_tokens=40, concurrency=8, requests=24)
    assert same.output_tokens_per_s == pytest.approx(point.output_tokens_per_s)
    assert same.tpot_ms == point.tpot_ms and same.ttft_ms == point.ttft_ms and same.requests == 24


def test_a_run_lasts_as_long_as_its_longest_output_and_counts_every_requests_tokens() -> None:
    mixed = [Request(100, 5)] * 9 + [Request(100, 400)]  # mean output 44.5
    result = run_requests(engine(), mixed, concurrency=10)
    alone = run_requests(engine(), [Request(100, 400)], concurrency=1)
    assert result.duration_s >= alone.duration_s  # the long one decodes to the end, mostly alone
    assert result.output_tokens_per_s == pytest.approx((9 * 5 + 400) / result.duration_s)
    at_mean = run_point(engine(), input_tokens=100, output_tokens=44, concurrency=10, requests=10)
    assert result.output_tokens_per_s < 0.5 * at_mean.output_tokens_per_s  # copies of the mean are far faster


def test_a_poisson_run_is_reproducible_from_its_seed() -> None:
    requests = [Request(50 + 10 * i, 10 + i) for i in range(30)]
    one = run_requests(engine(), requests, rate=5.0, seed=3)
    assert one == run_requests(engine(), requests, rate=5.0, seed=3)
    assert one.requests == 30


def test_sampled_requests_keep_the_tables_shape_at_the_runs_means_within_the_filter() -> None:
    table = [(10, 10), (100, 50), (1000, 400)]
    requests = sample_requests(table, 3000, prompt_mean=150, output_mean=60, max_prompt=1024, max_total=2048,
                               min_tokens=4, seed=1)
    prompts, outputs = [r.prompt_tokens for r in requests], [r.output_tokens for r in requests]
    assert sum(prompts) / len(prompts) == pytest.approx(150, rel=0.01)
    assert sum(outputs) / len(outputs) == pytest.approx(60, rel=0.01)
    assert len(set(prompts)) == 3 and min(prompts) >= 4 and all(p + o <= 2048 for p, o in zip(prompts, outputs))
    assert requests == sample_requests(table, 3000, prompt_mean=150, output_mean=60, max_prompt=1024,
                                       max_total=2048, min_tokens=4, seed=1)
    capped = sample_requests([(900, 1500)], 2, max_prompt=512, max_total=1000)
    assert capped == [Request(512, 488)] * 2


def test_a_workload_needs_requests_and_one_kind_of_loop() -> None:
    with pytest.raises(EngineError, match="exactly one"):
        run_requests(engine(), [Request(10, 10)], concurrency=1, rate=1.0)
    with pytest.raises(EngineError, match="at least one request"):
        run_requests(engine(), [], concurrency=1)
    with pytest.raises(EngineError, match="at least 1"):
        run_requests(engine(), [Request(0, 10)], concurrency=1)
