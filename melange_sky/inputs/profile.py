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

The client speaks HTTP/1.1 itself (asyncio streams, standard library only), one connection per request, follows no
redirects and only ever connects to the host and port of the endpoint URL given.

Prompt sizes: a prompt of N tokens is N words drawn at random from common English words that are each a single
token (with their leading space) in the GPT-2/cl100k, Llama and Mistral tokenizers, so N words ~ N tokens (+1 BOS on
some models); random words also mean no two requests share a prefix, so prefix caching does not flatter the
numbers. The server's own `usage.prompt_tokens` is recorded per step to show the real count. `max_tokens` is the
representative output length with "ignore_eos": true (vLLM, SGLang), so every request generates exactly that many.
"""
from __future__ import annotations

import asyncio
import copy
import json
import math
import random
import ssl
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from urllib.parse import urlsplit

from melange_sky.errors import EndpointUnreachable, ProfileError, ProfileFailed
from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, check_edges
from melange_sky.core.config import Pricer
from melange_sky.core.config_doc import MergeResult, check_merged, edges_for_config, gpu_entry

Cell = tuple[int, int]

#: Words that are one token each (with a leading space) in the common LLM tokenizers.
PROMPT_WORDS: tuple[str, ...] = tuple("""
the of and to in is it you that he was for on are with as his they at be this from have or by one had not but what
all were when we there can an your which their said if do will each about how up out them then she many some so these
would other into has more her two like him see time could no make than first been its who now people my made over did
down only way find use may water long little very after words called just where most know""".split())
#: Body bytes kept from an HTTP error response, for the message.
_ERROR_BODY_LIMIT = 4096
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


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server's base URL, split into what the HTTP client needs."""

    url: str  # as given, without credentials (user:password@) and a trailing "/"
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/prefix", without a trailing "/v1"
    origin: str = ""  # scheme://host[:port], without credentials

    def path(self, suffix: str) -> str:
        return f"{self.base_path}{suffix}"

    def full_url(self, suffix: str) -> str:
        return f"{self.origin}{self.path(suffix)}"


@dataclass(frozen=True)
class ProfileSettings:
    """How hard and how long to measure. Defaults suit a real GPU server; tests shrink them."""

    tpot_slo_ms: float = 120.0
    requests_per_step: int = 50  # measured requests per step (plus warm-up and filler, each at most as many)
    start_rate: float = 1.0  # req/s of the first step
    max_rate: float = 512.0  # stop growing here and report the bucket as capped
    min_rate: float = 0.05  # stop shrinking here and report the SLO as not met
    growth: float = 2.0
    bisect_steps: int = 4  # each halves the interval between the last passing and the first failing rate
    request_timeout: float = 120.0  # seconds for a whole streamed request
    connect_timeout: float = 5.0
    size: str = "mid"  # representative length of a bucket: "mid" (midpoint) or "upper" (largest length)
    estimate: str = "fit"  # tput: "fit" (SLO crossing of a line through the bracketing steps) or "pass" (highest pass)
    ignore_eos: bool = True
    api_key: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.tpot_slo_ms > 0, "--tpot-slo-ms must be positive"),
            (self.requests_per_step >= 1, "--requests-per-step must be at least 1"),
            (0 < self.min_rate <= self.start_rate <= self.max_rate,
             "rates must satisfy 0 < min rate <= --start-rate <= --max-rate"),
            (self.growth > 1, "growth must be above 1"),
            (self.bisect_steps >= 0, "bisect steps must be >= 0"),
            (self.request_timeout > 0 and self.connect_timeout > 0, "timeouts must be positive"),
            (self.size in ("mid", "upper"), "--size must be mid or upper"),
            (self.estimate in ("fit", "pass"), "--estimate must be fit or pass"),
        ]
        for ok, message in checks:
            if not ok:
                raise ProfileError(message)


@dataclass(frozen=True)
class RequestRecord:
    """One streamed request: its timings (seconds) or why it failed."""

    ok: bool
    latency: float
    ttft: float | None = None
    tpot: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the server counted them (usage), when it says
    error: str | None = None
    timed_out: bool = False
    status: int | None = None  # the HTTP status of an error response


