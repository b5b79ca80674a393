"""SLO attainment: one record per request and the report `simulate` and `replay` both print, so the two can be
compared line by line.

A request *meets the SLOs* when it was answered in full and each SLO given holds for that request itself: its time to
first token <= --ttft-slo-ms, its own TPOT <= --tpot-slo-ms, its end-to-end latency <= --latency-slo-ms. A request's
own TPOT is (latency - TTFT) / (output tokens - 1): the mean gap between its tokens after the first; a one-token
answer has no TPOT and cannot miss that SLO. A request that was refused, failed or did not finish misses every SLO.
**Attainment** is the share of requests that meet every SLO; the verdict compares it with a target (0.99: 99% of
requests).

That is not the criterion `profile` and `estimate` search rates by (`core.slo`): there an SLO holds for a *set* of
requests when a statistic of the set does (the mean TPOT, the p90 TTFT, the p90 latency). A rate can pass that test
while 30% of its requests individually miss the TPOT limit (a mean hides a tail), and a 99% attainment on TTFT is a
statement about the p99 TTFT, not the p90. The report shows both: the attainment (per request) and, beside it, each
SLO's set statistic as `profile` reads it (`slo_statistics`), so a plan sized on profiled rates can be checked
against the statistic it was sized for.

Below the stages that use it (`sim`, `inputs.replay`): plain data and arithmetic, no engine and no sockets.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from melange_sky.core.slo import Slo, Slos, percentile
from melange_sky.errors import MelangeError

#: The verdict's default target: 99% of requests meet every SLO.
DEFAULT_TARGET = 0.99
MINUTE_S = 60.0
_TOLERANCE = 1 + 1e-9

__all__ = ["DEFAULT_TARGET", "AttainmentError", "AttainmentReport", "Group", "Minute", "Percentiles",
           "RequestRecord", "per_request_text", "request_tpot", "summarise"]


class AttainmentError(MelangeError):
    """A summary that cannot be made (no requests, a target outside (0, 1])."""

    exit_code = 2


def per_request_text(slos: Slos) -> str:
    """The SLOs as each request is held to them: "TPOT <= 100 ms, TTFT <= 2000 ms" ("" when none is given)."""
    given = (("TPOT", slos.tpot_ms), ("TTFT", slos.ttft_ms), ("latency", slos.latency_ms))
    return ", ".join(f"{name} <= {value:g} ms" for name, value in given if value is not None)


def request_tpot(ttft_s: float, latency_s: float, output_tokens: int) -> float | None:
    """A request's own time per output token after the first: (latency - TTFT) / (output - 1); None for one
    token."""
    return (latency_s - ttft_s) / (output_tokens - 1) if output_tokens > 1 else None


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times in seconds; `arrival_s` from the start of the run. `ok` is false for a
    request refused, failed or unfinished (then the times are None and it misses every SLO)."""

    arrival_s: float
    gpu: str | None  # the GPU type that served it (None: refused before a replica took it)
    replica: str | None
    bucket: tuple[int, int]  # (input bucket, output bucket) of its sizes
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None = None
    tpot_s: float | None = None  # its own: request_tpot(ttft_s, latency_s, output_tokens)
    latency_s: float | None = None
    ok: bool = True

    @classmethod
    def answered(cls, arrival_s: float, gpu: str | None, replica: str | None, bucket: tuple[int, int],
                 prompt_tokens: int, output_tokens: int, ttft_s: float, latency_s: float) -> RequestRecord:
        """A request answered in full, its TPOT computed from its TTFT and latency."""
        return cls(arrival_s, gpu, replica, bucket, prompt_tokens, output_tokens, ttft_s,
                   request_tpot(ttft_s, latency_s, output_tokens), latency_s, True)

    @classmethod
    def failed(cls, arrival_s: float, gpu: str | None, replica: str | None, bucket: tuple[int, int],
               prompt_tokens: int, output_tokens: int) -> RequestRecord:
        return cls(arrival_s, gpu, replica, bucket, prompt_tokens, output_tokens, ok=False)


@dataclass(frozen=True)
class Percentiles:
    """p50, p90 and p99 in ms (None: no request had the value)."""

    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values_s: Sequence[float]) -> Percentiles:
        if not values_s:
            return cls(None, None, None)
        ordered = sorted(values_s)
        return cls(*(1000 * percentile(ordered, q) for q in (0.5, 0.9, 0.99)))

    def to_json(self) -> dict[str, float | None]:
        return {"p50": _ms(self.p50), "p90": _ms(self.p90), "p99": _ms(self.p99)}


