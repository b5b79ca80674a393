"""From a solved allocation to concrete replicas: one SkyPilot task per GPU instance, named and rendered.

A plan is what `up` launches and what the ledger records: for each replica its cluster name
(`<fleet>-<gpu>-<i>`), its offer (cloud, region, instance type, $/h) and its rendered task. It holds no secret
values: tasks name their secrets (`secrets: {HF_TOKEN: null}`) and the launcher supplies them from the environment.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melange_sky import __version__
from melange_sky._io import write_json, write_text
from melange_sky.core.config import Config, GpuSpec, Market, check_instance_gpus, check_keys, is_note, pinned_gpus
from melange_sky.deploy.catalog import Catalog, offer_key
from melange_sky.deploy.offers import bind_offers
from melange_sky.deploy.render import (INTERNAL_TEMPLATES, LINE_BREAKS, BoundOffer, Template, bind_resources,
                                       builtin_templates, load_template, render)
from melange_sky.deploy.router_config import parse_router_block
from melange_sky.engine.settings import ENGINE_SETTING_KEYS, EngineSettings
from melange_sky.errors import ConfigError, OutputError
from melange_sky.solver.model import SolverOptions
from melange_sky.solver.result import SolveResult, solve

DEFAULT_MODEL = "meta-llama/Llama-2-7b-chat-hf"
DEFAULT_PORT = 8000
DEFAULT_SECRETS = ("HF_TOKEN",)
#: The secret holding the key replicas admit (`deployment.api_key_secret: true` names this one): the router's key
#: by default (`melange-sky serve` sends MELANGE_SKY_API_KEY to replicas unless MELANGE_SKY_UPSTREAM_API_KEY is set).
DEFAULT_API_KEY_SECRET = "MELANGE_SKY_API_KEY"
#: The engine version a builtin template installs when `deployment.version` is absent: the version you profile is
#: the version you deploy. `"version": null` installs the latest instead.
DEFAULT_ENGINE_VERSIONS = {"vllm": "0.33.0", "sglang": "0.5.23"}
#: The keys of the config's `deployment` block (others are errors, `x-` notes aside): what the replicas' templates
#: render (`Deployment`, `_replica`), `extra` (a custom template's own variables), and the router's block
#: (`deploy/router_config.py`), and `local` (LOCAL_KEYS, read by the local launcher `fleet/local.py`). Index of
#: every block of a config: `core/config.py`'s docstring.
DEPLOYMENT_KEYS = ("template", "model", "port", "envs", "secrets", "version", "extra_args", "readiness_path",
                   "api_key_secret", "extra", "router", "local", *ENGINE_SETTING_KEYS)
#: `deployment.local`: how the local launcher (`--backend local`) runs the fleet; `speed`: its emulated GPUs run that
#: many times faster than real.
LOCAL_KEYS = ("speed",)
#: SkyPilot's cluster-name pattern (checked server-side, sky/utils/common_utils.py).
CLUSTER_NAME_RE = re.compile(r"^[a-zA-Z]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?$")
#: Longest cluster name we generate; SkyPilot itself truncates on-cloud names per cloud (GCP: 35) with a hash.
MAX_CLUSTER_NAME = 63
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: A package version or specifier tail as pip takes it ("0.6.3", "0.4.6.post1", "1.0+cu121"): it goes into the
#: setup command, so nothing the shell would interpret ($, quotes, spaces, line breaks).
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+!-]*$")
FORMATS = ("skypilot", "json")
#: `--max-replicas`' default: far above any fleet a config means, far below what a mistyped rate asks for.
DEFAULT_MAX_REPLICAS = 500
PLAN_FILE = "melange_plan.json"
RESULT_FILE = "melange_result.json"


@dataclass(frozen=True)
class Deployment:
    """How each replica serves the model: which template, model, port, env vars and secret names."""

    template: str = "vllm"
    model: str = DEFAULT_MODEL
    port: int = DEFAULT_PORT
    envs: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = DEFAULT_SECRETS
    version: str | None = None
    extra_args: tuple[str, ...] = ()
    readiness_path: str = "/health"
    #: `deployment.extra`: a custom template's own variables, which it reads as `deployment.<name>`
    extra: dict[str, Any] = field(default_factory=dict)
    #: The secret (also in `secrets`) whose value the engine requires as its API key; None: the engine admits anyone.
    api_key_secret: str | None = None
    #: vLLM engine flags the deployment sets under vLLM's names (max_num_seqs, ...): the engine model's settings
    #: (`melange_sky.engine.EngineSettings`), rendered as `vllm serve` flags so the server is the one estimated.
    engine: EngineSettings = field(default_factory=EngineSettings)

    def needed_secrets(self, model_secrets: bool = True) -> tuple[str, ...]:
        """The secrets a launch cannot go without: every one of `secrets`, or, on a launcher whose replicas fetch no
        model (`model_secrets` False: the local launcher's emulators), only the replicas' API key secret, which
        they still demand."""
        return self.secrets if model_secrets else tuple(s for s in self.secrets if s == self.api_key_secret)


@dataclass(frozen=True)
class ReplicaPlan:
    """One GPU instance of the fleet: where it runs, what it costs and the task that runs on it."""

    cluster: str
    gpu: str  # the solver's column name (a GPU type, or a GPU at one offer with --per-offer)
    entry: str  # the config's GPU entry it comes from (the same as `gpu` unless --per-offer)
    index: int
    file_name: str
    cloud: str | None
    region: str | None
    instance_type: str | None
    accelerators: str
    use_spot: bool
    price: float  # $/h for the instance
    task: dict[str, Any]
    yaml: str
    market: str = Market.ON_DEMAND  # on_demand, spot or owned (a Kubernetes cluster or SSH node pool of the user's)

    @property
    def offer(self) -> str:
        """The offer it runs on, as the ledger and capacity exclusions name it ("aws:us-west-2:g5.xlarge")."""
        return offer_key(self.cloud, self.region, self.instance_type, self.use_spot)

    def summary(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "gpu": self.gpu, "entry": self.entry, "index": self.index,
                "file": self.file_name,
                "cloud": self.cloud, "region": self.region, "instance_type": self.instance_type,
                "accelerators": self.accelerators, "use_spot": self.use_spot, "market": self.market,
                "price": self.price, "offer": self.offer}


@dataclass(frozen=True)
class Plan:
    """A solve result made concrete: every replica with its offer and rendered task."""

    fleet: str
    result: SolveResult
    deployment: Deployment
    template: str
    replicas: list[ReplicaPlan]
    offers: dict[str, dict[str, Any]] = field(default_factory=dict)  # column name -> offer record (catalog)
    #: What a router needs beyond the solve (`melange-sky serve FLEET`): bucket edges, the workload histogram, each
    #: column's tputs and GPU entry. See `router_record`.
    router: dict[str, Any] = field(default_factory=dict)

    @property
    def cost(self) -> float:
        return sum(r.price for r in self.replicas)

    @property
    def clouds(self) -> list[str]:
        return sorted({r.cloud for r in self.replicas if r.cloud})

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "template": self.template, "model": self.deployment.model,
                "port": self.deployment.port, "secrets": list(self.deployment.secrets),
                "cost": round(self.cost, 6), "clouds": self.clouds,
                "replicas": [r.summary() for r in self.replicas], "offers": self.offers,
                "solve": self.result.to_dict(), "router": self.router}


@dataclass(frozen=True)
class PlanRequest:
    """What `up` asks of the planner when it (re-)plans a running fleet, in terms that survive a change of mode or
    column names: replicas are identified by (GPU entry, offer key).

    `fixed`: (entry, offer) -> replicas up there (the plan keeps at least that capacity); `names`: (entry, offer,
    cluster) of existing replicas, in the order to reuse them (up ones first), so a re-plan never duplicates a
    replica; `exclude`: offers found out of capacity (`catalog.offer_key`); `taken`: names no new replica may use."""

    fixed: Mapping[tuple[str, str], int] = field(default_factory=dict)
    names: Sequence[tuple[str, str, str]] = ()
    exclude: frozenset[str] = frozenset()
    taken: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PlanSettings:
    """How to turn a config into a plan: the solve's settings, offers per GPU type or per offer, the template."""

    formulation: str = "slices"
    solver: SolverOptions = field(default_factory=SolverOptions)
    per_offer: bool = False
    template: str | None = None  # overrides deployment.template
    compare: bool = True  # also solve `split` and the LP bound, to report what they would save
    catalog: Catalog | None = None
    #: Most replicas (instances) a plan may have: a larger fleet is an error before anything is rendered or written
    #: (a mistyped rate must not write 50,000 task files). None: no limit.
    max_replicas: int | None = DEFAULT_MAX_REPLICAS


def solve_offers(config: Config, settings: PlanSettings = PlanSettings(),
                 progress: Callable[[str], None] | None = None) -> SolveResult:
    """The fleet `plan` would make of `config` with `settings`, without rendering it: entries bound to offers as
    `plan` binds them (per offer or not, spot prices, quotas), solved by the same model. What `solve` shows.
    A GPU the catalog does not know is solved at its config cost, with a warning (`plan` refuses it)."""
    bound = bind_offers(config, settings.catalog, per_offer=settings.per_offer, strict=False)
    return solve(bound.config, settings.formulation, settings.solver, compare=settings.compare, caps=bound.caps,
                 max_replicas=settings.max_replicas, progress=progress)


def build_plan(config: Config, settings: PlanSettings = PlanSettings(),
               request: PlanRequest = PlanRequest()) -> Plan:
    """Config → offers → solve → one rendered task per replica. With a `request` from a running fleet, replicas
    already up count as fixed capacity and offers without capacity are avoided."""
    deployment = deployment_from_config(config, settings.template)
    load_template(deployment.template)  # a broken template fails before the solve, not after it
    bound = bind_offers(config, settings.catalog, per_offer=settings.per_offer, exclude=request.exclude)
    columns: list[GpuSpec] = []
    names: dict[str, list[str]] = {}
    for gpu in bound.config.gpus:
        entry, offer = gpu.entry or gpu.name, offer_key(gpu.cloud, gpu.region, gpu.instance_type, gpu.use_spot)
        # Per offer, a column owns the replicas on its offer; per GPU type, it owns every replica of its entry in
        # its market (a re-plan may have moved some to another offer; they are the same GPU), not the spot ones of
        # its on-demand twin under a spot block.
        def mine(e: str, o: str, entry: str = entry, offer: str = offer, spot: bool = gpu.use_spot) -> bool:
            return (e, o) == (entry, offer) if settings.per_offer else e == entry and o.endswith(":spot") == spot

        fixed = sum(n for (e, o), n in request.fixed.items() if mine(e, o))
        names[gpu.name] = [cluster for e, o, cluster in request.names if mine(e, o)]
        if offer in request.exclude:
            columns.append(dataclasses.replace(gpu, min_count=min(gpu.min_count, fixed), max_count=fixed))
        elif fixed:
            columns.append(dataclasses.replace(gpu, min_count=max(gpu.min_count, fixed),
                                               max_count=None if gpu.max_count is None else max(gpu.max_count, fixed)))
        else:
            columns.append(gpu)
    solved_config = dataclasses.replace(bound.config, gpus=tuple(columns))
    # A quota never forces a replica that is up to go: a cap rises to what already runs under it.
    caps = [dataclasses.replace(cap, cap=max(cap.cap, cap.gpus({g.name: g.min_count for g in columns})))
            for cap in bound.caps]
    result = solve(solved_config, settings.formulation, settings.solver, compare=settings.compare, caps=caps,
                   max_replicas=settings.max_replicas)
    return make_plan(solved_config, result, deployment, offers={n: o.to_dict() for n, o in bound.offers.items()},
                     names=names, taken=request.taken)


def _check_local_block(block: Any, source: str) -> None:
    """`deployment.local` (the local launcher's block), checked with the rest: an object of LOCAL_KEYS."""
    if block is None:
        return
    if not isinstance(block, dict):
        raise ConfigError(source, "deployment.local", f"must be an object, got {type(block).__name__}")
    check_keys(block, LOCAL_KEYS, source, "deployment.local")
    speed = block.get("speed", 1)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not speed > 0:
        raise ConfigError(source, "deployment.local.speed", f"must be a number above 0, got {speed!r}")


def deployment_from_config(config: Config, template: str | None = None) -> Deployment:
    """The config's `deployment` block, validated (its keys, its values, and its `router` block's); `template` (from
    --template) overrides its template. Every command that loads a config calls it, so a misspelt key is an error
    before anything is solved."""
    raw = dict(config.deployment)
    check_keys(raw, DEPLOYMENT_KEYS, config.source, "deployment",
               hint="a custom template's own variables go under deployment.extra")
    parse_router_block(raw.get("router"), config.source)
    _check_local_block(raw.get("local"), config.source)

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(config.source, f"deployment.{key}", message)

    def string(key: str, default: str) -> str:
        value = raw.get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise fail(key, f"must be a non-empty string, got {value!r}")
        return value

    port = raw.get("port", DEFAULT_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise fail("port", f"must be an integer port in 1..65535, got {port!r}")
    envs = raw.get("envs", {})
    if not isinstance(envs, dict):
        raise fail("envs", f"must be an object of NAME: value, got {type(envs).__name__}")
    clean_envs: dict[str, str] = {}
    for key, value in envs.items():
        if is_note(key):
            continue
        if not ENV_NAME_RE.match(key):
            raise fail(f"envs.{key}", "is not a valid environment variable name")
        if isinstance(value, (dict, list)) or value is None:
            raise fail(f"envs.{key}", f"must be a string or number, got {value!r}")
        clean_envs[key] = str(value).lower() if isinstance(value, bool) else str(value)
    secrets = raw.get("secrets", list(DEFAULT_SECRETS))
    if not isinstance(secrets, list) or not all(isinstance(s, str) and ENV_NAME_RE.match(s) for s in secrets):
        raise fail("secrets", f"must be an array of environment variable names (e.g. [\"HF_TOKEN\"]), got {secrets!r}")
    clash = sorted(set(secrets) & set(clean_envs))
    if clash:
        raise fail(f"envs.{clash[0]}", "is also listed in deployment.secrets: a secret's value must come from your "
                                       "environment at launch time, never from the config file")
    extra_args = raw.get("extra_args", [])
    if not isinstance(extra_args, list) or not all(isinstance(a, (str, int, float)) for a in extra_args):
        raise fail("extra_args", f"must be an array of command-line arguments, got {extra_args!r}")
    for i, arg in enumerate(extra_args):
        if isinstance(arg, str) and LINE_BREAKS.search(arg):
            raise fail(f"extra_args[{i}]", f"must be one line (it goes into the task's run command), got {arg!r}")
    readiness = string("readiness_path", "/health")
    if not readiness.startswith("/"):
        raise fail("readiness_path", f"must start with '/', got {readiness!r}")
    chosen_template = template or string("template", "vllm")
    if chosen_template in INTERNAL_TEMPLATES:
        raise fail("template", f"{chosen_template!r} is melange-sky's router task, not a replica template; choose "
                               f"one of {', '.join(builtin_templates())} or give a file path")
    # Absent: a builtin template's pinned engine version; null: the latest; a string: that version.
    if "version" in raw:
        version = None if raw["version"] is None else string("version", "")
    else:
        version = DEFAULT_ENGINE_VERSIONS.get(chosen_template)
    if version is not None:
        if not VERSION_RE.match(version):
            raise fail("version", f"must be a package version such as \"0.6.3\" (it goes into the setup command), "
                                  f"got {version!r}")
    api_key_secret = raw.get("api_key_secret")
    if api_key_secret is True:
        api_key_secret = DEFAULT_API_KEY_SECRET
    elif api_key_secret is False:
        api_key_secret = None
    if api_key_secret is not None and not (isinstance(api_key_secret, str) and ENV_NAME_RE.match(api_key_secret)):
        raise fail("api_key_secret", f"must be true or an environment variable name such as "
                                     f"\"{DEFAULT_API_KEY_SECRET}\" (the secret holding the replicas' API key), got "
                                     f"{api_key_secret!r}")
    if api_key_secret in clean_envs:
        raise fail(f"envs.{api_key_secret}", "is deployment.api_key_secret: a secret's value must come from your "
                                             "environment at launch time, never from the config file")
    if api_key_secret and api_key_secret not in secrets:
        secrets = [*secrets, api_key_secret]  # passed like every secret: named in the task, value from the env
    engine = EngineSettings.from_deployment(raw, config.source)
    extra = raw.get("extra", {})
    if not isinstance(extra, dict):
        raise fail("extra", f"must be an object of a custom template's own variables, got {type(extra).__name__}")
    return Deployment(template=chosen_template, model=string("model", DEFAULT_MODEL),
                      port=port, envs=clean_envs, secrets=tuple(secrets), version=version,
                      extra_args=tuple(str(a) for a in extra_args), readiness_path=readiness,
                      extra={k: v for k, v in extra.items() if not is_note(k)},
                      api_key_secret=api_key_secret, engine=engine)


def make_plan(config: Config, result: SolveResult, deployment: Deployment | None = None,
              offers: dict[str, dict[str, Any]] | None = None, names: Mapping[str, Sequence[str]] | None = None,
              taken: Collection[str] = ()) -> Plan:
    """Render one task per replica of `result`. `config` must be the one solved (with offers bound, so each GPU
    entry carries its cloud, region and instance type). A re-plan passes `names`: per column, cluster names of
    existing replicas to reuse first; new replicas then get the next free `<fleet>-<gpu>-<i>` not in `taken`."""
    deployment = deployment or deployment_from_config(config)
    template = load_template(deployment.template)
    slugs = _unique({g.name: _column_slug(g) for g in config.gpus})
    files = _unique({g.name: _file_part(g.name) for g in config.gpus})
    fleet_slug = _slug(config.name, "fleet")
    used = set(taken) | {c for cs in (names or {}).values() for c in cs}
    replicas = []
    tp = deployment.engine.tensor_parallel_size
    for allocation in result.gpus:
        gpu = config.gpu(allocation.name)
        # the config's own check (core.config) saw the pins; this sees the offer each column was bound to
        problem = check_instance_gpus(config.source, gpu.field_path, gpu.entry or gpu.name,
                                      gpu.accelerators or f"{gpu.name}:1", gpu.instance_type, tp)
        if allocation.count and problem is not None:
            raise problem
        reuse = list((names or {}).get(gpu.name, ()))[: allocation.count]
        index = 0
        for position in range(allocation.count):
            if position < len(reuse):
                cluster = reuse[position]
            else:
                while (cluster := _cluster_name(fleet_slug, slugs[gpu.name], index)) in used:
                    index += 1
                used.add(cluster)
            replicas.append(_replica(config.name, gpu, cluster, position, files[gpu.name], deployment, template))
    return Plan(fleet=config.name, result=result, deployment=deployment, template=deployment.template,
                replicas=replicas, offers=dict(offers or {}), router=router_record(config))


def router_record(config: Config) -> dict[str, Any]:
    """What `melange-sky serve FLEET` reads from a stored plan besides the solve: the config's bucket edges (None
    where it has none: Mélange's defaults then), its workload histogram, and per solver column its tputs and GPU
    entry (a ledger row names the entry; `--per-offer` columns are offers of it)."""
    return {"input_buckets": None if config.input_buckets is None else list(config.input_buckets),
            "output_buckets": None if config.output_buckets is None else list(config.output_buckets),
            "workload_distribution": [list(row) for row in config.workload_distribution],
            "tputs": {g.name: [list(row) for row in g.tputs] for g in config.gpus},
            "entries": {g.name: g.entry or g.name for g in config.gpus}}


def cluster_name(fleet: str, gpu: str, index: int) -> str:
    """`<fleet>-<gpu>-<i>`, lower case and valid for SkyPilot, so `sky status` lists a fleet's clusters together."""
    return _cluster_name(_slug(fleet, "fleet"), _slug(gpu), index)


def write_plan(plan: Plan, out_dir: str | Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write the plan's files into `out_dir` (created if missing); never outside it. Returns the paths written."""
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise OutputError(f"{out_dir} is a file, not a directory: give a directory for the plan's files")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror}") from None
    # Every path is checked before the first is written: a refused name leaves no half-written plan behind.
    tasks = [(_inside(root, r.file_name), r.yaml) for r in plan.replicas] if "skypilot" in formats else []
    records = [(_inside(root, RESULT_FILE), plan.result.original_output()),
               (_inside(root, PLAN_FILE), plan.to_dict())] if "json" in formats else []
    for path, text in tasks:
        write_text(path, text)
    for path, data in records:
        write_json(path, data)
    return [path for path, _ in tasks] + [path for path, _ in records]


def stale_task_files(plan: Plan, out_dir: str | Path) -> list[str]:
    """`skypilot_*.yaml` files in `out_dir` that this plan did not write (left from a larger earlier plan): worth a
    warning, since launching one by hand would start a replica the plan does not want."""
    mine = {r.file_name for r in plan.replicas}
    return sorted(p.name for p in Path(out_dir).glob("skypilot_*.yaml") if p.name not in mine)


def _replica(fleet: str, gpu: GpuSpec, cluster: str, index: int, file_part: str, deployment: Deployment,
             template: Template) -> ReplicaPlan:
    accelerators = gpu.accelerators or f"{gpu.name}:1"
    file_name = f"skypilot_{file_part}_{index}.yaml"
    context = {
        "melange_version": __version__, "fleet": fleet, "cluster": cluster, "replica": index, "gpu": gpu.name,
        "entry": gpu.entry or gpu.name,
        "file_name": file_name, "cloud": gpu.cloud, "region": gpu.region, "instance_type": gpu.instance_type,
        "accelerators": accelerators, "accelerator": accelerators.split(":")[0], "gpus": pinned_gpus(accelerators) or 1,
        "use_spot": gpu.use_spot, "price": gpu.cost, "model": deployment.model, "port": deployment.port,
        "envs": deployment.envs, "secrets": list(deployment.secrets), "version": deployment.version,
        "extra_args": list(deployment.extra_args), "readiness_path": deployment.readiness_path,
        "api_key_secret": deployment.api_key_secret,
        "engine_args": deployment.engine.vllm_args(),
        "tensor_parallel_size": deployment.engine.tensor_parallel_size or 1,
        "deployment": {**deployment.extra, "model": deployment.model, "port": deployment.port},
    }
    text, task = render(template, context)
    # The task must launch the offer this replica was bound to and priced at, whatever the template renders.
    text, task = bind_resources(template, text, task, cluster, BoundOffer(
        accelerators=accelerators, cloud=gpu.cloud, region=gpu.region, instance_type=gpu.instance_type,
        use_spot=gpu.use_spot))
    return ReplicaPlan(cluster=cluster, gpu=gpu.name, entry=gpu.entry or gpu.name, index=index,
                       file_name=file_name, cloud=gpu.cloud,
                       region=gpu.region, instance_type=gpu.instance_type, accelerators=accelerators,
                       use_spot=gpu.use_spot, price=gpu.cost, task=task, yaml=text,
                       market=gpu.market or (Market.SPOT if gpu.use_spot else Market.ON_DEMAND))




def _slug(name: str, fallback: str = "gpu") -> str:
    """Lower case, runs of anything but letters and digits folded to '-', starting with a letter."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        return fallback
    return slug if slug[0].isalpha() else f"{fallback[0]}{slug}"


def _column_slug(gpu: GpuSpec) -> str:
    """The GPU part of a cluster name: the GPU's name; for a `--per-offer` column (one GPU at one offer) the
    entry's name and a short tag of the offer, "a100-80gb-azure-3f2a" rather than the whole
    "a100-80gb-azure-eastus-standard-nc24ads-a100-v4" (the ledger keeps the full offer)."""
    if gpu.entry is None or gpu.entry == gpu.name:
        return _slug(gpu.name)
    offer = offer_key(gpu.cloud, gpu.region, gpu.instance_type, gpu.use_spot)
    return f"{_slug(gpu.entry)}-{_slug(gpu.cloud or 'offer')}-{hashlib.sha1(offer.encode()).hexdigest()[:4]}"


def _file_part(name: str) -> str:
    """The GPU part of `skypilot_<GPU>_<i>.yaml`: the original name where it is a safe file name component
    (`A100-80GB`), else with unsafe characters replaced (`/`, spaces, `..` can never leave the directory)."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".")
    return part.replace("..", "_") or "gpu"


def _unique(parts: dict[str, str]) -> dict[str, str]:
    """Disambiguate names that sanitise to the same text ("A100/80" and "A100_80") with a short hash."""
    counts: dict[str, int] = {}
    for part in parts.values():
        counts[part.lower()] = counts.get(part.lower(), 0) + 1
    return {name: part if counts[part.lower()] == 1 else f"{part}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"
            for name, part in parts.items()}


def _cluster_name(fleet_slug: str, gpu_slug: str, index: int) -> str:
    name = f"{fleet_slug}-{gpu_slug}-{index}"
    if len(name) > MAX_CLUSTER_NAME:  # keep it unique: a hash of the full name replaces the cut tail
        digest = hashlib.sha1(name.encode()).hexdigest()[:6]
        tail = f"-{digest}-{index}"
        name = name[: MAX_CLUSTER_NAME - len(tail)].rstrip("-") + tail
    assert CLUSTER_NAME_RE.match(name), name
    return name


def _inside(root: Path, file_name: str) -> Path:
    path = root / file_name
    if path.resolve().parent != root.resolve():
        raise OutputError(f"refusing to write {file_name!r} outside {root}")
    return path
