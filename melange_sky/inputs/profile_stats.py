"""The statistics of a profile: each SLO's estimate over a step's requests with its ~95% interval, the step's
verdict (`summarise`), and across steps the precision each SLO's statistic needs and where it crosses its limit.

Requests in flight together share the server's load, so their values are correlated: intervals come from batch
means (contiguous batches of requests, in start order), not from the requests as if independent. A step looks at
its estimate again and again as requests finish; so that these repeated looks do not end it on a lucky stretch,
pass or fail is decided only when the limit lies `_SEQUENTIAL` half-widths of the interval away.

The reported rate is, by default, where a least-squares line through each SLO's statistic of the steps nearest its
limit meets it (`fit_crossing`; the search takes the lowest of the SLOs' crossings, which names the SLO that set
the limit). The interval of the statistic there, divided by the line's slope, is how well the rate is known.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from melange_sky.core.slo import Slo, percentile
from melange_sky.inputs.http import RequestRecord, is_client_error
from melange_sky.inputs.profile_result import ProfileSettings, SloCheck, StepResult, slo_label

#: A step fails on errors only when more than this share of its measured requests error.
ERROR_TOLERANCE = 0.10
#: A step fails as overloaded when the mean in flight exceeds this multiple of rate x latency at the SLO.
OVERLOAD = 3.0
#: Batch means: at most this many batches, of at least this many requests.
_MAX_BATCHES, _BATCH_MIN = 10, 4
#: Pass or fail is decided only when the limit lies this many half-widths of the ~95% interval away (see above).
_SEQUENTIAL = 1.5
#: Student's t (two-sided 95%) by degrees of freedom.
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def _ms(values: Sequence[float], q: float | None = None) -> float | None:
    if not values:
        return None
    value = statistics.fmean(values) if q is None else percentile(values, q)
    return round(1000 * value, 3)


def _batch_means(values: Sequence[float], durations: float) -> list[float]:
    """Means of contiguous batches (values in start order), about half a request duration each over a span of
    `durations` request durations: requests in flight together share the server's load, so their values are
    correlated; batches of them much less so, and the spread of batch means gives a more honest error."""
    count = max(3, min(_MAX_BATCHES, int(2 * durations), len(values) // _BATCH_MIN))
    size = len(values) / count
    return [statistics.fmean(values[round(i * size):round((i + 1) * size)]) for i in range(count)]


def _t95(batches: int) -> float:
    """Student's t for a two-sided 95% interval with `batches` - 1 degrees of freedom."""
    return _T95.get(batches - 1, 2.0)


def _mean_check(slo: Slo, values: Sequence[float], limit: float, precision: float, durations: float) -> SloCheck:
    point = statistics.fmean(values)
    if len(values) < 2 * _BATCH_MIN:
        half = math.inf
    else:
        batches = _batch_means(values, durations)
        half = _t95(len(batches)) * max(statistics.stdev(batches) / math.sqrt(len(batches)),
                                         statistics.stdev(values) / math.sqrt(len(values)))
    decided = abs(point - limit) > _SEQUENTIAL * half or half <= precision * limit
    return SloCheck(slo=slo, value_ms=round(point, 3), half_width_ms=round(half, 3), limit_ms=limit, decided=decided)


def _percentile_check(slo: Slo, values: Sequence[float], q: float, limit: float, precision: float,
                      durations: float) -> SloCheck:
    """The q-quantile of `values` against `limit`: decided when the share of values over the limit is, with ~95%
    confidence, on one side of 1 - q (a Wilson interval, its sample size shrunk by the batches' extra spread), or
    when the quantile itself is known within the precision asked for."""
    n = len(values)
    point = percentile(values, q)
    over = [1.0 if v > limit else 0.0 for v in values]
    share = statistics.fmean(over)
    effective = float(n)
    if n >= 2 * _BATCH_MIN:
        batches = _batch_means(over, durations)
        binomial = max(share * (1 - share), 1.0 / n) / n
        batch_var = statistics.variance(batches) / len(batches)
        effective = n / max(1.0, batch_var / binomial)
    z = 1.96 * _SEQUENTIAL
    centre = (share + z * z / (2 * effective)) / (1 + z * z / effective)
    spread = z / (1 + z * z / effective) * math.sqrt(share * (1 - share) / effective
                                                      + z * z / (4 * effective * effective))
    allowed = 1 - q
    q_spread = 1.96 * math.sqrt(q * (1 - q) / effective)
    half = (percentile(values, q + q_spread) - percentile(values, q - q_spread)) / 2
    decided = centre + spread < allowed or centre - spread > allowed or half <= precision * limit
    return SloCheck(slo=slo, value_ms=round(point, 3), half_width_ms=round(half, 3), limit_ms=limit, decided=decided)


