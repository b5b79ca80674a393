"""`melange-sky emulate`: the engine model behind an OpenAI-compatible server, in real time.

One `Emulator` per server drives one `Engine` on the wall clock. The engine's clock (step durations and idle gaps)
is mapped onto time.monotonic once: a step ends at `origin + engine.clock`, an absolute deadline, so a late wake-up
never delays the steps after it; while the engine idles, its clock catches up with the wall clock at the next
arrival (`engine.idle`). A request enters the engine when it arrives (`engine.add(..., at=its arrival)`): through
the model of vLLM's API server (a few ms), then WAITING, so it joins the batch at the next step boundary after that.
The loop runs a step (`engine.step()`), sleeps until the step's end and then hands each emitting request its one
token (the emitters rule of ENGINE_API.md). The event loop's timers are late by up to a millisecond (epoll and libuv
count in ms), so the loop sleeps until `SPIN_S` before the deadline and then yields to the other tasks until it is
reached (`_sleep_until`): the steps' emission times follow the model's to tens of microseconds on an idle core.

`estimate` drives the same `Engine` on a virtual clock: the emulator is that model with a real clock, not another.

Data parallelism (`--data-parallel-size N`, vLLM's flag; what templates/vllm.j2 renders for an instance of N x TP
GPUs): N engines behind one server, each its own `Emulator` on its own clock (`DataParallel`). vLLM's front end
picks an engine per request (vllm/v1/engine/core_client.py, `DPLBAsyncMPClient.get_core_engine_for_request`): the
lowest `4 x waiting + running` over the engines, scanning from its own start index, with the counts its DP
coordinator publishes every 100 ms and the chosen engine's waiting count raised at once between two updates. Here
the counts are exact at every choice (the limit of that scheme; a request still in the API server counts as
waiting, as vLLM's local raise counts it), and the scan starts one engine further at each request: vLLM runs one API
server per engine by default (`api_server_count` = the DP size, vllm/entrypoints/cli/serve.py), the kernel spreads
connections over them, and each scans from its own index, so ties do not all fall on engine 0. Each engine keeps its
own model of an API server (one per engine, as vLLM's default). /metrics has one series per engine (label
`engine`, as vLLM's PrometheusStatLogger): sum over it for the server's totals.

The server (aiohttp) looks like vLLM's OpenAI server to a client, the router and the profiler: POST
/v1/completions and /v1/chat/completions (streamed or not, `usage`, `stream_options.include_usage`), GET
/v1/models, /health and /metrics (vLLM's gauge names). With an API key, /v1/* needs `Authorization: Bearer KEY`
(401 otherwise; /health and /metrics stay open, as in vLLM). A client that goes away aborts its request in the
engine (aiohttp cancels the handler), which frees its KV blocks at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import itertools
import signal
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from melange_sky.core.config import read_config_document
from melange_sky.engine.emulator_openai import (DONE, EMULATOR_HEADER, Answer, ApiError, Kind, emulator_header_value,
                                                error_body, parse_generation)
from melange_sky.engine.engine import Engine, Step
from melange_sky.engine.models import load_model
from melange_sky.engine.settings import EngineSettings
from melange_sky.errors import MelangeError

try:  # uvloop: a faster event loop (the router's dependency); the emulator works without it
    import uvloop

    _LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
except ImportError:  # pragma: no cover - depends on the environment
    _LOOP_FACTORY = None

#: The loop sleeps on a timer until this long before a step's end, then yields until the end is reached: timers
#: fire up to ~1 ms late. At most `SPIN_SHARE` of the step, so a fast --speed does not keep a core busy.
SPIN_S = 0.0015
SPIN_SHARE = 0.25
JSON = "application/json"
EVENT_STREAM = "text/event-stream; charset=utf-8"
#: Young-generation GC threshold once serving (as the router does: requests in flight hold many objects).
_GC_YOUNG_THRESHOLD = 10_000

def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["DataParallel", "EmulateError", "Emulated", "Emulator", "EmulatorServer", "EmulatorSettings", "Serving",
           "StepRecord", "prepare", "run"]


class EmulateError(MelangeError):
    """The emulator cannot serve as asked (the port is taken)."""

    exit_code = 2


@dataclass(frozen=True)
class StepRecord:
    """One step as the emulator ran it: its scheduled end (time.monotonic, seconds), the model's duration and how many
    requests emitted a token at its end (the bench compares clients' inter-token gaps with these)."""

    end: float
    duration_s: float
    emitters: int


class _Request:
    """A request in the emulator: how many tokens the engine has emitted for it and who takes them.

    A handler either waits (`wait`) to be woken at each token (`each`) or at the end, or sets `push`, which the
    engine loop calls with each token's index and whether it is the last, right at the step's end: a stream then
    costs one socket write per token and no task switch (hundreds of streams share one core)."""

    __slots__ = ("rid", "prompt_tokens", "max_tokens", "emitted", "done", "failed", "each", "waiter", "push", "rank")

    def __init__(self, rid: int, prompt_tokens: int, max_tokens: int, each: bool):
        self.rid, self.prompt_tokens, self.max_tokens = rid, prompt_tokens, max_tokens
        self.emitted = 0
        self.done = False
        self.failed = False  # the engine loop died before the request finished
        self.each = each  # wake the handler at every token (until it sets `push`), else only at the end
        self.waiter: asyncio.Future[None] | None = None
        self.push: Callable[[int, bool], None] | None = None
        self.rank = 0  # the data-parallel engine serving it (`DataParallel`)

    async def wait(self, seen: int) -> None:
        """Until a token after the first `seen` came out (when woken at each token) or the request is done."""
        while not self.done and (self.emitted <= seen or not self.each):
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Emulator:
    """The real-time clock around one engine (see the module docstring). Create it, then `start()` inside the
    event loop that serves; `submit` and `abort` come from the request handlers of that loop."""

    def __init__(self, engine: Engine, *, spin_s: float = SPIN_S, record_steps: bool = False,
                 log: Callable[[str], None] = _stderr):
        self.engine = engine
        self.log = log
        self.dead: str | None = None  # why the engine loop stopped, if it failed (every request then gets a 500)
        self.spin_s = spin_s
        self.steps: list[StepRecord] | None = [] if record_steps else None
        self._requests: dict[Hashable, _Request] = {}
        self._decoding: set[Hashable] = set()
        self._ids: Iterator[int] = itertools.count()
        self._origin = time.monotonic() - engine.clock  # the wall time of the engine clock's 0 (time.monotonic)
        self._idle: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._finishing = 0  # requests the engine finished in the step now sleeping, not yet emitted
        # vLLM's counters (GET /metrics)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished_total = 0
        self.preemptions_total = 0
        self.aborted_total = 0

    # -- the handlers' side ------------------------------------------------------------------------------------------
    def submit(self, prompt_tokens: int, max_tokens: int, *, stream: bool, endpoint: str | None = None) -> _Request:
        """A new request: it waits in the engine's queue until the next step boundary schedules it. `endpoint`
        ("chat" or "completions"): the OpenAI endpoint it came to, which sets its cost in the model of vLLM's API
        server (a chat request costs more: `Coefficients.for_endpoint`), as `estimate` charges per endpoint."""
        if self.dead is not None:
            raise ApiError(500, self.dead, "InternalServerError")
        req = _Request(next(self._ids), prompt_tokens, max_tokens, stream)
        arrived = time.monotonic() - self._origin  # on the engine clock
        if not self.engine.has_work:  # it was idle meanwhile: its clock catches up with the wall clock
            self.engine.idle(arrived - self.engine.clock)
        # mid-step arrivals keep their time
        self.engine.add(req.rid, prompt_tokens, max_tokens, at=arrived, endpoint=endpoint)
        self._requests[req.rid] = req
        self.prompt_tokens_total += prompt_tokens
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        return req

    def abort(self, req: _Request) -> None:
        """The client went away: the engine frees the request's blocks and it emits nothing more."""
        if req.done or self._requests.pop(req.rid, None) is None:
            return
        self._decoding.discard(req.rid)
        self.engine.abort(req.rid)
        self.aborted_total += 1

    @property
    def in_flight(self) -> int:
        """Requests submitted and neither finished nor aborted."""
        return len(self._requests)

    @property
    def ranks(self) -> tuple[Emulator, ...]:
        """The engines behind the server: this one."""
        return (self,)

    def load(self) -> tuple[int, int]:
        """(waiting, running) as vLLM's DP coordinator publishes them for an engine: waiting counts the requests
        still in the API server, running those in the batch (`DataParallel` balances by them)."""
        running = self.engine.running
        return max(0, len(self._requests) - running - self._finishing), running

    # -- the clock ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine loop in the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._guarded(), name="emulator-engine")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _guarded(self) -> None:
        """The engine loop; if it fails (a bug), the requests in flight end with an error and new ones get 500,
        as vLLM answers once its engine is dead, instead of hanging."""
        try:
            await self._run()
        except Exception as exc:  # noqa: BLE001 - any failure of the loop must reach the clients
            self.dead = f"the engine loop failed: {type(exc).__name__}: {exc}"
            self.log(f"Error: {self.dead}")
            for req in self._requests.values():
                req.done = req.failed = True
                req.wake()
            self._requests.clear()
            self._decoding.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_work:
                self._idle = loop.create_future()
                await self._idle  # `submit` brought the engine clock up to the wall clock and added the request
                self._idle = None
                continue
            step = self.engine.step()  # the engine clock moves to the step's end
            if step is None:
                continue
            end = self._origin + self.engine.clock
            self._finishing = len(step.finished)
            await self._sleep_until(loop, end, step.duration_s)
            self._finishing = 0
            self._emit(step, end)

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, deadline: float, duration: float) -> None:
        """A timer until shortly before `deadline` (time.monotonic), then yield to the other tasks (their I/O
        included) until it. The timer's delay is taken from the loop's own clock: uvloop's `loop.time()` is the
        time its current iteration began, in whole ms, and its timers count from there."""
        early = deadline - min(self.spin_s, SPIN_SHARE * duration)
        if early > time.monotonic():
            await asyncio.sleep(early - loop.time())
        while time.monotonic() < deadline:
            await asyncio.sleep(0)

    def _emit(self, step: Step, end: float) -> None:
        """The step's end: one token for each emitter; the finished ones are done (ENGINE_API.md's rule)."""
        requests, decoding = self._requests, self._decoding
        decoding.difference_update(step.preempted)
        decoding.update(r for r in step.first_token if r in requests)  # not the ones aborted during the step
        decoding.update(r for r in step.resumed if r in requests)
        finished = frozenset(step.finished) if step.finished else frozenset()
        for rid in decoding:
            req = requests[rid]
            index = req.emitted
            req.emitted = index + 1
            if req.push is not None:
                req.push(index, rid in finished)
            elif req.each:
                req.wake()
        emitters = len(decoding)
        for rid in finished:
            if rid in decoding:
                decoding.discard(rid)
                req = requests.pop(rid)
                req.done = True
                req.wake()
                self.finished_total += 1
        self.generation_tokens_total += emitters
        self.preemptions_total += len(step.preempted)
        if self.steps is not None:
            self.steps.append(StepRecord(end, step.duration_s, emitters))


