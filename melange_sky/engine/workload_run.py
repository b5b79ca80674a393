"""Point mode over a workload with a length distribution: each request its own prompt and output length.

`estimate.run_point` runs copies of one request (what `vllm bench serve --dataset-name random` sends). A dataset run
(ShareGPT in `vllm bench serve`, a chat dataset in an offline batch) is not its mean: the run lasts as long as its
longest outputs keep the batch busy, and the mean TPOT over requests is weighted by the many short outputs that decode
beside prefill chunks. `run_requests` drives the engine with the given per-request lengths and measures the run as
vLLM's benchmark does (output tokens over the run's duration; TPOT per request = (E2E - TTFT) / (output - 1) over
requests with more than one output token). `sample_requests` draws a run's requests from a published table of
per-request lengths (the dataset's shape), scaled to the run's published means, with a fixed seed.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from melange_sky.engine.engine import Engine
from melange_sky.engine.errors import EngineError
from melange_sky.core.slo import percentile


@dataclass(frozen=True)
class Stats:
    """Mean, median and 90th percentile (ms)."""

    mean: float
    p50: float
    p90: float

    @classmethod
    def of(cls, values_s: list[float]) -> Stats:
        if not values_s:
            return cls(0.0, 0.0, 0.0)
        return cls(1000 * statistics.fmean(values_s), 1000 * percentile(values_s, 0.5),
                   1000 * percentile(values_s, 0.9))

    def to_json(self) -> dict[str, float]:
        return {"mean": round(self.mean, 3), "p50": round(self.p50, 3), "p90": round(self.p90, 3)}


@dataclass(frozen=True)
class PointResult:
    """What one benchmark point measures."""

    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: Stats
    tpot_ms: Stats
    kv_cache_use: float  # peak share of KV blocks used
    preempted: int  # preemptions that happened
    requests: int = 0
    duration_s: float = 0.0
    latency_ms: Stats | None = None

    def to_json(self) -> dict[str, Any]:
        """The keys the issue fixes: output_tokens_per_s, requests_per_s, ttft_ms, tpot_ms, kv_cache_use,
        preempted."""
        return {"output_tokens_per_s": round(self.output_tokens_per_s, 3),
                "requests_per_s": round(self.requests_per_s, 4),
                "ttft_ms": self.ttft_ms.to_json(), "tpot_ms": self.tpot_ms.to_json(),
                "kv_cache_use": round(self.kv_cache_use, 4), "preempted": self.preempted}


@dataclass(frozen=True)
class Request:
    """One request of a workload: its prompt length and the output tokens it generates (max_tokens, ignore_eos)."""

    prompt_tokens: int
    output_tokens: int


@dataclass
class _Timing:
    arrival: float
    output_tokens: int
    first: float | None = None
    done: float | None = None


def run_requests(engine: Engine, requests: Sequence[Request], *, concurrency: int | None = None,
                 rate: float | None = None, seed: int = 0, skip: bool = True,
                 endpoint: str | None = None) -> PointResult:
    """Run `requests` in order on `engine` (which must be idle) and measure the run. Exactly one of `concurrency`
    (closed loop: that many in flight until all are done; concurrency >= len(requests) is a burst or an offline
    batch) and `rate` (open loop, Poisson arrivals with a fixed seed). `skip` jumps over eventless decode steps
    (`Engine.skip_decodes`): the same answer, faster. `endpoint`: the OpenAI endpoint the requests come to, which
    sets their API-server cost (`Engine.add`; None: the engine's coefficients as given)."""
    if (concurrency is None) == (rate is None):
        raise EngineError("give exactly one of concurrency and rate")
    if not requests:
        raise EngineError("a workload needs at least one request")
    if concurrency is not None and concurrency < 1:
        raise EngineError(f"concurrency must be at least 1, got {concurrency}")
    if rate is not None and not rate > 0:
        raise EngineError(f"rate must be positive, got {rate}")
    for r in requests:
        if r.prompt_tokens < 1 or r.output_tokens < 1:
            raise EngineError(f"every request needs at least 1 prompt and 1 output token, got {r}")
    rng = random.Random(seed)
    timings: dict[Hashable, _Timing] = {}
    total = len(requests)
    now = 0.0
    next_arrival = 0.0

    def admit(at: float) -> None:
        rid = len(timings)
        r = requests[rid]
        timings[rid] = _Timing(at, r.output_tokens)
        engine.add(rid, r.prompt_tokens, r.output_tokens, at=at, endpoint=endpoint)

    if concurrency is not None:
        for _ in range(min(concurrency, total)):
            admit(0.0)
    done = 0
    while done < total:
        if rate is not None:
            while len(timings) < total and next_arrival <= now:
                admit(next_arrival)
                next_arrival += rng.expovariate(rate)
            if not engine.has_work:
                engine.idle(next_arrival - now)
                now = next_arrival
                continue
        if skip:
            limit = (next_arrival - now) if rate is not None and len(timings) < total else math.inf
            now += engine.skip_decodes(limit)[1]
        step = engine.step()
        if step is None:
            break
        now += step.duration_s
        for rid in step.first_token:
            timings[rid].first = now
        for rid in step.finished:
            timings[rid].done = now
            done += 1
            if concurrency is not None and len(timings) < total:
                admit(now)
    return _summarise(engine, timings, now)


def _summarise(engine: Engine, timings: dict[Hashable, _Timing], end: float) -> PointResult:
    finished = [t for t in timings.values() if t.done is not None and t.first is not None]
    start = min((t.arrival for t in timings.values()), default=0.0)
    duration = max(end - start, 1e-12)
    ttfts = [t.first - t.arrival for t in finished if t.first is not None]
    tpots = [(t.done - t.first) / (t.output_tokens - 1) for t in finished
             if t.done is not None and t.first is not None and t.output_tokens > 1]
    latencies = [t.done - t.arrival for t in finished if t.done is not None]
    return PointResult(
        output_tokens_per_s=sum(t.output_tokens for t in finished) / duration,
        requests_per_s=len(finished) / duration,
        ttft_ms=Stats.of(ttfts), tpot_ms=Stats.of(tpots),
        kv_cache_use=engine.peak_blocks_used / engine.kv_blocks, preempted=engine.preemptions,
        requests=len(finished), duration_s=duration, latency_ms=Stats.of(latencies))


def sample_requests(pairs: Sequence[tuple[int, int]], n: int, *, prompt_mean: float | None = None,
                    output_mean: float | None = None, max_prompt: int | None = None, max_total: int | None = None,
                    min_tokens: int = 1, seed: int = 0) -> list[Request]:
    """`n` requests drawn with replacement (fixed seed) from a published table of (prompt, output) lengths, each
    side then scaled so that its mean is the run's published mean (the shape is the table's, the size the run's),
    within [min_tokens, max_prompt] for prompts and prompt + output <= max_total (a benchmark's length filter)."""
    if n < 1 or not pairs:
        raise EngineError("sampling a workload needs at least one length pair and n >= 1")
    rng = random.Random(seed)
    drawn = [pairs[rng.randrange(len(pairs))] for _ in range(n)]

    def factor(values: list[int], mean: float | None) -> float:
        return 1.0 if mean is None else mean / (sum(values) / len(values))

    fp = factor([p for p, _ in drawn], prompt_mean)
    fo = factor([o for _, o in drawn], output_mean)
    out = []
    for p, o in drawn:
        prompt = max(min_tokens, round(p * fp))
        if max_prompt is not None:
            prompt = min(prompt, max_prompt)
        output = max(min_tokens, round(o * fo))
        if max_total is not None:
            output = max(min_tokens, min(output, max_total - prompt))
        out.append(Request(prompt, output))
    return out
