"""A GPU replica stand-in for `process_backend.ProcessBackend`: an OpenAI-compatible server in its own process.

    python tests/fake_replica.py --name example-a10g-0 --gpu A10G --port-file PATH [--token-delay-ms 5]

It listens on 127.0.0.1 (an ephemeral port unless --port), then writes the port to --port-file (atomically, so a
reader never sees half a number). It answers like vLLM's OpenAI server, closely enough for the router:

- POST /v1/completions and /v1/chat/completions, streaming (SSE, one event per token, `[DONE]` at the end, a usage
  event when `stream_options.include_usage`) or not; `max_tokens` (or `max_completion_tokens`) tokens, 16 without.
  Each token takes --token-delay-ms, so a request takes about tokens x delay (e.g. 20 tokens x 5 ms = 100 ms).
  Usage: prompt_tokens = characters / 4 (rounded up) of the prompt or of the chat's contents joined by newlines.
  Every answer (and every SSE event) says which replica served it: `served_by` (the cluster) and `gpu`.
- GET /v1/models, GET /health (200 {"ok": true}).
- GET /stats: requests received, finished, in flight and streams cut by their client, for tests that check where
  traffic went and that a drained replica has nothing in flight.
- POST /control {"healthy": false, "token_delay_ms": 50}: knobs for tests, applied at once; unhealthy makes
  /health answer 503 (what a router's probe sees of a sick replica) while generation still works.

With the environment variable FAKE_REPLICA_API_KEY set (never on the command line, where `ps` shows it), generation
and /v1/models need `Authorization: Bearer <key>`, as vLLM with VLLM_API_KEY does; /health and /stats stay open.
SIGTERM and SIGINT stop it within a fraction of a second (exit 0), cutting requests in flight, as a torn-down VM
would: draining is the router's job, not the replica's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
from pathlib import Path

from aiohttp import web

API_KEY_ENV = "FAKE_REPLICA_API_KEY"


def prompt_chars(body: dict) -> int:
    if isinstance(body.get("messages"), list):
        parts = [m["content"] for m in body["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
        return sum(map(len, parts)) + max(len(parts) - 1, 0)
    prompt = body.get("prompt", "")
    return len(prompt) if isinstance(prompt, str) else sum(len(p) for p in prompt if isinstance(p, str))


class Replica:
    def __init__(self, name: str, gpu: str, model: str, token_delay_s: float, api_key: str | None):
        self.name, self.gpu, self.model, self.token_delay_s, self.api_key = name, gpu, model, token_delay_s, api_key
        self.received = 0
        self.finished = 0
        self.in_flight = 0
        self.disconnects = 0
        self.healthy = True

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/control", self.control)
        return app

    def _denied(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "invalid api key", "type": "invalid_request_error"}},
                                     status=401)
        return None

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": self.healthy}, status=200 if self.healthy else 503)

    async def control(self, request: web.Request) -> web.Response:
        knobs = await request.json()
        if "healthy" in knobs:
            self.healthy = bool(knobs["healthy"])
        if "token_delay_ms" in knobs:
            self.token_delay_s = float(knobs["token_delay_ms"]) / 1000
        return web.json_response({"healthy": self.healthy, "token_delay_ms": self.token_delay_s * 1000})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"name": self.name, "gpu": self.gpu, "pid": os.getpid(), "healthy": self.healthy,
                                  "token_delay_ms": self.token_delay_s * 1000, "received": self.received,
                                  "finished": self.finished, "in_flight": self.in_flight,
                                  "disconnects": self.disconnects})

    async def models(self, request: web.Request) -> web.Response:
        return self._denied(request) or web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": self.name}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied(request)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "body is not JSON", "type": "invalid_request_error"}},
                                     status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "body must be an object", "type": "invalid_request_error"}},
                                     status=400)
        self.received += 1
        self.in_flight += 1
        try:
            return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        n = max(int(body.get("max_completion_tokens", body.get("max_tokens", 16)) or 1), 1)
        prompt_tokens = math.ceil(prompt_chars(body) / 4)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        if not body.get("stream"):
            await asyncio.sleep(n * self.token_delay_s)
            text = "tok " * n
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "finish_reason": "length"})
            self.finished += 1
            return web.json_response({"id": f"cmpl-{self.name}-{self.received}",
                                      "object": "chat.completion" if chat else "text_completion",
                                      "model": body.get("model", self.model), "choices": [choice], "usage": usage,
                                      "served_by": self.name, "gpu": self.gpu})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            for _ in range(n):
                deadline += self.token_delay_s  # absolute deadlines: event-loop lateness does not accumulate
                delay = deadline - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                delta = {"delta": {"content": "tok "}} if chat else {"text": "tok "}
                event = {"id": f"cmpl-{self.name}-{self.received}", "model": body.get("model", self.model),
                         "served_by": self.name, "gpu": self.gpu,
                         "choices": [{"index": 0, **delta, "finish_reason": None}]}
                await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(b"data: " + json.dumps({"id": "usage", "choices": [], "usage": usage,
                                                             "served_by": self.name}).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.finished += 1
        except (asyncio.CancelledError, ConnectionError):
            self.disconnects += 1
            raise
        return response


def write_port(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> None:
    replica = Replica(args.name, args.gpu, args.model, args.token_delay_ms / 1000, os.environ.get(API_KEY_ENV) or None)
    runner = web.AppRunner(replica.app(), access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    if args.port_file:
        write_port(Path(args.port_file), port)
    print(f"{args.name}: {args.gpu} replica serving on 127.0.0.1:{port}, {args.token_delay_ms:g} ms per token",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"{args.name}: stopping", flush=True)
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the cluster's name, reported as `served_by`")
    parser.add_argument("--gpu", default="GPU")
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="where to write the port once listening")
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
