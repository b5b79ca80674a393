"""Measure a GPU's `tputs` from a running OpenAI-compatible server (vLLM, SGLang): `melange-sky profile`.

For each (input bucket, output bucket) the profiler finds the highest request rate at which the server meets every
SLO given: the mean time per output token (TPOT), the time to first token (TTFT) at a percentile, the whole latency
at a percentile. One *step* sends synthetic requests of the bucket's representative size with Poisson arrivals at
one rate and streams every response (POST {endpoint}/v1/completions, "stream": true, SSE), timing each token. The
rate grows x2 while steps pass, then bisects between the last pass and the first failure.

A step measures the steady state at its rate (see `_run_step`):
* arrivals never pause within a bucket: they go on from one step to the next at the new rate, for as long as the
  step needs (several request durations at least);
* a step starts with the server at the load the SLO allows at that rate (rate x latency at the SLO in flight: an
  excess from a higher rate drains first, a shortfall is filled with staggered requests), so the transient moves
  away from the SLO on the side where the steady state lies instead of flattering the rate;
* only requests started once in flight has settled count (Little's law: the time-mean in flight matches rate x
  mean latency), and only once they have had time to finish;
* the step ends as soon as each SLO's estimate decides pass or fail with ~95% confidence (intervals from batch
  means: requests in flight together are correlated), or is known within `precision`; a step that hits its time
  cap is judged on what it has and marked `cut_short`. A step whose requests in flight keep growing past 3x what
  the SLO allows fails as overloaded: there is no steady state to measure.
So steps are short where the verdict is clear or requests are short, and long only near the limit.

The reported rate is, by default, where a least-squares line through each SLO's statistic of the steps nearest its
limit meets it (the lowest of the SLOs' crossings, which names the SLO that set the limit); `estimate="pass"`
reports the highest passing step. The interval of the statistic there, divided by the line's slope, is how well
the rate is known: 1 minus that share is the bucket's suggested `headroom`.

A timeout among the measured requests fails the step (a request that timed out broke the SLO); errors (HTTP 5xx,
broken streams) fail it only when more than 10% of the measured requests error, and a step that failed only on
errors is re-run once. A bucket is "failed" when every request of a step failed, on an HTTP 4xx, or after 2 rates
in a row at which every measured request timed out; "cut_short" when it hits `max_minutes` (its tput is the best it
had). Each bucket's request timeout is the larger of `request_timeout` and 3x the time its output needs at the SLO
(plus a prefill allowance), so long outputs are not cut short. Failures are reported per bucket; only a 4xx on the
first probe request (a wrong URL or model) aborts the whole profile.

The requests go through `melange_sky.inputs.http` (HTTP/1.1 over asyncio streams, one connection per request, no
redirects, only the endpoint's host and port); what is measured is recorded in `melange_sky.inputs.profile_result`.

Prompt sizes: a prompt of N tokens is N words drawn at random from common English words that are each a single
token (with their leading space) in the GPT-2/cl100k, Llama and Mistral tokenizers, so N words ~ N tokens (+1 BOS on
some models); random words also mean no two requests share a prefix, so prefix caching does not flatter the
numbers. The server's own `usage.prompt_tokens` is recorded per step to show the real count. `max_tokens` is the
representative output length with "ignore_eos": true (vLLM, SGLang), so every request generates exactly that many.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, check_edges
from melange_sky.core.slo import Slo, bucket_tokens, percentile, representative_tokens
from melange_sky.errors import EndpointUnreachable, ProfileError
from melange_sky.inputs.http import (COMPLETIONS_PATH, Client, Endpoint, HttpError, RequestRecord, error_text,
                                     is_client_error, os_reason, parse_endpoint)
from melange_sky.inputs.profile_result import (BucketProfile, BucketStatus, Cell, Estimate, EventKind, ProfileEvent,
                                               ProfileResult, ProfileSettings, ProgressCallback,
                                               SloCheck, StepResult, slo_label)

#: Words that are one token each (with a leading space) in the common LLM tokenizers.
PROMPT_WORDS: tuple[str, ...] = tuple("""
the of and to in is it you that he was for on are with as his they at be this from have or by one had not but what
all were when we there can an your which their said if do will each about how up out them then she many some so these
would other into has more her two like him see time could no make than first been its who now people my made over did
down only way find use may water long little very after words called just where most know""".split())
#: A step fails on errors only when more than this share of its measured requests error.
ERROR_TOLERANCE = 0.10
#: A bucket's request timeout is at least this many times (output tokens x SLO + prefill allowance).
TIMEOUT_SLO_MULTIPLE = 3.0
#: Prefill allowance per prompt token in that timeout, seconds.
_PREFILL_ALLOWANCE_S_PER_TOKEN = 0.0005
#: A bucket stops, "failed", after this many rates in a row at which every measured request timed out.
TIMEOUT_STEPS_TO_FAIL = 2
#: Below this share of max_tokens (mean over a step) the server ignored ignore_eos: a warning.
_SHORT_OUTPUT_SHARE = 0.9
#: A step measures requests started at least this many request durations after its start (fillers carry the load
#: meanwhile) once in flight matches Little's law, and after this many whatever it says.
_SETTLE_MIN, _SETTLE_MAX = 0.5, 3.0
#: Requests started in the last this-many durations may still be running: they are judged at a later check.
_GUARD = 1.5
#: A step measures for at least this many request durations.
_MIN_SPAN = 2.0
#: A step fails as overloaded when the mean in flight exceeds this multiple of rate x latency at the SLO.
_OVERLOAD = 3.0
#: A step's default time cap: this many seconds, or this many request durations at the SLO, the larger.
_STEP_CAP_FLOOR_S, _STEP_CAP_DURATIONS = 30.0, 15.0
#: Batch means: at most this many batches, of at least this many requests.
_MAX_BATCHES, _BATCH_MIN = 10, 4
#: Arrivals come in rescaled blocks of at least this many (see `_Load._gaps`).
_BLOCK_MIN = 20
#: The step's latency is the mean of its last this-many requests to finish.
_RECENT = 20
#: A step looks at its estimate again and again as requests finish; so that these repeated looks do not end it on a
#: lucky stretch, pass or fail is decided only when the limit lies this many half-widths of the ~95% interval away.
_SEQUENTIAL = 1.5
#: Student's t (two-sided 95%) by degrees of freedom.
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


# ---- what to send --------------------------------------------------------------------------------------------------
def parse_cells(text: str, shape: tuple[int, int]) -> list[Cell]:
    """`--buckets`: "all", or cells "I:J" (0-based input, output bucket index), comma-separated; "I:*" is a row."""
    rows, cols = shape
    if text.strip().lower() == "all":
        return [(i, j) for i in range(rows) for j in range(cols)]
    cells: list[Cell] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            i_text, j_text = part.split(":")
            i_list = range(rows) if i_text.strip() == "*" else [int(i_text)]
            j_list = range(cols) if j_text.strip() == "*" else [int(j_text)]
        except ValueError:
            raise ProfileError(f"--buckets: {part!r} is not I:J (e.g. 0:0,1:2 or 2:*)") from None
        for i in i_list:
            for j in j_list:
                if not (0 <= i < rows and 0 <= j < cols):
                    raise ProfileError(f"--buckets: {i}:{j} is outside the {rows}x{cols} buckets "
                                       f"(indices are 0-based)")
                if (i, j) not in cells:
                    cells.append((i, j))
    if not cells:
        raise ProfileError("--buckets: no bucket given; use all, or I:J,...")
    return cells


def bucket_timeout(settings: ProfileSettings, prompt_tokens: int, output_tokens: int) -> float:
    """Seconds one request of a bucket may take: --timeout, or more when its output at the SLO needs more."""
    prefill = prompt_tokens * _PREFILL_ALLOWANCE_S_PER_TOKEN
    needed = max(output_tokens * (settings.tpot_slo_ms or 0) / 1000 + prefill, (settings.latency_slo_ms or 0) / 1000,
                 (settings.ttft_slo_ms or 0) / 1000 + prefill)
    return round(max(settings.request_timeout, TIMEOUT_SLO_MULTIPLE * needed), 3)


def synthetic_prompt(tokens: int, rng: random.Random) -> str:
    """About `tokens` tokens of random common words (see the module docstring for the approximation)."""
    return " ".join(rng.choices(PROMPT_WORDS, k=tokens))


def _completion_payload(model: str, prompt: str, max_tokens: int, settings: ProfileSettings) -> bytes:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if settings.ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()


def _client(ep: Endpoint, settings: ProfileSettings) -> Client:
    return Client(ep, connect_timeout=settings.connect_timeout, api_key=settings.api_key)


# ---- checking the endpoint -----------------------------------------------------------------------------------------
async def check_endpoint(ep: Endpoint, model: str, settings: ProfileSettings) -> None:
    """Fail fast, in one line, when nothing listens at the endpoint or it does not serve `model`: a wrong URL or
    model would otherwise show up as every bucket failing, after minutes of measuring."""
    client = _client(ep, settings)
    try:
        status, body = await asyncio.wait_for(client.get("/v1/models"), settings.connect_timeout * 2)
    except (TimeoutError, OSError) as exc:
        raise EndpointUnreachable(f"cannot reach {ep.url} ({os_reason(exc)}): is the server running and the port "
                                  f"open? Try: curl {ep.url}/v1/models") from None
    except (HttpError, asyncio.IncompleteReadError, ValueError) as exc:
        raise EndpointUnreachable(f"{ep.url} does not answer like an HTTP server ({exc})") from None
    if status in (401, 403):
        raise ProfileError(f"{ep.url} refused the request ({error_text(status, body)}): pass --api-key "
                           f"(or MELANGE_SKY_API_KEY)")
    served: list[Any] = []
    if status == 200:  # not every server lists its models; the probe below tells
        try:
            served = [m.get("id") for m in json.loads(body).get("data", []) if isinstance(m, dict)]
        except (json.JSONDecodeError, AttributeError):
            pass
    if served and model not in served:
        raise ProfileError(f"{ep.url} does not serve model {model!r}; it serves: {', '.join(map(str, served))}. "
                           f"Pass one of them as --model")
    # One tiny completion: a 4xx here (wrong path, model or API) would fail every bucket, so it aborts now.
    probe = _completion_payload(model, "the", 2, settings)
    record = await client.timed_completion(probe, settings.request_timeout)
    if is_client_error(record.status):
        raise ProfileError(f"POST {ep.full_url(COMPLETIONS_PATH)} answered {record.error}: is --endpoint the "
                           f"server's base URL (e.g. {ep.origin}) and --model {model!r} right? Try: "
                           f"curl {ep.full_url('/v1/models')}")


# ---- statistics ----------------------------------------------------------------------------------------------------
def _ms(values: Sequence[float], q: float | None = None) -> float | None:
    if not values:
        return None
    value = statistics.fmean(values) if q is None else percentile(values, q)
    return round(1000 * value, 3)


def _batch_means(values: Sequence[float], durations: float) -> list[float]:
    """Means of contiguous batches (values in start order), about half a request duration each over a span of
    `durations` request durations: requests in flight together share the server's load, so their values are
    correlated; batches of them much less so, and the spread of batch means gives a more honest error."""
    count = max(3, min(_MAX_BATCHES, int(2 * durations), len(values) // _BATCH_MIN))
    size = len(values) / count
    return [statistics.fmean(values[round(i * size):round((i + 1) * size)]) for i in range(count)]


def _t95(batches: int) -> float:
    """Student's t for a two-sided 95% interval with `batches` - 1 degrees of freedom."""
    return _T95.get(batches - 1, 2.0)


