"""`melange-sky emulate`: an OpenAI-compatible server whose tokens come out on the engine model's step times.

Each test runs the emulator's aiohttp server on a free port in its own event loop, with an aiohttp client in the
same loop. Timing tests compare what a client sees with the step durations a fresh `Engine` of the same model
predicts; their lower bounds are exact (steps end at deadlines, never early) and their upper bounds leave room for
a busy machine. Waits for state (a request running, then gone) are polls guarded by the test's hang guard.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from melange_sky.engine import Engine, load_model
from melange_sky.engine.emulator import EmulatorServer, prepare
from melange_sky.engine.emulator_openai import COMPLETIONS_DEFAULT_MAX_TOKENS, FILLER

MODEL, GPU = "llama-3.1-8b", "A10G"  # decode steps ~35 ms at speed 1: slow enough to watch, fast at --speed
HANG_GUARD_S = 60
KEY = "sekrit"


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_S))


class Served:
    """An emulator listening on a free port, and a client session to it."""

    def __init__(self, speed: float = 1.0, api_key: str | None = None, served_model_name: str | None = None):
        self.ready = prepare(MODEL, GPU, speed=speed, port=0, api_key=api_key, served_model_name=served_model_name)
        self.server = EmulatorServer(self.ready.emulator, self.ready.settings)
        self.url = ""
        self.session: aiohttp.ClientSession | None = None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def __aenter__(self) -> Served:
        self.url = await self.server.start()
        self.session = aiohttp.ClientSession(headers=self.headers)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.session is not None
        await self.session.close()
        await self.server.stop()

    @property
    def engine(self) -> Engine:
        return self.ready.emulator.engine

    async def post(self, path: str, body: dict, **kwargs) -> tuple[int, bytes]:
        assert self.session is not None
        async with self.session.post(self.url + path, json=body, **kwargs) as response:
            return response.status, await response.read()

    async def stream(self, path: str, body: dict) -> list[tuple[float, dict | str]]:
        """Each SSE data payload with the time it arrived (seconds since the request was sent)."""
        assert self.session is not None
        start = time.perf_counter()
        events: list[tuple[float, dict | str]] = []
        async with self.session.post(self.url + path, json=body) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            async for line in response.content:
                if line.startswith(b"data: "):
                    payload = line[6:].strip()
                    events.append((time.perf_counter() - start,
                                   "[DONE]" if payload == b"[DONE]" else json.loads(payload)))
        return events

    async def metrics(self) -> dict[str, float]:
        """Each sample's value by its name, and by name{reason} for request_success_total's finish reasons."""
        assert self.session is not None
        async with self.session.get(self.url + "/metrics") as response:
            text = await response.text()
        return {sample.name + (f"{{{sample.labels['finished_reason']}}}" if "finished_reason" in sample.labels
                               else ""): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}


def predicted(prompt_tokens: int, max_tokens: int, speed: float, requests: int = 1,
              endpoint: str = "completions") -> tuple[float, float]:
    """(time to the first token, time to the last) of `requests` identical requests to `endpoint` added together,
    as a fresh engine of the same model steps them."""
    engine = Engine(load_model(MODEL), GPU, speed=speed)
    for rid in range(requests):
        engine.add(rid, prompt_tokens, max_tokens, endpoint=endpoint)
    now, first = 0.0, None
    while (step := engine.step()) is not None:
        now += step.duration_s
        if first is None and step.first_token:
            first = now
    assert first is not None
    return first, now


def tokens_of(events: list[tuple[float, dict | str]]) -> list[tuple[float, dict]]:
    return [(t, e) for t, e in events if isinstance(e, dict) and e.get("choices")
            and (e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content"))]


# ---- the API -------------------------------------------------------------------------------------------------------
def test_a_completion_has_max_tokens_filler_words_and_usage_counting_prompt_words():
    async def scenario():
        async with Served(speed=50) as s:
            status, raw = await s.post("/v1/completions", {"model": MODEL, "prompt": "one two  three\nfour",
                                                           "max_tokens": 7, "ignore_eos": True})
            assert status == 200
            doc = json.loads(raw)
            assert doc["object"] == "text_completion" and doc["model"] == MODEL and doc["id"].startswith("cmpl-")
            choice = doc["choices"][0]
            assert choice["text"] == "".join(f" {w}" for w in FILLER[:7])
            assert choice["finish_reason"] == "length"
            assert doc["usage"] == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}
            status, raw = await s.post("/v1/completions", {"model": MODEL, "prompt": [1, 2, 3, 4, 5, 6]})
            doc = json.loads(raw)  # token ids count exactly; no max_tokens: vLLM's default of 16
            assert doc["usage"]["prompt_tokens"] == 6
            assert doc["usage"]["completion_tokens"] == COMPLETIONS_DEFAULT_MAX_TOKENS

    run(scenario)


def test_a_chat_completion_answers_as_the_assistant_and_counts_every_message():
    async def scenario():
        async with Served(speed=50) as s:
            messages = [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": [{"type": "text", "text": "hello there you"}]}]
            status, raw = await s.post("/v1/chat/completions", {"model": MODEL, "messages": messages,
                                                                "max_completion_tokens": 3})
            assert status == 200
            doc = json.loads(raw)
            assert doc["object"] == "chat.completion" and doc["id"].startswith("chatcmpl-")
            message = doc["choices"][0]["message"]
            assert message["role"] == "assistant" and len(message["content"].split()) == 3
            assert doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}

    run(scenario)


def test_a_stream_sends_each_token_then_the_usage_event_when_asked_then_done():
    async def scenario():
        async with Served(speed=50) as s:
            events = await s.stream("/v1/completions", {
                "model": MODEL, "prompt": "a b c", "max_tokens": 5, "stream": True,
                "stream_options": {"include_usage": True}})
            tokens = tokens_of(events)
            assert [e["choices"][0]["text"] for _, e in tokens] == [f" {w}" for w in FILLER[:5]]
            assert [e["choices"][0]["finish_reason"] for _, e in tokens] == [None] * 4 + ["length"]
            usage = events[-2][1]
            assert isinstance(usage, dict) and usage["choices"] == []
            assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
            assert events[-1][1] == "[DONE]"
            assert len(events) == 7

    run(scenario)


def test_a_chat_stream_starts_with_the_role_and_has_no_usage_event_unless_asked():
    async def scenario():
        async with Served(speed=50) as s:
            events = await s.stream("/v1/chat/completions", {
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
            chunks = [e for _, e in events if isinstance(e, dict)]
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert [c["choices"][0]["delta"]["content"] for c in chunks[1:]] == [f" {w}" for w in FILLER[:4]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert all("usage" not in c for c in chunks)
            assert events[-1][1] == "[DONE]"

    run(scenario)


def test_bad_requests_get_vllm_shaped_errors():
    async def scenario():
        async with Served(speed=50) as s:
            limit = s.ready.settings.max_model_len
            cases = [
                ({"model": "other", "prompt": "x"}, 404, "does not exist"),
                ({"model": MODEL, "prompt": "x", "max_tokens": limit}, 400, "maximum context length"),
                ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
                ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream=True"),
                ({"model": MODEL}, 400, "prompt"),
            ]
            for body, status, words in cases:
                got, raw = await s.post("/v1/completions", body)
                assert got == status, body
                error = json.loads(raw)["error"]
                assert words in error["message"] and error["code"] == status
            assert s.ready.emulator.in_flight == 0

    run(scenario)


def test_models_lists_the_served_name_and_health_answers():
    async def scenario():
        async with Served(served_model_name="meta-llama/Llama-3.1-8B-Instruct") as s:
            assert s.session is not None
            async with s.session.get(s.url + "/v1/models") as response:
                models = await response.json()
            assert [m["id"] for m in models["data"]] == ["meta-llama/Llama-3.1-8B-Instruct"]
            assert models["data"][0]["max_model_len"] == s.engine.max_model_len
            async with s.session.get(s.url + "/health") as response:
                assert response.status == 200

    run(scenario)


def test_with_an_api_key_v1_needs_the_bearer_token_and_health_and_metrics_stay_open():
    async def scenario():
        async with Served(speed=50, api_key=KEY) as s:
            async with aiohttp.ClientSession() as anonymous:
                for path in ("/v1/models", "/v1/completions"):
                    async with anonymous.request("GET" if "models" in path else "POST", s.url + path,
                                                 json={"model": MODEL, "prompt": "x"}) as response:
                        assert response.status == 401
                async with anonymous.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}) as r:
                    assert r.status == 401
                for path in ("/health", "/metrics"):
                    async with anonymous.get(s.url + path) as response:
                        assert response.status == 200
            status, _ = await s.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert status == 200

    run(scenario)


def test_metrics_show_a_running_request_and_its_kv_blocks_until_its_client_disconnects():
    async def scenario():
        async with Served(speed=1) as s:
            names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
            idle = await s.metrics()
            assert [idle[n] for n in names] == [0, 0, 0]
            assert s.session is not None
            body = {"model": MODEL, "prompt": "word " * 2000, "max_tokens": 5000, "stream": True}
            async with s.session.post(s.url + "/v1/completions", json=body) as response:
                await response.content.readline()  # its first token came out: it is running
                busy = await s.metrics()
                assert busy["vllm:num_requests_running"] == 1 and busy["vllm:num_requests_waiting"] == 0
                assert busy["vllm:kv_cache_usage_perc"] > 0
                assert busy["vllm:generation_tokens_total"] >= 1 and busy["vllm:prompt_tokens_total"] == 2000
                response.close()  # the client goes away mid-stream
            while (await s.metrics())["vllm:num_requests_running"] != 0:
                await asyncio.sleep(0.01)
            after = await s.metrics()
            assert after["vllm:kv_cache_usage_perc"] == 0
            assert after["vllm:request_success_total{length}"] == 0
            assert after["vllm:request_success_total{abort}"] == 1
            assert s.ready.emulator.in_flight == 0 and not s.engine.has_work

    run(scenario)


def test_the_router_relays_emulated_replicas_streams_by_the_plans_shares():
    """The emulator looks like vLLM to `melange-sky serve`: streams, usage and the split of a bucket's traffic."""
    from test_serve_policy import DOC  # noqa: PLC0415 - the router's test plan (A10G and L4 share bucket 0:0)

    from melange_sky.serve.routes import parse_routes  # noqa: PLC0415
    from melange_sky.serve.server import Router, RouterServer  # noqa: PLC0415
    from melange_sky.serve.settings import ServeSettings  # noqa: PLC0415

    async def scenario():
        emulated = {gpu: prepare(MODEL, gpu, speed=50, port=0) for gpu in ("A10G", "L4")}
        servers = {gpu: EmulatorServer(r.emulator, r.settings) for gpu, r in emulated.items()}
        replicas = [{"name": gpu.lower(), "gpu": gpu, "url": await server.start()} for gpu, server in servers.items()]
        router = Router(parse_routes({**DOC, "replicas": replicas}), ServeSettings(port=0, seed=1), log=lambda _: None)
        front = RouterServer(router, "127.0.0.1", 0)
        url = await front.start()
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(4):
                    body = {"model": MODEL, "prompt": "word " * 40, "max_tokens": 10, "stream": True,
                            "stream_options": {"include_usage": True}}
                    async with session.post(url + "/v1/completions", json=body) as response:
                        assert response.status == 200
                        events = [json.loads(line[6:]) for line in (await response.read()).split(b"\n\n")
                                  if line.startswith(b"data: {")]
                    assert sum(1 for e in events if e["choices"]) == 10
                    assert events[-1]["usage"] == {"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50}
            served = {gpu: r.emulator.finished_total for gpu, r in emulated.items()}
            assert served == {"A10G": 2, "L4": 2}  # the plan splits bucket 0:0 half and half
        finally:
            await front.stop()
            for server in servers.values():
                await server.stop()

    run(scenario)


def test_if_the_engine_loop_fails_streams_end_with_an_error_and_new_requests_get_500():
    async def scenario():
        async with Served(speed=1) as s:
            emulator = s.ready.emulator
            emulator.log = lambda _: None
            steps = s.engine.step

            def failing_step():
                if emulator.generation_tokens_total >= 2:  # two tokens out, then the engine breaks
                    raise RuntimeError("boom")
                return steps()

            s.engine.step = failing_step  # type: ignore[method-assign]
            events = await s.stream("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 50,
                                                        "stream": True})
            assert len(tokens_of(events)) == 2
            assert "boom" in events[-2][1]["error"]["message"] and events[-1][1] == "[DONE]"
            status, raw = await s.post("/v1/completions", {"model": MODEL, "prompt": "x"})
            assert status == 500 and "engine loop failed" in json.loads(raw)["error"]["message"]
            assert s.session is not None
            async with s.session.get(s.url + "/health") as response:
                assert response.status == 503

    run(scenario)