@dataclass(frozen=True)
class StepResult:
    """One rate tried on one bucket: the measured requests' statistics and whether the SLO held."""

    rate: float
    sent: int
    measured: int
    ok: int
    errors: int
    timeouts: int
    passed: bool
    reason: str
    mean_tpot_ms: float | None = None
    p50_tpot_ms: float | None = None
    p99_tpot_ms: float | None = None
    mean_ttft_ms: float | None = None
    p50_ttft_ms: float | None = None
    p99_ttft_ms: float | None = None
    p50_latency_ms: float | None = None
    p99_latency_ms: float | None = None
    server_prompt_tokens: float | None = None  # mean usage.prompt_tokens
    first_error: str | None = None
    seconds: float = 0.0
    warmup: int = 0  # requests sent before the first measured one
    client_errors: int = 0  # measured requests answered with an HTTP 4xx (but 408, 429): the request is wrong
    failed_on_errors: bool = False  # failed only because more than ERROR_TOLERANCE of the requests errored
    mean_output_tokens: float | None = None  # generated per successful request (usage.completion_tokens)


@dataclass(frozen=True)
class BucketProfile:
    """The outcome for one bucket. `tput` is the highest passing rate (0 unless status is ok or capped)."""

    cell: Cell
    input_range: tuple[int, int]
    output_range: tuple[int, int]
    prompt_tokens: int
    output_tokens: int
    status: str  # "ok", "capped" (passed at max_rate), "slo_not_met", "failed" (errors/timeouts), "not_measured"
    tput: float
    message: str = ""
    best: StepResult | None = None  # the step at `tput`: its TTFT / TPOT / latency percentiles
    steps: tuple[StepResult, ...] = ()
    warnings: tuple[str, ...] = ()
    timeout: float | None = None  # seconds each request of this bucket may take (see `bucket_timeout`)


@dataclass(frozen=True)
class ProfileResult:
    """The profile of one GPU type: a `tputs` matrix over the buckets, and per bucket how it was measured."""

    endpoint: str
    model: str
    tpot_slo_ms: float
    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    buckets: tuple[BucketProfile, ...]
    settings: ProfileSettings
    seconds: float

    @property
    def tputs(self) -> list[list[float]]:
        """Requests/s per bucket; 0 where not measured, failed or the SLO was never met (see `buckets`)."""
        rows, cols = len(self.input_edges) - 1, len(self.output_edges) - 1
        matrix = [[0.0] * cols for _ in range(rows)]
        for b in self.buckets:
            matrix[b.cell[0]][b.cell[1]] = round(b.tput, 3)
        return matrix

    @property
    def not_measured(self) -> list[Cell]:
        return [b.cell for b in self.buckets if b.status == "not_measured"]

    @property
    def failed(self) -> list[Cell]:
        return [b.cell for b in self.buckets if b.status == "failed"]

    @property
    def warnings(self) -> list[str]:
        return [w for b in self.buckets for w in b.warnings]

    def check_usable(self, into: str | None = None) -> None:
        """`ProfileFailed` unless at least one bucket is ok or capped: a profile of only zeros is not a profile."""
        measured = [b for b in self.buckets if b.status != "not_measured"]
        if any(b.status in ("ok", "capped") for b in measured):
            return
        failed = [b for b in measured if b.status == "failed"]
        if len(failed) == len(measured):
            what = f"no bucket was measured: all {len(failed)} failed (first: {failed[0].message})"
        else:
            what = (f"no bucket met the SLO: {len(measured) - len(failed)} not met even at the lowest rate, "
                    f"{len(failed)} failed")
        raise ProfileFailed(f"{what}" + (f"; {into} not changed" if into else ""))

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self.settings)
        settings.pop("api_key", None)  # never written to a file
        return {"endpoint": self.endpoint, "model": self.model, "tpot_slo_ms": self.tpot_slo_ms,
                "input_buckets": list(self.input_edges), "output_buckets": list(self.output_edges),
                "tputs": self.tputs, "seconds": round(self.seconds, 2), "settings": settings,
                "buckets": [_bucket_dict(b) for b in self.buckets]}


def _bucket_dict(b: BucketProfile) -> dict[str, Any]:
    d = asdict(b)
    d["cell"] = list(b.cell)
    d["input_range"], d["output_range"] = list(b.input_range), list(b.output_range)
    return d


@dataclass(frozen=True)
class ProfileEvent:
    """Progress for a live display: a bucket starts, a step ends, or a bucket ends."""

    kind: str  # "bucket_start", "step", "bucket_done"
    cell: Cell
    index: int  # 1-based position among the buckets being measured
    total: int
    prompt_tokens: int
    output_tokens: int
    step: StepResult | None = None
    bucket: BucketProfile | None = None


