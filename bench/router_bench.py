"""The router on one core: throughput, added latency and 1,000 concurrent streams, against a minimal aiohttp relay.

    python bench/router_bench.py                        # about 5 minutes; wrk if installed, else a Python client
    python bench/router_bench.py -o bench/results/router_bench.md
    python bench/router_bench.py --quick                # 3 s runs, one trial: a smoke run (under 1 minute)
    python bench/router_bench.py --install-wrk          # first `apt-get install -y wrk` (Debian's package)

Setup (2 cores or more): the router — the real `melange-sky serve --config CFG --replica GPU=URL ...` — runs pinned
to core 0 (`taskset -c 0`); the load generator, the upstreams and this script run on core 1. The yardstick, a
minimal aiohttp relay (`bench/minimal_relay.py`: same stack, none of the routing), is measured in the same run on
the same core against the same upstreams, alternating with the router trial by trial.

The upstreams: one process serving 4 OpenAI-compatible "replicas" (4 ports; 2 A10G and 2 L4 in the routing table,
whose shares for the benchmark's bucket are 0.625 / 0.375) with pre-built answers, so that core 1 is never what
limits a run (its own ceiling, load generator included, is measured first and printed). A completion answers
32 tokens with usage; a stream sends 32 SSE events and `data: [DONE]` in chunked encoding, one write per event,
back to back, or `bench_gap_ms` apart when the request says so (the concurrency test: 50 ms, a 1.6 s stream).

What is measured:
1. Peak throughput, non-streaming and streaming, through the router and the relay: closed loop, --connections
   connections, median of --trials runs; and each server's own CPU time per request (/proc), which is what bounds
   it on a core of its own, and holds up better than req/s when something else shares the machine.
2. Added latency at half of the router's peak: requests at that rate (Poisson arrivals over 128 connections) go
   direct to an upstream, through the router and through the relay, --trials times; added latency = router minus
   direct at p50 and at p99, per trial, and its median. The router's own histogram (`melange_added_latency_seconds`
   in /metrics) is shown too: it times the router's code but not the HTTP parsing or the client session's work, so
   it is a lower bound.
3. 1,000 concurrent streams for --streams-s seconds: errors seen by the client (connect, read, write, timeout,
   non-200, a body without `data: [DONE]` or with an error event), the router's non-200 answers and upstream errors,
   and the most streams in flight in the router at once (sampled from /health).

Every run also reports "other load": the CPU time that processes this script did not start used on the two cores
meanwhile. Figures taken while it is more than a few % are not this machine's capacity; run again when it is idle.

Every process this script starts is stopped when it ends, also on Ctrl-C or an error. Traffic goes to 127.0.0.1
only; each load run is bounded by its duration and by --max-requests.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROUTER_CPU, LOAD_CPU = 0, 1
PROMPT = "Summarise the following paragraph in one sentence for a busy reader who has no time at all: lorem ipsum."
TOKENS = 32  # tokens per answer, SSE events per stream
LATENCY_CONNECTIONS = 128
STREAM_GAP_MS = 50

#: The routing table's config: one bucket of demand, split by `--formulation split` between 1 A10G (0.625) and
#: 1 L4 (0.375). The benchmark's requests (about 25 prompt tokens, max_tokens 32) fall in bucket (0, 0).
CONFIG = {
    "name": "router-bench",
    "input_buckets": [1, 64, 4096], "output_buckets": [1, 64, 1024],
    "workload_distribution": [[1.0, 0.0], [0.0, 0.0]],
    "total_request_rate": 6.4,
    "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[4, 2], [2, 1]]},
                 "L4": {"cost": 0.75, "tputs": [[3, 1.5], [1.5, 0.75]]}},
}
REPLICA_GPUS = ("A10G", "A10G", "L4", "L4")


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- the upstream: pre-built OpenAI answers over raw asyncio (role "upstream", on the load core) -------------------
def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _answers() -> tuple[bytes, bytes, list[bytes]]:
    """(non-streaming response, streaming response head, the stream's chunks: 32 events, [DONE], the last chunk)."""
    text = " tok" * TOKENS
    completion = json.dumps({
        "id": "cmpl-bench", "object": "text_completion", "created": 1700000000, "model": "bench",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}],
        "usage": {"prompt_tokens": 25, "total_tokens": 25 + TOKENS, "completion_tokens": TOKENS}},
        separators=(",", ":")).encode()
    plain = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
             b"Server: bench-upstream\r\n\r\n%s" % (len(completion), completion))
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\nServer: bench-upstream\r\n\r\n")
    chunks = []
    for k in range(TOKENS):
        event = {"id": "cmpl-bench", "object": "text_completion", "created": 1700000000, "model": "bench",
                 "choices": [{"index": 0, "text": " tok", "logprobs": None,
                              "finish_reason": "length" if k == TOKENS - 1 else None, "stop_reason": None}]}
        chunks.append(_chunk(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"))
    chunks.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return plain, head, chunks


_PLAIN, _STREAM_HEAD, _STREAM_CHUNKS = _answers()
_SMALL = b'{"status":"ok","object":"list","data":[{"id":"bench","object":"model"}]}'
_SMALL_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(_SMALL), _SMALL)
_GAP = re.compile(rb'"bench_gap_ms"\s*:\s*(\d+)')


def _content_length(head: bytes) -> int:
    """The Content-Length of a message head (lower-cased), 0 without one."""
    at = head.find(b"content-length:")
    if at < 0:
        return 0
    stop = head.find(b"\r\n", at)
    return int(head[at + 15:stop if stop > 0 else len(head)])


class _UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection (no pipelining), answers pre-built."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.buffer = b""
        self.streaming = False
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            total = end + 4 + _content_length(head.lower())
            if len(buffer) < total:
                break
            body, buffer = buffer[end + 4:total], buffer[total:]
            self.answer(head, body)
        self.buffer = buffer

    def answer(self, head: bytes, body: bytes) -> None:
        if head.startswith(b"GET"):
            self.transport.write(_SMALL_ANSWER)
        elif b'"stream":true' in body or b'"stream": true' in body:
            gap = _GAP.search(body)
            write = self.transport.write
            write(_STREAM_HEAD)
            if gap is None:
                for chunk in _STREAM_CHUNKS:  # one write per event, as an engine flushes each token
                    write(chunk)
            else:
                loop = asyncio.get_running_loop()
                delay = int(gap.group(1)) / 1000
                for k, chunk in enumerate(_STREAM_CHUNKS):
                    loop.call_later(delay * k, self._send, chunk)
        else:
            self.transport.write(_PLAIN)

    def _send(self, chunk: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(chunk)


async def _serve_upstreams(count: int) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(_UpstreamProtocol, "127.0.0.1", 0, backlog=4096) for _ in range(count)]
    print("PORTS " + " ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    await asyncio.Event().wait()


# ---- the Python load generator (role "loadgen", when wrk is not installed) -----------------------------------------
class _ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        if b"content-length:" in head:
            complete = len(self.buffer) >= end + 4 + _content_length(head)
        else:
            complete = self.buffer.endswith(b"\r\n0\r\n\r\n")
        if complete:
            waiter.set_result(bytes(self.buffer))
            self.buffer.clear()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))


