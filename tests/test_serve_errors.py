"""Every non-2xx answer of the router reads as an OpenAI error in the official `openai` SDK (issue 21, item 2): the
router's own (400, 401, 404, 405, 413, 500, 502, 503, 504) and the replicas' it relays (shaped ones as they are,
plain text wrapped); the request id and the client's OpenAI headers reach the replica."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from fake_openai_upstream import Fleet
from multidict import CIMultiDict
from test_serve_e2e import post, run
from test_serve_policy import DOC, body

from melange_sky.serve.openai_errors import shaped, upstream_message
from melange_sky.serve.tokens import Kind

ONE = {"a100-0": "A100-80GB"}
PROMPT = "x" * 2000  # bucket row 1 (500 tokens)


def client(url: str, key: str = "client-key", **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30, **kwargs)


async def sdk_error(call) -> openai.APIStatusError:
    """The error the SDK raises for a call, checked to carry an OpenAI error with a message."""
    with pytest.raises(openai.APIStatusError) as info:
        await call
    error = info.value
    assert isinstance(error.body, dict), error.body  # the SDK found {"error": {...}} and took its inside
    assert isinstance(error.body.get("message"), str) and error.body["message"]
    assert error.type and error.body["message"] in error.message
    return error


def test_the_routers_own_errors_read_as_openai_errors_in_the_sdk():
    async def scenario():
        async with Fleet(DOC, ONE, api_key="client-key", upstream_api_key="replica-key",
                         max_body_mb=0.001) as fleet:
            sdk = client(fleet.url)
            try:
                error = await sdk_error(sdk.post("/completions", cast_to=object, content=b"{not json"))
                assert error.status_code == 400 and "not valid JSON" in error.message
                error = await sdk_error(sdk.post("/completions", cast_to=object, content=b"[1, 2]"))
                assert error.status_code == 400 and "JSON object" in error.message
                error = await sdk_error(client(fleet.url, "wrong").completions.create(model="m", prompt="hi"))
                assert error.status_code == 401 and error.code == "invalid_api_key"
                error = await sdk_error(sdk.get("/nothing-here", cast_to=object))
                assert error.status_code == 404 and "no route GET /v1/nothing-here" in error.message
                error = await sdk_error(sdk.get("/completions", cast_to=object))
                assert error.status_code == 405 and error.response.headers["Allow"] == "POST"
                error = await sdk_error(sdk.completions.create(model="m", prompt=PROMPT, max_tokens=5))
                assert error.status_code == 413 and "--max-body-mb" in error.message
                assert error.code == "request_too_large"
            finally:
                await sdk.close()

    run(scenario)


def test_failures_behind_the_router_read_as_openai_errors_in_the_sdk():
    async def scenario():
        async with Fleet(DOC, ONE, dead=("a100-0",)) as fleet:
            sdk = client(fleet.url)
            try:
                error = await sdk_error(sdk.completions.create(model="m", prompt=PROMPT, max_tokens=200))
                assert error.status_code == 502 and "cannot connect" in error.message
                error = await sdk_error(sdk.completions.create(model="m", prompt=PROMPT, max_tokens=200))
                assert error.status_code == 503 and error.code == "no_replica" and "1 down" in error.message
            finally:
                await sdk.close()
        async with Fleet(DOC, ONE, read_timeout_s=0.2) as fleet:
            sdk = client(fleet.url)
            fleet.upstreams["a100-0"].hold = asyncio.Event()  # never set: the replica never answers
            try:
                error = await sdk_error(sdk.completions.create(model="m", prompt=PROMPT, max_tokens=200))
                assert error.status_code == 504 and "timed out" in error.message
            finally:
                await sdk.close()
        async with Fleet(DOC, {"a100-0": "A100-80GB", "a100-1": "A100-80GB"}) as fleet:
            sdk = client(fleet.url)
            try:
                error = await sdk_error(sdk.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": PROMPT}], extra_body={"max_tokens": "abc"}))
                assert error.status_code == 502
                assert "answered HTTP 500: 500 Internal Server Error Server got itself in trouble" in error.message
                fleet.router.policy.target = lambda *args: 1 / 0  # a bug in the router
                error = await sdk_error(sdk.completions.create(model="m", prompt="hi", max_tokens=5))
                assert error.status_code == 500 and "ZeroDivisionError" in error.message
                assert any("internal error" in line and "Traceback" in line for line in fleet.logs), fleet.logs
            finally:
                await sdk.close()

    run(scenario)


@pytest.mark.parametrize("stream", [False, True])
def test_a_replicas_4xx_is_relayed_as_it_is_when_shaped_and_wrapped_when_plain_text(stream):
    async def scenario():
        async with Fleet(DOC, ONE) as fleet:
            sdk = client(fleet.url)
            upstream = fleet.upstreams["a100-0"]
            try:
                upstream.status = 422
                error = await sdk_error(sdk.completions.create(model="m", prompt=PROMPT, max_tokens=200,
                                                               stream=stream))
                assert error.status_code == 422 and error.body["message"] == "simulated 422"
                assert error.body["type"] == "server_error"  # the replica's own type: passed as it is
                upstream.status, upstream.status_text = 413, "413 Request Entity Too Large\n\nbody too big"
                error = await sdk_error(sdk.completions.create(model="m", prompt=PROMPT, max_tokens=200,
                                                               stream=stream))
                assert error.status_code == 413 and error.body["message"] == "413 Request Entity Too Large body too big"
                assert error.code == "413" and error.type == "invalid_request_error"
            finally:
                await sdk.close()

    run(scenario)


def test_the_request_id_and_the_clients_openai_headers_reach_the_replica_never_its_key():
    async def scenario():
        async with Fleet(DOC, ONE, api_key="client-key", upstream_api_key="replica-key") as fleet:
            upstream = fleet.upstreams["a100-0"]
            sdk = client(fleet.url, organization="org-1", project="proj-1")
            try:
                raw = await sdk.completions.with_raw_response.create(model="m", prompt="hi", max_tokens=3)
                made = raw.headers["x-request-id"]
                assert len(made) == 24 and int(made, 16) >= 0  # made by the router
                sent = upstream.headers[-1]
                assert sent["X-Request-Id"] == made
                assert sent["OpenAI-Organization"] == "org-1" and sent["OpenAI-Project"] == "proj-1"
                assert sent["Authorization"] == "Bearer replica-key"
                raw = await sdk.completions.with_raw_response.create(
                    model="m", prompt="hi", max_tokens=3, stream=True, extra_headers={"X-Request-Id": "mine-7"})
                assert raw.headers["x-request-id"] == "mine-7" and upstream.headers[-1]["X-Request-Id"] == "mine-7"
            finally:
                await sdk.close()
            async with aiohttp.ClientSession() as session:  # errors carry it too
                status, headers, _ = await post(session, fleet.url, Kind.COMPLETIONS, body(Kind.COMPLETIONS, 0, 0),
                                                headers={"X-Request-Id": "bad-1"})
                assert status == 401 and CIMultiDict(headers)["X-Request-Id"] == "bad-1"

    run(scenario)


def test_upstream_error_bodies_are_shaped_keeping_what_they_say():
    assert shaped(400, b'{"error": {"message": "bad", "type": "BadRequestError", "code": 400}}') is None
    wrapped = json.loads(shaped(400, b'{"object": "error", "message": "too long", "type": "BadRequestError", '
                                     b'"param": "prompt", "code": 400}'))
    assert wrapped == {"error": {"message": "too long", "type": "BadRequestError", "param": "prompt", "code": 400}}
    wrapped = json.loads(shaped(422, b'{"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}'))
    assert wrapped["error"]["message"] == '[{"loc":["body","prompt"],"msg":"field required"}]'
    assert wrapped["error"]["type"] == "invalid_request_error" and wrapped["error"]["code"] == 422
    assert upstream_message(b"<html>\n<h1>502 Bad Gateway</h1>\n</html>") == "<html> <h1>502 Bad Gateway</h1> </html>"
    assert len(upstream_message(b"x" * 10_000)) == 500
    assert upstream_message(b"") == "(no body)"
