"""The router's table as one validated document: bucket edges, the workload histogram, each GPU type's planned count
and throughputs, the plan's share of every bucket per GPU type, and the replicas (GPU type + base URL).

It is built from a solved config (`serve --config`) or from a fleet's stored plan and its ledger rows (`serve
FLEET`; the document itself by `deploy.membership.routes_document`, which the fleet also pushes to its router), and
`parse_routes` validates the same document from JSON, so the fleet or a controller can hand the router a whole new
table (`PUT /admin/routes`) and the router swaps it in at once. Plain data only: no aiohttp here (this module is on
the CLI's import path).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, check_edges
from melange_sky.core.config import Bucket, Config
from melange_sky.core.gpus import same_gpu
from melange_sky.deploy.membership import ROUTES_VERSION, normalise_url, routes_document
from melange_sky.deploy.plan import router_record
from melange_sky.errors import BucketEdgesError, ServeError, UnknownFleet
from melange_sky.fleet.ledger import Ledger, ReplicaState
from melange_sky.solver.result import SolveResult

Matrix = tuple[tuple[float, ...], ...]

__all__ = ["FleetSource", "GpuRoute", "ReplicaSpec", "Routes", "RoutesSource", "StaticSource", "bucket_edges",
           "fleet_routes", "load_routes_file", "name_replicas", "normalise_url", "parse_replica_arg", "parse_routes",
           "routes_from_plan", "routes_from_solve"]


@dataclass(frozen=True)
class ReplicaSpec:
    """One server behind the router: a unique name, its GPU type (a `gpus` entry) and its base URL."""

    name: str
    gpu: str
    url: str  # scheme://host:port, no path

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "gpu": self.gpu, "url": self.url}


@dataclass(frozen=True)
class GpuRoute:
    """A GPU type of the plan: how many replicas the plan counts, and its max req/s per bucket (None: unknown, then
    only the plan's shares say where it may serve)."""

    name: str
    planned: int
    tputs: Matrix | None = None

    def serves(self, bucket: Bucket) -> bool:
        return self.tputs is not None and self.tputs[bucket[0]][bucket[1]] > 0


@dataclass(frozen=True)
class Routes:
    """The routing table. `shares[bucket][gpu]` is the plan's share of that bucket's requests for the GPU type (each
    bucket's shares sum to 1; buckets without demand in the plan have none)."""

    source: str
    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    distribution: Matrix
    gpus: tuple[GpuRoute, ...]
    shares: Mapping[Bucket, Mapping[str, float]]
    replicas: tuple[ReplicaSpec, ...] = ()
    total_request_rate: float | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.input_edges) - 1, len(self.output_edges) - 1

    def gpu(self, name: str) -> GpuRoute | None:
        return next((g for g in self.gpus if g.name == name), None)

    def bucket_name(self, bucket: Bucket) -> str:
        i, j = bucket
        return (f"input {self.input_edges[i]}-{self.input_edges[i + 1]}, output {self.output_edges[j]}-"
                f"{self.output_edges[j + 1]} tokens")

    def with_replicas(self, replicas: Iterable[ReplicaSpec]) -> Routes:
        return replace(self, replicas=tuple(replicas))

    def to_dict(self) -> dict[str, Any]:
        """The document `parse_routes` reads back (GET /routes shows it with each replica's live state)."""
        return {
            "version": ROUTES_VERSION, "source": self.source,
            "input_buckets": list(self.input_edges), "output_buckets": list(self.output_edges),
            "workload_distribution": [list(row) for row in self.distribution],
            "total_request_rate": self.total_request_rate,
            "gpus": {g.name: {"planned": g.planned, "tputs": None if g.tputs is None else [list(r) for r in g.tputs]}
                     for g in self.gpus},
            "routing": [{"bucket": [i, j], "shares": dict(self.shares[(i, j)])} for i, j in sorted(self.shares)],
            "replicas": [r.to_dict() for r in self.replicas],
        }


