"""`replay`: a trace's requests sent to a live OpenAI-compatible endpoint at their timestamps, measured, and reported
in the very shape `simulate` reports a model of the fleet (`core.attainment`), so the two compare line by line.

Open loop: each request is sent at its arrival time (divided by `speedup`) whatever the ones before it are doing, on
its own connection; a slow server makes requests wait, never the sending. Each request asks for exactly its trace
sizes: a prompt of its prompt tokens (the profiler's random one-token words, or as many token ids), `max_tokens`
its output tokens with `ignore_eos`, streamed with `stream_options.include_usage`; its TTFT is the first token's
arrival after the send, its latency the end of the stream. The GPU type that served it is the one a melange-sky
router names in its `X-Melange-Gpu` header (none from a plain server: `gpu` names it then, or per GPU type stays
empty). Its bucket comes from its trace sizes and the given edges, as `simulate` buckets it.

The same arrivals `simulate` reads (`inputs.arrivals`: a trace's timestamps, or its sizes as Poisson arrivals) are
what is sent, so a replay and a simulation of one trace see the same requests at the same times.

Bounds: `max_requests` (the first N of the trace) and the arrivals' own cut (`--duration`); a stop (Ctrl-C, SIGTERM,
set by `replay` itself around the run in the main thread) sends nothing more, cancels the requests in flight and
returns what finished, marked interrupted: the cancelled requests are left out of the report (they did not finish,
nor were they refused), and counted.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from melange_sky.core.attainment import DEFAULT_TARGET, AttainmentReport, RequestRecord, summarise
from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, Bucketer, check_edges
from melange_sky.core.slo import Slos, percentile
from melange_sky.errors import MelangeError
from melange_sky.inputs.arrivals import Arrivals
from melange_sky.inputs.http import (COMPLETIONS_PATH, Client, Endpoint, HttpError, error_text, is_client_error,
                                     os_reason, parse_endpoint)
from melange_sky.inputs.http import RequestRecord as Measured
from melange_sky.inputs.profile_load import synthetic_prompt

__all__ = ["PromptKind", "ReplayError", "ReplayProgress", "ReplayResult", "ReplaySettings", "bucket_names",
           "replay"]

#: Token ids of a prompt sent as ids: within every common vocabulary (32k and up), away from the special tokens.
_ID_RANGE = (1000, 20000)
#: A send more than this late (the client itself behind: a busy machine) is worth a note in the report.
_LAG_NOTE_S = 0.05
#: Seconds the one-token check of the endpoint may take.
_CHECK_S = 60.0
#: Seconds between progress calls.
_PROGRESS_EVERY_S = 2.0


class ReplayError(MelangeError):
    """A replay that cannot start: a bad endpoint, nothing listening, a refused key, no requests."""

    exit_code = 2


class PromptKind(StrEnum):
    """How a prompt of N tokens is sent: N one-token words (any server; a router estimates their count, then learns
    it from the replicas' usage) or N token ids (counted exactly by a router and the server)."""

    WORDS = "words"
    IDS = "ids"


@dataclass(frozen=True)
class ReplaySettings:
    """How to send: the endpoint and its key, the model (None: the first the endpoint lists), time compression,
    bounds, and each request's limit."""

    endpoint: str
    api_key: str | None = None
    model: str | None = None
    speedup: float = 1.0  # arrival times divided by this
    max_requests: int | None = None  # the first N arrivals only
    request_timeout: float = 300.0  # seconds one request may take in all; past it, it counts as unanswered
    connect_timeout: float = 10.0
    prompt: PromptKind = PromptKind.WORDS
    ignore_eos: bool = True
    gpu: str | None = None  # the GPU type of an endpoint that does not name one (a single server)
    input_edges: tuple[int, ...] = DEFAULT_INPUT_EDGES
    output_edges: tuple[int, ...] = DEFAULT_OUTPUT_EDGES
    cafile: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speedup) and self.speedup > 0):
            raise ReplayError(f"--speedup must be a positive number, got {self.speedup!r}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ReplayError(f"--max-requests must be at least 1, got {self.max_requests!r}")
        check_edges(list(self.input_edges), "input buckets")
        check_edges(list(self.output_edges), "output buckets")


@dataclass(frozen=True)
class ReplayProgress:
    """Where a replay stands: requests sent, finished (answered or failed) and in flight, of `total`; seconds."""

    sent: int
    finished: int
    in_flight: int
    total: int
    elapsed_s: float
    span_s: float  # when the last request is due


@dataclass(frozen=True)
class ReplayResult:
    """What a replay measured (the shared attainment report) and how the sending went."""

    report: AttainmentReport
    endpoint: str
    model: str | None
    arrivals: Arrivals
    offered: int  # requests due within the bounds
    sent: int
    cancelled: int  # in flight at a stop, left out of the report
    interrupted: bool
    wall_s: float
    send_lag_ms: dict[str, float]  # how late sends were against their due time: p50, p99, max
    notes: tuple[str, ...] = ()
    records: list[RequestRecord] = field(default_factory=list, repr=False)  # the reported requests, in send order

    def to_json(self) -> dict[str, Any]:
        """`simulate --json`'s report keys (attainment, requests, ttft_ms, tpot_ms, latency_ms, per_gpu, per_bucket,
        per_minute, ... and the verdict and arrivals), and `replay`: how the sending went."""
        return {**self.report.to_json(), "verdict": self.report.verdict,
                "arrivals": {"description": self.arrivals.description, "requests": self.offered,
                             "duration_s": round(self.arrivals.duration_s, 3),
                             "mean_rate": round(self.arrivals.mean_rate, 4)},
                "replay": {"endpoint": self.endpoint, "model": self.model, "sent": self.sent,
                           "cancelled": self.cancelled, "interrupted": self.interrupted,
                           "wall_s": round(self.wall_s, 3),
                           "send_lag_ms": {k: round(v, 3) for k, v in self.send_lag_ms.items()}},
                "notes": list(self.notes)}


def bucket_names(input_edges: Sequence[int], output_edges: Sequence[int]) -> dict[tuple[int, int], str]:
    """Each bucket's name as `simulate` names it ("input 1-512, output 1-128 tokens")."""
    return {(i, j): f"input {input_edges[i]}-{input_edges[i + 1]}, output {output_edges[j]}-{output_edges[j + 1]} "
                    f"tokens"
            for i in range(len(input_edges) - 1) for j in range(len(output_edges) - 1)}


# ---- the run -----------------------------------------------------------------------------------------------------
def replay(arrivals: Arrivals, slos: Slos, settings: ReplaySettings, *, target: float = DEFAULT_TARGET,
           progress: Callable[[ReplayProgress], None] | None = None,
           stop: threading.Event | None = None) -> ReplayResult:
    """Send `arrivals` to the endpoint (see the module's docstring) and report what was measured against `slos`.

    Checks the endpoint first (GET /v1/models, and one tiny completion): `ReplayError` in one line when nothing
    listens, the key is refused or the server refuses completions. A Ctrl-C or SIGTERM during the run (in the
    main thread), or `stop` being set, ends it early with a partial report (`interrupted`); KeyboardInterrupt when
    no request had finished by then."""
    if not len(arrivals):
        raise ReplayError("no requests to replay")
    ep = parse_endpoint(settings.endpoint, error=ReplayError)
    client = Client(ep, connect_timeout=settings.connect_timeout, api_key=settings.api_key,
                    user_agent="melange-sky-replay", cafile=settings.cafile)
    return asyncio.run(_Run(client, ep, arrivals, slos, settings, target, progress, stop).main())


@contextlib.contextmanager
def _stop_on_signals(loop: asyncio.AbstractEventLoop, stopped: asyncio.Event) -> Iterator[None]:
    """Within the block a Ctrl-C, SIGTERM or SIGHUP sets `stopped` instead of raising (main thread only); the
    handlers before it are back after. A second one raises KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if callable(signal.getsignal(s))
               or signal.getsignal(s) == signal.SIG_DFL]
    saved = {}

    def handler(signum: int, _frame: Any) -> None:
        if stopped.is_set():
            raise KeyboardInterrupt
        loop.call_soon_threadsafe(stopped.set)

    for sig in signals:
        saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


class _Run:
    """One replay on one event loop: the sender, the requests in flight and their records."""

    def __init__(self, client: Client, ep: Endpoint, arrivals: Arrivals, slos: Slos, settings: ReplaySettings,
                 target: float, progress: Callable[[ReplayProgress], None] | None, stop: threading.Event | None):
        self.client, self.ep, self.arrivals, self.slos, self.settings = client, ep, arrivals, slos, settings
        self.target, self.progress, self.outside_stop = target, progress, stop
        n = len(arrivals)
        self.n = min(n, settings.max_requests) if settings.max_requests else n
        self.records: list[RequestRecord | None] = [None] * self.n
        self.lags: list[float] = []
        self.sent = self.finished = 0
        self.short = 0  # answered with fewer tokens than asked
        self.tasks: set[asyncio.Task[None]] = set()
        self.rng = random.Random(settings.seed)
        in_b, out_b = Bucketer(settings.input_edges), Bucketer(settings.output_edges)
        self.buckets = [(in_b.index(p), out_b.index(o)) for p, o in zip(arrivals.prompts[:self.n],
                                                                         arrivals.outputs[:self.n])]
        self.model = settings.model

    async def main(self) -> ReplayResult:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        await self.check()  # a Ctrl-C here is a plain interrupt: nothing was measured yet
        with _stop_on_signals(loop, stopped):
            watcher = asyncio.create_task(self._watch_outside(stopped)) if self.outside_stop else None
            started = time.perf_counter()
            sender = asyncio.create_task(self.send_all(loop.time()))
            stop_wait = asyncio.create_task(stopped.wait())
            reporter = asyncio.create_task(self._report(started)) if self.progress else None
            await asyncio.wait({sender, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]  # a bug in sending: not a measurement
            while not stopped.is_set() and self.tasks:  # all sent: wait for the requests in flight, or a stop
                waiting: set[asyncio.Future[Any]] = {*self.tasks, stop_wait}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            interrupted = stopped.is_set()
            for task in (sender, stop_wait, reporter, watcher, *self.tasks):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(sender, *self.tasks, return_exceptions=True)
            for task in (stop_wait, reporter, watcher):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            wall = time.perf_counter() - started
        return self.result(interrupted, wall)

    async def _watch_outside(self, stopped: asyncio.Event) -> None:
        assert self.outside_stop is not None
        while not self.outside_stop.is_set():
            await asyncio.sleep(0.05)
        stopped.set()

    async def _report(self, started: float) -> None:
        assert self.progress is not None
        span = self.arrivals.times[self.n - 1] / self.settings.speedup
        while True:
            await asyncio.sleep(_PROGRESS_EVERY_S)
            self.progress(ReplayProgress(self.sent, self.finished, self.sent - self.finished, self.n,
                                         time.perf_counter() - started, span))

    # -- the endpoint -----------------------------------------------------------------------------------------------
    async def check(self) -> None:
        """Fail fast in one line: nothing listening, a refused key, a server that refuses completions."""
        ep, client = self.ep, self.client
        try:
            status, body = await asyncio.wait_for(client.get("/v1/models"), self.settings.connect_timeout * 2)
        except (TimeoutError, OSError) as exc:
            raise ReplayError(f"cannot reach {ep.url} ({os_reason(exc)}): is the server running and the port open? "
                              f"Try: curl {ep.full_url('/v1/models')}") from None
        except (HttpError, asyncio.IncompleteReadError, ValueError) as exc:
            raise ReplayError(f"{ep.url} does not answer like an HTTP server ({exc})") from None
        if status in (401, 403):
            raise ReplayError(f"{ep.url} refused the request ({error_text(status, body)}): pass --api-key (or "
                              f"MELANGE_SKY_API_KEY)")
        served: list[str] = []
        if status == 200:
            with contextlib.suppress(json.JSONDecodeError, AttributeError, TypeError):
                served = [str(m.get("id")) for m in json.loads(body).get("data", []) if isinstance(m, dict)]
        if self.model is None and served:
            self.model = served[0]
        elif self.model is not None and served and self.model not in served:
            raise ReplayError(f"{ep.url} does not serve model {self.model!r}; it serves: {', '.join(served)}. Pass "
                              f"one of them as --model")
        probe = await client.timed_completion(self.payload(1, 2), min(self.settings.request_timeout, _CHECK_S))
        if is_client_error(probe.status):
            raise ReplayError(f"POST {ep.full_url(COMPLETIONS_PATH)} answered {probe.error}: is --endpoint the "
                              f"server's base URL (e.g. {ep.origin})" + (f" and --model {self.model!r} right?"
                                                                         if self.model else "?"))
        if not probe.ok:
            raise ReplayError(f"{ep.url} did not answer a one-token completion: {probe.error}")

    def payload(self, prompt_tokens: int, output_tokens: int) -> bytes:
        settings = self.settings
        prompt: str | list[int]
        if settings.prompt is PromptKind.IDS:
            low, high = _ID_RANGE
            prompt = [self.rng.randrange(low, high) for _ in range(prompt_tokens)]
        else:
            prompt = synthetic_prompt(prompt_tokens, self.rng)
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": output_tokens, "temperature": 0.0, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.model is not None:
            body["model"] = self.model
        if settings.ignore_eos:
            body["ignore_eos"] = True
        return json.dumps(body, separators=(",", ":")).encode()

    # -- sending --------------------------------------------------------------------------------------------------
    async def send_all(self, origin: float) -> None:
        """Each request at its due time on the loop's clock (origin + its arrival / speedup), on its own task."""
        loop = asyncio.get_running_loop()
        times, prompts, outputs = self.arrivals.times, self.arrivals.prompts, self.arrivals.outputs
        speedup = self.settings.speedup
        first = times[0]
        for k in range(self.n):
            due = origin + (times[k] - first) / speedup
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            payload = self.payload(prompts[k], outputs[k])  # built at its time: a long prompt is not held for long
            self.lags.append(max(0.0, loop.time() - due))
            task = asyncio.create_task(self.one(k, (due - origin), payload))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.sent += 1

    async def one(self, k: int, arrival_s: float, payload: bytes) -> None:
        measured: Measured = await self.client.timed_completion(payload, self.settings.request_timeout)
        self.finished += 1
        gpu = measured.gpu or self.settings.gpu
        prompt, output = self.arrivals.prompts[k], self.arrivals.outputs[k]
        if measured.ok and measured.ttft is not None:
            tokens = measured.output_tokens or output
            if tokens < output:
                self.short += 1
            self.records[k] = RequestRecord.answered(arrival_s, gpu, None, self.buckets[k], prompt, tokens,
                                                     measured.ttft, measured.latency)
        else:
            self.records[k] = RequestRecord.failed(arrival_s, gpu, None, self.buckets[k], prompt, output)

    # -- the result -----------------------------------------------------------------------------------------------
    def result(self, interrupted: bool, wall_s: float) -> ReplayResult:
        done = [r for r in self.records if r is not None]
        cancelled = self.sent - len(done)
        if not done:
            if interrupted:  # nothing to report: an interrupt like any other (exit 130)
                raise KeyboardInterrupt
            raise ReplayError("no request finished: nothing to report")
        settings = self.settings
        speedup = settings.speedup
        offered_span = (self.arrivals.times[self.n - 1] - self.arrivals.times[0]) / speedup
        duration = (self.arrivals.duration_s / speedup if self.n == len(self.arrivals) else offered_span)
        if interrupted:  # what was offered before the stop
            duration = max(r.arrival_s for r in done)
        report = summarise(done, self.slos, self.target, bucket_names(settings.input_edges, settings.output_edges),
                           duration_s=duration)
        lags = sorted(self.lags)
        lag = {"p50": 1000 * percentile(lags, 0.5), "p99": 1000 * percentile(lags, 0.99), "max": 1000 * lags[-1]} \
            if lags else {"p50": 0.0, "p99": 0.0, "max": 0.0}
        notes = list(self.arrivals.warnings)
        if lags and lags[-1] > _LAG_NOTE_S:
            notes.append(f"the client sent late (p99 {lag['p99']:.0f} ms, max {lag['max']:.0f} ms behind the "
                         f"trace): a busy machine; the server saw arrivals later than the trace's")
        if self.short:
            notes.append(f"{self.short:,} request(s) were answered with fewer tokens than asked: does the server "
                         f"honour ignore_eos?")
        if not report.per_gpu:
            notes.append("the endpoint does not name the GPU type that served each request (a melange-sky router "
                         "does): per GPU type is empty; --gpu NAME names a single server's")
        return ReplayResult(report=report, endpoint=self.ep.url, model=self.model, arrivals=self.arrivals,
                            offered=self.n, sent=self.sent, cancelled=cancelled, interrupted=interrupted,
                            wall_s=wall_s, send_lag_ms=lag, notes=tuple(notes), records=done)
