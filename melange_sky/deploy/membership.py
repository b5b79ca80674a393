"""A fleet's membership as the router reads it: the routes document built from a stored plan and the replicas that
serve, and the two admin calls that hand it to a running router (`PUT /admin/routes`) and read it back.

Pure data, and calls through the project's one HTTP client (`inputs.http`): the fleet builds and pushes documents
from worker threads (`up`, `down`, `watch`), and the router (`serve`) validates the same document with
`serve.routes.parse_routes`. The admin token goes only into the `Authorization` header: never into a URL, a message
or an error. A router that serves TLS (`deployment.router.tls`) is called over https and verified against its
certificate (`core.tls.client_context`).
"""
from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES
from melange_sky.errors import CallFailed, RouterError, ServeError
from melange_sky.inputs.http import Client, parse_endpoint

#: The routes document's format version (`parse_routes` refuses any other).
ROUTES_VERSION = 1
#: The environment variable that gives a router its admin token (never a command-line flag: `ps` shows those).
ADMIN_TOKEN_ENV = "MELANGE_SKY_ADMIN_TOKEN"
#: The router's admin endpoint: PUT a routes document, GET the current one with what is in flight.
ADMIN_ROUTES_PATH = "/admin/routes"
#: The largest routes document a router takes (a 64x64-bucket plan with 50 GPU types and 1,000 replicas is ~2 MiB).
MAX_ROUTES_BYTES = 8 * 1024 * 1024
#: Where a fleet's hosted controller and the user's machine exchange the fleet's state through its router (admin
#: token only): `up` PUTs the ledger's snapshot for the controller to adopt, the controller PUTs its own after every
#: pass (with the pass), and `status`/`down` GET them. The router keeps each writer's latest document, in memory.
ADMIN_CONTROLLER_PATH = "/admin/controller"

__all__ = ["ADMIN_CONTROLLER_PATH", "ADMIN_ROUTES_PATH", "ADMIN_TOKEN_ENV", "MAX_ROUTES_BYTES", "ROUTES_VERSION",
           "get_admin_routes", "get_controller_doc", "normalise_url", "push_controller_doc", "push_routes",
           "routes_document"]