def _expire(waiter: asyncio.Future[bytes]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _body_ok(response: bytes, check: str) -> bool:
    if check == "sse":
        return b"data: [DONE]" in response and b'"error"' not in response
    return b'"choices"' in response


async def _python_load(port: int, path: str, body: bytes, connections: int, duration: float, gap_ms: float,
                       max_requests: int, timeout: float, check: str) -> dict[str, Any]:
    """What wrk measures (requests, errors, latency percentiles), from asyncio on one core."""
    loop = asyncio.get_running_loop()
    request = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\nContent-Length: %d"
               b"\r\n\r\n%s" % (path.encode(), port, len(body), body))
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0, "bad_body": 0}
    latencies: list[float] = []
    sent = 0
    start = time.perf_counter()
    end = start + duration

    async def connect() -> _ClientProtocol | None:
        try:
            _, protocol = await loop.create_connection(_ClientProtocol, "127.0.0.1", port)
            return protocol
        except OSError:
            errors["connect"] += 1
            await asyncio.sleep(0.05)
            return None

    async def worker(seed: int) -> None:
        nonlocal sent
        rng = random.Random(seed)
        protocol = await connect()
        while time.perf_counter() < end and sent < max_requests:
            if protocol is None or protocol.transport is None:
                protocol = await connect()
                continue
            if gap_ms:
                await asyncio.sleep(rng.expovariate(1000 / gap_ms))
            sent += 1
            waiter = protocol.waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter)
            began = time.perf_counter()
            protocol.transport.write(request)
            try:
                response = await waiter
            except TimeoutError:
                errors["timeout"] += 1
                protocol.transport.close()
                protocol = None
                continue
            except ConnectionError:
                errors["read"] += 1
                protocol = None
                continue
            finally:
                timer.cancel()
            latencies.append(time.perf_counter() - began)
            if not response.startswith(b"HTTP/1.1 200"):
                errors["status"] += 1
            elif not _body_ok(response, check):
                errors["bad_body"] += 1
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    await asyncio.gather(*(worker(k) for k in range(connections)))
    seconds = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(int(q / 100 * len(latencies)), len(latencies) - 1)] * 1e6 if latencies else 0.0

    return {"requests": len(latencies), "duration_us": seconds * 1e6, **errors, "p50_us": pct(50),
            "p90_us": pct(90), "p99_us": pct(99), "p999_us": pct(99.9), "max_us": latencies[-1] * 1e6 if latencies
            else 0.0, "mean_us": statistics.fmean(latencies) * 1e6 if latencies else 0.0}


