"""`estimate`'s two questions, answered by running the engine model on a virtual clock.

Point mode (`run_point`): the shape published benchmarks use: a closed loop (C requests always in flight until N are
done; C == N is an offline batch) or an open loop (Poisson arrivals at R req/s), every request I prompt tokens and
exactly O output tokens (ignore_eos). Returns throughput, TTFT and TPOT statistics, KV cache use and preemptions.

Table mode (`max_rates`): per GPU type and bucket, the highest Poisson rate whose SLO statistics hold at steady
state — the question `melange-sky profile` asks a real server, with the same representative lengths and the same
statistics (melange_sky.core.slo), and requests to the same endpoint (`CLIENT_ENDPOINT`: plain completions, the
API server's cost for them), so an estimate and a profile of the same server agree.
"""
from __future__ import annotations

import copy
import itertools
import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from melange_sky.core.config import Pricer
from melange_sky.core.config_doc import MergeResult, check_merged, gpu_entry, new_gpu_entry, per_gpu_tputs
from melange_sky.core.gpus import same_gpu
from melange_sky.core.slo import ProfileSize, Slo, Slos, arrival_gaps, bucket_tokens, percentile
from melange_sky.engine.engine import Engine
from melange_sky.engine.errors import DoesNotFit, EngineError
from melange_sky.engine.hardware import GpuSpec, gpu_spec
from melange_sky.engine.models import ModelSpec
from melange_sky.engine.settings import EngineSettings
from melange_sky.engine.step_time import CLIENT_ENDPOINT
from melange_sky.engine.workload_run import PointResult, Request, Stats, run_requests



def run_point(engine: Engine, *, input_tokens: int, output_tokens: int, concurrency: int | None = None,
              rate: float | None = None, requests: int | None = None, seed: int = 0,
              skip: bool = True, endpoint: str | None = None) -> PointResult:
    """Run one benchmark point on `engine` (which must be idle) and measure it. Exactly one of `concurrency` (closed
    loop) and `rate` (open loop, Poisson) is given; `requests` defaults to max(concurrency, 200) closed, or
    max(200, 60 s of arrivals) open. `skip` jumps over eventless decode steps (`Engine.skip_decodes`): the same
    answer, faster. `endpoint`: the OpenAI endpoint the client sends to ("chat" or "completions": its API-server
    cost; None: the engine's coefficients as given)."""
    if (concurrency is None) == (rate is None):
        raise EngineError("give exactly one of --concurrency and --rate")
    if input_tokens < 1 or output_tokens < 1:
        raise EngineError("--input-tokens and --output-tokens must be at least 1")
    if requests is None:  # run_requests checks concurrency and rate themselves
        requests = max(concurrency, 200) if concurrency is not None else max(200, math.ceil(60 * (rate or 0)))
    if requests < 1:
        raise EngineError(f"--requests must be at least 1, got {requests}")
    return run_requests(engine, [Request(input_tokens, output_tokens)] * requests, concurrency=concurrency,
                        rate=rate, seed=seed, skip=skip, endpoint=endpoint)


EngineFactory = Callable[[], Engine]

