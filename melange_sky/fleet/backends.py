"""The launch backend interface: a small protocol the fleet drives, its records, and how a backend is chosen by name.

The fleet never talks to SkyPilot directly; it talks to a `Backend`. The real one is
`melange_sky.fleet.skypilot.SkyPilotBackend` (the only module that imports `sky`); tests use
`tests/fake_backend.FakeBackend`; anyone can plug in another launcher through the `melange_sky.backends` entry-point
group or a `module:Class` path. This module never imports `sky`, so choosing or listing backends is cheap.
"""
from __future__ import annotations

import enum
import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from melange_sky.errors import UnknownBackend

ENTRY_POINT_GROUP = "melange_sky.backends"
ENV_VAR = "MELANGE_SKY_BACKEND"
DEFAULT_BACKEND = "skypilot"
# Built in, so a source checkout that was never `pip install`ed still finds the default backend.
BUILTIN_BACKENDS = {"skypilot": "melange_sky.fleet.skypilot:SkyPilotBackend"}

__all__ = [
    "Backend", "ClusterInfo", "ClusterStatus", "DEFAULT_BACKEND", "ENTRY_POINT_GROUP", "ENV_VAR", "LaunchRequest",
    "Validation", "ValidationLevel", "available_backends", "load_backend", "needs_model_secrets",
]


class ClusterStatus(str, enum.Enum):  # noqa: UP042 - plugin interface: members' str() kept
    """A cluster's live state as the launcher sees it. GONE: the launcher does not know the cluster (never launched,
    torn down, or removed outside melange-sky) — an answer, not an error."""

    UP = "up"
    INIT = "init"          # provisioning, or up but unhealthy (SkyPilot's INIT)
    STOPPED = "stopped"    # stopped (e.g. autostop); billing for disks only
    GONE = "gone"


@dataclass(frozen=True)
class ClusterInfo:
    """What a backend knows about one cluster. `endpoint` is "host:port" for the requested port when known."""

    cluster: str
    status: ClusterStatus
    endpoint: str | None = None
    head_ip: str | None = None
    cloud: str | None = None
    region: str | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "status": self.status.value, "endpoint": self.endpoint,
                "head_ip": self.head_ip, "cloud": self.cloud, "region": self.region, "message": self.message}


@dataclass(frozen=True)
class LaunchRequest:
    """One replica to launch as the named cluster.

    `task` is a rendered SkyPilot task config (the YAML as a dict). `secrets` maps each secret name to its value from
    the environment; backends pass them to the launcher in memory and never write them to disk (and the field is kept
    out of repr so it never lands in a log). `port`, when given, is the serving port whose endpoint `launch` reports.
    """

    cluster: str
    task: Mapping[str, Any]
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    retry_until_up: bool = False
    idle_minutes_to_autostop: int | None = None
    down: bool = False
    port: int | None = None


class ValidationLevel(str, enum.Enum):  # noqa: UP042 - plugin interface: members' str() kept
    """How thoroughly a task was checked: FULL (schema, resources, feasibility and price against the catalog) or
    SCHEMA (the task JSON schema only, because the catalog was not available offline)."""

    FULL = "full"
    SCHEMA = "schema"


@dataclass(frozen=True)
class Validation:
    """The outcome of `Backend.validate` for a task that passed; `detail` says what was checked (or skipped, why)."""

    level: ValidationLevel
    detail: str

    def __str__(self) -> str:
        return f"{self.level.value} validation: {self.detail}"


