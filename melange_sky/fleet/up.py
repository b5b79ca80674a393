"""`up` as one library call: plan a config against what the ledger has, confirm, launch, re-plan around offers
without capacity. The CLI, a controller or a router share it; the caller chooses the I/O (backend, ledger, how to
confirm, where progress and warnings go) and prints nothing it did not ask for.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from melange_sky.core.config import Config, GpuSpec, SpotPolicy
from melange_sky.deploy.plan import (DEFAULT_MAX_REPLICAS, Plan, PlanRequest, PlanSettings, ReplicaPlan, build_plan,
                                     deployment_from_config)
from melange_sky.deploy.router_task import ROUTER_TEMPLATE, build_router_plan
from melange_sky.errors import LedgerError, MissingSecret
from melange_sky.solver.model import SolverOptions
from melange_sky.fleet.backends import Backend, needs_model_secrets
from melange_sky.fleet.fleet import Fleet, Planner, RouterSetup, UpOptions
from melange_sky.fleet.keys import API_KEY_ENV, fleet_keys
from melange_sky.fleet.ledger import Ledger
from melange_sky.fleet.reports import DryRunReport, Preview, ReplicaEvent, UpReport

__all__ = ["bring_up", "config_digest", "config_hash", "dry_run", "fleet_config", "fleet_record", "launch_secrets",
           "make_planner", "router_planner", "router_setup", "secrets_from_env"]

OnEvent = Callable[[ReplicaEvent], None]
OnWarning = Callable[[str], None]


def config_hash(*parts: Any) -> str:
    """A short digest of the effective config and the settings that shape the plan."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fleet_record(config: Config, settings: PlanSettings) -> dict[str, Any]:
    """What the ledger keeps beside a fleet's plan so a controller can re-plan it without the config file: the
    effective config (costs resolved, overrides applied) and the plan settings `up` used."""
    solver = settings.solver
    return {"config": dataclasses.asdict(config),
            "settings": {"formulation": settings.formulation, "per_offer": settings.per_offer,
                         "template": settings.template, "max_replicas": settings.max_replicas,
                         "solver": {"name": solver.name, "path": solver.path, "time_limit": solver.time_limit}}}


def fleet_config(record: Mapping[str, Any], source: str) -> tuple[Config, PlanSettings]:
    """The config and plan settings a fleet was last brought up with (`fleet_record`, as the ledger stores it)."""
    stored, options = record.get("config"), record.get("settings")
    if not isinstance(stored, Mapping) or not isinstance(options, Mapping):
        raise LedgerError(f"{source}: the ledger has no config for this fleet (it was brought up by an older "
                          f"melange-sky); run `melange-sky up CONFIG` once to store it")
    fields = dict(stored)
    gpus = tuple(GpuSpec(**{**g, "tputs": _matrix(g["tputs"]), "quotas": tuple(tuple(q) for q in g["quotas"])})
                 for g in fields.pop("gpus"))
    config = Config(**{**fields, "gpus": gpus, "workload_distribution": _matrix(fields["workload_distribution"]),
                       "input_buckets": _edges(fields.get("input_buckets")),
                       "output_buckets": _edges(fields.get("output_buckets")),
                       "clouds": None if fields.get("clouds") is None else tuple(fields["clouds"]),
                       "spot": None if fields.get("spot") is None else SpotPolicy(**fields["spot"]),
                       "warnings": ()})
    solver = options.get("solver") or {}
    settings = PlanSettings(formulation=options.get("formulation", "slices"),
                            solver=SolverOptions(name=solver.get("name", "highs"), path=solver.get("path"),
                                                 time_limit=solver.get("time_limit")),
                            per_offer=bool(options.get("per_offer")), template=options.get("template"),
                            max_replicas=options.get("max_replicas", DEFAULT_MAX_REPLICAS))
    return config, settings


def _matrix(rows: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(row) for row in rows)


