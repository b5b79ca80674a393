"""The fleet's router as one more SkyPilot task: a small CPU instance running `melange-sky serve --pushed`.

The router is the fleet's one public endpoint; `up` launches it next to the replicas and pushes it the routes
(`PUT /admin/routes`). This module plans it: from the config's `deployment.router` block (`deploy.router_config`:
cloud, region, instance_type or cpus, port, tls), the CPU offer it runs on (by default the cheapest in the cloud
that hosts most replicas, in the region that hosts most of them there), and its task rendered from the builtin
`router.j2` template.

The router's host gets melange-sky without any package index: the installed package's own source directory goes to
the host through `file_mounts` and runs from `PYTHONPATH`; `setup` installs only what `serve` imports
(`ROUTER_REQUIREMENTS`, the ranges tested here) into a venv. No SkyPilot, PuLP, HiGHS or Jinja on the router.

The task names its secrets (`MELANGE_SKY_ADMIN_TOKEN`, and `MELANGE_SKY_API_KEY` when clients need a key); their
values come from the launcher's environment at launch time and are never in the rendered YAML. With
`deployment.router.tls`, the certificate and key are file mounts from the user's paths (`TLS_CERT`, `TLS_KEY`)
and `serve` gets `--ssl-certfile/--ssl-keyfile`: the task holds their paths, never their contents.

With a hosted controller (`HostedController`, `up --controller hosted`), the same task also runs the fleet's
controller (`melange-sky watch FLEET --hosted`) beside `serve`, on the same host: `setup` installs what the
controller imports too (the solver, the templates, SkyPilot with the replicas' clouds), its state lives in its own
`MELANGE_SKY_HOME` on the host, it reaches the router on the host's loopback, and it drives the launcher the user's
machine used (SkyPilot through the user's SkyPilot API server; the local launcher through its state directory).
The replicas' secrets and the API server's token are secrets of the task: names here, values at launch.

A TLS router with a hosted controller: the controller calls the router's one listener over https on 127.0.0.1,
verified against the certificate file mounted on the host (`--router-cafile`; pinned as every melange-sky client of
the router, `core.tls`: no host name check, so a certificate that names only the public DNS name is fine). No second,
plain-HTTP listener: the admin token never crosses a socket in clear text, even the loopback, and a process that
took the router's port while it restarted cannot present the certificate (the key is 0600 on the host), so the
controller's TLS handshake fails before it sends the token (`docs/fleet.md`, "The controller runs with the fleet").
"""
from __future__ import annotations

import difflib
import hashlib
import math
import re
import shlex
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import melange_sky
from melange_sky import __version__
from melange_sky.core.config import Config
from melange_sky.deploy.catalog import Catalog, _float, _rows, default_catalog, offer_key
from melange_sky.deploy.membership import ADMIN_TOKEN_ENV
from melange_sky.deploy.plan import CLUSTER_NAME_RE, ENV_NAME_RE, MAX_CLUSTER_NAME, _slug
from melange_sky.deploy.render import builtin_template_dir, load_template, render
from melange_sky.deploy.router_config import RouterSpec, check_tls_files, router_spec
from melange_sky.errors import ConfigError

