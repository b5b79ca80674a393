"""A continuous client load for end-to-end tests: a steady mix of requests through a router, every outcome kept.

    load = Load("http://127.0.0.1:8080", api_key, rate=4.0)
    load.start()
    ...                      # change the fleet under it; load.set_rate(12.0) when the load "rises"
    load.stop()              # no new requests; waits for those in flight
    assert load.failures() == []

An open loop (as real clients are): a dispatcher thread starts a request every 1/rate seconds whatever the fleet is
doing, on a pool of worker threads, so a slow or broken fleet shows as failures, not as a load that politely backs
off. The mix cycles through `SHAPES`: small and large prompts, few and many tokens, streaming (SSE) and not,
completions and chat, in the shares of tests/data/e2e_fleet.json's buckets (so the router observes that workload).

Every request becomes an `Outcome` with its start and end (time.monotonic(), comparable with the test's own
clock), whether it succeeded and the GPU type that served it: the router names it in its `X-Melange-Gpu` header,
sent before the first byte of the answer, so even a stream cut halfway says where it was. A request succeeds when
it got HTTP 200 and its whole answer: all its tokens, and for a stream the `[DONE]` end with no error event.
Prompts are words of one token each (`abc`, 4 characters with its space), so the router's estimate of a prompt's
size (characters / 4) and the replica's count (an emulator counts words) agree. `send(shape)` adds one request
outside the schedule. Standard library only (urllib), so the load shares nothing with the router it measures.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["SHAPES", "Load", "Outcome", "Shape"]

REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Shape:
    """One kind of request of the mix."""

    name: str
    path: str  # /v1/completions or /v1/chat/completions
    prompt_chars: int  # prompt tokens x 4 (words of one token: the router estimates chars/4, an emulator counts
    # words)
    max_tokens: int
    stream: bool


SMALL = Shape("small", "/v1/completions", 40, 8, False)  # ~10 prompt tokens: input bucket 0, output bucket 0
SMALL_STREAM = Shape("small-stream", "/v1/chat/completions", 60, 12, True)  # bucket (0, 0)
SMALL_LONG = Shape("small-long-stream", "/v1/completions", 100, 40, True)  # (0, 1): 25 tokens in, 40 out
LARGE = Shape("large", "/v1/completions", 1200, 8, False)  # (1, 0): 300 tokens in
LARGE_LONG = Shape("large-long-stream", "/v1/completions", 800, 80, True)  # (1, 1): 200 tokens in, 80 out

#: One cycle of the mix: the shares of tests/data/e2e_fleet.json's workload_distribution (input edges 1/64/1024,
#: output edges 1/16/128): 0.4 small-short, 0.2 small-long, 0.3 large-short, 0.1 large-long; half of it streamed.
SHAPES = (SMALL, SMALL_STREAM, SMALL, SMALL_STREAM, SMALL_LONG, SMALL_LONG, LARGE, LARGE, LARGE, LARGE_LONG)


@dataclass
class Outcome:
    """What became of one request."""

    index: int
    shape: str
    stream: bool
    started: float  # time.monotonic()
    ended: float = 0.0
    ok: bool = False
    status: int | None = None
    gpu: str | None = None  # the GPU type that answered, or that was streaming when it broke (X-Melange-Gpu)
    tokens: int = 0
    error: str | None = None

    def overlaps(self, moment: float) -> bool:
        """Whether the request was in flight at `moment`."""
        return self.started <= moment <= self.ended


class Load:
    """A steady open-loop load through `url` (the router's base URL), sending `api_key` as the Bearer key."""

    def __init__(self, url: str, api_key: str, rate: float, shapes: Iterable[Shape] = SHAPES, workers: int = 24,
                 model: str = "llama-2-7b"):
        self.url = url.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
        self.shapes = tuple(shapes)
        self.model = model
        self._rate = float(rate)
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._sent = 0
        self._extra = 0

    # -- control ----------------------------------------------------------------------------------------------------
    def start(self) -> Load:
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="e2e-load")
        self._dispatcher = threading.Thread(target=self._dispatch, name="e2e-load-dispatch", daemon=True)
        self._dispatcher.start()
        return self

    def set_rate(self, rate: float) -> None:
        """Requests per second from now on (the next request is scheduled at the new pace)."""
        with self._lock:
            self._rate = float(rate)

    @property
    def rate(self) -> float:
        with self._lock:
            return self._rate

    def send(self, shape: Shape) -> None:
        """One request of `shape` now, besides the schedule (its outcome is kept like the others')."""
        assert self._pool is not None, "start() the load first"
        with self._lock:
            self._sent += 1
            self._extra += 1
            index = -self._extra
        self._pool.submit(self._one, index, shape)

    def stop(self, timeout: float = REQUEST_TIMEOUT_S) -> None:
        """Start nothing new and wait for the requests in flight to end (each has its own timeout)."""
        self._stop.set()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=False)

    # -- what happened ----------------------------------------------------------------------------------------------
    def outcomes(self) -> list[Outcome]:
        """Every request that has ended, in the order they ended."""
        with self._lock:
            return list(self._outcomes)

    @property
    def sent(self) -> int:
        with self._lock:
            return self._sent

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes() if not o.ok]

    def served(self, since: float = 0.0) -> Counter[str]:
        """Successful requests per GPU type among those started at or after `since`."""
        return Counter(o.gpu for o in self.outcomes() if o.ok and o.started >= since and o.gpu)

    def wait_until(self, condition: Callable[[Load], bool], timeout: float, what: str) -> None:
        """Poll until `condition(self)` holds; AssertionError naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not condition(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                     f"{len(self.outcomes())} requests ended, {len(self.failures())} failed")
            time.sleep(0.05)

    # -- the loop ---------------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        assert self._pool is not None
        next_at = time.monotonic()
        index = 0
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            shape = self.shapes[index % len(self.shapes)]
            with self._lock:
                self._sent += 1
            self._pool.submit(self._one, index, shape)
            index += 1
            # Absolute schedule: a late wake-up sends the next one sooner, so the mean rate holds on a busy box
            # (but never a burst to catch up more than a second).
            next_at = max(next_at + 1.0 / self.rate, time.monotonic() - 1.0)

    def _body(self, index: int, shape: Shape) -> dict:
        text = f"request {index} " + "abc " * max(shape.prompt_chars // 4 - 2, 1)
        body: dict = {"model": self.model, "max_tokens": shape.max_tokens, "stream": shape.stream}
        if shape.stream:
            body["stream_options"] = {"include_usage": True}
        if shape.path.endswith("/chat/completions"):
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        return body

    def _one(self, index: int, shape: Shape) -> None:
        outcome = Outcome(index=index, shape=shape.name, stream=shape.stream, started=time.monotonic())
        request = urllib.request.Request(self.url + shape.path, data=json.dumps(self._body(index, shape)).encode(),
                                         headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as answer:
                outcome.status = answer.status
                outcome.gpu = answer.headers.get("X-Melange-Gpu")
                if shape.stream:
                    self._read_stream(answer, shape, outcome)
                else:
                    doc = json.loads(answer.read())
                    usage = doc.get("usage") or {}
                    outcome.tokens = int(usage.get("completion_tokens") or 0)
                    outcome.ok = outcome.tokens == shape.max_tokens
                    if not outcome.ok:
                        outcome.error = f"answer with {outcome.tokens} of {shape.max_tokens} tokens"
        except urllib.error.HTTPError as exc:
            outcome.status = exc.code
            outcome.gpu = exc.headers.get("X-Melange-Gpu")
            outcome.error = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
        except Exception as exc:  # noqa: BLE001 - every failure of a client is an outcome to report
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.ended = time.monotonic()
        with self._lock:
            self._outcomes.append(outcome)

    @staticmethod
    def _read_stream(answer: object, shape: Shape, outcome: Outcome) -> None:
        done = False
        for raw in answer:  # type: ignore[attr-defined]
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                outcome.error = f"stream error event: {event['error'].get('message')}"
                continue
            for choice in event.get("choices") or ():  # a token's text (a chat's first event has only its role)
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    outcome.tokens += 1
        if outcome.error is None and not done:
            outcome.error = "the stream ended without [DONE]"
        if outcome.error is None and outcome.tokens != shape.max_tokens:
            outcome.error = f"stream with {outcome.tokens} of {shape.max_tokens} tokens"
        outcome.ok = outcome.error is None