@runtime_checkable
class Backend(Protocol):
    """What the fleet needs from a launcher. Every method is thread-safe: the fleet calls them from worker threads.

    Optional: a class attribute `needs_model_secrets = False` says its replicas fetch no model (the local launcher
    runs emulators), so the deployment's secrets other than the replicas' API key are not required to launch
    (`needs_model_secrets(backend)`; SkyPilot and any launcher without it need them all).

    Errors: `launch` raises `errors.CapacityError` when the offer has no capacity (the fleet re-solves without it),
    `errors.LaunchCancelled` after `cancel`, and `errors.LaunchError` for any other failure, each with a one-line
    reason. `validate` raises `errors.InvalidTask`. Other methods raise `errors.BackendError` when the launcher
    cannot answer.
    """

    name: str

    def launch(self, request: LaunchRequest) -> ClusterInfo:
        """Block until the cluster is up and the task submitted; return its info (status UP)."""
        ...

    def status(self, clusters: Sequence[str], refresh: bool = False) -> dict[str, ClusterInfo]:
        """Status of each named cluster (all of them are keys); unknown clusters come back GONE. `refresh` asks the
        clouds for the live state instead of the launcher's cached view."""
        ...

    def endpoint(self, cluster: str, port: int) -> str | None:
        """"host:port" serving `port` on the cluster, or None if the cluster is not up or does not expose it."""
        ...

    def down(self, cluster: str, purge: bool = False) -> bool:
        """Tear the cluster down. True if it was torn down, False if it was already gone (never an error)."""
        ...

    def validate(self, task: Mapping[str, Any], secrets: Mapping[str, str] | None = None) -> Validation:
        """Check a rendered task offline without launching anything."""
        ...

    def cancel(self, clusters: Sequence[str] | None = None) -> list[str]:
        """Cancel in-flight launches (of these clusters, or all) started by this backend object, e.g. on Ctrl-C; their
        `launch` calls then raise `LaunchCancelled`. Returns the clusters whose launch was cancelled."""
        ...


def needs_model_secrets(backend: object | None) -> bool:
    """Whether `backend`'s replicas need the model's secrets (HF_TOKEN) to launch; True unless it says otherwise
    (or for no backend: the check before one is chosen assumes a real one)."""
    return bool(getattr(backend, "needs_model_secrets", True))


def _entry_points() -> dict[str, Any]:
    from importlib import metadata  # noqa: PLC0415 - ~60 ms, kept off `--help`: only on a lookup by name

    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    """Names `load_backend` accepts (besides any `module:Class` path), sorted."""
    return sorted(set(BUILTIN_BACKENDS) | set(_entry_points()))


def _import_path(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UnknownBackend(f"backend {what!r}: expected a name or a `module:Class` path")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownBackend(f"backend {what!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") \
            from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise UnknownBackend(f"backend {what!r}: module {module_name!r} has no {attr!r}") from exc
    return obj


def load_backend(name: str | None = None) -> Backend:
    """Instantiate the backend called `name` (an entry-point name or a `module:Class` path); None means the
    `MELANGE_SKY_BACKEND` environment variable, else "skypilot". The class is called with no arguments."""
    requested = name or os.environ.get(ENV_VAR) or DEFAULT_BACKEND
    if ":" in requested:
        factory = _import_path(requested, requested)
    else:
        eps = _entry_points()
        if requested in eps:
            try:
                factory = eps[requested].load()
            except Exception as exc:  # a broken plugin: say which one, in one line
                raise UnknownBackend(f"backend {requested!r} (entry point {eps[requested].value}) failed to load: "
                                   f"{type(exc).__name__}: {exc}") from exc
        elif requested in BUILTIN_BACKENDS:
            factory = _import_path(BUILTIN_BACKENDS[requested], requested)
        else:
            raise UnknownBackend(f"unknown backend {requested!r}; available: {', '.join(available_backends())} "
                               f"(or a module:Class path; set with --backend or {ENV_VAR})")
    try:
        backend = factory()
    except Exception as exc:
        raise UnknownBackend(f"backend {requested!r} could not be created: {type(exc).__name__}: {exc}") from exc
    if not isinstance(backend, Backend):
        missing = [m for m in ("launch", "status", "endpoint", "down", "validate", "cancel", "name")
                   if not hasattr(backend, m)]
        raise UnknownBackend(f"backend {requested!r} does not implement the Backend interface (missing: "
                           f"{', '.join(missing)})")
    return backend
