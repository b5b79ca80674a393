"""The fleet lifecycle: bring a plan up, watch it, tear it down — through a `Backend`, recorded in the `Ledger`.

Rules this module keeps:
- a replica is written to the ledger (PENDING) before its launch is requested, and every outcome is recorded, so
  an interrupted `up` never leaves a cluster the ledger does not know about;
- launches run concurrently, bounded by `parallel`; progress is reported through a callback (no printing here);
- a capacity failure marks the offer unavailable and re-plans the unmet demand without it, with the replicas
  already up kept as fixed capacity; after `max_rounds` the report says what is still missing;
- re-running `up` reconciles: replicas that are up stay, missing ones launch, names are reused, never duplicated;
- `down` removes a fleet from the ledger only when every one of its clusters is gone.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from .backends import Backend, ClusterStatus, LaunchRequest, Validation
from .errors import CapacityError, LaunchCancelled, LaunchError, MelangeError
from .ledger import Ledger, NewReplica, ReplicaRecord, ReplicaState
from .plan import Plan, PlanRequest, ReplicaPlan

DEFAULT_PARALLEL = 8  # launches mostly wait on clouds; SkyPilot's API server queues the rest
DEFAULT_MAX_ROUNDS = 3
HEARTBEAT_S = 30.0  # how often `up` reports launches still in flight


Planner = Callable[[PlanRequest], Plan]


@dataclass(frozen=True)
class UpOptions:
    parallel: int = DEFAULT_PARALLEL
    max_rounds: int = DEFAULT_MAX_ROUNDS
    retry_until_up: bool = False
    idle_minutes_to_autostop: int | None = None
    down: bool = False  # autodown: tear the cluster down after idle_minutes_to_autostop


@dataclass(frozen=True)
class ReplicaEvent:
    """A replica changed state (for the live progress display)."""

    cluster: str
    gpu: str
    state: ReplicaState
    elapsed: float  # seconds since this replica's launch was requested (0 before)
    message: str = ""
    round: int = 0


@dataclass
class UpReport:
    """What `up` did: the final plan, every replica's final ledger row, the rounds and the offers found full."""

    fleet: str
    plan: Plan
    replicas: list[ReplicaRecord]
    rounds: int
    unavailable_offers: list[str]
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def up(self) -> list[ReplicaRecord]:
        return [r for r in self.replicas if r.state is ReplicaState.UP]

    @property
    def problems(self) -> list[ReplicaRecord]:
        """Replicas of the plan that are not up (failed, unavailable, still pending after an interrupt)."""
        planned = {r.cluster for r in self.plan.replicas}
        return [r for r in self.replicas if r.cluster in planned and r.state is not ReplicaState.UP]

    @property
    def complete(self) -> bool:
        return not self.interrupted and not self.problems

    @property
    def cost(self) -> float:
        return sum(r.price_per_hour for r in self.up)

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "complete": self.complete, "interrupted": self.interrupted,
                "rounds": self.rounds, "seconds": round(self.seconds, 3), "cost_up": round(self.cost, 6),
                "cost_planned": round(self.plan.cost, 6), "unavailable_offers": self.unavailable_offers,
                "replicas": [replica_dict(r) for r in self.replicas]}


@dataclass(frozen=True)
class DryRunReport:
    """What `up --dryrun` found: the plan, which replicas would launch or stay, and how each task validated."""

    plan: Plan
    launch: list[ReplicaPlan]
    keep: list[str]
    validations: dict[str, Validation]
    missing_secrets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.plan.fleet, "dryrun": True, "clouds": self.plan.clouds,
                "missing_secrets": self.missing_secrets,
                "cost_planned": round(self.plan.cost, 6), "launch": [r.summary() for r in self.launch],
                "keep": self.keep, "validation": {k: str(v) for k, v in self.validations.items()}}


@dataclass
class DownReport:
    fleet: str
    removed: list[str]  # torn down now
    already_gone: list[str]
    failed: dict[str, str]  # cluster -> reason; kept in the ledger for the next `down`
    fleet_removed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "removed": self.removed, "already_gone": self.already_gone,
                "failed": self.failed, "fleet_removed": self.fleet_removed}


