"""Peak request rates: arrivals per minute, and their percentiles, from a trace's timestamps or a router's counts.

A fleet sized on the mean rate saturates in every burst: a trace alternating 5 and 50 req/s by the minute has a mean
of 27.5 req/s, and for half of its minutes a fleet planned for 27.5 queues without bound. The per-minute rate's
percentiles say how high the bursts go; `--rate-percentile 95` plans for a rate exceeded in only 5% of minutes.

Percentiles are nearest-rank over the complete minutes (idle minutes count as 0): the p-th percentile is a rate that
one minute of the trace actually had. Minutes start at the trace's first arrival, so a trace generated minute by
minute is read in its own minutes; the partial minute at the end (and any before the first row, for an unsorted
trace) is left out, because a part of a minute would read as a lower rate.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from melange_sky.errors import TraceError

MINUTE_S = 60.0
#: The percentiles every report shows (100: the busiest minute).
SHOWN_PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("max", 100.0))


def nearest_rank(count: int, p: float) -> int:
    """The 0-based index of the `p`-th percentile among `count` sorted values, nearest rank: the smallest value that
    at least p% of them do not exceed, so always a value some minute really had (the router's `GET /workload` and
    a trace's report agree on what p95 means)."""
    return max(math.ceil(p / 100 * count), 1) - 1


@dataclass(frozen=True)
class MinuteRates:
    """Arrivals per complete minute, kept as the distinct counts (idle minutes as `idle`): percentiles need no more,
    and a month-long trace's 43,200 minutes stay small."""

    busy: tuple[int, ...]  # arrivals in each minute that had any, sorted
    idle: int  # complete minutes without an arrival

    @property
    def minutes(self) -> int:
        return len(self.busy) + self.idle

    def percentile(self, p: float) -> float:
        """The per-minute rate in req/s that `p`% of the minutes did not exceed (nearest rank)."""
        rank = nearest_rank(self.minutes, p)
        return 0.0 if rank < self.idle else self.busy[rank - self.idle] / MINUTE_S

    def shown(self) -> RatePercentiles:
        p50, p95, p99, top = (self.percentile(p) for _, p in SHOWN_PERCENTILES)
        return RatePercentiles(p50, p95, p99, top, minutes=self.minutes)

    @classmethod
    def of(cls, counts: Sequence[int]) -> MinuteRates:
        busy = sorted(c for c in counts if c > 0)
        return cls(tuple(busy), len(counts) - len(busy))


@dataclass(frozen=True)
class RatePercentiles:
    """Percentiles of the per-minute arrival rate, in req/s, over `minutes` complete minutes (None: not known)."""

    p50: float
    p95: float
    p99: float
    max: float
    minutes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"p50": _round(self.p50), "p95": _round(self.p95), "p99": _round(self.p99), "max": _round(self.max),
                "minutes": self.minutes}

    def get(self, p: float) -> float | None:
        """The rate at `p` if it is one of the shown percentiles, else None."""
        return next((getattr(self, name) for name, q in SHOWN_PERCENTILES if q == p), None)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


class MinuteBins:
    """Arrivals per minute, streamed: one counter per minute of the trace's span, never one per row.

    Minute k covers [anchor + 60k, anchor + 60(k + 1)), the anchor being the first timestamp added (in seconds)."""

    def __init__(self) -> None:
        self.anchor: float | None = None
        self.bins: dict[int, int] = {}

    def complete(self, first: float, last: float) -> MinuteRates | None:
        """The minutes wholly inside [first, last] (the trace's earliest and latest arrival); None if none is."""
        if self.anchor is None:
            return None
        lo = math.ceil((first - self.anchor) / MINUTE_S)
        hi = math.floor((last - self.anchor) / MINUTE_S)  # minutes lo .. hi - 1 end by `last`
        if hi <= lo:
            return None
        busy = sorted(n for k, n in self.bins.items() if lo <= k < hi and n > 0)
        return MinuteRates(tuple(busy), hi - lo - len(busy))


def parse_rate_percentile(text: str) -> float:
    """`95`, `p95`, `99.9` or `max` (100) as a percentile in (0, 100]; a `TraceError` otherwise."""
    cleaned = text.strip().lower()
    if cleaned == "max":
        return 100.0
    try:
        p = float(cleaned.removeprefix("p"))
    except ValueError:
        p = math.nan
    if not (0 < p <= 100):
        raise TraceError(f"--rate-percentile must be a percentile in (0, 100] such as 95, p99 or max, got {text!r}")
    return p


def observed_rates(doc: Mapping[str, Any]) -> tuple[MinuteRates | None, RatePercentiles | None]:
    """A router's per-minute arrivals (`minute_arrivals`) and percentiles (`rate_percentiles`), each None when the
    router does not send it (older routers) or sends something unusable."""
    arrivals = doc.get("minute_arrivals")
    minutes = None
    if (isinstance(arrivals, list) and arrivals
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in arrivals)):
        minutes = MinuteRates.of(arrivals)
    given = doc.get("rate_percentiles")
    shown = None
    if isinstance(given, dict):
        values = [given.get(name) for name, _ in SHOWN_PERCENTILES]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
               for v in values):
            p50, p95, p99, top = (float(v) for v in values)  # type: ignore[arg-type]
            shown = RatePercentiles(p50, p95, p99, top, minutes=minutes.minutes if minutes is not None else None)
    if shown is None and minutes is not None:
        shown = minutes.shown()
    return minutes, shown
