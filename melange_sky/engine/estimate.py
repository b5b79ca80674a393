"""`estimate`'s two questions, answered by running the engine model on a virtual clock.

Point mode (`run_point`): the shape published benchmarks use: a closed loop (C requests always in flight until N are
done; C == N is an offline batch) or an open loop (Poisson arrivals at R req/s), every request I prompt tokens and
exactly O output tokens (ignore_eos). Returns throughput, TTFT and TPOT statistics, KV cache use and preemptions.

Table mode (`max_rates`): per GPU type and bucket, the highest Poisson rate whose SLO statistics hold at steady
state — the question `melange-sky profile` asks a real server, with the same representative lengths and the same
statistics (melange_sky.core.slo), so an estimate and a profile of the same server agree.
"""
from __future__ import annotations

import copy
import math
import random
import statistics
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from melange_sky.core.config import Pricer
from melange_sky.core.config_doc import MergeResult, check_merged, gpu_entry
from melange_sky.core.gpus import same_gpu
from melange_sky.core.slo import ProfileSize, Slo, Slos, bucket_tokens, percentile
from melange_sky.engine.engine import Engine
from melange_sky.engine.errors import DoesNotFit, EngineError
from melange_sky.engine.hardware import GpuSpec, gpu_spec
from melange_sky.engine.models import ModelSpec
from melange_sky.engine.settings import EngineSettings


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
              rate: float | None = None, requests: int | None = None, seed: int = 0,
              skip: bool = True) -> PointResult:
    """Run one benchmark point on `engine` (which must be idle) and measure it. Exactly one of `concurrency` (closed
    loop) and `rate` (open loop, Poisson) is given; `requests` defaults to max(concurrency, 200) closed, or
    max(200, 60 s of arrivals) open. `skip` jumps over eventless decode steps (`Engine.skip_decodes`): the same
    answer, faster."""
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
        engine.add(rid, input_tokens, output_tokens, at=at)

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
                engine.idle(next_arrival - now)
                now = next_arrival
                continue
        if skip:
            limit = (next_arrival - now) if rate is not None and len(timings) < requests else math.inf
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

# ---- table mode ----------------------------------------------------------------------------------------------------
#: Relative precision of a bucket's max rate (the bisection stops when the bracket is this narrow).
RATE_PRECISION = 0.02
#: Requests measured per rate, at least and at most, after a warm-up of about 1.5 latencies' worth of arrivals
#: (at most MAX_WARMUP): enough for the requests in flight to settle where the SLOs put them.
MIN_MEASURED, MAX_MEASURED, MAX_WARMUP = 200, 1000, 2000
#: A rate is overloaded when requests in flight exceed this many times what the SLOs allow (rate x latency at the
#: SLO), as `profile` judges a step (melange_sky/inputs/profile.py).
OVERLOAD_FACTOR = 3.0


@dataclass(frozen=True)
class RateCheck:
    """One rate tried at steady state: whether every SLO held, and each SLO's statistic (ms)."""

    rate: float
    passed: bool
    overloaded: bool
    statistics: dict[Slo, float | None]
    limit: Slo | None = None  # the SLO that failed (or, passing, came nearest its limit)


@dataclass(frozen=True)
class BucketRate:
    """A bucket's max rate on one engine: `tput` req/s (0: the SLO is not met even alone)."""

    cell: tuple[int, int]
    prompt_tokens: int
    output_tokens: int
    tput: float
    limit: Slo | None
    checks: tuple[RateCheck, ...] = ()


@dataclass(frozen=True)
class GpuTable:
    """One GPU type's `tputs` over a config's buckets, or why it has none (`note`: "does not fit: ...")."""

    gpu: str
    tputs: list[list[float]] | None
    note: str | None = None
    engine: str | None = None  # Engine.description
    fit_source: str | None = None  # the calibration fit used, if any
    buckets: tuple[BucketRate, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"tputs": self.tputs}
        if self.note:
            data["note"] = self.note
        if self.engine:
            data["engine"] = self.engine
        if self.fit_source:
            data["calibration"] = self.fit_source
        return data


TableProgress = Callable[[str, int, int, "BucketRate | None"], None]


