"""What a bucket's max rate means, shared by every stage that measures or predicts one (`profile` against a server,
the engine model's `estimate`, `simulate`): the length a bucket is run at, the SLOs and how each is read off a set of
requests. One definition here, so an estimate and a profile of the same server answer the same question.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum


#: The SLO held when none is given: mean TPOT <= 120 ms (profile, estimate, simulate and replay alike).
DEFAULT_TPOT_SLO_MS = 120.0
#: A rate is measured on arrivals that come in blocks of at least this many (see `arrival_gaps`).
ARRIVAL_BLOCK_MIN = 20


class Slo(StrEnum):
    """The SLOs a rate can be held to (`--tpot-slo-ms`, `--ttft-slo-ms`, `--latency-slo-ms`)."""

    TPOT = "tpot"  # mean time per output token
    TTFT = "ttft"  # time to first token, at --ttft-percentile
    LATENCY = "latency"  # whole request, at --latency-percentile


class ProfileSize(StrEnum):
    """The length a bucket is run at (`--size`)."""

    MID = "mid"  # its midpoint
    UPPER = "upper"  # its largest length: conservative


def representative_tokens(lo: int, hi: int, size: ProfileSize = ProfileSize.MID) -> int:
    """The length a bucket [lo, hi) is run at: its midpoint, or its largest length ("upper")."""
    value = (lo + hi) // 2 if size == ProfileSize.MID else hi - 1
    return max(1, value, lo)


def bucket_tokens(input_range: tuple[int, int], output_range: tuple[int, int],
                  size: ProfileSize = ProfileSize.MID) -> tuple[int, int]:
    """(prompt tokens, output tokens) a bucket is run at; at least 2 output tokens, since TPOT needs 2."""
    return representative_tokens(*input_range, size), max(2, representative_tokens(*output_range, size))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (q in [0, 1]) of `values`, linearly interpolated between order statistics."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * min(max(q, 0.0), 1.0)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def arrival_gaps(rate: float, latency_s: float, rng: random.Random) -> Iterator[float]:
    """The gaps (s) between the arrivals a rate is judged on, by `profile` against a server and by `estimate` on the
    engine model: Poisson at `rate`, in blocks of max(ARRIVAL_BLOCK_MIN, rate x `latency_s`) arrivals (a request's
    latency at the SLO, `Slos.latency_at`), each block rescaled to last exactly block / rate. Bursts as in real
    traffic within a request's lifetime, and the rate asked for over every block: unconditioned, a short measurement's
    count is off by ~1/sqrt(count), and near saturation a few % more arrivals move the mean TPOT several times as
    much. (Over longer spans this traffic is smoother than Poisson: a rate holds its SLOs a few % higher on it.)"""
    block = max(ARRIVAL_BLOCK_MIN, math.ceil(rate * latency_s))
    while True:
        gaps = [rng.expovariate(1.0) for _ in range(block)]
        scale = block / rate / sum(gaps)
        yield from (gap * scale for gap in gaps)


@dataclass(frozen=True)
class Slos:
    """The SLOs a rate must hold (ms; None: not held) and the percentiles TTFT and latency are read at."""

    tpot_ms: float | None = DEFAULT_TPOT_SLO_MS
    ttft_ms: float | None = None
    ttft_percentile: float = 90.0
    latency_ms: float | None = None
    latency_percentile: float = 90.0

    @property
    def limits(self) -> dict[Slo, float]:
        """The SLOs given, in ms."""
        given = {Slo.TPOT: self.tpot_ms, Slo.TTFT: self.ttft_ms, Slo.LATENCY: self.latency_ms}
        return {slo: value for slo, value in given.items() if value is not None}

    def label(self, slo: Slo) -> str:
        """How an SLO's statistic is named in messages: "mean TPOT", "p90 TTFT", "p90 latency"."""
        if slo == Slo.TPOT:
            return "mean TPOT"
        q = self.ttft_percentile if slo == Slo.TTFT else self.latency_percentile
        return f"p{q:g} {'TTFT' if slo == Slo.TTFT else 'latency'}"

    def text(self) -> str:
        """The SLOs in words: "mean TPOT <= 120 ms, p90 TTFT <= 500 ms"."""
        return ", ".join(f"{self.label(slo)} <= {value:g} ms" for slo, value in self.limits.items())

    def latency_at(self, output_tokens: int, alone_ttft_s: float = 0.0, alone_tpot_s: float = 0.0,
                   alone_latency_s: float = 0.0) -> float:
        """Seconds a request of `output_tokens` takes with the server exactly at the tightest SLO, from a request
        alone (its TTFT, TPOT and latency): what sizes a measurement's warm-up, its arrival blocks and the load it
        calls overloaded, in `profile` and `estimate` alike."""
        options = []
        if self.tpot_ms is not None:
            options.append(alone_ttft_s + (output_tokens - 1) * self.tpot_ms / 1000)
        if self.latency_ms is not None:
            options.append(self.latency_ms / 1000)
        if self.ttft_ms is not None:
            options.append(self.ttft_ms / 1000 + (output_tokens - 1) * alone_tpot_s)
        value = max(min(options, default=1.0), alone_latency_s)
        return max(value, 0.001)

    def statistic_ms(self, slo: Slo, tpots_s: Sequence[float], ttfts_s: Sequence[float],
                     latencies_s: Sequence[float]) -> float | None:
        """An SLO's statistic over a set of requests (seconds in, ms out): the mean TPOT, or the TTFT or latency
        percentile; None when no request has the value."""
        if slo == Slo.TPOT:
            return 1000 * statistics.fmean(tpots_s) if tpots_s else None
        values, q = ((ttfts_s, self.ttft_percentile) if slo == Slo.TTFT else (latencies_s, self.latency_percentile))
        return 1000 * percentile(values, q / 100) if values else None
