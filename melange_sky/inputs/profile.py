"""Measure a GPU's `tputs` from a running OpenAI-compatible server (vLLM, SGLang): `melange-sky profile`.

For each (input bucket, output bucket) the profiler finds the highest request rate at which the server meets every
SLO given: the mean time per output token (TPOT), the time to first token (TTFT) at a percentile, the whole latency
at a percentile. This module is the search over rates and what it reports; the parts it drives live beside it:
* `profile_load`: one *step* at one rate: synthetic requests of the bucket's representative size with Poisson
  arrivals, every response streamed (POST {endpoint}/v1/completions, "stream": true, SSE) and each token timed,
  until the step's steady state decides pass or fail;
* `profile_stats`: each SLO's estimate and interval over a step, the step's verdict, and the crossing of the limit;
* `http`: the HTTP client (one connection per request, no redirects, only the endpoint's host and port);
* `profile_result`: the records of what was measured, and their merge into a config.

The rate grows x2 while steps pass, then bisects between the last pass and the first failure. The reported rate is,
by default, where a least-squares line through each SLO's statistic of the steps nearest its limit meets it (the
lowest of the SLOs' crossings, which names the SLO that set the limit); `estimate="pass"` reports the highest passing
step. The interval of the statistic there, divided by the line's slope, is how well the rate is known: 1 minus that
share is the bucket's suggested `headroom`.

A timeout among the measured requests fails the step (a request that timed out broke the SLO); errors (HTTP 5xx,
broken streams) fail it only when more than 10% of the measured requests error, and a step that failed only on
errors is re-run once. A bucket is "failed" when every request of a step failed, on an HTTP 4xx, or after 2 rates
in a row at which every measured request timed out; "cut_short" when it hits `max_minutes` (its tput is the best it
had). Each bucket's request timeout is the larger of `request_timeout` and 3x the time its output needs at the SLO
(plus a prefill allowance), so long outputs are not cut short. Failures are reported per bucket; only a 4xx on the
first probe request (a wrong URL or model) aborts the whole profile. The server's own `usage.prompt_tokens` is
recorded per step to show the real prompt size.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, check_edges
from melange_sky.core.slo import Slo, bucket_tokens
from melange_sky.engine.emulator_openai import EMULATOR_HEADER, parse_emulator_header
from melange_sky.errors import EndpointUnreachable, ProfileError
from melange_sky.inputs.http import (COMPLETIONS_PATH, Client, Endpoint, HttpError, RequestRecord, error_text,
                                     is_client_error, os_reason, parse_endpoint)
from melange_sky.inputs.profile_load import Load, StepPlan, completion_payload, run_step, synthetic_prompt
from melange_sky.inputs.profile_result import (BucketProfile, BucketStatus, Cell, Estimate, EventKind, ProfileEvent,
                                               ProfileResult, ProfileSettings, ProgressCallback, StepResult)
from melange_sky.inputs.profile_stats import ERROR_TOLERANCE, fit_crossing, precision_needed

#: A bucket's request timeout is at least this many times (output tokens x SLO + prefill allowance).
TIMEOUT_SLO_MULTIPLE = 3.0
#: Prefill allowance per prompt token in that timeout, seconds.
_PREFILL_ALLOWANCE_S_PER_TOKEN = 0.0005
#: A bucket stops, "failed", after this many rates in a row at which every measured request timed out.
TIMEOUT_STEPS_TO_FAIL = 2
#: Below this share of max_tokens (mean over a step) the server ignored ignore_eos: a warning.
_SHORT_OUTPUT_SHARE = 0.9
#: A step's default time cap: this many seconds, or this many request durations at the SLO, the larger.
_STEP_CAP_FLOOR_S, _STEP_CAP_DURATIONS = 30.0, 15.0


# ---- what to measure -----------------------------------------------------------------------------------------------
def parse_cells(text: str, shape: tuple[int, int]) -> list[Cell]:
    """`--buckets`: "all", or cells "I:J" (0-based input, output bucket index), comma-separated; "I:*" is a row."""
    rows, cols = shape
    if text.strip().lower() == "all":
        return [(i, j) for i in range(rows) for j in range(cols)]
    cells: list[Cell] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            i_text, j_text = part.split(":")
            i_list = range(rows) if i_text.strip() == "*" else [int(i_text)]
            j_list = range(cols) if j_text.strip() == "*" else [int(j_text)]
        except ValueError:
            raise ProfileError(f"--buckets: {part!r} is not I:J (e.g. 0:0,1:2 or 2:*)") from None
        for i in i_list:
            for j in j_list:
                if not (0 <= i < rows and 0 <= j < cols):
                    raise ProfileError(f"--buckets: {i}:{j} is outside the {rows}x{cols} buckets "
                                       f"(indices are 0-based)")
                if (i, j) not in cells:
                    cells.append((i, j))
    if not cells:
        raise ProfileError("--buckets: no bucket given; use all, or I:J,...")
    return cells


def bucket_timeout(settings: ProfileSettings, prompt_tokens: int, output_tokens: int) -> float:
    """Seconds one request of a bucket may take: --timeout, or more when its output at the SLO needs more."""
    prefill = prompt_tokens * _PREFILL_ALLOWANCE_S_PER_TOKEN
    needed = max(output_tokens * (settings.tpot_slo_ms or 0) / 1000 + prefill, (settings.latency_slo_ms or 0) / 1000,
                 (settings.ttft_slo_ms or 0) / 1000 + prefill)
    return round(max(settings.request_timeout, TIMEOUT_SLO_MULTIPLE * needed), 3)


def _client(ep: Endpoint, settings: ProfileSettings) -> Client:
    return Client(ep, connect_timeout=settings.connect_timeout, api_key=settings.api_key,
                  user_agent="melange-sky-profile")


# ---- checking the endpoint -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerIdentity:
    """What the server said of itself when first reached: whether it is `melange-sky emulate` (its
    `EMULATOR_HEADER`, which vLLM never sends), and at what speed (None: not said)."""

    emulated: bool = False
    speed: float | None = None


async def check_endpoint(ep: Endpoint, model: str, settings: ProfileSettings) -> ServerIdentity:
    """Fail fast, in one line, when nothing listens at the endpoint or it does not serve `model`: a wrong URL or
    model would otherwise show up as every bucket failing, after minutes of measuring. Returns whether the server
    says it is the emulator, for the profile's record (`estimate --calibrate` refuses a fit to an emulator)."""
    client = _client(ep, settings)
    try:
        status, headers, body = await asyncio.wait_for(client.get_with_headers("/v1/models"),
                                                       settings.connect_timeout * 2)
    except (TimeoutError, OSError) as exc:
        raise EndpointUnreachable(f"cannot reach {ep.url} ({os_reason(exc)}): is the server running and the port "
                                  f"open? Try: curl {ep.url}/v1/models") from None
    except (HttpError, asyncio.IncompleteReadError, ValueError) as exc:
        raise EndpointUnreachable(f"{ep.url} does not answer like an HTTP server ({exc})") from None
    if status in (401, 403):
        raise ProfileError(f"{ep.url} refused the request ({error_text(status, body)}): pass --api-key "
                           f"(or MELANGE_SKY_API_KEY)")
    served: list[Any] = []
    if status == 200:  # not every server lists its models; the probe below tells
        try:
            served = [m.get("id") for m in json.loads(body).get("data", []) if isinstance(m, dict)]
        except (json.JSONDecodeError, AttributeError):
            pass
    if served and model not in served:
        raise ProfileError(f"{ep.url} does not serve model {model!r}; it serves: {', '.join(map(str, served))}. "
                           f"Pass one of them as --model")
    # One tiny completion: a 4xx here (wrong path, model or API) would fail every bucket, so it aborts now.
    probe = completion_payload(model, "the", 2, settings)
    record = await client.timed_completion(probe, settings.request_timeout)
    if is_client_error(record.status):
        raise ProfileError(f"POST {ep.full_url(COMPLETIONS_PATH)} answered {record.error}: is --endpoint the "
                           f"server's base URL (e.g. {ep.origin}) and --model {model!r} right? Try: "
                           f"curl {ep.full_url('/v1/models')}")
    said = headers.get(EMULATOR_HEADER.lower())
    return ServerIdentity() if said is None else ServerIdentity(emulated=True, speed=parse_emulator_header(said))


