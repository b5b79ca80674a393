"""The router's data path: one OpenAI-compatible endpoint on aiohttp (server and client), in front of the replicas.

A request is read whole (orjson), sized and given a replica by the routing policy (`policy.py`, which knows the
buckets and shares; this module knows neither), and relayed: a non-streaming answer whole, a stream chunk by chunk
as it arrives (`iter_any`, never buffered). One `ClientSession` per router, created on startup with a connection
pool sized for many concurrent streams; no access log.

Failures:
- A connection error or a 5xx before any byte went to the client: the request goes to another replica (another GPU
  type if needed), up to `retries` more times, each retry drawn from the retry budget (`outliers.RetryBudget`). A
  stream's response starts only with its first upstream chunk, so an upstream that fails before producing anything
  is retried too. A request answered 5xx by two replicas is not tried again (a "query of death": it counts against
  no replica). When every try failed, the client gets 502 (504 after a timeout) naming the last failure.
- After a stream began, the client has part of a generation: the stream ends with an error event, never a second
  generation.
- Which replica leaves the rotation, within which limits, and how it comes back: `outliers.OutlierDetector`; the
  probes (`GET /health`) run here.
- A client that disconnects cancels its handler (aiohttp's handler cancellation), which closes the upstream
  connection, so the replica stops generating.
- SIGTERM (or Ctrl-C): stop accepting, let in-flight requests finish up to `drain_s`, then exit.

Auth: with an API key, every route but `/health` needs `Authorization: Bearer KEY` (compared in constant time; the
key is never logged). Replicas get the upstream key as their Bearer token, never the client's header.

Membership (the admin API, on when the router has an admin token, `MELANGE_SKY_ADMIN_TOKEN`): `PUT /admin/routes`
validates a whole routes document and swaps it in at once (an invalid one is refused, the old routes keep serving);
`GET /admin/routes` shows it with the requests in flight per replica URL. Both need `Authorization: Bearer TOKEN`
with the admin token, never the clients' key; the token also opens /routes, /workload and /metrics (what the fleet's
controller reads), never generation. A replica a swap removes gets no new request and no retry; the requests it has
in flight finish (streams included) and are counted as `draining` until they do.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import os
import random
import signal
import ssl
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from melange_sky.deploy.membership import ADMIN_ROUTES_PATH, ADMIN_TOKEN_ENV, MAX_ROUTES_BYTES
from melange_sky.errors import MelangeError, ServeError
from melange_sky.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from melange_sky.serve.observed import ObservedWorkload
from melange_sky.serve.openai_errors import error_body, shaped, upstream_message
from melange_sky.serve.outliers import Ejection, OutlierDetector, OutlierSettings, RetryBudget
from melange_sky.serve.policy import NoReplica, NoRoutesPolicy, Policy, Replica, Rotation, SizeAwarePolicy, Target
from melange_sky.serve.routes import Routes, RoutesSource, parse_routes
from melange_sky.serve.settings import ServeSettings
from melange_sky.serve.tokens import Kind, Sizer

try:  # uvloop: a faster event loop; it comes with SkyPilot, and the router works without it
    import uvloop

    _LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
except ImportError:  # pragma: no cover - depends on the environment
    _LOOP_FACTORY = None

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
JSON = "application/json"
#: How much of a stream's end is kept to find its usage event (the last events before `data: [DONE]`).
_TAIL_CHUNKS = 2
#: A serving router collects young objects after this many more allocations than frees (CPython: 700). Requests in
#: flight hold more than 700 objects, so at the default every collection found them alive and pushed them into the
#: old generations, hundreds of times a second, and a full collection followed every second or so.
GC_YOUNG_THRESHOLD = 10_000
#: The request id: the client's, or one the router makes; the replica and the client get it.
REQUEST_ID = "X-Request-Id"
#: Client headers a replica gets as they are (OpenAI's account and beta headers, W3C trace context).
FORWARDED = ("OpenAI-Organization", "OpenAI-Project", "OpenAI-Beta", "traceparent", "tracestate")
#: The methods of each path the router serves (any other method on them gets 405).
ROUTES = {COMPLETIONS_PATH: ("POST",), CHAT_PATH: ("POST",), "/v1/models": ("GET",), "/health": ("GET",),
          "/metrics": ("GET",), "/routes": ("GET",), "/workload": ("GET",)}
NO_ROUTES = f"no routes yet: this router serves the routes pushed to PUT {ADMIN_ROUTES_PATH}, and none came yet"

__all__ = ["Router", "RouterServer", "run"]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _error(status: int, message: str, kind: str, code: str | int | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    body = error_body(message, kind, code if code is not None else status)
    return web.Response(body=body, status=status, headers={"Content-Type": JSON, **(headers or {})})


@dataclass
class _Failure:
    """An attempt that failed before any byte reached the client. `status` is the upstream's 5xx when it answered
    one (`reply`), else 0; `detail` says what happened, for the log and the client's error."""

    replica: Replica
    detail: str
    kind: str  # the upstream error kind (metrics): connect, disconnect, timeout, empty, status_5xx
    status: int = 0

    @property
    def reply(self) -> bool:
        return self.status > 0


