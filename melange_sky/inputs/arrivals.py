"""The requests offered to a plan: a trace's timestamps and sizes, or Poisson arrivals (steady or bursty) with sizes
drawn from a histogram. `simulate` runs them through a model of the fleet; `replay` can send the same ones to a real
endpoint, so the two see the same requests at the same times.

Arrivals are three parallel lists (seconds from the start, prompt tokens, output tokens), sorted by time: a run of an
hour at 50 req/s is 180,000 of them, and lists of numbers cost a fraction of a record per request.

Bursts (`Burst`): the rate alternates between a high level, `factor` times the mean, for `on_s` seconds at the start
of every `period_s`, and the low level that keeps the mean at the rate given for the rest of the period. `--burst 2`
(one minute in five at twice the rate, 0.75x the rest) offers the same requests per hour as a steady run, in bursts
a plan sized on the mean cannot absorb. Within each level arrivals are Poisson.
"""
from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from melange_sky.core.buckets import check_edges
from melange_sky.errors import MelangeError, TraceError
from melange_sky.inputs.trace_formats import ColumnChoice
from melange_sky.inputs.trace_rates import MinuteBins, MinuteRates
from melange_sky.inputs.trace_rows import GZIP_ERRORS, Row, TraceRows, detect_format, gzip_reason, open_binary

__all__ = ["Arrivals", "ArrivalsError", "Burst", "parse_burst", "poisson_arrivals", "trace_arrivals"]


class ArrivalsError(MelangeError):
    """Arrivals that cannot be made as asked (a bad rate, duration or burst; a trace without timestamps or rate)."""

    exit_code = 2


@dataclass(frozen=True)
class Arrivals:
    """Requests in arrival order: `times` (s from the first), `prompts` and `outputs` (tokens); `duration_s` is how
    long arrivals were offered (the trace's span, or --duration)."""

    times: list[float]
    prompts: list[int]
    outputs: list[int]
    duration_s: float
    description: str
    minute_rates: MinuteRates | None = None  # per complete minute (a trace's), for --rate-percentile
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.times)

    @property
    def mean_rate(self) -> float:
        """Requests per second over the span they were offered in (a trace that runs out before --duration: its
        own span)."""
        return len(self.times) / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class Burst:
    """On/off bursts: `factor` x the mean rate for the first `on_s` s of every `period_s` s, the rest at the level
    that keeps the mean."""

    factor: float
    on_s: float = 60.0
    period_s: float = 300.0

    @property
    def low_factor(self) -> float:
        return (self.period_s - self.factor * self.on_s) / (self.period_s - self.on_s)

    def text(self) -> str:
        return (f"bursts of {self.factor:g}x for {self.on_s:g} s every {self.period_s:g} s "
                f"({self.low_factor:.3g}x between)")