# ---- one bucket ----------------------------------------------------------------------------------------------------
def slo_latency(settings: ProfileSettings, output_tokens: int, probe: RequestRecord | None = None) -> float:
    """Seconds a request of the bucket takes when the server sits exactly at the tightest SLO (`Slos.latency_at`,
    from the probe request alone, as `estimate` reads it): what fills the server at a step's start (rate x this many
    in flight) and sets the pace of a step (settling, measuring)."""
    ok = probe is not None and probe.ok
    return settings.slo_spec.latency_at(
        output_tokens, (probe.ttft or 0.0) if probe is not None and ok else 0.0,
        (probe.tpot or 0.0) if probe is not None and ok else 0.0, probe.latency if probe is not None and ok else 0.0)


def step_cap(settings: ProfileSettings, latency: float) -> float:
    """A step's time cap, seconds: --max-step-seconds, else 30 s or 15 request durations, the larger."""
    return settings.max_step_seconds or max(_STEP_CAP_FLOOR_S, _STEP_CAP_DURATIONS * latency)


def estimate_seconds(settings: ProfileSettings, output_tokens: Sequence[int]) -> float:
    """A rough duration of a profile before it starts: per bucket, the steps a search typically takes (half the
    doublings to --max-rate, then the bisections), each about the time for --requests-per-step arrivals plus
    4 request durations at the SLO (settling, measuring, the last requests finishing); the bisections near the
    limit about 100 arrivals and 6 durations more, since they measure until the statistic is precise."""
    doublings = max(1, math.ceil(math.log(settings.max_rate / settings.start_rate, settings.growth) / 2))
    total = 0.0
    for n in output_tokens:
        latency = slo_latency(settings, n)
        rates = [settings.start_rate * settings.growth ** k for k in range(doublings + 1)]
        cap = step_cap(settings, latency)
        bucket = sum(min(cap, settings.requests_per_step / r + 4 * latency) for r in rates)
        # near the limit a step measures until the statistic is precise: ~100 more requests or durations
        bucket += settings.bisect_steps * min(cap, 100 / rates[-1] + 6 * latency)
        total += min(bucket, 60 * settings.max_minutes) if settings.max_minutes else bucket
    return total