class DataParallel:
    """N engines behind one server (`vllm serve --data-parallel-size N`): each an `Emulator` on its own clock, a
    request given to the one vLLM's load balancer would pick (module docstring). Offers what the server needs of an
    `Emulator`: `submit`, `abort`, `start`, `stop`, `dead`, `in_flight`, `ranks`."""

    #: vLLM's score of an engine: waiting requests weigh this many running ones (DPLBAsyncMPClient).
    WAITING_WEIGHT = 4

    def __init__(self, ranks: Sequence[Emulator]):
        if not ranks:
            raise ValueError("data parallelism needs at least one engine")
        self._ranks = tuple(ranks)
        self._next_start = 0

    @property
    def ranks(self) -> tuple[Emulator, ...]:
        return self._ranks

    @property
    def dead(self) -> str | None:
        """Why an engine loop stopped, if one did: vLLM's server fails as a whole when one of its engines dies."""
        return next((rank.dead for rank in self._ranks if rank.dead is not None), None)

    @property
    def in_flight(self) -> int:
        return sum(rank.in_flight for rank in self._ranks)

    def choose(self) -> int:
        """The engine the next request goes to: the lowest 4 x waiting + running, scanning from a start index that
        moves on by one at each request (first lowest wins)."""
        count = len(self._ranks)
        start, self._next_start = self._next_start, (self._next_start + 1) % count
        best, best_score = start, -1
        for offset in range(count):
            index = (start + offset) % count
            waiting, running = self._ranks[index].load()
            score = self.WAITING_WEIGHT * waiting + running
            if best_score < 0 or score < best_score:
                best, best_score = index, score
        return best

    def submit(self, prompt_tokens: int, max_tokens: int, *, stream: bool, endpoint: str | None = None) -> _Request:
        """As `Emulator.submit`, on the engine the load balancer picks."""
        if (dead := self.dead) is not None:
            raise ApiError(500, dead, "InternalServerError")
        rank = self.choose()
        req = self._ranks[rank].submit(prompt_tokens, max_tokens, stream=stream, endpoint=endpoint)
        req.rank = rank
        return req

    def abort(self, req: _Request) -> None:
        self._ranks[req.rank].abort(req)

    def start(self) -> None:
        for rank in self._ranks:
            rank.start()

    async def stop(self) -> None:
        for rank in self._ranks:
            await rank.stop()