# ---- building --------------------------------------------------------------------------------------------------------
def bucket_edges(config: Config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The config's edges; Mélange's defaults for an axis without edges only when that axis has the default size."""
    rows, cols = config.shape
    chosen = []
    for edges, key, default, size in ((config.input_buckets, "input_buckets", DEFAULT_INPUT_EDGES, rows),
                                      (config.output_buckets, "output_buckets", DEFAULT_OUTPUT_EDGES, cols)):
        if edges is None:
            if size != len(default) - 1:
                raise ServeError(
                    f"{config.source}: no {key} and its workload_distribution is {rows}x{cols}, not Mélange's "
                    f"default 8x6: add input_buckets and output_buckets (edges in tokens, one more than buckets, "
                    f"e.g. [1, 25, 100, 250]) so the router can size requests")
            edges = default
        chosen.append(tuple(edges))
    return chosen[0], chosen[1]


def routes_from_solve(config: Config, result: SolveResult, replicas: Sequence[ReplicaSpec] = ()) -> Routes:
    """The table of a solved config (`serve --config`, `simulate CONFIG`): its edges, histogram and tputs, and the
    solve's shares. The solve's columns may be offers of the config's GPU entries ("A10G:spot" under a `spot` block,
    "A10G@aws:us-west-2" with `--per-offer`): the table is the one `up` stores and routes by (`routes_from_plan`),
    each column's shares summed into its entry, so replicas name GPU entries as ledger rows do."""
    in_edges, out_edges = bucket_edges(config)
    router = {**router_record(config), "input_buckets": list(in_edges), "output_buckets": list(out_edges),
              "entries": {g.name: g.entry or g.name for g in result.gpus}}
    return routes_from_plan({"solve": result.to_dict(), "router": router}, replicas, config.source)


def routes_from_plan(plan: Mapping[str, Any], replicas: Sequence[ReplicaSpec] = (), source: str = "plan") -> Routes:
    """The table of a stored plan (`Plan.to_dict`), validated: the document `deploy.membership.routes_document`
    builds (what the fleet pushes to its router), with its warnings."""
    doc, warnings = routes_document(plan, [(r.name, r.gpu, r.url) for r in replicas], source)
    routes = parse_routes(doc, source)
    return replace(routes, warnings=routes.warnings + tuple(warnings))