def _mean_check(slo: Slo, values: Sequence[float], limit: float, precision: float, durations: float) -> SloCheck:
    point = statistics.fmean(values)
    if len(values) < 2 * _BATCH_MIN:
        half = math.inf
    else:
        batches = _batch_means(values, durations)
        half = _t95(len(batches)) * max(statistics.stdev(batches) / math.sqrt(len(batches)),
                                         statistics.stdev(values) / math.sqrt(len(values)))
    decided = abs(point - limit) > _SEQUENTIAL * half or half <= precision * limit
    return SloCheck(slo=slo, value_ms=round(point, 3), half_width_ms=round(half, 3), limit_ms=limit, decided=decided)


def _percentile_check(slo: Slo, values: Sequence[float], q: float, limit: float, precision: float,
                      durations: float) -> SloCheck:
    """The q-quantile of `values` against `limit`: decided when the share of values over the limit is, with ~95%
    confidence, on one side of 1 - q (a Wilson interval, its sample size shrunk by the batches' extra spread), or
    when the quantile itself is known within the precision asked for."""
    n = len(values)
    point = percentile(values, q)
    over = [1.0 if v > limit else 0.0 for v in values]
    share = statistics.fmean(over)
    effective = float(n)
    if n >= 2 * _BATCH_MIN:
        batches = _batch_means(over, durations)
        binomial = max(share * (1 - share), 1.0 / n) / n
        batch_var = statistics.variance(batches) / len(batches)
        effective = n / max(1.0, batch_var / binomial)
    z = 1.96 * _SEQUENTIAL
    centre = (share + z * z / (2 * effective)) / (1 + z * z / effective)
    spread = z / (1 + z * z / effective) * math.sqrt(share * (1 - share) / effective
                                                      + z * z / (4 * effective * effective))
    allowed = 1 - q
    q_spread = 1.96 * math.sqrt(q * (1 - q) / effective)
    half = (percentile(values, q + q_spread) - percentile(values, q - q_spread)) / 2
    decided = centre + spread < allowed or centre - spread > allowed or half <= precision * limit
    return SloCheck(slo=slo, value_ms=round(point, 3), half_width_ms=round(half, 3), limit_ms=limit, decided=decided)


