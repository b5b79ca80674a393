"""A fake OpenAI-compatible model server for the router's tests (aiohttp): in-process, or as a process of its own.

    python tests/fake_openai_upstream.py --gpu A10G [--port 0] [--delay-ms 5] [--api-key KEY]

prints "PORT <n>" once it listens (on 127.0.0.1). It answers POST /v1/completions and /v1/chat/completions
(streaming or not) with `max_tokens` one-word tokens (16 without), reports usage with prompt_tokens = characters / 4
(rounded up) of the prompt or of the chat's contents joined by newlines, and says which server answered in
`served_by`. Knobs for tests (in-process): `gate` holds every stream after its first event until set; `hold` holds
every generation request before it is answered at all (`held` counts those waiting); `cut` aborts a stream's
connection after its first event; `status` answers every generation with that HTTP status (in OpenAI's error
shape, or as the plain text `status_text`); `healthy` False makes /health answer 503. A `max_tokens` that is not an
integer gets a plain-text 500 (a request that fails on every replica, as in issue 21). `requests` keeps every
generation request's JSON body and `headers` its headers; `disconnects` counts streams whose client went away
before the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math

from aiohttp import web
from multidict import CIMultiDict


def prompt_chars(body: dict) -> int:
    if "messages" in body:
        parts = [m["content"] for m in body["messages"] if isinstance(m.get("content"), str)]
        return sum(map(len, parts)) + max(len(parts) - 1, 0)
    prompt = body.get("prompt", "")
    return len(prompt) if isinstance(prompt, str) else sum(map(len, prompt))


class FakeUpstream:
    def __init__(self, gpu: str, name: str | None = None, model: str = "test-model", api_key: str | None = None,
                 delay_s: float = 0.0):
        self.gpu, self.name, self.model, self.api_key, self.delay_s = gpu, name or gpu, model, api_key, delay_s
        self.requests: list[dict] = []
        self.headers: list[CIMultiDict[str]] = []
        self.status_text: str | None = None
        self.gate: asyncio.Event | None = None
        self.hold: asyncio.Event | None = None
        self.held = 0
        self.first_event = asyncio.Event()  # set when a stream sent its first event
        self.cut = False
        self.status: int | None = None
        self.healthy = True
        self.streams_finished = 0
        self.disconnects = 0
        self.disconnected = asyncio.Event()
        self.health_checks = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, port: int = 0) -> str:
        self.runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def _denied(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "bad key", "type": "invalid_request_error"}}, status=401)
        return None

    async def health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        return web.json_response({"ok": self.healthy}, status=200 if self.healthy else 503)

    async def models(self, request: web.Request) -> web.Response:
        return self._denied(request) or web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "owned_by": self.name}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied(request)
        if denied is not None:
            return denied
        body = await request.json()
        self.requests.append(body)
        self.headers.append(CIMultiDict(request.headers))
        if self.hold is not None:
            self.held += 1
            try:
                await self.hold.wait()
            finally:
                self.held -= 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status is not None and self.status_text is not None:
            return web.Response(status=self.status, text=self.status_text)
        if self.status is not None:
            return web.json_response({"error": {"message": f"simulated {self.status}", "type": "server_error"}},
                                     status=self.status)
        chat = request.path.endswith("/chat/completions")
        n = body.get("max_completion_tokens", body.get("max_tokens", 16))
        if not isinstance(n, int):  # a "query of death": what an aiohttp server answers when its handler raises
            return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
        usage = {"prompt_tokens": math.ceil(prompt_chars(body) / 4), "completion_tokens": n,
                 "total_tokens": math.ceil(prompt_chars(body) / 4) + n}
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": "tok " * n}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": "tok " * n, "finish_reason": "length"})
            return web.json_response({"id": "x", "object": "chat.completion" if chat else "text_completion",
                                      "model": self.model, "choices": [choice], "usage": usage,
                                      "served_by": self.name, "gpu": self.gpu})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for k in range(max(n, 1)):
                delta = {"delta": {"content": "tok "}} if chat else {"text": "tok "}
                event = {"id": "x", "model": self.model, "served_by": self.name, "gpu": self.gpu,
                         "choices": [{"index": 0, **delta, "finish_reason": None}]}
                await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                if k == 0:
                    self.first_event.set()
                    if self.cut:
                        request.transport.abort()
                        return response
                    if self.gate is not None:
                        await self.gate.wait()
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode()
                                     + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.streams_finished += 1
        except (asyncio.CancelledError, ConnectionError):
            self.disconnects += 1
            self.disconnected.set()
            raise
        return response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", required=True)
    parser.add_argument("--name")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--api-key")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()

    async def serve() -> None:
        upstream = FakeUpstream(args.gpu, args.name, args.model, args.api_key, args.delay_ms / 1000)
        url = await upstream.start(args.port)
        print(f"PORT {url.rsplit(':', 1)[1]}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()


# ---- a router in front of fake upstreams, for in-process tests ------------------------------------------------------
def free_port_holder():
    """A socket bound to a free port and not listening: connections to it are refused, and no one else gets it."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    return holder, f"http://127.0.0.1:{holder.getsockname()[1]}"


class Fleet:
    """Fake upstreams (by replica name) behind an in-process router; `async with Fleet(doc, ...) as fleet:`.

    `replicas` maps a replica name to its GPU type; names listed in `dead` get a URL where nothing listens; with
    `ssl_context` the router serves HTTPS."""

    def __init__(self, doc: dict, replicas: dict[str, str], dead: tuple[str, ...] = (), log: list | None = None,
                 clock=None, ssl_context=None, **settings):
        self.doc, self.replica_gpus, self.dead, self.settings = doc, replicas, dead, settings
        self.ssl_context = ssl_context
        self.clock = clock
        self.upstreams: dict[str, FakeUpstream] = {}
        self.holders: list = []
        self.logs = log if log is not None else []
        self.router = None
        self.server = None
        self.url = ""

    async def __aenter__(self) -> Fleet:
        from melange_sky.serve.routes import parse_routes
        from melange_sky.serve.server import Router, RouterServer
        from melange_sky.serve.settings import ServeSettings

        replicas = []
        for name, gpu in self.replica_gpus.items():
            if name in self.dead:
                holder, url = free_port_holder()
                self.holders.append(holder)
            else:
                upstream = self.upstreams[name] = FakeUpstream(gpu, name,
                                                               api_key=self.settings.get("upstream_api_key"))
                url = await upstream.start()
            replicas.append({"name": name, "gpu": gpu, "url": url})
        doc = {**self.doc, "replicas": replicas}
        settings = {"port": 0, "seed": 1, "probe_interval_s": 0.02, "eject_base_s": 0.05, **self.settings}
        extra = {"clock": self.clock} if self.clock is not None else {}
        self.router = Router(parse_routes(doc), ServeSettings(**settings), log=self.logs.append, **extra)
        self.server = RouterServer(self.router, "127.0.0.1", 0, self.ssl_context)
        self.url = await self.server.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self.server is not None:
            await self.server.stop()
        for upstream in self.upstreams.values():
            await upstream.stop()
        for holder in self.holders:
            holder.close()