def load_routes_file(path: str) -> Routes:
    """A routes document from a JSON file (`serve --pushed --routes FILE`: what to serve until the first push)."""
    try:
        with open(path, encoding="utf-8") as file:
            doc = json.load(file)
    except OSError as exc:
        raise ServeError(f"--routes {path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServeError(f"--routes {path}: not a JSON routes document ({exc})") from None
    return parse_routes(doc, path)


def fleet_routes(fleet: str, ledger: Ledger | None = None) -> Routes:
    """A fleet's table from the ledger: its stored plan, and its replicas that are `up` with a known endpoint."""
    if ledger is None:
        with _open_ledger(fleet) as db:
            return fleet_routes(fleet, db)
    record = ledger.get_fleet(fleet)
    if record is None:
        raise UnknownFleet(f"no fleet named {fleet!r} in the ledger ({ledger.path}); `melange-sky status` lists "
                           f"fleets")
    replicas = [ReplicaSpec(r.cluster, r.gpu, r.endpoint)  # routes_document normalises the endpoints
                for r in ledger.replicas(fleet) if r.state is ReplicaState.UP and r.endpoint]
    return routes_from_plan(record.plan, replicas, source=f"fleet {fleet}")


def _open_ledger(fleet: str) -> Ledger:
    if not Ledger.exists():  # opening would create an empty one
        raise UnknownFleet(f"no fleet named {fleet!r}: there is no ledger yet (`melange-sky up CONFIG` makes one)")
    return Ledger()


class RoutesSource(Protocol):
    """Where a router's routes come from: a fixed table, or a fleet re-read every `refresh_s` (`refreshing`)."""

    description: str
    refreshing: bool

    def load(self) -> Routes: ...


class StaticSource:
    """Routes that never change by themselves (`serve --config`)."""

    refreshing = False

    def __init__(self, routes: Routes):
        self.routes = routes
        self.description = routes.source

    def load(self) -> Routes:
        return self.routes


class FleetSource:
    """A fleet's routes, re-read from the ledger on every `load` (`serve FLEET`: membership follows `up`/`down`)."""

    refreshing = True

    def __init__(self, fleet: str, ledger: Ledger | None = None):
        self.fleet = fleet
        self.ledger = ledger
        self.description = f"fleet {fleet}"

    def load(self) -> Routes:
        if self.ledger is None:
            self.ledger = _open_ledger(self.fleet)
        return fleet_routes(self.fleet, self.ledger)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()


# ---- command-line pieces ---------------------------------------------------------------------------------------------
def parse_replica_arg(text: str, gpu_names: Sequence[str]) -> tuple[str, str]:
    """`GPU=URL` → (the config's GPU name, normalised URL); GPU matches a gpu_info name however it is spelled."""
    gpu, sep, url = text.partition("=")
    if not sep or not gpu.strip() or not url.strip():
        raise ServeError(f"--replica {text!r}: expected GPU=URL, e.g. --replica A10G=http://10.0.0.5:8000")
    match = next((n for n in gpu_names if n == gpu.strip()), None) or next(
        (n for n in gpu_names if same_gpu(n, gpu.strip())), None)
    if match is None:
        raise ServeError(f"--replica {text!r}: {gpu.strip()!r} is not a GPU type of the config (gpu_info has "
                         f"{', '.join(gpu_names)})")
    return match, normalise_url(url, f"--replica {text!r}")


def name_replicas(pairs: Sequence[tuple[str, str]]) -> list[ReplicaSpec]:
    """Name `--replica` servers `<gpu>-<i>` in the order given; the same URL twice is refused."""
    seen: dict[str, int] = {}
    urls: set[str] = set()
    replicas = []
    for gpu, url in pairs:
        if url in urls:
            raise ServeError(f"--replica: {url} is given twice")
        urls.add(url)
        index = seen.get(gpu, 0)
        seen[gpu] = index + 1
        replicas.append(ReplicaSpec(f"{gpu.lower()}-{index}", gpu, url))
    return replicas


# ---- validation ------------------------------------------------------------------------------------------------------
def parse_routes(doc: Any, source: str = "routes") -> Routes:
    """Validate a routes document (`Routes.to_dict()`'s shape) into `Routes`; `ServeError` names the field."""
    def fail(path: str, message: str) -> ServeError:
        return ServeError(f"{source}: {path}: {message}")

    if not isinstance(doc, Mapping):
        raise ServeError(f"{source}: a routes document must be a JSON object")
    if doc.get("version", ROUTES_VERSION) != ROUTES_VERSION:
        raise fail("version", f"is {doc.get('version')!r}; this router reads version {ROUTES_VERSION}")
    edges = []
    for key in ("input_buckets", "output_buckets"):
        try:
            edges.append(check_edges(list(doc.get(key) or []), key))
        except (BucketEdgesError, TypeError) as exc:
            raise fail(key, str(exc).split(": ", 1)[-1]) from None
    shape = (len(edges[0]) - 1, len(edges[1]) - 1)
    distribution = _matrix(doc.get("workload_distribution"), shape, "workload_distribution", fail)
    gpus_doc = doc.get("gpus")
    if not isinstance(gpus_doc, Mapping) or not gpus_doc:
        raise fail("gpus", "must be an object of GPU type -> {planned, tputs}")
    gpus = []
    for name, entry in gpus_doc.items():
        where = f"gpus.{name}"
        if not isinstance(entry, Mapping):
            raise fail(where, "must be an object {planned, tputs}")
        planned = entry.get("planned", 0)
        if isinstance(planned, bool) or not isinstance(planned, int) or planned < 0:
            raise fail(f"{where}.planned", f"must be a whole number >= 0, got {planned!r}")
        raw = entry.get("tputs")
        gpus.append(GpuRoute(str(name), planned, None if raw is None else _matrix(raw, shape, f"{where}.tputs", fail)))
    by_name = {g.name: g for g in gpus}
    shares: dict[Bucket, dict[str, float]] = {}
    routing = doc.get("routing") or []
    if not isinstance(routing, list):
        raise fail("routing", "must be an array of {bucket: [i, j], shares: {GPU: share}}")
    for k, route in enumerate(routing):
        where = f"routing[{k}]"
        bucket = route.get("bucket") if isinstance(route, Mapping) else None
        if (not isinstance(bucket, list) or len(bucket) != 2 or not all(isinstance(x, int) for x in bucket)
                or not (0 <= bucket[0] < shape[0] and 0 <= bucket[1] < shape[1])):
            raise fail(f"{where}.bucket", f"must be [i, j] inside the {shape[0]}x{shape[1]} buckets, got {bucket!r}")
        cell = (bucket[0], bucket[1])
        if cell in shares:
            raise fail(f"{where}.bucket", f"{bucket} is routed twice")
        raw_shares = route.get("shares")
        if not isinstance(raw_shares, Mapping):
            raise fail(f"{where}.shares", "must be an object of GPU type -> share")
        clean: dict[str, float] = {}
        for gpu, share in raw_shares.items():
            if gpu not in by_name:
                raise fail(f"{where}.shares.{gpu}", "is not in gpus")
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
                raise fail(f"{where}.shares.{gpu}", f"must be a number in [0, 1], got {share!r}")
            if share > 0 and by_name[gpu].tputs is not None and not by_name[gpu].serves(cell):
                raise fail(f"{where}.shares.{gpu}", "routes to a GPU type whose tputs for the bucket is 0")
            if share > 0:
                clean[gpu] = float(share)
        total = sum(clean.values())
        if clean:
            shares[cell] = {g: s / total for g, s in clean.items()}
    replicas_doc = doc.get("replicas") or []
    if not isinstance(replicas_doc, list):
        raise fail("replicas", "must be an array of {name, gpu, url}")
    replicas, names = [], set()
    for k, item in enumerate(replicas_doc):
        where = f"replicas[{k}]"
        if not isinstance(item, Mapping) or not all(isinstance(item.get(x), str) and item.get(x)
                                                    for x in ("name", "gpu", "url")):
            raise fail(where, "must be an object with string name, gpu and url")
        if item["gpu"] not in by_name:
            raise fail(f"{where}.gpu", f"{item['gpu']!r} is not in gpus")
        if item["name"] in names:
            raise fail(f"{where}.name", f"{item['name']!r} is used twice")
        names.add(item["name"])
        replicas.append(ReplicaSpec(item["name"], item["gpu"], normalise_url(item["url"], f"{source}: {where}.url")))
    rate = doc.get("total_request_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0):
        raise fail("total_request_rate", f"must be a number >= 0 or null, got {rate!r}")
    return Routes(source=str(doc.get("source") or source), input_edges=edges[0], output_edges=edges[1],
                  distribution=distribution, gpus=tuple(gpus), shares=shares, replicas=tuple(replicas),
                  total_request_rate=None if rate is None else float(rate))


def _matrix(value: Any, shape: tuple[int, int], path: str, fail: Any) -> Matrix:
    rows, cols = shape
    if not isinstance(value, list) or len(value) != rows or not all(
            isinstance(row, list) and len(row) == cols for row in value):
        raise fail(path, f"must be a {rows}x{cols} matrix (one row per input bucket, one column per output bucket)")
    for i, row in enumerate(value):
        for j, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                raise fail(f"{path}[{i}][{j}]", f"must be a number >= 0, got {x!r}")
    return tuple(tuple(float(x) for x in row) for row in value)
