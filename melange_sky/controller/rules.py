"""The controller's decisions, pure: what a router's `/workload` says the fleet needs, when to scale up or down, what
the budget allows, which failed probes replace a replica.

No clock, no ledger, no HTTP here: `watch.py` reads (the router, the ledger's events, the probes) and acts; these
functions decide from values it passes in, `now` included, so every rule is tested with injected times
(tests/test_controller_rules.py).
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from melange_sky.inputs.trace_rates import MINUTE_S, MinuteRates, observed_rates

__all__ = ["DEFAULT_MIN_REQUESTS", "DEFAULT_RATE_PERCENTILE", "DEFAULT_SCALE_DOWN_AFTER_MIN", "Decision", "Need",
           "Scale", "default_window_min", "distribution_from", "need_data", "need_from_workload", "need_message",
           "needs_from_events", "over_budget", "scale_decision", "to_replace"]

DEFAULT_RATE_PERCENTILE = 95.0
DEFAULT_SCALE_DOWN_AFTER_MIN = 10.0
#: Fewer requests than this in the router's histogram: its shares are noise; the config's distribution is kept.
DEFAULT_MIN_REQUESTS = 100
#: Event kind of a need observation: the controller's memory of recent needs, read back (its data) for the
#: scale-down hold.
NEED_EVENT = "need"


def default_window_min(hold_s: float) -> int:
    """The need's window when the user names none: the scale-down hold, in whole minutes (the router counts whole
    minutes), at least one. A scale-down then plans for the load of exactly the time it waited."""
    return max(1, math.ceil(hold_s / MINUTE_S - 1e-9))


@dataclass(frozen=True)
class Need:
    """The request rate (req/s) the fleet should be planned for, and where it came from (for the event line).

    `recent`: the needs of the full windows ending at each of the router's latest complete minutes, newest first
    (`recent[0]` is `rate`), as far back as its per-minute counts go; empty when it has not counted one full
    window (then only the passes' recorded needs can show how long the load has been low)."""

    rate: float
    source: str  # e.g. "p95 over a 10 min window (the last 10 of 42 complete minutes)"
    window_min: int | None = None  # the window the rate was read over (None: the router sent no per-minute counts)
    recent: tuple[float, ...] = ()


def need_from_workload(doc: Mapping[str, Any], percentile: float, window_min: int) -> Need | None:
    """The need a router's `/workload` document shows: the `percentile` of its arrival rates in the last
    `window_min` complete minutes (its `minute_arrivals`, oldest first), not of its whole window (an hour by
    default), so that a burst stops counting once the window has passed it; else its `rate_percentiles` (its
    whole window) when `percentile` is one of those; else, with no complete minute yet, its mean rate. None when
    the window saw no arrival at all (no decision is taken on silence: scaling to nothing is `down`)."""
    minutes, shown = observed_rates(doc)
    recent: tuple[float, ...] = ()
    window: int | None = None
    if minutes is not None:
        counts = [int(n) for n in doc["minute_arrivals"]]
        window = window_min
        if len(counts) >= window_min:
            recent = tuple(MinuteRates.of(counts[len(counts) - j - window_min:len(counts) - j]).percentile(percentile)
                           for j in range(len(counts) - window_min + 1))
            rate = recent[0]
            source = (f"p{percentile:g} over a {window_min} min window (the last {window_min} of {len(counts)} "
                      f"complete minutes)")
        else:
            rate = MinuteRates.of(counts).percentile(percentile)
            source = (f"p{percentile:g} over {len(counts)} min of a {window_min} min window (the router has "
                      f"counted {len(counts)} complete minute(s))")
    elif shown is not None and shown.get(percentile) is not None:
        rate = float(shown.get(percentile) or 0.0)
        source = (f"p{percentile:g} of the router's per-minute rates (its whole window: it sends no per-minute "
                  f"counts to cut a {window_min} min window from)")
    else:
        mean = doc.get("total_request_rate")
        if not isinstance(mean, (int, float)) or isinstance(mean, bool) or not math.isfinite(mean):
            return None
        span = doc.get("span_s")
        over = f" over {span:.0f} s" if isinstance(span, (int, float)) and not isinstance(span, bool) else ""
        rate, source = float(mean), f"mean{over} (no complete minute yet)"
    return Need(rate, source, window, recent) if rate > 0 else None


def distribution_from(doc: Mapping[str, Any], shape: tuple[int, int], input_edges: Sequence[int] | None,
                      output_edges: Sequence[int] | None, min_requests: int) -> tuple[list[list[float]] | None, str]:
    """The router's observed workload distribution (shares per bucket) when it counted at least `min_requests` in
    buckets of the config's `shape` and edges (None: the config has none, only the shape is checked); else None
    and why the config's distribution is kept."""
    counts = doc.get("counts")
    if (not isinstance(counts, list) or len(counts) != shape[0]
            or not all(isinstance(row, list) and len(row) == shape[1] for row in counts)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for row in counts for c in row)):
        return None, (f"the router's histogram is not {shape[0]}x{shape[1]} like the config's: the config's "
                      f"workload_distribution is kept")
    if ((input_edges is not None and list(doc.get("input_buckets") or []) != list(input_edges))
            or (output_edges is not None and list(doc.get("output_buckets") or []) != list(output_edges))):
        return None, "the router's bucket edges are not the config's: the config's workload_distribution is kept"
    total = sum(c for row in counts for c in row)
    if total < min_requests:
        return None, f"{total} request(s) counted (< {min_requests}): the config's workload_distribution is kept"
    return [[c / total for c in row] for row in counts], f"the distribution of {total} observed request(s)"


