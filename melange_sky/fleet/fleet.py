"""The fleet lifecycle: bring a plan up, watch it, tear it down — through a `Backend`, recorded in the `Ledger`.

Rules this module keeps:
- a replica is written to the ledger (PENDING) before its launch is requested, and every outcome is recorded, so
  an interrupted `up` never leaves a cluster the ledger does not know about;
- what `up` shows for confirmation (`Preview`) is what it launches: both come from one reconciliation, under the
  fleet's lock;
- launches run concurrently, bounded by `parallel`; progress is reported through a callback (no printing here);
- a capacity failure marks the offer unavailable and re-plans the unmet demand without it, with the replicas
  already up kept as fixed capacity; after `max_rounds` the report says what is still missing;
- re-running `up` reconciles: replicas that are up stay (identified by GPU entry and offer, so a change of mode or
  of column names does not duplicate them), missing ones launch under reused names, never duplicated; replicas left
  outside the final plan that are not serving are torn down, so nothing is left billing unseen;
- `down` removes a fleet from the ledger only when every one of its clusters is gone.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from melange_sky.fleet.backends import Backend, ClusterInfo, ClusterStatus, LaunchRequest, Validation
from melange_sky.errors import (CapacityError, FleetBusy, LaunchCancelled, LaunchError, LedgerError, MelangeError,
                     MissingSecret, UnknownFleet)
from melange_sky.fleet.ledger import Ledger, NewReplica, ReplicaRecord, ReplicaState, running_cost

if TYPE_CHECKING:  # pragma: no cover - plan pulls in the solver and the catalog; `--help` imports this module
    from melange_sky.deploy.plan import Plan, PlanRequest, ReplicaPlan

DEFAULT_PARALLEL = 8  # launches mostly wait on clouds; SkyPilot's API server queues the rest
DEFAULT_MAX_ROUNDS = 5  # a round re-solves and launches only what is still missing
HEARTBEAT_S = 30.0  # how often `up` reports launches still in flight
CANCEL_POLL_S = 0.5  # after Ctrl-C, how often in-flight launches are cancelled again until every worker is done

Planner = Callable[["PlanRequest"], "Plan"]


@dataclass(frozen=True)
class UpOptions:
    parallel: int = DEFAULT_PARALLEL
    max_rounds: int = DEFAULT_MAX_ROUNDS  # launch rounds: the first, plus re-plans after capacity failures
    retry_until_up: bool = False
    idle_minutes_to_autostop: int | None = None
    down: bool = False  # autodown: tear the cluster down after idle_minutes_to_autostop


@dataclass(frozen=True)
class ReplicaEvent:
    """A replica changed state (for the live progress display). An empty `cluster` is a fleet-wide note."""

    cluster: str
    gpu: str
    state: ReplicaState | None
    elapsed: float  # seconds since this replica's launch was requested (0 before)
    message: str = ""
    round: int = 0


@dataclass(frozen=True)
class Preview:
    """What `up` is about to do, computed under the fleet's lock from the same reconciliation it then executes."""

    plan: Plan
    launch: list[ReplicaPlan]  # replicas to launch (new, or again: failed, stopped, gone)
    remove: list[str]  # replicas outside the plan that are not serving (failed, out of capacity): torn down
    surplus_stopped: list[str]  # stopped replicas outside the plan: kept
    keep: list[str]  # replicas up and part of the plan
    surplus: list[str]  # replicas up but not part of the plan (kept running; not counted in the plan's capacity)
    stale: list[str]  # replicas up whose task differs from the plan's (model, template or deployment changed)
    config_changed: bool  # the fleet was last planned from another config or other settings

    @property
    def launch_cost(self) -> float:
        return sum(r.price for r in self.launch)

    @property
    def notes(self) -> list[str]:
        """What the user should know before confirming: changed config, surplus or outdated replicas."""
        notes = []
        if self.config_changed:
            notes.append("the config or plan settings changed since this fleet was last brought up")
        if self.surplus:
            notes.append(f"{len(self.surplus)} replica(s) up are not in the new plan and are kept running "
                         f"({', '.join(self.surplus)}); `melange-sky down` the fleet and `up` again to shrink it")
        kept_stopped = self.surplus_stopped
        if kept_stopped:
            notes.append(f"{len(kept_stopped)} stopped replica(s) outside the plan are kept (disks only): "
                         f"{', '.join(kept_stopped)}; `melange-sky down` the fleet to delete them")
        if self.stale:
            notes.append(f"{len(self.stale)} replica(s) run an older task than the plan's (model, template or "
                         f"deployment changed): {', '.join(self.stale)}; `down` and `up` again to replace them")
        return notes

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.plan.fleet, "launch": [r.summary() for r in self.launch], "remove": self.remove,
                "keep": self.keep,
                "surplus": self.surplus, "stale": self.stale, "config_changed": self.config_changed,
                "notes": self.notes,
                "cost_planned": round(self.plan.cost, 6), "cost_to_launch": round(self.launch_cost, 6)}


