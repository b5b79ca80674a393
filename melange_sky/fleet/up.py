"""`up` as one library call: plan a config against what the ledger has, confirm, launch, re-plan around offers
without capacity. The CLI, a controller or a router share it; the caller chooses the I/O (backend, ledger, how to
confirm, where progress and warnings go) and prints nothing it did not ask for.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from melange_sky.core.config import Config, GpuSpec, SpotPolicy
from melange_sky.deploy.plan import (DEFAULT_MAX_REPLICAS, Plan, PlanRequest, PlanSettings, ReplicaPlan, build_plan,
                                     deployment_from_config)
from melange_sky.deploy.render import builtin_templates
from melange_sky.deploy.router_task import ROUTER_TEMPLATE, HostedController, build_router_plan
from melange_sky.errors import ControllerError, LedgerError, MelangeError, MissingSecret
from melange_sky.solver.model import SolverOptions
from melange_sky.fleet.backends import Backend, needs_model_secrets
from melange_sky.fleet.fleet import Fleet, Planner, RouterSetup, UpOptions
from melange_sky.fleet.hosted import (HOSTED, LOCAL, controller_mode, controller_settings, push_from_ledger,
                                      sync_from_controller)
from melange_sky.fleet.keys import API_KEY_ENV, fleet_keys
from melange_sky.fleet.launchers import state_dir
from melange_sky.fleet.ledger import Ledger
from melange_sky.fleet.reports import DryRunReport, Preview, ReplicaEvent, UpReport

__all__ = ["bring_up", "config_digest", "config_hash", "controller_choice", "dry_run", "fleet_config", "fleet_record",
           "launch_secrets", "make_planner", "router_planner", "router_setup", "secrets_from_env",
           "skypilot_api_server"]

#: The SkyPilot client's settings a hosted controller shares with the user's machine (SkyPilot's own names).
SKYPILOT_ENDPOINT_ENV = "SKYPILOT_API_SERVER_ENDPOINT"
SKYPILOT_TOKEN_ENV = "SKYPILOT_SERVICE_ACCOUNT_TOKEN"

OnEvent = Callable[[ReplicaEvent], None]
OnWarning = Callable[[str], None]


def config_hash(*parts: Any) -> str:
    """A short digest of the effective config and the settings that shape the plan."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fleet_record(config: Config, settings: PlanSettings,
                 controller: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the ledger keeps beside a fleet's plan so a controller can re-plan it without the config file: the
    effective config (costs resolved, overrides applied), the plan settings `up` used, and where its controller
    runs (`controller`: {"mode": "hosted", "interval": ...}; none: the user's machine)."""
    solver = settings.solver
    hosted = {"controller": dict(controller)} if controller is not None and controller.get("mode") == HOSTED else {}
    return {**hosted,
            "config": dataclasses.asdict(config),
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


def router_planner(config: Config, settings: PlanSettings,
                   controller: HostedController | None = None) -> Callable[[Plan], ReplicaPlan]:
    """The fleet's router task for a plan of its replicas (near most of them), as a row `up` launches like one. It
    always asks clients for a key: the user's MELANGE_SKY_API_KEY, else one made for the fleet (in its key file).
    `controller`: the task runs the fleet's hosted controller too."""
    upstream = _upstream_key_secret(config, settings)

    def plan_router(plan: Plan) -> ReplicaPlan:
        hosted = controller
        if hosted is not None and hosted.backend == "skypilot":
            hosted = dataclasses.replace(hosted, clouds=tuple(sorted({r.cloud for r in plan.replicas if r.cloud})))
        router = build_router_plan(config, [(r.cloud, r.region) for r in plan.replicas], api_key=True,
                                   upstream_key_secret=upstream, catalog=settings.catalog, controller=hosted)
        return ReplicaPlan(cluster=router.cluster, gpu=ROUTER_TEMPLATE, entry=ROUTER_TEMPLATE, index=0,
                           file_name=f"skypilot_{ROUTER_TEMPLATE}.yaml", cloud=router.cloud, region=router.region,
                           instance_type=router.instance_type, accelerators="", use_spot=False, price=router.price,
                           task=router.task, yaml=router.yaml)

    return plan_router


def _upstream_key_secret(config: Config, settings: PlanSettings) -> str | None:
    """The secret holding the key the replicas want, when it is not the router's own client key."""
    secret = deployment_from_config(config, settings.template).api_key_secret
    return secret if secret != API_KEY_ENV else None


def router_setup(config: Config, settings: PlanSettings, environ: Mapping[str, str],
                 controller: HostedController | None = None) -> RouterSetup:
    """What `up` needs to run the fleet's router: its task planner and the fleet's keys (made at the first `up`, in
    a 0600 file under $MELANGE_SKY_HOME), plus the replicas' key when it is a secret of another name, and with a
    hosted `controller` the secrets it launches with (in memory: SkyPilot secrets of the router's task)."""
    upstream = _upstream_key_secret(config, settings)
    keys = fleet_keys(config.name, api_key=environ.get(API_KEY_ENV) or None)
    extra = secrets_from_env([upstream], environ) if upstream else {}
    if controller is not None:
        extra.update(secrets_from_env([s for s in controller.secrets if s not in extra], environ))
    return RouterSetup(plan=router_planner(config, settings, controller), keys=keys, upstream_secrets=extra)


def may_use_spot(config: Config) -> bool:
    """Whether the fleet may get spot replicas: a `spot` block (markets) or an entry pinned to spot."""
    return config.spot is not None or any(g.use_spot for g in config.gpus)


def skypilot_api_server(environ: Mapping[str, str], config_path: str | None = None) -> str | None:
    """The SkyPilot API server the user's SkyPilot client talks to, when it is one another host can reach too:
    `$SKYPILOT_API_SERVER_ENDPOINT`, else `api_server.endpoint` of `~/.sky/config.yaml`; None for none or a local
    one (127.0.0.1: a hosted controller could not reach it). Read without importing SkyPilot."""
    endpoint = environ.get(SKYPILOT_ENDPOINT_ENV)
    if not endpoint:
        import yaml  # noqa: PLC0415 - only when a hosted controller is planned

        path = Path(config_path or os.path.expanduser("~/.sky/config.yaml"))
        try:
            doc = yaml.safe_load(path.read_text()) if path.is_file() else None
        except (OSError, yaml.YAMLError):
            doc = None
        server = doc.get("api_server") if isinstance(doc, Mapping) else None
        endpoint = server.get("endpoint") if isinstance(server, Mapping) else None
    if not isinstance(endpoint, str) or not endpoint:
        return None
    host = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}").hostname or ""
    return None if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0") else endpoint  # noqa: S104 - compared


def controller_choice(config: Config, settings: PlanSettings, backend: Backend, environ: Mapping[str, str],
                      asked: str | None, router: bool, interval: float = 60.0,
                      watch_args: Sequence[str] = ()) -> tuple[HostedController | None, str | None]:
    """Where `up` puts the fleet's controller: (the hosted controller, or None for the user's machine; a note).

    `asked`: `--controller` (None: hosted when the fleet may use spot and it can be, else local). Hosted needs a
    router (it runs on its host) and a launcher both machines share: the local launcher's state directory, or a
    SkyPilot API server the host can reach (else the host's SkyPilot would not know the replicas `up` launched).
    Asked for and impossible: ControllerError; by default: local, with the note saying why. A TLS router is no
    obstacle: the controller calls it over https on its host's loopback, pinned to its certificate (`router.j2`)."""
    if asked == LOCAL or (asked is None and not may_use_spot(config)):
        return None, None
    why = None
    envs: dict[str, str] = {}
    deployment = deployment_from_config(config, settings.template)
    needed = deployment.needed_secrets(needs_model_secrets(backend))  # what it relaunches replicas with
    secret_names = [name for name in deployment.secrets if name in needed or environ.get(name)]
    launcher_dir = state_dir(backend)  # the local launcher's state, shared with the router's host
    if not router:
        why = "it runs on the router's host, and --no-router launches none"
    elif launcher_dir is None and backend.name == "skypilot":
        endpoint = skypilot_api_server(environ)
        if settings.template is not None and settings.template not in builtin_templates():
            why = f"the replicas' template {settings.template} is a file on this machine only"
        elif endpoint is None:
            why = ("the replicas are launched through this machine's own SkyPilot API server, which the router's "
                   "host cannot reach: set up a shared one (`sky api login -e URL`)")
        else:
            envs[SKYPILOT_ENDPOINT_ENV] = endpoint
            if environ.get(SKYPILOT_TOKEN_ENV):
                secret_names.append(SKYPILOT_TOKEN_ENV)
    elif launcher_dir is None:
        why = f"the {backend.name!r} launcher cannot be driven from the router's host"
    if why is not None:
        if asked == HOSTED:
            raise ControllerError(f"--controller hosted: {why}; or pass --controller local and run "
                                  f"`melange-sky watch {config.name}` here")
        return None, (f"the controller stays on this machine (`melange-sky watch {config.name}`): {why}")
    return HostedController(interval=interval, backend=backend.name, launcher_dir=launcher_dir, envs=envs,
                            secrets=tuple(dict.fromkeys(secret_names)), watch_args=tuple(watch_args)), None


def bring_up(config: Config, settings: PlanSettings, backend: Backend, ledger: Ledger, secrets: Mapping[str, str],
             options: UpOptions = UpOptions(), *, confirm: Callable[[Preview], bool] | None = None,
             on_preview: Callable[[Preview, list[str]], None] | None = None, on_event: OnEvent | None = None,
             on_warning: OnWarning | None = None, router: RouterSetup | None = None,
             exclude: frozenset[str] = frozenset(), controller: Mapping[str, Any] | None = None,
             notes: Sequence[str] = ()) -> UpReport:
    """Bring fleet `config.name` up (or what is missing of it) and return what happened.

    Under the fleet's lock, `on_preview` is shown the plan and what it changes (with notes); `confirm` is asked only
    when something would be launched or torn down, and False stops there (None: go ahead). `secrets` come from
    `launch_secrets` or the caller's own store; they reach the launcher only, never the ledger. `exclude`: offers
    no plan may add replicas on (`make_planner`), and `notes` (why) shown with the preview. `controller`: where the
    fleet's controller runs, kept in the ledger (None: as the fleet's record already says)."""
    def gate(preview: Preview, notes: list[str]) -> bool:
        if on_preview is not None:
            on_preview(preview, notes)
        return not preview.changes or confirm is None or confirm(preview)

    fleet = Fleet(backend, ledger, on_event)
    record = ledger.get_fleet(config.name)
    announce = controller is not None and controller.get("mode") == HOSTED  # the user's `up` of a hosted fleet
    if controller is None:
        controller = controller_settings(record)
    elif record is not None and controller_mode(record) != controller.get("mode", LOCAL):
        router_row = ledger.router(config.name)
        if router_row is not None and router_row.state.may_have_cluster:
            raise ControllerError(f"fleet {config.name}'s controller runs {controller_mode(record)}, and its router "
                                  f"(where a hosted one runs) is up: `melange-sky down {config.name}` first to "
                                  f"move it, or pass --controller {controller_mode(record)}")
    if announce and record is not None:  # what the hosted controller launched since, known here first
        sync_from_controller(ledger, config.name)
    report = fleet.up(config.name, make_planner(config, settings, on_warning, exclude), secrets,
                      config_digest(config, settings),
                      options, gate, router=router, record=fleet_record(config, settings, controller), notes=notes)
    if announce and not report.interrupted and ledger.get_fleet(config.name) is not None:
        try:  # the hosted controller adopts the fleet as this `up` left it before its next pass
            push_from_ledger(ledger, config.name, "up")
        except MelangeError as exc:
            report.notes.append(f"could not hand the fleet to its hosted controller: {exc}; `up` again to retry")
    return report


def dry_run(config: Config, settings: PlanSettings, backend: Backend, ledger: Ledger | None,
            environ: Mapping[str, str], *, on_event: OnEvent | None = None,
            on_warning: OnWarning | None = None, router: bool = True, shrink: bool = True,
            controller: HostedController | None = None, exclude: frozenset[str] = frozenset(),
            notes: Sequence[str] = ()) -> DryRunReport:
    """What `bring_up` would launch, every task validated by the launcher (the router's too, unless `router` is
    False, with the hosted `controller` it would run); writes nothing (`ledger` None: a machine that never
    launched). Secrets missing from `environ` are listed, not an error. `exclude` and `notes`: as `bring_up`'s, so
    the dry run plans what `up` would."""
    report = Fleet(backend, ledger, on_event).dryrun(
        config.name, make_planner(config, settings, on_warning, exclude), environ,
        router=router_planner(config, settings, controller) if router else None, shrink=shrink)
    report.notes[:0] = list(notes)
    if controller is not None and router:
        report.notes.append(f"the controller runs on the router's host (`watch --hosted`, every "
                            f"{controller.interval:g} s), driving the {controller.backend} launcher")
    return report
