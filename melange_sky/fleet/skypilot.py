"""`SkyPilotBackend`: the `Backend` interface over SkyPilot's client SDK. The only module of melange-sky that imports
`sky`, and only inside methods, so `melange-sky --help` and `solve` never pay its ~3 s import.

SkyPilot's SDK is client-server: `sky.launch/status/down/endpoints` return a request id and `sky.get` waits for the
local API server's answer (the first call starts that server, ≈ 6-8 s; the first status answer took ≈ 15 s here).
SkyPilot's exceptions are mapped to ours with their message condensed to one line; nothing here prints a traceback.

SkyPilot also prints its own log lines (with colour codes) to the stdout it saw at import: "Failed to fetch common
catalog ...", "Starting SkyPilot API server" and its spinner. None of that is melange-sky's output: every call into
SkyPilot goes through `_sky_call`, which re-logs SkyPilot's records, colour codes removed, to the logger
`melange_sky.fleet.skypilot.sky` (shown only where the application shows melange-sky's logs: the CLI's --debug) and
keeps SkyPilot's spinners and prints quiet unless that logger is enabled for DEBUG.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from melange_sky.deploy.catalog import BUNDLED_DIR, skypilot_schema_version
from melange_sky.errors import BackendError, CapacityError, InvalidTask, LaunchCancelled, LaunchError
from melange_sky.fleet.backends import ClusterInfo, ClusterStatus, LaunchRequest, Validation, ValidationLevel

T = TypeVar("T")
P = ParamSpec("P")

_LOG = logging.getLogger(__name__)
_LOG.addHandler(logging.NullHandler())  # a library's records show only where the application asks (the CLI's --debug)
#: SkyPilot's own log records, re-logged here without colour codes (see the module's docstring).
SKY_LOG = _LOG.getChild("sky")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_REASON_CHARS = 400
# Set in the bundled-catalog validation child's environment when SkyPilot's lines are wanted (--debug).
_CHILD_DEBUG = "MELANGE_SKY_VALIDATE_DEBUG"
# How long `validate` waits for SkyPilot to fetch a missing catalog before falling back to schema-only checks.
CATALOG_FETCH_TIMEOUT_S = 20.0

_SKY_STATUS = {"UP": ClusterStatus.UP, "INIT": ClusterStatus.INIT, "STOPPED": ClusterStatus.STOPPED,
               "AUTOSTOPPING": ClusterStatus.UP}  # still serving until it has stopped


def one_line(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """SkyPilot's message without colour codes, line breaks or runs of blanks, cut to `limit` characters."""
    flat = " ".join(_ANSI.sub("", str(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _sky() -> Any:
    if "sky" not in sys.modules:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        import sky  # noqa: PLC0415 - deliberately lazy: importing sky costs ~3 s

        # Importing sky runs logging.basicConfig(level=INFO) (sky/catalog/data_fetchers/fetch_vsphere.py): a root
        # handler on stderr that would print every library's INFO lines. Configuring the root logger is the
        # application's call, so undo it.
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    import sky  # noqa: PLC0415 - loaded above or before

    _route_sky_logs()
    return sky


class _ToMelangeLog(logging.Handler):
    """Re-logs a SkyPilot record to `SKY_LOG`, colour codes removed, at its own level."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = _ANSI.sub("", record.getMessage()).strip()
        except Exception:  # noqa: BLE001 - a record that cannot format itself must not fail a launch
            return
        if message:
            SKY_LOG.log(record.levelno, "%s", message)


def _route_sky_logs() -> None:
    """Take SkyPilot's handlers (a stream handler on the stdout it saw at import, on `sky` and on any `sky.*` logger
    that does not propagate) off its loggers, and send their records to `SKY_LOG` instead."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or not (name == "sky" or name.startswith("sky.")):
            continue
        for handler in list(logger.handlers):
            if not isinstance(handler, _ToMelangeLog):
                logger.removeHandler(handler)
        if (name == "sky" or not logger.propagate) and not any(isinstance(h, _ToMelangeLog) for h in logger.handlers):
            logger.addHandler(_ToMelangeLog())


@contextlib.contextmanager
def _sky_quiet() -> Iterator[Any]:
    """`sky`, with its log records routed to `SKY_LOG` and, unless that logger shows DEBUG, its spinners (drawn only
    from the main thread, e.g. "Starting SkyPilot API server") and prints silenced."""
    sky = _sky()
    if SKY_LOG.isEnabledFor(logging.DEBUG) or threading.current_thread() is not threading.main_thread():
        yield sky  # worker threads draw no spinner; SkyPilot's silent() swaps process globals, not safe across them
        return
    from sky import sky_logging  # noqa: PLC0415 - sky is loaded by now

    with sky_logging.silent():
        yield sky


def _sky_call(method: Callable[P, T]) -> Callable[P, T]:
    """Run a backend method with SkyPilot's own output kept out of melange-sky's (see `_sky_quiet`), and the
    process's traceback limit as it was: SkyPilot's `ux_utils.print_exception_no_traceback` sets
    `sys.tracebacklimit = 0` and, when the error it hides leaves its block, never puts it back — after that every
    traceback in the process (`--debug`'s, a router's internal-error log) would be one line."""
    @functools.wraps(method)
    def quiet(*args: P.args, **kwargs: P.kwargs) -> T:
        had_limit, limit = hasattr(sys, "tracebacklimit"), getattr(sys, "tracebacklimit", None)
        try:
            with _sky_quiet():
                return method(*args, **kwargs)
        finally:
            if had_limit:
                sys.tracebacklimit = limit
            elif hasattr(sys, "tracebacklimit"):
                del sys.tracebacklimit

    return quiet


def _is_network_error(exc: BaseException) -> bool:
    """True for the `requests` errors SkyPilot lets through when it cannot fetch a catalog (offline)."""
    try:
        import requests  # noqa: PLC0415 - a SkyPilot dependency, only needed once sky is loaded
    except ImportError:  # pragma: no cover - requests always comes with skypilot
        return False
    return isinstance(exc, requests.exceptions.RequestException)


class SkyPilotBackend:
    """Launches each replica as one SkyPilot cluster through the local (or configured) SkyPilot API server."""

    name = "skypilot"

    def __init__(self) -> None:
        self._catalog_unreachable: str | None = None  # set once SkyPilot could not fetch a catalog: offline
        self._lock = threading.Lock()
        self._active: dict[str, str | None] = {}     # cluster -> launch request id (None until sky.launch returns)
        self._cancel_requested: set[str] = set()

    # -- launch -------------------------------------------------------------------------------------------------
    @_sky_call
    def launch(self, request: LaunchRequest) -> ClusterInfo:
        """Submit `sky.launch` for the request's cluster and wait for it. Raises CapacityError, LaunchCancelled or
        LaunchError (one line, with the request id for `sky api logs`)."""
        cluster = request.cluster
        with self._lock:
            if cluster in self._active:
                raise LaunchError(cluster, "a launch of this cluster is already in flight in this process")
            self._active[cluster] = None
        try:
            sky = _sky()
            try:
                task = self._load_task(request.task, request.secrets)
            except InvalidTask as exc:
                raise LaunchError(cluster, str(exc)) from exc
            except Exception as exc:  # e.g. SkyPilot could not download the catalog it needs for this task
                raise self._launch_error(cluster, exc, None) from exc
            self._raise_if_cancelled(cluster, None)
            try:
                request_id = sky.launch(task, cluster_name=cluster, retry_until_up=request.retry_until_up,
                                        idle_minutes_to_autostop=request.idle_minutes_to_autostop,
                                        down=request.down)
            except Exception as exc:
                raise self._launch_error(cluster, exc, None) from exc
            with self._lock:
                self._active[cluster] = request_id
            self._raise_if_cancelled(cluster, request_id)
            try:
                _job_id, handle = sky.get(request_id)
            except Exception as exc:
                raise self._launch_error(cluster, exc, request_id) from exc
        finally:
            with self._lock:
                self._active.pop(cluster, None)
                self._cancel_requested.discard(cluster)
        head_ip = getattr(handle, "head_ip", None)
        launched = getattr(handle, "launched_resources", None)
        cloud = getattr(launched, "cloud", None)
        try:  # the cluster is up: a failed endpoint lookup must not turn that into a failed launch
            endpoint = self.endpoint(cluster, request.port) if request.port is not None else None
        except BackendError:
            endpoint = None
        return ClusterInfo(cluster, ClusterStatus.UP, endpoint=endpoint, head_ip=head_ip,
                           cloud=str(cloud).lower() if cloud is not None else None,
                           region=getattr(launched, "region", None), message=f"launch request {request_id}")

    def _raise_if_cancelled(self, cluster: str, request_id: str | None) -> None:
        with self._lock:
            cancelled = cluster in self._cancel_requested
        if cancelled:
            if request_id is not None:
                self._api_cancel([request_id])
            raise LaunchCancelled(cluster, "launch cancelled before it finished; run `melange-sky status --refresh` "
                                           "to see whether a cluster was created")

    def _launch_error(self, cluster: str, exc: BaseException, request_id: str | None) -> LaunchError:
        """Map a SkyPilot exception raised by a launch to ours."""
        from sky import exceptions as sky_exc  # noqa: PLC0415

        logs = f" (logs: sky api logs {request_id})" if request_id else ""
        if isinstance(exc, sky_exc.ResourcesUnavailableError):
            return CapacityError(cluster, f"no capacity: {one_line(exc)}{logs}")
        if isinstance(exc, sky_exc.RequestCancelled):
            return LaunchCancelled(cluster, f"launch request cancelled: {one_line(exc)}")
        if isinstance(exc, sky_exc.NoCloudAccessError):
            return LaunchError(cluster, f"no cloud enabled in SkyPilot: {one_line(exc)}")
        if _is_network_error(exc):
            return LaunchError(cluster, f"SkyPilot could not reach the network (catalog download or API server): "
                                        f"{one_line(exc, 200)}")
        return LaunchError(cluster, f"{type(exc).__name__}: {one_line(exc)}{logs}")

    # -- cancel -------------------------------------------------------------------------------------------------
    def cancel(self, clusters: Sequence[str] | None = None) -> list[str]:
        """Cancel in-flight launches of `clusters` (all if None) through `sky.api_cancel`."""
        with self._lock:
            targets = [c for c in (self._active if clusters is None else clusters) if c in self._active]
            self._cancel_requested.update(targets)
            request_ids = [self._active[c] for c in targets if self._active[c] is not None]
        if request_ids:
            self._api_cancel([rid for rid in request_ids if rid is not None])
        return targets

    @staticmethod
    @_sky_call
    def _api_cancel(request_ids: list[str]) -> None:
        sky = _sky()
        try:
            sky.get(sky.api_cancel(request_ids, silent=True))
        except Exception as exc:
            raise BackendError(f"could not cancel SkyPilot requests {', '.join(request_ids)}: {one_line(exc)}") \
                from exc

    # -- status / endpoint / down ------------------------------------------------------------------------------
    @_sky_call
    def status(self, clusters: Sequence[str], refresh: bool = False) -> dict[str, ClusterInfo]:
        """`sky.status` of the named clusters; those SkyPilot does not list are GONE."""
        names = list(dict.fromkeys(clusters))
        if not names:
            return {}
        sky = _sky()
        mode = sky.StatusRefreshMode.FORCE if refresh else sky.StatusRefreshMode.NONE
        records = self._call("status", lambda: sky.get(sky.status(names, refresh=mode)))
        found: dict[str, ClusterInfo] = {}
        for record in records:  # StatusResponse models; they also answer dict-style get()
            name = record.get("name")
            raw = str(getattr(record.get("status"), "value", record.get("status")))
            found[name] = ClusterInfo(
                name, _SKY_STATUS.get(raw, ClusterStatus.INIT),
                head_ip=getattr(record.get("handle"), "head_ip", None),
                cloud=str(record.get("cloud")).lower() if record.get("cloud") else None,
                region=record.get("region") or None,
                message=one_line(record.get("init_status_reason") or "") or (raw.lower() if raw == "AUTOSTOPPING"
                                                                             else ""))
        return {name: found.get(name, ClusterInfo(name, ClusterStatus.GONE, message="not known to SkyPilot"))
                for name in names}

    @_sky_call
    def endpoint(self, cluster: str, port: int) -> str | None:
        """`sky.endpoints(cluster, port)`; None when the cluster is not up or does not expose the port."""
        sky = _sky()
        from sky import exceptions as sky_exc  # noqa: PLC0415

        try:
            endpoints = sky.get(sky.endpoints(cluster, port))
        except (sky_exc.ClusterNotUpError, sky_exc.ClusterDoesNotExist, ValueError, RuntimeError):
            return None
        except Exception as exc:
            raise BackendError(f"SkyPilot endpoints of {cluster}: {one_line(exc)}") from exc
        value = endpoints.get(port, endpoints.get(str(port))) if endpoints else None
        return str(value) if value else None

    @_sky_call
    def down(self, cluster: str, purge: bool = False) -> bool:
        """`sky.down`; ClusterDoesNotExist means it is already gone (False). Other failures raise BackendError."""
        sky = _sky()
        from sky import exceptions as sky_exc  # noqa: PLC0415

        try:
            sky.get(sky.down(cluster, purge=purge))
        except sky_exc.ClusterDoesNotExist:
            return False
        except Exception as exc:
            raise BackendError(f"{cluster}: teardown failed: {type(exc).__name__}: {one_line(exc)}; retry "
                               f"`melange-sky down` (or with --purge if the cloud resources are already gone)") \
                from exc
        return True

    @staticmethod
    def _call(what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            raise BackendError(f"SkyPilot {what} failed: {type(exc).__name__}: {one_line(exc)}") from exc

    # -- validate -----------------------------------------------------------------------------------------------
    @staticmethod
    def _load_task(task: Mapping[str, Any], secrets: Mapping[str, str] | None) -> Any:
        """`sky.Task.from_yaml_config` on a copy (it mutates its input), secrets passed in memory only."""
        sky = _sky()
        overrides = [(str(k), str(v)) for k, v in (secrets or {}).items()]
        try:
            return sky.Task.from_yaml_config(copy.deepcopy(dict(task)), secrets_overrides=overrides or None)
        except Exception as exc:
            if _is_network_error(exc):
                raise
            raise InvalidTask(f"invalid SkyPilot task: {one_line(exc)}") from exc

    @_sky_call
    def validate(self, task: Mapping[str, Any], secrets: Mapping[str, str] | None = None) -> Validation:
        """Full check (schema, `task.validate()`, per-resource feasibility and price) against SkyPilot's catalog;
        if SkyPilot needs to download it and cannot within CATALOG_FETCH_TIMEOUT_S (offline), the same check by
        SkyPilot against melange-sky's bundled snapshot, and for clouds the snapshot lacks, the schema only."""
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = self._validate_full(task, secrets)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, re-raised there
                outcome["error"] = exc

        if self._catalog_unreachable is None:
            worker = threading.Thread(target=run, name="melange-sky-validate", daemon=True)
            worker.start()
            worker.join(CATALOG_FETCH_TIMEOUT_S)
            if worker.is_alive():
                self._catalog_unreachable = (f"SkyPilot was still fetching its catalog after "
                                             f"{CATALOG_FETCH_TIMEOUT_S:g} s")
            elif "error" in outcome:
                exc = outcome["error"]
                if not _is_network_error(exc):
                    raise exc
                self._catalog_unreachable = f"SkyPilot could not download its catalog ({one_line(exc, 120)})"
            else:
                return outcome["result"]
        reason = self._catalog_unreachable
        bundled = self._validate_with_bundled_catalog(task)
        if bundled is not None:
            return bundled
        self._validate_schema(task)
        return Validation(ValidationLevel.SCHEMA, f"task schema only: {reason}; instance types, regions and "
                                                  f"prices were not checked (a real launch needs the catalog)")

    @staticmethod
    def _validate_with_bundled_catalog(task: Mapping[str, Any]) -> Validation | None:
        """Full validation by SkyPilot in a child process whose HOME holds melange-sky's bundled catalog snapshot
        (SkyPilot resolves its catalog directory from HOME at import, so this process cannot switch). None when
        the child cannot do it either, e.g. a cloud the snapshot does not cover; InvalidTask when SkyPilot rejects
        the task."""
        with tempfile.TemporaryDirectory(prefix="melange-sky-validate-") as home:
            shutil.copytree(BUNDLED_DIR, Path(home, ".sky", "catalogs", skypilot_schema_version()))
            env = {**os.environ, "HOME": home, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
            env.pop("SKY_RUNTIME_DIR", None)
            env.pop(_CHILD_DEBUG, None)
            if SKY_LOG.isEnabledFor(logging.DEBUG):
                env[_CHILD_DEBUG] = "1"  # the child writes SkyPilot's lines to its stderr, passed on to SKY_LOG
            try:
                # The child imports this very melange_sky (not one that happens to be in its working directory).
                code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
                        f"from melange_sky.fleet.skypilot import _validate_child; _validate_child()")
                done = subprocess.run([sys.executable, "-c", code], input=json.dumps(dict(task), default=str),
                                      env=env, capture_output=True, text=True, timeout=CATALOG_FETCH_TIMEOUT_S * 6)
            except (OSError, subprocess.TimeoutExpired):
                return None
        *said, last = done.stdout.strip().splitlines() or [""]
        for line in [*said, *done.stderr.splitlines()]:  # SkyPilot's own lines in the child: for --debug only
            if line.strip():
                SKY_LOG.debug("(validation with the bundled catalog) %s", _ANSI.sub("", line).rstrip())
        try:
            answer = json.loads(last)
        except ValueError:
            return None
        if "invalid" in answer:
            raise InvalidTask(answer["invalid"])
        return Validation(ValidationLevel.FULL, answer["detail"]) if "detail" in answer else None

    def _validate_full(self, task: Mapping[str, Any], secrets: Mapping[str, str] | None,
                       catalog: str = "SkyPilot's catalog") -> Validation:
        sky_task = self._load_task(task, secrets)
        try:
            sky_task.validate()
        except Exception as exc:
            if _is_network_error(exc):
                raise
            raise InvalidTask(f"invalid SkyPilot task: {one_line(exc)}") from exc
        prices = []
        unpinned = 0
        for resources in sky_task.resources:
            if resources.cloud is None:
                unpinned += 1
                continue
            try:
                feasible = resources.cloud.get_feasible_launchable_resources(resources)
                if not feasible.resources_list:
                    hint = f": {feasible.hint}" if feasible.hint else ""
                    raise InvalidTask(f"no {resources.cloud} offer matches the task's resources{hint}")
                if resources.instance_type is not None:
                    prices.append(f"{resources.cloud} {resources.instance_type} "
                                  f"${resources.get_cost(3600):.2f}/h")
            except InvalidTask:
                raise
            except Exception as exc:
                if _is_network_error(exc):
                    raise
                raise InvalidTask(f"infeasible SkyPilot resources: {one_line(exc)}") from exc
        detail = f"schema, resources and feasibility checked against {catalog}"
        if prices:
            detail += f" ({'; '.join(prices)})"
        if unpinned:
            detail += f"; {unpinned} resource set(s) name no cloud, so SkyPilot picks one at launch"
        return Validation(ValidationLevel.FULL, detail)

    @staticmethod
    def _validate_schema(task: Mapping[str, Any]) -> None:
        """SkyPilot's own task JSON schema, no catalog needed."""
        _sky()
        from sky.utils import common_utils, schemas  # noqa: PLC0415

        try:
            common_utils.validate_schema(copy.deepcopy(dict(task)), schemas.get_task_schema(), "Invalid task YAML: ")
        except Exception as exc:
            raise InvalidTask(f"invalid SkyPilot task: {one_line(exc)}") from exc


def _validate_child() -> None:
    """Entry point of `_validate_with_bundled_catalog`'s child: a task as JSON on stdin, one JSON line out."""
    if os.environ.get(_CHILD_DEBUG):
        SKY_LOG.addHandler(logging.StreamHandler(sys.stderr))
        SKY_LOG.setLevel(logging.DEBUG)
    task = json.loads(sys.stdin.read())
    try:
        answer = {"detail": SkyPilotBackend()._validate_full(  # noqa: SLF001
            task, None, catalog="melange-sky's bundled catalog snapshot (SkyPilot's own could not be downloaded)"
        ).detail}
    except InvalidTask as exc:
        answer = {"invalid": str(exc)}
    except Exception as exc:  # noqa: BLE001 - e.g. a cloud outside the snapshot: the parent falls back
        answer = {"unavailable": one_line(exc, 200)}
    print(json.dumps(answer))
