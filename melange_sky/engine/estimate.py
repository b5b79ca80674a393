"""`estimate`'s two questions, answered by running the engine model on a virtual clock.

Point mode (`run_point`): the shape published benchmarks use: a closed loop (C requests always in flight until N are
done; C == N is an offline batch) or an open loop (Poisson arrivals at R req/s), every request I prompt tokens and
exactly O output tokens (ignore_eos). Returns throughput, TTFT and TPOT statistics, KV cache use and preemptions.

Table mode (`max_rates`): per GPU type and bucket, the highest Poisson rate whose SLO statistics hold at steady
state — the question `melange-sky profile` asks a real server, with the same representative lengths and the same
statistics (melange_sky.core.slo), so an estimate and a profile of the same server agree.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from melange_sky.core.slo import percentile
from melange_sky.engine.engine import Engine
from melange_sky.engine.errors import EngineError


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


@dataclass
class _Timing:
    arrival: float
    first: float | None = None
    done: float | None = None


def run_point(engine: Engine, *, input_tokens: int, output_tokens: int, concurrency: int | None = None,
              rate: float | None = None, requests: int | None = None, seed: int = 0) -> PointResult:
    """Run one benchmark point on `engine` (which must be idle) and measure it. Exactly one of `concurrency` (closed
    loop) and `rate` (open loop, Poisson) is given; `requests` defaults to max(concurrency, 200) closed, or
    max(200, 60 s of arrivals) open."""
    if (concurrency is None) == (rate is None):
        raise EngineError("give exactly one of --concurrency and --rate")
    if input_tokens < 1 or output_tokens < 1:
        raise EngineError("--input-tokens and --output-tokens must be at least 1")
    if concurrency is not None and concurrency < 1:
        raise EngineError(f"--concurrency must be at least 1, got {concurrency}")
    if rate is not None and not rate > 0:
        raise EngineError(f"--rate must be positive, got {rate}")
    if requests is None:
        requests = max(concurrency, 200) if concurrency is not None else max(200, math.ceil(60 * (rate or 0)))
    if requests < 1:
        raise EngineError(f"--requests must be at least 1, got {requests}")
    rng = random.Random(seed)
    timings: dict[Hashable, _Timing] = {}
    now = 0.0
    next_arrival = 0.0

    def admit(at: float) -> None:
        rid = len(timings)
        timings[rid] = _Timing(at)
        engine.add(rid, input_tokens, output_tokens)

    if concurrency is not None:
        for _ in range(min(concurrency, requests)):
            admit(0.0)
    done = 0
    while done < requests:
        if rate is not None:
            while len(timings) < requests and next_arrival <= now:
                admit(next_arrival)
                next_arrival += rng.expovariate(rate)
            if not engine.has_work:
                now = next_arrival
                continue
        step = engine.step()
        if step is None:
            break
        now += step.duration_s
        for rid in step.first_token:
            timings[rid].first = now
        for rid in step.finished:
            timings[rid].done = now
            done += 1
            if concurrency is not None and len(timings) < requests:
                admit(now)
    return _summarise(engine, timings, output_tokens, now)


def _summarise(engine: Engine, timings: dict[Hashable, _Timing], output_tokens: int, end: float) -> PointResult:
    finished = [t for t in timings.values() if t.done is not None and t.first is not None]
    start = min((t.arrival for t in timings.values()), default=0.0)
    duration = max(end - start, 1e-12)
    ttfts = [t.first - t.arrival for t in finished if t.first is not None]
    tpots = [(t.done - t.first) / (output_tokens - 1) for t in finished
             if t.done is not None and t.first is not None and output_tokens > 1]
    latencies = [t.done - t.arrival for t in finished if t.done is not None]
    return PointResult(
        output_tokens_per_s=len(finished) * output_tokens / duration,
        requests_per_s=len(finished) / duration,
        ttft_ms=Stats.of(ttfts), tpot_ms=Stats.of(tpots),
        kv_cache_use=engine.peak_blocks_used / engine.kv_blocks, preempted=engine.preemptions,
        requests=len(finished), duration_s=duration, latency_ms=Stats.of(latencies))


EngineFactory = Callable[[], Engine]

__all__ = ["EngineFactory", "PointResult", "Stats", "run_point"]