async def _profile_bucket(client: Client, model: str, cell: Cell, ranges: tuple[tuple[int, int], tuple[int, int]],
                          settings: ProfileSettings, rng: random.Random,
                          emit: Callable[[EventKind, StepResult | None, BucketProfile | None], None]) -> BucketProfile:
    (i_lo, i_hi), (o_lo, o_hi) = ranges
    prompt_tokens, output_tokens = bucket_tokens(*ranges, settings.size)
    timeout = bucket_timeout(settings, prompt_tokens, output_tokens)
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + 60 * settings.max_minutes if settings.max_minutes else math.inf

    def make_payload(max_tokens: int) -> bytes:
        return completion_payload(model, synthetic_prompt(prompt_tokens, rng), max_tokens, settings)

    # one request alone: its time to first token and its duration make the latency at the SLO more exact
    probe = await client.timed_completion(make_payload(output_tokens), timeout)
    target = slo_latency(settings, output_tokens, probe)
    steps: list[StepResult] = []
    load = Load(client, make_payload, output_tokens, timeout, rng, block_seconds=target)
    load.answered = probe.ok
    stopped = False

    async def run(rate: float) -> StepResult:
        nonlocal stopped
        latencies = [(abs(math.log(s.rate / rate)), s.mean_latency_ms / 1000) for s in steps
                     if s.mean_latency_ms is not None and not s.overloaded]
        guess = min(latencies)[1] if latencies else (probe.latency if probe.ok else target)
        cap = min(step_cap(settings, target), deadline - loop.time())
        plan = StepPlan(slo_latency=target, latency_guess=min(guess, target), cap=max(cap, 0.0),
                         precision=precision_needed(steps, settings))
        result = await run_step(load, rate, plan, settings)
        steps.append(result)
        emit(EventKind.STEP, result, None)
        if loop.time() >= deadline:
            stopped = True
        return result

    async def step(rate: float) -> StepResult:
        result = await run(rate)
        if result.failed_on_errors and not stopped:  # transient errors: one more try at the same rate
            result = await run(rate)
        return result

    try:
        return await _search(step, lambda: stopped, steps, settings, cell, ranges, prompt_tokens, output_tokens,
                             timeout, began, loop)
    finally:
        await load.close()


