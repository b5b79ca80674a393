"""`ChaosBackend`: a fault-injecting launcher (tests only) whose cloud lives in a JSON file shared by every process.

The chaos runner (tests/chaos.py) runs the real CLI in subprocesses with

    MELANGE_SKY_BACKEND=chaos_backend:ChaosBackend  MELANGE_CHAOS_STATE=<state.json>  PYTHONPATH=<repo>/tests

and drives the same file in-process (`ChaosBackend(path).configure(...)`, `.preempt(...)`, `.existing()`), so the
CLI processes, the runner and the invariant checks all see one cloud. Every read-modify-write of the file happens
under an exclusive `fcntl.flock` on `<state>.lock` (threads and processes alike).

What it models, after SkyPilot:

- **A cluster exists from the moment its launch starts.** `launch` writes it INIT before any delay; the launch then
  takes a little while (`launch_delay_ms`) and ends UP, or fails.
- **Two views of every cluster.** `real` is what the cloud has (init / up / stopped; a cluster not there is gone);
  `cache` is what the launcher's own database believes. The launcher's own operations (launch outcome, down, a
  refresh) update both; out-of-band events (preemption, autostop, a cluster that fails after coming up) change
  `real` only. `status(refresh=False)` answers from the cache, which also *lags*: a cluster created less than
  `lag_ms` ago is not in it yet (it answers what the cache held before: usually GONE). `status(refresh=True)` reads
  `real` and brings the cache up to date (a cluster the cloud no longer has leaves the cache).
- **Faults**, each drawn with a probability from `config["p"]` (all 0 by default), or forced per cluster and per
  attempt with `config["script"]` (see `OUTCOMES`):
  capacity errors (the provisioning attempt is rolled back: no cluster left), launch errors after the cluster was
  created (left INIT; `launch_error_rollback` of them leave nothing), unexpected exception types (RuntimeError /
  ValueError from launch, status and down), clusters that come UP and then fail (`real` INIT after
  `fail_after_ms`, the cache still says UP), status that raises (BackendError or RuntimeError), teardowns that fail
  (down raises, the cluster stays).
- **Out of band**, for the runner: `preempt(cluster, to="gone" | "stopped" | "init")`.
- **Spot pools**: every launch's region and market are kept in `placements` (cluster -> {"region", "spot"}, kept
  after the cluster goes); `config["spot_outage"]` lists regions with no spot capacity: a spot launch there is a
  capacity error (rolled back), whatever the draws say.
- **Holds**, for deterministic interleavings: `config["holds"][point] = {"release": path, "once": bool, "skip": n}`
  makes the call block at `point` until the file `path` exists (or its launch is cancelled); the first n calls pass;
  `held(point)` tells the test a call is there. Points: `launch` (after the cluster was written INIT),
  `status.refresh` and `status.cached` (after the answer was read, before it is returned: the answer is then
  stale), `down` (before the teardown).

Every change of a cluster's `real` state is appended to `timeline` with its time (time.time(), the clock the ledger
uses), so a check can ask whether a cluster existed at the moment the ledger recorded it `gone`
(`exists_at(cluster, t)`).

Random draws are reproducible: each decision uses `random.Random(f"{seed}|...")` keyed on the scenario seed
(`config["seed"]`, or `MELANGE_CHAOS_SEED`) and on a counter kept in the state file (the cluster's launch or down
attempt number; for status, the process's instance number and its call count), never on thread timing.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from backend_doubles import CancellableLaunches, locked_json
from fake_backend import offer_of
from melange_sky.backends import ClusterInfo, ClusterStatus, LaunchRequest, Validation, ValidationLevel
from melange_sky.errors import BackendError, CapacityError, InvalidTask, LaunchCancelled, LaunchError

STATE_ENV_VAR = "MELANGE_CHAOS_STATE"
SEED_ENV_VAR = "MELANGE_CHAOS_SEED"
HOLD_TIMEOUT_S = 120.0  # a hold nobody releases never hangs a run for ever

#: Forced outcomes for `config["script"]["launch:<cluster>"]` (one per launch attempt, consumed in order).
OUTCOMES = ("ok", "capacity", "launch_error", "launch_error_rollback", "runtime_error", "runtime_error_created",
            "value_error", "fail_after_up")
#: Forced outcomes for `script["down:<cluster>"]`, `script["status"]`, `script["status.refresh"]`,
#: `script["status.cached"]` (one per call, consumed in order).
CALL_OUTCOMES = ("ok", "backend_error", "runtime_error", "value_error")

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    "p": {
        "capacity": 0.0,               # launch: CapacityError, the attempt rolled back (no cluster)
        "launch_error": 0.0,           # launch: LaunchError after the cluster was created (left INIT) ...
        "launch_error_rollback": 0.0,  # ... of which this share rolled back (no cluster left)
        "launch_exc": 0.0,             # launch: RuntimeError / ValueError (before or after creating the cluster)
        "fail_after_up": 0.0,          # launch succeeds, the cluster fails (real INIT) fail_after_ms later
        "status_error": 0.0,           # status: BackendError
        "status_exc": 0.0,             # status: RuntimeError / ValueError
        "down_error": 0.0,             # down: BackendError, the cluster stays
        "down_exc": 0.0,               # down: RuntimeError / ValueError, the cluster stays
    },
    "launch_delay_ms": [10, 40],
    "status_delay_ms": [0, 0],      # status(refresh=False): the launcher's database
    "refresh_delay_ms": [0, 0],     # status(refresh=True): asking the clouds takes longer
    "down_delay_ms": [0, 10],
    "fail_after_ms": [5, 60],
    "lag_ms": 0,
    "script": {},
    "holds": {},
    "spot_outage": [],  # regions where a spot launch finds no capacity
}

_EXISTS = ("init", "up", "stopped")


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key not in ("script", "holds"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class ChaosBackend(CancellableLaunches):
    """See the module docstring. Thread- and process-safe; every method follows `melange_sky.backends.Backend`."""

    name = "chaos"

    def __init__(self, state_path: str | os.PathLike[str] | None = None):
        path = state_path or os.environ.get(STATE_ENV_VAR)
        if not path:
            raise BackendError(f"chaos backend: set {STATE_ENV_VAR} to its state file")
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cancel_events: dict[str, threading.Event] = {}
        self._calls = {"status": 0}
        with self._state() as state:
            state.setdefault("config", copy.deepcopy(DEFAULT_CONFIG))
            if os.environ.get(SEED_ENV_VAR):
                state["config"]["seed"] = int(os.environ[SEED_ENV_VAR])
            state.setdefault("clusters", {})
            state.setdefault("timeline", {})
            state.setdefault("attempts", {})
            state.setdefault("calls", [])
            state.setdefault("held", [])
            state.setdefault("placements", {})
            state["instances"] = state.get("instances", 0) + 1
            self.instance = state["instances"]

    # -- the shared file ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the state under an exclusive flock; written back even when the body raises (a fault
        is recorded before it is raised)."""
        with locked_json(self.path) as state:
            self._advance(state, time.time())
            try:
                yield state
            finally:
                self._advance(state, time.time())

    def snapshot(self) -> dict[str, Any]:
        with self._state() as state:
            return copy.deepcopy(state)

    @staticmethod
    def _advance(state: dict[str, Any], now: float) -> None:
        """Apply delayed out-of-band events that are due (a cluster that came up and then failed)."""
        for name, record in list(state.get("clusters", {}).items()):
            fails_at = record.get("fails_at")
            if fails_at is not None and fails_at <= now:
                record.pop("fails_at")
                if record["real"] == "up":
                    ChaosBackend._set_real(state, name, "init", at=fails_at, why="failed after coming up")

    @staticmethod
    def _set_real(state: dict[str, Any], cluster: str, real: str, at: float | None = None, why: str = "") -> None:
        record = state["clusters"].setdefault(cluster, {"real": "gone", "cache": None, "cache_before": None,
                                                        "visible_from": 0.0})
        if record["real"] != real:
            events = state["timeline"].setdefault(cluster, [])
            events.append([at if at is not None else time.time(), real, why, os.getpid()])
            events.sort(key=lambda e: e[0])
        record["real"] = real

    @staticmethod
    def _forget(state: dict[str, Any], cluster: str, why: str) -> None:
        """The cluster leaves the cloud and the launcher's cache."""
        if cluster in state["clusters"]:
            ChaosBackend._set_real(state, cluster, "gone", why=why)
            del state["clusters"][cluster]

    def _record(self, state: dict[str, Any], method: str, outcome: str, **extra: Any) -> None:
        state["calls"].append({"method": method, "pid": os.getpid(), "instance": self.instance, "at": time.time(),
                               "outcome": outcome, **extra})

    # -- configuration and inspection (the runner and tests) ------------------------------------------------------
    def configure(self, **config: Any) -> None:
        """Merge into the config: `p={...}` merges per fault; `script` and `holds` replace as a whole."""
        with self._state() as state:
            state["config"] = _merge(state["config"], config)

    def config(self) -> dict[str, Any]:
        return self.snapshot()["config"]

    def calm(self) -> None:
        """No faults, no lag, no holds, no scripts: what a retried `down` runs against."""
        with self._state() as state:
            seed = state["config"].get("seed", 0)
            state["config"] = _merge(DEFAULT_CONFIG, {"seed": seed, "launch_delay_ms": [0, 0],
                                                      "down_delay_ms": [0, 0]})

    def existing(self) -> dict[str, str]:
        """Clusters that exist in the cloud (real state init, up or stopped): name -> real state."""
        return {c: r["real"] for c, r in self.snapshot()["clusters"].items() if r["real"] in _EXISTS}

    def clusters(self) -> dict[str, dict[str, Any]]:
        return self.snapshot()["clusters"]

    def timeline(self) -> dict[str, list[list[Any]]]:
        return self.snapshot()["timeline"]

    def placements(self) -> dict[str, dict[str, Any]]:
        """Where each cluster was last launched: {"region", "spot"}, kept after it goes."""
        return self.snapshot()["placements"]

    def calls(self, method: str | None = None) -> list[dict[str, Any]]:
        return [c for c in self.snapshot()["calls"] if method is None or c["method"] == method]

    def held(self, point: str | None = None) -> list[dict[str, Any]]:
        """Calls that reached a hold (point, pid, cluster, time), oldest first."""
        return [h for h in self.snapshot()["held"] if point is None or h["point"] == point]

    @staticmethod
    def exists_at(timeline: Mapping[str, list[list[Any]]], cluster: str, at: float) -> bool:
        """Whether `cluster` existed in the cloud at time `at`, by the timeline of its real state."""
        state = "gone"
        for t, real, *_ in sorted(timeline.get(cluster, []), key=lambda e: e[0]):
            if t > at:
                break
            state = real
        return state in _EXISTS

    def preempt(self, cluster: str, to: str = "gone") -> bool:
        """Out of band (spot preemption, autostop, a console delete, a crash): the cloud changes, the launcher's
        cache does not. Returns whether the cluster existed."""
        if to not in ("gone", "stopped", "init"):
            raise ValueError(f"preempt to {to!r}")
        with self._state() as state:
            record = state["clusters"].get(cluster)
            if record is None or record["real"] not in _EXISTS:
                return False
            record.pop("fails_at", None)
            self._set_real(state, cluster, to, why=f"out of band: {to}")
            self._record(state, "preempt", to, cluster=cluster)
            return True

    # -- decisions ------------------------------------------------------------------------------------------------
    @staticmethod
    def _rng(config: Mapping[str, Any], *key: Any) -> random.Random:
        return random.Random("|".join(str(k) for k in (config.get("seed", 0), *key)))

    @staticmethod
    def _ms(rng: random.Random, span: Sequence[float]) -> float:
        low, high = (list(span) + [0, 0])[:2] if span else (0, 0)
        return rng.uniform(float(low), float(max(low, high))) / 1000.0

    @staticmethod
    def _scripted(state: dict[str, Any], key: str) -> str | None:
        queue = state["config"].get("script", {}).get(key)
        if queue:
            return queue.pop(0)
        return None

    def _launch_outcome(self, state: dict[str, Any], cluster: str, attempt: int) -> tuple[str, random.Random]:
        config = state["config"]
        rng = self._rng(config, "launch", cluster, attempt)
        scripted = self._scripted(state, f"launch:{cluster}")
        if scripted is not None:
            if scripted not in OUTCOMES:
                raise ValueError(f"chaos script: unknown launch outcome {scripted!r}")
            return scripted, rng
        p = config["p"]
        draw = rng.random()
        for outcome, share in (("capacity", p["capacity"]), ("launch_error", p["launch_error"]),
                               ("launch_exc", p["launch_exc"]), ("fail_after_up", p["fail_after_up"])):
            if draw < share:
                if outcome == "launch_error":
                    return ("launch_error_rollback" if rng.random() < p["launch_error_rollback"]
                            else "launch_error"), rng
                if outcome == "launch_exc":
                    return rng.choice(["runtime_error", "runtime_error_created", "value_error"]), rng
                return outcome, rng
            draw -= share
        return "ok", rng

    def _call_outcome(self, state: dict[str, Any], keys: Sequence[str], rng: random.Random, error: str,
                      exc: str) -> str:
        for key in keys:
            scripted = self._scripted(state, key)
            if scripted is not None:
                if scripted not in CALL_OUTCOMES:
                    raise ValueError(f"chaos script: unknown outcome {scripted!r} for {key}")
                return scripted
        p = state["config"]["p"]
        draw = rng.random()
        if draw < p[error]:
            return "backend_error"
        if draw < p[error] + p[exc]:
            return rng.choice(["runtime_error", "value_error"])
        return "ok"

    @staticmethod
    def _raise(outcome: str, what: str) -> None:
        if outcome == "backend_error":
            raise BackendError(f"{what}: the launcher did not answer (chaos)")
        if outcome == "runtime_error":
            raise RuntimeError(f"{what}: chaos RuntimeError")
        if outcome == "value_error":
            raise ValueError(f"{what}: chaos ValueError")

    def _hold(self, point: str, cluster: str | None = None, cancel: threading.Event | None = None) -> bool:
        """Block at `point` if a hold is set there; True if the wait ended by cancellation."""
        with self._state() as state:
            hold = state["config"].get("holds", {}).get(point)
            if not hold:
                return False
            if hold.get("skip", 0) > 0:  # let the first `skip` calls through
                hold["skip"] -= 1
                return False
            if hold.get("once"):
                del state["config"]["holds"][point]
            state["held"].append({"point": point, "pid": os.getpid(), "cluster": cluster, "at": time.time()})
        release = Path(hold["release"])
        deadline = time.monotonic() + float(hold.get("timeout", HOLD_TIMEOUT_S))
        while not release.exists() and time.monotonic() < deadline:
            if cancel is not None:
                if cancel.wait(0.01):
                    return True
            else:
                time.sleep(0.01)
        return False

    # -- Backend interface ----------------------------------------------------------------------------------------
    def launch(self, request: LaunchRequest) -> ClusterInfo:
        with self._cancellable(request.cluster) as cancel:
            return self._launch(request, cancel)

    def _launch(self, request: LaunchRequest, cancel: threading.Event) -> ClusterInfo:
        cluster = request.cluster
        now = time.time()
        with self._state() as state:
            config = state["config"]
            record = state["clusters"].get(cluster)
            if record is not None and record["real"] == "up":  # SkyPilot reuses an UP cluster
                record["cache"] = "up"
                self._record(state, "launch", "reused", cluster=cluster)
                return self._info(cluster, record, request.port)
            attempt = state["attempts"][f"launch:{cluster}"] = state["attempts"].get(f"launch:{cluster}", 0) + 1
            outcome, rng = self._launch_outcome(state, cluster, attempt)
            resources = (request.task or {}).get("resources") or {}
            region = next((o["region"] for o in offer_of(request.task or {}) if o.get("region")), None)
            spot = bool(resources.get("use_spot"))
            state["placements"][cluster] = {"region": region, "spot": spot}
            if spot and region in config.get("spot_outage", []):
                outcome = "capacity"
            delay = self._ms(rng, config["launch_delay_ms"])
            if outcome == "runtime_error" or outcome == "value_error":  # the launcher broke before creating anything
                self._record(state, "launch", outcome, cluster=cluster, attempt=attempt)
                self._raise(outcome, f"{cluster}: launch")
            new = record is None or record["real"] not in _EXISTS
            if record is None:
                record = state["clusters"][cluster] = {"real": "gone", "cache": None, "cache_before": None,
                                                       "visible_from": 0.0}
            if new:  # a new cluster: the launcher's cache does not list it for lag_ms
                record["cache_before"] = (record.get("cache_before") if now < record.get("visible_from", 0.0)
                                          else record.get("cache"))
                record["visible_from"] = now + float(config.get("lag_ms", 0)) / 1000.0
            record["cache"] = "init"
            record.pop("fails_at", None)
            record["task_name"] = (request.task or {}).get("name")
            record["secret_names"] = sorted(request.secrets)
            self._set_real(state, cluster, "init", at=now, why="launch started")
            self._record(state, "launch", "started", cluster=cluster, attempt=attempt, planned=outcome)
        if self._hold("launch", cluster, cancel) or cancel.wait(delay):
            with self._state() as state:
                self._record(state, "launch", "cancelled", cluster=cluster, attempt=attempt)
            raise LaunchCancelled(cluster, "launch cancelled (chaos); the cluster is left INIT")
        with self._state() as state:
            record = state["clusters"].get(cluster)
            if record is None or record["real"] not in _EXISTS:  # torn down or preempted while launching
                self._record(state, "launch", "lost", cluster=cluster, attempt=attempt)
                raise LaunchError(cluster, "the cluster disappeared while launching (chaos)")
            self._record(state, "launch", outcome, cluster=cluster, attempt=attempt)
            if outcome == "capacity":
                self._forget(state, cluster, "no capacity: provisioning rolled back")
                raise CapacityError(cluster, "no capacity on this offer (chaos): ResourcesUnavailableError")
            if outcome == "launch_error_rollback":
                self._forget(state, cluster, "launch error: rolled back")
                raise LaunchError(cluster, "provisioning failed and was rolled back (chaos)")
            if outcome == "launch_error":
                raise LaunchError(cluster, "setup failed; the cluster is left INIT for debugging (chaos)")
            if outcome == "runtime_error_created":
                raise RuntimeError(f"{cluster}: chaos RuntimeError after the cluster was created")
            record["cache"] = "up"
            self._set_real(state, cluster, "up", why="launch finished")
            record["head_ip"] = f"127.{rng_byte(cluster)}.0.{attempt % 250 + 1}"  # loopback only
            if outcome == "fail_after_up":
                record["fails_at"] = time.time() + self._ms(self._rng(state["config"], "fail", cluster, attempt),
                                                            state["config"]["fail_after_ms"])
            return self._info(cluster, record, request.port)

    @staticmethod
    def _info(cluster: str, record: Mapping[str, Any] | None, port: int | None = None,
              view: str | None = None) -> ClusterInfo:
        status = view if view is not None else (record or {}).get("real", "gone")
        if record is None or status not in _EXISTS:
            return ClusterInfo(cluster, ClusterStatus.GONE, message="not known to the chaos backend")
        endpoint = f"{record['head_ip']}:{port}" if port is not None and status == "up" and record.get("head_ip") \
            else None
        return ClusterInfo(cluster, ClusterStatus(status), endpoint=endpoint, head_ip=record.get("head_ip"))

    def status(self, clusters: Sequence[str], refresh: bool = False) -> dict[str, ClusterInfo]:
        with self._lock:
            self._calls["status"] += 1
            n = self._calls["status"]
        with self._state() as state:
            config = state["config"]
            rng = self._rng(config, "status", self.instance, n)
            kind = "status.refresh" if refresh else "status.cached"
            outcome = self._call_outcome(state, [kind, "status"], rng, "status_error", "status_exc")
            delay = self._ms(rng, config["refresh_delay_ms" if refresh else "status_delay_ms"])
            if outcome != "ok":
                self._record(state, "status", outcome, clusters=list(clusters), refresh=refresh)
                self._raise(outcome, "status")
            now = time.time()
            answer = {}
            for cluster in clusters:
                record = state["clusters"].get(cluster)
                if refresh:
                    answer[cluster] = self._info(cluster, record)
                    if record is not None:
                        if record["real"] in _EXISTS:
                            record.update(cache=record["real"], visible_from=0.0)
                        else:
                            del state["clusters"][cluster]
                else:
                    if record is None:
                        view = None
                    elif now < record.get("visible_from", 0.0):
                        view = record.get("cache_before")
                    else:
                        view = record.get("cache")
                    answer[cluster] = self._info(cluster, record, view=view or "gone")
            self._record(state, "status", "ok", refresh=refresh,
                         answer={c: i.status.value for c, i in answer.items()})
        self._hold(kind)
        if delay:
            time.sleep(delay)
        return answer

    def endpoint(self, cluster: str, port: int) -> str | None:
        with self._state() as state:
            record = state["clusters"].get(cluster)
            if record is None or record["real"] != "up" or not record.get("head_ip"):
                return None
            return f"{record['head_ip']}:{port}"

    def down(self, cluster: str, purge: bool = False) -> bool:
        with self._state() as state:
            config = state["config"]
            attempt = state["attempts"][f"down:{cluster}"] = state["attempts"].get(f"down:{cluster}", 0) + 1
            rng = self._rng(config, "down", cluster, attempt)
            outcome = self._call_outcome(state, [f"down:{cluster}"], rng, "down_error", "down_exc")
            delay = self._ms(rng, config["down_delay_ms"])
        self._hold("down", cluster)
        if delay:
            time.sleep(delay)
        with self._state() as state:
            self._record(state, "down", outcome, cluster=cluster, attempt=attempt, purge=purge)
            if outcome != "ok" and not purge:
                self._raise(outcome, f"{cluster}: teardown failed")
            existed = cluster in state["clusters"]
            self._forget(state, cluster, "down")
            return existed

    def validate(self, task: Mapping[str, Any], secrets: Mapping[str, str] | None = None) -> Validation:
        if not isinstance(task, Mapping):
            raise InvalidTask(f"invalid task: expected a mapping, got {type(task).__name__}")
        return Validation(ValidationLevel.SCHEMA, "chaos backend: shape checked")


def rng_byte(cluster: str) -> int:
    return sum(cluster.encode()) % 250 + 1
