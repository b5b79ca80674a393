"""`melange-sky workload --from URL`: what a running router observed, turned into config keys like a trace is."""
from __future__ import annotations

import json

import aiohttp
import pytest
from fake_openai_upstream import Fleet, free_port_holder
from test_serve_cli import MIX, LoopThread
from test_serve_policy import DOC, body

from melange_sky.serve.tokens import Kind


@pytest.fixture
def router():
    """A router (key "rk") in front of fake replicas, in a background event loop, with 10 requests answered:
    6 in bucket 0:0, 3 in 1:1 (one a stream with usage), 1 in 2:0 (a stream without usage: estimated)."""
    loop = LoopThread()
    fleet = Fleet(DOC, {"a10g-0": "A10G", "l4-0": "L4", "a100-0": "A100-80GB"}, api_key="rk")
    loop.run(fleet.__aenter__())

    async def traffic():
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer rk"}) as session:
            sent = [(Kind.COMPLETIONS, 0, 0, {})] * 6 + [(Kind.CHAT, 1, 1, {})] * 2 + [
                (Kind.COMPLETIONS, 1, 1, {"stream": True, "stream_options": {"include_usage": True}}),
                (Kind.CHAT, 2, 0, {"stream": True})]
            for kind, row, col, extra in sent:
                path = "/v1/completions" if kind is Kind.COMPLETIONS else "/v1/chat/completions"
                async with session.post(fleet.url + path, json={**body(kind, row, col), **extra}) as response:
                    assert response.status == 200
                    await response.read()

    try:
        loop.run(traffic())
        yield fleet
    finally:
        loop.run(fleet.__aexit__(None, None, None))
        loop.close()


def test_the_observed_histogram_becomes_config_keys(cli, router, tmp_path):
    result = cli("workload", "--from", router.url, "--api-key", "rk", "-o", str(tmp_path / "w.json"))
    assert result.exit_code == 0, result.stderr
    assert f"10 requests from {router.url}/workload (router)" in result.stdout
    assert "req/s (arrivals the router counted over its window)" in result.stdout
    assert "1 of 10 request(s) were counted from the router's estimates" in result.stderr
    keys = json.loads((tmp_path / "w.json").read_text())
    assert keys["workload_distribution"] == [[0.6, 0.0], [0.0, 0.3], [0.1, 0.0]]
    assert keys["input_buckets"] == DOC["input_buckets"] and keys["output_buckets"] == DOC["output_buckets"]
    assert keys["total_request_rate"] > 0


def test_merging_into_a_config_replaces_the_workload_keys_only(cli, router, write_config, monkeypatch):
    config = {**MIX, "input_buckets": DOC["input_buckets"], "output_buckets": DOC["output_buckets"],
              "workload_distribution": [[0.5, 0.5], [0, 0], [0, 0]],
              "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2], [1, 1]]}}, "deployment": {"x": 1}}
    path = write_config(config)
    monkeypatch.setenv("MELANGE_SKY_API_KEY", "rk")
    result = cli("workload", "--from", router.url + "/workload", "--into", path, "--rate", "12", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["rate_source"] == "given" and record["counts"] == [[6, 0], [0, 3], [1, 0]]
    merged = json.loads(open(path).read())
    assert merged["workload_distribution"] == [[0.6, 0.0], [0.0, 0.3], [0.1, 0.0]]
    assert merged["total_request_rate"] == 12 and merged["deployment"] == {"x": 1}


@pytest.mark.parametrize(("args", "message"), [
    (("--from", "URL"), "HTTP 401: pass the router's key with --api-key or MELANGE_SKY_API_KEY"),
    (("--from", "URL", "--api-key", "rk", "--input-buckets", "1,10"), "--from counts with the router's own"),
    (("trace.jsonl", "--from", "URL"), "give a TRACE file, or --from URL"),
    (("--from", "ftp://h/x"), "is not an http(s) URL"),
])
def test_bad_uses_of_from_are_one_line_errors(cli, router, args, message, monkeypatch):
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    result = cli("workload", *[router.url if a == "URL" else a for a in args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_router_that_is_not_there_or_has_seen_nothing_says_so(cli, monkeypatch):
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    holder, url = free_port_holder()
    try:
        result = cli("workload", "--from", url)
    finally:
        holder.close()
    assert result.exit_code == 2 and "cannot reach the router" in result.stderr
    loop = LoopThread()
    fleet = Fleet(DOC, {"a100-0": "A100-80GB"})
    try:
        loop.run(fleet.__aenter__())
        result = cli("workload", "--from", fleet.url)
        assert result.exit_code == 2
        assert "the router has counted no answered requests in its window yet" in result.stderr
    finally:
        loop.run(fleet.__aexit__(None, None, None))
        loop.close()