# ---- wrk --------------------------------------------------------------------------------------------------------
WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
local cap = %(cap)d
local gap_ms = %(gap_ms)f
local check = "%(check)s"
seen, bad = 0, 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
if gap_ms > 0 then
  function delay() return math.floor(-math.log(1 - math.random()) * gap_ms + 0.5) end
end
function response(status, headers, body)
  seen = seen + 1
  if status == 200 then
    if check == "sse" then
      if not body:find("data: [DONE]", 1, true) or body:find('"error"', 1, true) then bad = bad + 1 end
    elseif not body:find('"choices"', 1, true) then bad = bad + 1 end
  end
  if seen >= cap then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + t:get("bad") end
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, ' ..
    '"write": %%d, "status": %%d, "timeout": %%d, "bad_body": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, ' ..
    '"p999_us": %%d, "max_us": %%d, "mean_us": %%.1f}\n', summary.requests, summary.duration, e.connect, e.read,
    e.write, e.status, e.timeout, b, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


@dataclass
class Load:
    """One load run's outcome."""

    requests: int
    seconds: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float = 0.0  # CPU time of the server under test (router or relay) during the run
    foreign_pct: float = 0.0  # CPU time of processes not started by this benchmark, % of the two cores' time

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def cpu_us(self) -> float:
        """The server's CPU time per request, µs: what its throughput is on a core of its own."""
        return self.server_cpu_s / self.requests * 1e6 if self.requests else 0.0


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_s(cores: tuple[int, ...]) -> float:
    """CPU seconds the given cores spent busy since boot (/proc/stat)."""
    busy = 0
    with open("/proc/stat") as stat:
        for line in stat:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cores:
                numbers = [int(v) for v in values[:8]]
                busy += sum(numbers) - numbers[3] - numbers[4]  # all but idle and iowait
    return busy / _TICK


