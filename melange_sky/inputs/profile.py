"""Measure a GPU's `tputs` from a running OpenAI-compatible server (vLLM, SGLang): `melange-sky profile`.

For each (input bucket, output bucket) the profiler finds the highest request rate at which the server keeps the mean
time per output token (TPOT) within the SLO. One *step* sends synthetic requests of the bucket's representative size
with Poisson arrivals at one rate and streams every response (POST {endpoint}/v1/completions, "stream": true, SSE),
timing each token. The rate grows x2 while steps pass, then bisects between the last pass and the first failure.

The reported rate is, by default, where a least-squares line through the mean TPOT of the steps around the SLO
meets it (steadier than the highest passing step, whose pass can be luck); `estimate="pass"` reports the latter.

A step is bounded: a warm-up (requests sent until one more lifetime of the first request has passed after it
finished; at most `requests_per_step`), then `requests_per_step` measured requests, then filler requests that keep
the load on while the measured ones finish (at most `requests_per_step`); only measured requests count. A timeout
among them fails the step (a request that timed out broke the SLO); errors (HTTP 5xx, broken streams) fail it only
when more than 10% of the measured requests error, and a step that failed only on errors is re-run once. A bucket
is "failed" when every request of a step failed, on an HTTP 4xx, or after 2 rates in a row at which every measured
request timed out. Each bucket's request timeout is the larger of `request_timeout` and 3x the time its output
needs at the SLO (plus a prefill allowance), so long outputs are not cut short. Failures are reported per bucket;
only a 4xx on the first probe request (a wrong URL or model) aborts the whole profile.

The requests go through `melange_sky.inputs.http` (HTTP/1.1 over asyncio streams, one connection per request, no
redirects, only the endpoint's host and port); what is measured is recorded in `melange_sky.inputs.profile_result`.

Prompt sizes: a prompt of N tokens is N words drawn at random from common English words that are each a single
token (with their leading space) in the GPT-2/cl100k, Llama and Mistral tokenizers, so N words ~ N tokens (+1 BOS on
some models); random words also mean no two requests share a prefix, so prefix caching does not flatter the
numbers. The server's own `usage.prompt_tokens` is recorded per step to show the real count. `max_tokens` is the
representative output length with "ignore_eos": true (vLLM, SGLang), so every request generates exactly that many.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, check_edges
from melange_sky.errors import EndpointUnreachable, ProfileError
from melange_sky.inputs.http import (COMPLETIONS_PATH, Client, Endpoint, HttpError, RequestRecord, error_text,
                                     is_client_error, os_reason, parse_endpoint)
from melange_sky.inputs.profile_result import (BucketProfile, BucketStatus, Cell, Estimate, EventKind, ProfileEvent,
                                               ProfileResult, ProfileSettings, ProfileSize, ProgressCallback,
                                               StepResult)

#: Words that are one token each (with a leading space) in the common LLM tokenizers.
PROMPT_WORDS: tuple[str, ...] = tuple("""
the of and to in is it you that he was for on are with as his they at be this from have or by one had not but what
all were when we there can an your which their said if do will each about how up out them then she many some so these
would other into has more her two like him see time could no make than first been its who now people my made over did
down only way find use may water long little very after words called just where most know""".split())
#: A step fails on errors only when more than this share of its measured requests error.
ERROR_TOLERANCE = 0.10
#: A bucket's request timeout is at least this many times (output tokens x SLO + prefill allowance).
TIMEOUT_SLO_MULTIPLE = 3.0
#: Prefill allowance per prompt token in that timeout, seconds.
_PREFILL_ALLOWANCE_S_PER_TOKEN = 0.0005
#: A bucket stops, "failed", after this many rates in a row at which every measured request timed out.
TIMEOUT_STEPS_TO_FAIL = 2
#: Below this share of max_tokens (mean over a step) the server ignored ignore_eos: a warning.
_SHORT_OUTPUT_SHARE = 0.9


# ---- what to send --------------------------------------------------------------------------------------------------
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


def representative_tokens(lo: int, hi: int, size: ProfileSize = ProfileSize.MID) -> int:
    """The length a bucket [lo, hi) is profiled at: its midpoint, or its largest length ("upper")."""
    value = (lo + hi) // 2 if size == ProfileSize.MID else hi - 1
    return max(1, value, lo)


def bucket_tokens(input_range: tuple[int, int], output_range: tuple[int, int],
                  size: ProfileSize = ProfileSize.MID) -> tuple[int, int]:
    """(prompt tokens, output tokens) a bucket is profiled at; at least 2 output tokens, since TPOT needs 2."""
    return representative_tokens(*input_range, size), max(2, representative_tokens(*output_range, size))


def bucket_timeout(settings: ProfileSettings, prompt_tokens: int, output_tokens: int) -> float:
    """Seconds one request of a bucket may take: --timeout, or more when its output at the SLO needs more."""
    needed = output_tokens * settings.tpot_slo_ms / 1000 + prompt_tokens * _PREFILL_ALLOWANCE_S_PER_TOKEN
    return round(max(settings.request_timeout, TIMEOUT_SLO_MULTIPLE * needed), 3)


def synthetic_prompt(tokens: int, rng: random.Random) -> str:
    """About `tokens` tokens of random common words (see the module docstring for the approximation)."""
    return " ".join(rng.choices(PROMPT_WORDS, k=tokens))


def _completion_payload(model: str, prompt: str, max_tokens: int, settings: ProfileSettings) -> bytes:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if settings.ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()


def _client(ep: Endpoint, settings: ProfileSettings) -> Client:
    return Client(ep, connect_timeout=settings.connect_timeout, api_key=settings.api_key)


# ---- checking the endpoint -----------------------------------------------------------------------------------------
async def check_endpoint(ep: Endpoint, model: str, settings: ProfileSettings) -> None:
    """Fail fast, in one line, when nothing listens at the endpoint or it does not serve `model`: a wrong URL or
    model would otherwise show up as every bucket failing, after minutes of measuring."""
    client = _client(ep, settings)
    try:
        status, body = await asyncio.wait_for(client.get("/v1/models"), settings.connect_timeout * 2)
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
    probe = _completion_payload(model, "the", 2, settings)
    record = await client.timed_completion(probe, settings.request_timeout)
    if is_client_error(record.status):
        raise ProfileError(f"POST {ep.full_url(COMPLETIONS_PATH)} answered {record.error}: is --endpoint the "
                           f"server's base URL (e.g. {ep.origin}) and --model {model!r} right? Try: "
                           f"curl {ep.full_url('/v1/models')}")


# ---- one step, one bucket ------------------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(values: Sequence[float], q: float | None = None) -> float | None:
    if not values:
        return None
    value = statistics.fmean(values) if q is None else _percentile(values, q)
    return round(1000 * value, 3)


def _arrival_gaps(rate: float, block: int, rng: random.Random) -> Iterator[float]:
    """Poisson inter-arrival times, in blocks of `block` arrivals rescaled to last exactly block / rate seconds.

    This is a Poisson process conditioned on its count per block: bursts as in real traffic, but the realised rate
    of a step is the rate asked for, not off by the ~1/sqrt(n) a short unconditioned sample would give.
    """
    while True:
        gaps = [rng.expovariate(1.0) for _ in range(block)]
        scale = block / rate / sum(gaps)
        yield from (g * scale for g in gaps)


def _errors_allowed(settings: ProfileSettings) -> int:
    """How many measured requests of a step may error (not time out) before the errors alone fail the step."""
    return int(ERROR_TOLERANCE * settings.requests_per_step + 1e-9)


async def _run_step(client: Client, rate: float, make_payload: Callable[[], bytes], settings: ProfileSettings,
                    rng: random.Random, timeout: float) -> StepResult:
    """Poisson arrivals at `rate`: a warm-up, n measured requests, filler until they end (see the module docstring)."""
    n = settings.requests_per_step
    allowed = _errors_allowed(settings)
    started = time.perf_counter()
    stop = asyncio.Event()  # all measured requests ended, or enough failed to fail the step
    measured: list[asyncio.Task[RequestRecord]] = []
    others: list[asyncio.Task[RequestRecord]] = []
    finished = errored = 0
    filler = 0
    warmup = 0

    def measured_done(task: asyncio.Task[RequestRecord]) -> None:
        nonlocal finished, errored
        finished += 1
        if task.cancelled() or task.result().timed_out:
            stop.set()  # a timeout fails the step: no need to wait for the others
            return
        if not task.result().ok:
            errored += 1
            if errored > allowed or is_client_error(task.result().status):
                stop.set()
        if finished == n:
            stop.set()

    warm_until: float | None = None

    def warmed(task: asyncio.Task[RequestRecord]) -> None:
        # The first request ran on an emptier server than steady state, so wait one more of its lifetimes after it
        # ends before measuring: requests measured earlier would see less load and flatter the rate. A request
        # that failed (fast) says nothing about the load, so it does not end the warm-up; one that timed out does.
        nonlocal warm_until
        if warm_until is None and not task.cancelled() and (task.result().ok or task.result().timed_out):
            warm_until = loop.time() + task.result().latency

    def launch() -> asyncio.Task[RequestRecord]:
        return asyncio.create_task(client.timed_completion(make_payload(), timeout))

    gaps = _arrival_gaps(rate, n, rng)
    loop = asyncio.get_running_loop()
    next_arrival = loop.time()
    while not stop.is_set():
        delay = next_arrival - loop.time()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                continue
            except TimeoutError:
                pass
        next_arrival += next(gaps)
        warm = warm_until is not None and loop.time() >= warm_until
        if len(measured) < n and (warm or len(others) >= n):
            if not measured:
                warmup = len(others)
            task = launch()
            task.add_done_callback(measured_done)
            measured.append(task)
        elif len(measured) < n or filler < n:  # warm-up, or filler keeping the load on
            task = launch()
            task.add_done_callback(warmed)
            others.append(task)
            filler += len(measured) == n
        else:
            await stop.wait()
    pending = [t for t in measured + others if not t.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    records = [t.result() for t in measured if t.done() and not t.cancelled()]
    return _summarise(rate, len(measured) + len(others), records, settings, time.perf_counter() - started, warmup)


def _summarise(rate: float, sent: int, records: list[RequestRecord], settings: ProfileSettings,
               seconds: float, warmup: int = 0) -> StepResult:
    ok = [r for r in records if r.ok]
    timeouts = sum(1 for r in records if r.timed_out)
    errors = sum(1 for r in records if not r.ok and not r.timed_out)
    client_errors = sum(1 for r in records if is_client_error(r.status))
    allowed = _errors_allowed(settings)
    tpots = [r.tpot for r in ok if r.tpot is not None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    mean_tpot = _ms(tpots)
    first_error = next((r.error for r in records if not r.ok), None)
    failed_on_errors = False
    if timeouts:
        passed, reason = False, f"{timeouts} timeout(s), {errors} error(s): {first_error}"
    elif client_errors or errors > allowed:
        passed, reason = False, (f"{errors} error(s) of {len(records)} measured requests (more than "
                                 f"{100 * ERROR_TOLERANCE:g}%): {first_error}")
        failed_on_errors = not client_errors
    elif mean_tpot is None:
        passed, reason = False, "no request produced 2 or more tokens, so TPOT is unknown"
    elif mean_tpot > settings.tpot_slo_ms:
        passed, reason = False, f"mean TPOT {mean_tpot:.1f} ms > SLO {settings.tpot_slo_ms:g} ms"
    else:
        passed, reason = True, f"mean TPOT {mean_tpot:.1f} ms <= SLO {settings.tpot_slo_ms:g} ms"
    if errors and not failed_on_errors and not client_errors and not timeouts:
        reason += f" ({errors} error(s) tolerated: {first_error})"
    server_prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return StepResult(
        rate=rate, sent=sent, measured=len(records), ok=len(ok), errors=errors, timeouts=timeouts, passed=passed,
        reason=reason, mean_tpot_ms=mean_tpot, p50_tpot_ms=_ms(tpots, 0.5), p99_tpot_ms=_ms(tpots, 0.99),
        mean_ttft_ms=_ms(ttfts), p50_ttft_ms=_ms(ttfts, 0.5), p99_ttft_ms=_ms(ttfts, 0.99),
        p50_latency_ms=_ms([r.latency for r in ok], 0.5), p99_latency_ms=_ms([r.latency for r in ok], 0.99),
        server_prompt_tokens=round(statistics.fmean(server_prompt), 1) if server_prompt else None,
        first_error=first_error, seconds=round(seconds, 3), warmup=warmup, client_errors=client_errors,
        failed_on_errors=failed_on_errors,
        mean_output_tokens=round(statistics.fmean(r.output_tokens for r in ok), 2) if ok else None)


async def _profile_bucket(client: Client, model: str, cell: Cell, ranges: tuple[tuple[int, int], tuple[int, int]],
                          settings: ProfileSettings, rng: random.Random,
                          emit: Callable[[EventKind, StepResult | None, BucketProfile | None], None]) -> BucketProfile:
    (i_lo, i_hi), (o_lo, o_hi) = ranges
    prompt_tokens, output_tokens = bucket_tokens(*ranges, settings.size)
    timeout = bucket_timeout(settings, prompt_tokens, output_tokens)

    def make_payload() -> bytes:
        return _completion_payload(model, synthetic_prompt(prompt_tokens, rng), output_tokens, settings)

    steps: list[StepResult] = []

    async def run(rate: float) -> StepResult:
        result = await _run_step(client, rate, make_payload, settings, rng, timeout)
        steps.append(result)
        emit(EventKind.STEP, result, None)
        return result

    async def step(rate: float) -> StepResult:
        result = await run(rate)
        if result.failed_on_errors:  # transient errors: one more try at the same rate before it counts
            result = await run(rate)
        return result

    def done(status: BucketStatus, tput: float, message: str, best: StepResult | None) -> BucketProfile:
        warnings = []
        short = [s for s in steps if s.mean_output_tokens is not None
                 and s.mean_output_tokens < _SHORT_OUTPUT_SHARE * output_tokens]
        if short and settings.ignore_eos:
            mean = statistics.fmean(s.mean_output_tokens or 0 for s in short)
            warnings.append(f"bucket {cell[0]}:{cell[1]}: the server generated {mean:.3g} of the {output_tokens} "
                            f"tokens asked for (mean, {len(short)} of {len(steps)} steps): it seems to ignore "
                            f"ignore_eos, so the load was lower than intended and this tput is too high")
        return BucketProfile(cell=cell, input_range=(i_lo, i_hi), output_range=(o_lo, o_hi),
                             prompt_tokens=prompt_tokens, output_tokens=output_tokens, status=status, tput=tput,
                             message=message, best=best, steps=tuple(steps), warnings=tuple(warnings),
                             timeout=timeout)

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
            r = await step(min(lo.rate * settings.growth, settings.max_rate))
            if r.passed:
                lo = r
            else:
                hi = r
                break
        if hi is None:
            return done(BucketStatus.CAPPED, lo.rate, f"the SLO still held at --max-rate {settings.max_rate:g} req/s; "
                                                      f"the real maximum is higher", lo)
    else:
        hi = first
        timed_out_in_a_row = 1 if all_timed_out(first) else 0
        while hi.rate / settings.growth >= settings.min_rate * (1 - 1e-9):
            if timed_out_in_a_row >= TIMEOUT_STEPS_TO_FAIL:
                break
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
            return done(BucketStatus.SLO_NOT_MET, 0.0, f"the SLO fails even at {hi.rate:g} req/s ({hi.reason})", None)
    bracket = (lo.rate, hi.rate)
    for _ in range(settings.bisect_steps):
        r = await step((lo.rate + hi.rate) / 2)
        if r.passed:
            lo = r
        else:
            hi = r
    message = f"highest pass {lo.rate:.3g} req/s, fails at {hi.rate:.3g} req/s: {hi.reason}"
    if settings.estimate == Estimate.FIT:
        crossing = _fit_crossing([s for s in steps if bracket[0] <= s.rate <= bracket[1]], settings.tpot_slo_ms)
        if crossing is not None:
            tput = min(max(crossing, bracket[0]), bracket[1])
            return done(BucketStatus.OK, tput, f"fitted crossing of the SLO; {message}", lo)
    return done(BucketStatus.OK, lo.rate, message, lo)


def _fit_crossing(steps: Sequence[StepResult], slo_ms: float) -> float | None:
    """The rate where a least-squares line through (rate, mean TPOT) of error-free steps meets the SLO.

    Every step near the SLO then counts with its measured TPOT, not only as pass/fail, which averages out the
    load noise of short steps (bisection alone follows whichever step happened to be lucky).
    """
    points = [(s.rate, s.mean_tpot_ms) for s in steps
              if s.mean_tpot_ms is not None and s.timeouts == 0 and not s.failed_on_errors and not s.client_errors]
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    if slope <= 0:  # noise swamps the trend: no crossing to trust
        return None
    return mean_x + (slo_ms - mean_y) / slope


async def _profile(ep: Endpoint, model: str, input_edges: tuple[int, ...], output_edges: tuple[int, ...],
                   cells: list[Cell], settings: ProfileSettings, on_progress: ProgressCallback | None
                   ) -> list[BucketProfile]:
    await check_endpoint(ep, model, settings)
    client = _client(ep, settings)
    rng = random.Random(settings.seed)
    results = []
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
    return results


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
    measured = asyncio.run(_profile(ep, model, in_edges, out_edges, chosen, settings, on_progress))
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
                         seconds=time.perf_counter() - started)


__all__ = [
    "ERROR_TOLERANCE", "PROMPT_WORDS", "ProfileResult", "ProfileSettings", "bucket_timeout", "bucket_tokens",
    "check_endpoint", "parse_cells", "profile_endpoint", "representative_tokens", "synthetic_prompt",
]