async def _search(step: Callable[[float], Awaitable[StepResult]], stopped: Callable[[], bool],
                  steps: list[StepResult], settings: ProfileSettings, cell: Cell,
                  ranges: tuple[tuple[int, int], tuple[int, int]], prompt_tokens: int, output_tokens: int,
                  timeout: float, began: float, loop: asyncio.AbstractEventLoop) -> BucketProfile:
    """The rate search: x growth while every SLO holds, then bisection; its verdict as the bucket's profile."""

    def done(status: BucketStatus, tput: float, message: str, best: StepResult | None,
             limit: Slo | None = None, headroom: float | None = None) -> BucketProfile:
        warnings = []
        short = [s for s in steps if s.mean_output_tokens is not None
                 and s.mean_output_tokens < _SHORT_OUTPUT_SHARE * output_tokens]
        if short and settings.ignore_eos:
            mean = statistics.fmean(s.mean_output_tokens or 0 for s in short)
            warnings.append(f"bucket {cell[0]}:{cell[1]}: the server generated {mean:.3g} of the {output_tokens} "
                            f"tokens asked for (mean, {len(short)} of {len(steps)} steps): it seems to ignore "
                            f"ignore_eos, so the load was lower than intended and this tput is too high")
        cut = sum(1 for s in steps if s.cut_short)
        if cut and status != BucketStatus.CUT_SHORT:
            message += f" ({cut} of {len(steps)} steps hit their time cap undecided)"
        return BucketProfile(cell=cell, input_range=ranges[0], output_range=ranges[1],
                             prompt_tokens=prompt_tokens, output_tokens=output_tokens, status=status, tput=tput,
                             message=message, best=best, steps=tuple(steps), warnings=tuple(warnings),
                             timeout=timeout, limit=limit, headroom=headroom, seconds=round(loop.time() - began, 2))

    def cut_short(lo: StepResult | None, hi: StepResult | None) -> BucketProfile:
        minutes = f"{settings.max_minutes:g}"
        if lo is None:
            return done(BucketStatus.CUT_SHORT, 0.0, f"cut short by --max-minutes {minutes} before any rate "
                                                     f"passed", None)
        tput, limit, headroom = _estimate(lo, hi)
        return done(BucketStatus.CUT_SHORT, tput, f"cut short by --max-minutes {minutes} after {len(steps)} steps; "
                                                  f"highest pass {lo.rate:.3g} req/s"
                    + (f", fails at {hi.rate:.3g} req/s" if hi is not None else ""), lo, limit, headroom)

    def _estimate(lo: StepResult, hi: StepResult | None) -> tuple[float, Slo | None, float | None]:
        """tput (clamped between the last pass and the first fail), the SLO that set it, the headroom to plan."""
        if hi is None:
            return lo.rate, lo.limit, None
        best: tuple[float, Slo, float] | None = None
        for slo, limit_ms in settings.slos.items():
            fit = fit_crossing(steps, slo, limit_ms)
            if fit is None:
                continue
            crossing = min(max(fit[0], lo.rate), hi.rate)
            if best is None or crossing < best[0]:
                best = (crossing, slo, fit[1])
        if best is None or settings.estimate == Estimate.PASS:
            return lo.rate, hi.limit, None
        crossing, slo, slope = best
        near = min((s for s in steps if any(c.slo == slo and math.isfinite(c.half_width_ms) for c in s.checks)),
                   key=lambda s: abs(s.rate - crossing), default=None)
        headroom = None
        if near is not None:
            half = next(c.half_width_ms for c in near.checks if c.slo == slo)
            headroom = round(max(0.0, min(1.0, 1 - half / slope / crossing)), 3)
        return crossing, slo, headroom

    def hard_failure(r: StepResult) -> BucketProfile | None:
        """The bucket's verdict when the server rejects the request itself, whatever the load."""
        if r.client_errors:
            return done(BucketStatus.FAILED, 0.0, f"the server rejects these requests: {r.first_error}", None)
        if r.ok == 0 and r.timeouts == 0 and r.errors > 0:
            return done(BucketStatus.FAILED, 0.0, f"every request failed ({r.errors} of {r.errors}): {r.first_error}",
                        None)
        return None

    def all_timed_out(r: StepResult) -> bool:
        return r.ok == 0 and r.timeouts > 0

    lo: StepResult | None = None
    hi: StepResult | None = None
    first = await step(settings.start_rate)
    if (verdict := hard_failure(first)) is not None:
        return verdict
    if first.passed:
        lo = first
        while lo.rate < settings.max_rate:
            if stopped():
                return cut_short(lo, None)
            r = await step(min(lo.rate * settings.growth, settings.max_rate))
            if r.passed:
                lo = r
            else:
                hi = r
                break
        if hi is None:
            return done(BucketStatus.CAPPED, lo.rate, f"every SLO still held at --max-rate {settings.max_rate:g} "
                                                      f"req/s; the real maximum is higher", lo, lo.limit)
    else:
        hi = first
        timed_out_in_a_row = 1 if all_timed_out(first) else 0
        while hi.rate / settings.growth >= settings.min_rate * (1 - 1e-9):
            if timed_out_in_a_row >= TIMEOUT_STEPS_TO_FAIL:
                break
            if stopped():
                return cut_short(None, hi)
            r = await step(hi.rate / settings.growth)
            if r.passed:
                lo = r
                break
            hi = r
            if (verdict := hard_failure(r)) is not None:
                return verdict
            timed_out_in_a_row = timed_out_in_a_row + 1 if all_timed_out(r) else 0
        if lo is None:
            if all_timed_out(hi):
                rates = ", ".join(f"{s.rate:g}" for s in steps[-timed_out_in_a_row:])
                return done(BucketStatus.FAILED, 0.0, f"timeouts: every measured request timed out at {rates} req/s: "
                                                      f"{hi.first_error}", None)
            if hi.failed_on_errors:
                return done(BucketStatus.FAILED, 0.0, f"errors: more than {100 * ERROR_TOLERANCE:g}% of requests fail "
                                                      f"even at {hi.rate:g} req/s: {hi.first_error}", None)
            if stopped():
                return cut_short(None, hi)
            return done(BucketStatus.SLO_NOT_MET, 0.0, f"the SLO fails even at {hi.rate:g} req/s ({hi.reason})", None,
                        hi.limit)
    for _ in range(settings.bisect_steps):
        if stopped():
            return cut_short(lo, hi)
        r = await step((lo.rate + hi.rate) / 2)
        if r.passed:
            lo = r
        else:
            hi = r
    tput, limit, headroom = _estimate(lo, hi)
    message = f"highest pass {lo.rate:.3g} req/s, fails at {hi.rate:.3g} req/s: {hi.reason}"
    if tput != lo.rate:
        message = f"fitted crossing of the SLO; {message}"
    return done(BucketStatus.OK, tput, message, lo, limit, headroom)


