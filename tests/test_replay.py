"""`melange-sky replay` against servers of known timing: the law server (tests/openai_test_server.py) with a fixed
per-token time (k = 0: no load dependence), so every request's TTFT is its prompt x the prefill time and its TPOT the
base time, whatever else is in flight; prompts above a size hang after the headers (a slow server)."""
from __future__ import annotations

import asyncio
import csv
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from conftest import REPO, free_port
from melange_sky.core.slo import Slos
from melange_sky.inputs.arrivals import Arrivals, trace_arrivals
from melange_sky.inputs.replay import PromptKind, ReplayError, ReplaySettings, replay

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_test_server import start_server  # noqa: E402

BASE_MS, PREFILL_MS = 10.0, 1.0  # each token after the first 10 ms later; the first after 1 ms per prompt token
HANG_ABOVE = 1000  # prompts longer than this get headers and then nothing


@pytest.fixture(scope="module")
def law():
    proc, url = start_server([f"--base-ms={BASE_MS}", "--k-ms=0", f"--prefill-ms-per-token={PREFILL_MS}",
                              f"--hang-above-prompt={HANG_ABOVE}"])
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def arrivals(rows: list[tuple[float, int, int]]) -> Arrivals:
    times, prompts, outputs = (list(x) for x in zip(*rows))
    return Arrivals(times, prompts, outputs, max(times[-1], 1e-9), f"{len(rows)} test requests")


def write_trace(path: Path, rows: list[tuple[float, int, int]]) -> str:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "input_len", "output_len"])
        writer.writerows((1_765_000_000 + t, p, o) for t, p, o in rows)
    return str(path)


def settings(url: str, **changes) -> ReplaySettings:
    base = dict(endpoint=url, request_timeout=10.0, connect_timeout=2.0, input_edges=(1, 100, 2000),
                output_edges=(1, 16, 64))
    return ReplaySettings(**{**base, **changes})


def test_each_request_is_timed_as_the_server_answers_it(law):
    # prompts of 40 and 200 tokens (TTFT 40 and 200 ms), outputs of 11 and 21 tokens (TPOT 10 ms)
    rows = [(0.05 * k, 40 if k % 2 else 200, 11 if k % 3 else 21) for k in range(12)]
    result = replay(arrivals(rows), Slos(tpot_ms=50.0), settings(law, gpu="L4"))
    report = result.report
    assert (report.requests, report.overall.answered, result.sent, result.interrupted) == (12, 12, 12, False)
    for record, (t, prompt, output) in zip(result.records, rows):
        assert record.arrival_s == pytest.approx(t)
        assert record.bucket == (0 if prompt < 100 else 1, 0 if output < 16 else 1)
        assert record.output_tokens == output
        first, last = prompt * PREFILL_MS / 1000, (prompt * PREFILL_MS + (output - 1) * BASE_MS) / 1000
        assert first <= record.ttft_s < first + 0.1
        # the server sends the last token at `last`: it cannot arrive before. A first token that reached a busy client
        # late (by ttft - first) makes the TPOT measured after it that much shorter per token, and only that much.
        assert record.latency_s >= last
        late = (record.ttft_s - first) / (output - 1)
        assert BASE_MS / 1000 * 0.95 - late <= record.tpot_s < BASE_MS / 1000 + 0.01
    assert set(report.per_gpu) == {"L4"} and report.per_gpu["L4"].requests == 12
    assert set(report.per_bucket) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert report.attainment == 1.0 and report.meets_target
    assert report.bucket_names[(1, 0)] == "input 100-2000, output 1-16 tokens"


def test_a_tighter_slo_than_the_server_can_hold_is_missed_by_exactly_the_requests_over_it(law):
    rows = [(0.02 * k, 40 if k < 4 else 200, 6) for k in range(8)]  # TTFT 40 ms (4 of them) and 200 ms (4)
    report = replay(arrivals(rows), Slos(ttft_ms=120.0), settings(law)).report
    assert report.missed["ttft"] == 4 and report.attainment == 0.5 and not report.meets_target


