"""`melange-sky workload --from URL`: what a running router observed, turned into config keys like a trace is."""
from __future__ import annotations

import contextlib
import http.server
import json
import threading

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


def test_the_observed_histogram_becomes_config_keys_from_the_endpoint_up_prints(cli, router, tmp_path):
    # the endpoint as `up` and `status` print it ends in /v1: the router's /workload is beside the API, not in it
    result = cli("workload", "--from", router.url + "/v1/", "--api-key", "rk", "-o", str(tmp_path / "w.json"))
    assert result.exit_code == 0, result.stderr
    assert f"10 requests from {router.url}/workload (router)" in result.stdout
    assert " req/s (arrivals the router counted over the " in result.stdout  # its 10 requests took under 1 s
    assert " s since its first request)" in result.stdout
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


# ---- peak rates from a router: minute_arrivals and rate_percentiles, and older routers without them ---------------
OLD_DOC = {"input_buckets": [1, 100, 1000], "output_buckets": [1, 100, 1000], "counts": [[30, 10], [5, 5]],
           "total_request_rate": 12.5, "window_s": 3600.0, "span_s": 3600.0, "requests": 50}
MINUTES = [300, 3000, 300, 3000, 0, 3000, 300, 3000, 300, 600]  # arrivals per complete minute, oldest first
NEW_DOC = {**OLD_DOC, "minute_arrivals": MINUTES,
           "rate_percentiles": {"p50": 5.0, "p95": 50.0, "p99": 50.0, "max": 50.0}}


@contextlib.contextmanager
def serving(doc):
    """A stand-in router answering GET /workload with `doc`, on a free local port, stopped on exit."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = json.dumps(doc).encode()
            self.send_response(200 if self.path == "/workload" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_the_routers_per_minute_peaks_are_shown_and_can_be_planned_for(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    with serving(NEW_DOC) as url:
        shown = cli("workload", "--from", url)
        p95 = cli("workload", "--from", url, "--rate-percentile", "95", "--json", "-o", str(tmp_path / "w.json"))
        p80 = cli("workload", "--from", url, "--rate-percentile", "80", "--json")
    assert shown.exit_code == 0, shown.stderr
    assert "Rate: 12.5 req/s (arrivals the router counted over its window)" in shown.stdout
    assert ("Per-minute rate over 10 complete minute(s): p50 5, p95 50, p99 50, max 50 req/s (under 20 minutes: "
            "p95 and p99 are the busiest minutes)") in shown.stdout
    assert "plan for it with --rate-percentile 95" in shown.stdout
    assert p95.exit_code == 0, p95.stderr
    record = json.loads(p95.stdout)
    assert record["total_request_rate"] == 50.0 and record["rate_percentile"] == 95
    assert record["mean_request_rate"] == 12.5 and record["rate_source"] == "observed"
    assert record["rate_percentiles"] == {"p50": 5.0, "p95": 50.0, "p99": 50.0, "max": 50.0, "minutes": 10}
    assert json.loads((tmp_path / "w.json").read_text())["total_request_rate"] == 50.0
    # a percentile the router does not report is read from its minutes: the 8th of 10 sorted is 3000 per minute
    assert p80.exit_code == 0, p80.stderr
    assert json.loads(p80.stdout)["total_request_rate"] == 50.0


def test_percentiles_only_or_minutes_only_are_enough(cli, monkeypatch):
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    only_percentiles = {k: v for k, v in NEW_DOC.items() if k != "minute_arrivals"}
    only_minutes = {k: v for k, v in NEW_DOC.items() if k != "rate_percentiles"}
    with serving(only_percentiles) as url:
        p99 = cli("workload", "--from", url, "--rate-percentile", "p99", "--json")
        p90 = cli("workload", "--from", url, "--rate-percentile", "90")
    assert p99.exit_code == 0 and json.loads(p99.stdout)["total_request_rate"] == 50.0
    assert p90.exit_code == 2 and "no per-minute arrivals (minute_arrivals) and no p90 in rate_percentiles" \
        in p90.stderr
    with serving(only_minutes) as url:
        record = json.loads(cli("workload", "--from", url, "--rate-percentile", "50", "--json").stdout)
    assert record["total_request_rate"] == 5.0  # the 5th of the 10 sorted minutes: 300 arrivals
    assert record["rate_percentiles"] == {"p50": 5.0, "p95": 50.0, "p99": 50.0, "max": 50.0, "minutes": 10}


def test_an_older_router_without_per_minute_arrivals_still_gives_the_mean(cli, monkeypatch):
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    with serving(OLD_DOC) as url:
        mean = cli("workload", "--from", url, "--json")
        peak = cli("workload", "--from", url, "--rate-percentile", "95")
    assert mean.exit_code == 0, mean.stderr
    record = json.loads(mean.stdout)
    assert record["total_request_rate"] == 12.5 and record["rate_percentiles"] is None
    assert peak.exit_code == 2 and len(peak.stderr.strip().splitlines()) == 1
    assert "the router reports no per-minute arrivals (minute_arrivals)" in peak.stderr
    assert "Drop --rate-percentile, or pass --rate" in peak.stderr


def test_a_router_without_a_complete_minute_yet_cannot_give_a_percentile(cli, router):
    result = cli("workload", "--from", router.url, "--api-key", "rk", "--rate-percentile", "95")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "the router has no complete minute of arrivals yet (it has counted for " in result.stderr
    assert "ask again later, or pass --rate" in result.stderr