@dataclass
class UpReport:
    """What `up` did: the final plan, every replica's final ledger row, the rounds, offers found full, notes."""

    fleet: str
    plan: Plan
    replicas: list[ReplicaRecord]
    rounds: int
    unavailable_offers: list[str]
    interrupted: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # e.g. why a re-plan failed, surplus or stale replicas

    @property
    def up(self) -> list[ReplicaRecord]:
        return [r for r in self.replicas if r.state is ReplicaState.UP]

    @property
    def problems(self) -> list[ReplicaRecord]:
        """Replicas not up that may still have a cluster: planned ones that did not come up, and leftovers that
        could not be torn down (stopped replicas outside the plan are kept on purpose: see `notes`)."""
        planned = {r.cluster for r in self.plan.replicas}
        return [r for r in self.replicas if r.state not in (ReplicaState.UP, ReplicaState.GONE)
                and not (r.state is ReplicaState.STOPPED and r.cluster not in planned)]

    @property
    def complete(self) -> bool:
        planned = {r.cluster for r in self.up}
        return (not self.interrupted and not self.problems
                and all(r.cluster in planned for r in self.plan.replicas))

    @property
    def cost(self) -> float:
        return sum(r.price_per_hour for r in self.up)

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "complete": self.complete, "interrupted": self.interrupted,
                "rounds": self.rounds, "seconds": round(self.seconds, 3), "cost_up": round(self.cost, 6),
                "cost_planned": round(self.plan.cost, 6), "unavailable_offers": self.unavailable_offers,
                "notes": self.notes, "replicas": [r.to_dict() for r in self.replicas]}


@dataclass(frozen=True)
class DryRunReport:
    """What `up --dryrun` found: the plan, which replicas would launch or stay, and how each task validated."""

    preview: Preview
    validations: dict[str, Validation]
    missing_secrets: list[str] = field(default_factory=list)

    @property
    def plan(self) -> Plan:
        return self.preview.plan

    def to_dict(self) -> dict[str, Any]:
        return {**self.preview.to_dict(), "dryrun": True, "clouds": self.plan.clouds,
                "missing_secrets": self.missing_secrets,
                "validation": {k: str(v) for k, v in self.validations.items()}}


@dataclass(frozen=True)
class StatusReport:
    """Fleets and their replicas as the ledger has them (after a refresh, as the launcher saw them)."""

    fleets: list[Any]  # ledger.FleetRecord
    replicas: list[ReplicaRecord]

    def of(self, fleet: str) -> list[ReplicaRecord]:
        return [r for r in self.replicas if r.fleet == fleet]

    def to_dict(self) -> dict[str, Any]:
        return {"fleets": [{"name": f.name, "config_hash": f.config_hash, "created": f.created,
                            "updated": f.updated, "cost_running": round(running_cost(self.of(f.name)), 6),
                            "replicas": [r.to_dict() for r in self.of(f.name)]} for f in self.fleets]}


@dataclass
class DownReport:
    fleet: str
    removed: list[str]  # torn down now
    already_gone: list[str]
    failed: dict[str, str]  # cluster -> reason; kept in the ledger for the next `down`
    fleet_removed: bool
    busy: str | None = None  # another process held the fleet's lock: nothing was done

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "removed": self.removed, "already_gone": self.already_gone,
                "failed": self.failed, "fleet_removed": self.fleet_removed, "busy": self.busy}