# ---- timing --------------------------------------------------------------------------------------------------------
SPEED = 5.0
PROMPT, OUTPUT = 500, 30


def test_a_request_gets_its_first_and_last_token_on_the_models_step_times():
    ttft, total = predicted(PROMPT, OUTPUT, SPEED)

    async def scenario():
        async with Served(speed=SPEED) as s:
            events = await s.stream("/v1/completions", {"model": MODEL, "prompt": "w " * PROMPT,
                                                        "max_tokens": OUTPUT, "stream": True})
            tokens = tokens_of(events)
            assert len(tokens) == OUTPUT
            first, last = tokens[0][0], tokens[-1][0]
            # steps end at deadlines, never before: the lower bounds are exact (to the clock's resolution)
            assert ttft - 0.001 <= first <= ttft + max(0.05, 0.25 * ttft)
            assert total - 0.001 <= last <= total + max(0.05, 0.25 * total)

    run(scenario)


def test_two_requests_sent_together_share_the_batch_and_finish_in_about_one_requests_time():
    _, one = predicted(PROMPT, OUTPUT, SPEED)
    _, two = predicted(PROMPT, OUTPUT, SPEED, requests=2)
    assert two < 1.2 * one  # the model batches them: one prefill more, decodes shared

    async def scenario():
        async with Served(speed=SPEED) as s:
            body = {"model": MODEL, "prompt": "w " * PROMPT, "max_tokens": OUTPUT}
            start = time.perf_counter()
            answers = await asyncio.gather(s.post("/v1/completions", body), s.post("/v1/completions", body))
            elapsed = time.perf_counter() - start
            assert [status for status, _ in answers] == [200, 200]
            assert two - 0.001 <= elapsed < 1.5 * one  # not two requests' time (2 x one)

    run(scenario)