ProgressCallback = Callable[[ProfileEvent], None]


# ---- inputs --------------------------------------------------------------------------------------------------------
def parse_endpoint(url: str) -> Endpoint:
    """http(s)://host[:port][/prefix]; a trailing /v1 is dropped (the client adds /v1/completions itself).

    Credentials in the URL (user:password@) are dropped from everything shown or written; a path into the API
    (/v1/completions, /v1/chat/...) is refused with the base URL to give instead.
    """
    parts = urlsplit(url.strip())
    netloc = parts.netloc.rpartition("@")[2]
    shown = parts._replace(netloc=netloc).geturl()
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProfileError(f"--endpoint {shown!r} is not an http(s) URL; give the server's base URL, e.g. "
                           f"http://10.0.0.5:8000")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ProfileError(f"--endpoint {shown!r} has an invalid port") from None
    origin = f"{parts.scheme}://{netloc}"
    base = parts.path.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    if "/v1/" in f"{base}/":
        prefix = base[:f"{base}/".index("/v1/")]
        raise ProfileError(f"--endpoint {shown!r} points into the API ({parts.path}); give the server's base URL, "
                           f"e.g. {origin}{prefix} (the profiler calls /v1/models and /v1/completions itself)")
    return Endpoint(url=f"{origin}{base}{'/v1' if parts.path.rstrip('/').endswith('/v1') else ''}",
                    scheme=parts.scheme, host=parts.hostname, port=port, base_path=base, origin=origin)


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


def representative_tokens(lo: int, hi: int, size: str = "mid") -> int:
    """The length a bucket [lo, hi) is profiled at: its midpoint, or its largest length ("upper")."""
    value = (lo + hi) // 2 if size == "mid" else hi - 1
    return max(1, value, lo)


def bucket_tokens(input_range: tuple[int, int], output_range: tuple[int, int], size: str = "mid") -> tuple[int, int]:
    """(prompt tokens, output tokens) a bucket is profiled at; at least 2 output tokens, since TPOT needs 2."""
    return representative_tokens(*input_range, size), max(2, representative_tokens(*output_range, size))


def bucket_timeout(settings: ProfileSettings, prompt_tokens: int, output_tokens: int) -> float:
    """Seconds one request of a bucket may take: --timeout, or more when its output at the SLO needs more."""
    needed = output_tokens * settings.tpot_slo_ms / 1000 + prompt_tokens * _PREFILL_ALLOWANCE_S_PER_TOKEN
    return round(max(settings.request_timeout, TIMEOUT_SLO_MULTIPLE * needed), 3)


def synthetic_prompt(tokens: int, rng: random.Random) -> str:
    """About `tokens` tokens of random common words (see the module docstring for the approximation)."""
    return " ".join(rng.choices(PROMPT_WORDS, k=tokens))


# ---- HTTP over asyncio streams -------------------------------------------------------------------------------------
class _HttpError(Exception):
    pass


