"""The router as a whole: its state (routes, policy, replicas, counters), the aiohttp application that wires the
handlers, startup and shutdown, and the process that serves until SIGTERM.

The handlers live by concern: `relay.py` (generation: the data path), `endpoints.py` (models, health, metrics,
routes, workload, the admin API), `access.py` (keys), `failures.py` with `outliers.py` (failed tries, ejections,
probes), `policy.py` (which replica). One `ClientSession` per router, created on startup with a connection pool
sized for many concurrent streams; no access log. SIGTERM (or Ctrl-C): stop accepting, let in-flight requests
finish up to `drain_s`, then exit.

Auth: with an API key, every route but `/health` needs `Authorization: Bearer KEY`. Replicas get the upstream key
as their Bearer token, never the client's header. Membership: the routes are swapped whole (a push to the admin
API, or a refresh from the ledger); a replica a swap removes gets no new request and no retry, and the requests it
has in flight finish (streams included), counted as `draining` until they do.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import signal
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from melange_sky.deploy.membership import ADMIN_CONTROLLER_PATH, ADMIN_ROUTES_PATH
from melange_sky.errors import MelangeError, ServeError
from melange_sky.serve.access import Access
from melange_sky.serve.endpoints import CHAT_PATH, COMPLETIONS_PATH, NO_ROUTES, Endpoints
from melange_sky.serve.failures import Failures
from melange_sky.serve.metrics import Metrics
from melange_sky.serve.observed import ObservedWorkload
from melange_sky.serve.outliers import OutlierDetector, OutlierSettings, RetryBudget
from melange_sky.serve.policy import NoRoutesPolicy, Policy, Replica, Rotation, SizeAwarePolicy
from melange_sky.serve.relay import Relay
from melange_sky.serve.routes import Routes, RoutesSource
from melange_sky.serve.settings import ServeSettings
from melange_sky.serve.tokens import Sizer

try:  # uvloop: a faster event loop; it comes with SkyPilot, and the router works without it
    import uvloop

    _LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
except ImportError:  # pragma: no cover - depends on the environment
    _LOOP_FACTORY = None

#: A serving router collects young objects after this many more allocations than frees (CPython: 700). Requests in
#: flight hold more than 700 objects, so at the default every collection found them alive and pushed them into the
#: old generations, hundreds of times a second, and a full collection followed every second or so.
GC_YOUNG_THRESHOLD = 10_000

__all__ = ["Router", "RouterServer", "run"]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Router:
    """One router's state: routes and policy (swapped whole), replicas by name, the sizer, the observed workload,
    metrics, outlier detection and the retry budget, the upstream session; `relay` and `endpoints` hold its
    handlers, `app()` wires them.

    `routes` None: no routes until the first `PUT /admin/routes` (`serve --pushed`); requests get 503 meanwhile.
    `clock` times the observed workload (tests pass their own)."""

    def __init__(self, routes: Routes | None, settings: ServeSettings = ServeSettings(), sizer: Sizer | None = None,
                 source: RoutesSource | None = None, log: Callable[[str], None] = _stderr,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.sizer = sizer or Sizer()
        self.source = source
        self.log = log
        self.clock = clock
        self.rng = random.Random(settings.seed)
        self.metrics = Metrics(self._live_state)
        self.access = Access(settings.api_key, settings.admin_token)
        self.rotation = Rotation()
        self.outliers = OutlierDetector(OutlierSettings(
            consecutive_5xx=settings.consecutive_5xx, consecutive_gateway_failure=settings.consecutive_gateway_failure,
            max_ejection_percent=settings.max_ejection_percent, base_s=settings.eject_base_s,
            max_s=settings.eject_max_s), self.rotation)
        self.failures = Failures(self.outliers, self.metrics, log)
        self.budget = RetryBudget(settings.retry_budget_percent, settings.retry_budget_min)
        self.draining = False
        self.in_flight = 0
        self.session: aiohttp.ClientSession | None = None
        self.later: Callable[..., object] = _call_soon  # the serving loop's call_soon, once started
        self._tasks: list[asyncio.Task[None]] = []
        self._refresh_error: str | None = None
        self.replicas: dict[str, Replica] = {}
        self.retired: list[Replica] = []  # removed by a swap with requests still in flight (draining)
        self.generation = 0  # routes swapped in so far (each push, each refresh that changed them)
        self.routes: Routes | None = None
        self.policy: Policy = NoRoutesPolicy(NO_ROUTES)
        self.observed = ObservedWorkload((0, 1), (0, 1), settings.window_s, clock)  # replaced by the first routes
        self.relay = Relay(self)
        self.endpoints = Endpoints(self)
        self._loaded: dict[str, Any] | None = None  # the source's last table, to tell its changes from pushes
        if routes is not None:
            self.swap(routes)
            if source is not None:
                self._loaded = routes.to_dict()

    # -- routes ------------------------------------------------------------------------------------------------------
    def swap(self, routes: Routes) -> list[str]:
        """Replace the routes at once. Replicas kept by name keep their state (in flight, ejection), and so does one
        re-added while it still drains; requests in flight finish on the replicas they hold, removed or not, and a
        removed replica gets nothing new (retries included). Returns what changed, one line each."""
        draining = {(r.name, r.url, r.gpu): r for r in self.retired}
        replicas, changes = [], []
        for spec in routes.replicas:
            old = self.replicas.get(spec.name)
            if old is not None and (old.url, old.gpu) == (spec.url, spec.gpu):
                replicas.append(old)
                continue
            old = draining.get((spec.name, spec.url, spec.gpu))
            replicas.append(old if old is not None else Replica(spec.name, spec.gpu, spec.url))
            changes.append(f"+ {spec.name} ({spec.gpu}) {spec.url}")
        kept = {id(r) for r in replicas}
        removed = [r for r in self.replicas.values() if id(r) not in kept]
        changes.extend(f"- {r.name} ({r.gpu}) {r.url}" + (f", draining {r.in_flight} request(s) in flight"
                                                          if r.in_flight else "") for r in removed)
        previous = self.routes
        self.policy = SizeAwarePolicy(routes, replicas, self.sizer, self.rng, self.settings.panic_percent,
                                      self.rotation)
        self.replicas = {r.name: r for r in replicas}
        self.outliers.track(replicas)
        self.retired = [r for r in (*self.retired, *removed) if id(r) not in kept and r.in_flight > 0]
        if previous is None or (previous.input_edges, previous.output_edges) != (routes.input_edges,
                                                                                routes.output_edges):
            self.observed = ObservedWorkload(routes.input_edges, routes.output_edges, self.settings.window_s,
                                             self.clock)
        if previous is not None and previous.to_dict() | {"replicas": []} != routes.to_dict() | {"replicas": []}:
            changes.append("routing table changed")
        self.routes = routes
        self.generation += 1
        return changes

    def draining_in_flight(self) -> dict[str, int]:
        """Requests in flight per URL of the replicas the routes no longer have (0 everywhere: the drain is done)."""
        self.retired = [r for r in self.retired if r.in_flight > 0]
        return _by_url(self.retired)

    def in_flight_by_url(self) -> dict[str, int]:
        """Requests in flight per replica URL, routed or draining."""
        return _by_url([*self.replicas.values(), *self.retired])

    async def refresh(self) -> list[str]:
        """Re-read the routes from the source (the ledger, in a thread) and swap them in if they changed."""
        if self.source is None:
            return []
        try:
            routes = await asyncio.to_thread(self.source.load)
        except MelangeError as exc:
            if str(exc) != self._refresh_error:
                self.log(f"Warning: cannot refresh {self.source.description}: {exc}; keeping the current routes")
            self._refresh_error = str(exc)
            return []
        self._refresh_error = None
        loaded = routes.to_dict()
        if loaded == self._loaded:  # the source did not change: keep what is served (it may have been pushed)
            return []
        self._loaded = loaded
        changes = self.swap(routes)
        for line in changes:
            self.log(f"{self.source.description}: {line}")
        return changes

    def _live_state(self) -> dict[str, Any]:
        return {"replicas": list(self.replicas.values()), "corrections": dict(self.sizer.corrections),
                "draining": self.draining, "generation": self.generation,
                "retired_in_flight": sum(r.in_flight for r in self.retired), "retries_in_flight": self.budget.active}

    # -- the application ---------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.relay.max_body)
        relay, endpoints = self.relay, self.endpoints
        app.router.add_post(COMPLETIONS_PATH, relay.completions)
        app.router.add_post(CHAT_PATH, relay.chat)
        app.router.add_get("/v1/models", endpoints.models)
        app.router.add_get("/health", endpoints.health)
        app.router.add_get("/metrics", endpoints.metrics)
        app.router.add_get("/routes", endpoints.routes)
        app.router.add_get("/workload", endpoints.workload)
        app.router.add_put(ADMIN_ROUTES_PATH, endpoints.admin_put_routes)
        app.router.add_get(ADMIN_ROUTES_PATH, endpoints.admin_get_routes)
        app.router.add_put(ADMIN_CONTROLLER_PATH, endpoints.admin_put_controller)
        app.router.add_get(ADMIN_CONTROLLER_PATH, endpoints.admin_get_controller)
        app.router.add_route("*", "/{tail:.*}", endpoints.not_found)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _app: web.Application) -> None:
        self.later = asyncio.get_running_loop().call_soon
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=4.0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s,
                                        sock_read=self.settings.read_timeout_s)
        # keepalive 4 s: below uvicorn's 5 s (vLLM), so the router never reuses a connection the replica just closed
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                             skip_auto_headers=("User-Agent", "Accept-Encoding"))
        self._tasks.append(asyncio.create_task(self._probe_loop()))
        if self.source is not None and self.source.refreshing:
            self._tasks.append(asyncio.create_task(self._refresh_loop()))

    async def _cleanup(self, _app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.session is not None:
            await self.session.close()

    # -- background work ---------------------------------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        """Every `probe_interval_s`, probe the ejected replicas whose wait is over (`failures.Failures.probe`)."""
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            assert self.session is not None
            for replica in self.failures.due(list(self.replicas.values()), time.monotonic()):
                self._tasks.append(asyncio.create_task(self.failures.probe(
                    replica, self.session, self.relay.upstream_headers, self.settings.probe_timeout_s)))
            self._tasks = [t for t in self._tasks if not t.done()]

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_s)
            await self.refresh()


def _by_url(replicas: list[Replica]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for replica in replicas:
        if replica.in_flight:
            counts[replica.url] = counts.get(replica.url, 0) + replica.in_flight
    return counts


def _call_soon(callback: Callable[..., object], *args: Any) -> None:
    asyncio.get_running_loop().call_soon(callback, *args)


class RouterServer:
    """A router listening on host:port (port 0: any free port), over HTTPS with `ssl_context`; `start` returns its
    base URL, `stop` drains."""

    def __init__(self, router: Router, host: str = "127.0.0.1", port: int = 8080,
                 ssl_context: ssl.SSLContext | None = None):
        self.router, self.host, self.port, self.ssl_context = router, host, port, ssl_context
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        self.runner = web.AppRunner(self.router.app(), access_log=None, handler_cancellation=True,
                                    shutdown_timeout=self.router.settings.drain_s)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, backlog=2048, reuse_address=True,
                           ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise ServeError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        sockets = [s for s in self.runner.addresses if s]
        port = sockets[0][1] if sockets else self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{'https' if self.ssl_context else 'http'}://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the drain deadline), close everything."""
        self.router.draining = True
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def run(router: Router, on_listening: Callable[[str], None] = _stderr,
        ssl_context: ssl.SSLContext | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C, then drain (HTTPS with `ssl_context`). Blocks; returns the exit code (0 after
    SIGTERM, 130 after Ctrl-C). Uses uvloop when it is installed."""
    with asyncio.Runner(loop_factory=_LOOP_FACTORY) as runner:
        return runner.run(_serve(router, on_listening, ssl_context))


def _tune_gc() -> None:
    """Once the router listens: what the process holds by then (imports, the solve, the routes) goes to the
    permanent generation, which full collections skip (they took 20 ms, a stall of every request in flight; now
    about 1 ms), and young collections run far less often (GC_YOUNG_THRESHOLD). A few % of a core, and the p99."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(gc.get_threshold()[0], GC_YOUNG_THRESHOLD), *gc.get_threshold()[1:])


async def _serve(router: Router, on_listening: Callable[[str], None], ssl_context: ssl.SSLContext | None) -> int:
    server = RouterServer(router, router.settings.host, router.settings.port, ssl_context)
    await server.start()
    _tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def signalled(signum: int) -> None:
        received.append(signum)
        stop.set()
        if len(received) > 1 and drain is not None:  # a second signal: stop waiting for requests in flight
            drain.cancel()

    drain: asyncio.Task[None] | None = None
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signalled, signum)
    on_listening(server.url)  # only now: a SIGTERM right after the line drains instead of killing the router
    try:
        await stop.wait()
        router.log(f"{signal.Signals(received[0]).name}: draining {router.in_flight} request(s) in flight "
                   f"(up to {router.settings.drain_s:g} s; again to stop now)")
        drain = asyncio.create_task(server.stop())
        with contextlib.suppress(asyncio.CancelledError):
            await drain
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    router.log("stopped")
    return 130 if received[0] == signal.SIGINT else 0