def slo_checks(records: Sequence[RequestRecord], settings: ProfileSettings, durations: float,
                precision: dict[Slo, float] | None = None) -> list[SloCheck]:
    """Each SLO's statistic over the measured requests (in start order, over `durations` request durations); an SLO
    with no value yet is left out. `precision`: per SLO, the share of its limit within which knowing the statistic
    is enough (see `precision_needed`)."""
    ok = [r for r in records if r.ok]
    checks = []
    for slo, limit in settings.slos.items():
        if slo == Slo.TPOT:
            tpots = [1000 * r.tpot for r in ok if r.tpot is not None]
            if tpots:
                checks.append(_mean_check(slo, tpots, limit, (precision or {}).get(slo, settings.precision),
                                              durations))
            continue
        if slo == Slo.TTFT:
            values, q = [1000 * r.ttft for r in ok if r.ttft is not None], settings.ttft_percentile / 100
        else:
            values, q = [1000 * r.latency for r in ok], settings.latency_percentile / 100
        if values:
            checks.append(_percentile_check(slo, values, q, limit, (precision or {}).get(slo, settings.precision),
                                            durations))
    return checks


def summarise(rate: float, sent: int, records: list[RequestRecord], settings: ProfileSettings, seconds: float,
               warmup: int = 0, cut_short: bool = False, overloaded: bool = False, settle_seconds: float = 0.0,
               in_flight: float | None = None, want: float = 0.0, durations: float = 1.0
               ) -> StepResult:
    ok = [r for r in records if r.ok]
    timeouts = sum(1 for r in records if r.timed_out)
    errors = sum(1 for r in records if not r.ok and not r.timed_out)
    client_errors = sum(1 for r in records if is_client_error(r.status))
    tpots = [r.tpot for r in ok if r.tpot is not None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    first_error = next((r.error for r in records if not r.ok), None)
    checks = slo_checks(records, settings, durations)
    failed_on_errors = False
    limit: Slo | None = None
    if timeouts:
        passed, reason = False, f"{timeouts} timeout(s), {errors} error(s): {first_error}"
    elif client_errors or errors > ERROR_TOLERANCE * max(len(records), settings.requests_per_step):
        passed, reason = False, (f"{errors} error(s) of {len(records)} measured requests (more than "
                                 f"{100 * ERROR_TOLERANCE:g}%): {first_error}")
        failed_on_errors = not client_errors
    elif overloaded:
        passed, reason = False, (f"overloaded: requests in flight kept growing past {OVERLOAD:g}x the "
                                 f"{want:.3g} the SLO allows at this rate (the server does not keep up)")
        limit = binding(checks, settings)
    elif len(checks) < len(settings.slos):
        missing = [slo for slo in settings.slos if slo not in {c.slo for c in checks}]
        what = ("no request produced 2 or more tokens, so TPOT is unknown" if missing == [Slo.TPOT] and ok
                else "no request finished in the step's time")
        passed, reason = False, what
    else:
        failing = [c for c in checks if not c.passed]
        passed = not failing
        limit = binding(failing or checks, settings)
        reason = "; ".join(f"{slo_label(c.slo, settings)} {c.value_ms:.3g}"
                           + (f" ± {c.half_width_ms:.2g}" if math.isfinite(c.half_width_ms) else "")
                           + f" ms {'<=' if c.passed else '>'} {c.limit_ms:g}" for c in checks)
    if cut_short:
        reason += " (cut short: the step's time cap came before a clear verdict)"
    if errors and not failed_on_errors and not client_errors and not timeouts:
        reason += f" ({errors} error(s) tolerated: {first_error})"
    server_prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return StepResult(
        rate=rate, sent=sent, measured=len(records), ok=len(ok), errors=errors, timeouts=timeouts, passed=passed,
        reason=reason, mean_tpot_ms=_ms(tpots), p50_tpot_ms=_ms(tpots, 0.5), p99_tpot_ms=_ms(tpots, 0.99),
        mean_ttft_ms=_ms(ttfts), p50_ttft_ms=_ms(ttfts, 0.5), p99_ttft_ms=_ms(ttfts, 0.99),
        p50_latency_ms=_ms([r.latency for r in ok], 0.5), p99_latency_ms=_ms([r.latency for r in ok], 0.99),
        server_prompt_tokens=round(statistics.fmean(server_prompt), 1) if server_prompt else None,
        first_error=first_error, seconds=round(seconds, 3), warmup=warmup, client_errors=client_errors,
        failed_on_errors=failed_on_errors,
        mean_output_tokens=round(statistics.fmean(r.output_tokens for r in ok), 2) if ok else None,
        checks=tuple(checks), limit=limit, cut_short=cut_short, overloaded=overloaded,
        settle_seconds=round(settle_seconds, 3), in_flight=round(in_flight, 2) if in_flight is not None else None,
        mean_latency_ms=_ms([r.latency for r in ok]))


def binding(checks: Sequence[SloCheck], settings: ProfileSettings) -> Slo | None:
    """The SLO nearest to (or furthest over) its limit."""
    if not checks:
        return next(iter(settings.slos), None)
    return max(checks, key=lambda c: c.value_ms / c.limit_ms).slo


def precision_needed(steps: Sequence[StepResult], settings: ProfileSettings) -> dict[Slo, float]:
    """Per SLO, how well its statistic must be known for the rate to be known within `settings.precision`.

    Near saturation the statistic rises steeply with the rate (10% more rate can double TPOT), elsewhere slowly;
    its elasticity between the two steps around the limit, d ln(statistic) / d ln(rate), converts the rate's
    precision into the statistic's. Before a step has passed and one failed it is the rate's precision itself.
    """
    out = {}
    for slo, limit in settings.slos.items():
        points = [(s.rate, c.value_ms) for s in steps if not s.overloaded for c in s.checks
                  if c.slo == slo and c.value_ms > 0]
        below = max((p for p in points if p[1] <= limit), default=None)
        above = min((p for p in points if p[1] > limit), default=None)
        elasticity = 1.0
        if below is not None and above is not None and above[0] > below[0] and above[1] > below[1]:
            elasticity = math.log(above[1] / below[1]) / math.log(above[0] / below[0])
        out[slo] = min(max(settings.precision * elasticity, settings.precision / 10), 0.1)
    return out


def fit_crossing(steps: Sequence[StepResult], slo: Slo, limit_ms: float) -> tuple[float, float] | None:
    """Where a least-squares line through (rate, the SLO's statistic) of the steps nearest the limit meets it, and
    the line's slope (ms per req/s).

    Every step near the SLO then counts with its measured value, not only as pass/fail, which averages out the
    noise of single steps (bisection alone follows whichever step happened to be lucky). Only the 4 steps nearest
    the crossing are used: far from it the curve bends (it rises steeply towards saturation).
    """
    points = []
    for s in steps:
        check = next((c for c in s.checks if c.slo == slo), None)
        if check is not None and s.timeouts == 0 and not s.failed_on_errors and not s.client_errors \
                and not s.overloaded:
            points.append((s.rate, check.value_ms))
    below = sorted((p for p in points if p[1] <= limit_ms), key=lambda p: -p[0])[:2]
    above = sorted((p for p in points if p[1] > limit_ms), key=lambda p: p[0])[:2]
    points = below + above
    if not below or not above:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    if slope <= 0:  # noise swamps the trend: no crossing to trust
        return None
    return mean_x + (limit_ms - mean_y) / slope, slope


__all__ = ["ERROR_TOLERANCE", "OVERLOAD", "binding", "fit_crossing", "precision_needed", "slo_checks", "summarise"]