# ---- the command ---------------------------------------------------------------------------------------------------
def test_a_model_that_does_not_fit_the_gpu_is_one_line_and_exit_code_2(cli):
    result = cli("emulate", "--model", "llama-2-70b", "--gpu", "T4")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: does not fit:") and result.stderr.count("\n") == 1


def test_engine_settings_come_from_the_configs_deployment(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"deployment": {"model": MODEL, "max_num_seqs": 8, "max_model_len": 4096}}))
    ready = prepare(MODEL, GPU, config=str(config), port=0)
    assert ready.emulator.engine.max_num_seqs == 8
    assert ready.settings.max_model_len == 4096
    assert "max_num_seqs 8" in ready.summary


def test_the_command_prints_its_url_serves_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "melange_sky", "emulate", "--model", MODEL, "--gpu", GPU,
                             "--port", "0", "--speed", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        lines = []
        while not (lines and lines[-1].startswith("Listening on ")):
            line = proc.stdout.readline()
            assert line, f"the emulator exited: {proc.stderr.read() if proc.stderr else ''}"
            lines.append(line)
        assert lines[0].startswith(f"Emulating {MODEL} on {GPU}")
        url = lines[-1].split()[2]

        async def ask():
            async with aiohttp.ClientSession() as session:
                async with session.post(url + "/v1/completions",
                                        json={"model": MODEL, "prompt": "x", "max_tokens": 3}) as response:
                    return response.status, await response.json()

        status, doc = asyncio.run(asyncio.wait_for(ask(), HANG_GUARD_S))
        assert status == 200 and doc["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_GUARD_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_request_costs_the_model_of_vllms_api_server_what_its_endpoint_costs_as_estimate_charges_it():
    through = {}
    for endpoint in ("chat", "completions"):
        emulator = prepare(MODEL, GPU, port=0).emulator  # a fresh (idle) engine
        emulator.submit(10, 2, stream=False, endpoint=endpoint)
        step = emulator.engine.step()  # nothing else to do: an idle step until the API server lets it through
        assert step is not None and step.batch_tokens == 0
        through[endpoint] = step.duration_s
    coefficients = emulator.engine.coefficients
    assert through["chat"] == pytest.approx(coefficients.frontend_request_ms * 1e-3)
    assert through["completions"] == pytest.approx(coefficients.for_endpoint("completions").frontend_request_ms * 1e-3)
    assert through["completions"] < through["chat"]


@pytest.mark.parametrize(("field", "value", "words"), [
    ("temperature", "hot", "temperature: Input should be a valid number, unable to parse string as a number"),
    ("temperature", [1], "temperature: Input should be a valid number"),
    ("temperature", -0.5, "temperature must be non-negative, got -0.5."),
    ("top_p", 0, "top_p must be in (0, 1], got 0."),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5."),
    ("presence_penalty", 3, "presence_penalty must be in [-2, 2], got 3."),
    ("repetition_penalty", 0, "repetition_penalty must be greater than zero, got 0."),
    ("top_k", 2.5, "top_k: Input should be a valid integer, got a number with a fractional part"),
    ("top_k", -2, "top_k must be -1 (disable), or at least 1, got -2."),
    ("seed", "x", "seed: Input should be a valid integer, unable to parse string as an integer"),
])
def test_sampling_params_of_the_wrong_type_or_range_are_refused_as_vllm_refuses_them(field, value, words):
    from melange_sky.engine.emulator_openai import ApiError, Kind, parse_generation

    with pytest.raises(ApiError) as info:
        parse_generation({"model": MODEL, "prompt": "x", field: value}, Kind.COMPLETIONS, MODEL, 4096)
    assert info.value.status == 400 and words in str(info.value)
    accepted = {"temperature": "0.7", "top_p": 1, "top_k": -1, "seed": True, "min_p": 0, "presence_penalty": -2}
    assert parse_generation({"model": MODEL, "prompt": "x", **accepted}, Kind.COMPLETIONS, MODEL, 4096).max_tokens == 16