@dataclass(frozen=True)
class Group:
    """The requests of one GPU type, one bucket or the whole run: how many, how many met every SLO, and the
    TTFT, TPOT and latency percentiles of those answered."""

    requests: int
    met: int
    answered: int
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    latency_ms: Percentiles

    @property
    def attainment(self) -> float:
        return self.met / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "attainment": round(self.attainment, 6), "answered": self.answered,
                "ttft_ms": self.ttft_ms.to_json(), "tpot_ms": self.tpot_ms.to_json(),
                "latency_ms": self.latency_ms.to_json()}


@dataclass(frozen=True)
class Minute:
    """One minute of arrivals (from the run's start): how many came, the rate, and the share of them that met every
    SLO. The last minute may be partial (`seconds` < 60)."""

    index: int
    requests: int
    met: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def attainment(self) -> float | None:
        return self.met / self.requests if self.requests else None

    def to_json(self) -> dict[str, Any]:
        attainment = self.attainment
        return {"minute": self.index, "requests": self.requests, "rate": round(self.rate, 4),
                "attainment": None if attainment is None else round(attainment, 6)}


@dataclass(frozen=True)
class AttainmentReport:
    """The summary of a run against its SLOs: overall, per GPU type, per bucket and per minute, and the verdict."""

    slos: Slos
    target: float
    overall: Group
    per_gpu: dict[str, Group]
    per_bucket: dict[tuple[int, int], Group]
    per_minute: list[Minute]
    missed: dict[str, int]  # per SLO ("ttft", "tpot", "latency", "unanswered"): requests that missed it
    slo_statistics: dict[str, float | None]  # each SLO's set statistic as `profile` reads it (ms), e.g. mean TPOT
    refused: int = 0  # requests no replica took
    duration_s: float = 0.0  # from the first arrival to the last
    bucket_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return self.overall.requests

    @property
    def attainment(self) -> float:
        return self.overall.attainment

    @property
    def meets_target(self) -> bool:
        return self.attainment >= self.target

    @property
    def verdict(self) -> str:
        """One line: "meets the target: 99.4% of requests met every SLO (target 99%)" or "misses ..."."""
        word = "meets" if self.meets_target else "misses"
        return (f"{word} the target: {_pct(self.attainment)} of requests met every SLO (target "
                f"{_pct(self.target)})")

    def minute_summary(self) -> dict[str, float | None]:
        """The per-minute attainment's worst, median and best, and the share of minutes at the target."""
        values = sorted(m.attainment for m in self.per_minute if m.attainment is not None)
        if not values:
            return {"worst": None, "median": None, "best": None, "at_target": None}
        return {"worst": values[0], "median": percentile(values, 0.5), "best": values[-1],
                "at_target": sum(v >= self.target for v in values) / len(values)}

    def to_json(self) -> dict[str, Any]:
        """The keys both `simulate --json` and `replay --json` print: attainment, requests, ttft_ms, tpot_ms,
        latency_ms ({p50, p90, p99} each), per_gpu, per_bucket, per_minute; and the verdict, SLOs and misses."""
        return {
            "attainment": round(self.attainment, 6), "requests": self.requests,
            "ttft_ms": self.overall.ttft_ms.to_json(), "tpot_ms": self.overall.tpot_ms.to_json(),
            "latency_ms": self.overall.latency_ms.to_json(),
            "per_gpu": {gpu: g.to_json() for gpu, g in self.per_gpu.items()},
            "per_bucket": {f"{i}:{j}": {**g.to_json(), **({"name": self.bucket_names[(i, j)]}
                                                           if (i, j) in self.bucket_names else {})}
                           for (i, j), g in self.per_bucket.items()},
            "per_minute": [m.to_json() for m in self.per_minute],
            "answered": self.overall.answered, "met": self.overall.met, "refused": self.refused,
            "target": self.target, "meets_target": self.meets_target,
            "slos": {"tpot_ms": self.slos.tpot_ms, "ttft_ms": self.slos.ttft_ms, "latency_ms": self.slos.latency_ms,
                     "ttft_percentile": self.slos.ttft_percentile,
                     "latency_percentile": self.slos.latency_percentile},
            "missed": dict(self.missed), "slo_statistics": {k: _ms(v) for k, v in self.slo_statistics.items()},
            "duration_s": round(self.duration_s, 3),
        }