# ---- table mode ----------------------------------------------------------------------------------------------------
#: Relative width of the bisection's final bracket (the reported rate is then fitted inside it).
RATE_PRECISION = 0.02
#: How well each rate's SLO statistic is measured near the limit: its ~95% interval, turned into a rate by the
#: statistic's elasticity (d ln statistic / d ln rate), is within this share of the rate. The answer's seed-to-seed
#: spread is then about a third of it: one estimate is the estimate, not one draw of it.
RATE_ACCURACY = 0.02
#: ... but never looser than this share of the limit, however steeply the statistic climbs (near saturation a loose
#: statistic is a short run, and a short run there is not yet at steady state).
STATISTIC_ACCURACY_MAX = 0.03
#: Requests measured per rate: at least MIN_MEASURED (the first look), then twice as many at each look until every
#: SLO's statistic is decided or known to the accuracy asked for, at most MAX_MEASURED. On the virtual clock a
#: request costs tens of microseconds.
MIN_MEASURED, MAX_MEASURED = 200, 12800
#: The requests measured are those arriving once WARMUP_LATENCIES request latencies (a moving mean of those
#: finishing) have passed and WARMUP_MIN requests have finished, or after MAX_WARMUP arrivals: `profile` likewise
#: measures once a step has settled, a fraction to a few request durations in.
WARMUP_LATENCIES, WARMUP_MIN, MAX_WARMUP = 1.5, 5, 2000
#: A rate is overloaded when its mean requests in flight exceed this many times what the SLOs allow (rate x the
#: latency at the SLO), with `profile`'s allowance for noise (melange_sky/inputs/profile_load.py `run_step`): the
#: same bound `profile` fails a step by, here read at steady state.
OVERLOAD_FACTOR = 3.0
#: ... and it runs away (overloaded, stopped at once) when the requests in flight at any moment pass this many times
#: that bound: a queue growing without end (above the capacity the bracket allows for, or preemptions thrashing).
RUNAWAY_FACTOR = 4.0
#: Batch means: at most this many batches, each at least one request duration long and of at least this many
#: requests (a percentile's batches: 20).
MAX_BATCHES, BATCH_MIN, PERCENTILE_BATCH_MIN = 30, 8, 20
#: A statistic decides pass or fail early only when the limit lies this many half-widths of its interval away (it is
#: looked at again as the measurement grows: as `profile`'s steps do).
SEQUENTIAL = 1.5
#: Rates nearest an SLO's limit that its crossing is fitted through (as `profile`'s "fit" estimate).
CROSSING_POINTS = 4
#: The bisection's checks are measured this many times less precisely (a verdict, not a value); then the two ends of
#: its last bracket are measured to RATE_ACCURACY, and moved (at most REFINE_MOVES times) where a coarse verdict was
#: wrong.
COARSE, REFINE_MOVES = 3.0, 4


@dataclass(frozen=True)
class RateCheck:
    """One rate tried at steady state: whether every SLO held, and each SLO's statistic (ms) with the half-width of
    its ~95% interval (ms; inf when too few requests to tell)."""

    rate: float
    passed: bool
    overloaded: bool
    statistics: dict[Slo, float | None]
    limit: Slo | None = None  # the SLO that failed (or, passing, came nearest its limit)
    half_widths: dict[Slo, float] = field(default_factory=dict)
    measured: int = 0  # requests measured


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


def slo_latency(slos: Slos, output_tokens: int, alone: PointResult | None = None) -> float:
    """Seconds a request of the bucket takes with the server exactly at the tightest SLO, from one request alone
    (`Slos.latency_at`, as `profile` reads it from its probe request)."""
    if alone is None:
        return slos.latency_at(output_tokens)
    return slos.latency_at(output_tokens, alone.ttft_ms.mean / 1000, alone.tpot_ms.mean / 1000,
                           (alone.latency_ms.mean if alone.latency_ms else 0.0) / 1000)


def _t95(batches: int) -> float:
    """Student's t for a two-sided 95% interval from `batches` batch means (batches - 1 degrees of freedom)."""
    dof = max(1, batches - 1)
    return {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}.get(dof, 1.96 + 2.4 / dof)


