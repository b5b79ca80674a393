"""The fleet lifecycle: bring a plan up, watch it, tear it down — through a `Backend`, recorded in the `Ledger`.

It does the reading, writing and waiting (threads, ledger, backend); what to plan, launch, record or tear down is
decided by the pure rules in `reconcile`, and what it returns is in `reports`. The guarantees it keeps:
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
- a fleet may have a router (one more cluster, a small CPU instance: the fleet's endpoint); after every change of
  the replicas, the ones up are pushed to it (`PUT /admin/routes`), so its membership is the ledger's;
- a shrink (a re-plan that needs fewer replicas, or another mix) is make-before-break: the new plan comes up first,
  then the replicas it no longer needs leave the router, finish their requests (up to the drain timeout) and only
  then are torn down, each step recorded;
- `down` removes a fleet from the ledger only when every one of its clusters (the router too) is gone.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from melange_sky._signals import signals_held
from melange_sky.deploy.membership import get_admin_routes, normalise_url, push_routes, routes_document
from melange_sky.deploy.plan import Plan, PlanRequest, ReplicaPlan
from melange_sky.deploy.router_task import router_certfile
from melange_sky.errors import BackendError, FleetBusy, LauncherMismatch, MelangeError, UnknownFleet
from melange_sky.fleet import reconcile
from melange_sky.fleet.backends import (Backend, ClusterInfo, ClusterStatus, LaunchRequest, Validation,
                                        needs_model_secrets)
from melange_sky.fleet.hosted import HOSTED, controller_mode, sync_from_controller
from melange_sky.fleet.keys import ADMIN_TOKEN_ENV, API_KEY_ENV, FleetKeys, forget_keys, load_keys
from melange_sky.fleet.launchers import check_launcher, launcher_record, launcher_text, reaches
from melange_sky.fleet.ledger import Event, Ledger, ReplicaRecord, ReplicaState, Role
from melange_sky.fleet.reports import (DownReport, DryRunReport, Preview, ReplicaEvent, StatusReport, UpReport,
                                       Usage, usage)

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "DEFAULT_MAX_ROUNDS", "DEFAULT_PARALLEL", "DownReport", "DryRunReport", "Fleet",
           "Planner", "Preview", "ReplicaEvent", "RouterSetup", "StatusReport", "UpOptions", "UpReport"]

DEFAULT_PARALLEL = 8  # launches mostly wait on clouds; SkyPilot's API server queues the rest
DEFAULT_MAX_ROUNDS = 5  # a round re-solves and launches only what is still missing
HEARTBEAT_S = 30.0  # how often `up` reports launches still in flight
CANCEL_POLL_S = 0.5  # after Ctrl-C, how often in-flight launches are cancelled again until every worker is done
INTERRUPT_POLL_S = 0.2  # while launches run, how soon a held Ctrl-C is seen
DEFAULT_DRAIN_TIMEOUT = 120.0  # seconds a removed replica may take to finish its requests before its teardown
DRAIN_POLL_S = 0.5  # how often a drain asks the router what is still in flight
ROUTER_TIMEOUT_S = 10.0  # one admin call to the router

Planner = Callable[[PlanRequest], Plan]


@dataclass(frozen=True)
class RouterSetup:
    """The fleet's router for `up`: its task, planned from the replicas' plan (the cloud hosting most of them), and
    the fleet's keys (the admin token for membership pushes; the client key it admits)."""

    plan: Callable[[Plan], ReplicaPlan]
    keys: FleetKeys
    upstream_secrets: Mapping[str, str] = field(default_factory=dict, repr=False)  # the replicas' key, if another

    @property
    def secrets(self) -> dict[str, str]:
        """What the router's launch gets (in memory, as SkyPilot secrets): its admin token and client key."""
        return {**self.upstream_secrets, ADMIN_TOKEN_ENV: self.keys.admin_token, API_KEY_ENV: self.keys.api_key}


@dataclass(frozen=True)
class _RouterLink:
    """How to call a fleet's router: its base URL, the admin token, and the certificate an https one must show."""

    url: str
    admin_token: str = field(repr=False)
    cafile: str | None = None


@dataclass(frozen=True)
class UpOptions:
    """How `up` launches: concurrency, re-plan rounds, and what SkyPilot does with idle clusters."""

    parallel: int = DEFAULT_PARALLEL
    max_rounds: int = DEFAULT_MAX_ROUNDS  # launch rounds: the first, plus re-plans after capacity failures
    retry_until_up: bool = False
    idle_minutes_to_autostop: int | None = None
    down: bool = False  # autodown: tear the cluster down after idle_minutes_to_autostop
    shrink: bool = True  # replicas up that a fresh plan does not need are drained and torn down (False: kept)
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT


class Fleet:
    """Drives one backend and one ledger. Library code: returns reports, reports progress through `on_event`. The
    rules (what to plan, launch, record, tear down) are `reconcile`'s; this class reads, writes and waits.

    `ledger` may be None for a dry run on a machine that has never launched anything (nothing is written), and
    `backend` None for reading the ledger without a refresh. `launchers`: the launcher of each fleet by name
    (`launchers.fleet_launchers`: each its own), for `status` and `down` over fleets of several launchers; a fleet
    not in it uses `backend`. A fleet is never driven through another launcher than the one it records
    (LauncherMismatch): that one would take its clusters for gone."""

    def __init__(self, backend: Backend | None, ledger: Ledger | None,
                 on_event: Callable[[ReplicaEvent], None] | None = None, heartbeat: float = HEARTBEAT_S,
                 launchers: Mapping[str, Backend] | None = None):
        self.backend = backend
        self.launchers = dict(launchers or {})
        self.ledger = ledger
        self.on_event = on_event or (lambda event: None)
        self.heartbeat = heartbeat
        self._in_flight: dict[str, tuple[str, float]] = {}  # cluster -> (gpu, launch start), for the heartbeat
        self._in_flight_lock = threading.Lock()
        self._router: RouterSetup | None = None  # during `up`: the router's task planner and the fleet's keys
        self._router_cluster: str | None = None
        self._record: dict[str, Any] = {}  # during `up`: what the ledger keeps beside the plan

    @property
    def _db(self) -> Ledger:
        """The ledger, for the operations that write (a dry run and a plain `status` may have none)."""
        assert self.ledger is not None, "this operation needs a ledger"
        return self.ledger

    @property
    def _launcher(self) -> Backend:
        assert self.backend is not None, "this operation needs a backend"
        return self.backend

    def _for(self, fleet: str) -> Fleet:
        """This object on `fleet`'s own launcher (`launchers`), checked against the one the ledger records."""
        backend = self.launchers.get(fleet, self.backend)
        assert backend is not None, "this operation needs a backend"
        check_launcher(self.ledger.get_fleet(fleet) if self.ledger is not None else None, backend)
        if backend is self.backend:
            return self
        return Fleet(backend, self.ledger, self.on_event, self.heartbeat)

    # -- reading the ledger and the launcher ----------------------------------------------------------------------
    def _rows(self, fleet: str) -> list[ReplicaRecord]:
        return self.ledger.replicas(fleet) if self.ledger is not None else []

    def _row(self, cluster: str) -> ReplicaRecord:
        row = self._db.get_replica(cluster)
        assert row is not None, f"{cluster} is in the ledger"  # rows are never deleted while the fleet is locked
        return row

    def _sync(self, rows: list[ReplicaRecord], refresh: bool, may_write_in_flight: bool) -> list[ClusterInfo]:
        """Record what the backend says of `rows` (clusters that may exist), by `reconcile.status_transition`.

        Each write is a compare-and-set against the row's version as read, so a row that changed meanwhile (even
        one that left its state and came back to it) is never overwritten with an outdated answer. Rows whose
        launch or teardown may be in flight elsewhere (pending, launching, terminating) are only changed when
        `may_write_in_flight` (the caller holds the fleet's lock). A cluster is recorded gone only on a refreshed
        answer: a cached one misses clusters created moments ago, so it is confirmed first."""
        live = [r for r in rows if r.state is not ReplicaState.GONE]
        if not live:
            return []
        answer = self._status([r.cluster for r in live], refresh=refresh)
        unconfirmed = [c for c, info in answer.items() if info.status is ClusterStatus.GONE and not refresh]
        if unconfirmed:
            answer.update(self._status(unconfirmed, refresh=True))
        for row in live:
            info = answer.get(row.cluster)
            if info is None or (row.state.in_flight and not may_write_in_flight):
                continue
            endpoint = None
            if info.status is ClusterStatus.UP:
                endpoint = _reached_at(row.task, info.endpoint or row.endpoint or self._endpoint(row))
            change = reconcile.status_transition(row, info.status, endpoint)
            if change is not None:
                self._db.transition(row.cluster, change.state, message=change.message, expect=row,
                                    **change.changes())
        return list(answer.values())

    def _status(self, clusters: list[str], refresh: bool) -> dict[str, ClusterInfo]:
        """The backend's status answer; whatever a (third-party) backend raises becomes a BackendError, which every
        caller handles as "no answer"."""
        try:
            return self._launcher.status(clusters, refresh=refresh)
        except MelangeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a backend's bug must not abort `up` or `down` halfway
            raise BackendError(f"the launcher's status failed: {type(exc).__name__}: {exc}") from exc

    def _down(self, cluster: str, purge: bool = False) -> bool:
        """`backend.down`, with anything it raises as a BackendError (see `_status`)."""
        try:
            return self._launcher.down(cluster, purge=purge)
        except MelangeError:
            raise
        except Exception as exc:  # noqa: BLE001 - see `_status`
            raise BackendError(f"teardown failed: {type(exc).__name__}: {exc}") from exc

    def _endpoint(self, row: ReplicaRecord) -> str | None:
        """Ask the backend for the serving endpoint of an up replica whose status answer had none."""
        port = reconcile.task_port(row.task)
        if port is None:
            return None
        try:
            return self._launcher.endpoint(row.cluster, port)
        except Exception:  # noqa: BLE001 - no endpoint yet: a later `status --refresh` asks again
            return None

    def _clusters(self, fleet: str) -> list[ReplicaRecord]:
        """Every cluster of the fleet: its replicas and its router."""
        return self.ledger.replicas(fleet, roles=None) if self.ledger is not None else []

    def _preview(self, fleet: str, plan: Plan, digest: str | None, shrink: bool = False,
                 router: ReplicaPlan | None = None) -> Preview:
        rows = self._rows(fleet)
        known = {r.cluster for r in rows}
        owners = {}  # who owns the planned names this fleet does not have (a name must not cross fleets)
        if self.ledger is not None:
            for replica in plan.replicas:
                if replica.cluster not in known and (other := self.ledger.get_replica(replica.cluster)) is not None:
                    owners[replica.cluster] = other.fleet
        record = self.ledger.get_fleet(fleet) if self.ledger is not None else None
        return reconcile.preview(fleet, plan, rows, owners, record.config_hash if record is not None else None,
                                 digest, shrink=shrink, router=router)

    # -- up -------------------------------------------------------------------------------------------------------
    def dryrun(self, fleet: str, planner: Planner, environ: Mapping[str, str] | None = None,
               router: Callable[[Plan], ReplicaPlan] | None = None, shrink: bool = True) -> DryRunReport:
        """Everything but provisioning: plan against what the ledger has, validate every task (the router's too);
        writes nothing. Secrets missing from `environ` are validated with a placeholder value and listed."""
        plan, shrinking = self._plan(fleet, planner, shrink) if self.ledger is not None else (
            planner(PlanRequest()), False)
        router_plan, unroutable = self._router_to_launch(fleet, plan, router)
        preview = self._preview(fleet, plan, None, shrink=shrinking, router=router_plan)
        env = environ or {}
        secrets = preview.plan.deployment.secrets
        given = {name: env[name] for name in secrets if env.get(name)}
        by_shape: dict[str, Validation] = {}  # replicas of one offer differ only in name: validate each shape once
        validations = {}
        for replica in preview.launch:
            shape = reconcile.task_shape(replica.task)
            if shape not in by_shape:
                by_shape[shape] = self._launcher.validate(replica.task, {**{n: "placeholder" for n in secrets},
                                                                         **given})
            validations[replica.cluster] = by_shape[shape]
        if router_plan is not None:  # its secrets are the fleet's keys: validated with placeholders
            names = list(router_plan.task.get("secrets") or {})
            validations[router_plan.cluster] = self._launcher.validate(router_plan.task,
                                                                       {n: "placeholder" for n in names})
        return DryRunReport(preview=preview, validations=validations,
                            missing_secrets=sorted(set(preview.plan.deployment.needed_secrets(
                                needs_model_secrets(self._launcher))) - set(given)),
                            notes=[unroutable] if unroutable else [])

    def up(self, fleet: str, planner: Planner, secrets: Mapping[str, str], config_digest: str,
           options: UpOptions = UpOptions(),
           confirm: Callable[[Preview, list[str]], bool] | None = None,
           router: RouterSetup | None = None, record: Mapping[str, Any] | None = None,
           notes: Sequence[str] = ()) -> UpReport:
        """Launch the planned fleet (or what is missing of it), re-planning around offers without capacity; with
        `options.shrink`, drain and tear down the replicas up that the plan no longer needs, once it is up.

        `planner` must plan fleet `fleet`. `confirm` is shown the preview (under the lock, before anything is
        launched); returning False stops there. `router`: launch the fleet's router if it is not up, and push it
        the replicas after every change (None: no router is launched; one that is up is still kept informed).
        `record`: kept in the ledger beside the plan (the config and settings, for a controller to re-plan).
        `notes`: the caller's, shown with the preview and kept in the report (e.g. why a spot pool is avoided)."""
        started = time.monotonic()
        with self._db.lock(fleet):
            self._check_up_launcher(fleet)
            unsynced = None
            try:  # the clouds' truth, not the launcher's cache: a replica preempted or stopped meanwhile is redone
                self._sync(self._clusters(fleet), refresh=True, may_write_in_flight=True)
            except MelangeError as exc:  # plan from the ledger's states; relaunching a live cluster reuses it
                unsynced = f"could not read the launcher's status ({exc}): planned from the ledger's states"
            plan, shrinking = self._plan(fleet, planner, options.shrink)
            router_plan, unroutable = self._router_to_launch(fleet, plan, router.plan if router else None)
            preview = self._preview(fleet, plan, config_digest, shrink=shrinking, router=router_plan)
            report = UpReport(fleet=fleet, plan=plan, replicas=[], rounds=0, unavailable_offers=[],
                              notes=[*notes, *preview.notes, *[n for n in (unsynced, unroutable) if n]],
                              expects_router=router is not None and unroutable is None)
            if not shrinking:
                try:  # only for a note: a fresh plan that ignores what is up (it may not even be feasible)
                    unconstrained = planner(PlanRequest()) if preview.keep else plan
                except MelangeError:
                    unconstrained = plan
                note = reconcile.shrink_note(plan, unconstrained)
                if note is not None:
                    report.notes.append(note)
            if confirm is not None and not confirm(preview, report.notes):
                report.replicas = self._rows(fleet)
                report.router = self._db.router(fleet)
                report.notes.append("not confirmed: nothing was launched")
                return report
            self._record = dict(record or {})
            self._db.save_fleet(fleet, config_digest, {**plan.to_dict(), **self._record},
                                launcher=launcher_record(self._launcher))
            self._router = router
            self._router_cluster = router_plan.cluster if router_plan is not None else None
            drain = frozenset(r.cluster for r in preview.drain)
            try:
                self._rounds(report, planner, secrets, options, router_plan, drain)
                if not report.interrupted:  # the user asked to stop: no minutes of teardown now
                    self._tear_down_leftovers(report)
                    self._push_members(fleet, report.notes)
                    if preview.drain:
                        self._drain(report, preview.drain, options.drain_timeout)
            except KeyboardInterrupt:  # outside a launch wait (a re-plan's solve, a ledger write): stop cleanly
                report.interrupted = True
                self._record_true_states([r.cluster for r in self._clusters(fleet)])
            finally:
                self._router = self._router_cluster = None
            report.replicas = self._rows(fleet)
            report.router = self._db.router(fleet)
        report.seconds = time.monotonic() - started
        return report

    def _check_up_launcher(self, fleet: str) -> None:
        """`up` drives the fleet through its recorded launcher; through another only while none of its clusters may
        exist (then `up` records the new one): any other would launch a second fleet beside the first."""
        record = self._db.get_fleet(fleet)
        if record is None or record.launcher is None or reaches(record.launcher, self._launcher):
            return
        alive = [r.cluster for r in self._clusters(fleet) if r.state.may_have_cluster]
        if alive:
            raise LauncherMismatch(f"fleet {fleet!r} was brought up with the launcher "
                                   f"{launcher_text(record.launcher)}, and {len(alive)} of its clusters may still "
                                   f"exist there ({', '.join(alive[:3])}{', ...' if len(alive) > 3 else ''}); "
                                   f"`melange-sky down {fleet}` first to move it, or drop --backend")

    def _plan(self, fleet: str, planner: Planner, shrink: bool) -> tuple[Plan, bool]:
        return reconcile.choose_plan(self._rows(fleet), planner, shrink)

    def _router_to_launch(self, fleet: str, plan: Plan,
                          router: Callable[[Plan], ReplicaPlan] | None) -> tuple[ReplicaPlan | None, str | None]:
        """The router's task when `up` must launch it (asked for, and not up already), or why it is not launched."""
        if router is None:
            return None, None
        row = self.ledger.router(fleet) if self.ledger is not None else None
        if row is not None and row.state is ReplicaState.UP:
            return None, None
        try:  # a router that could not route would bill for nothing
            routes_document(plan.to_dict(), [], source=f"fleet {fleet}")
        except MelangeError as exc:
            return None, f"no router is launched: {exc}"
        return router(plan), None

    def _rounds(self, report: UpReport, planner: Planner, secrets: Mapping[str, str], options: UpOptions,
                router: ReplicaPlan | None = None, drain: frozenset[str] = frozenset()) -> None:
        while True:
            report.rounds += 1
            todo = self._record_intent(report.plan, report.rounds)
            if router is not None and report.rounds == 1:
                todo.append(self._record_router_intent(report.fleet, router))
            outcomes, interrupted = self._launch_all(todo, secrets, options, report.rounds, report.plan.deployment.port)
            if router is not None and report.rounds == 1:
                state = dict((r.cluster, s) for r, s in outcomes).get(router.cluster)
                outcomes = [(r, s) for r, s in outcomes if r.cluster != router.cluster]
                if state is not None and state is not ReplicaState.UP:
                    row = self._db.router(report.fleet)
                    report.notes.append(f"the router {router.cluster} did not come up ({state.value}: "
                                        f"{row.last_error if row is not None else ''}); the replicas serve without "
                                        f"it; `up` or `watch` tries again")
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
                plan = planner(reconcile.plan_request(self._rows(report.fleet),
                                                      exclude=frozenset(report.unavailable_offers), drop=drain))
            except MelangeError as exc:  # e.g. no fleet fits without those offers: report it, launch nothing more
                report.notes.append(f"re-plan without {', '.join(report.unavailable_offers)} failed: {exc}")
                self.on_event(ReplicaEvent("", "", None, 0.0, report.notes[-1], report.rounds))
                return
            self._forget_unprovisioned([r.cluster for r, state in outcomes if state is ReplicaState.UNAVAILABLE],
                                       keep={r.cluster for r in plan.replicas})
            report.plan = plan
            record = self._db.get_fleet(report.fleet)
            assert record is not None  # saved before the first round, and locked since
            self._db.save_fleet(report.fleet, record.config_hash, {**plan.to_dict(), **self._record})

    def _record_router_intent(self, fleet: str, router: ReplicaPlan) -> ReplicaPlan:
        """Write the router's row (PENDING) before its launch is requested, like a replica's."""
        new = reconcile.new_replica(router, 1, role=Role.ROUTER)
        row = self._db.get_replica(router.cluster)
        if row is not None and row.state is not ReplicaState.GONE:
            self._db.replan_replica(fleet, new, message=f"router: launch again on {new.offer}")
        else:
            self._db.add_replica(fleet, new, message=f"router: planned on {new.offer}")
        self.on_event(ReplicaEvent(router.cluster, router.entry, ReplicaState.PENDING, 0.0, round=1))
        return router

    # -- membership and drains ------------------------------------------------------------------------------------
    def _router_link(self, fleet: str) -> _RouterLink | None:
        """How to call the router's admin API, when the fleet has a router up and its keys."""
        row = self._db.router(fleet)
        if row is None or row.url is None:
            return None
        keys = self._router.keys if self._router is not None else load_keys(fleet, self._db.home)
        if keys is None:
            return None
        return _RouterLink(row.url, keys.admin_token, router_certfile(row.task))

    def push_members(self, fleet: str) -> str | None:
        """Tell the fleet's router which replicas serve (the ledger's up ones) and the stored plan's routing table.
        Returns what happened, for a report; None when the fleet has no router up. Raises RouterError."""
        link = self._router_link(fleet)
        record = self._db.get_fleet(fleet)
        if link is None or record is None:
            return None
        members = reconcile.members(self._rows(fleet))
        doc, _warnings = routes_document(record.plan, members, source=f"fleet {fleet}")
        answer = push_routes(link.url, doc, link.admin_token, ROUTER_TIMEOUT_S, cafile=link.cafile)
        message = f"{len(members)} replica(s) in the router's routes (generation {answer.get('generation')})"
        self._db.record_event(fleet, "routes-pushed", message)
        self.on_event(ReplicaEvent("", "", None, 0.0, f"router: {message}"))
        return message

    def _push_members(self, fleet: str, notes: list[str]) -> bool:
        """`push_members`, a failure noted (a later `up` or `watch` pushes again). True when pushed."""
        try:
            return self.push_members(fleet) is not None
        except MelangeError as exc:
            notes.append(f"could not update the router's routes: {exc}")
            self._db.record_event(fleet, "routes-push-failed", str(exc))
            return False

    def _drain(self, report: UpReport, rows: list[ReplicaRecord], timeout: float) -> None:
        """Make-before-break removal: only once the whole plan is up, the replicas it no longer needs leave the
        router (TERMINATING, pushed), finish what is in flight up to `timeout`, then are torn down."""
        fleet = report.fleet
        up = {r.cluster for r in self._rows(fleet) if r.state is ReplicaState.UP}
        missing = [r.cluster for r in report.plan.replicas if r.cluster not in up]
        if missing:
            report.notes.append(f"kept {len(rows)} replica(s) the plan no longer needs "
                                f"({', '.join(r.cluster for r in rows)}): the plan is not fully up "
                                f"({', '.join(missing)} missing); `up` again to shrink once it is")
            return
        leaving = []
        for row in rows:
            current = self._db.get_replica(row.cluster)
            if current is None or current.state is not ReplicaState.UP:
                continue
            self._db.transition(row.cluster, ReplicaState.TERMINATING, message="draining: left the router")
            self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.TERMINATING, 0.0, "draining"))
            leaving.append(current)
        if not leaving:
            return
        link = self._router_link(fleet)
        if link is not None and not self._push_members(fleet, report.notes):
            for row in leaving:  # still in the router's routes: tearing them down would fail their requests
                self._db.transition(row.cluster, ReplicaState.UP, message="drain abandoned: the router was not "
                                                                          "told")
            report.notes.append("the drain was abandoned (the router could not be told); `up` tries again")
            return
        urls = [_router_url(r.url) for r in leaving if r.url is not None]
        if link is None and timeout > 0:
            self.on_event(ReplicaEvent("", "", None, 0.0, f"no router to ask what is in flight: waiting "
                                                          f"--drain-timeout {timeout:g} s before the teardown"))
        waited = self._wait_drained(link, urls, timeout)
        self._db.record_event(fleet, "drained", f"{', '.join(r.cluster for r in leaving)} after {waited:.1f} s")
        for row in leaving:
            try:
                torn = self._down(row.cluster)
            except MelangeError as exc:
                self._db.transition(row.cluster, ReplicaState.FAILED, error=f"teardown after drain failed: {exc}")
                report.notes.append(f"{row.cluster} was drained but could not be torn down: {exc}; `up` or `down` "
                                    f"retries")
                continue
            self._db.transition(row.cluster, ReplicaState.GONE, endpoint=None,
                                message=f"drained ({waited:.1f} s) and torn down" if torn else "drained; gone")
            self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.GONE, waited, "drained and torn down"))
            report.drained.append(row.cluster)

    @staticmethod
    def _wait_drained(link: _RouterLink | None, urls: list[str], timeout: float) -> float:
        """Poll the router (`link`) until none of `urls` has a request in flight, or
        `timeout`; seconds waited. With no router to ask (routers reading the ledger drop the replicas at their next
        refresh), wait `timeout` out."""
        if link is None:
            time.sleep(timeout)
            return timeout
        started = time.monotonic()
        while True:
            try:
                inflight = get_admin_routes(link.url, link.admin_token, ROUTER_TIMEOUT_S,
                                            cafile=link.cafile).get("inflight") or {}
            except MelangeError:
                inflight = {url: 1 for url in urls}  # unknown: assume busy until the timeout
            waited = time.monotonic() - started
            if reconcile.drained(inflight, urls) or waited >= timeout:
                return waited
            time.sleep(min(DRAIN_POLL_S, max(0.0, timeout - waited)))

    def _forget_unprovisioned(self, clusters: list[str], keep: set[str]) -> None:
        """Replicas that found no capacity and that the re-plan does not reuse are marked GONE once the backend
        confirms no cluster was left behind (one that was is kept, for `up` or `down` to remove)."""
        dropped = [c for c in clusters if c not in keep]
        try:
            live = self._status(dropped, refresh=True) if dropped else {}
        except MelangeError:  # unconfirmed: the rows stay unavailable, and `up`/`down` deal with them later
            return
        for cluster in dropped:
            if cluster in live and live[cluster].status is ClusterStatus.GONE:
                self._db.transition(cluster, ReplicaState.GONE, message="no capacity; replaced by the re-plan")

    def _tear_down_leftovers(self, report: UpReport) -> None:
        """Tear down `reconcile.leftovers`: replicas outside the final plan that may bill without serving. Surplus
        replicas that are up are kept (they serve) and reported."""
        for row in reconcile.leftovers(self._rows(report.fleet), report.plan):
            try:
                torn = self._down(row.cluster)
            except MelangeError as exc:
                report.notes.append(f"{row.cluster} is not in the plan and could not be torn down: {exc}")
                continue
            self._db.transition(row.cluster, ReplicaState.GONE, endpoint=None,
                                message="not in the plan: torn down" if torn else "not in the plan: gone")
            self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.GONE, 0.0, "not in the plan: removed"))
            if row.state is ReplicaState.FAILED and row.last_error:
                report.notes.append(f"{row.cluster} failed ({row.last_error}); replaced and torn down")

    def _record_intent(self, plan: Plan, round_: int) -> list[ReplicaPlan]:
        """Write every replica that must launch as PENDING before any launch is requested."""
        todo = []
        for replica in plan.replicas:
            row = self._db.get_replica(replica.cluster)
            if row is not None and row.state is ReplicaState.UP:
                continue
            new = reconcile.new_replica(replica, round_)
            if row is not None and row.role is Role.ROUTER:
                raise MelangeError(f"{replica.cluster} is this fleet's router, not a replica")
            if row is not None and row.state is not ReplicaState.GONE:
                self._db.replan_replica(plan.fleet, new, message=f"round {round_}: launch again on {new.offer}")
            else:
                self._db.add_replica(plan.fleet, new, message=f"round {round_}: planned on {new.offer}")
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
        futures: dict[Future[ReplicaState], ReplicaPlan] = {}
        interrupted = False
        try:
            # While launches run, a Ctrl-C (and SIGTERM/SIGHUP as the CLI handles them) is held and seen by this loop:
            # raised inside `concurrent.futures.wait` it could leave a future's lock held, and no worker could finish.
            with signals_held() as held:
                for replica in todo:
                    futures[pool.submit(self._launch_one, replica, secrets, options, round_, port, stop)] = replica
                pending = set(futures)
                next_beat = time.monotonic() + self.heartbeat
                while pending and not held:
                    timeout = min(INTERRUPT_POLL_S, max(0.0, next_beat - time.monotonic()))
                    done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                    outcomes += [(futures[future], future.result()) for future in done]
                    if time.monotonic() >= next_beat:
                        self._heartbeat(round_)
                        next_beat = time.monotonic() + self.heartbeat
            if held:
                raise KeyboardInterrupt
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
                    self._launcher.cancel(clusters)
                except Exception:  # noqa: BLE001 - the next poll cancels again; the workers' outcomes count
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
        """After Ctrl-C: ask the backend what became of launches that were in flight, and record it
        (`reconcile.interrupted_transition`)."""
        unsure = [c for c in clusters
                  if (row := self._db.get_replica(c)) is not None and row.state.cluster_uncertain]
        try:
            live = self._status(unsure, refresh=True) if unsure else {}
        except MelangeError:
            live = {}
        for cluster in unsure:
            row, info = self._row(cluster), live.get(cluster)
            endpoint = None
            if info is not None and info.status is ClusterStatus.UP:
                endpoint = _reached_at(row.task, info.endpoint or self._endpoint(row))
            change = reconcile.interrupted_transition(row, info.status if info is not None else None, endpoint)
            if change is not None:
                self._db.transition(cluster, change.state, message=change.message, **change.changes())

    def _launch_one(self, replica: ReplicaPlan, secrets: Mapping[str, str], options: UpOptions, round_: int,
                    port: int, stop: threading.Event) -> ReplicaState:
        if stop.is_set():
            return ReplicaState.PENDING
        started = time.monotonic()
        self._db.transition(replica.cluster, ReplicaState.LAUNCHING, message=f"round {round_}")
        with self._in_flight_lock:
            self._in_flight[replica.cluster] = (replica.entry, started)
        self.on_event(ReplicaEvent(replica.cluster, replica.entry, ReplicaState.LAUNCHING, 0.0, round=round_))
        is_router = self._router is not None and replica.cluster == self._router_cluster
        request = LaunchRequest(cluster=replica.cluster, task=replica.task,
                                secrets=dict(self._router.secrets if self._router is not None and is_router
                                             else secrets),
                                retry_until_up=options.retry_until_up,
                                # the router serves until `down`: it is never idle-stopped with the replicas
                                idle_minutes_to_autostop=None if is_router else options.idle_minutes_to_autostop,
                                down=options.down and not is_router,
                                port=reconcile.task_port(replica.task) or port)
        state, message, endpoint = ReplicaState.UP, "", None
        try:
            endpoint = _reached_at(replica.task, self._launcher.launch(request).endpoint)
        except Exception as exc:  # noqa: BLE001 - a backend bug must not lose the replica's state
            state, message = reconcile.launch_failure(exc)
        finally:
            with self._in_flight_lock:
                self._in_flight.pop(replica.cluster, None)
        if state is ReplicaState.UP:
            self._db.transition(replica.cluster, state, endpoint=endpoint, error=None, message=f"round {round_}")
        else:
            self._db.transition(replica.cluster, state, error=message)
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
            each = {name: self._for(name) for name in names}  # every launcher checked before any is asked
            for name, on_its_launcher in each.items():
                on_its_launcher._sync(self._clusters(name), refresh=True, may_write_in_flight=False)
        return self.ledger.replicas(fleet)

    def status_report(self, fleet: str | None = None, refresh: bool = False) -> StatusReport:
        """`status`: the ledger's fleets (refreshed first with `refresh`); a fleet whose controller is hosted on
        its router's host is first brought up to date from the controller's snapshot, with its last pass."""
        controllers = {}
        if self.ledger is not None:
            for record in self.ledger.fleets():
                if fleet in (None, record.name) and controller_mode(record) == HOSTED:
                    controllers[record.name] = sync_from_controller(self.ledger, record.name)
        replicas = self.status(fleet, refresh)
        fleets = [f for f in (self.ledger.fleets() if self.ledger is not None else []) if fleet in (None, f.name)]
        routers = {f.name: r for f in fleets if self.ledger is not None and (r := self.ledger.router(f.name))}
        spent: dict[str, Usage] = {}
        now = time.time()
        for record in fleets:
            assert self.ledger is not None
            events: dict[str, list[Event]] = {}
            for event in self.ledger.history(fleet=record.name):
                if event.cluster is not None:
                    events.setdefault(event.cluster, []).append(event)
            for row in [*[r for r in replicas if r.fleet == record.name], *filter(None, [routers.get(record.name)])]:
                spent[row.cluster] = usage(row, events.get(row.cluster, []), now, since=record.created)
        return StatusReport(fleets=fleets, replicas=replicas, routers=routers, usage=spent, controllers=controllers)

    # -- down -----------------------------------------------------------------------------------------------------
    def down(self, fleet: str, purge: bool = False, parallel: int = DEFAULT_PARALLEL) -> DownReport:
        """Tear down every replica that may have a cluster; forget the fleet once all are gone. A fleet another
        process holds is reported busy (not an error), so `down --all` goes on with the others."""
        if self.ledger is None or self.ledger.get_fleet(fleet) is None:
            return DownReport(fleet=fleet, removed=[], already_gone=[], failed={}, fleet_removed=False)
        on_its_launcher = self._for(fleet)
        try:
            lock = self.ledger.lock(fleet).acquire()
        except FleetBusy as exc:
            return DownReport(fleet=fleet, removed=[], already_gone=[], failed={}, fleet_removed=False,
                              busy=str(exc))
        try:
            return on_its_launcher._down_locked(fleet, purge, parallel)
        finally:
            lock.release()

    def _down_locked(self, fleet: str, purge: bool, parallel: int) -> DownReport:
        removed: list[str] = []
        gone: list[str] = []
        failed: dict[str, str] = {}

        def one(row: ReplicaRecord) -> tuple[str, bool | None, str]:
            self._db.transition(row.cluster, ReplicaState.TERMINATING, message="down")
            self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.TERMINATING, 0.0))
            started = time.monotonic()
            try:
                torn = self._down(row.cluster, purge=purge)
            except MelangeError as exc:  # recorded, and retried by the next `down`
                reason = str(exc)
            else:
                self._db.transition(row.cluster, ReplicaState.GONE, endpoint=None,
                                    message="torn down" if torn else "already gone")
                self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.GONE, time.monotonic() - started,
                                           "" if torn else "already gone"))
                return row.cluster, torn, ""
            self._db.transition(row.cluster, ReplicaState.FAILED, error=f"down failed: {reason}")
            self.on_event(ReplicaEvent(row.cluster, row.gpu, ReplicaState.FAILED, time.monotonic() - started,
                                       f"down failed: {reason}"))
            return row.cluster, None, reason

        def tally(cluster: str, torn: bool | None, reason: str) -> None:
            if torn is None:
                failed[cluster] = reason
            elif torn:
                removed.append(cluster)
            else:
                gone.append(cluster)

        stopped = None
        if controller_mode(self._db.get_fleet(fleet)) == HOSTED:
            stopped = self._stop_hosted_controller(fleet, one, tally)
            if failed:  # its controller may still run: tearing its replicas down now, it would relaunch them
                return DownReport(fleet=fleet, removed=[], already_gone=[], failed=failed, fleet_removed=False,
                                  controller=stopped)
        rows = [r for r in self._clusters(fleet) if r.state.may_have_cluster]
        with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="melange-down") as pool:
            for cluster, torn, reason in pool.map(one, rows):
                tally(cluster, torn, reason)
        if not failed:
            self._db.remove_fleet(fleet)
            forget_keys(fleet, self._db.home)  # its router is gone: the tokens open nothing any more
        return DownReport(fleet=fleet, removed=sorted(removed), already_gone=sorted(gone), failed=failed,
                          fleet_removed=not failed, controller=stopped)

    def _stop_hosted_controller(self, fleet: str, one: Callable[[ReplicaRecord], tuple[str, bool | None, str]],
                                tally: Callable[[str, bool | None, str], None]) -> str:
        """Before anything else: learn every cluster the hosted controller launched (its snapshot, through the
        router), then tear down the router's cluster, which stops the controller running on it. What happened, in
        one line."""
        view = sync_from_controller(self._db, fleet)
        known = ("its clusters adopted" if view.adopted
                 else f"its clusters not read ({view.reason}): ones it launched since the last `status` may be left")
        router = self._db.router(fleet)
        if router is None or not router.state.may_have_cluster:
            return f"hosted controller: its host is gone already; {known}"
        cluster, torn, reason = one(router)
        tally(cluster, torn, reason)
        if torn is None:
            return (f"hosted controller: its host {cluster} could not be torn down ({reason}): the replicas are "
                    f"kept, since it may still relaunch them; `down` again")
        return f"hosted controller: stopped first, with its host {cluster}; {known}"


def _reached_at(task: Mapping[str, Any] | None, endpoint: str | None) -> str | None:
    """The endpoint to record for a cluster running `task`: a TLS router's as an https:// URL (the launcher knows
    only host:port), every other one as the launcher gave it."""
    if endpoint is None or router_certfile(task) is None:
        return endpoint
    return "https://" + endpoint.split("://", 1)[-1]


def _router_url(url: str) -> str:
    """A replica's URL as the router spells it in its in-flight counts (normalised, so they compare)."""
    try:
        return normalise_url(url, "endpoint")
    except MelangeError:
        return url