async def _profile(ep: Endpoint, model: str, input_edges: tuple[int, ...], output_edges: tuple[int, ...],
                   cells: list[Cell], settings: ProfileSettings, on_progress: ProgressCallback | None
                   ) -> tuple[ServerIdentity, list[BucketProfile]]:
    identity = await check_endpoint(ep, model, settings)
    client = _client(ep, settings)
    rng = random.Random(settings.seed)
    results = []
    if on_progress is not None:
        outputs = [bucket_tokens((input_edges[i], input_edges[i + 1]), (output_edges[j], output_edges[j + 1]),
                                 settings.size)[1] for i, j in cells]
        bound = 60 * settings.max_minutes * len(cells) if settings.max_minutes else None
        on_progress(ProfileEvent(kind=EventKind.ESTIMATE, total=len(cells),
                                 seconds=estimate_seconds(settings, outputs), max_seconds=bound))
    for index, cell in enumerate(cells, 1):
        i, j = cell
        ranges = ((input_edges[i], input_edges[i + 1]), (output_edges[j], output_edges[j + 1]))
        p_tok, o_tok = bucket_tokens(*ranges, settings.size)

        def emit(kind: EventKind, step: StepResult | None, bucket: BucketProfile | None,
                 _cell: Cell = cell, _index: int = index, _p: int = p_tok, _o: int = o_tok) -> None:
            if on_progress is not None:
                on_progress(ProfileEvent(kind=kind, cell=_cell, index=_index, total=len(cells), prompt_tokens=_p,
                                         output_tokens=_o, step=step, bucket=bucket))

        emit(EventKind.BUCKET_START, None, None)
        bucket = await _profile_bucket(client, model, cell, ranges, settings, rng, emit)
        emit(EventKind.BUCKET_DONE, None, bucket)
        results.append(bucket)
    return identity, results


