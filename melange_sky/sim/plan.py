"""What is simulated: the plan's replicas, the routing table `serve` would route them by, and the engine model of
each replica's GPU type for the config's model and engine settings.

From a config, the plan is the one `solve` shows (offers bound as `solve` binds them, the same formulation and
headroom); from a running fleet, its stored plan and the replicas the ledger has up (read-only). Either way the
routes are built by `serve.routes`, the module the router builds its own from, so the simulated router and the real
one split traffic by the same table.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from melange_sky.core.config import Config, Market, pinned_gpus
from melange_sky.deploy.plan import DEFAULT_MODEL, PlanSettings, deployment_from_config, solve_offers
from melange_sky.engine import Engine, EngineSettings, ModelSpec, load_model
from melange_sky.engine.errors import EngineError
from melange_sky.errors import MelangeError, UnknownFleet
from melange_sky.fleet.ledger import Ledger, ReplicaState
from melange_sky.serve.routes import ReplicaSpec, Routes, routes_from_plan, routes_from_solve
from melange_sky.sim.errors import SimulationError
from melange_sky.solver.result import SolveResult

__all__ = ["GpuModel", "SimPlan", "plan_from_config", "plan_from_fleet", "replica_specs"]


@dataclass(frozen=True)
class GpuModel:
    """One GPU type's engine model: what every replica of it runs (`make()` builds a fresh engine)."""

    gpu: str
    model: ModelSpec
    settings: EngineSettings
    description: str  # Engine.description of one of them (says whether a calibration fit is used)
    notes: tuple[str, ...] = ()
    speed: float = 1.0  # every step time divided by this (as `emulate --speed`)

    def make(self) -> Engine:
        return Engine(self.model, self.gpu, settings=self.settings, speed=self.speed)


@dataclass(frozen=True)
class SimPlan:
    """The fleet a simulation runs: its routes (with one `ReplicaSpec` per replica), each GPU type's engine model,
    the $/h and, from a config, the solve it came from."""

    source: str
    routes: Routes
    engines: dict[str, GpuModel]
    cost_per_hour: float
    counts: dict[str, int]
    headroom: float | None = None
    result: SolveResult | None = None
    notes: tuple[str, ...] = field(default=())
    spot_counts: dict[str, int] = field(default_factory=dict)  # of `counts`, the instances on the spot market

    @property
    def replicas(self) -> tuple[ReplicaSpec, ...]:
        return self.routes.replicas

    def describe(self) -> str:
        """"2x A10G + 1x A100-80GB, $5.69/h" ("4x A10G (3 spot)" under a `spot` block)."""
        parts = [f"{n}x {gpu}" + (f" ({self.spot_counts[gpu]} spot)" if self.spot_counts.get(gpu) else "")
                 for gpu, n in self.counts.items() if n]
        return " + ".join(parts) + f", ${self.cost_per_hour:.2f}/h"

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "counts": dict(self.counts), "cost_per_hour": round(self.cost_per_hour, 6),
                "spot_counts": dict(self.spot_counts), "headroom": self.headroom,
                "replicas": [r.to_dict() | {"url": None} for r in self.replicas],
                "engines": {g: m.description for g, m in self.engines.items()}, "notes": list(self.notes)}


def replica_specs(counts: dict[str, int]) -> list[ReplicaSpec]:
    """One replica per count, named `<gpu>-<i>` as `serve --replica` names them (a placeholder URL: nothing is
    called)."""
    specs: list[ReplicaSpec] = []
    for gpu, count in counts.items():
        slug = re.sub(r"[^a-z0-9-]+", "-", gpu.lower()).strip("-") or "gpu"
        specs.extend(ReplicaSpec(f"{gpu.lower()}-{k}", gpu, f"http://{slug}-{k}.sim.invalid") for k in range(count))
    return specs


def _model(name: str, override: str | None) -> ModelSpec:
    try:
        return load_model(override or name)
    except EngineError as exc:
        if override:
            raise SimulationError(f"--model: {exc}") from None
        raise SimulationError(f"deployment.model: {exc}; or give the engine model with --model NAME|config.json") \
            from None