def _slo_checks(records: Sequence[RequestRecord], settings: ProfileSettings, durations: float,
                precision: dict[Slo, float] | None = None) -> list[SloCheck]:
    """Each SLO's statistic over the measured requests (in start order, over `durations` request durations); an SLO
    with no value yet is left out. `precision`: per SLO, the share of its limit within which knowing the statistic
    is enough (see `_precision`)."""
    ok = [r for r in records if r.ok]
    checks = []
    for slo, limit in settings.slos.items():
        if slo == Slo.TPOT:
            tpots = [1000 * r.tpot for r in ok if r.tpot is not None]
            if tpots:
                checks.append(_mean_check(slo, tpots, limit, (precision or {}).get(slo, settings.precision),
                                              durations))
            continue
        if slo == Slo.TTFT:
            values, q = [1000 * r.ttft for r in ok if r.ttft is not None], settings.ttft_percentile / 100
        else:
            values, q = [1000 * r.latency for r in ok], settings.latency_percentile / 100
        if values:
            checks.append(_percentile_check(slo, values, q, limit, (precision or {}).get(slo, settings.precision),
                                            durations))
    return checks


# ---- the load: Poisson arrivals that steps re-rate -----------------------------------------------------------------
@dataclass(frozen=True)
class _Done:
    start: float  # loop time the request was sent
    record: RequestRecord


