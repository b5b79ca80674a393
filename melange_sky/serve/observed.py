"""The workload the router actually sees: requests per bucket over a sliding window, and the arrival rate.

Requests are counted by their *reported* sizes (`usage.prompt_tokens` / `usage.completion_tokens` of the answer),
bucketed with the plan's edges by `core.buckets` (lengths past the edges go to the nearest bucket, as `workload`
counts a trace). A stream that carries no usage (a client that did not ask for `stream_options.include_usage`) is
counted by the router's corrected input estimate and the number of streamed events (about one token each in vLLM
and SGLang); `usage_source` says how many of each. Arrivals count every request the router accepted, answered or
not, so `total_request_rate` is the offered load.

The window is a ring of time slots (1/60 of the window each): memory is fixed, old slots expire as time passes.
Arrivals are also counted per minute (minutes from the counting's start, not the wall clock's), so a controller
can size on a high percentile of the recent per-minute rates instead of the window's mean: `minute_arrivals` (each
complete minute of the window, oldest first) and `rate_percentiles` (p50/p95/p99/max of those minutes in req/s,
nearest-rank: each one a rate some minute really had).
`to_dict()` is `GET /workload`: the config's keys (`workload_distribution`, `total_request_rate`, `input_buckets`,
`output_buckets`) plus `window_s`, `span_s`, `up_s`, `counts`, `requests`, the per-minute arrivals and the lengths
counted past the edges, so `melange-sky workload --from URL` can turn it into config keys for a re-plan.

`total_request_rate` is the arrivals over `span_s`, the time the router has seen traffic: from its first request
(idle time before any client came is not load to plan for) or, once that is older than the window, from the
window's start; quiet spells after the first request count (they are real). `up_s` is the router's own age.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from melange_sky.core.buckets import Bucketer
from melange_sky.inputs.trace_rates import MINUTE_S, SHOWN_PERCENTILES, nearest_rank

SLOTS = 60

__all__ = ["MINUTE_S", "ObservedWorkload", "rate_percentiles"]


class _Slot:
    __slots__ = ("arrivals", "clamped", "counts", "estimated", "index", "reported")

    def __init__(self, index: int, cells: int):
        self.index = index
        self.arrivals = 0
        self.reported = 0
        self.estimated = 0
        self.counts = [0] * cells
        self.clamped = [0, 0, 0, 0]  # input above / below the edges, output above / below


class ObservedWorkload:
    """Counts per bucket and arrivals over the last `window_s` seconds."""

    def __init__(self, input_edges: tuple[int, ...], output_edges: tuple[int, ...], window_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.input_edges, self.output_edges = input_edges, output_edges
        self.inputs, self.outputs = Bucketer(input_edges), Bucketer(output_edges)
        self.cols = len(output_edges) - 1
        self.cells = (len(input_edges) - 1) * self.cols
        self.window_s = window_s
        self.slot_s = window_s / SLOTS
        self.clock = clock
        self.started = clock()
        self.first_arrival: float | None = None  # when the first request came: the rate's span starts there
        self.slots: list[_Slot | None] = [None] * SLOTS
        #: Complete minutes kept: those the window holds whole (at least one).
        self.minutes_kept = max(int(window_s // MINUTE_S), 1)
        self._minute = 0  # the current minute, counted from `started`
        self._minute_arrivals = 0
        self._minute_end = self.started + MINUTE_S
        self._minutes: deque[int] = deque(maxlen=self.minutes_kept)  # arrivals of the minutes before `_minute`

    def _slot(self, now: float | None = None) -> _Slot:
        index = int(((self.clock() if now is None else now) - self.started) / self.slot_s)
        position = index % SLOTS
        slot = self.slots[position]
        if slot is None or slot.index != index:
            slot = self.slots[position] = _Slot(index, self.cells)
        return slot

    def arrival(self) -> None:
        now = self.clock()
        if self.first_arrival is None:
            self.first_arrival = now
        self._slot(now).arrivals += 1
        if now >= self._minute_end:  # one comparison per request; the division only once a minute
            self._roll(int((now - self.started) / MINUTE_S))
        self._minute_arrivals += 1

    def _roll(self, minute: int) -> None:
        """Close the current minute (and the empty ones since) when `minute` has begun."""
        if minute <= self._minute:
            return
        self._minutes.append(self._minute_arrivals)
        self._minutes.extend([0] * min(minute - self._minute - 1, self.minutes_kept))
        self._minute, self._minute_arrivals = minute, 0
        self._minute_end = self.started + (minute + 1) * MINUTE_S

    def minute_arrivals(self) -> list[int]:
        """Arrivals in each complete minute of the window, oldest first."""
        self._roll(int((self.clock() - self.started) / MINUTE_S))
        return list(self._minutes)

    def record(self, input_tokens: int, output_tokens: int, reported: bool) -> None:
        slot = self._slot()
        slot.counts[self.inputs.index(input_tokens) * self.cols + self.outputs.index(output_tokens)] += 1
        if not self.input_edges[0] <= input_tokens <= self.input_edges[-1]:
            slot.clamped[0 if input_tokens > self.input_edges[-1] else 1] += 1
        if not self.output_edges[0] <= output_tokens <= self.output_edges[-1]:
            slot.clamped[2 if output_tokens > self.output_edges[-1] else 3] += 1
        if reported:
            slot.reported += 1
        else:
            slot.estimated += 1

    def to_dict(self) -> dict[str, Any]:
        now = self.clock()
        current = int((now - self.started) / self.slot_s)
        live = [s for s in self.slots if s is not None and current - s.index < SLOTS]
        counts = [0] * self.cells
        for slot in live:
            for k, n in enumerate(slot.counts):
                if n:
                    counts[k] += n
        requests = sum(counts)
        arrivals = sum(s.arrivals for s in live)
        # The span the rate is counted over: from the first request, or the start of the oldest live slot once
        # the first request is older than that (the router's start before any request: the rate is 0 then).
        window_start = self.started + max(current - SLOTS + 1, 0) * self.slot_s
        span = now - max(window_start, self.first_arrival if self.first_arrival is not None else window_start)
        rows = [counts[i * self.cols:(i + 1) * self.cols] for i in range(len(self.input_edges) - 1)]
        clamped = [sum(s.clamped[k] for s in live) for k in range(4)]
        minutes = self.minute_arrivals()
        return {
            "workload_distribution": [[round(c / requests, 6) if requests else 0.0 for c in row] for row in rows],
            "total_request_rate": round(arrivals / span, 6) if span > 0 else 0.0,
            "input_buckets": list(self.input_edges), "output_buckets": list(self.output_edges),
            "window_s": self.window_s, "span_s": round(span, 3), "up_s": round(now - self.started, 3),
            "counts": rows, "requests": requests,
            "arrivals": arrivals, "minute_arrivals": minutes,
            "rate_percentiles": rate_percentiles([n / MINUTE_S for n in minutes]),
            "usage_source": {"reported": sum(s.reported for s in live), "estimated": sum(s.estimated for s in live)},
            "input_overflow": clamped[0], "input_underflow": clamped[1],
            "output_overflow": clamped[2], "output_underflow": clamped[3],
        }


def rate_percentiles(rates: Sequence[float]) -> dict[str, float]:
    """{"p50", "p95", "p99", "max"} of per-minute rates, nearest-rank (the smallest rate at least p% of the minutes
    do not exceed: a rate some minute had, never an interpolation below it); empty without any minute."""
    if not rates:
        return {}
    ordered = sorted(rates)
    return {name: round(ordered[nearest_rank(len(ordered), p)], 6) for name, p in SHOWN_PERCENTILES}
