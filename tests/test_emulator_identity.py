"""A hand-run `melange-sky emulate` says what it is on every answer (a response header vLLM's clients ignore; its
bodies stay vLLM's), so `profile --endpoint` at it records `emulated` and the speed, and `estimate --calibrate`
refuses to fit the engine model to that record, as it refuses the local launcher's.

One emulator served from a thread of this process; the profile and the estimate run in-process (Click's CliRunner),
on one bucket at one rate."""
from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request

import pytest

from melange_sky.engine import load_model
from melange_sky.engine.calibrate import check_record
from melange_sky.engine.emulator import EmulatorServer, prepare
from melange_sky.engine.emulator_openai import EMULATOR_HEADER

MODEL = "llama-2-7b"
SPEED = 50


@pytest.fixture(scope="module")
def emulator_url():
    ready = prepare(MODEL, "A10G", speed=SPEED, port=0)
    server = EmulatorServer(ready.emulator, ready.settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="emulator", daemon=True)
    thread.start()
    url = asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    yield url
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(60)
    loop.close()


def _get(url: str, body: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_every_answer_names_the_emulator_and_its_speed_while_v1_models_stays_vllms(emulator_url) -> None:
    status, headers, body = _get(f"{emulator_url}/v1/models")
    assert status == 200 and headers[EMULATOR_HEADER] == str(SPEED)
    listed = json.loads(body)
    assert set(listed) == {"object", "data"} and listed["object"] == "list" and len(listed["data"]) == 1
    model = listed["data"][0]
    assert set(model) == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len"}
    assert (model["id"], model["object"], model["owned_by"], model["root"], model["parent"]) == \
        (MODEL, "model", "vllm", MODEL, None)
    # the rest of the routes, an error and a stream too
    stream = {"model": MODEL, "prompt": "the of and", "max_tokens": 2, "stream": True}
    for url, request, code in [(f"{emulator_url}/health", None, 200),
                               (f"{emulator_url}/v1/completions", stream, 200),
                               (f"{emulator_url}/v1/completions", {"model": "other", "prompt": "the"}, 404)]:
        status, headers, _ = _get(url, request)
        assert status == code and headers.get(EMULATOR_HEADER) == str(SPEED), (url, status, headers)


def test_a_profile_of_a_hand_run_emulator_says_so_and_calibrating_on_it_is_refused(emulator_url, cli, tmp_path,
                                                                                   monkeypatch) -> None:
    monkeypatch.setenv("MELANGE_SKY_HOME", str(tmp_path / "home"))
    run = cli("profile", "--endpoint", emulator_url, "--model", MODEL, "--gpu", "A10G", "--buckets", "0:0",
              "--input-buckets", "1,40", "--output-buckets", "1,8", "--start-rate", "100", "--max-rate", "100",
              "--requests-per-step", "5", "--bisect-steps", "0", "--timeout", "10", "-q", "-o", "p.json")
    assert run.exit_code == 0, run.stderr
    record = json.loads((tmp_path / "p.json").read_text())
    assert (record["gpu"], record["emulated"], record["speed"]) == ("A10G", True, SPEED)
    checked = check_record(load_model(MODEL), "A10G", record, "p.json")
    assert len(checked.problems) == 1 and "emulator at 50x real time" in checked.problems[0]
    # One rate only, so the bucket is "capped", which a fit skips (and says so before checking the record): as if
    # it had found its limit there, to see the CLI refuse the record for the emulator before any fitting.
    record["buckets"][0]["status"] = "ok"
    (tmp_path / "p.json").write_text(json.dumps(record))
    refused = cli("estimate", "--model", MODEL, "--gpu", "A10G", "--calibrate", "p.json")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"emulator at {SPEED}x real time, not a real A10G" in refused.stderr
    assert not (tmp_path / "home" / "engine" / "fits" / "A10G.json").exists()
