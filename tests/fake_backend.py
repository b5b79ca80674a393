"""`FakeBackend`: a test double of `melange_sky.backends.Backend` (tests only, never in the product).

Its clusters, configuration and call log live in one JSON file, so the real CLI running in a subprocess shares state
with the test and across invocations:

    fake = FakeBackend(tmp_path / "fake.json")           # or MELANGE_SKY_FAKE_STATE=<path>
    fake.configure(latency={"launch": 2.0}, capacity_failures=[{"cloud": "aws", "instance_type": "g5.xlarge"}],
                   hard_failures={"demo-a10g-1": "disk full"})
    env = {**os.environ, "MELANGE_SKY_BACKEND": "fake_backend:FakeBackend",
           "MELANGE_SKY_FAKE_STATE": str(fake.path), "PYTHONPATH": "<repo>/tests"}
    subprocess.run(["melange-sky", "up", ...], env=env)
    fake.max_concurrency(); fake.calls("launch"); fake.clusters()

A hold makes the next call of a method wait, in flight, until the test releases it (a deterministic interleaving,
where a latency would only make one likely): `fake.configure(holds={"status": release_path})`, then
`fake.held("status")` once it waits, and `release_path.touch()`.

Behaviour follows SkyPilot where it matters: a launch shows the cluster INIT while in flight; a capacity failure
leaves no cluster; a hard failure leaves the cluster INIT (SkyPilot keeps it for debugging, so `down` must remove it);
relaunching an UP cluster reuses it; `down` of an unknown cluster returns False.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backend_doubles import CancellableLaunches, locked_json
from melange_sky.backends import ClusterInfo, ClusterStatus, LaunchRequest, Validation, ValidationLevel
from melange_sky.errors import BackendError, CapacityError, InvalidTask, LaunchCancelled, LaunchError

STATE_ENV_VAR = "MELANGE_SKY_FAKE_STATE"
METHODS = ("launch", "status", "endpoint", "down", "validate")
_EMPTY_CONFIG: dict[str, Any] = {"latency": {}, "capacity_failures": [], "hard_failures": {}, "down_failures": {},
                                  "holds": {}}
HOLD_TIMEOUT_S = 120.0  # a hold nobody releases never hangs a test for ever


def offer_of(task: Mapping[str, Any]) -> list[dict[str, str]]:
    """The candidate offers a task's resources allow: dicts of cloud / region / instance_type / accelerators, lower
    case (`infra: aws/us-east-1` is split into cloud and region; `any_of` / `ordered` give several candidates)."""
    resources = task.get("resources") or {}
    candidates = resources.get("any_of") or resources.get("ordered") or [{}]
    out = []
    for extra in candidates:
        merged = {**{k: v for k, v in resources.items() if k not in ("any_of", "ordered")}, **extra}
        offer: dict[str, str] = {}
        if merged.get("infra"):
            parts = str(merged["infra"]).split("/")
            offer["cloud"] = parts[0]
            if len(parts) > 1:
                offer["region"] = parts[1]
        for key in ("cloud", "region", "instance_type"):
            if merged.get(key):
                offer[key] = str(merged[key])
        accelerators = merged.get("accelerators")
        if isinstance(accelerators, Mapping):
            accelerators = ",".join(f"{k}:{v}" for k, v in accelerators.items())
        if accelerators:
            offer["accelerators"] = str(accelerators).split(":")[0]
        out.append({k: v.lower() for k, v in offer.items()})
    return out


def _matches(rule: Mapping[str, Any], offer: Mapping[str, str]) -> bool:
    keys = [k for k in rule if k != "times"]
    return bool(keys) and all(str(rule[k]).lower() == offer.get(k) for k in keys)


class FakeBackend(CancellableLaunches):
    """File-backed, thread- and process-safe double with injected latency and failures; see the module docstring."""

    name = "fake"

    def __init__(self, state_path: str | os.PathLike[str] | None = None):
        path = state_path or os.environ.get(STATE_ENV_VAR)
        if path is None:
            fd, path = tempfile.mkstemp(prefix="fake-backend-", suffix=".json")
            os.close(fd)
            os.unlink(path)
        self.path = Path(path)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._cancel_events: dict[str, threading.Event] = {}
        with self._state() as state:
            state.setdefault("config", json.loads(json.dumps(_EMPTY_CONFIG)))
            state.setdefault("clusters", {})
            state.setdefault("calls", [])
            state.setdefault("max_concurrency", 0)

    # -- shared JSON state --------------------------------------------------------------------------------------
    def _state(self) -> contextlib.AbstractContextManager[dict[str, Any]]:
        return locked_json(self.path, indent=1)

    def _read(self) -> dict[str, Any]:
        with self._state() as state:
            return json.loads(json.dumps(state))

    def configure(self, *, latency: Mapping[str, float] | None = None,
                  capacity_failures: Sequence[Mapping[str, Any]] | None = None,
                  hard_failures: Mapping[str, str] | None = None,
                  down_failures: Mapping[str, str] | None = None,
                  holds: Mapping[str, str | os.PathLike[str]] | None = None) -> None:
        """Set (replace) parts of the injected behaviour; unspecified parts stay.

        latency: seconds per method name ("launch", "status", "endpoint", "down", "validate").
        capacity_failures: rules matched against the task's offer (keys among cloud, region, instance_type,
          accelerators; case-insensitive); a launch whose every candidate offer matches a rule raises CapacityError.
          A rule with "times": N fails only N launches.
        hard_failures: cluster name -> reason; its launch raises LaunchError and leaves the cluster INIT.
        down_failures: cluster name -> reason; its `down` raises BackendError.
        holds: method name -> a file path: the next call of that method (from any process) waits in flight (a
          launch after its cluster shows INIT) until the file exists, at most HOLD_TIMEOUT_S; one call per hold.
        """
        unknown = (set(latency or {}) | set(holds or {})) - set(METHODS)
        if unknown:
            raise ValueError(f"latency or holds for unknown methods: {sorted(unknown)}")
        with self._state() as state:
            config = state["config"]
            for key, value in (("latency", latency), ("capacity_failures", capacity_failures),
                               ("hard_failures", hard_failures), ("down_failures", down_failures),
                               ("holds", {m: str(path) for m, path in (holds or {}).items()} if holds else None)):
                if value is not None:
                    config[key] = json.loads(json.dumps(value))

    # -- inspection for tests -----------------------------------------------------------------------------------
    def calls(self, method: str | None = None) -> list[dict[str, Any]]:
        """Recorded calls (every process), oldest first: method, cluster(s), pid, start, end, outcome."""
        return [c for c in self._read()["calls"] if method is None or c["method"] == method]

    def held(self, method: str | None = None) -> list[dict[str, Any]]:
        """The calls waiting on a hold now (every process): method, pid."""
        return [h for h in self._read().get("held", []) if method is None or h["method"] == method]

    def max_concurrency(self) -> int:
        """Most launches observed in flight at once within one process."""
        return int(self._read()["max_concurrency"])

    def clusters(self) -> dict[str, dict[str, Any]]:
        return self._read()["clusters"]

    def launch_count(self, cluster: str) -> int:
        """How many launches actually created (not reused) this cluster."""
        return sum(1 for c in self.calls("launch") if c["cluster"] == cluster and c["outcome"] == "up")

    def add_cluster(self, cluster: str, status: ClusterStatus = ClusterStatus.UP, endpoint: str | None = None) \
            -> None:
        """Pretend a cluster exists (e.g. launched by an earlier run)."""
        with self._state() as state:
            state["clusters"][cluster] = {"status": ClusterStatus(status).value, "endpoint": endpoint,
                                          "head_ip": None, "task": None}

    def remove_cluster(self, cluster: str, cached_until_refresh: bool = False) -> None:
        """Pretend a cluster vanished outside melange-sky (e.g. deleted in the cloud console, or preempted).
        `cached_until_refresh`: the launcher's cached status still shows it as it was, like SkyPilot's without
        `refresh`, until a refreshed status asks the cloud."""
        with self._state() as state:
            record = state["clusters"].pop(cluster, None)
            if cached_until_refresh and record is not None:
                state.setdefault("stale", {})[cluster] = record

    # -- Backend interface --------------------------------------------------------------------------------------
    def _latency(self, method: str) -> float:
        return float(self._read()["config"]["latency"].get(method, 0.0))

    def _hold(self, method: str, cancel: threading.Event | None = None) -> None:
        """Wait here while this call holds the method's hold (if one is set, this call takes it) until its release
        file exists, `cancel` is set, or HOLD_TIMEOUT_S passed."""
        with self._state() as state:
            release = state["config"].get("holds", {}).pop(method, None)
            if release is None:
                return
            mine = {"method": method, "pid": os.getpid(), "since": time.time()}
            state.setdefault("held", []).append(mine)
        try:
            deadline = time.monotonic() + HOLD_TIMEOUT_S
            while not Path(release).exists() and time.monotonic() < deadline:
                if cancel is not None and cancel.wait(0.01):
                    break
                if cancel is None:
                    time.sleep(0.01)
        finally:
            with self._state() as state:
                state["held"] = [h for h in state.get("held", []) if h != mine]

    def _record(self, state: dict[str, Any], method: str, start: float, outcome: str, **extra: Any) -> None:
        state["calls"].append({"method": method, "pid": os.getpid(), "start": start, "end": time.time(),
                               "outcome": outcome, **extra})

    def launch(self, request: LaunchRequest) -> ClusterInfo:
        cluster = request.cluster
        start = time.time()
        with self._cancellable(cluster) as cancel:
            with self._lock:
                self._in_flight += 1
                in_flight = self._in_flight
            try:
                return self._launch(request, cancel, start, in_flight)
            finally:
                with self._lock:
                    self._in_flight -= 1

    def _launch(self, request: LaunchRequest, cancel: threading.Event, start: float, in_flight: int) -> ClusterInfo:
        cluster = request.cluster
        with self._state() as state:
            state["max_concurrency"] = max(state["max_concurrency"], in_flight)
            existing = state["clusters"].get(cluster)
            if existing and existing["status"] == ClusterStatus.UP.value:
                self._record(state, "launch", start, "reused", cluster=cluster)
                return self._info(cluster, existing)
            state["clusters"][cluster] = {"status": ClusterStatus.INIT.value, "endpoint": None, "head_ip": None,
                                          "task": dict(request.task), "offer": offer_of(request.task),
                                          "secret_names": sorted(request.secrets)}
        self._hold("launch", cancel)
        cancelled = cancel.wait(self._latency("launch"))
        with self._state() as state:
            config = state["config"]
            if cancelled:
                self._record(state, "launch", start, "cancelled", cluster=cluster)
                raise LaunchCancelled(cluster, "launch cancelled")
            if cluster in config["hard_failures"]:
                reason = config["hard_failures"][cluster]
                self._record(state, "launch", start, "failed", cluster=cluster, reason=reason)
                raise LaunchError(cluster, reason)
            rule = self._capacity_rule(config["capacity_failures"], offer_of(request.task))
            if rule is not None:
                if "times" in rule:
                    rule["times"] = int(rule["times"]) - 1
                del state["clusters"][cluster]
                self._record(state, "launch", start, "unavailable", cluster=cluster)
                raise CapacityError(cluster, f"no capacity for {offer_of(request.task)[0]} (fake)")
            n = len(state["calls"]) % 250 + 1
            head_ip = f"127.0.0.{n}"  # loopback: nothing a test pushes to may leave the machine
            record = state["clusters"][cluster]
            record.update(status=ClusterStatus.UP.value, head_ip=head_ip,
                          endpoint=f"{head_ip}:{request.port}" if request.port is not None else None,
                          retry_until_up=request.retry_until_up, down=request.down,
                          idle_minutes_to_autostop=request.idle_minutes_to_autostop)
            self._record(state, "launch", start, "up", cluster=cluster)
            return self._info(cluster, record)

    @staticmethod
    def _capacity_rule(rules: list[dict[str, Any]], offers: list[dict[str, str]]) -> dict[str, Any] | None:
        live = [r for r in rules if int(r.get("times", 1)) > 0]
        matched = [next((r for r in live if _matches(r, offer)), None) for offer in offers]
        return matched[0] if matched and all(m is not None for m in matched) else None

    @staticmethod
    def _info(cluster: str, record: Mapping[str, Any]) -> ClusterInfo:
        offer = (record.get("offer") or [{}])[0]
        return ClusterInfo(cluster, ClusterStatus(record["status"]), endpoint=record.get("endpoint"),
                           head_ip=record.get("head_ip"), cloud=offer.get("cloud"), region=offer.get("region"))

    def status(self, clusters: Sequence[str], refresh: bool = False) -> dict[str, ClusterInfo]:
        start = time.time()
        self._hold("status")
        time.sleep(self._latency("status"))
        with self._state() as state:
            self._record(state, "status", start, "ok", clusters=list(clusters), refresh=refresh)
            known = dict(state["clusters"])
            stale = state.setdefault("stale", {})
            for cluster in clusters:
                if cluster in stale and cluster not in known:
                    if refresh:
                        del stale[cluster]
                    else:
                        known[cluster] = stale[cluster]
            # Like SkyPilot's status, no endpoints here: callers ask `endpoint()` for those.
            return {c: dataclasses.replace(self._info(c, known[c]), endpoint=None) if c in known else
                    ClusterInfo(c, ClusterStatus.GONE, message="not known to the fake backend") for c in clusters}

    def endpoint(self, cluster: str, port: int) -> str | None:
        start = time.time()
        self._hold("endpoint")
        time.sleep(self._latency("endpoint"))
        with self._state() as state:
            self._record(state, "endpoint", start, "ok", cluster=cluster, port=port)
            record = state["clusters"].get(cluster)
            if not record or record["status"] != ClusterStatus.UP.value or not record.get("head_ip"):
                return None
            return f"{record['head_ip']}:{port}"

    def down(self, cluster: str, purge: bool = False) -> bool:
        start = time.time()
        self._hold("down")
        time.sleep(self._latency("down"))
        with self._state() as state:
            reason = state["config"]["down_failures"].get(cluster)
            if reason is not None and not purge:
                self._record(state, "down", start, "failed", cluster=cluster, reason=reason)
                raise BackendError(f"{cluster}: teardown failed: {reason}")
            existed = state["clusters"].pop(cluster, None) is not None
            self._record(state, "down", start, "down" if existed else "gone", cluster=cluster, purge=purge)
            return existed

    def validate(self, task: Mapping[str, Any], secrets: Mapping[str, str] | None = None) -> Validation:
        """The checks a fake can make honestly: shape, string envs, and every referenced secret supplied."""
        start = time.time()
        self._hold("validate")
        time.sleep(self._latency("validate"))
        if not isinstance(task, Mapping):
            raise InvalidTask(f"invalid task: expected a mapping, got {type(task).__name__}")
        if not isinstance(task.get("resources", {}), Mapping):
            raise InvalidTask("invalid task: resources must be a mapping")
        bad_envs = [k for k, v in (task.get("envs") or {}).items() if not isinstance(v, str)]
        if bad_envs:
            raise InvalidTask(f"invalid task: envs values must be strings: {', '.join(bad_envs)}")
        missing = [k for k in (task.get("secrets") or {}) if k not in (secrets or {})]
        if missing:
            raise InvalidTask(f"invalid task: secrets not supplied: {', '.join(missing)}")
        with self._state() as state:
            self._record(state, "validate", start, "ok")
        return Validation(ValidationLevel.SCHEMA, "fake backend: shape, envs and secrets checked")