ROUTER_TEMPLATE = "router"
#: The secret `serve --pushed` reads the admin token from (PUT /admin/routes), and the one it reads clients' key from.
ADMIN_TOKEN_SECRET = ADMIN_TOKEN_ENV
CLIENT_KEY_SECRET = "MELANGE_SKY_API_KEY"
#: What `python -m melange_sky serve` imports, in the ranges tested with this release (the repository's venv):
#: nothing else of melange-sky's dependencies is loaded by it (tests/test_router_task.py checks with an import blocker).
ROUTER_REQUIREMENTS = (
    "aiohttp>=3.14,<3.15",
    "click>=8.1,<8.2",
    "orjson>=3.13,<3.14",
    "prometheus-client>=0.26,<0.27",
    "uvloop>=0.23,<0.24",
)
#: What the hosted controller imports beyond the router (melange-sky's own dependencies: setup.cfg's
#: install_requires, checked by tests/test_controller_hosted.py); SkyPilot gets the replicas' clouds as extras.
CONTROLLER_REQUIREMENTS = (
    "pulp>=3.3,<3.4",
    "highspy>=1.16,<1.17",
    "jinja2>=3.1,<4",
    "pyyaml>=6,<7",
)
SKYPILOT_REQUIREMENT = "skypilot{extras}>=0.14.1,<0.15"
#: Seconds before the router's task starts a hosted controller again after it exited on an error.
CONTROLLER_RESTART_S = 10
#: Where the hosted controller keeps its ledger on the router's host (its MELANGE_SKY_HOME), under REMOTE_DIR.
CONTROLLER_HOME = "home"
#: The Python the router's venv gets (uv fetches it when the host has none): the version melange-sky is tested on.
ROUTER_PYTHON = "3.11"
#: Where the router lives on its host, under the host user's HOME: the shipped source in `src/`, its venv in `venv/`.
REMOTE_DIR = "melange-sky-router"
#: Where a TLS router's certificate and key land on its host, under REMOTE_DIR (file mounts from the user's paths).
TLS_CERT, TLS_KEY = "tls/cert.pem", "tls/key.pem"
TLS_CERT_MOUNT = f"~/{REMOTE_DIR}/{TLS_CERT}"
#: Without a pin: at least this many vCPUs and GiB of memory (the router itself uses one core; SkyPilot's own
#: agent runs beside it).
DEFAULT_MIN_CPUS = 2
DEFAULT_MIN_MEMORY_GIB = 4.0
#: GCP machine families that come with GPUs attached although their catalog rows name none (A2, A3, G2, ...):
#: never CPU offers (SkyPilot prices them with their GPUs).
_GCP_GPU_FAMILIES = re.compile(r"^(a\d+|g[2-9])-")
#: Instance types a default choice skips: burstable or shared-core (CPU credits run out under steady load) and Arm
#: (where the catalog has no Arch column). A pinned instance_type is taken as given.
_NOT_BY_DEFAULT = {
    "aws": re.compile(r"^(t\d[a-z]*|a1)\."),
    "gcp": re.compile(r"^(e2-(micro|small|medium)|f1-|g1-|t2a-|c4a-)"),
    "azure": re.compile(r"^Standard_(B|[A-Z]+\d+[a-z]*p[a-z]*_)"),
}


@dataclass(frozen=True)
class CpuOffer:
    """A CPU instance type in a region, with its on-demand $/h (the cheapest of the region's zones)."""

    cloud: str
    region: str
    instance_type: str
    vcpus: float
    memory_gib: float
    price: float
    source: str  # "bundled" or "skypilot"

    @property
    def key(self) -> str:
        return offer_key(self.cloud, self.region, self.instance_type)


@dataclass(frozen=True)
class RouterPlan:
    """The router of one fleet: its cluster, the offer it runs on and why, and its rendered task."""

    fleet: str
    cluster: str
    cloud: str
    region: str
    instance_type: str
    price: float  # $/h
    port: int
    reason: str  # why this offer, for the preview ("near the replicas: 3 of 4 in aws us-east-1")
    secrets: tuple[str, ...]  # names only; values come from the environment at launch
    task: dict[str, Any] = field(repr=False)
    yaml: str = field(repr=False)

    @property
    def offer(self) -> str:
        return offer_key(self.cloud, self.region, self.instance_type)

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "cluster": self.cluster, "cloud": self.cloud, "region": self.region,
                "instance_type": self.instance_type, "offer": self.offer, "price": self.price, "port": self.port,
                "reason": self.reason, "secrets": list(self.secrets), "task": self.task}


@dataclass(frozen=True)
class HostedController:
    """The fleet's controller, run by the router's task beside `serve` (`up --controller hosted`).

    `backend`: the launcher it drives (a name `--backend` takes); `launcher_dir`: the local launcher's state
    directory, shared with the user's machine (as a SkyPilot API server would be); `envs`: plain settings it needs
    (the SkyPilot API server's endpoint); `secrets`: names of what it launches with (the replicas' secrets, the API
    server's token), values given at launch, never rendered; `watch_args`: `watch` options (`--autoscale`, ...)."""

    interval: float = 60.0
    backend: str = "skypilot"
    launcher_dir: str | None = None
    envs: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    watch_args: tuple[str, ...] = ()
    clouds: tuple[str, ...] = ()  # SkyPilot's extras to install on the host (the replicas' clouds)

    def requirements(self) -> list[str]:
        if self.backend != "skypilot":
            return list(CONTROLLER_REQUIREMENTS)
        extras = f"[{','.join(sorted(set(self.clouds)))}]" if self.clouds else ""
        return [*CONTROLLER_REQUIREMENTS, SKYPILOT_REQUIREMENT.format(extras=extras)]

    def command(self, fleet: str) -> str:
        """The `watch` line the host runs (after `ROUTER_URL` is known): every word shell-quoted."""
        words = ["python", "-m", "melange_sky", "watch", fleet, "--hosted", "--interval", f"{self.interval:g}",
                 "--backend", self.backend, *self.watch_args]
        if self.launcher_dir is not None:
            words += ["--launcher-dir", self.launcher_dir]
        return " ".join(shlex.quote(w) for w in words) + ' --router-url "$ROUTER_URL"'