def _interval(slos: Slos, slo: Slo, values: Sequence[float], durations: float) -> tuple[float, float]:
    """An SLO's statistic (ms) over `values` (seconds, in arrival order, spanning `durations` latencies at the SLO)
    and the half-width of its ~95% interval from batch means (requests in flight together share the load, so their
    values are correlated; batches a latency or more long much less so); inf when too few to tell."""
    q = 0.0 if slo == Slo.TPOT else (slos.ttft_percentile if slo == Slo.TTFT else slos.latency_percentile) / 100

    def of(batch: Sequence[float]) -> float:
        return statistics.fmean(batch) if slo == Slo.TPOT else percentile(batch, q)

    point = 1000 * of(values)
    per_batch = BATCH_MIN if slo == Slo.TPOT else PERCENTILE_BATCH_MIN
    count = min(MAX_BATCHES, int(durations), len(values) // per_batch)
    if count < 3:
        return point, math.inf
    size = len(values) / count
    batches = [of(values[round(k * size):round((k + 1) * size)]) for k in range(count)]
    half = _t95(count) * statistics.stdev(batches) / math.sqrt(count)
    if slo == Slo.TPOT:  # never narrower than the requests taken as independent
        half = max(half, 1.96 * statistics.stdev(values) / math.sqrt(len(values)))
    return point, 1000 * half


def check_rate(make_engine: EngineFactory, prompt_tokens: int, output_tokens: int, rate: float, slos: Slos, *,
               seed: int = 0, latency_s: float | None = None, capacity: float | None = None,
               min_measured: int = MIN_MEASURED, max_measured: int = MAX_MEASURED,
               accuracy: Mapping[Slo, float] | None = None) -> RateCheck:
    """Run arrivals at `rate` (`core.slo.arrival_gaps`: the traffic `profile` sends, to its endpoint,
    `CLIENT_ENDPOINT`) and judge the SLOs at steady state: a warm-up of about WARMUP_LATENCIES request latencies is
    discarded, then `min_measured` requests are measured while arrivals go on (so the last ones see the same load as
    the first), and twice as many at each look until every SLO's statistic is decided (the limit SEQUENTIAL
    half-widths away) or known within `accuracy` (per SLO, a share of its limit), or `max_measured` were measured.
    `latency_s`: the latency at the SLO (`slo_latency`). Overloaded: a rate above `capacity` (the engine's saturated
    throughput, req/s; not run), one whose requests in flight run away, or one whose mean in flight over the measured
    requests exceeds OVERLOAD_FACTOR x what the SLOs allow (`profile`'s bound). Deterministic for a seed."""
    limits = slos.limits
    nothing: dict[Slo, float | None] = {slo: None for slo in limits}
    if capacity is not None and rate > capacity:
        return RateCheck(rate, False, True, nothing)
    latency = latency_s or slo_latency(slos, output_tokens)
    want = rate * latency
    bound = OVERLOAD_FACTOR * want + 3 * math.sqrt(want) + 2
    runaway = RUNAWAY_FACTOR * bound + 8
    measured = max(2, min_measured)
    warmup = last = 1 << 62  # until the warm-up is over
    engine = make_engine()
    arrivals_at = itertools.accumulate(arrival_gaps(rate, latency, random.Random(seed)))
    arrivals: list[float] = []
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    now = 0.0
    next_arrival = next(arrivals_at)
    pending = measured
    recent = 0.0  # a moving mean of the latencies of the requests finishing (s)
    while True:
        while pending > 0:
            while next_arrival <= now:
                rid = len(arrivals)
                arrivals.append(next_arrival)
                engine.add(rid, prompt_tokens, output_tokens, at=next_arrival, endpoint=CLIENT_ENDPOINT)
                next_arrival = next(arrivals_at)
            if engine.running + engine.waiting > runaway:
                return RateCheck(rate, False, True, nothing, measured=0)
            if warmup > len(arrivals) and (len(arrivals) >= MAX_WARMUP or (
                    len(done) >= WARMUP_MIN and now >= WARMUP_LATENCIES * recent)):
                warmup = len(arrivals)  # the requests from here on are measured
                last = warmup + measured
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
                recent += (now - arrivals[rid] - recent) * (0.1 if len(done) > 1 else 1.0)
                if warmup <= rid < last:
                    pending -= 1
        ids = range(warmup, last)
        in_flight = sum(done[i] - arrivals[i] for i in ids) / max(arrivals[last - 1] - arrivals[warmup], 1e-12)
        if in_flight > bound:
            return RateCheck(rate, False, True, nothing, measured=len(ids))
        series = {Slo.TTFT: [first[i] - arrivals[i] for i in ids], Slo.LATENCY: [done[i] - arrivals[i] for i in ids],
                  Slo.TPOT: [(done[i] - first[i]) / (output_tokens - 1) for i in ids] if output_tokens > 1 else []}
        # the span measured, in request durations as they were (batches of about one are nearly independent)
        durations = (arrivals[last - 1] - arrivals[warmup]) / max(statistics.fmean(series[Slo.LATENCY]), 1e-9)
        values: dict[Slo, float | None] = {}
        halves: dict[Slo, float] = {}
        settled = True
        for slo, limit in limits.items():
            if not series[slo]:
                values[slo], halves[slo] = None, math.inf
                continue
            point, half = _interval(slos, slo, series[slo], durations)
            values[slo], halves[slo] = point, half
            wanted = (accuracy or {}).get(slo, RATE_ACCURACY) * limit
            settled = settled and (abs(point - limit) > SEQUENTIAL * half or half <= wanted)
        if settled or measured >= max_measured:
            break
        more = min(measured, max_measured - measured)
        measured += more
        pending += sum(1 for rid in range(last, last + more) if rid not in done)  # some are done already
        last += more
    ratios = {slo: (v / limits[slo]) if v is not None else 0.0 for slo, v in values.items()}
    worst = max(ratios, key=lambda k: ratios[k]) if ratios else None
    passed = all(r <= 1.0 for r in ratios.values())
    return RateCheck(rate, passed, False, values, worst, halves, measured)


def _accuracy(checks: Sequence[RateCheck], slos: Slos, accuracy: float = RATE_ACCURACY) -> dict[Slo, float]:
    """Per SLO, how well its statistic must be known for the rate to be known within `accuracy`: that share
    times the statistic's elasticity between the checks on either side of the limit (1 before there are both), as
    `profile`'s `precision_needed`."""
    out = {}
    for slo, limit in slos.limits.items():
        points = [(c.rate, v) for c in checks if not c.overloaded and (v := c.statistics.get(slo)) is not None
                  and v > 0 and c.rate > 0]
        below = max((p for p in points if p[1] <= limit), default=None)
        above = min((p for p in points if p[1] > limit), default=None)
        elasticity = 1.0
        if below is not None and above is not None and above[0] > below[0] and above[1] > below[1]:
            elasticity = math.log(above[1] / below[1]) / math.log(above[0] / below[0])
        out[slo] = min(max(accuracy * elasticity, accuracy / 10), STATISTIC_ACCURACY_MAX)
    return out


def max_rate(make_engine: EngineFactory, prompt_tokens: int, output_tokens: int, slos: Slos, *,
             cell: tuple[int, int] = (0, 0), seed: int = 0, precision: float = RATE_PRECISION,
             min_measured: int = MIN_MEASURED, max_measured: int = MAX_MEASURED,
             accuracy: float = RATE_ACCURACY) -> BucketRate:
    """The highest Poisson rate at which every SLO holds at steady state: bracketed by the engine's saturated
    throughput (a closed loop at max_num_seqs), bisected to `precision`, then fitted where the SLO statistics cross
    their limits (each measured until its interval pins the rate within `accuracy`)."""
    probe = make_engine()
    alone = run_point(probe, input_tokens=prompt_tokens, output_tokens=output_tokens, concurrency=1, requests=1,
                      endpoint=CLIENT_ENDPOINT)
    latency = slo_latency(slos, output_tokens, alone)
    alone_s = (alone.latency_ms.mean if alone.latency_ms else 0.0) / 1000
    single = check_rate(make_engine, prompt_tokens, output_tokens, 1e-3 / max(alone_s, 1e-3), slos, seed=seed,
                        latency_s=latency, min_measured=min(min_measured, MIN_MEASURED // 4),
                        max_measured=min(max_measured, MIN_MEASURED // 4))
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
    saturated = min(saturated, probe.frontend_capacity(output_tokens, CLIENT_ENDPOINT))

    fine: set[float] = set()

    def check(rate: float, precise: bool = False) -> RateCheck:
        shares = {slo: share * (1 if precise else COARSE) for slo, share in _accuracy(checks, slos, accuracy).items()}
        result = check_rate(make_engine, prompt_tokens, output_tokens, rate, slos, seed=seed, latency_s=latency,
                            capacity=saturated, min_measured=min_measured, max_measured=max_measured,
                            accuracy=shares)
        if precise:
            fine.add(rate)
            checks[:] = [c for c in checks if c.rate != rate]  # the same arrivals, measured longer
        checks.append(result)
        return result

    lo, hi = 0.0, saturated
    lo_check: RateCheck | None = None
    hi_check: RateCheck | None = None
    # many buckets hold their SLOs up to the engine's capacity: try just below it first
    top = (1 - precision) * saturated
    if (first := check(top)).passed:
        lo, lo_check = top, first
    else:
        hi, hi_check = top, first
    while hi - lo > precision * hi * (1 + 1e-9):
        rate = (lo + hi) / 2 if lo > 0 else hi / 2
        if (result := check(rate)).passed:
            lo, lo_check = rate, result
        else:
            hi, hi_check = rate, result
        if lo == 0 and hi < precision * saturated:
            break  # passes alone but not at any rate worth serving
    if lo > 0:
        # the bracket's ends measured to `accuracy` (the bisection's checks are COARSE): the crossing is fitted
        # through them; where a coarse verdict was wrong, the bracket moves by its width and is measured again
        for _ in range(REFINE_MOVES):
            width = max(hi - lo, precision * lo)
            if lo not in fine and not (lo_check := check(lo, precise=True)).passed:
                hi, hi_check = lo, lo_check  # the crossing lies lower
                lo, lo_check = (lo - width if lo > width else lo / 2), None
                continue
            if hi_check is None or hi_check.overloaded or hi in fine or not (hi_check := check(hi, True)).passed:
                break
            lo, lo_check = hi, hi_check  # the crossing lies higher
            hi = min(hi + width, saturated)
            hi_check = None if hi >= saturated else check(hi)
    limit = (checks[-1].limit if lo_check is None else lo_check.limit)
    if lo <= 0 or lo_check is None or not lo_check.passed:
        return BucketRate(cell, prompt_tokens, output_tokens, 0.0 if lo <= 0 else round(lo, 3), limit, tuple(checks))
    if hi_check is None:  # held up to the top tried, just below capacity: no crossing to fit
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


def _crossing(checks: Sequence[RateCheck], slos: Slos, lo: float, hi: float) -> tuple[float, Slo | None]:
    """Where a line through each SLO's statistic (over its limit) at the rates nearest the limit meets 1, least
    squares weighted by each statistic's precision, clamped to the bisection's bracket [lo, hi]; the lowest of the
    SLOs' crossings, and that SLO. This is `profile`'s default estimate, and it evens out what noise is left. `lo`
    when no line rises through the limit (an overload-bound bucket)."""
    best, which = hi, None
    for slo, limit in slos.limits.items():
        points = [(c.rate, v / limit, max(c.half_widths.get(slo, math.inf), 1e-3 * limit) / limit) for c in checks
                  if not c.overloaded and (v := c.statistics.get(slo)) is not None and c.rate > 0]
        points.sort(key=lambda p: abs(p[1] - 1))
        points = [p for p in points[:CROSSING_POINTS] if math.isfinite(p[2])]
        if len(points) < 2:
            continue
        weights = [1 / (h * h) for _r, _y, h in points]
        total = sum(weights)
        mean_r = sum(w * r for w, (r, _y, _h) in zip(weights, points)) / total
        mean_y = sum(w * y for w, (_r, y, _h) in zip(weights, points)) / total
        spread = sum(w * (r - mean_r) ** 2 for w, (r, _y, _h) in zip(weights, points))
        if spread <= 0:
            continue
        slope = sum(w * (r - mean_r) * (y - mean_y) for w, (r, y, _h) in zip(weights, points)) / spread
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
                 output_edges: Sequence[int], source: str = "<config>", price: Pricer | None = None,
                 replica_gpus: int = 1) -> MergeResult:
    """`config` with each estimated GPU's tputs set (a new gpu_info entry where needed, gpu_info as a dict or a list),
    the bucket edges recorded, and a catalog cost written for a GPU that has none (priced by `price`, as `profile
    --into` does). GPUs without a matrix (does not fit) are left out, with a warning. A config's tputs are per GPU
    (an instance of k GPUs serves k times them, deploy/offers.py), so a replica of `replica_gpus` (its TP) is
    written as its rate over that many GPUs, and a new entry gets the pin `accelerators: "GPU:tp"` (core.config_doc
    .new_gpu_entry) so its instances hold whole replicas."""
    data = copy.deepcopy(config)
    warnings: list[str] = []
    added: list[str] = []
    for name, table in tables.items():
        if table.tputs is None:
            warnings.append(f"{name}: {table.note}: no entry written")
            continue
        entry, new = gpu_entry(data, name, source)
        if new:
            entry.update(new_gpu_entry(name, replica_gpus))
        entry["tputs"] = per_gpu_tputs(table.tputs, replica_gpus)
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


__all__ = ["BucketRate", "EngineFactory", "GpuTable", "PointResult", "RateCheck", "Stats", "check_rate",
           "max_rate", "max_rates", "merge_tables", "run_point", "saturated_rate", "slo_latency"]