def test_sends_keep_the_traces_times_while_a_slow_server_holds_earlier_requests(law):
    # the first two requests hang (prompts over the server's limit) until the timeout; the others, due every 50 ms
    # and each taking ~0.2 s, go out on time all the same: open loop
    rows = [(0.0, HANG_ABOVE + 1, 8), (0.01, HANG_ABOVE + 1, 8)] + [(0.05 * k, 20, 20) for k in range(1, 11)]
    started = time.monotonic()
    result = replay(arrivals(rows), Slos(tpot_ms=50.0), settings(law, request_timeout=2.0))
    wall = time.monotonic() - started
    assert result.send_lag_ms["p50"] < 50
    answered = [r for r in result.records if r.ok]
    assert len(answered) == 10 and result.report.missed["unanswered"] == 2
    for record in answered:  # none waited for the hung ones: TTFT is the prefill alone
        assert record.ttft_s < 0.02 + 0.1
    assert wall < 2.0 + 3.0  # the hung requests' timeout, not the sum of the requests' times


def test_max_requests_and_duration_bound_what_is_sent(law, tmp_path):
    rows = [(0.02 * k, 10, 3) for k in range(30)]
    result = replay(arrivals(rows), Slos(tpot_ms=50.0), settings(law, max_requests=4))
    assert (result.offered, result.sent, result.report.requests) == (4, 4, 4)
    cut = trace_arrivals(write_trace(tmp_path / "t.csv", rows), duration_s=0.09)
    result = replay(cut, Slos(tpot_ms=50.0), settings(law))
    assert result.sent == result.report.requests == 5  # arrivals at 0, 0.02, ..., 0.08


def test_speedup_divides_the_arrival_times(law):
    rows = [(1.0 * k, 10, 3) for k in range(4)]
    result = replay(arrivals(rows), Slos(tpot_ms=50.0), settings(law, speedup=10.0))
    assert [r.arrival_s for r in result.records] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert result.wall_s < 2.0


@pytest.fixture
def router_like():
    """A server answering as a melange-sky router does: X-Melange-Gpu on each response (A10G for prompts under 50
    words or ids, A100-80GB above); it keeps every completion body it got."""
    bodies: list[dict] = []

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        prompt = body["prompt"]
        size = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                          "X-Melange-Gpu": "A10G" if size < 50 else "A100-80GB"})
        await out.prepare(request)
        for _ in range(body["max_tokens"]):
            await out.write(b'data: {"choices": [{"index": 0, "text": " a"}]}\n\n')
        await out.write(b"data: [DONE]\n\n")
        return out

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", bodies
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_the_gpu_type_is_the_one_the_routers_header_names(router_like):
    url, _bodies = router_like
    rows = [(0.01 * k, 10 if k % 2 else 100, 3) for k in range(6)]
    result = replay(arrivals(rows), Slos(tpot_ms=50.0), settings(url, gpu="ignored"))
    assert result.model == "m"
    assert {g: x.requests for g, x in result.report.per_gpu.items()} == {"A10G": 3, "A100-80GB": 3}


def test_each_request_asks_for_its_sizes_in_words_or_token_ids(router_like):
    url, bodies = router_like
    replay(arrivals([(0.0, 120, 4), (0.01, 7, 30)]), Slos(tpot_ms=50.0), settings(url))
    replay(arrivals([(0.0, 120, 4)]), Slos(tpot_ms=50.0), settings(url, prompt=PromptKind.IDS))
    sent = bodies[1:3] + bodies[4:]  # each replay's first completion is its one-token check of the endpoint
    assert [len(b["prompt"].split()) for b in sent[:2]] == [120, 7]
    assert len(sent[2]["prompt"]) == 120 and all(isinstance(x, int) for x in sent[2]["prompt"])
    for body, output in zip(sent, (4, 30, 4)):
        assert body["max_tokens"] == output and body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True} and body["model"] == "m"