def _cpus_fit(cpus: str | None, vcpus: float) -> bool:
    if cpus is None:
        return vcpus >= DEFAULT_MIN_CPUS
    wanted = float(cpus.rstrip("+"))
    return vcpus >= wanted if cpus.endswith("+") else math.isclose(vcpus, wanted)


# ---- CPU offers ---------------------------------------------------------------------------------------------------

def cpu_offers(catalog: Catalog, clouds: Iterable[str] | None = None) -> list[CpuOffer]:
    """Every instance type without an accelerator in `clouds` (default: all), from the same `vms.csv` files the GPU
    offers come from; one offer per (region, instance type), cheapest first."""
    offers = [o for cloud in catalog.check_clouds(clouds) for o in _read_cpu_offers(*catalog.path(cloud), cloud)]
    return sorted(offers, key=lambda o: (o.price, o.cloud, o.region, o.instance_type))


def _read_cpu_offers(path: Path, source: str, cloud: str) -> tuple[CpuOffer, ...]:
    try:
        stat = path.stat()
    except OSError:
        return ()
    return _read_cpu_file(path, source, cloud, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _read_cpu_file(path: Path, source: str, cloud: str, _mtime_ns: int, _size: int) -> tuple[CpuOffer, ...]:
    """A `vms.csv`'s CPU offers, read once per version of the file (choosing, then explaining a failure, reads
    the same files)."""
    best: dict[tuple[str, str], CpuOffer] = {}
    for row in _rows(path):
        if (row.get("AcceleratorName") or "").strip() or (row.get("Arch") or "").strip() not in ("", "x86_64"):
            continue
        instance, region = (row.get("InstanceType") or "").strip(), (row.get("Region") or "").strip()
        vcpus, memory, price = (_float(row.get(k)) for k in ("vCPUs", "MemoryGiB", "Price"))
        if not instance or not region or vcpus is None or memory is None or price is None or price <= 0:
            continue
        if cloud == "gcp" and _GCP_GPU_FAMILIES.match(instance):
            continue
        old = best.get((region, instance))
        if old is None or price < old.price:
            best[(region, instance)] = CpuOffer(cloud, region, instance, vcpus, memory, price, source)
    return tuple(best.values())


# ---- choosing the offer -------------------------------------------------------------------------------------------

#: Where one replica runs: its cloud, or (cloud, region).
Placement = str | tuple[str | None, str | None]


def choose_router_offer(spec: RouterSpec, replicas: Iterable[Placement], catalog: Catalog,
                        source: str = "config", clouds: Iterable[str] | None = None) -> tuple[CpuOffer, str]:
    """The CPU offer the router runs on, and why.

    Pinned fields narrow the choice. Unpinned, the router goes to the cloud hosting most replicas (a tie: the one
    with the cheapest offer), in that cloud's region hosting most of them when it has an offer there (no
    cross-region hop on every request), else the cloud's cheapest; clouds without a CPU offer are passed over, and
    when no replica's cloud has one, the cheapest in `clouds` (the config's `clouds`; default: every known cloud)."""
    path = "deployment.router"
    places = [(p, None) if isinstance(p, str) else p for p in replicas]
    counts = Counter(c for c, _ in places if c)
    regions = Counter((c, r) for c, r in places if c and r)
    allowed = [spec.cloud] if spec.cloud else list(catalog.check_clouds(clouds))

    def fitting(where: list[str]) -> list[CpuOffer]:
        return [o for o in cpu_offers(catalog, where)
                if (spec.region is None or o.region == spec.region)
                and (o.instance_type == spec.instance_type if spec.instance_type else _default_fit(spec, o))]

    # The replicas' clouds first: with SkyPilot's downloaded catalogs, each cloud is a file of megabytes.
    near = [c for c in allowed if c in counts]
    offers = (fitting(near) if near else []) or fitting(allowed)
    if not offers:
        raise _no_offer(spec, catalog, allowed, source, path)
    by_cloud: dict[str, list[CpuOffer]] = {}
    for offer in offers:  # cheapest first
        by_cloud.setdefault(offer.cloud, []).append(offer)
    # Most replicas first; among equals, the cheapest offer (clouds without replicas come last).
    cloud = min(by_cloud, key=lambda c: (-counts.get(c, 0), by_cloud[c][0].price, c))
    local = [o for o in by_cloud[cloud] if regions.get((cloud, o.region))]
    if local:
        most = max(regions[(cloud, o.region)] for o in local)
        offer = next(o for o in local if regions[(cloud, o.region)] == most)  # a tie: the cheaper region
        reason = f"near the replicas: {most} of {len(places)} in {cloud} {offer.region}"
    elif counts.get(cloud):
        offer = by_cloud[cloud][0]
        reason = f"near the replicas: {counts[cloud]} of {len(places)} in {cloud}"
    else:
        offer = by_cloud[cloud][0]
        reason = "the cheapest CPU offer"
    if spec.instance_type and spec.region:
        reason = "pinned by deployment.router"
    elif spec.cloud or spec.region or spec.instance_type or spec.cpus:
        reason += " within deployment.router's pins"
    return offer, reason


def _default_fit(spec: RouterSpec, offer: CpuOffer) -> bool:
    skip = _NOT_BY_DEFAULT.get(offer.cloud)
    if skip is not None and skip.match(offer.instance_type):
        return False
    return _cpus_fit(spec.cpus, offer.vcpus) and offer.memory_gib >= DEFAULT_MIN_MEMORY_GIB


def _no_offer(spec: RouterSpec, catalog: Catalog, allowed: list[str], source: str, path: str) -> ConfigError:
    files = ", ".join(str(catalog.path(c)[0]) for c in allowed)
    if spec.instance_type:
        everywhere = [o for o in cpu_offers(catalog) if o.instance_type == spec.instance_type]
        if everywhere:
            where = ", ".join(sorted({f"{o.cloud}:{o.region}" for o in everywhere}))
            return ConfigError(source, f"{path}.instance_type", f"{spec.instance_type!r} is not offered with these "
                                                                f"pins; it is in {where}")
        known = sorted({o.instance_type for o in cpu_offers(catalog, allowed)})
        close = difflib.get_close_matches(spec.instance_type, known, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return ConfigError(source, f"{path}.instance_type", f"CPU instance type {spec.instance_type!r} is unknown "
                                                            f"to the catalog ({files}){hint}")
    if spec.region:
        regions = sorted({o.region for o in cpu_offers(catalog, allowed)})
        close = difflib.get_close_matches(spec.region, regions, n=2, cutoff=0.6)
        hint = (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close
                else f"; regions with one: {', '.join(regions)}" if regions else "")
        return ConfigError(source, f"{path}.region", f"no CPU offer in {spec.region!r} ({files}){hint}")
    if spec.cpus:
        return ConfigError(source, f"{path}.cpus", f"no CPU offer with {spec.cpus} vCPUs in {', '.join(allowed)} "
                                                   f"({files})")
    return ConfigError(source, path, f"no CPU offer in {', '.join(allowed)} ({files}); pin one with "
                                     f"deployment.router.cloud/region/instance_type")


# ---- the task -----------------------------------------------------------------------------------------------------

def router_cluster_name(fleet: str) -> str:
    """`<fleet>-router`, lower case and valid for SkyPilot, beside the replicas' `<fleet>-<gpu>-<i>`."""
    name = f"{_slug(fleet, 'fleet')}-router"
    if len(name) > MAX_CLUSTER_NAME:  # keep it unique: a hash of the full name replaces the cut tail
        tail = f"-{hashlib.sha1(name.encode()).hexdigest()[:6]}-router"
        name = name[: MAX_CLUSTER_NAME - len(tail)].rstrip("-") + tail
    assert CLUSTER_NAME_RE.match(name), name
    return name


def router_certfile(task: Mapping[str, Any] | None) -> str | None:
    """The certificate (a path on this machine) a router task mounts to serve TLS, which its clients (membership
    pushes, the controller) verify it against; None for a plain-HTTP router or another task. Read from the task
    launched, so it is the certificate the running router has."""
    mounts = (task or {}).get("file_mounts")
    certfile = mounts.get(TLS_CERT_MOUNT) if isinstance(mounts, Mapping) else None
    return certfile if isinstance(certfile, str) else None


def with_certfile(task: Mapping[str, Any] | None, certfile: str) -> dict[str, Any] | None:
    """`task` as the router's own host sees it: the certificate it mounts is `certfile` there (the file `serve`
    reads), so `router_certfile` of the result names a file on that host. The hosted controller keeps the router's
    row so: every call it makes to the router (pushes, reads of the traffic) is then pinned to the certificate the
    router serves. A task without TLS is returned unchanged."""
    if task is None or router_certfile(task) is None:
        return None if task is None else dict(task)
    return {**task, "file_mounts": {**task["file_mounts"], TLS_CERT_MOUNT: certfile}}


def package_source_dir() -> Path:
    """The directory of the melange_sky package this process runs: what the router's host gets."""
    return Path(melange_sky.__file__).resolve().parent


def build_router_plan(config: Config, replicas: Iterable[Placement], *, api_key: bool = False,
                      upstream_key_secret: str | None = None, catalog: Catalog | None = None,
                      controller: HostedController | None = None) -> RouterPlan:
    """Plan the fleet's router: the `deployment.router` block, the offer, the rendered task.

    `replicas`: where the plan's replicas run (clouds, or (cloud, region) pairs). `api_key`: clients must send the
    key in secret MELANGE_SKY_API_KEY (else the router serves anyone who reaches its port: `--no-auth`).
    `upstream_key_secret`: the secret holding the replicas' key (`deployment.api_key_secret`) when the router must
    send one; it defaults to the client key in `serve`, so it matters only when it is another secret.
    `controller`: the task runs the fleet's hosted controller too."""
    spec = router_spec(config)
    if spec.tls is not None:
        check_tls_files(spec.tls, config.source)
    if upstream_key_secret is not None and not ENV_NAME_RE.match(upstream_key_secret):
        raise ValueError(f"upstream_key_secret must be an environment variable name, got {upstream_key_secret!r}")
    offer, reason = choose_router_offer(spec, replicas, catalog or default_catalog(), config.source, config.clouds)
    cluster = router_cluster_name(config.name)
    secrets = [ADMIN_TOKEN_SECRET]
    if api_key:
        secrets.append(CLIENT_KEY_SECRET)
    if upstream_key_secret and upstream_key_secret not in secrets:
        secrets.append(upstream_key_secret)
    if controller is not None:
        for name in controller.secrets:
            if not ENV_NAME_RE.match(name):
                raise ValueError(f"a controller secret must be an environment variable name, got {name!r}")
            if name not in secrets:
                secrets.append(name)
    context = {
        "melange_version": __version__, "fleet": config.name, "cluster": cluster, "cloud": offer.cloud,
        "region": offer.region, "instance_type": offer.instance_type, "cpus": spec.cpus, "price": offer.price,
        "port": spec.port, "use_spot": False, "secrets": secrets, "api_key": api_key,
        "admin_token_secret": ADMIN_TOKEN_SECRET, "client_key_secret": CLIENT_KEY_SECRET,
        "upstream_key_secret": upstream_key_secret, "source_dir": str(package_source_dir()),
        "remote_dir": REMOTE_DIR, "python_version": ROUTER_PYTHON,
        "requirements": [*ROUTER_REQUIREMENTS, *(controller.requirements() if controller is not None else [])],
        "controller": None if controller is None else {"command": controller.command(config.name),
                                                       "home": CONTROLLER_HOME, "envs": dict(controller.envs),
                                                       "templates": str(builtin_template_dir()),
                                                       "restart_s": CONTROLLER_RESTART_S},
        "tls": None if spec.tls is None else {"certfile": spec.tls.certfile, "keyfile": spec.tls.keyfile,
                                              "cert": TLS_CERT, "key": TLS_KEY},
    }
    text, task = render(load_template(ROUTER_TEMPLATE), context)
    return RouterPlan(fleet=config.name, cluster=cluster, cloud=offer.cloud, region=offer.region,
                      instance_type=offer.instance_type, price=offer.price, port=spec.port, reason=reason,
                      secrets=tuple(secrets), task=task, yaml=text)