#: What a server serves: one engine, or several data-parallel ones.
Serving = Emulator | DataParallel


# ---- the server ----------------------------------------------------------------------------------------------------
def _pusher(answer: Answer, transport: asyncio.Transport) -> Callable[[int, bool], None]:
    """Writes token `index` of `answer` to the socket as one HTTP chunk (the response is chunked and its headers
    went out with the first token, so raw chunks between aiohttp's own writes keep the framing)."""

    def push(index: int, last: bool) -> None:
        if not transport.is_closing():
            transport.write(answer.chunk(index, last))

    return push


@dataclass(frozen=True)
class EmulatorSettings:
    """How the emulator's server listens and what it calls its model."""

    served_model_name: str
    max_model_len: int
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_root: str = ""  # what /v1/models shows as the model's root (vLLM: the model path)
    speed: float = 1.0  # the engines' --speed, said on every answer (EMULATOR_HEADER)


class _VllmGauges(Collector):
    """vLLM's metric names (v1: vllm/v1/metrics/loggers.py), read from the engines at scrape time: one series per
    engine (label `engine`, its data-parallel rank), as vLLM labels them."""

    def __init__(self, emulator: Serving, model_name: str):
        self.emulator, self.model_name = emulator, model_name

    def collect(self) -> Iterator[Metric]:
        ranks = [([self.model_name, str(index)], e) for index, e in enumerate(self.emulator.ranks)]
        names = ["model_name", "engine"]

        def gauge(name: str, doc: str, value: Callable[[Emulator], float]) -> GaugeMetricFamily:
            metric = GaugeMetricFamily(name, doc, labels=names)
            for values, e in ranks:
                metric.add_metric(values, value(e))
            return metric

        def counter(name: str, doc: str, value: Callable[[Emulator], float]) -> CounterMetricFamily:
            metric = CounterMetricFamily(name, doc, labels=names)
            for values, e in ranks:
                metric.add_metric(values, value(e))
            return metric

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    lambda e: e.engine.running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    lambda e: e.engine.waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    lambda e: float(e.engine.kv_cache_usage))
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                      lambda e: e.preemptions_total)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lambda e: e.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      lambda e: e.generation_tokens_total)
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=[*names, "finished_reason"])
        for values, e in ranks:
            success.add_metric([*values, "length"], e.finished_total)
            success.add_metric([*values, "abort"], e.aborted_total)
        yield success