def check_rate(make_engine: EngineFactory, prompt_tokens: int, output_tokens: int, rate: float, slos: Slos,
               seed: int = 0, latency_hint_s: float | None = None, capacity: float | None = None,
               min_measured: int = MIN_MEASURED) -> RateCheck:
    """Run Poisson arrivals at `rate` until the measured requests are done and judge the SLOs at steady state:
    a warm-up of about 1.5 latencies' worth of arrivals is discarded, then MIN..MAX_MEASURED requests are measured
    while arrivals go on (so the last ones see the same load as the first). A rate above `capacity` (the engine's
    saturated throughput, req/s) has no steady state: overloaded, not run. Deterministic for a seed."""
    limits = slos.limits
    if capacity is not None and rate > capacity:
        return RateCheck(rate, False, True, {slo: None for slo in limits}, None)
    engine = make_engine()
    rng = random.Random(seed)
    latency = latency_hint_s or 1.0
    allowed = _latency_at_slo(slos, output_tokens, latency)
    in_flight_cap = OVERLOAD_FACTOR * rate * allowed + 8
    warmup = min(MAX_WARMUP, math.ceil(1.5 * rate * allowed) + 10)
    measured = min(MAX_MEASURED, max(min_measured, math.ceil(rate * allowed)))
    last = warmup + measured
    arrivals: list[float] = []
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    now = 0.0
    next_arrival = rng.expovariate(rate)
    pending = measured
    overloaded = False
    while pending > 0:
        while next_arrival <= now:
            rid = len(arrivals)
            arrivals.append(next_arrival)
            engine.add(rid, prompt_tokens, output_tokens, at=next_arrival)
            next_arrival += rng.expovariate(rate)
        if engine.running + engine.waiting > in_flight_cap:
            overloaded = True
            break
        if not engine.has_work:
            engine.idle(next_arrival - now)
            now = next_arrival
            continue
        now += engine.skip_decodes(next_arrival - now)[1]
        step = engine.step()
        if step is None:
            continue
        now += step.duration_s
        for got in step.first_token:
            first[int(got)] = now  # type: ignore[call-overload]  # ids here are the ints added above
        for got in step.finished:
            rid = int(got)  # type: ignore[call-overload]
            done[rid] = now
            if warmup <= rid < last:
                pending -= 1
    if overloaded:
        return RateCheck(rate, False, True, {slo: None for slo in limits}, None)
    ids = range(warmup, last)
    ttfts = [first[i] - arrivals[i] for i in ids]
    tpots = [(done[i] - first[i]) / (output_tokens - 1) for i in ids] if output_tokens > 1 else []
    latencies = [done[i] - arrivals[i] for i in ids]
    values = {slo: slos.statistic_ms(slo, tpots, ttfts, latencies) for slo in limits}
    ratios = {slo: (v / limits[slo]) if v is not None else 0.0 for slo, v in values.items()}
    worst = max(ratios, key=lambda k: ratios[k]) if ratios else None
    passed = all(r <= 1.0 for r in ratios.values())
    return RateCheck(rate, passed, False, values, worst)


def _latency_at_slo(slos: Slos, output_tokens: int, alone_s: float) -> float:
    """How long a request may take under the SLOs (s): what `profile` scales its in-flight bound by."""
    if slos.latency_ms is not None:
        return slos.latency_ms / 1000
    allowed = (slos.ttft_ms or 0) / 1000 + (output_tokens - 1) * (slos.tpot_ms or 0) / 1000
    return max(allowed, 2 * alone_s)


