"""A local OpenAI-compatible completions server whose speed follows a known law, for testing `melange-sky profile`.

    python tests/openai_test_server.py [--base-ms 2] [--k-ms 1] [--prefill-ms-per-token 0.1] ...

It listens on 127.0.0.1 on an ephemeral port and prints "PORT <n>" once ready. Law, per streamed request:
* prompt tokens = words in the prompt (the profiler's prompts are one token per word);
* the first token comes after prefill = prefill_ms_per_token x prompt tokens;
* each further token comes base_ms + k_ms x A later, A = requests in the server (prefill or decode, itself included)
  when the token's interval starts. Deadlines are absolute, so event-loop lateness does not accumulate.

So a request's mean TPOT is T = base + k x (1 + L_others), and with Poisson arrivals at rate r the others in the
server average r x W (Little's law), W = prefill + (n - 1) x T for n output tokens. Solving for T = SLO gives the
true maximum rate: `true_max_rate` below. Failure modes for tests: prompts longer than --error-above-prompt get an
HTTP 500; longer than --hang-above-prompt get headers and then nothing (the client must time out); every
--error-every-th completion request (and the first --error-first ones) gets an immediate HTTP 500 (transient errors);
--max-output caps the tokens generated whatever max_tokens says (a server ignoring ignore_eos); --max-batch N
serves at most N requests at once and queues the others before their prefill (FIFO; queued requests are not in A),
so past N x (1 / request time) the queue, and TTFT, grow while TPOT stays bounded, as in vLLM at its batch limit.
--smooth-ms S makes A = 1 + the time-mean of requests in the server over the last S ms: the same mean as the
instantaneous count (so the same `true_max_rate`), but with about 1 request in flight a request's TPOT no longer
swings by k per neighbour, so a profile's estimate converges in seconds instead of minutes.

The server is one asyncio process; the profiler's accuracy tests run it with per-token intervals of 5 ms or more,
which dwarf the event loop's lateness on a busy machine (a late token does not delay the next one's deadline).
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import subprocess
import sys
from collections.abc import Sequence


def true_max_rate(slo_ms: float, base_ms: float, k_ms: float, prefill_ms_per_token: float, prompt_tokens: int,
                  output_tokens: int) -> float:
    """The Poisson arrival rate (req/s) at which the law above gives a mean TPOT of exactly `slo_ms`."""
    others = (slo_ms - base_ms) / k_ms - 1
    request_ms = prefill_ms_per_token * prompt_tokens + (output_tokens - 1) * slo_ms
    return 1000 * others / request_ms


def start_server(args: Sequence[str], prefix: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    """Run this file as a subprocess with `args` (after `prefix`, e.g. a taskset); (the process, its base URL) once
    it listens. The caller terminates the process."""
    proc = subprocess.Popen([*prefix, sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("PORT "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the law server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


class LawServer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.active = 0
        self.area = 0.0  # requests in the server integrated over time (request-seconds), for --smooth-ms
        self.since = 0.0
        self.history: collections.deque[tuple[float, float]] = collections.deque()  # (time, area) at each change
        self.completions = 0  # completion requests received, for --error-every / --error-first
        self.batch = asyncio.Semaphore(args.max_batch) if args.max_batch else None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            parts = request_line.decode("latin-1").split(" ")
            if len(parts) != 3:  # the client connected and gave up (a cancelled request): nothing to answer
                return
            method, path = parts[0], parts[1]
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "GET" and path == "/v1/models":
                await self.send_json(writer, 200, {"object": "list", "data": [{"id": self.args.model}]})
            elif method == "POST" and path == "/v1/completions":
                await self.completion(json.loads(body), writer)
            else:
                await self.send_json(writer, 404, {"error": {"message": f"no route {method} {path}"}})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def send_json(self, writer: asyncio.StreamWriter, status: int, data: dict) -> None:
        payload = json.dumps(data).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + payload)
        await writer.drain()

    async def completion(self, req: dict, writer: asyncio.StreamWriter) -> None:
        if req.get("model") != self.args.model:
            await self.send_json(writer, 404, {"error": {"message": f"The model `{req.get('model')}` does not exist."}})
            return
        prompt_tokens = len(str(req.get("prompt", "")).split())
        n = min(int(req.get("max_tokens", 16)), self.args.max_output)
        self.completions += 1
        every, first = self.args.error_every, self.args.error_first
        if prompt_tokens > self.args.error_above_prompt or self.completions <= first or (
                every and self.completions % every == 0):
            await self.send_json(writer, 500, {"error": {"message": "simulated server error"}})
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")
        if prompt_tokens > self.args.hang_above_prompt:
            await asyncio.sleep(3600)
        loop = asyncio.get_running_loop()
        if self.batch is not None:
            await self.batch.acquire()
        self.count(+1)
        try:
            deadline = loop.time() + self.args.prefill_ms_per_token * prompt_tokens / 1000
            for k in range(n):
                if k:
                    deadline += (self.args.base_ms + self.args.k_ms * self.load()) / 1000
                delay = deadline - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                self.chunk(writer, {"choices": [{"index": 0, "text": " tok", "finish_reason": None}]})
                await writer.drain()
            self.chunk(writer, {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                         "total_tokens": prompt_tokens + n}})
            writer.write(self.frame(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.count(-1)
            if self.batch is not None:
                self.batch.release()

    def count(self, delta: int) -> None:
        now = asyncio.get_running_loop().time()
        self.area += self.active * (now - self.since)
        self.since = now
        self.active += delta
        if self.args.smooth_ms:
            self.history.append((now, self.area))
            while len(self.history) > 2 and self.history[1][0] < now - self.args.smooth_ms / 1000:
                self.history.popleft()

    def load(self) -> float:
        """A: the requests in the server now, or with --smooth-ms 1 + their time-mean over the last S ms."""
        if not self.args.smooth_ms:
            return self.active
        now = asyncio.get_running_loop().time()
        window = self.args.smooth_ms / 1000
        area_now = self.area + self.active * (now - self.since)
        times = [t for t, _ in self.history]
        i = bisect.bisect_left(times, now - window)
        if i == 0:  # the server is younger than the window: what it has
            t0, a0 = (times[0], self.history[0][1]) if times else (now, area_now)
        else:  # interpolate the area at now - window inside the step before it (in flight was constant there)
            t_prev, a_prev = self.history[i - 1]
            t0, a0 = now - window, a_prev + (self.active_at(i - 1)) * (now - window - t_prev)
        return 1 + (area_now - a0) / max(now - t0, 1e-9)

    def active_at(self, i: int) -> float:
        """Requests in flight just after the i-th recorded change."""
        if i + 1 < len(self.history):
            (t1, a1), (t2, a2) = self.history[i], self.history[i + 1]
            return (a2 - a1) / (t2 - t1) if t2 > t1 else 0.0
        return self.active

    @staticmethod
    def frame(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    def chunk(self, writer: asyncio.StreamWriter, event: dict) -> None:
        writer.write(self.frame(b"data: " + json.dumps(event).encode() + b"\n\n"))


async def serve(args: argparse.Namespace) -> None:
    law = LawServer(args)
    server = await asyncio.start_server(law.handle, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--base-ms", type=float, default=2.0)
    parser.add_argument("--k-ms", type=float, default=1.0)
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.1)
    parser.add_argument("--error-above-prompt", type=int, default=sys.maxsize)
    parser.add_argument("--hang-above-prompt", type=int, default=sys.maxsize)
    parser.add_argument("--error-every", type=int, default=0)
    parser.add_argument("--error-first", type=int, default=0)
    parser.add_argument("--max-output", type=int, default=sys.maxsize)
    parser.add_argument("--max-batch", type=int, default=0, help="0: no limit")
    parser.add_argument("--smooth-ms", type=float, default=0.0, help="0: A is the count now")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