#: Why the router stopped trying other replicas before it ran out of them or of --retries.
_POISON = ("; two replicas answered it with a 5xx, so the router tried no other (the request itself may be what "
           "fails; it counts against no replica)")
_BUDGET = "; the retry budget is spent (too many retries in flight at once), so the router tried no other"


class Router:
    """One router's state: routes and policy (swapped whole), replicas by name, the sizer, the observed workload,
    metrics, and the upstream session. The aiohttp handlers are its methods.

    `routes` None: no routes until the first `PUT /admin/routes` (`serve --pushed`); requests get 503 meanwhile.
    `clock` times the observed workload (tests pass their own)."""

    def __init__(self, routes: Routes | None, settings: ServeSettings = ServeSettings(), sizer: Sizer | None = None,
                 source: RoutesSource | None = None, log: Callable[[str], None] = _stderr,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.sizer = sizer or Sizer()
        self.source = source
        self.log = log
        self.rng = random.Random(settings.seed)
        self.metrics = Metrics(self._live_state)
        self.draining = False
        self.in_flight = 0
        self.session: aiohttp.ClientSession | None = None
        self._key = settings.api_key.encode() if settings.api_key else None
        self._admin = settings.admin_token.encode() if settings.admin_token else None
        self._admin_lock = asyncio.Lock()
        self.clock = clock
        self._max_body = int(settings.max_body_mb * 1024 * 1024)
        self._upstream_headers = {"Content-Type": JSON}
        if settings.upstream_api_key:
            self._upstream_headers["Authorization"] = f"Bearer {settings.upstream_api_key}"
        self._tasks: list[asyncio.Task[None]] = []
        self._later: Callable[..., object] = _call_soon  # the serving loop's call_soon, once started
        self._probing: set[str] = set()
        self._refresh_error: str | None = None
        self.replicas: dict[str, Replica] = {}
        self.retired: list[Replica] = []  # removed by a swap with requests still in flight (draining)
        self.generation = 0  # routes swapped in so far (each push, each refresh that changed them)
        self.routes: Routes | None = None
        self.policy: Policy = NoRoutesPolicy(NO_ROUTES)
        self.observed = ObservedWorkload((0, 1), (0, 1), settings.window_s, clock)  # replaced by the first routes
        self.rotation = Rotation()
        self.outliers = OutlierDetector(OutlierSettings(
            consecutive_5xx=settings.consecutive_5xx, consecutive_gateway_failure=settings.consecutive_gateway_failure,
            max_ejection_percent=settings.max_ejection_percent, base_s=settings.eject_base_s,
            max_s=settings.eject_max_s), self.rotation)
        self.budget = RetryBudget(settings.retry_budget_percent, settings.retry_budget_min)
        self._loaded: dict[str, Any] | None = None  # the source's last table, to tell its changes from pushes
        if routes is not None:
            self.swap(routes)
            if source is not None:
                self._loaded = routes.to_dict()

    # -- routes ------------------------------------------------------------------------------------------------------
    def swap(self, routes: Routes) -> list[str]:
        """Replace the routes at once. Replicas kept by name keep their state (in flight, ejection), and so does one
        re-added while it still drains; requests in flight finish on the replicas they hold, removed or not, and a
        removed replica gets nothing new (retries included). Returns what changed, one line each."""
        draining = {(r.name, r.url, r.gpu): r for r in self.retired}
        replicas, changes = [], []
        for spec in routes.replicas:
            old = self.replicas.get(spec.name)
            if old is not None and (old.url, old.gpu) == (spec.url, spec.gpu):
                replicas.append(old)
                continue
            old = draining.get((spec.name, spec.url, spec.gpu))
            replicas.append(old if old is not None else Replica(spec.name, spec.gpu, spec.url))
            changes.append(f"+ {spec.name} ({spec.gpu}) {spec.url}")
        kept = {id(r) for r in replicas}
        removed = [r for r in self.replicas.values() if id(r) not in kept]
        changes.extend(f"- {r.name} ({r.gpu}) {r.url}" + (f", draining {r.in_flight} request(s) in flight"
                                                          if r.in_flight else "") for r in removed)
        previous = self.routes
        self.policy = SizeAwarePolicy(routes, replicas, self.sizer, self.rng, self.settings.panic_percent,
                                      self.rotation)
        self.replicas = {r.name: r for r in replicas}
        self.outliers.track(replicas)
        self.retired = [r for r in (*self.retired, *removed) if id(r) not in kept and r.in_flight > 0]
        if previous is None or (previous.input_edges, previous.output_edges) != (routes.input_edges,
                                                                                routes.output_edges):
            self.observed = ObservedWorkload(routes.input_edges, routes.output_edges, self.settings.window_s,
                                             self.clock)
        if previous is not None and previous.to_dict() | {"replicas": []} != routes.to_dict() | {"replicas": []}:
            changes.append("routing table changed")
        self.routes = routes
        self.generation += 1
        return changes

    def draining_in_flight(self) -> dict[str, int]:
        """Requests in flight per URL of the replicas the routes no longer have (0 everywhere: the drain is done)."""
        self.retired = [r for r in self.retired if r.in_flight > 0]
        return _by_url(self.retired)

    def in_flight_by_url(self) -> dict[str, int]:
        """Requests in flight per replica URL, routed or draining."""
        return _by_url([*self.replicas.values(), *self.retired])

    async def refresh(self) -> list[str]:
        """Re-read the routes from the source (the ledger, in a thread) and swap them in if they changed."""
        if self.source is None:
            return []
        try:
            routes = await asyncio.to_thread(self.source.load)
        except MelangeError as exc:
            if str(exc) != self._refresh_error:
                self.log(f"Warning: cannot refresh {self.source.description}: {exc}; keeping the current routes")
            self._refresh_error = str(exc)
            return []
        self._refresh_error = None
        loaded = routes.to_dict()
        if loaded == self._loaded:  # the source did not change: keep what is served (it may have been pushed)
            return []
        self._loaded = loaded
        changes = self.swap(routes)
        for line in changes:
            self.log(f"{self.source.description}: {line}")
        return changes

    def _live_state(self) -> dict[str, Any]:
        return {"replicas": list(self.replicas.values()), "corrections": dict(self.sizer.corrections),
                "draining": self.draining, "generation": self.generation,
                "retired_in_flight": sum(r.in_flight for r in self.retired), "retries_in_flight": self.budget.active}

    # -- the application ---------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body)
        app.router.add_post(COMPLETIONS_PATH, self.completions)
        app.router.add_post(CHAT_PATH, self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/routes", self.routes_doc)
        app.router.add_get("/workload", self.workload)
        app.router.add_put(ADMIN_ROUTES_PATH, self.admin_put_routes)
        app.router.add_get(ADMIN_ROUTES_PATH, self.admin_get_routes)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _app: web.Application) -> None:
        self._later = asyncio.get_running_loop().call_soon
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=4.0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s,
                                        sock_read=self.settings.read_timeout_s)
        # keepalive 4 s: below uvicorn's 5 s (vLLM), so the router never reuses a connection the replica just closed
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                             skip_auto_headers=("User-Agent", "Accept-Encoding"))
        self._tasks.append(asyncio.create_task(self._probe_loop()))
        if self.source is not None and self.source.refreshing:
            self._tasks.append(asyncio.create_task(self._refresh_loop()))

    async def _cleanup(self, _app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.session is not None:
            await self.session.close()

    def _denied(self, request: web.Request) -> web.Response | None:
        if self._key is None:
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._key):
            return None
        return _error(401, "invalid or missing API key: send it as 'Authorization: Bearer KEY'",
                      "invalid_request_error", "invalid_api_key")

    def _denied_read(self, request: web.Request) -> web.Response | None:
        """The operator's endpoints (/routes, /workload, /metrics): the API key, or the admin token."""
        if self._key is None or (self._admin is not None and self._admin_denied(request) is None):
            return None
        return self._denied(request)

    def _admin_denied(self, request: web.Request) -> web.Response | None:
        if self._admin is None:
            return _error(404, f"no admin API: this router was started without {ADMIN_TOKEN_ENV}",
                          "invalid_request_error")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._admin):
            return None
        return _error(401, "invalid or missing admin token: send the fleet's admin token as "
                           "'Authorization: Bearer TOKEN'", "invalid_request_error", "invalid_admin_token")

    # -- generation --------------------------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Kind.COMPLETIONS)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Kind.CHAT)

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        start = time.perf_counter()
        rid = request.headers.get(REQUEST_ID) or os.urandom(12).hex()
        denied = self._denied(request)
        if denied is not None:
            denied.headers[REQUEST_ID] = rid
            return denied
        if self.draining:
            return _error(503, "the router is shutting down", "service_unavailable", "shutting_down",
                          headers={"Connection": "close", REQUEST_ID: rid})
        if request.content_length is not None and request.content_length > self._max_body:
            return self._too_large(rid)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(rid)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "the request body is not valid JSON", "invalid_request_error", "invalid_json",
                          headers={REQUEST_ID: rid})
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object", "invalid_request_error", "invalid_json",
                          headers={REQUEST_ID: rid})
        try:
            return await self._route(request, kind, start, rid, raw, body)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: the client still gets an error it reads, the log a traceback
            self.log(f"internal error on {request.method} {request.path} ({REQUEST_ID} {rid}): "
                     f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            return _error(500, f"internal error in the router ({type(exc).__name__}); {REQUEST_ID} {rid}",
                          "server_error", "internal_error", headers={REQUEST_ID: rid})

    def _too_large(self, rid: str) -> web.Response:
        return _error(413, f"the request body is larger than the router's limit of {self.settings.max_body_mb:g} "
                           f"MiB (serve --max-body-mb)", "invalid_request_error", "request_too_large",
                      headers={REQUEST_ID: rid, "Connection": "close"})

    def _forwarded(self, request: web.Request, rid: str) -> dict[str, str]:
        """The headers a replica gets: the router's (Content-Type, the upstream key), the request id, and the
        client's OpenAI and tracing headers (`FORWARDED`); never the client's Authorization."""
        headers = {**self._upstream_headers, REQUEST_ID: rid}
        client = request.headers
        for name in FORWARDED:
            value = client.get(name)
            if value is not None:
                headers[name] = value
        return headers

    async def _route(self, request: web.Request, kind: Kind, start: float, rid: str, raw: bytes,
                     body: dict[str, Any]) -> web.StreamResponse:
        upstream_headers = self._forwarded(request, rid)
        policy, observed = self.policy, self.observed
        target = policy.target(body, kind)
        self._later(observed.arrival)
        tried: list[Replica] = []
        failure: _Failure | None = None
        answered_5xx: list[_Failure] = []  # this request's 5xx answers, judged once another replica answers it
        why = ""
        retrying = 0
        gpu = "none"
        self.in_flight += 1
        try:
            for attempt in range(self.settings.retries + 1):
                if self.policy is not policy:  # routes swapped while it was out: retry along the new ones only
                    policy = self.policy
                    target = policy.target(body, kind)
                try:
                    choice = policy.choose(target, tried)
                except NoReplica as exc:
                    if failure is not None:
                        break
                    self.metrics.request(target.lane.label, "none", 503)
                    return _error(503, exc.reason, "service_unavailable", "no_replica", headers={REQUEST_ID: rid})
                replica = choice.replica
                if attempt:
                    if not self.budget.acquire(self.in_flight):
                        self.metrics.budget_exhausted()
                        why = _BUDGET
                        break
                    retrying += 1
                    self.metrics.retry(tried[-1].gpu)
                if choice.spilled:
                    self.metrics.spill(target.lane.label, replica.gpu)
                if choice.panic:
                    self.metrics.panic(target.lane.label)
                tried.append(replica)
                gpu = replica.gpu
                replica.in_flight += 1
                replica.served += 1
                try:
                    if target.stream:
                        outcome = await self._relay_stream(request, raw, upstream_headers, target, replica, start)
                    else:
                        outcome = await self._relay(request, raw, upstream_headers, target, replica, start)
                finally:
                    replica.in_flight -= 1
                if not isinstance(outcome, _Failure):
                    for earlier in answered_5xx:  # another replica answered what these failed: they are at fault
                        self._record(self.outliers.confirmed_5xx(earlier.replica, earlier.detail,
                                                                          time.monotonic()))
                    return outcome
                failure = outcome
                if failure.reply:
                    answered_5xx.append(failure)
                    if len(answered_5xx) >= 2:  # a "query of death": the request's fault, not the replicas'
                        self.metrics.poison(target.lane.label)
                        why = _POISON
                        break
            assert failure is not None
            answer = self._gave_up(failure, len(tried), why, rid)
            self.metrics.request(target.lane.label, gpu, answer.status)
            return answer
        except asyncio.CancelledError:  # the client went away (or the drain deadline passed)
            self.metrics.request(target.lane.label, gpu, 499)
            raise
        finally:
            self.in_flight -= 1
            for _ in range(retrying):
                self.budget.release()

    def _gave_up(self, failure: _Failure, tries: int, why: str, rid: str) -> web.Response:
        """Every try failed: 502 (504 when the last one timed out), naming the last failure."""
        status = 504 if failure.kind == "timeout" else 502
        message = (f"no replica could serve this request ({tries} tr{'y' if tries == 1 else 'ies'}); the last: "
                   f"{failure.detail}{why}")
        return _error(status, message, "upstream_error" if status == 502 else "timeout_error",
                      "upstream_failed" if status == 502 else "upstream_timeout", headers={REQUEST_ID: rid})

    def _headers(self, replica: Replica, target: Target, content_type: str, rid: str) -> dict[str, str]:
        return {"Content-Type": content_type, "X-Melange-Gpu": replica.gpu, "X-Melange-Bucket": target.lane.label,
                REQUEST_ID: rid}

    def _relayed_error(self, status: int, data: bytes, content_type: str, replica: Replica, target: Target,
                       rid: str) -> web.Response:
        """An upstream's 4xx, in OpenAI's shape (as it is when it already was)."""
        wrapped = shaped(status, data)
        if wrapped is not None:
            data, content_type = wrapped, JSON
        return web.Response(body=data, status=status, headers=self._headers(replica, target, content_type, rid))

    async def _relay(self, request: web.Request, raw: bytes, headers: dict[str, str], target: Target,
                     replica: Replica, start: float) -> web.StreamResponse | _Failure:
        assert self.session is not None
        sent = time.perf_counter()
        try:
            async with self.session.post(replica.url + request.path, data=raw, headers=headers) as upstream:
                data = await upstream.read()
                status = upstream.status
                content_type = upstream.headers.get("Content-Type", JSON)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._failed(replica, exc)
        received = time.perf_counter()
        if status >= 500:
            return self._failed_status(replica, status, data)
        self.outliers.answered(replica)
        rid = headers[REQUEST_ID]
        if status >= 400:
            response = self._relayed_error(status, data, content_type, replica, target, rid)
        else:
            response = web.Response(body=data, status=status,
                                    headers=self._headers(replica, target, content_type, rid))
        self._later(self._answered, target, replica.gpu, status, data if status == 200 else None,
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
                            replica: Replica, start: float) -> web.StreamResponse | _Failure:
        assert self.session is not None
        sent = time.perf_counter()
        out: web.StreamResponse | None = None
        tail: list[bytes] = []
        events = 0
        try:
            async with self.session.post(replica.url + request.path, data=raw, headers=headers) as upstream:
                if upstream.status != 200:
                    data = await upstream.read()
                    content_type = upstream.headers.get("Content-Type", JSON)
                    if upstream.status >= 500:
                        return self._failed_status(replica, upstream.status, data)
                    self.outliers.answered(replica)
                    self.metrics.request(target.lane.label, replica.gpu, upstream.status)
                    if upstream.status >= 400:
                        return self._relayed_error(upstream.status, data, content_type, replica, target,
                                                   headers[REQUEST_ID])
                    return web.Response(body=data, status=upstream.status,
                                        headers=self._headers(replica, target, content_type, headers[REQUEST_ID]))
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
                        self._later(self.metrics.added_latency.observe, sent - start)
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
                return self._failed(replica, exc)
            return await self._cut(target, replica, out, exc, tail)
        if out is None:
            return self._failed(replica, None)
        self.outliers.answered(replica)
        with contextlib.suppress(ConnectionError):
            await out.write_eof()
        self._later(self._streamed, target, replica.gpu, tail, events)
        return out

    def _streamed(self, target: Target, gpu: str, tail: list[bytes], events: int) -> None:
        """A finished stream's bookkeeping (soon after, as `_answered`)."""
        self._learn(target, _stream_usage(b"".join(tail)), events)
        self.metrics.request(target.lane.label, gpu, 200)

    async def _cut(self, target: Target, replica: Replica, out: web.StreamResponse, exc: BaseException,
                   tail: list[bytes]) -> web.StreamResponse:
        """The upstream broke after the stream began: end it with an error event (never a second generation)."""
        reason = _describe(exc)
        self.metrics.upstream_error(replica.name, replica.gpu, "stream_cut")
        self._record(self.outliers.gateway_failure(replica, reason, time.monotonic()))
        event = orjson.dumps({"error": {"message": f"the replica serving this stream failed: {reason}",
                                        "type": "server_error", "param": None, "code": 502}})
        separator = b"" if not tail or tail[-1].endswith(b"\n\n") else b"\n\n"
        with contextlib.suppress(ConnectionError):
            await out.write(separator + b"data: " + event + b"\n\ndata: [DONE]\n\n")
            await out.write_eof()
        self.metrics.request(target.lane.label, replica.gpu, "stream_error")
        return out

    def _client_gone(self, target: Target, replica: Replica, out: web.StreamResponse) -> web.StreamResponse:
        self.metrics.request(target.lane.label, replica.gpu, 499)
        return out  # leaving the upstream block closes the upstream connection: the replica stops generating

    def _failed(self, replica: Replica, exc: BaseException | None) -> _Failure:
        """A connection-level failure: counted against the replica at once (down when it cannot be reached)."""
        if exc is None:
            reason, kind = "the stream ended before any data", "empty"
        else:
            reason, kind = _describe(exc), _error_kind(exc)
        self.metrics.upstream_error(replica.name, replica.gpu, kind)
        now = time.monotonic()
        if kind == "connect":  # refused, unreachable, unknown host, or no connection within the connect timeout
            ejection = self.outliers.unreachable(replica, reason, now)
        else:
            ejection = self.outliers.gateway_failure(replica, reason, now)
        self._record(ejection)
        return _Failure(replica, f"replica {replica.name} ({replica.gpu}) failed: {reason}", kind)

    def _failed_status(self, replica: Replica, status: int, data: bytes) -> _Failure:
        """A 5xx answer: judged later, by what the request gets from another replica (`_generate`)."""
        self.metrics.upstream_error(replica.name, replica.gpu, "status_5xx")
        return _Failure(replica, f"replica {replica.name} ({replica.gpu}) answered HTTP {status}: "
                                 f"{upstream_message(data)}", "status_5xx", status)

    def _record(self, ejection: Ejection | None) -> None:
        """Log and count an ejection the outlier detector made."""
        if ejection is None:
            return
        replica = ejection.replica
        self.metrics.ejection(replica.gpu, ejection.reason)
        self.log(f"ejected {replica.name} ({replica.gpu}, {replica.url}): {ejection.detail} [{ejection.reason}]; "
                 f"probing /health in {ejection.probe_in_s:.3g} s")

    def _learn(self, target: Target, usage: tuple[int, int] | None, events: int | None) -> None:
        """Count the request in the observed workload (reported sizes when the answer has usage) and correct the
        prompt estimate with the reported count."""
        if usage is not None:
            prompt, completion = usage
            self.sizer.observe(target.kind, target.raw_input, prompt)
            self.metrics.prompt_tokens(target.kind, target.input_tokens, prompt)
            self.observed.record(prompt, completion, reported=True)
            return
        if events is not None:  # a stream without usage: about one token per event, less the framing events
            output = max(events - (2 if target.kind is Kind.CHAT else 1), 0)
        else:
            output = target.output_tokens or 0
        self.observed.record(target.input_tokens, output, reported=False)

    # -- the other endpoints -----------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied(request)
        if denied is not None:
            return denied
        live = [r for r in self.replicas.values() if not r.ejected]
        answers = await asyncio.gather(*(self._get_json(r, "/v1/models") for r in live), return_exceptions=True)
        models: dict[str, Any] = {}
        answered = 0
        for answer in answers:
            if isinstance(answer, dict):
                answered += 1
                for model in answer.get("data") or []:
                    if isinstance(model, dict) and isinstance(model.get("id"), str):
                        models.setdefault(model["id"], model)
        if not answered:
            return _error(503, f"no replica answered /v1/models ({len(live)} available of {len(self.replicas)})",
                          "service_unavailable")
        return web.Response(body=orjson.dumps({"object": "list", "data": list(models.values())}),
                            headers={"Content-Type": JSON})

    async def _get_json(self, replica: Replica, path: str) -> Any:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=self.settings.probe_timeout_s)
        async with self.session.get(replica.url + path, headers=self._upstream_headers, timeout=timeout) as answer:
            if answer.status != 200:
                raise aiohttp.ClientResponseError(answer.request_info, (), status=answer.status)
            return orjson.loads(await answer.read())

    def health_doc(self) -> tuple[int, dict[str, Any]]:
        gpus: dict[str, dict[str, int]] = {}
        if self.routes is None:
            return 503, {"status": "no_routes", "replicas": 0, "available": 0, "ejected": 0,
                         "in_flight": self.in_flight, "gpus": gpus, "reason": NO_ROUTES}
        for gpu in self.routes.gpus:
            mine = [r for r in self.replicas.values() if r.gpu == gpu.name]
            gpus[gpu.name] = {"planned": gpu.planned, "replicas": len(mine),
                              "available": sum(not r.ejected for r in mine)}
        available = sum(not r.ejected for r in self.replicas.values())
        status = "draining" if self.draining else "ok" if available else "unavailable"
        return (200 if status == "ok" else 503), {
            "status": status, "replicas": len(self.replicas), "available": available,
            "ejected": len(self.replicas) - available, "in_flight": self.in_flight, "gpus": gpus}

    async def health(self, _request: web.Request) -> web.StreamResponse:
        code, doc = self.health_doc()
        return web.Response(body=orjson.dumps(doc), status=code, headers={"Content-Type": JSON})

    async def metrics_text(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied_read(request)
        if denied is not None:
            return denied
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def routes_view(self) -> dict[str, Any]:
        assert self.routes is not None
        now = time.monotonic()
        doc = self.routes.to_dict()
        doc["replicas"] = [r.to_dict(now) for r in self.replicas.values()]
        doc.update(policy="size", draining=self.draining, in_flight=self.in_flight,
                   prompt_token_correction={str(k): round(v, 4) for k, v in self.sizer.corrections.items()},
                   warnings=list(self.routes.warnings))
        return doc

    async def routes_doc(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied_read(request)
        if denied is not None:
            return denied
        if self.routes is None:
            return _error(503, NO_ROUTES, "service_unavailable")
        return web.Response(body=orjson.dumps(self.routes_view()), headers={"Content-Type": JSON})

    async def workload(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied_read(request)
        if denied is not None:
            return denied
        if self.routes is None:
            return _error(503, NO_ROUTES, "service_unavailable")
        doc = {**self.observed.to_dict(), "source": self.routes.source}
        return web.Response(body=orjson.dumps(doc), headers={"Content-Type": JSON})

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        """404 for a path the router does not serve; 405 (with Allow) for a method a path it serves does not take."""
        allowed = ROUTES.get(request.path) or (("GET", "PUT") if request.path == ADMIN_ROUTES_PATH and self._admin
                                               else None)
        if allowed is not None:
            return _error(405, f"{request.method} is not allowed on {request.path}: use {' or '.join(allowed)}",
                          "invalid_request_error", "method_not_allowed", headers={"Allow": ", ".join(allowed)})
        return _error(404, f"no route {request.method} {request.path}: this router serves POST {COMPLETIONS_PATH}, "
                           f"POST {CHAT_PATH}, GET /v1/models, /health, /metrics, /routes, /workload"
                           + (f"; GET and PUT {ADMIN_ROUTES_PATH} with the admin token" if self._admin else ""),
                      "invalid_request_error", "not_found")

    # -- the admin API -----------------------------------------------------------------------------------------------
    async def admin_put_routes(self, request: web.Request) -> web.StreamResponse:
        """Swap in a pushed routes document, or refuse it (400, one line) and keep serving the old one."""
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        async with self._admin_lock:  # one push at a time: generations follow the order pushes are taken in
            raw = await _read_limited(request, MAX_ROUTES_BYTES)
            if raw is None:
                return self._refused(f"the routes document is larger than {MAX_ROUTES_BYTES} bytes")
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                return self._refused(f"the routes document is not valid JSON ({exc})")
            try:  # a big table takes milliseconds to check: off the loop, which keeps relaying meanwhile
                routes = await asyncio.to_thread(parse_routes, doc, f"PUT {ADMIN_ROUTES_PATH}")
            except ServeError as exc:
                return self._refused(str(exc))
            changes = self.swap(routes)
            for line in changes:
                self.log(f"routes pushed (generation {self.generation}): {line}")
            answer = {"accepted": True, "replicas": len(self.replicas), "generation": self.generation,
                      "draining": self.draining_in_flight(), "changes": changes}
        return web.Response(body=orjson.dumps(answer), headers={"Content-Type": JSON})

    def _refused(self, reason: str) -> web.Response:
        line = " ".join(reason.split())
        self.log(f"refused a routes push: {line}; still serving generation {self.generation}")
        return _error(400, line, "invalid_request_error", "invalid_routes")

    async def admin_get_routes(self, request: web.Request) -> web.StreamResponse:
        """The routes served now, their generation, and the requests in flight per replica URL (draining: the
        URLs the routes no longer have)."""
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        doc = {"routes": None if self.routes is None else self.routes.to_dict(), "generation": self.generation,
               "inflight": self.in_flight_by_url(), "draining": self.draining_in_flight()}
        return web.Response(body=orjson.dumps(doc), headers={"Content-Type": JSON})

    # -- background work ---------------------------------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            now = time.monotonic()
            for replica in list(self.replicas.values()):
                if replica.ejected and replica.retry_at <= now and replica.name not in self._probing:
                    self._probing.add(replica.name)
                    self._tasks.append(asyncio.create_task(self._probe(replica)))
            self._tasks = [t for t in self._tasks if not t.done()]

    async def _probe(self, replica: Replica) -> None:
        assert self.session is not None
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.probe_timeout_s)
            async with self.session.get(replica.url + "/health", headers=self._upstream_headers,
                                        timeout=timeout) as answer:
                ok, reason = answer.status == 200, f"GET /health: HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, reason = False, f"GET /health: {_describe(exc)}"
        finally:
            self._probing.discard(replica.name)
        if self.outliers.probed(replica, ok, reason, time.monotonic()):
            self.log(f"re-admitted {replica.name} ({replica.gpu}): /health answered 200")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_s)
            await self.refresh()


def _by_url(replicas: list[Replica]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for replica in replicas:
        if replica.in_flight:
            counts[replica.url] = counts.get(replica.url, 0) + replica.in_flight
    return counts


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The request's body, or None when it is longer than `limit` bytes (read no further)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


def _call_soon(callback: Callable[..., object], *args: Any) -> None:
    asyncio.get_running_loop().call_soon(callback, *args)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        return f"cannot connect: {os.strerror(error.errno) if error.errno else error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "cannot connect: no connection within the connect timeout"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return "connect"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "disconnect"


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


class RouterServer:
    """A router listening on host:port (port 0: any free port), over HTTPS with `ssl_context`; `start` returns its
    base URL, `stop` drains."""

    def __init__(self, router: Router, host: str = "127.0.0.1", port: int = 8080,
                 ssl_context: ssl.SSLContext | None = None):
        self.router, self.host, self.port, self.ssl_context = router, host, port, ssl_context
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        self.runner = web.AppRunner(self.router.app(), access_log=None, handler_cancellation=True,
                                    shutdown_timeout=self.router.settings.drain_s)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, backlog=2048, reuse_address=True,
                           ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise ServeError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        sockets = [s for s in self.runner.addresses if s]
        port = sockets[0][1] if sockets else self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{'https' if self.ssl_context else 'http'}://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the drain deadline), close everything."""
        self.router.draining = True
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def run(router: Router, on_listening: Callable[[str], None] = _stderr,
        ssl_context: ssl.SSLContext | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C, then drain (HTTPS with `ssl_context`). Blocks; returns the exit code (0 after
    SIGTERM, 130 after Ctrl-C). Uses uvloop when it is installed."""
    with asyncio.Runner(loop_factory=_LOOP_FACTORY) as runner:
        return runner.run(_serve(router, on_listening, ssl_context))


def _tune_gc() -> None:
    """Once the router listens: what the process holds by then (imports, the solve, the routes) goes to the
    permanent generation, which full collections skip (they took 20 ms, a stall of every request in flight; now
    about 1 ms), and young collections run far less often (GC_YOUNG_THRESHOLD). A few % of a core, and the p99."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(gc.get_threshold()[0], GC_YOUNG_THRESHOLD), *gc.get_threshold()[1:])


async def _serve(router: Router, on_listening: Callable[[str], None], ssl_context: ssl.SSLContext | None) -> int:
    server = RouterServer(router, router.settings.host, router.settings.port, ssl_context)
    await server.start()
    _tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def signalled(signum: int) -> None:
        received.append(signum)
        stop.set()
        if len(received) > 1 and drain is not None:  # a second signal: stop waiting for requests in flight
            drain.cancel()

    drain: asyncio.Task[None] | None = None
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signalled, signum)
    on_listening(server.url)  # only now: a SIGTERM right after the line drains instead of killing the router
    try:
        await stop.wait()
        router.log(f"{signal.Signals(received[0]).name}: draining {router.in_flight} request(s) in flight "
                   f"(up to {router.settings.drain_s:g} s; again to stop now)")
        drain = asyncio.create_task(server.stop())
        with contextlib.suppress(asyncio.CancelledError):
            await drain
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    router.log("stopped")
    return 130 if received[0] == signal.SIGINT else 0