class _Load:
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
        self.done: dict[int, list[_Done]] = {}  # step -> finished arrivals (fillers excluded), in finishing order
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
                self.done.setdefault(step, []).append(_Done(start, t.result()))

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
        """Poisson inter-arrival times, in blocks rescaled to last exactly block / rate seconds.

        A Poisson process conditioned on its count per block: bursts as in real traffic within a request's
        lifetime, but the realised rate of a step is the rate asked for. Unconditioned, a step's count is off by
        ~1/sqrt(count), and near saturation a few % more arrivals move the mean TPOT by several times as much.
        """
        rate = self.rate
        block = max(_BLOCK_MIN, math.ceil(rate * self.block_seconds))
        while True:
            gaps = [self.rng.expovariate(1.0) for _ in range(block)]
            scale = block / rate / sum(gaps)
            yield from (g * scale for g in gaps)

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


# ---- one step ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _StepPlan:
    """What a step needs from its bucket: the latency at the SLO (to fill and to judge the load), a latency to
    start from, and its time cap (the step's own, or what is left of the bucket's)."""

    slo_latency: float
    latency_guess: float
    cap: float
    precision: dict[Slo, float] | None = None  # per SLO, see `_precision`


def _mean_in_flight(samples: Sequence[tuple[float, float]], since: float, now: float, area_now: float) -> float:
    """The time-mean of requests in flight over [since, now], from (time, area) samples."""
    start = next(((t, a) for t, a in samples if t >= since), None)
    if start is None or now - start[0] <= 0:
        return 0.0
    return (area_now - start[1]) / (now - start[0])


def _recent_latency(done: Sequence[_Done], fallback: float) -> float:
    """The mean latency of the step's last requests to finish well, or `fallback` before any did."""
    recent = [d.record.latency for d in done[-_RECENT:] if d.record.ok]
    return statistics.fmean(recent) if recent else fallback