def parse_burst(text: str) -> Burst:
    """`FACTOR[,ON_S[,PERIOD_S]]` (default 60 s in every 300 s): e.g. `2`, `3,30,600`. ArrivalsError otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or not all(math.isfinite(v) for v in values):
        raise ArrivalsError(f"--burst must be FACTOR[,ON_S[,PERIOD_S]] (e.g. 2, or 3,30,600), got {text!r}")
    burst = Burst(*values)
    if burst.factor < 1 or burst.on_s <= 0 or burst.period_s <= burst.on_s:
        raise ArrivalsError(f"--burst {text}: needs FACTOR >= 1 and 0 < ON_S < PERIOD_S")
    if burst.factor * burst.on_s > burst.period_s:
        raise ArrivalsError(f"--burst {text}: {burst.factor:g}x for {burst.on_s:g} s is more than the mean rate "
                              f"offers in a {burst.period_s:g} s period; lower FACTOR or ON_S, or lengthen PERIOD_S")
    return burst


def _segments(duration_s: float, rate: float, burst: Burst | None) -> Iterator[tuple[float, float, float]]:
    """(start, end, rate) pieces of constant rate covering [0, duration_s)."""
    if burst is None:
        yield 0.0, duration_s, rate
        return
    start = 0.0
    while start < duration_s:
        on_end = min(start + burst.on_s, duration_s)
        yield start, on_end, rate * burst.factor
        end = min(start + burst.period_s, duration_s)
        if on_end < end:
            yield on_end, end, rate * burst.low_factor
        start += burst.period_s


def poisson_arrivals(rate: float, duration_s: float, distribution: Sequence[Sequence[float]],
                     input_edges: Sequence[int], output_edges: Sequence[int], *, seed: int = 0,
                     burst: Burst | None = None) -> Arrivals:
    """Poisson arrivals at `rate` req/s for `duration_s` s (or bursts around it), each request's bucket drawn from the
    histogram `distribution` and its lengths uniform within the bucket's edges ([lo, hi), the last bucket's `hi`
    included, at least 1 token). The same seed gives the same requests."""
    if not (math.isfinite(rate) and rate > 0):
        raise ArrivalsError(f"--rate must be a positive number of requests per second, got {rate!r}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ArrivalsError(f"--duration must be a positive number of seconds, got {duration_s!r}")
    in_edges = check_edges(list(input_edges), "input buckets")
    out_edges = check_edges(list(output_edges), "output buckets")
    rows, cols = len(in_edges) - 1, len(out_edges) - 1
    weights = [float(w) for row in distribution for w in row]
    if len(distribution) != rows or any(len(row) != cols for row in distribution) or not sum(weights) > 0:
        raise ArrivalsError(f"the workload histogram must be {rows}x{cols} with some weight")
    cumulative = []
    total = 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    rng = random.Random(seed)
    expovariate, rand, randint = rng.expovariate, rng.random, rng.randint
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    last_in, last_out = rows - 1, cols - 1
    for start, end, level in _segments(duration_s, rate, burst):
        if level <= 0:
            continue
        t = start + expovariate(level)
        while t < end:
            cell = bisect.bisect_right(cumulative, rand() * total)
            i, j = divmod(min(cell, len(weights) - 1), cols)
            times.append(t)
            prompts.append(randint(max(1, in_edges[i]), max(1, in_edges[i + 1] - (i < last_in))))
            outputs.append(randint(max(1, out_edges[j]), max(1, out_edges[j + 1] - (j < last_out))))
            t += expovariate(level)
    if not times:
        raise ArrivalsError(f"no request arrives in {duration_s:g} s at {rate:g} req/s: lengthen --duration")
    what = f"Poisson at {rate:g} req/s" + (f" with {burst.text()}" if burst else "")
    return Arrivals(times, prompts, outputs, duration_s, f"{what} for {duration_s:g} s (seed {seed})")


def trace_arrivals(path: str, *, columns: ColumnChoice | None = None, fmt: str | None = None, skip_bad: bool = False,
                   rate: float | None = None, duration_s: float | None = None, seed: int = 0) -> Arrivals:
    """A trace's requests at its timestamps (relative to the first), read as `workload` reads it (every format,
    the same column options). With `rate` (or when the trace has no timestamps, which then needs it) its sizes in
    order, Poisson at that rate. `duration_s` keeps the first seconds only."""
    source = str(path)
    fmt = fmt or detect_format(source)
    if fmt not in ("jsonl", "csv"):
        raise TraceError(f"{source}: unknown trace format {fmt!r}; use jsonl or csv")
    reader = TraceRows(source, skip_bad, columns or ColumnChoice())
    rows: list[Row]
    with open_binary(source) as handle:
        try:
            rows = list(reader.jsonl_rows(handle) if fmt == "jsonl" else reader.csv_rows(handle))
        except GZIP_ERRORS as exc:
            raise TraceError(f"{source}: cannot read: {gzip_reason(exc)}") from None
    if not rows:
        raise TraceError(f"{source}: no requests in the trace")
    warnings: list[str] = []
    if reader.skipped:
        warnings.append(f"skipped {reader.skipped} broken row(s) (first: {'; '.join(reader.examples)})")
    if reader.failed:
        warnings.append(f"skipped {reader.failed} failed request(s) the trace marks as such")
    zero = sum(1 for _i, o, _t in rows if o < 1) + sum(1 for i, _o, _t in rows if i < 1)
    if zero:
        warnings.append(f"{zero} request(s) with 0 prompt or output tokens are simulated with 1")
    timed = rate is None and all(t is not None for _i, _o, t in rows)
    if rate is None and not timed:
        raise ArrivalsError(f"{source}: {sum(1 for r in rows if r[2] is None)} row(s) have no timestamp; pass "
                              f"--rate R to offer the trace's requests as Poisson arrivals at R req/s")
    if timed:
        if any(rows[k][2] > rows[k + 1][2] for k in range(len(rows) - 1)):  # type: ignore[operator]
            rows.sort(key=lambda r: r[2])  # type: ignore[arg-type, return-value]
        first = rows[0][2]
        assert first is not None
        times = [t - first for _i, _o, t in rows]  # type: ignore[operator]
        span = times[-1]
        what = f"{len(rows):,} requests of {source} at their timestamps"
    else:
        assert rate is not None
        rng = random.Random(seed)
        times, t = [], 0.0
        for _ in rows:
            times.append(t)
            t += rng.expovariate(rate)
        span = times[-1]
        what = f"{len(rows):,} requests of {source}, Poisson at {rate:g} req/s (seed {seed})"
    prompts = [max(1, i) for i, _o, _t in rows]
    outputs = [max(1, o) for _i, o, _t in rows]
    if duration_s is not None:
        cut = bisect.bisect_left(times, duration_s)
        if cut == 0:
            raise ArrivalsError(f"--duration {duration_s:g}: no request of {source} arrives that early")
        if cut < len(times):
            del times[cut:], prompts[cut:], outputs[cut:]
            span = duration_s
            what += f", the first {duration_s:g} s"
        elif len(times) > 1:  # the trace runs out first: its requests were offered over its own span
            what += f", all of them: the last arrives at {span:.3g} s, before --duration {duration_s:g}"
        else:
            span = duration_s
    minutes = MinuteBins()
    for t in times:
        minutes.bins[int(t // 60)] = minutes.bins.get(int(t // 60), 0) + 1
    minutes.anchor = 0.0
    return Arrivals(times, prompts, outputs, max(span, 1e-9), what, minutes.complete(0.0, span),
                    tuple(warnings))
