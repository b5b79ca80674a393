"""The profiler's load: synthetic requests of a bucket's size with Poisson arrivals (`Load`), and one *step* at one
rate (`run_step`) that measures the server's steady state there.

A step measures the steady state at its rate:
* arrivals never pause within a bucket: they go on from one step to the next at the new rate, for as long as the
  step needs (several request durations at least);
* a step starts with the server at the load the SLO allows at that rate (rate x latency at the SLO in flight: an
  excess from a higher rate drains first, a shortfall is filled with staggered requests), so the transient moves
  away from the SLO on the side where the steady state lies instead of flattering the rate;
* only requests started once in flight has settled count (Little's law: the time-mean in flight matches rate x
  mean latency), and only once they have had time to finish;
* the step ends as soon as each SLO's estimate decides pass or fail with ~95% confidence (`profile_stats`), or is
  known within the precision asked for; a step that hits its time cap is judged on what it has and marked
  `cut_short`. A step whose requests in flight keep growing past 3x what the SLO allows fails as overloaded: there
  is no steady state to measure.
So steps are short where the verdict is clear or requests are short, and long only near the limit.

Prompt sizes: a prompt of N tokens is N words drawn at random from common English words that are each a single
token (with their leading space) in the GPT-2/cl100k, Llama and Mistral tokenizers, so N words ~ N tokens (+1 BOS on
some models); random words also mean no two requests share a prefix, so prefix caching does not flatter the
numbers. `max_tokens` is the representative output length with "ignore_eos": true (vLLM, SGLang), so every request
generates exactly that many.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from melange_sky.core.slo import ARRIVAL_BLOCK_MIN, Slo, arrival_gaps
from melange_sky.inputs.http import Client, RequestRecord, is_client_error
from melange_sky.inputs.profile_result import ProfileSettings, StepResult
from melange_sky.inputs.profile_stats import ERROR_TOLERANCE, OVERLOAD, slo_checks, summarise

#: Words that are one token each (with a leading space) in the common LLM tokenizers.
PROMPT_WORDS: tuple[str, ...] = tuple("""
the of and to in is it you that he was for on are with as his they at be this from have or by one had not but what
all were when we there can an your which their said if do will each about how up out them then she many some so these
would other into has more her two like him see time could no make than first been its who now people my made over did
down only way find use may water long little very after words called just where most know""".split())
#: A step measures requests started at least this many request durations after its start (fillers carry the load
#: meanwhile) once in flight matches Little's law, and after this many whatever it says.
_SETTLE_MIN, _SETTLE_MAX = 0.5, 3.0
#: Requests started in the last this-many durations may still be running: they are judged at a later check.
_GUARD = 1.5
#: A step measures for at least this many request durations.
_MIN_SPAN = 2.0
#: The step's latency is the mean of its last this-many requests to finish.
_RECENT = 20


def synthetic_prompt(tokens: int, rng: random.Random) -> str:
    """About `tokens` tokens of random common words (see the module docstring for the approximation)."""
    return " ".join(rng.choices(PROMPT_WORDS, k=tokens))


def completion_payload(model: str, prompt: str, max_tokens: int, settings: ProfileSettings) -> bytes:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if settings.ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Done:
    start: float  # loop time the request was sent
    record: RequestRecord


class Load:
    """One bucket's traffic: Poisson arrivals at the current step's rate, kept going from one step to the next so
    a step starts from a loaded server, and the requests in flight, counted over time (for Little's law)."""

    def __init__(self, client: Client, make_payload: Callable[[int], bytes], output_tokens: int, timeout: float,
                 rng: random.Random, block_seconds: float):
        self.loop = asyncio.get_running_loop()
        self.block_seconds = block_seconds  # arrivals come in blocks of at least this long (see `_gaps`)
        self.client, self.make_payload, self.output_tokens, self.timeout = client, make_payload, output_tokens, timeout
        self.rng = rng
        self.rate = 0.0
        self.step = 0
        self.in_flight = 0
        self.sent: dict[int, int] = {}  # step -> arrivals sent (fillers included)
        self.done: dict[int, list[Done]] = {}  # step -> finished arrivals (fillers excluded), in finishing order
        self.answered = False  # some request of the bucket (filler or not) finished well: the server works
        self._area = 0.0
        self._since = self.loop.time()
        self._tasks: set[asyncio.Task[RequestRecord]] = set()
        self._wake = asyncio.Event()
        self._runner = asyncio.create_task(self._arrivals())

    def area(self) -> float:
        """Requests in flight integrated over time since the start, request-seconds."""
        return self._area + self.in_flight * (self.loop.time() - self._since)

    def _count(self, delta: int) -> None:
        now = self.loop.time()
        self._area += self.in_flight * (now - self._since)
        self._since = now
        self.in_flight += delta

    def send(self, max_tokens: int, filler: bool = False) -> None:
        """One request now; a filler (load only) is not kept among the step's finished requests."""
        start, step = self.loop.time(), self.step
        self._count(+1)
        self.sent[step] = self.sent.get(step, 0) + 1
        task = asyncio.create_task(self.client.timed_completion(self.make_payload(max_tokens), self.timeout))

        def finished(t: asyncio.Task[RequestRecord]) -> None:
            self._count(-1)
            self._tasks.discard(t)
            if t.cancelled():
                return
            self.answered = self.answered or t.result().ok
            if not filler:
                self.done.setdefault(step, []).append(Done(start, t.result()))

        task.add_done_callback(finished)
        self._tasks.add(task)

    def new_step(self, rate: float) -> int:
        """Arrivals from now on belong to a new step, at `rate` (0 pauses them)."""
        self.step += 1
        self.set_rate(rate)
        return self.step

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self._wake.set()

    def _gaps(self) -> Iterator[float]:
        """The gaps between arrivals at the current rate: `core.slo.arrival_gaps` (Poisson in blocks of about one
        latency's worth, each rescaled to the rate asked for), the traffic `estimate` judges a rate on too."""
        return arrival_gaps(self.rate, self.block_seconds, self.rng)

    async def _arrivals(self) -> None:
        next_at = self.loop.time()
        gaps: Iterator[float] = iter(())
        while True:
            if self._wake.is_set():  # re-rated: new gaps, the next one from now
                self._wake.clear()
                next_at = self.loop.time()
                if self.rate > 0:
                    gaps = self._gaps()
                    next_at += next(gaps)
            if self.rate <= 0:
                await self._wake.wait()
                continue
            delay = next_at - self.loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                    continue
                except TimeoutError:
                    pass
            self.send(self.output_tokens)
            next_at += next(gaps)

    async def cancel_in_flight(self) -> None:
        """Abandon the requests in flight (closing a stream aborts it on vLLM and SGLang): after an overloaded step,
        so the next one does not start with a backlog it would take minutes to drain."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop the arrivals and cancel what is in flight (the bucket is done)."""
        self._runner.cancel()
        tasks = [self._runner, *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class StepPlan:
    """What a step needs from its bucket: the latency at the SLO (to fill and to judge the load), a latency to
    start from, and its time cap (the step's own, or what is left of the bucket's)."""

    slo_latency: float
    latency_guess: float
    cap: float
    precision: dict[Slo, float] | None = None  # per SLO, see `profile_stats.precision_needed`


def _mean_in_flight(samples: Sequence[tuple[float, float]], since: float, now: float, area_now: float) -> float:
    """The time-mean of requests in flight over [since, now], from (time, area) samples."""
    start = next(((t, a) for t, a in samples if t >= since), None)
    if start is None or now - start[0] <= 0:
        return 0.0
    return (area_now - start[1]) / (now - start[0])


def _recent_latency(done: Sequence[Done], fallback: float) -> float:
    """The mean latency of the step's last requests to finish well, or `fallback` before any did."""
    recent = [d.record.latency for d in done[-_RECENT:] if d.record.ok]
    return statistics.fmean(recent) if recent else fallback


async def run_step(load: Load, rate: float, plan: StepPlan, settings: ProfileSettings) -> StepResult:
    """Poisson arrivals at `rate` until the mean-TPOT (and any other SLO) estimate decides pass or fail.

    The step first brings the server to the load the SLO allows at this rate (in flight = rate x latency at the
    SLO): it waits for an excess carried over from a higher rate to drain, or sends staggered fillers (output
    lengths spread over 1..n, as the remaining work of requests in flight is in steady state). Starting there, a
    rate above the maximum drifts further above the SLO and one below it further below, so the transient never
    flips a verdict. Requests count once in flight has settled: at least half a request duration later, when the
    time-mean in flight matches rate x mean latency (Little's law), or after 3 durations whatever it says.
    """
    loop = load.loop
    began = loop.time()
    want = rate * plan.slo_latency
    tick = min(0.25, max(0.02, plan.slo_latency / 10))
    if load.in_flight > 1.2 * want + 1:  # carried over from a higher rate: let it drain first
        load.set_rate(0.0)
        while load.in_flight > want and loop.time() - began < min(2 * plan.slo_latency, plan.cap / 4):
            await asyncio.sleep(tick)
    step = load.new_step(rate)
    t0 = loop.time()
    fill = round(want) - load.in_flight
    n = load.output_tokens
    for i in range(max(0, fill)):
        load.send(max(1, math.ceil(n * (i + 0.5) / fill)), filler=True)
    samples: deque[tuple[float, float]] = deque()
    settled: float | None = None
    settled_area = 0.0
    sent_before = 0
    cut_short = overloaded = False
    in_flight_mean: float | None = None
    latency = plan.latency_guess
    while True:
        await asyncio.sleep(tick)
        now = loop.time()
        area = load.area()
        samples.append((now, area))
        done = load.done.get(step, [])
        latency = _recent_latency(done, plan.latency_guess)
        elapsed = now - t0
        window = max(2 * plan.slo_latency, ARRIVAL_BLOCK_MIN / rate)  # not the latency seen: overloaded, it only grows
        while samples and samples[0][0] < now - max(_SETTLE_MAX * latency, window) - 1:
            samples.popleft()
        window_mean = _mean_in_flight(samples, now - window, now, area)
        if elapsed >= window and window_mean > (
                OVERLOAD * want + 3 * math.sqrt(want) + 2) and load.answered:
            overloaded = True  # no steady state: requests pile up faster than they finish (a server that has
            break  # answered nothing yet is left to time out instead)
        if settled is None:
            if elapsed >= _SETTLE_MIN * latency:
                little = rate * latency
                tolerance = max(0.15, 2 / math.sqrt(little + 1))
                mean = _mean_in_flight(samples, now - _SETTLE_MIN * latency, now, area)
                if abs(mean - little) <= tolerance * little or elapsed >= _SETTLE_MAX * latency:
                    settled, settled_area = now, area
                    sent_before = load.sent.get(step, 0)
            if settled is None:
                if elapsed >= plan.cap:
                    cut_short = True
                    break
                continue
        cutoff = now - _GUARD * latency
        started = [d for d in done if d.start >= settled]
        measured = [d for d in started if d.start <= cutoff or not d.record.ok]
        if any(d.record.timed_out or is_client_error(d.record.status) for d in started):
            break
        errors = sum(1 for d in measured if not d.record.ok)
        if errors > ERROR_TOLERANCE * max(len(measured), settings.requests_per_step):
            break
        if elapsed >= plan.cap:
            cut_short = True
            break
        enough = len(measured) >= settings.requests_per_step and cutoff - settled >= _MIN_SPAN * latency
        if enough:
            checks = slo_checks([d.record for d in sorted(measured, key=lambda d: d.start)], settings,
                                 (cutoff - settled) / latency, plan.precision)
            if len(checks) == len(settings.slos) and (all(c.decided for c in checks)
                                                      or any(c.decided and not c.passed for c in checks)):
                break
    now = loop.time()
    done = load.done.get(step, [])
    if overloaded:
        await load.cancel_in_flight()
    durations = 1.0
    if settled is not None:
        in_flight_mean = (load.area() - settled_area) / max(now - settled, 1e-9)
        cutoff = now - _GUARD * latency
        durations = max(cutoff - settled, 0.0) / latency
        kept = [d for d in done if d.start >= settled and (d.start <= cutoff or not d.record.ok)]
    else:
        kept = list(done)
    kept.sort(key=lambda d: d.start)
    return summarise(rate, load.sent.get(step, 0), [d.record for d in kept], settings, now - began,
                      warmup=sent_before if settled is not None else load.sent.get(step, 0), cut_short=cut_short,
                      overloaded=overloaded, settle_seconds=(settled - t0) if settled is not None else elapsed,
                      in_flight=in_flight_mean, want=want, durations=durations)


__all__ = ["PROMPT_WORDS", "Done", "Load", "StepPlan", "completion_payload", "run_step", "synthetic_prompt"]