async def _run_step(load: _Load, rate: float, plan: _StepPlan, settings: ProfileSettings) -> StepResult:
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
        window = max(2 * plan.slo_latency, _BLOCK_MIN / rate)  # not the latency seen: overloaded, it only grows
        while samples and samples[0][0] < now - max(_SETTLE_MAX * latency, window) - 1:
            samples.popleft()
        window_mean = _mean_in_flight(samples, now - window, now, area)
        if elapsed >= window and window_mean > (
                _OVERLOAD * want + 3 * math.sqrt(want) + 2) and load.answered:
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
            checks = _slo_checks([d.record for d in sorted(measured, key=lambda d: d.start)], settings,
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
    return _summarise(rate, load.sent.get(step, 0), [d.record for d in kept], settings, now - began,
                      warmup=sent_before if settled is not None else load.sent.get(step, 0), cut_short=cut_short,
                      overloaded=overloaded, settle_seconds=(settled - t0) if settled is not None else elapsed,
                      in_flight=in_flight_mean, want=want, durations=durations)


def _summarise(rate: float, sent: int, records: list[RequestRecord], settings: ProfileSettings, seconds: float,
               warmup: int = 0, cut_short: bool = False, overloaded: bool = False, settle_seconds: float = 0.0,
               in_flight: float | None = None, want: float = 0.0, durations: float = 1.0
               ) -> StepResult:
    ok = [r for r in records if r.ok]
    timeouts = sum(1 for r in records if r.timed_out)
    errors = sum(1 for r in records if not r.ok and not r.timed_out)
    client_errors = sum(1 for r in records if is_client_error(r.status))
    tpots = [r.tpot for r in ok if r.tpot is not None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    first_error = next((r.error for r in records if not r.ok), None)
    checks = _slo_checks(records, settings, durations)
    failed_on_errors = False
    limit: Slo | None = None
    if timeouts:
        passed, reason = False, f"{timeouts} timeout(s), {errors} error(s): {first_error}"
    elif client_errors or errors > ERROR_TOLERANCE * max(len(records), settings.requests_per_step):
        passed, reason = False, (f"{errors} error(s) of {len(records)} measured requests (more than "
                                 f"{100 * ERROR_TOLERANCE:g}%): {first_error}")
        failed_on_errors = not client_errors
    elif overloaded:
        passed, reason = False, (f"overloaded: requests in flight kept growing past {_OVERLOAD:g}x the "
                                 f"{want:.3g} the SLO allows at this rate (the server does not keep up)")
        limit = _binding(checks, settings)
    elif len(checks) < len(settings.slos):
        missing = [slo for slo in settings.slos if slo not in {c.slo for c in checks}]
        what = ("no request produced 2 or more tokens, so TPOT is unknown" if missing == [Slo.TPOT] and ok
                else "no request finished in the step's time")
        passed, reason = False, what
    else:
        failing = [c for c in checks if not c.passed]
        passed = not failing
        limit = _binding(failing or checks, settings)
        reason = "; ".join(f"{slo_label(c.slo, settings)} {c.value_ms:.3g}"
                           + (f" ± {c.half_width_ms:.2g}" if math.isfinite(c.half_width_ms) else "")
                           + f" ms {'<=' if c.passed else '>'} {c.limit_ms:g}" for c in checks)
    if cut_short:
        reason += " (cut short: the step's time cap came before a clear verdict)"
    if errors and not failed_on_errors and not client_errors and not timeouts:
        reason += f" ({errors} error(s) tolerated: {first_error})"
    server_prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return StepResult(
        rate=rate, sent=sent, measured=len(records), ok=len(ok), errors=errors, timeouts=timeouts, passed=passed,
        reason=reason, mean_tpot_ms=_ms(tpots), p50_tpot_ms=_ms(tpots, 0.5), p99_tpot_ms=_ms(tpots, 0.99),
        mean_ttft_ms=_ms(ttfts), p50_ttft_ms=_ms(ttfts, 0.5), p99_ttft_ms=_ms(ttfts, 0.99),
        p50_latency_ms=_ms([r.latency for r in ok], 0.5), p99_latency_ms=_ms([r.latency for r in ok], 0.99),
        server_prompt_tokens=round(statistics.fmean(server_prompt), 1) if server_prompt else None,
        first_error=first_error, seconds=round(seconds, 3), warmup=warmup, client_errors=client_errors,
        failed_on_errors=failed_on_errors,
        mean_output_tokens=round(statistics.fmean(r.output_tokens for r in ok), 2) if ok else None,
        checks=tuple(checks), limit=limit, cut_short=cut_short, overloaded=overloaded,
        settle_seconds=round(settle_seconds, 3), in_flight=round(in_flight, 2) if in_flight is not None else None,
        mean_latency_ms=_ms([r.latency for r in ok]))


def _binding(checks: Sequence[SloCheck], settings: ProfileSettings) -> Slo | None:
    """The SLO nearest to (or furthest over) its limit."""
    if not checks:
        return next(iter(settings.slos), None)
    return max(checks, key=lambda c: c.value_ms / c.limit_ms).slo


# ---- one bucket ----------------------------------------------------------------------------------------------------
def _precision(steps: Sequence[StepResult], settings: ProfileSettings) -> dict[Slo, float]:
    """Per SLO, how well its statistic must be known for the rate to be known within `settings.precision`.

    Near saturation the statistic rises steeply with the rate (10% more rate can double TPOT), elsewhere slowly;
    its elasticity between the two steps around the limit, d ln(statistic) / d ln(rate), converts the rate's
    precision into the statistic's. Before a step has passed and one failed it is the rate's precision itself.
    """
    out = {}
    for slo, limit in settings.slos.items():
        points = [(s.rate, c.value_ms) for s in steps if not s.overloaded for c in s.checks
                  if c.slo == slo and c.value_ms > 0]
        below = max((p for p in points if p[1] <= limit), default=None)
        above = min((p for p in points if p[1] > limit), default=None)
        elasticity = 1.0
        if below is not None and above is not None and above[0] > below[0] and above[1] > below[1]:
            elasticity = math.log(above[1] / below[1]) / math.log(above[0] / below[0])
        out[slo] = min(max(settings.precision * elasticity, settings.precision / 10), 0.1)
    return out


def slo_latency(settings: ProfileSettings, output_tokens: int, probe: RequestRecord | None = None) -> float:
    """Seconds a request of the bucket takes when the server sits exactly at the tightest SLO: what fills the
    server at a step's start (rate x this many in flight) and sets the pace of a step (settling, measuring)."""
    ttft0 = probe.ttft if probe is not None and probe.ok and probe.ttft is not None else 0.0
    tpot0 = probe.tpot if probe is not None and probe.ok and probe.tpot is not None else 0.0
    options = []
    if settings.tpot_slo_ms is not None:
        options.append(ttft0 + (output_tokens - 1) * settings.tpot_slo_ms / 1000)
    if settings.latency_slo_ms is not None:
        options.append(settings.latency_slo_ms / 1000)
    if settings.ttft_slo_ms is not None:
        options.append(settings.ttft_slo_ms / 1000 + (output_tokens - 1) * tpot0)
    value = min(options)
    if probe is not None and probe.ok:
        value = max(value, probe.latency)
    return max(value, 0.001)


def step_cap(settings: ProfileSettings, latency: float) -> float:
    """A step's time cap, seconds: --max-step-seconds, else 30 s or 15 request durations, the larger."""
    return settings.max_step_seconds or max(_STEP_CAP_FLOOR_S, _STEP_CAP_DURATIONS * latency)


def estimate_seconds(settings: ProfileSettings, output_tokens: Sequence[int]) -> float:
    """A rough duration of a profile before it starts: per bucket, the steps a search typically takes (half the
    doublings to --max-rate, then the bisections), each about the time for --requests-per-step arrivals plus
    4 request durations at the SLO (settling, measuring, the last requests finishing); the bisections near the
    limit about 100 arrivals and 6 durations more, since they measure until the statistic is precise."""
    doublings = max(1, math.ceil(math.log(settings.max_rate / settings.start_rate, settings.growth) / 2))
    total = 0.0
    for n in output_tokens:
        latency = slo_latency(settings, n)
        rates = [settings.start_rate * settings.growth ** k for k in range(doublings + 1)]
        cap = step_cap(settings, latency)
        bucket = sum(min(cap, settings.requests_per_step / r + 4 * latency) for r in rates)
        # near the limit a step measures until the statistic is precise: ~100 more requests or durations
        bucket += settings.bisect_steps * min(cap, 100 / rates[-1] + 6 * latency)
        total += min(bucket, 60 * settings.max_minutes) if settings.max_minutes else bucket
    return total


def _fit_crossing(steps: Sequence[StepResult], slo: Slo, limit_ms: float) -> tuple[float, float] | None:
    """Where a least-squares line through (rate, the SLO's statistic) of the steps nearest the limit meets it, and
    the line's slope (ms per req/s).

    Every step near the SLO then counts with its measured value, not only as pass/fail, which averages out the
    noise of single steps (bisection alone follows whichever step happened to be lucky). Only the 4 steps nearest
    the crossing are used: far from it the curve bends (it rises steeply towards saturation).
    """
    points = []
    for s in steps:
        check = next((c for c in s.checks if c.slo == slo), None)
        if check is not None and s.timeouts == 0 and not s.failed_on_errors and not s.client_errors \
                and not s.overloaded:
            points.append((s.rate, check.value_ms))
    below = sorted((p for p in points if p[1] <= limit_ms), key=lambda p: -p[0])[:2]
    above = sorted((p for p in points if p[1] > limit_ms), key=lambda p: p[0])[:2]
    points = below + above
    if not below or not above:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    if slope <= 0:  # noise swamps the trend: no crossing to trust
        return None
    return mean_x + (limit_ms - mean_y) / slope, slope


async def _profile_bucket(client: Client, model: str, cell: Cell, ranges: tuple[tuple[int, int], tuple[int, int]],
                          settings: ProfileSettings, rng: random.Random,
                          emit: Callable[[EventKind, StepResult | None, BucketProfile | None], None]) -> BucketProfile:
    (i_lo, i_hi), (o_lo, o_hi) = ranges
    prompt_tokens, output_tokens = bucket_tokens(*ranges, settings.size)
    timeout = bucket_timeout(settings, prompt_tokens, output_tokens)
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + 60 * settings.max_minutes if settings.max_minutes else math.inf

    def make_payload(max_tokens: int) -> bytes:
        return _completion_payload(model, synthetic_prompt(prompt_tokens, rng), max_tokens, settings)

    # one request alone: its time to first token and its duration make the latency at the SLO more exact
    probe = await client.timed_completion(make_payload(output_tokens), timeout)
    target = slo_latency(settings, output_tokens, probe)
    steps: list[StepResult] = []
    load = _Load(client, make_payload, output_tokens, timeout, rng, block_seconds=target)
    load.answered = probe.ok
    stopped = False

    async def run(rate: float) -> StepResult:
        nonlocal stopped
        latencies = [(abs(math.log(s.rate / rate)), s.mean_latency_ms / 1000) for s in steps
                     if s.mean_latency_ms is not None and not s.overloaded]
        guess = min(latencies)[1] if latencies else (probe.latency if probe.ok else target)
        cap = min(step_cap(settings, target), deadline - loop.time())
        plan = _StepPlan(slo_latency=target, latency_guess=min(guess, target), cap=max(cap, 0.0),
                         precision=_precision(steps, settings))
        result = await _run_step(load, rate, plan, settings)
        steps.append(result)
        emit(EventKind.STEP, result, None)
        if loop.time() >= deadline:
            stopped = True
        return result

    async def step(rate: float) -> StepResult:
        result = await run(rate)
        if result.failed_on_errors and not stopped:  # transient errors: one more try at the same rate
            result = await run(rate)
        return result

    try:
        return await _search(step, lambda: stopped, steps, settings, cell, ranges, prompt_tokens, output_tokens,
                             timeout, began, loop)
    finally:
        await load.close()


async def _search(step: Callable[[float], Awaitable[StepResult]], stopped: Callable[[], bool],
                  steps: list[StepResult], settings: ProfileSettings, cell: Cell,
                  ranges: tuple[tuple[int, int], tuple[int, int]], prompt_tokens: int, output_tokens: int,
                  timeout: float, began: float, loop: asyncio.AbstractEventLoop) -> BucketProfile:
    """The rate search: x growth while every SLO holds, then bisection; its verdict as the bucket's profile."""

    def done(status: BucketStatus, tput: float, message: str, best: StepResult | None,
             limit: Slo | None = None, headroom: float | None = None) -> BucketProfile:
        warnings = []
        short = [s for s in steps if s.mean_output_tokens is not None
                 and s.mean_output_tokens < _SHORT_OUTPUT_SHARE * output_tokens]
        if short and settings.ignore_eos:
            mean = statistics.fmean(s.mean_output_tokens or 0 for s in short)
            warnings.append(f"bucket {cell[0]}:{cell[1]}: the server generated {mean:.3g} of the {output_tokens} "
                            f"tokens asked for (mean, {len(short)} of {len(steps)} steps): it seems to ignore "
                            f"ignore_eos, so the load was lower than intended and this tput is too high")
        cut = sum(1 for s in steps if s.cut_short)
        if cut and status != BucketStatus.CUT_SHORT:
            message += f" ({cut} of {len(steps)} steps hit their time cap undecided)"
        return BucketProfile(cell=cell, input_range=ranges[0], output_range=ranges[1],
                             prompt_tokens=prompt_tokens, output_tokens=output_tokens, status=status, tput=tput,
                             message=message, best=best, steps=tuple(steps), warnings=tuple(warnings),
                             timeout=timeout, limit=limit, headroom=headroom, seconds=round(loop.time() - began, 2))

    def cut_short(lo: StepResult | None, hi: StepResult | None) -> BucketProfile:
        minutes = f"{settings.max_minutes:g}"
        if lo is None:
            return done(BucketStatus.CUT_SHORT, 0.0, f"cut short by --max-minutes {minutes} before any rate "
                                                     f"passed", None)
        tput, limit, headroom = _estimate(lo, hi)
        return done(BucketStatus.CUT_SHORT, tput, f"cut short by --max-minutes {minutes} after {len(steps)} steps; "
                                                  f"highest pass {lo.rate:.3g} req/s"
                    + (f", fails at {hi.rate:.3g} req/s" if hi is not None else ""), lo, limit, headroom)

    def _estimate(lo: StepResult, hi: StepResult | None) -> tuple[float, Slo | None, float | None]:
        """tput (clamped between the last pass and the first fail), the SLO that set it, the headroom to plan."""
        if hi is None:
            return lo.rate, lo.limit, None
        best: tuple[float, Slo, float] | None = None
        for slo, limit_ms in settings.slos.items():
            fit = _fit_crossing(steps, slo, limit_ms)
            if fit is None:
                continue
            crossing = min(max(fit[0], lo.rate), hi.rate)
            if best is None or crossing < best[0]:
                best = (crossing, slo, fit[1])
        if best is None or settings.estimate == Estimate.PASS:
            return lo.rate, hi.limit, None
        crossing, slo, slope = best
        near = min((s for s in steps if any(c.slo == slo and math.isfinite(c.half_width_ms) for c in s.checks)),
                   key=lambda s: abs(s.rate - crossing), default=None)
        headroom = None
        if near is not None:
            half = next(c.half_width_ms for c in near.checks if c.slo == slo)
            headroom = round(max(0.0, min(1.0, 1 - half / slope / crossing)), 3)
        return crossing, slo, headroom

    def hard_failure(r: StepResult) -> BucketProfile | None:
        """The bucket's verdict when the server rejects the request itself, whatever the load."""
        if r.client_errors:
            return done(BucketStatus.FAILED, 0.0, f"the server rejects these requests: {r.first_error}", None)
        if r.ok == 0 and r.timeouts == 0 and r.errors > 0:
            return done(BucketStatus.FAILED, 0.0, f"every request failed ({r.errors} of {r.errors}): {r.first_error}",
                        None)
        return None

    def all_timed_out(r: StepResult) -> bool:
        return r.ok == 0 and r.timeouts > 0

    lo: StepResult | None = None
    hi: StepResult | None = None
    first = await step(settings.start_rate)
    if (verdict := hard_failure(first)) is not None:
        return verdict
    if first.passed:
        lo = first
        while lo.rate < settings.max_rate:
            if stopped():
                return cut_short(lo, None)
            r = await step(min(lo.rate * settings.growth, settings.max_rate))
            if r.passed:
                lo = r
            else:
                hi = r
                break
        if hi is None:
            return done(BucketStatus.CAPPED, lo.rate, f"every SLO still held at --max-rate {settings.max_rate:g} "
                                                      f"req/s; the real maximum is higher", lo, lo.limit)
    else:
        hi = first
        timed_out_in_a_row = 1 if all_timed_out(first) else 0
        while hi.rate / settings.growth >= settings.min_rate * (1 - 1e-9):
            if timed_out_in_a_row >= TIMEOUT_STEPS_TO_FAIL:
                break
            if stopped():
                return cut_short(None, hi)
            r = await step(hi.rate / settings.growth)
            if r.passed:
                lo = r
                break
            hi = r
            if (verdict := hard_failure(r)) is not None:
                return verdict
            timed_out_in_a_row = timed_out_in_a_row + 1 if all_timed_out(r) else 0
        if lo is None:
            if all_timed_out(hi):
                rates = ", ".join(f"{s.rate:g}" for s in steps[-timed_out_in_a_row:])
                return done(BucketStatus.FAILED, 0.0, f"timeouts: every measured request timed out at {rates} req/s: "
                                                      f"{hi.first_error}", None)
            if hi.failed_on_errors:
                return done(BucketStatus.FAILED, 0.0, f"errors: more than {100 * ERROR_TOLERANCE:g}% of requests fail "
                                                      f"even at {hi.rate:g} req/s: {hi.first_error}", None)
            if stopped():
                return cut_short(None, hi)
            return done(BucketStatus.SLO_NOT_MET, 0.0, f"the SLO fails even at {hi.rate:g} req/s ({hi.reason})", None,
                        hi.limit)
    for _ in range(settings.bisect_steps):
        if stopped():
            return cut_short(lo, hi)
        r = await step((lo.rate + hi.rate) / 2)
        if r.passed:
            lo = r
        else:
            hi = r
    tput, limit, headroom = _estimate(lo, hi)
    message = f"highest pass {lo.rate:.3g} req/s, fails at {hi.rate:.3g} req/s: {hi.reason}"
    if tput != lo.rate:
        message = f"fitted crossing of the SLO; {message}"
    return done(BucketStatus.OK, tput, message, lo, limit, headroom)


async def _profile(ep: Endpoint, model: str, input_edges: tuple[int, ...], output_edges: tuple[int, ...],
                   cells: list[Cell], settings: ProfileSettings, on_progress: ProgressCallback | None
                   ) -> list[BucketProfile]:
    await check_endpoint(ep, model, settings)
    client = _client(ep, settings)
    rng = random.Random(settings.seed)
    results = []
    if on_progress is not None:
        outputs = [bucket_tokens((input_edges[i], input_edges[i + 1]), (output_edges[j], output_edges[j + 1]),
                                 settings.size)[1] for i, j in cells]
        bound = 60 * settings.max_minutes * len(cells) if settings.max_minutes else None
        on_progress(ProfileEvent(kind=EventKind.ESTIMATE, total=len(cells),
                                 seconds=estimate_seconds(settings, outputs), max_seconds=bound))
    for index, cell in enumerate(cells, 1):
        i, j = cell
        ranges = ((input_edges[i], input_edges[i + 1]), (output_edges[j], output_edges[j + 1]))
        p_tok, o_tok = bucket_tokens(*ranges, settings.size)

        def emit(kind: EventKind, step: StepResult | None, bucket: BucketProfile | None,
                 _cell: Cell = cell, _index: int = index, _p: int = p_tok, _o: int = o_tok) -> None:
            if on_progress is not None:
                on_progress(ProfileEvent(kind=kind, cell=_cell, index=_index, total=len(cells), prompt_tokens=_p,
                                         output_tokens=_o, step=step, bucket=bucket))

        emit(EventKind.BUCKET_START, None, None)
        bucket = await _profile_bucket(client, model, cell, ranges, settings, rng, emit)
        emit(EventKind.BUCKET_DONE, None, bucket)
        results.append(bucket)
    return results


def profile_endpoint(endpoint: str, model: str, *, input_edges: Sequence[int] = DEFAULT_INPUT_EDGES,
                     output_edges: Sequence[int] = DEFAULT_OUTPUT_EDGES, cells: Sequence[Cell] | None = None,
                     settings: ProfileSettings | None = None,
                     on_progress: ProgressCallback | None = None) -> ProfileResult:
    """Profile `model` at `endpoint` on the given buckets (all by default); buckets not in `cells` are 0.

    Raises `EndpointUnreachable` / `ProfileError` only before measuring (nothing listens, wrong model, bad input);
    once measuring, failures are reported in the bucket's status.
    """
    settings = settings or ProfileSettings()
    ep = parse_endpoint(endpoint)
    in_edges = check_edges(list(input_edges), "input buckets")
    out_edges = check_edges(list(output_edges), "output buckets")
    shape = (len(in_edges) - 1, len(out_edges) - 1)
    chosen = list(cells) if cells is not None else parse_cells("all", shape)
    for i, j in chosen:
        if not (0 <= i < shape[0] and 0 <= j < shape[1]):
            raise ProfileError(f"bucket {i}:{j} is outside the {shape[0]}x{shape[1]} buckets")
    started = time.perf_counter()
    measured = asyncio.run(_profile(ep, model, in_edges, out_edges, chosen, settings, on_progress))
    by_cell = {b.cell: b for b in measured}
    buckets = []
    for i in range(shape[0]):
        for j in range(shape[1]):
            ranges = ((in_edges[i], in_edges[i + 1]), (out_edges[j], out_edges[j + 1]))
            p_tok, o_tok = bucket_tokens(*ranges, settings.size)
            buckets.append(by_cell.get((i, j)) or BucketProfile(
                cell=(i, j), input_range=ranges[0], output_range=ranges[1], prompt_tokens=p_tok, output_tokens=o_tok,
                status=BucketStatus.NOT_MEASURED, tput=0.0, message="not in --buckets"))
    return ProfileResult(endpoint=ep.url, model=model, tpot_slo_ms=settings.tpot_slo_ms, input_edges=in_edges,
                         output_edges=out_edges, buckets=tuple(buckets), settings=settings,
                         seconds=time.perf_counter() - started)


__all__ = [
    "ERROR_TOLERANCE", "PROMPT_WORDS", "ProfileResult", "ProfileSettings", "bucket_timeout", "bucket_tokens",
    "check_endpoint", "estimate_seconds", "parse_cells", "profile_endpoint", "representative_tokens", "slo_latency",
    "step_cap", "synthetic_prompt",
]