def max_rate(make_engine: EngineFactory, prompt_tokens: int, output_tokens: int, slos: Slos, *,
             cell: tuple[int, int] = (0, 0), seed: int = 0, precision: float = RATE_PRECISION,
             min_measured: int = MIN_MEASURED) -> BucketRate:
    """The highest Poisson rate at which every SLO holds at steady state, to `precision` (relative): bracketed by
    the engine's saturated throughput (a closed loop at max_num_seqs), then bisected."""
    probe = make_engine()
    alone = run_point(probe, input_tokens=prompt_tokens, output_tokens=output_tokens, concurrency=1, requests=1)
    alone_s = (alone.latency_ms.mean if alone.latency_ms else 0.0) / 1000
    single = check_rate(make_engine, prompt_tokens, output_tokens, 1e-3 / max(alone_s, 1e-3), slos, seed, alone_s,
                        min_measured=min(min_measured, MIN_MEASURED // 4))
    checks = [single]
    if not single.passed:
        return BucketRate(cell, prompt_tokens, output_tokens, 0.0, single.limit, tuple(checks))
    probe = make_engine()
    fits = max(1, probe.memory.kv_tokens // (prompt_tokens + output_tokens))
    # the most the server completes per second: the GPU's steady-state throughput with as many requests running as
    # the KV cache holds, and with twice that (preemptions may cost more than the larger batch gains), each capped
    # by max_num_seqs; or what its API server sustains, if less. No Poisson rate above it has a steady state.
    saturated = max(saturated_rate(make_engine, prompt_tokens, output_tokens, c, seed)
                    for c in sorted({min(probe.max_num_seqs, fits), min(probe.max_num_seqs, 2 * fits)}))
    saturated = min(saturated, probe.frontend_capacity(output_tokens))
    lo, hi = 0.0, saturated
    lo_check: RateCheck | None = None
    # many buckets hold their SLOs up to the engine's capacity: try just below it first
    top = (1 - precision) * saturated
    first = check_rate(make_engine, prompt_tokens, output_tokens, top, slos, seed, alone_s, saturated, min_measured)
    checks.append(first)
    if first.passed:
        lo, lo_check = top, first
    else:
        hi = top
    while hi - lo > precision * hi:
        rate = (lo + hi) / 2 if lo > 0 else hi / 2
        check = check_rate(make_engine, prompt_tokens, output_tokens, rate, slos, seed, alone_s, saturated,
                           min_measured)
        checks.append(check)
        if check.passed:
            lo, lo_check = rate, check
        else:
            hi = rate
        if lo == 0 and hi < precision * saturated:
            break  # passes alone but not at any rate worth serving
    limit = (checks[-1].limit if lo_check is None else lo_check.limit)
    if lo <= 0:
        return BucketRate(cell, prompt_tokens, output_tokens, 0.0, limit, tuple(checks))
    if all(c.passed for c in checks):  # held up to the top tried, just below capacity: no crossing to fit
        return BucketRate(cell, prompt_tokens, output_tokens, round(lo, 3), limit, tuple(checks))
    rate, crossing_limit = _crossing(checks, slos, lo, hi)
    return BucketRate(cell, prompt_tokens, output_tokens, round(rate, 3), crossing_limit or limit, tuple(checks))


def saturated_rate(make_engine: EngineFactory, prompt_tokens: int, output_tokens: int, concurrency: int,
                   seed: int = 0) -> float:
    """Requests per second the engine (the GPU, without its API server) completes with `concurrency` requests
    always in flight, at steady state: output tokens per second over two rounds of the loop, after the first
    `concurrency` completions, divided by the tokens of a request. The first round's requests have random output
    lengths, so the loop starts staggered, as Poisson arrivals would leave it (equal requests started together
    finish in waves that take many rounds to smear out)."""
    engine = make_engine().without_frontend()
    rng = random.Random(seed)
    for rid in range(concurrency):
        engine.add(rid, prompt_tokens, rng.randint(1, output_tokens))
    added, done, total = concurrency, 0, 3 * concurrency + 40
    now, tokens = 0.0, 0
    start_time, start_tokens = 0.0, 0
    while done < total:
        steps, seconds = engine.skip_decodes(math.inf)
        tokens += steps * engine.decoding
        now += seconds
        step = engine.step()
        if step is None:
            break
        now += step.duration_s
        tokens += step.decodes - len(step.preempted) + len(step.first_token) + len(step.resumed)
        for _rid in step.finished:
            done += 1
            if done == concurrency:
                start_time, start_tokens = now, tokens
            engine.add(added, prompt_tokens, output_tokens)
            added += 1
    if now <= start_time:
        return math.inf
    return (tokens - start_tokens) / (now - start_time) / output_tokens


#: Rates nearest an SLO's limit that its crossing is fitted through (as `profile`'s "fit" estimate).
CROSSING_POINTS = 4


def _crossing(checks: Sequence[RateCheck], slos: Slos, lo: float, hi: float) -> tuple[float, Slo | None]:
    """Where a least-squares line through each SLO's statistic (over its limit) at the rates nearest the limit meets
    1, clamped to the bisection's bracket [lo, hi]; the lowest of the SLOs' crossings, and that SLO. This is
    `profile`'s default estimate, and it evens out the noise of any one rate's statistic. `lo` when no line
    rises through the limit (an overload-bound bucket)."""
    best, which = hi, None
    for slo, limit in slos.limits.items():
        points = [(c.rate, v / limit) for c in checks
                  if not c.overloaded and (v := c.statistics.get(slo)) is not None and c.rate > 0]
        points.sort(key=lambda p: abs(p[1] - 1))
        points = points[:CROSSING_POINTS]
        if len(points) < 2:
            continue
        mean_r = statistics.fmean(r for r, _ in points)
        mean_y = statistics.fmean(y for _, y in points)
        spread = sum((r - mean_r) ** 2 for r, _ in points)
        if spread <= 0:
            continue
        slope = sum((r - mean_r) * (y - mean_y) for r, y in points) / spread
        if slope <= 0:
            continue
        crossing = mean_r + (1 - mean_y) / slope
        if crossing < best:
            best, which = crossing, slo
    if which is None:
        return lo, None
    return min(max(best, lo), hi), which


def max_rates(model: ModelSpec, gpus: Sequence[str], input_edges: Sequence[int], output_edges: Sequence[int],
              slos: Slos, *, tp: int = 1, dtype: str = "bf16", settings: EngineSettings = EngineSettings(),
              size: ProfileSize = ProfileSize.MID, seed: int = 0,
              progress: TableProgress | None = None) -> dict[str, GpuTable]:
    """Each GPU type's `tputs` over the buckets given by the edges: per bucket, at its representative lengths
    (`core.slo.bucket_tokens`, as `profile` runs it), the highest Poisson rate whose SLO statistics hold at steady
    state. A GPU that cannot hold the model gets no matrix and a note."""
    rows, cols = len(input_edges) - 1, len(output_edges) - 1
    tables: dict[str, GpuTable] = {}
    for name in gpus:
        spec = gpu_spec(name)
        try:
            first = Engine(model, spec, tp=tp, dtype=dtype, settings=settings)
        except DoesNotFit as exc:
            tables[spec.name] = GpuTable(spec.name, None, note=str(exc))
            continue
        tputs = [[0.0] * cols for _ in range(rows)]
        buckets: list[BucketRate] = []
        too_long: list[str] = []
        total = rows * cols
        for k, (i, j) in enumerate((i, j) for i in range(rows) for j in range(cols)):
            prompt, output = bucket_tokens((input_edges[i], input_edges[i + 1]),
                                           (output_edges[j], output_edges[j + 1]), size)
            if progress:
                progress(spec.name, k, total, None)
            if prompt + output > first.max_model_len:
                bucket = BucketRate((i, j), prompt, output, 0.0, None)
                too_long.append(f"{i}:{j}")
            else:
                def make(spec: GpuSpec = spec) -> Engine:
                    return Engine(model, spec, tp=tp, dtype=dtype, settings=settings)

                bucket = max_rate(make, prompt, output, slos, cell=(i, j), seed=seed)
            buckets.append(bucket)
            tputs[i][j] = bucket.tput
            if progress:
                progress(spec.name, k + 1, total, bucket)
        if too_long:
            first.notes.append(f"0 where a request is longer than max_model_len {first.max_model_len}: "
                               f"{', '.join(too_long)}")
        notes = "; ".join(first.notes) or None
        tables[spec.name] = GpuTable(spec.name, tputs, note=notes, engine=first.description,
                                     fit_source=first.fit_source, buckets=tuple(buckets))
    return tables


def merge_tables(config: dict[str, Any], tables: dict[str, GpuTable], input_edges: Sequence[int],
                 output_edges: Sequence[int], source: str = "<config>", price: Pricer | None = None) -> MergeResult:
    """`config` with each estimated GPU's tputs set (a new gpu_info entry where needed, gpu_info as a dict or a list),
    the bucket edges recorded, and a catalog cost written for a GPU that has none (priced by `price`, as `profile
    --into` does). GPUs without a matrix (does not fit) are left out, with a warning."""
    data = copy.deepcopy(config)
    warnings: list[str] = []
    added: list[str] = []
    for name, table in tables.items():
        if table.tputs is None:
            warnings.append(f"{name}: {table.note}: no entry written")
            continue
        entry, new = gpu_entry(data, name, source)
        entry["tputs"] = [list(row) for row in table.tputs]
        if "cost" not in entry:
            added.append(name)
    data.setdefault("input_buckets", list(input_edges))
    data.setdefault("output_buckets", list(output_edges))
    parsed, found = check_merged(data, source, price)
    if parsed is not None:
        for gpu in parsed.gpus:
            if any(same_gpu(gpu.name, name) for name in added) and gpu.cost_source == "catalog":
                entry, _new = gpu_entry(data, gpu.name, source)
                entry["cost"] = round(gpu.cost, 4)
                warnings.append(f"{source}: {gpu.name} priced from the catalog at ${gpu.cost:.4g}/h per GPU "
                                f"(set its cost to use your own price)")
    warnings.extend(found)
    return MergeResult(data=data, warnings=tuple(warnings), valid=parsed is not None)


__all__ = ["BucketRate", "EngineFactory", "GpuTable", "PointResult", "RateCheck", "Stats", "check_rate", "max_rate",
           "max_rates", "merge_tables", "run_point", "saturated_rate"]