class _Acc:
    """Running lists of one group (slots: one of these per GPU type and bucket, appended to per request)."""

    __slots__ = ("answered", "latency", "met", "requests", "tpot", "ttft")

    def __init__(self) -> None:
        self.requests = self.met = self.answered = 0
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.latency: list[float] = []

    def group(self) -> Group:
        return Group(self.requests, self.met, self.answered, Percentiles.of(self.ttft), Percentiles.of(self.tpot),
                     Percentiles.of(self.latency))


def summarise(records: Iterable[RequestRecord], slos: Slos, target: float = DEFAULT_TARGET,
              bucket_names: Mapping[tuple[int, int], str] | None = None,
              duration_s: float | None = None) -> AttainmentReport:
    """The report of a run: which requests met every SLO in `slos` (per request, see the module's docstring),
    overall, per GPU type, per bucket and per minute of arrival (minute 0 starts at the first arrival), and each
    SLO's set statistic as `profile` reads it. `duration_s`: how long arrivals were offered (a partial last minute's
    rate is over its own seconds; default: first to last arrival). AttainmentError for no records or a target
    outside (0, 1]."""
    if not 0 < target <= 1:
        raise AttainmentError(f"--target must be a share of requests in (0, 1], such as 0.99, got {target!r}")
    # a value equal to its limit meets it (the tolerance keeps a TPOT of exactly 100 ms from reading as 100.0000001)
    ttft_limit = slos.ttft_ms / 1000 * _TOLERANCE if slos.ttft_ms is not None else math.inf
    tpot_limit = slos.tpot_ms / 1000 * _TOLERANCE if slos.tpot_ms is not None else math.inf
    latency_limit = slos.latency_ms / 1000 * _TOLERANCE if slos.latency_ms is not None else math.inf
    overall = _Acc()
    gpus: dict[str, _Acc] = {}
    buckets: dict[tuple[int, int], _Acc] = {}
    missed = {"ttft": 0, "tpot": 0, "latency": 0, "unanswered": 0}
    rows = list(records)
    if not rows:
        raise AttainmentError("no requests to summarise")
    start = min(r.arrival_s for r in rows)
    end = max(r.arrival_s for r in rows)
    span = max(duration_s if duration_s is not None else end - start, end - start)
    minutes_n = max(int((end - start) // MINUTE_S) + 1, math.ceil(span / MINUTE_S))
    minute_requests = [0] * minutes_n
    minute_met = [0] * minutes_n
    refused = 0
    for r in rows:
        met = r.ok
        if r.ok:
            ttft, latency, tpot = r.ttft_s, r.latency_s, r.tpot_s
            if ttft is None or latency is None:
                raise AttainmentError("an answered request needs its TTFT and latency")
            if ttft > ttft_limit:
                missed["ttft"] += 1
                met = False
            if tpot is not None and tpot > tpot_limit:
                missed["tpot"] += 1
                met = False
            if latency > latency_limit:
                missed["latency"] += 1
                met = False
        else:
            missed["unanswered"] += 1
            if r.gpu is None:
                refused += 1
        k = int((r.arrival_s - start) // MINUTE_S)
        minute_requests[k] += 1
        minute_met[k] += met
        accs = [overall, buckets.get(r.bucket) or buckets.setdefault(r.bucket, _Acc())]
        if r.gpu is not None:
            accs.append(gpus.get(r.gpu) or gpus.setdefault(r.gpu, _Acc()))
        for acc in accs:
            acc.requests += 1
            acc.met += met
            if r.ok:
                acc.answered += 1
                acc.ttft.append(r.ttft_s)  # type: ignore[arg-type]
                acc.latency.append(r.latency_s)  # type: ignore[arg-type]
                if r.tpot_s is not None:
                    acc.tpot.append(r.tpot_s)
    per_minute = [Minute(k, minute_requests[k], minute_met[k], min(MINUTE_S, span - k * MINUTE_S) or MINUTE_S)
                  for k in range(minutes_n)]
    statistics = {slos.label(slo): slos.statistic_ms(slo, overall.tpot, overall.ttft, overall.latency)
                  for slo in (Slo.TPOT, Slo.TTFT, Slo.LATENCY) if slo in slos.limits}
    return AttainmentReport(
        slos=slos, target=target, overall=overall.group(),
        per_gpu={gpu: gpus[gpu].group() for gpu in sorted(gpus)},
        per_bucket={b: buckets[b].group() for b in sorted(buckets)},
        per_minute=per_minute, missed=missed, slo_statistics=statistics, refused=refused, duration_s=span,
        bucket_names=dict(bucket_names or {}))


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _pct(share: float) -> str:
    text = f"{100 * share:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"