def _process_s(pid: int) -> float:
    """CPU seconds (user + system) a process used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


class Loader:
    """Runs a load against a URL with wrk, or with this script's Python client (pinned to the load core)."""

    def __init__(self, wrk: str | None, workdir: Path, pin: list[str], max_requests: int, own: dict[int, int]):
        self.wrk, self.workdir, self.pin, self.max_requests = wrk, workdir, pin, max_requests
        self.own = own  # port -> pid of the long-running processes this benchmark started
        self.name = "wrk" if wrk else "python-asyncio"

    def run(self, port: int, body: dict[str, Any], connections: int, duration: float, rate: float | None = None,
            check: str = "json", timeout: float = 10.0) -> Load:
        """Load 127.0.0.1:port for `duration` s. CPU is accounted per process: the server on `port`, everything
        this benchmark runs (servers, upstreams, the load generator), and the rest (other users of the machine)."""
        raw = json.dumps(body, separators=(",", ":"))
        gap_ms = 0.0
        if rate:  # each connection waits an exponential gap between answers: about `rate` requests/s in all
            gap_ms = max(connections / rate * 1000 - 1.0, 0.0)
        pids = sorted(set(self.own.values()))
        before = {pid: _process_s(pid) for pid in pids}
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_before, wall_before = _busy_s((ROUTER_CPU, LOAD_CPU)), time.monotonic()
        if self.wrk:
            script = self.workdir / "load.lua"
            script.write_text(WRK_SCRIPT % {"body": raw, "cap": self.max_requests, "gap_ms": gap_ms,
                                            "check": check})
            command = [*self.pin, self.wrk, "-t1", f"-c{connections}", f"-d{duration:g}s",
                       f"--timeout={timeout:g}s", "-s", str(script), f"http://127.0.0.1:{port}/v1/completions"]
        else:
            command = [*self.pin, sys.executable, __file__, "--role", "loadgen", "--port", str(port), "--body", raw,
                       "--connections", str(connections), "--duration", str(duration), "--gap-ms", str(gap_ms),
                       "--max-requests", str(self.max_requests), "--timeout", str(timeout), "--check", check]
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + timeout + 60,
                              start_new_session=True)
        busy, wall = _busy_s((ROUTER_CPU, LOAD_CPU)) - busy_before, time.monotonic() - wall_before
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = {pid: _process_s(pid) - before[pid] for pid in pids}
        ours = sum(used.values()) + (children.ru_utime - children_before.ru_utime) + (
            children.ru_stime - children_before.ru_stime)
        line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
        if done.returncode != 0 or line is None:
            raise SystemExit(f"the load generator failed ({done.returncode}): {' '.join(command)}\n"
                             f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        result = json.loads(line[len("WRKJSON "):])
        errors = {k: int(result[k]) for k in ("connect", "read", "write", "status", "timeout", "bad_body")}
        return Load(int(result["requests"]), result["duration_us"] / 1e6, errors, result["p50_us"] / 1000,
                    result["p90_us"] / 1000, result["p99_us"] / 1000, result["max_us"] / 1000,
                    used.get(self.own.get(port, -1), 0.0), max(busy - ours, 0.0) / (2 * wall) * 100)


# ---- processes ----------------------------------------------------------------------------------------------------
class Processes:
    """The processes this script started; all stopped on exit (SIGTERM, then SIGKILL after a few seconds)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for _, process, _ in reversed(self.started):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 10
        for name, process, _ in reversed(self.started):
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                progress(f"  {name} did not stop on SIGTERM: killing it")
                process.kill()
                process.wait()

    def start(self, name: str, command: list[str], ready: str, env: dict[str, str] | None = None,
              wait_s: float = 30.0) -> tuple[str, int]:
        """Start a process with its output in a log file; wait for a line starting with `ready`: (it, the pid)."""
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                       start_new_session=True)  # Ctrl-C reaches this script, which stops them
        self.started.append((name, process, log))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith(ready):
                    return line, process.pid
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"{name} did not start ({' '.join(command)}):\n{log.read_text(errors='replace')[-3000:]}")


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - 127.0.0.1 only
        return answer.read()


def _metrics(base: str) -> dict[str, Any]:
    """The router's added-latency histogram buckets (cumulative), non-200 answers and upstream errors."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    buckets: dict[float, float] = {}
    statuses: dict[str, float] = {}
    errors = 0.0
    for family in text_string_to_metric_families(_get(base + "/metrics").decode()):
        for sample in family.samples:
            if sample.name == "melange_added_latency_seconds_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == "melange_requests_total":
                statuses[sample.labels["status"]] = statuses.get(sample.labels["status"], 0.0) + sample.value
            elif sample.name == "melange_upstream_errors_total":
                errors += sample.value
    return {"buckets": buckets, "statuses": statuses, "upstream_errors": errors}


def _histogram_quantiles(before: dict[float, float], after: dict[float, float]) -> tuple[float, float, int]:
    """(p50 upper bound s, p99 upper bound s, count) of the observations between two scrapes."""
    edges = sorted(after)
    counts = [after[e] - before.get(e, 0.0) for e in edges]
    total = counts[-1] if counts else 0

    def bound(q: float) -> float:
        for edge, count in zip(edges, counts, strict=True):
            if count >= q * total:
                return edge
        return math.inf

    return bound(0.5), bound(0.99), int(total)


# ---- the benchmark --------------------------------------------------------------------------------------------------
def _body(stream: bool, gap_ms: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "bench", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    if stream:
        body["stream"] = True
    if gap_ms:
        body["bench_gap_ms"] = gap_ms
    return body


def _find_wrk(install: bool) -> str | None:
    found = shutil.which("wrk")
    if found or not install:
        return found
    progress("installing wrk: apt-get install -y wrk")
    command = ["apt-get", "install", "-y", "wrk"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        command.insert(0, "sudo")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        progress(f"  apt-get install wrk failed ({done.returncode}); using the Python load generator\n"
                 f"{done.stderr[-800:]}")
    return shutil.which("wrk")


def _versions(wrk: str | None) -> dict[str, str]:
    import aiohttp  # noqa: PLC0415
    import orjson  # noqa: PLC0415

    versions = {"python": platform.python_version(), "aiohttp": aiohttp.__version__,
                "orjson": orjson.__version__}
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        versions["uvloop"] = uvloop.__version__
    if wrk:
        done = subprocess.run([wrk, "-v"], capture_output=True, text=True)
        versions["wrk"] = (done.stdout or done.stderr).split("[")[0].replace("wrk", "").strip() or "?"
    return versions


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


@dataclass
class Peak:
    runs: list[Load]

    @property
    def median(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    def spread(self) -> str:
        rates = sorted(r.rate for r in self.runs)
        return f"{rates[0]:,.0f}–{rates[-1]:,.0f}"

    @property
    def errors(self) -> int:
        return sum(r.error_count for r in self.runs)

    @property
    def cpu_us(self) -> float:
        return statistics.median(r.cpu_us for r in self.runs)

    @property
    def foreign(self) -> float:
        return max(r.foreign_pct for r in self.runs)


@dataclass
class Results:
    """Everything a run measured, for the report."""

    tool: str
    started: dt.datetime
    duration: float
    trials: int
    streams_s: float
    shares: dict[str, float]
    versions: dict[str, str]
    ceiling: dict[bool, Load] = field(default_factory=dict)
    peaks: dict[tuple[str, bool], Peak] = field(default_factory=dict)
    latency: dict[bool, dict[str, Any]] = field(default_factory=dict)
    concurrency: dict[str, Any] = field(default_factory=dict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--role", choices=["bench", "upstream", "loadgen"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="3 s runs, one trial, 5 s of concurrent streams")
    parser.add_argument("--duration", type=float, help="seconds per load run (default 8; --quick 3)")
    parser.add_argument("--trials", type=int, help="peak runs per target, alternating router and relay (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="connections for the peak runs (default 64)")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams (default 1000)")
    parser.add_argument("--streams-s", type=float, help="seconds of concurrent streams (default 15; --quick 5)")
    parser.add_argument("--max-requests", type=int, default=500_000, help="cap per load run (default 500,000)")
    parser.add_argument("--install-wrk", action="store_true", help="apt-get install -y wrk first if it is missing")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator even with wrk")
    parser.add_argument("-o", "--output", type=Path, help="also write the Markdown report to this file")
    # the roles' own options
    parser.add_argument("--ports", type=int, default=len(REPLICA_GPUS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    parser.add_argument("--gap-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--check", default="json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role != "bench":
        _role(args)
        return

    def terminated(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background (SIG_IGN)
    try:
        text = report(args, bench(args))
    except KeyboardInterrupt:
        progress("interrupted: every process this benchmark started is stopped")
        raise SystemExit(130) from None
    print(text)
    if args.output:
        args.output.write_text(text)
        progress(f"wrote {args.output}")


def _role(args: argparse.Namespace) -> None:
    try:
        import uvloop  # noqa: PLC0415

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as runner:
        if args.role == "upstream":
            runner.run(_serve_upstreams(args.ports))
        else:
            result = runner.run(_python_load(args.port, "/v1/completions", args.body.encode(), args.connections,
                                             args.duration, args.gap_ms, args.max_requests, args.timeout,
                                             args.check))
            print("WRKJSON " + json.dumps(result), flush=True)


def _replica_args(upstreams: list[str]) -> list[str]:
    return [a for gpu, url in zip(REPLICA_GPUS, upstreams, strict=True) for a in ("--replica", f"{gpu}={url}")]


def bench(args: argparse.Namespace) -> Results:
    duration = args.duration or (3.0 if args.quick else 8.0)
    trials = args.trials or (1 if args.quick else 3)
    streams_s = args.streams_s or (5.0 if args.quick else 15.0)
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if not {ROUTER_CPU, LOAD_CPU} <= cores or not shutil.which("taskset"):
        raise SystemExit("this benchmark needs cores 0 and 1 and taskset (util-linux): the router gets core 0, "
                         "everything else core 1")
    os.sched_setaffinity(0, {LOAD_CPU})  # this script's own polling stays off the router's core
    wrk = None if args.python_load else _find_wrk(args.install_wrk)
    pin_router, pin_load = ["taskset", "-c", str(ROUTER_CPU)], ["taskset", "-c", str(LOAD_CPU)]
    env = {k: v for k, v in os.environ.items() if k not in ("MELANGE_SKY_API_KEY", "MELANGE_SKY_UPSTREAM_API_KEY")}
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp, Processes(Path(tmp)) as procs:
        workdir = Path(tmp)
        env.update(MELANGE_SKY_HOME=str(workdir / "home"), PYTHONPATH=os.pathsep.join(
            [str(REPO), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]))
        line, upstream_pid = procs.start("upstreams", [*pin_load, sys.executable, __file__, "--role", "upstream",
                                                       "--ports", str(len(REPLICA_GPUS))], "PORTS", env)
        ports = [int(p) for p in line.split()[1:]]
        upstreams = [f"http://127.0.0.1:{p}" for p in ports]
        config = workdir / "router-bench.json"
        config.write_text(json.dumps(CONFIG))
        line, router_pid = procs.start("router", [*pin_router, sys.executable, "-m", "melange_sky.cli", "serve",
                                                  "--config", str(config), "--formulation", "split", "--port", "0",
                                                  *_replica_args(upstreams)], "Listening on", env)
        router_port = int(line.split()[2].rsplit(":", 1)[1])
        line, relay_pid = procs.start("relay", [*pin_router, sys.executable, str(REPO / "bench" / "minimal_relay.py"),
                                                *[a for u in upstreams for a in ("--upstream", u)]], "PORT", env)
        relay_port = int(line.split()[1])
        router_url = f"http://127.0.0.1:{router_port}"
        routes = json.loads(_get(router_url + "/routes"))
        results = Results(wrk and "wrk" or "python-asyncio", dt.datetime.now(dt.UTC), duration, trials, streams_s,
                          next((r["shares"] for r in routes["routing"] if r["bucket"] == [0, 0]), {}),
                          _versions(wrk))
        own = {router_port: router_pid, relay_port: relay_pid, **{p: upstream_pid for p in ports}}
        loader = Loader(wrk, workdir, pin_load, args.max_requests, own)
        progress(f"load generator: {loader.name}" + ("" if wrk else " (wrk is not installed: --install-wrk)"))
        targets = {"router": router_port, "relay": relay_port}

        # 0. warm-up, and the load core's own ceiling (load generator straight to one upstream)
        for port in targets.values():
            loader.run(port, _body(False), args.connections, 1.0)
            loader.run(port, _body(True), args.connections, 1.0, check="sse")
        results.ceiling = {stream: loader.run(ports[0], _body(stream), args.connections, duration,
                                              check="sse" if stream else "json") for stream in (False, True)}
        progress(f"load core ceiling: {results.ceiling[False].rate:,.0f} req/s non-streaming, "
                 f"{results.ceiling[True].rate:,.0f} streaming")

        # 1. peaks, alternating router and relay
        results.peaks = {(t, s): Peak([]) for t in targets for s in (False, True)}
        for trial in range(trials):
            for stream in (False, True):
                for name, port in targets.items():
                    run = loader.run(port, _body(stream), args.connections, duration,
                                     check="sse" if stream else "json")
                    results.peaks[(name, stream)].runs.append(run)
                    progress(f"  trial {trial + 1}/{trials} {'stream' if stream else 'plain '} {name:6} "
                             f"{run.rate:8,.0f} req/s  {run.cpu_us:5.0f} µs CPU/req  p99 {run.p99_ms:6.2f} ms  "
                             f"errors {run.error_count}  other load {run.foreign_pct:3.0f}%")

        # 2. latency at half of the router's peak: direct, router, relay at the same offered rate, per trial
        for stream in (False, True):
            rate = results.peaks[("router", stream)].median / 2
            check = "sse" if stream else "json"
            row: dict[str, Any] = {"rate": rate, "direct": [], "router": [], "relay": []}
            before = _metrics(router_url)["buckets"]
            for trial in range(trials):
                for name, port in (("direct", ports[0]), ("router", router_port), ("relay", relay_port)):
                    run = loader.run(port, _body(stream), LATENCY_CONNECTIONS, duration, rate=rate, check=check)
                    row[name].append(run)
                    progress(f"  trial {trial + 1}/{trials} half peak {'stream' if stream else 'plain '} {name:6} "
                             f"{run.rate:8,.0f} req/s  p50 {run.p50_ms:.3f} ms  p99 {run.p99_ms:.3f} ms  "
                             f"errors {run.error_count}  other load {run.foreign_pct:3.0f}%")
            row["histogram"] = _histogram_quantiles(before, _metrics(router_url)["buckets"])
            results.latency[stream] = row

        # 3. concurrent streams, each 32 events STREAM_GAP_MS apart
        progress(f"{args.streams} concurrent streams for {streams_s:g} s")
        results.concurrency = _concurrent_streams(loader, router_url, router_port, args.streams, streams_s)
    return results


def _concurrent_streams(loader: Loader, router_url: str, port: int, streams: int, seconds: float) -> dict[str, Any]:
    """Hold `streams` streams open through the router; sample its requests in flight from /health meanwhile."""
    before = _metrics(router_url)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:  # one keep-alive connection; an answer may take a while while the router is saturated
        host, port_text = router_url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port_text), timeout=10)
        while not stop.wait(0.25):
            try:
                connection.request("GET", "/health")
                samples.append(int(json.loads(connection.getresponse().read())["in_flight"]))
            except (OSError, ValueError, KeyError, http.client.HTTPException):
                connection.close()
        connection.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        load = loader.run(port, _body(True, STREAM_GAP_MS), streams, seconds, check="sse", timeout=30.0)
    finally:
        stop.set()
        sampler.join()
    after = _metrics(router_url)
    statuses = {k: int(v - before["statuses"].get(k, 0.0)) for k, v in after["statuses"].items()}
    return {"load": load, "most_in_flight": max(samples, default=0), "samples": len(samples),
            "statuses": {k: v for k, v in statuses.items() if v},
            "upstream_errors": int(after["upstream_errors"] - before["upstream_errors"])}


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(args: argparse.Namespace, results: Results) -> str:
    r = results
    command = "python bench/router_bench.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a not in {"-o", "--output", str(args.output)})
    lines = [
        "# `melange-sky serve` on one core: throughput, added latency, concurrent streams",
        "",
        f"{r.started:%Y-%m-%d %H:%M} UTC, `{command}`. Machine: {os.cpu_count()} cores ({_cpu_model()}), Linux "
        f"{platform.release()}; " + ", ".join(f"{k} {v}" for k, v in r.versions.items()) + ".",
        "",
        f"Router (`melange-sky serve --config ... --formulation split`: 2 A10G + 2 L4 replicas, the benchmark's bucket "
        f"split {', '.join(f'{g} {v:.3f}' for g, v in r.shares.items())}) and minimal relay "
        "(`bench/minimal_relay.py`) on core 0; load generator "
        f"(**{r.tool}**), upstreams (one process, 4 ports, pre-built answers) and this script on core 1. "
        f"A completion answers {TOKENS} tokens with usage; a stream is {TOKENS} SSE events + `[DONE]`, one write each.",
        "",
        f"**Peak throughput**: {args.connections} connections, closed loop, {r.duration:g} s per run, median of "
        f"{r.trials} runs (range), router and relay alternating. CPU/req is the server process's own CPU time per "
        "request (what bounds it on a core of its own); \"other load\" is the CPU that processes outside this "
        "benchmark used meanwhile, in % of both cores (worst run), the kernel's own network work included (its "
        "softirq time: the few % of the streaming runs).",
        "",
        "| | router req/s | relay req/s | router / relay | CPU/req router / relay | errors | other load | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for stream, floor in ((False, 2500), (True, 1500)):
        router, relay = r.peaks[("router", stream)], r.peaks[("relay", stream)]
        ratio = router.median / relay.median if relay.median else 0.0
        lines.append(
            f"| {'streaming (32 events)' if stream else 'non-streaming'} | {router.median:,.0f} ({router.spread()}) "
            f"| {relay.median:,.0f} ({relay.spread()}) | {ratio:.2f} | {router.cpu_us:.0f} / {relay.cpu_us:.0f} µs "
            f"| {router.errors + relay.errors} | {max(router.foreign, relay.foreign):.0f}% "
            f"| ≥ {floor:,}/s and ≥ 0.7×: {_met(router.median >= floor and ratio >= 0.7)} |")
    lines += [
        "",
        "The load core's ceiling (the load generator straight to one upstream, no relay): "
        f"{r.ceiling[False].rate:,.0f} req/s non-streaming, {r.ceiling[True].rate:,.0f} streaming — far above "
        "what goes through core 0, so the load side never limits a run.",
        "",
        f"**Added latency at half of the router's peak** ({LATENCY_CONNECTIONS} connections, Poisson arrivals, "
        f"{r.duration:g} s per path, {r.trials} trials, medians): the same offered rate straight to an upstream, "
        "through the router and through the relay, one after the other; added = router − direct, percentile by "
        "percentile, per trial (median and range). The router's own histogram "
        "(`melange_added_latency_seconds` in /metrics, shown as bucket upper bounds) times its code between reading "
        "a request and relaying it, but not HTTP parsing, the client session's work or the wait for the event loop: "
        "a lower bound, which is why the client-side difference is the figure held to the target.",
        "",
        "| | req/s | direct p50 / p99 ms | router p50 / p99 ms | relay p50 / p99 ms | added p50 / p99 ms (range) "
        "| router histogram p50 / p99 | errors | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for stream in (False, True):
        row = r.latency[stream]
        direct, router, relay = row["direct"], row["router"], row["relay"]

        def median(runs: list[Load], key: str) -> float:
            return statistics.median(getattr(run, key) for run in runs)

        added = {key: [b - a for a, b in zip((getattr(x, key) for x in direct), (getattr(x, key) for x in router),
                                             strict=True)] for key in ("p50_ms", "p99_ms")}
        added50, added99 = statistics.median(added["p50_ms"]), statistics.median(added["p99_ms"])
        h50, h99, _ = row["histogram"]
        errors = sum(x.error_count for x in direct + router + relay)
        lines.append(
            f"| {'streaming (to the last event)' if stream else 'non-streaming'} | {median(router, 'rate'):,.0f} "
            f"| {median(direct, 'p50_ms'):.2f} / {median(direct, 'p99_ms'):.2f} "
            f"| {median(router, 'p50_ms'):.2f} / {median(router, 'p99_ms'):.2f} "
            f"| {median(relay, 'p50_ms'):.2f} / {median(relay, 'p99_ms'):.2f} "
            f"| **{added50:.2f} / {added99:.2f}** ({min(added['p50_ms']):.2f}–{max(added['p50_ms']):.2f} / "
            f"{min(added['p99_ms']):.2f}–{max(added['p99_ms']):.2f}) | ≤ {h50 * 1000:g} / ≤ {h99 * 1000:g} ms "
            f"| {errors} | p50 ≤ 1, p99 ≤ 5: {_met(added50 <= 1 and added99 <= 5)} |")
    c = r.concurrency
    load = c["load"]
    client_errors = ", ".join(f"{k} {v}" for k, v in load.errors.items() if v) or "none"
    statuses = dict(c["statuses"])
    ok, cut = statuses.pop("200", 0), statuses.pop("499", 0)
    failures = load.error_count + sum(statuses.values()) + c["upstream_errors"]
    lines += [
        "",
        f"**{args.streams:,} concurrent streams** for {r.streams_s:g} s through the router, each {TOKENS} events "
        f"{STREAM_GAP_MS} ms apart (about {TOKENS * STREAM_GAP_MS / 1000:.1f} s): {load.requests:,} streams "
        f"completed by the client ({ok:,} answered 200 by the router; {load.rate * (TOKENS + 1):,.0f} events/s); "
        f"at most {c['most_in_flight']:,} requests in flight in the router ({c['samples']} samples of /health); "
        f"stream time p50 / p99 {load.p50_ms:,.0f} / {load.p99_ms:,.0f} ms; the router used "
        f"{load.server_cpu_s / load.seconds * 100:.0f}% of its core; other load {load.foreign_pct:.0f}%.",
        f"Errors: client side {client_errors}; router answers other than 200: "
        f"{', '.join(f'{k}: {v}' for k, v in statuses.items()) or 'none'}; upstream errors: {c['upstream_errors']}. "
        f"({cut:,} streams were still open when the load generator stopped and closed its connections: the router "
        f"counts them as 499, client gone.) Target no errors: {_met(failures == 0)}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