def normalise_url(url: str, where: str = "--replica") -> str:
    """`http://host:port` from a base URL or a bare `host:port` (a ledger endpoint). Refuses paths (`.../v1`: give
    the base URL), credentials (keys go through --upstream-api-key) and other schemes."""
    text = url.strip()
    if "://" not in text:
        text = f"http://{text}"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServeError(f"{where}: {url!r} is not an http(s) URL like http://10.0.0.5:8000")
    if parts.username or parts.password:
        raise ServeError(f"{where}: credentials in the URL are not supported; pass the replicas' key with "
                         f"--upstream-api-key or MELANGE_SKY_UPSTREAM_API_KEY")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ServeError(f"{where}: {url!r} has a path; give the server's base URL (http://host:port), the router "
                         f"adds /v1/...")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ServeError(f"{where}: {url!r} has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}"


def routes_document(plan: Mapping[str, Any], replicas: Sequence[tuple[str, str, str]],
                    source: str) -> tuple[dict[str, Any], list[str]]:
    """The routes document of a stored plan (`Plan.to_dict()`: its `solve` and `router` records) and the replicas
    that serve, as (name, GPU entry, URL): shares per GPU *entry* (a `--per-offer` plan's columns summed into the GPU
    type they belong to, which is what ledger rows name), edges and tputs from the `router` record, URLs normalised.
    Also the warnings: replicas of a GPU type the plan does not have, which the document leaves out.
    `ServeError` when the plan cannot be routed or a URL is not one."""
    solve = plan.get("solve")
    router = plan.get("router")
    if not isinstance(solve, Mapping) or not isinstance(router, Mapping):
        raise ServeError(f"{source}: the stored plan has no routing record (it was planned by an older "
                         f"melange-sky): re-run `melange-sky up CONFIG` to store it, or serve the replicas with "
                         f"`melange-sky serve --config CONFIG --replica GPU=URL ...`")
    counts = solve.get("counts") or {}
    entries: dict[str, str] = dict(router.get("entries") or {})
    for column in counts:
        entries.setdefault(column, column)
    planned: dict[str, int] = {}
    for column, count in counts.items():
        planned[entries[column]] = planned.get(entries[column], 0) + int(count)
    tputs: dict[str, Any] = {}
    for column, matrix in (router.get("tputs") or {}).items():
        tputs.setdefault(entries.get(column, column), matrix)  # one GPU type: the same tputs at every offer
    shares: list[dict[str, Any]] = []
    for route in solve.get("routing") or []:
        merged: dict[str, float] = {}
        for column, share in (route.get("shares") or {}).items():
            merged[entries.get(column, column)] = merged.get(entries.get(column, column), 0.0) + float(share)
        shares.append({"bucket": route.get("bucket"), "shares": merged})
    rows = router.get("workload_distribution")
    in_edges, out_edges = router.get("input_buckets"), router.get("output_buckets")
    if rows is not None and isinstance(rows, list) and rows and isinstance(rows[0], list):
        if in_edges is None and len(rows) == len(DEFAULT_INPUT_EDGES) - 1:
            in_edges = list(DEFAULT_INPUT_EDGES)
        if out_edges is None and len(rows[0]) == len(DEFAULT_OUTPUT_EDGES) - 1:
            out_edges = list(DEFAULT_OUTPUT_EDGES)
    if in_edges is None or out_edges is None:
        raise ServeError(f"{source}: the plan's config has no input_buckets/output_buckets and is not Mélange's "
                         f"default 8x6: add bucket edges to the config and re-run `melange-sky up CONFIG`")
    # The config's order: `solve.gpus` is a list (the ledger stores the plan's objects with sorted keys).
    ordered = [entries.get(str(g.get("name")), str(g.get("name"))) for g in solve.get("gpus") or []
               if isinstance(g, Mapping)]
    names = list(dict.fromkeys([*ordered, *planned, *tputs]))
    known = [{"name": name, "gpu": gpu, "url": normalise_url(url, f"{source}: {name}'s endpoint")}
             for name, gpu, url in replicas if gpu in names]
    warnings = [f"{name} ({gpu}) is not a GPU type of the plan: not routed to" for name, gpu, _ in replicas
                if gpu not in names]
    doc = {"version": ROUTES_VERSION, "source": source, "input_buckets": list(in_edges),
           "output_buckets": list(out_edges), "workload_distribution": rows,
           "total_request_rate": solve.get("total_request_rate"),
           "gpus": {n: {"planned": planned.get(n, 0), "tputs": tputs.get(n)} for n in names},
           "routing": shares, "replicas": known}
    return doc, warnings


# ---- the admin calls -------------------------------------------------------------------------------------------------
def push_routes(url: str, doc: Mapping[str, Any], admin_token: str, timeout: float = 10.0, *,
                cafile: str | None = None) -> dict[str, Any]:
    """Hand a running router (base URL) a new routes document: it validates it and swaps it in at once, or keeps
    the old one and says why. Returns the router's answer ({"accepted", "replicas", "generation", "draining"});
    `RouterError` (one line, never the token) when it refuses or cannot be reached. `cafile`: the certificate an
    https router must present (its `deployment.router.tls.certfile`)."""
    return _call("PUT", url, admin_token, timeout, doc, cafile)


def get_admin_routes(url: str, admin_token: str, timeout: float = 10.0, *,
                     cafile: str | None = None) -> dict[str, Any]:
    """What a running router routes by now ({"routes", "generation", "inflight", "draining"}), to check that its
    membership matches the ledger and to wait for a drain; `RouterError` and `cafile` as `push_routes`."""
    return _call("GET", url, admin_token, timeout, None, cafile)


def push_controller_doc(url: str, doc: Mapping[str, Any], admin_token: str, timeout: float = 10.0, *,
                        cafile: str | None = None) -> dict[str, Any]:
    """Hand the router the fleet's latest state document (`ADMIN_CONTROLLER_PATH`); `RouterError` as `push_routes`."""
    return _call("PUT", url, admin_token, timeout, doc, cafile, ADMIN_CONTROLLER_PATH)


def get_controller_doc(url: str, admin_token: str, timeout: float = 10.0, *,
                       cafile: str | None = None) -> dict[str, Any]:
    """The router's latest fleet state documents, by writer ({"docs": {writer: document}}); `RouterError` as
    `push_routes`."""
    return _call("GET", url, admin_token, timeout, None, cafile, ADMIN_CONTROLLER_PATH)


def _call(method: str, url: str, admin_token: str, timeout: float, body: Mapping[str, Any] | None,
          cafile: str | None = None, path: str = ADMIN_ROUTES_PATH) -> dict[str, Any]:
    what = f"{method} {path}"
    endpoint = parse_endpoint(url, "router URL", RouterError, "http://10.0.0.5:8080")
    base = endpoint.base_url
    if not admin_token:
        raise RouterError(f"router {base}: {what} needs the fleet's admin token, and it is empty")
    client = Client(endpoint, api_key=admin_token, timeout=timeout, cafile=cafile)
    try:
        return client.json_call(method, path, body)
    except CallFailed as exc:
        if exc.status is None:
            raise RouterError(f"router {base} unreachable ({what}): {exc.reason}") from None
        if 200 <= exc.status < 300:
            raise RouterError(f"router {base}: {what}: {exc.reason}") from None
        hint = {401: " (the router has another admin token)",
                404: " (the router has no admin API: is MELANGE_SKY_ADMIN_TOKEN set where it runs?)"}
        raise RouterError(f"router {base}: {what} refused ({exc.reason}){hint.get(exc.status, '')}") from None