class EmulatorServer:
    """The OpenAI-compatible server around an `Emulator`. `start()` (port 0: any free port) returns its URL."""

    def __init__(self, emulator: Serving, settings: EmulatorSettings):
        self.emulator, self.settings = emulator, settings
        self._key = settings.api_key.encode() if settings.api_key else None
        self._identity = emulator_header_value(settings.speed)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_VllmGauges(emulator, settings.served_model_name))
        self.runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.on_response_prepare.append(self._identify)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def _identify(self, _request: web.Request, response: web.StreamResponse) -> None:
        """Every answer says it comes from the emulator, and at what speed (see `EMULATOR_HEADER`)."""
        response.headers[EMULATOR_HEADER] = self._identity

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """vLLM's --api-key: every /v1 path needs `Authorization: Bearer KEY`."""
        if self._key is not None and request.path.startswith("/v1"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, b"Bearer " + self._key):
                return web.Response(body=b'{"error":"Unauthorized"}', status=401, content_type=JSON)
        return await handler(request)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Kind.COMPLETIONS)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Kind.CHAT)

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        try:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise ApiError(400, "the request body is not valid JSON") from None
            gen = parse_generation(body, kind, self.settings.served_model_name, self.settings.max_model_len)
            answer = Answer(gen)
            emulator = self.emulator
            if not gen.stream:
                req = emulator.submit(gen.prompt_tokens, gen.max_tokens, stream=False, endpoint=kind.value)
                try:
                    await req.wait(0)
                finally:
                    emulator.abort(req)  # a no-op once done; a client gone meanwhile frees its blocks
                if req.failed:
                    raise ApiError(500, emulator.dead or "the engine loop failed", "InternalServerError")
                return web.Response(body=answer.whole(req.emitted), content_type=JSON)
            req = emulator.submit(gen.prompt_tokens, gen.max_tokens, stream=True, endpoint=kind.value)
        except ApiError as exc:
            return web.Response(body=exc.body(), status=exc.status, content_type=JSON)
        out = web.StreamResponse(headers={"Content-Type": EVENT_STREAM, "Cache-Control": "no-cache"})
        try:
            await out.prepare(request)
            transport, sent = request.transport, 0
            while True:  # the first token(s), with the headers, through aiohttp's writer
                await req.wait(sent)
                if req.emitted > sent:
                    count = req.emitted - sent
                    await out.write(answer.tokens(sent, count, req.done and not req.failed))
                    sent += count
                if req.done:
                    break
                if req.emitted == sent and transport is not None:  # caught up: no token can slip between
                    req.push = _pusher(answer, transport)  # the rest straight from the engine loop (see _Request)
                    req.each = False
                    await req.wait(sent)
                    break
            if req.failed:  # vLLM's way to end a stream that broke: an error event, then [DONE]
                await out.write(b"data: " + error_body(500, emulator.dead or "", "InternalServerError")
                                + b"\n\n" + DONE)
            else:
                await out.write(answer.end(req.emitted))
            await out.write_eof()
        except ConnectionResetError:  # the client went away between two writes (aiohttp cancels it otherwise)
            pass
        finally:
            emulator.abort(req)  # a no-op once done; a client gone meanwhile frees its blocks
        return out

    async def models(self, _request: web.Request) -> web.StreamResponse:
        s = self.settings
        model = {"id": s.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                 "root": s.model_root or s.served_model_name, "parent": None, "max_model_len": s.max_model_len}
        return web.Response(body=orjson.dumps({"object": "list", "data": [model]}), content_type=JSON)

    async def health(self, _request: web.Request) -> web.StreamResponse:
        """200, or 503 once the engine loop has failed."""
        return web.Response(status=503 if self.emulator.dead else 200)

    async def metrics(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> str:
        """Listen (and start the engine loop); the base URL."""
        self.runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port, backlog=2048, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            raise EmulateError(f"cannot listen on {self.settings.host}:{self.settings.port}: "
                               f"{exc.strerror or exc}") from None
        self.emulator.start()
        sockets = [a for a in self.runner.addresses if a]
        port = sockets[0][1] if sockets else self.settings.port
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await self.emulator.stop()


def run(emulator: Serving, settings: EmulatorSettings, on_listening: Callable[[str], None]) -> int:
    """Serve until SIGTERM or Ctrl-C. Blocks; the exit code (0 after SIGTERM, 130 after Ctrl-C)."""
    with asyncio.Runner(loop_factory=_LOOP_FACTORY) as runner:
        return runner.run(_serve(emulator, settings, on_listening))


async def _serve(emulator: Serving, settings: EmulatorSettings, on_listening: Callable[[str], None]) -> int:
    server = EmulatorServer(emulator, settings)
    url = await server.start()
    gc.collect()
    gc.freeze()  # what is alive now is never garbage: full collections skip it (the router does the same)
    gc.set_threshold(max(gc.get_threshold()[0], _GC_YOUNG_THRESHOLD), *gc.get_threshold()[1:])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def signalled(signum: int) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signalled, signum)
    on_listening(url)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop()
    return 130 if received and received[0] == signal.SIGINT else 0