async def _connect(ep: Endpoint, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = ssl.create_default_context() if ep.scheme == "https" else None
    return await asyncio.wait_for(asyncio.open_connection(ep.host, ep.port, ssl=ctx), timeout)


def _request_bytes(ep: Endpoint, method: str, path: str, body: bytes | None, api_key: str | None) -> bytes:
    host = ep.host if ":" not in ep.host else f"[{ep.host}]"
    default_port = 443 if ep.scheme == "https" else 80
    lines = [f"{method} {ep.path(path)} HTTP/1.1", f"Host: {host}" + ("" if ep.port == default_port else f":{ep.port}"),
             "User-Agent: melange-sky-profile", "Connection: close"]
    if body is not None:
        lines += ["Content-Type: application/json", "Accept: text/event-stream", f"Content-Length: {len(body)}"]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _HttpError(f"not an HTTP response: {status_line[:60]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body as it arrives: chunked, Content-Length or until the server closes."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise _HttpError("connection closed in the middle of the response")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            data = await reader.readexactly(size)
            await reader.readline()
            yield data
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            data = await reader.read(min(remaining, 65536))
            if not data:
                raise _HttpError("connection closed in the middle of the response")
            remaining -= len(data)
            yield data
    else:
        while data := await reader.read(65536):
            yield data


async def _sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The payload of each `data:` line of a server-sent event stream."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if buffer.startswith(b"data:"):
        yield buffer[5:].strip()


def _error_text(status: int, body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        err = data.get("error", data) if isinstance(data, dict) else data
        text = err.get("message", text) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    text = " ".join(str(text).split())
    return f"HTTP {status}: {text[:200]}" if text else f"HTTP {status}"


async def _http_get(ep: Endpoint, path: str, settings: ProfileSettings) -> tuple[int, bytes]:
    reader, writer = await _connect(ep, settings.connect_timeout)
    try:
        writer.write(_request_bytes(ep, "GET", path, None, settings.api_key))
        await writer.drain()
        status, headers = await _read_head(reader)
        body = b""
        async for data in _body(reader, headers):
            body += data
            if len(body) > 1 << 20:
                break
        return status, body
    finally:
        writer.close()


async def _stream_completion(ep: Endpoint, payload: bytes, settings: ProfileSettings) -> RequestRecord:
    clock = time.perf_counter
    start = clock()
    first = last = None
    chunks = 0
    usage: dict[str, Any] | None = None
    try:
        reader, writer = await _connect(ep, settings.connect_timeout)
    except (TimeoutError, OSError) as exc:
        return RequestRecord(ok=False, latency=clock() - start, error=f"cannot connect: {_os_reason(exc)}")
    try:
        writer.write(_request_bytes(ep, "POST", "/v1/completions", payload, settings.api_key))
        await writer.drain()
        status, headers = await _read_head(reader)
        if status != 200:
            body = b""
            async for data in _body(reader, headers):
                body += data
                if len(body) > _ERROR_BODY_LIMIT:
                    break
            return RequestRecord(ok=False, latency=clock() - start, error=_error_text(status, body), status=status)
        async for data in _sse_data(_body(reader, headers)):
            if data == b"[DONE]":
                break
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                continue
            if not isinstance(event, dict):
                continue
            if "error" in event:
                return RequestRecord(ok=False, latency=clock() - start, error=_error_text(200, data))
            choices = event.get("choices") or []
            if choices and isinstance(choices[0], dict) and choices[0].get("text"):
                now = clock()
                if first is None:
                    first = now
                last = now
                chunks += 1
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
    except (OSError, asyncio.IncompleteReadError, _HttpError, ValueError) as exc:
        return RequestRecord(ok=False, latency=clock() - start, error=f"broken response: {_os_reason(exc)}")
    finally:
        writer.close()
    end = clock()
    if first is None or last is None:
        return RequestRecord(ok=False, latency=end - start, error="the stream ended without any token")
    tokens = chunks
    prompt_tokens = None
    if usage:
        try:
            tokens = int(usage.get("completion_tokens") or chunks)
        except (TypeError, ValueError):  # a server's odd usage object does not lose the timings
            tokens = chunks
        prompt_tokens = usage.get("prompt_tokens")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return RequestRecord(ok=True, latency=end - start, ttft=first - start, tpot=tpot, output_tokens=tokens,
                         prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None)


async def _timed_request(ep: Endpoint, payload: bytes, settings: ProfileSettings, timeout: float) -> RequestRecord:
    start = time.perf_counter()
    try:
        return await asyncio.wait_for(_stream_completion(ep, payload, settings), timeout)
    except TimeoutError:
        return RequestRecord(ok=False, latency=time.perf_counter() - start, timed_out=True,
                             error=f"timed out after {timeout:g} s")


def _client_error(status: int | None) -> bool:
    """An HTTP 4xx that says the request itself is wrong (not 408 timeout or 429 rate limit, which are load)."""
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# ---- checking the endpoint -----------------------------------------------------------------------------------------
async def check_endpoint(ep: Endpoint, model: str, settings: ProfileSettings) -> None:
    """Fail fast, in one line, when nothing listens at the endpoint or it does not serve `model`."""
    try:
        status, body = await asyncio.wait_for(_http_get(ep, "/v1/models", settings), settings.connect_timeout * 2)
    except (TimeoutError, OSError) as exc:
        raise EndpointUnreachable(f"cannot reach {ep.url} ({_os_reason(exc)}): is the server running and the port "
                                  f"open? Try: curl {ep.url}/v1/models") from None
    except (_HttpError, asyncio.IncompleteReadError, ValueError) as exc:
        raise EndpointUnreachable(f"{ep.url} does not answer like an HTTP server ({exc})") from None
    if status in (401, 403):
        raise ProfileError(f"{ep.url} refused the request ({_error_text(status, body)}): pass --api-key "
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
    record = await _timed_request(ep, probe, settings, settings.request_timeout)
    if _client_error(record.status):
        raise ProfileError(f"POST {ep.full_url('/v1/completions')} answered {record.error}: is --endpoint the "
                           f"server's base URL (e.g. {ep.origin}) and --model {model!r} right? Try: "
                           f"curl {ep.full_url('/v1/models')}")


def _completion_payload(model: str, prompt: str, max_tokens: int, settings: ProfileSettings) -> bytes:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if settings.ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()


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


async def _run_step(ep: Endpoint, rate: float, make_payload: Callable[[], bytes], settings: ProfileSettings,
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
            if errored > allowed or _client_error(task.result().status):
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
        return asyncio.create_task(_timed_request(ep, make_payload(), settings, timeout))

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
    client_errors = sum(1 for r in records if _client_error(r.status))
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


async def _profile_bucket(ep: Endpoint, model: str, cell: Cell, ranges: tuple[tuple[int, int], tuple[int, int]],
                          settings: ProfileSettings, rng: random.Random,
                          emit: Callable[[str, StepResult | None, BucketProfile | None], None]) -> BucketProfile:
    (i_lo, i_hi), (o_lo, o_hi) = ranges
    prompt_tokens, output_tokens = bucket_tokens(*ranges, settings.size)
    timeout = bucket_timeout(settings, prompt_tokens, output_tokens)

    def make_payload() -> bytes:
        return _completion_payload(model, synthetic_prompt(prompt_tokens, rng), output_tokens, settings)

    steps: list[StepResult] = []

    async def run(rate: float) -> StepResult:
        result = await _run_step(ep, rate, make_payload, settings, rng, timeout)
        steps.append(result)
        emit("step", result, None)
        return result

    async def step(rate: float) -> StepResult:
        result = await run(rate)
        if result.failed_on_errors:  # transient errors: one more try at the same rate before it counts
            result = await run(rate)
        return result

    def done(status: str, tput: float, message: str, best: StepResult | None) -> BucketProfile:
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
            return done("failed", 0.0, f"the server rejects these requests: {r.first_error}", None)
        if r.ok == 0 and r.timeouts == 0 and r.errors > 0:
            return done("failed", 0.0, f"every request failed ({r.errors} of {r.errors}): {r.first_error}", None)
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
            return done("capped", lo.rate, f"the SLO still held at --max-rate {settings.max_rate:g} req/s; the real "
                                           f"maximum is higher", lo)
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
                return done("failed", 0.0, f"timeouts: every measured request timed out at {rates} req/s: "
                                           f"{hi.first_error}", None)
            if hi.failed_on_errors:
                return done("failed", 0.0, f"errors: more than {100 * ERROR_TOLERANCE:g}% of requests fail even "
                                           f"at {hi.rate:g} req/s: {hi.first_error}", None)
            return done("slo_not_met", 0.0, f"the SLO fails even at {hi.rate:g} req/s ({hi.reason})", None)
    bracket = (lo.rate, hi.rate)
    for _ in range(settings.bisect_steps):
        r = await step((lo.rate + hi.rate) / 2)
        if r.passed:
            lo = r
        else:
            hi = r
    message = f"highest pass {lo.rate:.3g} req/s, fails at {hi.rate:.3g} req/s: {hi.reason}"
    if settings.estimate == "fit":
        crossing = _fit_crossing([s for s in steps if bracket[0] <= s.rate <= bracket[1]], settings.tpot_slo_ms)
        if crossing is not None:
            tput = min(max(crossing, bracket[0]), bracket[1])
            return done("ok", tput, f"fitted crossing of the SLO; {message}", lo)
    return done("ok", lo.rate, message, lo)


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
    rng = random.Random(settings.seed)
    results = []
    for index, cell in enumerate(cells, 1):
        i, j = cell
        ranges = ((input_edges[i], input_edges[i + 1]), (output_edges[j], output_edges[j + 1]))
        p_tok, o_tok = bucket_tokens(*ranges, settings.size)

        def emit(kind: str, step: StepResult | None, bucket: BucketProfile | None,
                 _cell: Cell = cell, _index: int = index, _p: int = p_tok, _o: int = o_tok) -> None:
            if on_progress is not None:
                on_progress(ProfileEvent(kind=kind, cell=_cell, index=_index, total=len(cells), prompt_tokens=_p,
                                         output_tokens=_o, step=step, bucket=bucket))

        emit("bucket_start", None, None)
        bucket = await _profile_bucket(ep, model, cell, ranges, settings, rng, emit)
        emit("bucket_done", None, bucket)
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
                status="not_measured", tput=0.0, message="not in --buckets"))
    return ProfileResult(endpoint=ep.url, model=model, tpot_slo_ms=settings.tpot_slo_ms, input_edges=in_edges,
                         output_edges=out_edges, buckets=tuple(buckets), settings=settings,
                         seconds=time.perf_counter() - started)


# ---- merging into a config -----------------------------------------------------------------------------------------
def config_edges(config: dict[str, Any], input_edges: Sequence[int] | None, output_edges: Sequence[int] | None,
                 source: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The bucket edges to profile for `--into CONFIG`, checked against its workload shape before any measuring."""
    dist = config.get("workload_distribution")
    shape = (len(dist), len(dist[0])) if isinstance(dist, list) and dist and isinstance(dist[0], list) else None
    in_edges, out_edges = edges_for_config(config, input_edges, output_edges, source)
    if shape is not None and shape != (len(in_edges) - 1, len(out_edges) - 1):
        raise ProfileError(
            f"{source}: workload_distribution is {shape[0]}x{shape[1]} but the buckets to profile are "
            f"{len(in_edges) - 1}x{len(out_edges) - 1}; pass --input-buckets and --output-buckets with "
            f"{shape[0] + 1} and {shape[1] + 1} edges (or add input_buckets/output_buckets to the config)")
    return in_edges, out_edges


def merge_profile(config: dict[str, Any], result: ProfileResult, gpu: str, cost: float | None = None,
                  source: str = "<config>", price: Pricer | None = None) -> MergeResult:
    """`config` with `gpu`'s tputs set from `result` (gpu_info as a dict or a list); a new GPU entry if needed.

    `gpu` matches an entry case-insensitively and through the catalog's aliases ("a10g" is "A10G"). Buckets not
    measured, and buckets that failed (errors, timeouts: no measurement), keep the GPU's previous value when it had
    a tputs matrix of the same shape, else 0; a bucket whose SLO was not met is a measured 0. `price` prices a GPU
    added without `cost` (see `core.config.Pricer`); without one the merge warns that the GPU needs a cost.
    """
    data = copy.deepcopy(config)
    warnings: list[str] = []
    tputs = result.tputs
    rows, cols = len(tputs), len(tputs[0])
    entry, added = gpu_entry(data, gpu, source)
    if cost is not None:
        entry["cost"] = cost
    old = entry.get("tputs")
    keep = isinstance(old, list) and len(old) == rows and all(isinstance(r, list) and len(r) == cols for r in old)
    for cells, why in ((result.not_measured, "were not measured"), (result.failed, "failed")):
        if not cells:
            continue
        for i, j in cells:
            if keep:
                tputs[i][j] = old[i][j]
        what = "kept their previous values" if keep else "are 0"
        warnings.append(f"{len(cells)} bucket(s) {why} and {what}: {', '.join(f'{i}:{j}' for i, j in cells)}")
    entry["tputs"] = tputs
    data.setdefault("input_buckets", list(result.input_edges))
    data.setdefault("output_buckets", list(result.output_edges))
    parsed, found = check_merged(data, source, price)
    warnings.extend(found)
    valid = parsed is not None
    if added and cost is None:
        spec = next((g for g in parsed.gpus if g.name == gpu), None) if parsed is not None else None
        if spec is not None and spec.cost_source == "catalog":
            warnings.append(f"{source}: added GPU {gpu!r}, priced from the catalog at ${spec.cost:.4g}/h per GPU "
                            f"(pass --cost to set your own price)")
        else:
            warnings.append(f"{source}: added GPU {gpu!r} without a cost: set its $/h (or pass --cost) before "
                            f"solving")
    return MergeResult(data=data, warnings=tuple(warnings), valid=valid)


__all__ = [
    "BucketProfile", "Endpoint", "PROMPT_WORDS", "ProfileEvent", "ProfileFailed", "ProfileResult", "ProfileSettings",
    "RequestRecord", "StepResult", "bucket_timeout", "bucket_tokens", "check_endpoint", "config_edges",
    "merge_profile", "parse_cells", "parse_endpoint", "profile_endpoint", "representative_tokens",
    "synthetic_prompt",
]