def config_hash(*parts: Any) -> str:
    """A short digest of the effective config and the settings that shape the plan."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def secrets_from_env(names: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The secrets' values from the environment; a missing one is an error before anything is launched."""
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise MissingSecret(f"{', '.join(missing)} not set in the environment: the replicas need "
                            f"{'it' if len(missing) == 1 else 'them'} at launch. Export {missing[0]}=... and rerun, "
                            f"or set \"deployment\": {{\"secrets\": []}} in the config if the model needs no token")
    return {name: environ[name] for name in names}


class Fleet:
    """Drives one backend and one ledger. Library code: returns reports, reports progress through `on_event`.

    `ledger` may be None for a dry run on a machine that has never launched anything (nothing is written)."""

    def __init__(self, backend: Backend | None, ledger: Ledger | None,
                 on_event: Callable[[ReplicaEvent], None] | None = None, heartbeat: float = HEARTBEAT_S):
        self.backend = backend
        self.ledger = ledger
        self.on_event = on_event or (lambda event: None)
        self.heartbeat = heartbeat
        self._in_flight: dict[str, tuple[str, float]] = {}  # cluster -> (gpu, launch start), for the heartbeat
        self._in_flight_lock = threading.Lock()

    # -- reading the ledger ---------------------------------------------------------------------------------------
    def _rows(self, fleet: str) -> list[ReplicaRecord]:
        return self.ledger.replicas(fleet) if self.ledger is not None else []

    def _sync(self, rows: list[ReplicaRecord], refresh: bool, may_write_in_flight: bool) -> list[ClusterInfo]:
        """Record what the backend says of `rows` (clusters that may exist). One rule for `up` and `status`:
        UP → up (endpoint fetched if unknown); STOPPED → stopped; INIT on an up row → failed (unhealthy); GONE →
        gone. Each write is a compare-and-set against the state read, so a concurrent `up`/`down` is never
        overwritten; rows whose launch or teardown may be in flight elsewhere (pending, launching, terminating) are
        only changed when `may_write_in_flight` (the caller holds the fleet's lock)."""
        live = [r for r in rows if r.state is not ReplicaState.GONE]
        if not live:
            return []
        answer = self.backend.status([r.cluster for r in live], refresh=refresh)
        for row in live:
            info = answer.get(row.cluster)
            if info is None or (row.state.in_flight and not may_write_in_flight):
                continue
            if info.status is ClusterStatus.UP:
                endpoint = info.endpoint or row.endpoint or self._endpoint(row)
                if row.state is not ReplicaState.UP or endpoint != row.endpoint:
                    self.ledger.transition(row.cluster, ReplicaState.UP, endpoint=endpoint, error=None,
                                           message="backend: up", expect=row.state)
            elif info.status is ClusterStatus.STOPPED and row.state is not ReplicaState.STOPPED:
                self.ledger.transition(row.cluster, ReplicaState.STOPPED, endpoint=None, message="backend: stopped",
                                       expect=row.state)
            elif info.status is ClusterStatus.INIT and row.state is ReplicaState.UP:
                self.ledger.transition(row.cluster, ReplicaState.FAILED, endpoint=None, expect=row.state,
                                       error="the launcher reports it INIT (provisioning or unhealthy); `up` "
                                             "relaunches it")
            elif info.status is ClusterStatus.GONE and row.state is not ReplicaState.PENDING:
                self.ledger.transition(row.cluster, ReplicaState.GONE, endpoint=None, message="backend: not found",
                                       expect=row.state)
        return list(answer.values())

    def _endpoint(self, row: ReplicaRecord) -> str | None:
        """Ask the backend for the serving endpoint of an up replica whose status answer had none."""
        port = _task_port(row.task)
        if port is None:
            return None
        try:
            return self.backend.endpoint(row.cluster, port)
        except MelangeError:
            return None

    def _request(self, fleet: str, exclude: frozenset[str] = frozenset()) -> PlanRequest:
        """The ledger's replicas as a planning request: capacity up, names to reuse, names taken."""
        from melange_sky.deploy.plan import PlanRequest

        rows = [r for r in self._rows(fleet) if r.state is not ReplicaState.GONE]
        fixed: dict[tuple[str, str], int] = {}
        names = []
        for row in sorted(rows, key=lambda r: (r.state is not ReplicaState.UP, _index(r.cluster), r.cluster)):
            if row.state is ReplicaState.UP:
                fixed[row.gpu, row.offer] = fixed.get((row.gpu, row.offer), 0) + 1
            # Reusable names: up replicas (kept), and not-up ones whose cluster name can take a new launch: any on
            # an offer still in use, and those that found no capacity (no cluster was made) wherever they were.
            if row.state in (ReplicaState.UP, ReplicaState.UNAVAILABLE) or row.offer not in exclude:
                names.append((row.gpu, row.offer, row.cluster))
        return PlanRequest(fixed=fixed, names=tuple(names), exclude=exclude, taken=frozenset(r.cluster for r in rows))

    def _preview(self, fleet: str, plan: Plan, digest: str | None) -> Preview:
        rows = {r.cluster: r for r in self._rows(fleet)}
        taken = [r.cluster for r in plan.replicas if r.cluster not in rows and self.ledger is not None
                 and (other := self.ledger.get_replica(r.cluster)) is not None and other.fleet != fleet]
        if taken:
            other = self.ledger.get_replica(taken[0])
            raise LedgerError(f"cluster {taken[0]} already belongs to fleet {other.fleet!r} (fleet names that differ "
                              f"only in case or punctuation share cluster names); choose another --name")
        up = {c for c, r in rows.items() if r.state is ReplicaState.UP}
        planned = {r.cluster: r for r in plan.replicas}
        record = self.ledger.get_fleet(fleet) if self.ledger is not None else None
        return Preview(
            plan=plan, launch=[r for r in plan.replicas if r.cluster not in up],
            remove=sorted(c for c, r in rows.items() if c not in planned and r.state.not_serving),
            surplus_stopped=sorted(c for c, r in rows.items() if c not in planned and r.state is ReplicaState.STOPPED),
            keep=sorted(c for c in up if c in planned), surplus=sorted(c for c in up if c not in planned),
            stale=sorted(c for c in up if c in planned and _task_differs(rows[c].task, planned[c].task)),
            config_changed=record is not None and digest is not None and record.config_hash != digest)

    # -- up -------------------------------------------------------------------------------------------------------
    def dryrun(self, fleet: str, planner: Planner, environ: Mapping[str, str] | None = None) -> DryRunReport:
        """Everything but provisioning: plan against what the ledger has, validate every task; writes nothing.
        Secrets missing from `environ` are validated with a placeholder value and listed in the report."""
        preview = self._preview(fleet, planner(self._request(fleet)), None)
        env = environ or {}
        secrets = preview.plan.deployment.secrets
        given = {name: env[name] for name in secrets if env.get(name)}
        by_shape: dict[str, Validation] = {}  # replicas of one offer differ only in name: validate each shape once
        validations = {}
        for replica in preview.launch:
            shape = json.dumps({**replica.task, "name": None}, sort_keys=True, default=str)
            if shape not in by_shape:
                by_shape[shape] = self.backend.validate(replica.task, {**{n: "placeholder" for n in secrets},
                                                                       **given})
            validations[replica.cluster] = by_shape[shape]
        return DryRunReport(preview=preview, validations=validations,
                            missing_secrets=sorted(set(secrets) - set(given)))

    def up(self, fleet: str, planner: Planner, secrets: Mapping[str, str], config_digest: str,
           options: UpOptions = UpOptions(),
           confirm: Callable[[Preview, list[str]], bool] | None = None) -> UpReport:
        """Launch the planned fleet (or what is missing of it), re-planning around offers without capacity.

        `planner` must plan fleet `fleet`. `confirm` is shown the preview (under the lock, before anything is
        launched); returning False stops there."""
        from melange_sky.deploy.plan import PlanRequest

        started = time.monotonic()
        with self.ledger.lock(fleet):
            self._sync(self._rows(fleet), refresh=False, may_write_in_flight=True)
            plan = planner(self._request(fleet))
            preview = self._preview(fleet, plan, config_digest)
            report = UpReport(fleet=fleet, plan=plan, replicas=[], rounds=0, unavailable_offers=[],
                              notes=list(preview.notes))
            try:  # only for a note: a fresh plan that ignores what is up (it may not even be feasible)
                unconstrained = planner(PlanRequest()) if preview.keep else plan
            except MelangeError:
                unconstrained = plan
            if unconstrained.cost < 0.99 * plan.cost:
                report.notes.append(f"the load alone needs ${unconstrained.cost:.2f}/h "
                                    f"({len(unconstrained.replicas)} replica(s)); the replicas already up are kept, "
                                    f"so the fleet costs ${plan.cost:.2f}/h: `down` and `up` again to shrink it")
            if confirm is not None and not confirm(preview, report.notes):
                report.replicas = self._rows(fleet)
                report.notes.append("not confirmed: nothing was launched")
                return report
            self.ledger.save_fleet(fleet, config_digest, plan.to_dict())
            try:
                self._rounds(report, planner, secrets, options)
                if not report.interrupted:  # the user asked to stop: no minutes of teardown now
                    self._tear_down_leftovers(report)
            except KeyboardInterrupt:  # outside a launch wait (a re-plan's solve, a ledger write): stop cleanly
                report.interrupted = True
                self._record_true_states([r.cluster for r in self._rows(fleet)])
            report.replicas = self._rows(fleet)
        report.seconds = time.monotonic() - started
        return report

    def _rounds(self, report: UpReport, planner: Planner, secrets: Mapping[str, str], options: UpOptions) -> None:
        while True:
            report.rounds += 1
            todo = self._record_intent(report.plan, report.rounds)
            outcomes, interrupted = self._launch_all(todo, secrets, options, report.rounds, report.plan.deployment.port)
            full = sorted({r.offer for r, state in outcomes if state is ReplicaState.UNAVAILABLE})
            report.unavailable_offers += [o for o in full if o not in report.unavailable_offers]
            if interrupted:
                report.interrupted = True
                return
            if not full:
                return
            if report.rounds >= options.max_rounds:
                report.notes.append(f"stopped after {report.rounds} round(s) (--max-rounds): no capacity on "
                                    f"{', '.join(full)}")
                return
            try:
                plan = planner(self._request(report.fleet, exclude=frozenset(report.unavailable_offers)))
            except MelangeError as exc:  # e.g. no fleet fits without those offers: report it, launch nothing more
                report.notes.append(f"re-plan without {', '.join(report.unavailable_offers)} failed: {exc}")
                self.on_event(ReplicaEvent("", "", None, 0.0, report.notes[-1], report.rounds))
                return
            self._forget_unprovisioned([r.cluster for r, state in outcomes if state is ReplicaState.UNAVAILABLE],
                                       keep={r.cluster for r in plan.replicas})
            report.plan = plan
            self.ledger.save_fleet(report.fleet, self.ledger.get_fleet(report.fleet).config_hash, plan.to_dict())

    def _forget_unprovisioned(self, clusters: list[str], keep: set[str]) -> None:
        """Replicas that found no capacity and that the re-plan does not reuse are marked GONE once the backend
        confirms no cluster was left behind (one that was is kept, for `up` or `down` to remove)."""
        dropped = [c for c in clusters if c not in keep]
        try:
            live = self.backend.status(dropped, refresh=False) if dropped else {}
        except MelangeError:  # unconfirmed: the rows stay unavailable, and `up`/`down` deal with them later
            return
        for cluster in dropped:
            if cluster in live and live[cluster].status is ClusterStatus.GONE:
                self.ledger.transition(cluster, ReplicaState.GONE, message="no capacity; replaced by the re-plan")

    def _tear_down_leftovers(self, report: UpReport) -> None:
        """Replicas outside the final plan that are not serving (failed, stopped, out of capacity) may still bill:
        tear them down. Surplus replicas that are up are kept (they serve) and reported."""
        planned = {r.cluster for r in report.plan.replicas}
        for row in self._rows(report.fleet):
            if row.cluster in planned or not row.state.not_serving:
                continue
            try:
                torn = self.backend.down(row.cluster)
            except MelangeError as exc:
                report.notes.append(f"{row.cluster} is not in the plan and could not be torn down: {exc}")
                continue
            self.ledger.transition(row.cluster, ReplicaState.GONE, endpoint=None,
                                   message="not in the plan: torn down" if torn else "not in the plan: gone")
            self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.GONE, 0.0, "not in the plan: removed"))
            if row.state is ReplicaState.FAILED and row.last_error:
                report.notes.append(f"{row.cluster} failed ({row.last_error}); replaced and torn down")

    def _record_intent(self, plan: Plan, round_: int) -> list[ReplicaPlan]:
        """Write every replica that must launch as PENDING before any launch is requested."""
        todo = []
        for replica in plan.replicas:
            row = self.ledger.get_replica(replica.cluster)
            if row is not None and row.state is ReplicaState.UP:
                continue
            new = NewReplica(cluster=replica.cluster, gpu=replica.entry, offer=replica.offer,
                             price_per_hour=replica.price, cloud=replica.cloud, region=replica.region,
                             instance_type=replica.instance_type, use_spot=replica.use_spot, round=round_,
                             task=replica.task)
            if row is not None and row.state is not ReplicaState.GONE:
                self.ledger.replan_replica(plan.fleet, new, message=f"round {round_}: launch again on {new.offer}")
            else:
                self.ledger.add_replica(plan.fleet, new, message=f"round {round_}: planned on {new.offer}")
            self.on_event(ReplicaEvent(replica.cluster, replica.entry, ReplicaState.PENDING, 0.0, round=round_))
            todo.append(replica)
        return todo

    def _launch_all(self, todo: list[ReplicaPlan], secrets: Mapping[str, str], options: UpOptions, round_: int,
                    port: int) -> tuple[list[tuple[ReplicaPlan, ReplicaState]], bool]:
        if not todo:
            return [], False
        stop = threading.Event()
        outcomes: list[tuple[ReplicaPlan, ReplicaState]] = []
        pool = ThreadPoolExecutor(max_workers=max(1, options.parallel), thread_name_prefix="melange-launch")
        futures: dict = {}
        interrupted = False
        try:
            for replica in todo:
                futures[pool.submit(self._launch_one, replica, secrets, options, round_, port, stop)] = replica
            pending = set(futures)
            next_beat = time.monotonic() + self.heartbeat
            while pending:
                done, pending = wait(pending, timeout=max(0.0, next_beat - time.monotonic()),
                                     return_when=FIRST_COMPLETED)
                outcomes += [(futures[future], future.result()) for future in done]
                if time.monotonic() >= next_beat:
                    self._heartbeat(round_)
                    next_beat = time.monotonic() + self.heartbeat
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            for future in futures:
                future.cancel()
            clusters = [r.cluster for r in todo]
            # A worker may have passed its stop check just before the flag was set: keep cancelling until every
            # worker has returned, so no launch starts (and waits out a provisioning) after Ctrl-C.
            while not all(f.done() for f in futures):
                try:
                    self.backend.cancel(clusters)
                except MelangeError:
                    pass
                wait(list(futures), timeout=CANCEL_POLL_S)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if interrupted:
            self._record_true_states([r.cluster for r in todo])
        return outcomes, interrupted

    def _heartbeat(self, round_: int) -> None:
        """Launches take minutes: every `heartbeat` seconds, say which are still in flight, and for how long."""
        now = time.monotonic()
        with self._in_flight_lock:
            flying = sorted(self._in_flight.items())
        for cluster, (gpu, since) in flying:
            self.on_event(ReplicaEvent(cluster, gpu, ReplicaState.LAUNCHING, now - since, "still launching", round_))

    def _record_true_states(self, clusters: list[str]) -> None:
        """After Ctrl-C: ask the backend what became of launches that were in flight, and record it."""
        unsure = [c for c in clusters
                  if (row := self.ledger.get_replica(c)) is not None
                  and row.state.cluster_uncertain]
        try:
            live = self.backend.status(unsure) if unsure else {}
        except MelangeError:
            live = {}
        for cluster in unsure:
            info = live.get(cluster)
            if info is not None and info.status is ClusterStatus.UP:
                endpoint = info.endpoint or self._endpoint(self.ledger.get_replica(cluster))
                self.ledger.transition(cluster, ReplicaState.UP, endpoint=endpoint, error=None,
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
            self._in_flight[replica.cluster] = (replica.entry, started)
        self.on_event(ReplicaEvent(replica.cluster, replica.entry, ReplicaState.LAUNCHING, 0.0, round=round_))
        request = LaunchRequest(cluster=replica.cluster, task=replica.task, secrets=dict(secrets),
                                retry_until_up=options.retry_until_up,
                                idle_minutes_to_autostop=options.idle_minutes_to_autostop, down=options.down,
                                port=port)
        state, message, endpoint = ReplicaState.UP, "", None
        try:
            endpoint = self.backend.launch(request).endpoint
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
        finally:
            with self._in_flight_lock:
                self._in_flight.pop(replica.cluster, None)
        if state is ReplicaState.UP:
            self.ledger.transition(replica.cluster, state, endpoint=endpoint, error=None, message=f"round {round_}")
        else:
            self.ledger.transition(replica.cluster, state, error=message)
        self.on_event(ReplicaEvent(replica.cluster, replica.entry, state, time.monotonic() - started, message,
                                   round_))
        return state

    # -- status ---------------------------------------------------------------------------------------------------
    def status(self, fleet: str | None = None, refresh: bool = False) -> list[ReplicaRecord]:
        """Replicas from the ledger; with `refresh`, first reconciled with the backend's live view. While another
        process runs `up`/`down` on a fleet, its in-flight rows are left for that process to record."""
        if fleet is not None and (self.ledger is None or self.ledger.get_fleet(fleet) is None):
            raise UnknownFleet(f"no fleet {fleet!r} in the ledger; `melange-sky status` lists the fleets")
        if self.ledger is None:
            return []
        if refresh:  # read-only as far as locks go: `status` never blocks a concurrent `up` or `down`
            names = [fleet] if fleet is not None else [f.name for f in self.ledger.fleets()]
            for name in names:
                self._sync(self._rows(name), refresh=True, may_write_in_flight=False)
        return self.ledger.replicas(fleet)

    def status_report(self, fleet: str | None = None, refresh: bool = False) -> StatusReport:
        replicas = self.status(fleet, refresh)
        fleets = [f for f in (self.ledger.fleets() if self.ledger is not None else []) if fleet in (None, f.name)]
        return StatusReport(fleets=fleets, replicas=replicas)

    # -- down -----------------------------------------------------------------------------------------------------
    def down(self, fleet: str, purge: bool = False, parallel: int = DEFAULT_PARALLEL) -> DownReport:
        """Tear down every replica that may have a cluster; forget the fleet once all are gone. A fleet another
        process holds is reported busy (not an error), so `down --all` goes on with the others."""
        if self.ledger is None or self.ledger.get_fleet(fleet) is None:
            return DownReport(fleet=fleet, removed=[], already_gone=[], failed={}, fleet_removed=False)
        try:
            lock = self.ledger.lock(fleet).acquire()
        except FleetBusy as exc:
            return DownReport(fleet=fleet, removed=[], already_gone=[], failed={}, fleet_removed=False,
                              busy=str(exc))
        try:
            return self._down_locked(fleet, purge, parallel)
        finally:
            lock.release()

    def _down_locked(self, fleet: str, purge: bool, parallel: int) -> DownReport:
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
                self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.GONE, time.monotonic() - started,
                                           "" if torn else "already gone"))
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
        if not failed:
            self.ledger.remove_fleet(fleet)
        return DownReport(fleet=fleet, removed=sorted(removed), already_gone=sorted(gone), failed=failed,
                          fleet_removed=not failed)


def _task_differs(stored: Mapping[str, Any] | None, planned: Mapping[str, Any]) -> bool:
    """Whether a running replica's task is not the plan's, ignoring what only names or places it (a re-plan may
    render a kept replica at another offer of the same GPU)."""
    if stored is None:
        return False

    def essence(task: Mapping[str, Any]) -> str:
        resources = {k: v for k, v in (task.get("resources") or {}).items()
                     if k not in ("cloud", "region", "instance_type", "use_spot")}
        return json.dumps({**task, "name": None, "resources": resources}, sort_keys=True, default=str)

    return essence(stored) != essence(planned)


def _task_port(task: Mapping[str, Any] | None) -> int | None:
    """The serving port a rendered task opens (`resources.ports`: an int, a string or a list of them)."""
    ports = ((task or {}).get("resources") or {}).get("ports")
    first = ports[0] if isinstance(ports, list) and ports else ports
    try:
        return int(str(first).split("-")[0]) if first is not None else None
    except ValueError:
        return None


def _index(cluster: str) -> int:
    match = re.search(r"-(\d+)$", cluster)
    return int(match.group(1)) if match else 0
