"""The data path: POST /v1/completions and /v1/chat/completions, read whole, sized and routed by the policy, relayed
to a replica and back, retried on another when a try fails before any byte reached the client.

A request is read whole (orjson) and given a replica by the routing policy (`policy.py`, which knows the buckets
and shares; this module knows neither). A non-streaming answer is relayed whole, a stream chunk by chunk as it
arrives (`iter_any`, never buffered); a stream's response starts only with its first upstream chunk, so an upstream
that fails before producing anything is retried too. After a stream began, the client has part of a generation: a
failure ends the stream with an error event, never a second generation.

Retries: up to `retries` more replicas (another GPU type if needed), each retry drawn from the retry budget; a
request answered 5xx by two replicas is not tried again (a "query of death": it counts against no replica). What
counts against a replica, and the answer when every try failed: `failures.py`.

A client that disconnects cancels its handler (aiohttp's handler cancellation), which closes the upstream
connection, so the replica stops generating. Bookkeeping (usage, metrics) runs on the loop's next pass, after the
answer went out.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
import traceback
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from melange_sky.serve.failures import BUDGET_SPENT, POISON, Failure
from melange_sky.serve.openai_errors import JSON, error_response, shaped
from melange_sky.serve.policy import NoReplica, Replica, Target
from melange_sky.serve.tokens import Kind

if TYPE_CHECKING:
    from melange_sky.serve.server import Router

__all__ = ["FORWARDED", "REQUEST_ID", "Relay"]

#: The request id: the client's, or one the router makes; the replica and the client get it.
REQUEST_ID = "X-Request-Id"
#: Client headers a replica gets as they are (OpenAI's account and beta headers, W3C trace context).
FORWARDED = ("OpenAI-Organization", "OpenAI-Project", "OpenAI-Beta", "traceparent", "tracestate")
#: How much of a stream's end is kept to find its usage event (the last events before `data: [DONE]`).
_TAIL_CHUNKS = 2


class Relay:
    """The generation handlers of one router (`router` holds what changes: routes, policy, session, counters)."""

    def __init__(self, router: Router):
        self.router = router
        settings = router.settings
        self.settings = settings
        self.metrics = router.metrics
        self.failures = router.failures
        self.answered = router.outliers.answered  # a replica answered (not 5xx): its runs of failures end
        self.budget = router.budget
        self.sizer = router.sizer
        self.max_body = int(settings.max_body_mb * 1024 * 1024)
        self.upstream_headers = {"Content-Type": JSON}
        if settings.upstream_api_key:
            self.upstream_headers["Authorization"] = f"Bearer {settings.upstream_api_key}"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Kind.COMPLETIONS)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Kind.CHAT)

    # -- a request ---------------------------------------------------------------------------------------------------
    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        """Reads and checks the request, then tries replicas until one answers (a 4xx included), within --retries
        and the retry budget. (One coroutine, not two: on the hot path an extra await costs a microsecond.)"""
        start = time.perf_counter()
        rid = request.headers.get(REQUEST_ID) or os.urandom(12).hex()
        refused = self._refused(request, rid)
        if refused is not None:
            return refused
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(rid)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return error_response(400, "the request body is not valid JSON", "invalid_request_error",
                                  "invalid_json", headers={REQUEST_ID: rid})
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object", "invalid_request_error",
                                  "invalid_json", headers={REQUEST_ID: rid})
        try:
            router, metrics = self.router, self.metrics
            headers = self._forwarded(request, rid)
            policy = router.policy
            target = policy.target(body, kind)
            router.later(router.observed.arrival)
            tried: list[Replica] = []
            failure: Failure | None = None
            answered_5xx: list[Failure] = []  # this request's 5xx answers, judged once another replica answers it
            why = ""
            retrying = 0
            gpu = "none"
            router.in_flight += 1
            try:
                for attempt in range(self.settings.retries + 1):
                    if router.policy is not policy:  # routes swapped while it was out: retry along the new ones only
                        policy = router.policy
                        target = policy.target(body, kind)
                    try:
                        choice = policy.choose(target, tried)
                    except NoReplica as exc:
                        if failure is not None:
                            break
                        metrics.request(target.lane.label, "none", 503)
                        return error_response(503, exc.reason, "service_unavailable", "no_replica",
                                              headers={REQUEST_ID: rid})
                    replica = choice.replica
                    if attempt:
                        if not self.budget.acquire(router.in_flight):
                            metrics.budget_exhausted()
                            why = BUDGET_SPENT
                            break
                        retrying += 1
                        metrics.retry(tried[-1].gpu)
                    if choice.spilled:
                        metrics.spill(target.lane.label, replica.gpu)
                    if choice.panic:
                        metrics.panic(target.lane.label)
                    tried.append(replica)
                    gpu = replica.gpu
                    replica.in_flight += 1
                    replica.served += 1
                    try:
                        if target.stream:
                            outcome = await self._relay_stream(request, raw, headers, target, replica, start)
                        else:
                            outcome = await self._relay(request, raw, headers, target, replica, start)
                    finally:
                        replica.in_flight -= 1
                    if not isinstance(outcome, Failure):
                        if answered_5xx:  # another replica answered what these failed: they are at fault
                            self.failures.confirmed(answered_5xx)
                        return outcome
                    failure = outcome
                    if failure.reply:
                        answered_5xx.append(failure)
                        if len(answered_5xx) >= 2:  # a "query of death": the request's fault, not the replicas'
                            metrics.poison(target.lane.label)
                            why = POISON
                            break
                assert failure is not None
                answer = self.failures.gave_up(failure, len(tried), why, {REQUEST_ID: rid})
                metrics.request(target.lane.label, gpu, answer.status)
                return answer
            except asyncio.CancelledError:  # the client went away (or the drain deadline passed)
                metrics.request(target.lane.label, gpu, 499)
                raise
            finally:
                router.in_flight -= 1
                for _ in range(retrying):
                    self.budget.release()
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: the client still gets an error it reads, the log a traceback
            self.router.log(f"internal error on {request.method} {request.path} ({REQUEST_ID} {rid}): "
                            f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            return error_response(500, f"internal error in the router ({type(exc).__name__}); {REQUEST_ID} {rid}",
                                  "server_error", "internal_error", headers={REQUEST_ID: rid})

    def _refused(self, request: web.Request, rid: str) -> web.Response | None:
        """What a request gets before its body is read: 401, or 503 while draining."""
        denied = self.router.access.client(request)
        if denied is not None:
            denied.headers[REQUEST_ID] = rid
            return denied
        if self.router.draining:
            return error_response(503, "the router is shutting down", "service_unavailable", "shutting_down",
                                  headers={"Connection": "close", REQUEST_ID: rid})
        return None  # a body over the limit: `request.read()` stops at it (client_max_size) and raises

    def _too_large(self, rid: str) -> web.Response:
        return error_response(413, f"the request body is larger than the router's limit of "
                                   f"{self.settings.max_body_mb:g} MiB (serve --max-body-mb)",
                              "invalid_request_error", "request_too_large",
                              headers={REQUEST_ID: rid, "Connection": "close"})

    def _forwarded(self, request: web.Request, rid: str) -> dict[str, str]:
        """The headers a replica gets: the router's (Content-Type, the upstream key), the request id, and the
        client's OpenAI and tracing headers (`FORWARDED`); never the client's Authorization."""
        headers = {**self.upstream_headers, REQUEST_ID: rid}
        client = request.headers
        for name in FORWARDED:
            value = client.get(name)
            if value is not None:
                headers[name] = value
        return headers

    # -- one try -----------------------------------------------------------------------------------------------------
    def _headers(self, replica: Replica, target: Target, content_type: str, rid: str) -> dict[str, str]:
        return {"Content-Type": content_type, "X-Melange-Gpu": replica.gpu, "X-Melange-Bucket": target.lane.label,
                REQUEST_ID: rid}

    def _answer(self, status: int, data: bytes, content_type: str, replica: Replica, target: Target,
                rid: str) -> web.Response:
        """A replica's answer, a 4xx in OpenAI's shape (as it is when it already was)."""
        if status >= 400:
            wrapped = shaped(status, data)
            if wrapped is not None:
                data, content_type = wrapped, JSON
        return web.Response(body=data, status=status, headers=self._headers(replica, target, content_type, rid))

    async def _relay(self, request: web.Request, raw: bytes, headers: dict[str, str], target: Target,
                     replica: Replica, start: float) -> web.StreamResponse | Failure:
        session = self.router.session
        assert session is not None
        sent = time.perf_counter()
        try:
            async with session.post(replica.url + request.path, data=raw, headers=headers) as upstream:
                data = await upstream.read()
                status = upstream.status
                content_type = upstream.headers.get("Content-Type", JSON)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self.failures.connection(replica, exc)
        received = time.perf_counter()
        if status >= 500:
            return self.failures.answered_5xx(replica, status, data)
        self.answered(replica)
        response = self._answer(status, data, content_type, replica, target, headers[REQUEST_ID])
        self.router.later(self._answered, target, replica.gpu, status, data if status == 200 else None,
                          (sent - start) + (time.perf_counter() - received))
        return response

    def _answered(self, target: Target, gpu: str, status: int, data: bytes | None, added: float) -> None:
        """A relayed answer's bookkeeping: what its usage teaches, and the metrics. Called soon after (the loop's
        next pass), not inline: the answers a loop iteration has ready go out first instead of each waiting for the
        bookkeeping of those ahead of it (30 µs of the p50 at half load, measured). A request read after this answer
        went out sees the bookkeeping done: it runs in a later pass."""
        if data is not None:
            self._learn(target, _usage(data), None)
        self.metrics.request(target.lane.label, gpu, status)
        self.metrics.added_latency.observe(added)

    async def _relay_stream(self, request: web.Request, raw: bytes, headers: dict[str, str], target: Target,
                            replica: Replica, start: float) -> web.StreamResponse | Failure:
        session = self.router.session
        assert session is not None
        sent = time.perf_counter()
        out: web.StreamResponse | None = None
        tail: list[bytes] = []
        events = 0
        try:
            async with session.post(replica.url + request.path, data=raw, headers=headers) as upstream:
                if upstream.status != 200:
                    data = await upstream.read()
                    if upstream.status >= 500:
                        return self.failures.answered_5xx(replica, upstream.status, data)
                    self.answered(replica)
                    self.metrics.request(target.lane.label, replica.gpu, upstream.status)
                    return self._answer(upstream.status, data, upstream.headers.get("Content-Type", JSON), replica,
                                        target, headers[REQUEST_ID])
                content_type = upstream.headers.get("Content-Type", "text/event-stream")
                async for chunk in upstream.content.iter_any():
                    if out is None:
                        # The response starts with the first upstream chunk: until then a failure is retried.
                        out = web.StreamResponse(status=200, headers={
                            **self._headers(replica, target, content_type, headers[REQUEST_ID]),
                            "Cache-Control": "no-cache"})
                        try:
                            await out.prepare(request)
                        except ConnectionError:
                            return self._client_gone(target, replica, out)
                        self.router.later(self.metrics.added_latency.observe, sent - start)
                    try:
                        await out.write(chunk)
                    except ConnectionError:
                        return self._client_gone(target, replica, out)
                    tail.append(chunk)
                    if len(tail) > _TAIL_CHUNKS:
                        del tail[0]
                    events += chunk.count(b"\n\n")
        except (aiohttp.ClientError, TimeoutError) as exc:
            if out is None:
                return self.failures.connection(replica, exc)
            return await self._cut(target, replica, out, exc, tail)
        if out is None:
            return self.failures.connection(replica, None)
        self.answered(replica)
        with contextlib.suppress(ConnectionError):
            await out.write_eof()
        self.router.later(self._streamed, target, replica.gpu, tail, events)
        return out

    def _streamed(self, target: Target, gpu: str, tail: list[bytes], events: int) -> None:
        """A finished stream's bookkeeping (soon after, as `_answered`)."""
        self._learn(target, _stream_usage(b"".join(tail)), events)
        self.metrics.request(target.lane.label, gpu, 200)

    async def _cut(self, target: Target, replica: Replica, out: web.StreamResponse, exc: BaseException,
                   tail: list[bytes]) -> web.StreamResponse:
        """The upstream broke after the stream began: end it with an error event (never a second generation)."""
        event = self.failures.stream_error_event(self.failures.cut(replica, exc))
        separator = b"" if not tail or tail[-1].endswith(b"\n\n") else b"\n\n"
        with contextlib.suppress(ConnectionError):
            await out.write(separator + b"data: " + event + b"\n\ndata: [DONE]\n\n")
            await out.write_eof()
        self.metrics.request(target.lane.label, replica.gpu, "stream_error")
        return out

    def _client_gone(self, target: Target, replica: Replica, out: web.StreamResponse) -> web.StreamResponse:
        self.metrics.request(target.lane.label, replica.gpu, 499)
        return out  # leaving the upstream block closes the upstream connection: the replica stops generating

    def _learn(self, target: Target, usage: tuple[int, int] | None, events: int | None) -> None:
        """Count the request in the observed workload (reported sizes when the answer has usage) and correct the
        prompt estimate with the reported count."""
        observed = self.router.observed
        if usage is not None:
            prompt, completion = usage
            self.sizer.observe(target.kind, target.raw_input, prompt)
            self.metrics.prompt_tokens(target.kind, target.input_tokens, prompt)
            observed.record(prompt, completion, reported=True)
            return
        if events is not None:  # a stream without usage: about one token per event, less the framing events
            output = max(events - (2 if target.kind is Kind.CHAT else 1), 0)
        else:
            output = target.output_tokens or 0
        observed.record(target.input_tokens, output, reported=False)


def _usage(data: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of a JSON answer, if it reports them.

    Servers put `usage` last, so the answer's tail from its last `"usage"` key is parsed alone (`{` + the tail is a
    JSON object exactly when that key is at the top level; `"usage"` cannot occur inside a JSON string, whose quotes
    are escaped). Otherwise, the whole answer."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    try:
        usage = orjson.loads(b"{" + data[at:]).get("usage")
    except orjson.JSONDecodeError:
        try:
            usage = orjson.loads(data).get("usage")
        except (orjson.JSONDecodeError, AttributeError):
            return None
    return _usage_pair(usage)


def _stream_usage(tail: bytes) -> tuple[int, int] | None:
    """The usage of a stream, from its last events (present when the client asked for
    `stream_options.include_usage`, or the server always sends it)."""
    if b'"usage"' not in tail:
        return None
    for event in reversed(tail.split(b"\n\n")):
        event = event.strip()
        if not event.startswith(b"data:") or b'"usage"' not in event:
            continue
        try:
            usage = orjson.loads(event[5:].strip()).get("usage")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        found = _usage_pair(usage)
        if found is not None:
            return found
    return None


def _usage_pair(usage: Any) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int) and prompt >= 0 and completion >= 0:
        return prompt, completion
    return None