def test_json_has_simulates_keys(law, cli, tmp_path):
    trace = write_trace(tmp_path / "t.csv", [(0.02 * k, 30 + 600 * (k % 2), 5 + 200 * (k % 3 == 0))
                                             for k in range(10)])
    config = str(REPO / "docs" / "simulate-config.json")
    replayed = cli("replay", trace, "--endpoint", law, "--config", config, "--gpu", "L4", "--ttft-slo-ms", "2000",
                   "--json")
    assert replayed.exit_code == 0, replayed.stderr
    simulated = cli("simulate", config, "--trace", trace, "--ttft-slo-ms", "2000", "--json")
    assert simulated.exit_code == 0, simulated.stderr
    mine, theirs = json.loads(replayed.stdout), json.loads(simulated.stdout)
    only_simulate = {"planned_share_per_gpu", "per_replica", "plan", "simulated_s", "wall_s", "steps"}
    assert set(mine) - {"replay"} == set(theirs) - only_simulate
    for key in ("ttft_ms", "tpot_ms", "latency_ms", "slos", "missed", "slo_statistics", "arrivals"):
        assert set(mine[key]) == set(theirs[key]), key
    assert set(mine["per_bucket"]) == set(theirs["per_bucket"])  # the config's buckets, named alike
    for name, bucket in mine["per_bucket"].items():
        assert bucket.keys() == theirs["per_bucket"][name].keys() and bucket["name"] == theirs["per_bucket"][name][
            "name"]
    assert mine["per_gpu"]["L4"].keys() == next(iter(theirs["per_gpu"].values())).keys()
    assert mine["per_minute"][0].keys() == theirs["per_minute"][0].keys()
    assert mine["requests"] == theirs["requests"] == 10


def test_an_endpoint_that_is_not_there_is_one_line_and_exit_2(cli, tmp_path):
    trace = write_trace(tmp_path / "t.csv", [(0.0, 10, 3)])
    url = f"http://127.0.0.1:{free_port()}"
    run = cli("replay", trace, "--endpoint", url)
    assert run.exit_code == 2
    assert run.stderr.startswith(f"Error: cannot reach {url} (connection refused)") and run.stderr.count("\n") == 1
    run = cli("replay", trace, "--endpoint", f"{url}/v1/completions")
    assert run.exit_code == 2 and "points into the API" in run.stderr and run.stderr.count("\n") == 1
    with pytest.raises(ReplayError, match="cannot reach"):
        replay(arrivals([(0.0, 10, 3)]), Slos(tpot_ms=50.0), settings(url))


def test_an_unknown_model_is_refused_before_sending(law, cli, tmp_path):
    trace = write_trace(tmp_path / "t.csv", [(0.0, 10, 3)])
    run = cli("replay", trace, "--endpoint", law, "--model", "nope")
    assert run.exit_code == 2 and "does not serve model 'nope'; it serves: test-model" in run.stderr


def _interrupt_once(law: str, rows: list[tuple[float, int, int]], shown: bytes, tmp_path) -> tuple[int, str, str]:
    """Run `replay --json` in a subprocess with stderr on a terminal (so it shows its progress every 2 s), send it
    a SIGINT once a progress line contains `shown`; (exit code, stdout, what the terminal showed)."""
    trace = write_trace(tmp_path / "t.csv", rows)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "melange_sky", "replay", trace, "--endpoint", law, "--json"],
                            stdout=subprocess.PIPE, stderr=follower, cwd=tmp_path, text=True)
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while shown not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            try:
                seen += os.read(leader, 4096)
            except OSError:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        try:
            while chunk := os.read(leader, 4096):
                seen += chunk
        except OSError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    return proc.returncode, out, seen.decode()


def test_ctrl_c_stops_sending_cancels_what_is_in_flight_and_prints_the_partial_report(law, tmp_path):
    # three quick requests, one that hangs, then one due in ten minutes: a Ctrl-C once the quick ones have finished
    rows = [(0.0, 10, 3), (0.01, 10, 3), (0.02, 10, 3), (0.03, HANG_ABOVE + 1, 3), (600.0, 10, 3)]
    code, out, shown = _interrupt_once(law, rows, b"3 finished", tmp_path)
    assert code == 130, shown
    doc = json.loads(out)
    assert doc["requests"] == 3 and doc["attainment"] == 1.0
    assert doc["replay"] | {"wall_s": None, "send_lag_ms": None} == {
        "endpoint": law, "model": "test-model", "sent": 4, "cancelled": 1, "interrupted": True, "wall_s": None,
        "send_lag_ms": None}
    assert shown.strip().splitlines()[-1] == "Interrupted." and "Traceback" not in shown


def test_ctrl_c_before_any_request_finished_exits_130_with_nothing_to_report(law, tmp_path):
    rows = [(0.0, HANG_ABOVE + 1, 3), (600.0, 10, 3)]
    code, out, shown = _interrupt_once(law, rows, b"1 in flight", tmp_path)
    assert code == 130 and out == "", shown
    assert shown.strip().splitlines()[-1] == "Interrupted." and "Traceback" not in shown and "Error" not in shown