class Scale(enum.Enum):
    """What to do with the plan's rate: raise it now, lower it (the hold is over), wait, or nothing."""

    UP = "scale-up"
    DOWN = "scale-down"
    HOLD = "hold"
    NONE = "none"


@dataclass(frozen=True)
class Decision:
    scale: Scale
    rate: float  # the rate to plan for (the current one unless UP or DOWN)
    reason: str


def scale_decision(current: float, need: float, history: Iterable[tuple[float, float]], now: float,
                   hold_s: float, recent: Sequence[float] = (), window_s: float = 0.0) -> Decision:
    """Scale up at once when `need` is above the plan's `current` rate; scale down only once the need has stayed
    below `current` for `hold_s`, and then to the highest need seen in that hold (never below what it saw).

    How long the need has stayed low is read first from the router's own minutes (`recent`: the needs of the
    `window_s` windows ending at its latest complete minutes, newest first, `need` first): a run of k windows
    below the plan means the load has been low for the window plus k - 1 minutes, whenever the passes ran. When
    those minutes are all low but too few to cover the hold (a router restarted, or a window longer than what it
    keeps), the passes' recorded needs decide (`history`: (time, rate) observations, `need` at `now` included or
    not): every need observed since some moment at least `hold_s` ago below `current`."""
    if need > current:
        return Decision(Scale.UP, need, f"need {need:.4g} req/s > plan {current:.4g} req/s")
    if need == current:
        return Decision(Scale.NONE, current, f"need {need:.4g} req/s = plan")
    if recent:
        run = next((k for k, rate in enumerate(recent) if rate >= current), len(recent))
        held = window_s + (run - 1) * MINUTE_S if run else 0.0  # low since the start of the oldest low window
        if held >= hold_s:
            windows = max(1, math.ceil((hold_s - window_s) / MINUTE_S - 1e-9) + 1)  # those covering the hold
            target = max([need, *recent[:windows]])
            return Decision(Scale.DOWN, target, f"need below plan {current:.4g} req/s for {_duration(held)} of the "
                                                f"router's minutes ({_duration(window_s)} window, hold "
                                                f"{_duration(hold_s)}); highest need in the hold {target:.4g} req/s")
        if run < len(recent):  # the router's minutes show a busier window inside the hold
            return Decision(Scale.HOLD, current, f"need {need:.4g} req/s < plan {current:.4g} req/s for "
                                                 f"{_duration(held)} of {_duration(hold_s)} before scaling down "
                                                 f"({_duration(window_s)} window)")
    else:
        held = 0.0
    observed = sorted([*[(at, rate) for at, rate in history if at <= now], (now, need)])
    start = now  # when the current run of needs below the plan began
    for at, rate in reversed(observed):
        if rate >= current:
            break
        start = at
    held = max(held, now - start)  # the router's minutes are all low but too few: the passes may remember more
    if held < hold_s:
        return Decision(Scale.HOLD, current, f"need {need:.4g} req/s < plan {current:.4g} req/s for "
                                             f"{_duration(held)} of {_duration(hold_s)} before scaling down")
    target = max([rate for at, rate in observed if at >= now - hold_s] + list(recent))
    return Decision(Scale.DOWN, target, f"need below plan {current:.4g} req/s for {_duration(held)} (hold "
                                        f"{_duration(hold_s)}); highest need in that window {target:.4g} req/s")


def _duration(seconds: float) -> str:
    """`9 min 59 s`, `45 s`, `10 min`: truncated, so a hold not yet over never reads as over."""
    whole = int(seconds)
    minutes, rest = divmod(whole, int(MINUTE_S))
    if not minutes:
        return f"{rest} s"
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def over_budget(cost: float, max_cost: float | None) -> bool:
    """Whether a plan at `cost` $/h exceeds the cap (None: no cap). A cent's rounding is not an excess."""
    return max_cost is not None and cost > max_cost + 1e-9


def need_message(need: Need) -> str:
    """A need event's message, for people (`status`, the event line): the rate and where it came from."""
    return f"{need.rate:.6g} req/s ({need.source})"


def need_data(need: Need) -> dict[str, Any]:
    """A need event's data, what the next pass reads back (`needs_from_events`): the rate as a number, and the window
    it was read over."""
    return {"rate": need.rate, "source": need.source, "window_min": need.window_min}


def needs_from_events(events: Iterable[tuple[float, Mapping[str, Any] | None]]) -> list[tuple[float, float]]:
    """(time, rate) of need events, from their data (`need_data`); an event without a finite rate is skipped."""
    out = []
    for at, data in events:
        rate = (data or {}).get("rate")
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate):
            out.append((at, float(rate)))
    return out


def to_replace(probes: Mapping[str, bool]) -> tuple[list[str], str | None]:
    """The replicas to replace after readiness probes (`probes`: cluster -> answered on at least one of its tries).
    When every one of several replicas failed, this machine probably cannot reach them (private addresses, a
    firewall): none is replaced, and the note says so; one replica alone that fails is replaced."""
    failed = sorted(c for c, ok in probes.items() if not ok)
    if len(probes) > 1 and len(failed) == len(probes):
        return [], (f"all {len(failed)} replicas failed their readiness probe from this machine: none replaced (if "
                    f"their endpoints are not reachable from here, pass --no-health-check)")
    return failed, None