def _engines(gpus: Sequence[str], model: ModelSpec, settings: EngineSettings,
             speed: float = 1.0) -> dict[str, GpuModel]:
    """Each GPU type's engine model, built once here so a GPU that cannot hold the model is an error before the
    run."""
    engines = {}
    for gpu in gpus:
        try:
            engine = Engine(model, gpu, settings=settings, speed=speed)
        except EngineError as exc:
            raise SimulationError(f"{gpu}: {exc} (the plan has replicas of it; the engine model cannot run them)") \
                from None
        engines[gpu] = GpuModel(gpu, model, settings, engine.description, tuple(engine.notes), speed)
    return engines


def _spot_note(spot: dict[str, int], counts: dict[str, int]) -> list[str]:
    """What the simulation leaves out of spot replicas: they run as the same GPU and are never preempted."""
    shown = [f"{gpu}: {n} of {counts[gpu]}" for gpu, n in spot.items() if n and gpu in counts]
    return [f"spot replicas are simulated as the same GPUs as on-demand ones, never preempted ({', '.join(shown)})"
            ] if shown else []


def plan_from_config(config: Config, settings: PlanSettings = PlanSettings(compare=False),
                     model: str | None = None, speed: float = 1.0) -> SimPlan:
    """The plan `solve` makes of `config` (its formulation, headroom, rate and `--per-offer` as given), one replica
    per count, and the engine model of each GPU type: the config's `deployment.model` (or `model`) with its engine
    settings, every step `speed` times faster (a fleet of `emulate --speed` replicas).

    A solve column is a GPU entry at one offer and market ("A10G:spot", "A10G@aws:us-west-2"): the same GPU for the
    engine, so replicas, counts and engine models are per entry, as `up` names its replicas and routes to them."""
    deployment = deployment_from_config(config)
    result = solve_offers(config, settings)
    # an instance of several GPUs runs gpus / TP data-parallel engines behind one server (templates/vllm.j2): each
    # is a replica here, balanced by the router's least-in-flight as vLLM balances its data-parallel ranks
    tp = deployment.engine.tensor_parallel_size or 1
    notes = list(result.warnings)
    counts: dict[str, int] = {}  # instances per GPU entry
    engines_of: dict[str, int] = {}  # replicas (engines) per GPU entry
    spot: dict[str, int] = {}  # spot instances per GPU entry
    for column in result.gpus:
        if not column.count:
            continue
        entry = column.entry or column.name
        per = max(1, column.gpus_per_instance // tp)
        counts[entry] = counts.get(entry, 0) + column.count
        engines_of[entry] = engines_of.get(entry, 0) + column.count * per
        spot[entry] = spot.get(entry, 0) + (column.count if column.market == Market.SPOT else 0)
        if per > 1:
            notes.append(f"{column.name}: {column.count} instance(s) of {per * tp} GPUs, each {per} data-parallel "
                         f"engines (TP {tp}): simulated as {column.count * per} replicas")
    notes.extend(_spot_note(spot, counts))
    routes = routes_from_solve(config, result, replica_specs(engines_of))
    spec = _model(deployment.model, model)
    engines = _engines(list(counts), spec, deployment.engine, speed)
    return SimPlan(source=config.source, routes=routes, engines=engines, cost_per_hour=result.cost, counts=counts,
                   headroom=config.headroom, result=result, notes=tuple(notes),
                   spot_counts={entry: n for entry, n in spot.items() if n})


def _stored_engine_settings(plan: dict[str, Any], fleet: str) -> EngineSettings | None:
    """The engine settings of the config a fleet was brought up with (`up` stores it beside the plan), None when the
    ledger has none (an older `up`, a plan stored alone) or they no longer read."""
    deployment = (plan.get("config") or {}).get("deployment") if isinstance(plan.get("config"), dict) else None
    if not isinstance(deployment, dict):
        return None
    try:
        return EngineSettings.from_deployment(deployment, source=f"fleet {fleet}")
    except MelangeError:
        return None


def _instance_gpus(plan: dict[str, Any]) -> dict[str, int]:
    """GPUs per instance of each cluster the stored plan launches, and of each GPU entry the stored config pins
    (by its entry name): what a replica's server runs its data-parallel engines on."""
    gpus: dict[str, int] = {}
    config = plan.get("config") if isinstance(plan.get("config"), dict) else {}
    for entry in (config or {}).get("gpus") or []:
        if isinstance(entry, dict) and (count := pinned_gpus(entry.get("accelerators"))):
            gpus[str(entry.get("entry") or entry.get("name"))] = count
    for replica in plan.get("replicas") or []:
        if isinstance(replica, dict) and (count := pinned_gpus(replica.get("accelerators"))):
            gpus[str(replica.get("cluster"))] = count
    return gpus


def plan_from_fleet(fleet: str, ledger: Ledger | None = None, model: str | None = None,
                    speed: float = 1.0) -> SimPlan:
    """A running fleet's stored plan and the replicas the ledger has up (the plan's replicas when none is up yet),
    read-only. Its engine settings are those of the config `up` stored beside the plan, else vLLM's defaults. An
    instance of k GPUs is k / TP data-parallel engines (templates/vllm.j2), one replica each, as from a config."""
    if ledger is None:
        if not Ledger.exists():
            raise UnknownFleet(f"no fleet named {fleet!r}: there is no ledger yet (`melange-sky up CONFIG` makes one)")
        with Ledger() as db:
            return plan_from_fleet(fleet, db, model, speed)
    record = ledger.get_fleet(fleet)
    if record is None:
        raise UnknownFleet(f"no fleet named {fleet!r} in the ledger ({ledger.path}); `melange-sky status` lists "
                           f"fleets, or give a CONFIG file")
    plan = record.plan
    notes: list[str] = []
    rows = [r for r in ledger.replicas(fleet) if r.state is ReplicaState.UP]
    settings = _stored_engine_settings(plan, fleet)
    tp = (settings.tensor_parallel_size if settings is not None else None) or 1
    instance_gpus = _instance_gpus(plan)
    counts: dict[str, int] = {}  # instances per GPU entry
    engines_of: dict[str, int] = {}  # replicas (data-parallel engines) per GPU entry
    spot: dict[str, int] = {}
    running = [(row.cluster, row.gpu, row.use_spot) for row in rows] or [
        (str(r.get("cluster")), str(r.get("entry") or r.get("gpu")), bool(r.get("use_spot")))
        for r in plan.get("replicas") or []]
    for cluster, gpu, use_spot in running:
        per = max(1, instance_gpus.get(cluster, instance_gpus.get(gpu, 1)) // tp)
        counts[gpu] = counts.get(gpu, 0) + 1
        engines_of[gpu] = engines_of.get(gpu, 0) + per
        spot[gpu] = spot.get(gpu, 0) + use_spot
    if not rows:
        notes.append(f"no replica of fleet {fleet} is up: simulating the {sum(counts.values())} its plan counts")
    for gpu, total in engines_of.items():
        if total > counts[gpu]:
            notes.append(f"{gpu}: {counts[gpu]} instance(s) of {total} data-parallel engines (TP {tp}) in all: "
                         f"simulated as {total} replicas")
    specs = replica_specs(engines_of)
    routes = routes_from_plan(plan, specs, source=f"fleet {fleet}")
    known = {g.name for g in routes.gpus}
    routes = dataclasses.replace(routes, replicas=tuple(r for r in routes.replicas if r.gpu in known))
    notes.extend(routes.warnings)
    counts = {gpu: n for gpu, n in counts.items() if gpu in known}
    if not counts:
        raise SimulationError(f"fleet {fleet}: no replica of a GPU type its plan routes to")
    notes.extend(_spot_note(spot, counts))
    spec = _model(str(plan.get("model") or DEFAULT_MODEL), model)
    if settings is None:
        notes.append("engine settings: vLLM's defaults (the ledger keeps no config of this fleet's with its "
                     "deployment engine settings; simulate the CONFIG to use them)")
    engines = _engines(list(counts), spec, settings or EngineSettings(), speed)
    price = {r.cluster: r.price_per_hour for r in rows}
    cost = sum(price.values()) if rows else float(plan.get("cost") or 0.0)
    solve = plan.get("solve") or {}
    return SimPlan(source=f"fleet {fleet}", routes=routes, engines=engines, cost_per_hour=cost, counts=counts,
                   headroom=solve.get("headroom"), notes=tuple(notes),
                   spot_counts={gpu: n for gpu, n in spot.items() if n and gpu in counts})