def _edges(edges: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if edges is None else tuple(edges)


def config_digest(config: Config, settings: PlanSettings) -> str:
    """What the ledger keeps to tell, on the next `up`, whether the fleet was planned from another config."""
    return config_hash(dataclasses.asdict(config), settings.formulation, settings.per_offer, settings.template)


def secrets_from_env(names: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The secrets' values from the environment; a missing one is an error before anything is launched."""
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise MissingSecret(f"{', '.join(missing)} not set in the environment: the replicas need "
                            f"{'it' if len(missing) == 1 else 'them'} at launch. Export {missing[0]}=... and rerun, "
                            f"or set \"deployment\": {{\"secrets\": []}} in the config if the model needs no token")
    return {name: environ[name] for name in names}


def launch_secrets(config: Config, settings: PlanSettings, environ: Mapping[str, str],
                   backend: object | None = None) -> dict[str, str]:
    """The secrets the config's replicas need, from `environ`: checked before a ledger is opened, so a missing token
    costs nothing. On a launcher whose replicas fetch no model (`needs_model_secrets`: the local launcher), only
    the replicas' API key secret is required; the others are passed when set."""
    deployment = deployment_from_config(config, settings.template)
    needed = secrets_from_env(deployment.needed_secrets(needs_model_secrets(backend)), environ)
    return {**{name: environ[name] for name in deployment.secrets if environ.get(name)}, **needed}


def make_planner(config: Config, settings: PlanSettings, on_warning: OnWarning | None = None,
                 exclude: frozenset[str] = frozenset()) -> Planner:
    """The planner `up` calls on each (re-)plan. Only the first plan of a fleet compares formulations (re-plans
    are for capacity, not for advice); each solver warning is passed to `on_warning` once (the config's own are
    the caller's to show). `exclude`: offers every plan avoids besides those a launch finds full (a controller's
    spot pools that were just preempted)."""
    warned = set(config.warnings)

    def planner(request: PlanRequest) -> Plan:
        first = request == PlanRequest()
        if exclude:
            request = dataclasses.replace(request, exclude=request.exclude | exclude)
        plan = build_plan(config, settings if first else dataclasses.replace(settings, compare=False), request)
        for warning in [w for w in plan.result.warnings if w not in warned]:
            if on_warning is not None:
                on_warning(warning)
        warned.update(plan.result.warnings)
        return plan

    return planner


def router_planner(config: Config, settings: PlanSettings) -> Callable[[Plan], ReplicaPlan]:
    """The fleet's router task for a plan of its replicas (near most of them), as a row `up` launches like one. It
    always asks clients for a key: the user's MELANGE_SKY_API_KEY, else one made for the fleet (in its key file)."""
    upstream = _upstream_key_secret(config, settings)

    def plan_router(plan: Plan) -> ReplicaPlan:
        router = build_router_plan(config, [(r.cloud, r.region) for r in plan.replicas], api_key=True,
                                   upstream_key_secret=upstream, catalog=settings.catalog)
        return ReplicaPlan(cluster=router.cluster, gpu=ROUTER_TEMPLATE, entry=ROUTER_TEMPLATE, index=0,
                           file_name=f"skypilot_{ROUTER_TEMPLATE}.yaml", cloud=router.cloud, region=router.region,
                           instance_type=router.instance_type, accelerators="", use_spot=False, price=router.price,
                           task=router.task, yaml=router.yaml)

    return plan_router


def _upstream_key_secret(config: Config, settings: PlanSettings) -> str | None:
    """The secret holding the key the replicas want, when it is not the router's own client key."""
    secret = deployment_from_config(config, settings.template).api_key_secret
    return secret if secret != API_KEY_ENV else None


def router_setup(config: Config, settings: PlanSettings, environ: Mapping[str, str]) -> RouterSetup:
    """What `up` needs to run the fleet's router: its task planner and the fleet's keys (made at the first `up`, in
    a 0600 file under $MELANGE_SKY_HOME), plus the replicas' key when it is a secret of another name."""
    upstream = _upstream_key_secret(config, settings)
    keys = fleet_keys(config.name, api_key=environ.get(API_KEY_ENV) or None)
    extra = secrets_from_env([upstream], environ) if upstream else {}
    return RouterSetup(plan=router_planner(config, settings), keys=keys, upstream_secrets=extra)


def bring_up(config: Config, settings: PlanSettings, backend: Backend, ledger: Ledger, secrets: Mapping[str, str],
             options: UpOptions = UpOptions(), *, confirm: Callable[[Preview], bool] | None = None,
             on_preview: Callable[[Preview, list[str]], None] | None = None, on_event: OnEvent | None = None,
             on_warning: OnWarning | None = None, router: RouterSetup | None = None,
             exclude: frozenset[str] = frozenset()) -> UpReport:
    """Bring fleet `config.name` up (or what is missing of it) and return what happened.

    Under the fleet's lock, `on_preview` is shown the plan and what it changes (with notes); `confirm` is asked only
    when something would be launched or torn down, and False stops there (None: go ahead). `secrets` come from
    `launch_secrets` or the caller's own store; they reach the launcher only, never the ledger. `exclude`: offers
    no plan may add replicas on (`make_planner`)."""
    def gate(preview: Preview, notes: list[str]) -> bool:
        if on_preview is not None:
            on_preview(preview, notes)
        return not preview.changes or confirm is None or confirm(preview)

    fleet = Fleet(backend, ledger, on_event)
    return fleet.up(config.name, make_planner(config, settings, on_warning, exclude), secrets,
                    config_digest(config, settings),
                    options, gate, router=router, record=fleet_record(config, settings))


def dry_run(config: Config, settings: PlanSettings, backend: Backend, ledger: Ledger | None,
            environ: Mapping[str, str], *, on_event: OnEvent | None = None,
            on_warning: OnWarning | None = None, router: bool = True, shrink: bool = True) -> DryRunReport:
    """What `bring_up` would launch, every task validated by the launcher (the router's too, unless `router` is
    False); writes nothing (`ledger` None: a machine that never launched). Secrets missing from `environ` are
    listed, not an error."""
    return Fleet(backend, ledger, on_event).dryrun(config.name, make_planner(config, settings, on_warning), environ,
                                                   router=router_planner(config, settings) if router else None,
                                                   shrink=shrink)