def config_hash(config_json: Mapping[str, Any] | str) -> str:
    text = config_json if isinstance(config_json, str) else json.dumps(config_json, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def secrets_from_env(names: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The secrets' values from the environment; a missing one is an error before anything is launched."""
    env = os.environ if environ is None else environ
    missing = [name for name in names if not env.get(name)]
    if missing:
        raise MelangeError(f"{', '.join(missing)} not set in the environment: the replicas need "
                           f"{'it' if len(missing) == 1 else 'them'} (deployment.secrets); export "
                           f"{missing[0]}=... and rerun, or remove it from deployment.secrets")
    return {name: env[name] for name in names}


def replica_dict(r: ReplicaRecord) -> dict[str, Any]:
    return {"cluster": r.cluster, "fleet": r.fleet, "gpu": r.gpu, "offer": r.offer, "cloud": r.cloud,
            "region": r.region, "instance_type": r.instance_type, "use_spot": r.use_spot,
            "price_per_hour": r.price_per_hour, "state": r.state.value, "endpoint": r.endpoint,
            "last_error": r.last_error, "round": r.round, "updated": r.updated}


class Fleet:
    """Drives one backend and one ledger. Library code: returns reports, reports progress through `on_event`."""

    def __init__(self, backend: Backend, ledger: Ledger,
                 on_event: Callable[[ReplicaEvent], None] | None = None, heartbeat: float = HEARTBEAT_S):
        self.backend = backend
        self.ledger = ledger
        self.on_event = on_event or (lambda event: None)
        self.heartbeat = heartbeat
        self._in_flight: dict[str, tuple[str, float]] = {}  # cluster -> (gpu, launch start), for the heartbeat
        self._in_flight_lock = threading.Lock()

    def _heartbeat(self, round_: int) -> None:
        """Launches take minutes: say every `heartbeat` seconds which ones are still in flight, and for how long."""
        now = time.monotonic()
        with self._in_flight_lock:
            due = [(c, g, now - t) for c, (g, t) in sorted(self._in_flight.items()) if now - t >= self.heartbeat]
        for cluster, gpu, elapsed in due:
            self.on_event(ReplicaEvent(cluster, gpu, ReplicaState.LAUNCHING, elapsed, "still launching", round_))

    # -- up -------------------------------------------------------------------------------------------------------
    def dryrun(self, fleet: str, planner: Planner, environ: Mapping[str, str] | None = None) -> DryRunReport:
        """Everything but provisioning: plan against what the ledger has, validate every task; writes nothing.
        Secrets missing from `environ` are validated with a placeholder value and listed in the report."""
        plan = planner(self._reconcile_request(fleet, refresh=False))
        up = {r.cluster for r in self.ledger.replicas(plan.fleet, [ReplicaState.UP])}
        launch = [r for r in plan.replicas if r.cluster not in up]
        given = {name: (environ or {})[name] for name in plan.deployment.secrets if (environ or {}).get(name)}
        placeholders = {name: "placeholder" for name in plan.deployment.secrets}
        by_shape: dict[str, Validation] = {}  # replicas of one offer differ only in name: validate each shape once
        validations = {}
        for replica in launch:
            shape = json.dumps({**replica.task, "name": None}, sort_keys=True, default=str)
            if shape not in by_shape:
                by_shape[shape] = self.backend.validate(replica.task, {**placeholders, **given})
            validations[replica.cluster] = by_shape[shape]
        return DryRunReport(plan=plan, launch=launch, keep=sorted(up), validations=validations,
                            missing_secrets=sorted(set(placeholders) - set(given)))

    def up(self, fleet: str, planner: Planner, secrets: Mapping[str, str], config_digest: str,
           options: UpOptions = UpOptions()) -> UpReport:
        """Launch the planned fleet (or what is missing of it), re-planning around offers without capacity.
        `planner` must plan fleet `fleet` (the config's name)."""
        started = time.monotonic()
        with self.ledger.lock(fleet):
            request = self._reconcile_request(fleet, refresh=True)
            plan = planner(request)
            unavailable: list[str] = []
            rounds = 0
            interrupted = False
            while True:
                rounds += 1
                self.ledger.save_fleet(fleet, config_digest, plan.to_dict())
                todo = self._record_intent(plan, rounds)
                outcomes, interrupted = self._launch_all(todo, secrets, options, rounds, plan.deployment.port)
                full = sorted({r.offer for r, state in outcomes if state is ReplicaState.UNAVAILABLE})
                if interrupted or not full or rounds >= options.max_rounds:
                    break
                self._forget_unprovisioned([r.cluster for r, state in outcomes
                                            if state is ReplicaState.UNAVAILABLE])
                unavailable += [o for o in full if o not in unavailable]
                request = self._reconcile_request(fleet, refresh=False, exclude=frozenset(unavailable))
                try:
                    plan = planner(request)
                except MelangeError as exc:  # e.g. no fleet fits without those offers: report, do not crash
                    self._note(fleet, f"re-plan without {', '.join(unavailable)} failed: {exc}")
                    break
            replicas = self.ledger.replicas(fleet)
        return UpReport(fleet=fleet, plan=plan, replicas=replicas, rounds=rounds, unavailable_offers=unavailable,
                        interrupted=interrupted, seconds=time.monotonic() - started)

    def _forget_unprovisioned(self, clusters: list[str]) -> None:
        """Replicas that found no capacity are replaced by the re-plan; mark them GONE once the backend confirms
        no cluster was left behind (one that was is kept, so `down` removes it)."""
        live = self.backend.status(clusters, refresh=False)
        for cluster in clusters:
            if cluster in live and live[cluster].status is ClusterStatus.GONE:
                self.ledger.transition(cluster, ReplicaState.GONE, message="no capacity; replaced by the re-plan")

    def _note(self, fleet: str, message: str) -> None:
        self.on_event(ReplicaEvent(cluster="", gpu="", state=ReplicaState.FAILED, elapsed=0.0, message=message))

    def _reconcile_request(self, fleet: str, refresh: bool, exclude: frozenset[str] = frozenset()) -> PlanRequest:
        """Ask the ledger (and, with `refresh`, the backend) which replicas exist, as a planning request."""
        rows = [r for r in self.ledger.replicas(fleet) if r.state is not ReplicaState.GONE]
        if refresh and rows:
            live = self.backend.status([r.cluster for r in rows], refresh=False)
            for row in rows:
                info = live.get(row.cluster)
                if info is None:
                    continue
                if info.status is ClusterStatus.UP and row.state is not ReplicaState.UP:
                    self.ledger.transition(row.cluster, ReplicaState.UP, message="found up",
                                           endpoint=info.endpoint or row.endpoint)
                elif info.status is ClusterStatus.GONE and row.state in (ReplicaState.UP, ReplicaState.LAUNCHING):
                    self.ledger.transition(row.cluster, ReplicaState.GONE, message="not found by the backend")
            rows = [r for r in self.ledger.replicas(fleet) if r.state is not ReplicaState.GONE]
        fixed: dict[str, int] = {}
        names: dict[str, list[str]] = {}
        for row in sorted(rows, key=lambda r: (r.state is not ReplicaState.UP, _index(r.cluster), r.cluster)):
            if row.state is ReplicaState.UP:
                fixed[row.gpu] = fixed.get(row.gpu, 0) + 1
            if row.state is ReplicaState.UP or row.offer not in exclude:
                names.setdefault(row.gpu, []).append(row.cluster)
        return PlanRequest(fixed=fixed, names=names, exclude=exclude, taken=frozenset(r.cluster for r in rows))

    def _record_intent(self, plan: Plan, round_: int) -> list[ReplicaPlan]:
        """Write every replica that must launch as PENDING before any launch is requested."""
        todo = []
        for replica in plan.replicas:
            row = self.ledger.get_replica(replica.cluster)
            if row is not None and row.state is ReplicaState.UP:
                continue
            if row is not None and row.state is not ReplicaState.GONE:
                self.ledger.transition(replica.cluster, ReplicaState.PENDING, message=f"round {round_}: retry")
            else:
                self.ledger.add_replica(plan.fleet, NewReplica(
                    cluster=replica.cluster, gpu=replica.gpu, offer=replica.offer,
                    price_per_hour=replica.price, cloud=replica.cloud, region=replica.region,
                    instance_type=replica.instance_type, use_spot=replica.use_spot, round=round_,
                    task=replica.task), message=f"round {round_}: planned")
            self.on_event(ReplicaEvent(replica.cluster, replica.gpu, ReplicaState.PENDING, 0.0, round=round_))
            todo.append(replica)
        return todo

    def _launch_all(self, todo: list[ReplicaPlan], secrets: Mapping[str, str], options: UpOptions, round_: int,
                    port: int) -> tuple[list[tuple[ReplicaPlan, ReplicaState]], bool]:
        if not todo:
            return [], False
        stop = threading.Event()
        outcomes: list[tuple[ReplicaPlan, ReplicaState]] = []
        pool = ThreadPoolExecutor(max_workers=max(1, options.parallel), thread_name_prefix="melange-launch")
        futures = {pool.submit(self._launch_one, r, secrets, options, round_, port, stop): r for r in todo}
        interrupted = False
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=self.heartbeat, return_when=FIRST_COMPLETED)
                outcomes += [(futures[future], future.result()) for future in done]
                self._heartbeat(round_)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            for future in futures:
                future.cancel()
            try:
                self.backend.cancel([r.cluster for r in todo])
            except MelangeError:
                pass
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if interrupted:
            self._record_true_states([r.cluster for r in todo])
        return outcomes, interrupted

    def _record_true_states(self, clusters: list[str]) -> None:
        """After Ctrl-C: ask the backend what became of launches that were in flight, and record it."""
        unsure = [c for c in clusters
                  if (row := self.ledger.get_replica(c)) is not None
                  and row.state in (ReplicaState.LAUNCHING, ReplicaState.FAILED)]
        try:
            live = self.backend.status(unsure) if unsure else {}
        except MelangeError:
            live = {}
        for cluster in unsure:
            info = live.get(cluster)
            if info is not None and info.status is ClusterStatus.UP:
                self.ledger.transition(cluster, ReplicaState.UP, endpoint=info.endpoint, error=None,
                                       message="interrupted, but the launch had finished")
            elif info is not None and info.status is ClusterStatus.GONE:
                self.ledger.transition(cluster, ReplicaState.PENDING, error=None,
                                       message="interrupted before a cluster existed")
            elif self.ledger.get_replica(cluster).state is ReplicaState.LAUNCHING:
                self.ledger.transition(cluster, ReplicaState.FAILED, error="interrupted during launch; the cluster "
                                       "may exist: rerun `up` to resume or `down` to remove it")

    def _launch_one(self, replica: ReplicaPlan, secrets: Mapping[str, str], options: UpOptions, round_: int,
                    port: int, stop: threading.Event) -> ReplicaState:
        if stop.is_set():
            return ReplicaState.PENDING
        started = time.monotonic()
        self.ledger.transition(replica.cluster, ReplicaState.LAUNCHING, message=f"round {round_}")
        with self._in_flight_lock:
            self._in_flight[replica.cluster] = (replica.gpu, started)
        self.on_event(ReplicaEvent(replica.cluster, replica.gpu, ReplicaState.LAUNCHING, 0.0, round=round_))
        request = LaunchRequest(cluster=replica.cluster, task=replica.task, secrets=dict(secrets),
                                retry_until_up=options.retry_until_up,
                                idle_minutes_to_autostop=options.idle_minutes_to_autostop, down=options.down,
                                port=port)
        state, message, endpoint = ReplicaState.UP, "", None
        try:
            info = self.backend.launch(request)
            endpoint = info.endpoint
        except CapacityError as exc:
            state, message = ReplicaState.UNAVAILABLE, exc.reason
        except LaunchCancelled as exc:
            state, message = ReplicaState.FAILED, f"cancelled: {exc.reason}; the cluster may exist"
        except LaunchError as exc:
            state, message = ReplicaState.FAILED, exc.reason
        except MelangeError as exc:
            state, message = ReplicaState.FAILED, str(exc)
        except Exception as exc:  # a backend bug must not lose the replica's state
            state, message = ReplicaState.FAILED, f"{type(exc).__name__}: {exc}"
        with self._in_flight_lock:
            self._in_flight.pop(replica.cluster, None)
        if state is ReplicaState.UP:
            self.ledger.transition(replica.cluster, state, endpoint=endpoint, error=None, message=f"round {round_}")
        else:
            self.ledger.transition(replica.cluster, state, error=message)
        self.on_event(ReplicaEvent(replica.cluster, replica.gpu, state, time.monotonic() - started, message,
                                   round_))
        return state

    # -- status ---------------------------------------------------------------------------------------------------
    def status(self, fleet: str | None = None, refresh: bool = False) -> list[ReplicaRecord]:
        """Replicas from the ledger; with `refresh`, first reconciled with the backend's live view."""
        rows = self.ledger.replicas(fleet)
        if fleet is not None and self.ledger.get_fleet(fleet) is None:
            raise MelangeError(f"no fleet {fleet!r} in the ledger {self.ledger.path}; `melange-sky status` lists "
                               f"the fleets")
        live_rows = [r for r in rows if r.state is not ReplicaState.GONE]
        if refresh and live_rows:
            live = self.backend.status([r.cluster for r in live_rows], refresh=True)
            for row in live_rows:
                info = live.get(row.cluster)
                if info is None:
                    continue
                if info.status is ClusterStatus.GONE:
                    if row.state is not ReplicaState.PENDING:
                        self.ledger.transition(row.cluster, ReplicaState.GONE, message="refresh: not found",
                                               endpoint=None)
                elif info.status is ClusterStatus.UP:
                    if row.state is not ReplicaState.UP or (info.endpoint and info.endpoint != row.endpoint):
                        self.ledger.transition(row.cluster, ReplicaState.UP, message="refresh: up",
                                               endpoint=info.endpoint or row.endpoint)
            rows = self.ledger.replicas(fleet)
        return rows

    # -- down -----------------------------------------------------------------------------------------------------
    def down(self, fleet: str, purge: bool = False, parallel: int = DEFAULT_PARALLEL) -> DownReport:
        """Tear down every replica that may have a cluster; forget the fleet once all are gone."""
        if self.ledger.get_fleet(fleet) is None:
            raise MelangeError(f"no fleet {fleet!r} in the ledger {self.ledger.path}; `melange-sky status` lists "
                               f"the fleets")
        with self.ledger.lock(fleet):
            rows = [r for r in self.ledger.replicas(fleet) if r.state.may_have_cluster]
            removed: list[str] = []
            gone: list[str] = []
            failed: dict[str, str] = {}

            def one(row: ReplicaRecord) -> tuple[str, bool | None, str]:
                self.ledger.transition(row.cluster, ReplicaState.TERMINATING, message="down")
                self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.TERMINATING, 0.0))
                started = time.monotonic()
                try:
                    torn = self.backend.down(row.cluster, purge=purge)
                except MelangeError as exc:
                    reason = str(exc)
                except Exception as exc:  # noqa: BLE001 - recorded, and retried by the next `down`
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    self.ledger.transition(row.cluster, ReplicaState.GONE, endpoint=None,
                                           message="torn down" if torn else "already gone")
                    self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.GONE,
                                               time.monotonic() - started, "" if torn else "already gone"))
                    return row.cluster, torn, ""
                self.ledger.transition(row.cluster, ReplicaState.FAILED, error=f"down failed: {reason}")
                self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.FAILED, time.monotonic() - started,
                                           f"down failed: {reason}"))
                return row.cluster, None, reason

            with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="melange-down") as pool:
                for cluster, torn, reason in pool.map(one, rows):
                    if torn is None:
                        failed[cluster] = reason
                    elif torn:
                        removed.append(cluster)
                    else:
                        gone.append(cluster)
            fleet_removed = not failed
            if fleet_removed:
                self.ledger.remove_fleet(fleet)
        return DownReport(fleet=fleet, removed=sorted(removed), already_gone=sorted(gone), failed=failed,
                          fleet_removed=fleet_removed)


def _index(cluster: str) -> int:
    tail = cluster.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
