"""The yardstick for the router: the least an aiohttp relay does in front of OpenAI-compatible servers.

    python bench/minimal_relay.py --port 8091 --upstream http://127.0.0.1:9101 --upstream http://127.0.0.1:9102

The same stack as `melange-sky serve` (aiohttp server and client, uvloop, orjson, no access log, one ClientSession
with an unbounded pool) doing only what any relay must: read the body, parse it (to know whether it streams), pick
an upstream (round-robin), send, and relay the answer (a stream chunk by chunk as it arrives, never buffered). No
sizing, shares, retries, ejection, metrics or auth. `bench/router_bench.py` measures the router against it: the
ratio is what routing, failure handling and metrics cost. Prints "PORT <n>" once it listens.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools

import aiohttp
import orjson
from aiohttp import web

try:
    from uvloop import new_event_loop
except ImportError:  # pragma: no cover - depends on the environment
    new_event_loop = None  # type: ignore[assignment]


def app(upstreams: list[str]) -> web.Application:
    turn = itertools.cycle(upstreams)
    state: dict[str, aiohttp.ClientSession] = {}

    async def startup(_app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=4.0)
        state["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                 timeout=aiohttp.ClientTimeout(total=None),
                                                 skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def cleanup(_app: web.Application) -> None:
        await state["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        stream = orjson.loads(raw).get("stream") is True
        async with state["session"].post(next(turn) + request.path, data=raw,
                                         headers={"Content-Type": "application/json"}) as upstream:
            content_type = upstream.headers.get("Content-Type", "application/json")
            if not stream or upstream.status != 200:
                return web.Response(body=await upstream.read(), status=upstream.status,
                                    headers={"Content-Type": content_type})
            out = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
            await out.prepare(request)
            async for chunk in upstream.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    application = web.Application()
    application.router.add_post("/v1/completions", relay)
    application.router.add_post("/v1/chat/completions", relay)
    application.on_startup.append(startup)
    application.on_cleanup.append(cleanup)
    return application


async def serve(port: int, upstreams: list[str]) -> None:
    runner = web.AppRunner(app(upstreams), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=2048, reuse_address=True)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", action="append", required=True, metavar="URL")
    args = parser.parse_args()
    runner = asyncio.Runner(loop_factory=new_event_loop)
    try:
        with runner:
            runner.run(serve(args.port, [u.rstrip("/") for u in args.upstream]))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