# ---- building one from the command line's terms --------------------------------------------------------------------
@dataclass(frozen=True)
class Emulated:
    """An emulator ready to serve (one engine, or `DataParallel` ones), and what it emulates in words (what `emulate`
    prints before listening)."""

    emulator: Serving
    settings: EmulatorSettings
    summary: str


def prepare(model: str, gpu: str, *, tp: int = 1, dtype: str = "bf16", speed: float = 1.0,
            config: str | None = None, served_model_name: str | None = None, host: str = "127.0.0.1",
            port: int = 8000, api_key: str | None = None, record_steps: bool = False,
            data_parallel_size: int = 1) -> Emulated:
    """The engine for `model` on `gpu` (engine settings from `config`'s `deployment`, else vLLM's defaults) behind
    an emulator; `data_parallel_size` N > 1: N such engines behind one server (`DataParallel`), as `vllm serve
    --data-parallel-size N` runs on N x TP GPUs. Raises DoesNotFit (and the engine's other one-line errors) before
    anything listens."""
    if data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be at least 1, got {data_parallel_size}")
    engine_settings = EngineSettings()
    if config is not None:
        document = read_config_document(config)
        deployment = document.data.get("deployment") if isinstance(document.data, dict) else None
        engine_settings = EngineSettings.from_deployment(deployment, source=document.source)
    spec = load_model(model)
    engines = [Engine(spec, gpu, tp=tp, dtype=dtype, settings=engine_settings, speed=speed)
               for _ in range(data_parallel_size)]
    engine = engines[0]
    settings = EmulatorSettings(served_model_name=served_model_name or model, max_model_len=engine.max_model_len,
                                host=host, port=port, api_key=api_key, model_root=model, speed=speed)
    emulating = (f"Emulating {engine.description}" if data_parallel_size == 1 else
                 f"Emulating {data_parallel_size} data-parallel engines behind one server (vLLM's load balancing), "
                 f"each {engine.description}")
    lines = [f"{emulating}, max_model_len {engine.max_model_len}.",
             *(f"Note: {note}" for note in engine.notes),
             ("Real time (--speed 1)." if speed == 1 else
              f"At {speed:g}x speed: every step time / {speed:g} (rates x {speed:g}, times / {speed:g})."),
             f"Serving it as {settings.served_model_name!r}"
             + ("; clients send the API key as a Bearer token." if api_key else "; no API key.")]
    ranks = [Emulator(e, record_steps=record_steps) for e in engines]
    serving: Serving = ranks[0] if data_parallel_size == 1 else DataParallel(ranks)
    return Emulated(serving, settings, "\n".join(lines))
