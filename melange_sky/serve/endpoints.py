"""Everything the router answers but generation: `GET /v1/models` (merged from the replicas), `/health`,
`/metrics` (Prometheus), `/routes`, `/workload` (the observed histogram), the admin API, and 404/405.

The admin API (on when the router has an admin token, `MELANGE_SKY_ADMIN_TOKEN`): `PUT /admin/routes` validates a
whole routes document and swaps it in at once (an invalid one is refused in one line, the old routes keep serving);
`GET /admin/routes` shows it with the requests in flight per replica URL. Both need the admin token, never the
clients' key; the token also opens /routes, /workload and /metrics (what the fleet's controller reads), never
generation (`access.py`).
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from melange_sky.deploy.membership import ADMIN_CONTROLLER_PATH, ADMIN_ROUTES_PATH, MAX_ROUTES_BYTES
from melange_sky.errors import ServeError
from melange_sky.serve.metrics import CONTENT_TYPE_LATEST
from melange_sky.serve.openai_errors import JSON, error_response
from melange_sky.serve.policy import Replica
from melange_sky.serve.routes import parse_routes

if TYPE_CHECKING:
    from melange_sky.serve.server import Router

__all__ = ["CHAT_PATH", "COMPLETIONS_PATH", "Endpoints", "NO_ROUTES", "ROUTES"]

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
#: The methods of each path the router serves (any other method on them gets 405).
ROUTES = {COMPLETIONS_PATH: ("POST",), CHAT_PATH: ("POST",), "/v1/models": ("GET",), "/health": ("GET",),
          "/metrics": ("GET",), "/routes": ("GET",), "/workload": ("GET",)}
#: `PUT /admin/controller`: how many writers' documents the router keeps, and how long a writer's name may be.
MAX_WRITERS, MAX_WRITER_CHARS = 4, 32
NO_ROUTES = f"no routes yet: this router serves the routes pushed to PUT {ADMIN_ROUTES_PATH}, and none came yet"


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, headers={"Content-Type": JSON})


class Endpoints:
    """The operator's and the admin's handlers of one router."""

    def __init__(self, router: Router):
        self.router = router
        self.access = router.access
        self._admin_lock = asyncio.Lock()
        self._controller_docs: dict[str, Any] = {}  # the fleet's latest state per writer (`PUT /admin/controller`)

    # -- the operator's view -----------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.StreamResponse:
        denied = self.access.client(request)
        if denied is not None:
            return denied
        replicas = self.router.replicas
        live = [r for r in replicas.values() if not r.ejected] or [r for r in replicas.values() if not r.down]
        answers = await asyncio.gather(*(self._get_json(r, "/v1/models") for r in live), return_exceptions=True)
        models: dict[str, Any] = {}
        answered = 0
        for answer in answers:
            if isinstance(answer, dict):
                answered += 1
                for model in answer.get("data") or []:
                    if isinstance(model, dict) and isinstance(model.get("id"), str):
                        models.setdefault(model["id"], model)
        if not answered:
            return error_response(503, f"no replica answered /v1/models ({len(live)} available of "
                                       f"{len(replicas)})", "service_unavailable", "no_replica")
        return _json({"object": "list", "data": list(models.values())})

    async def _get_json(self, replica: Replica, path: str) -> Any:
        session = self.router.session
        assert session is not None
        timeout = aiohttp.ClientTimeout(total=self.router.settings.probe_timeout_s)
        async with session.get(replica.url + path, headers=self.router.relay.upstream_headers,
                               timeout=timeout) as answer:
            if answer.status != 200:
                raise aiohttp.ClientResponseError(answer.request_info, (), status=answer.status)
            return orjson.loads(await answer.read())

    def health_doc(self) -> tuple[int, dict[str, Any]]:
        """200 while the router can route: some replica is reachable (an ejected one still takes requests when too
        few are healthy: the panic threshold); 503 when every replica is down, there are no routes, or it drains.
        `available`: replicas in rotation; `ejected`: out of it, of which `down`: unreachable."""
        router = self.router
        gpus: dict[str, dict[str, int]] = {}
        if router.routes is None:
            return 503, {"status": "no_routes", "replicas": 0, "available": 0, "ejected": 0, "down": 0,
                         "in_flight": router.in_flight, "gpus": gpus, "reason": NO_ROUTES}
        replicas = router.replicas.values()
        for gpu in router.routes.gpus:
            mine = [r for r in replicas if r.gpu == gpu.name]
            gpus[gpu.name] = {"planned": gpu.planned, "replicas": len(mine),
                              "available": sum(not r.ejected for r in mine), "down": sum(r.down for r in mine)}
        available = sum(not r.ejected for r in replicas)
        down = sum(r.down for r in replicas)
        status = "draining" if router.draining else "ok" if down < len(replicas) else "unavailable"
        return (200 if status == "ok" else 503), {
            "status": status, "replicas": len(replicas), "available": available,
            "ejected": len(replicas) - available, "down": down, "in_flight": router.in_flight, "gpus": gpus}

    async def health(self, _request: web.Request) -> web.StreamResponse:
        code, doc = self.health_doc()
        return _json(doc, code)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        denied = self.access.reader(request)
        if denied is not None:
            return denied
        return web.Response(body=self.router.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def routes_view(self) -> dict[str, Any]:
        router = self.router
        assert router.routes is not None
        now = time.monotonic()
        doc = router.routes.to_dict()
        doc["replicas"] = [r.to_dict(now) for r in router.replicas.values()]
        doc.update(draining=router.draining, in_flight=router.in_flight,
                   prompt_token_correction={str(k): round(v, 4) for k, v in router.sizer.corrections.items()},
                   warnings=list(router.routes.warnings))
        return doc

    async def routes(self, request: web.Request) -> web.StreamResponse:
        denied = self.access.reader(request)
        if denied is not None:
            return denied
        if self.router.routes is None:
            return error_response(503, NO_ROUTES, "service_unavailable", "no_routes")
        return _json(self.routes_view())

    async def workload(self, request: web.Request) -> web.StreamResponse:
        denied = self.access.reader(request)
        if denied is not None:
            return denied
        router = self.router
        if router.routes is None:
            return error_response(503, NO_ROUTES, "service_unavailable", "no_routes")
        return _json({**router.observed.to_dict(), "source": router.routes.source})

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        """404 for a path the router does not serve; 405 (with Allow) for a method a path it serves does not take."""
        admin = self.access.admin_token is not None
        allowed = ROUTES.get(request.path) or (("GET", "PUT") if request.path in (ADMIN_ROUTES_PATH,
                                                                                  ADMIN_CONTROLLER_PATH) and admin
                                               else None)
        if allowed is not None:
            return error_response(405, f"{request.method} is not allowed on {request.path}: use "
                                       f"{' or '.join(allowed)}", "invalid_request_error", "method_not_allowed",
                                  headers={"Allow": ", ".join(allowed)})
        return error_response(404, f"no route {request.method} {request.path}: this router serves POST "
                                   f"{COMPLETIONS_PATH}, POST {CHAT_PATH}, GET /v1/models, /health, /metrics, "
                                   f"/routes, /workload"
                                   + (f"; GET and PUT {ADMIN_ROUTES_PATH} with the admin token" if admin else ""),
                              "invalid_request_error", "not_found")

    # -- the admin API -----------------------------------------------------------------------------------------------
    async def admin_put_routes(self, request: web.Request) -> web.StreamResponse:
        """Swap in a pushed routes document, or refuse it (400, one line) and keep serving the old one."""
        denied = self.access.admin(request)
        if denied is not None:
            return denied
        router = self.router
        async with self._admin_lock:  # one push at a time: generations follow the order pushes are taken in
            raw = await _read_limited(request, MAX_ROUTES_BYTES)
            if raw is None:
                return self._refused(f"the routes document is larger than {MAX_ROUTES_BYTES} bytes")
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                return self._refused(f"the routes document is not valid JSON ({exc})")
            try:  # a big table takes milliseconds to check: off the loop, which keeps relaying meanwhile
                routes = await asyncio.to_thread(parse_routes, doc, f"PUT {ADMIN_ROUTES_PATH}")
            except ServeError as exc:
                return self._refused(str(exc))
            changes = router.swap(routes)
            for line in changes:
                router.log(f"routes pushed (generation {router.generation}): {line}")
            answer = {"accepted": True, "replicas": len(router.replicas), "generation": router.generation,
                      "draining": router.draining_in_flight(), "changes": changes}
        return _json(answer)

    def _refused(self, reason: str) -> web.Response:
        line = " ".join(reason.split())
        self.router.log(f"refused a routes push: {line}; still serving generation {self.router.generation}")
        return error_response(400, line, "invalid_request_error", "invalid_routes")

    async def admin_get_routes(self, request: web.Request) -> web.StreamResponse:
        """The routes served now, their generation, and the requests in flight per replica URL (draining: the
        URLs the routes no longer have)."""
        denied = self.access.admin(request)
        if denied is not None:
            return denied
        router = self.router
        return _json({"routes": None if router.routes is None else router.routes.to_dict(),
                      "generation": router.generation, "inflight": router.in_flight_by_url(),
                      "draining": router.draining_in_flight()})


    async def admin_put_controller(self, request: web.Request) -> web.StreamResponse:
        """Keep the fleet's latest state document of its writer (a JSON object naming its `writer`): the router
        only holds them between the fleet's hosted controller and the user's machine, one per writer so neither
        overwrites the other's (`deploy.membership.ADMIN_CONTROLLER_PATH`)."""
        denied = self.access.admin(request)
        if denied is not None:
            return denied
        raw = await _read_limited(request, MAX_ROUTES_BYTES)
        try:
            doc = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            doc = None
        writer = doc.get("writer") if isinstance(doc, dict) else None
        if not isinstance(writer, str) or not 0 < len(writer) <= MAX_WRITER_CHARS or (
                writer not in self._controller_docs and len(self._controller_docs) >= MAX_WRITERS):
            return error_response(400, f"PUT {ADMIN_CONTROLLER_PATH} takes one JSON object of at most "
                                       f"{MAX_ROUTES_BYTES} bytes with a `writer` name (at most {MAX_WRITERS} "
                                       f"writers)", "invalid_request_error", "invalid_document")
        self._controller_docs[writer] = doc
        return _json({"accepted": True})

    async def admin_get_controller(self, request: web.Request) -> web.StreamResponse:
        """Every writer's latest document ({"docs": {writer: document}})."""
        denied = self.access.admin(request)
        if denied is not None:
            return denied
        return _json({"docs": self._controller_docs})


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The request's body, or None when it is longer than `limit` bytes (read no further)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)
