"""bench/data/published_vllm.json, the published vLLM measurements the engine model is compared with, is well formed.

This checks the data, not the accuracy (that is bench/estimate_accuracy.py's figure, never a test): every point names
a source with a URL, an engine version and its setup, runs on a GPU of the engine's hardware table and a bundled
model (or one whose config.json is under bench/data/models), says which endpoint an API-server client used, and sets
only engine flags the engine reads, so the bench can run every point as the source ran it.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from melange_sky.engine import BUNDLED_MODELS, ENGINE_SETTING_KEYS, GPU_NAMES, EngineSettings, load_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data" / "published_vllm.json"
SOURCE_FIELDS = ("url", "title", "date", "vllm_version", "setup")
MEASURES = ("output_tokens_per_s", "tpot_ms_mean", "ttft_ms_mean")


def _data() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def _points() -> list[dict[str, Any]]:
    return _data()["points"]


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def test_every_source_has_a_url_an_engine_version_and_its_setup() -> None:
    for key, source in _data()["sources"].items():
        for field in SOURCE_FIELDS:
            assert isinstance(source.get(field), str) and source[field].strip(), f"source {key}: no {field}"
        assert source["url"].startswith("https://"), f"source {key}: url {source['url']!r}"


def test_points_have_unique_ids_and_cite_a_listed_source() -> None:
    points = _points()
    ids = Counter(p["id"] for p in points)
    assert [i for i, n in ids.items() if n > 1] == []
    sources = _data()["sources"]
    for p in points:
        assert p["source"] in sources, f"{p['id']}: unknown source {p['source']!r}"
        assert isinstance(p.get("quote"), str) and p["quote"].strip(), f"{p['id']}: no quote from the source"


@pytest.mark.parametrize("point", _points(), ids=lambda p: p["id"])
def test_point_runs_on_a_known_gpu_and_a_bundled_or_bench_model(point: dict[str, Any]) -> None:
    assert point["gpu"] in GPU_NAMES
    model = point["model"]
    if model not in BUNDLED_MODELS:  # a model only the bench needs: its config.json under bench/data/models
        assert model.startswith("bench/data/models/") and (ROOT / model / "config.json").is_file(), model
        load_model(str(ROOT / model))
    assert point["dtype"] in ("bf16", "fp16", "fp8")
    assert _positive_int(point["tp"])


@pytest.mark.parametrize("point", _points(), ids=lambda p: p["id"])
def test_point_setup_is_complete_client_lengths_and_loop(point: dict[str, Any]) -> None:
    assert _positive_int(point["input_tokens"]) and _positive_int(point["output_tokens"])
    assert point["lengths"] in ("fixed", "distribution", "mean")
    # a variable-length dataset's point names the table of per-request lengths it is run on
    assert ("workload" in point) == (point["lengths"] == "distribution")
    if "workload" in point:
        assert point["workload"] in _data()["workloads"], point["workload"]
    assert point["client"] in ("api-server", "offline")
    # the API server's per-request cost differs by endpoint: an API-server point says which one its client used
    if point["client"] == "offline":
        assert "endpoint" not in point
    else:
        assert point["endpoint"] in ("chat", "completions")
    closed, rate = point.get("concurrency"), point.get("rate")
    assert (closed is None) != (rate is None), "exactly one of concurrency and rate"
    assert _positive_int(point["requests"])
    if closed is not None:
        assert _positive_int(closed) and closed <= point["requests"]
    else:
        assert _positive_number(rate)


@pytest.mark.parametrize("point", _points(), ids=lambda p: p["id"])
def test_point_sets_only_engine_flags_the_engine_accepts(point: dict[str, Any]) -> None:
    deployment = point["deployment"]
    assert set(deployment) <= set(ENGINE_SETTING_KEYS)
    EngineSettings.from_deployment(deployment, source=point["id"])  # raises ConfigError on a bad value


@pytest.mark.parametrize("point", _points(), ids=lambda p: p["id"])
def test_point_measures_throughput_or_tpot(point: dict[str, Any]) -> None:
    measured = point["measured"]
    assert set(measured) <= set(MEASURES) and measured
    assert "output_tokens_per_s" in measured or "tpot_ms_mean" in measured
    assert all(_positive_number(v) for v in measured.values())


def test_every_workload_table_cites_its_source_and_its_lengths_pass_its_filter() -> None:
    for name, table in _data()["workloads"].items():
        assert table["about"].strip() and table["source"]["url"].startswith("https://"), name
        limits, pairs = table["filter"], table["pairs"]
        assert len(pairs) >= 100, f"{name}: too few requests to carry a shape"
        for prompt, output in pairs:
            assert _positive_int(prompt) and _positive_int(output)
            assert limits["min_prompt"] <= prompt <= limits["max_prompt"] and output >= limits["min_output"]
            assert prompt + output <= limits["max_total"]


def test_a_workload_table_is_the_population_of_its_1000_request_runs_not_a_stand_in() -> None:
    # the bench scales a table to each run's published means; for the table to carry the run's shape (its short
    # outputs and long tail), its own means must already be the run's, up to the noise of a 1000-request draw
    points = [p for p in _points() if p.get("workload") and p["requests"] >= 1000]
    assert points
    for point in points:
        pairs = _data()["workloads"][point["workload"]]["pairs"]
        prompt = sum(p for p, _ in pairs) / len(pairs)
        output = sum(o for _, o in pairs) / len(pairs)
        assert abs(prompt / point["input_tokens"] - 1) < 0.06 and abs(output / point["output_tokens"] - 1) < 0.06, (
            point["id"], prompt, output)


def test_the_table_covers_fifteen_points_over_five_gpu_types() -> None:
    points = _points()
    assert len(points) >= 15
    assert len({p["gpu"] for p in points}) >= 5