def profile_endpoint(endpoint: str, model: str, *, input_edges: Sequence[int] = DEFAULT_INPUT_EDGES,
                     output_edges: Sequence[int] = DEFAULT_OUTPUT_EDGES, cells: Sequence[Cell] | None = None,
                     settings: ProfileSettings | None = None,
                     on_progress: ProgressCallback | None = None) -> ProfileResult:
    """Profile `model` at `endpoint` on the given buckets (all by default); buckets not in `cells` are 0.

    Raises `EndpointUnreachable` / `ProfileError` only before measuring (nothing listens, wrong model, bad input);
    once measuring, failures are reported in the bucket's status.
    """
    settings = settings or ProfileSettings()
    ep = parse_endpoint(endpoint)
    in_edges = check_edges(list(input_edges), "input buckets")
    out_edges = check_edges(list(output_edges), "output buckets")
    shape = (len(in_edges) - 1, len(out_edges) - 1)
    chosen = list(cells) if cells is not None else parse_cells("all", shape)
    for i, j in chosen:
        if not (0 <= i < shape[0] and 0 <= j < shape[1]):
            raise ProfileError(f"bucket {i}:{j} is outside the {shape[0]}x{shape[1]} buckets")
    started = time.perf_counter()
    identity, measured = asyncio.run(_profile(ep, model, in_edges, out_edges, chosen, settings, on_progress))
    by_cell = {b.cell: b for b in measured}
    buckets = []
    for i in range(shape[0]):
        for j in range(shape[1]):
            ranges = ((in_edges[i], in_edges[i + 1]), (out_edges[j], out_edges[j + 1]))
            p_tok, o_tok = bucket_tokens(*ranges, settings.size)
            buckets.append(by_cell.get((i, j)) or BucketProfile(
                cell=(i, j), input_range=ranges[0], output_range=ranges[1], prompt_tokens=p_tok, output_tokens=o_tok,
                status=BucketStatus.NOT_MEASURED, tput=0.0, message="not in --buckets"))
    return ProfileResult(endpoint=ep.url, model=model, tpot_slo_ms=settings.tpot_slo_ms, input_edges=in_edges,
                         output_edges=out_edges, buckets=tuple(buckets), settings=settings,
                         seconds=time.perf_counter() - started,
                         emulated=True if identity.emulated else None, speed=identity.speed)


__all__ = [
    "ProfileResult", "ProfileSettings", "ServerIdentity", "bucket_timeout", "check_endpoint", "estimate_seconds",
    "parse_cells", "profile_endpoint", "slo_latency", "step_cap",
]
