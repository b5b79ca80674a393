"""The fleet controller (`watch`): one pass reads the clouds' truth, replaces what died or stopped answering,
re-sizes the fleet from the router's observed traffic, and brings it up through the same `bring_up` as `up`.

It does the reading and acting; the decisions (need, scale up/down, budget, which probes replace a replica) are the
pure rules of `rules`. What it keeps:
- the ledger stays the truth of what was launched, the launcher's refreshed status the truth of what runs;
- every action is one fleet event in the ledger and one call of `on_action` (the CLI prints it as one line);
- the need is read over a window of the router's latest minutes (the scale-down hold by default), so a burst stops
  counting once that window has passed it; the hold is read from the router's minutes, and also lives in the ledger
  (`need` events, their rates kept as data), so passes of separate processes (`watch --once` from cron) share it
  when the router's minutes are too few (restarted);
- a plan above `max_cost` is reported and recorded, never launched: the fleet stays as it is;
- one controller per fleet (`watch_lock`); each change runs under the fleet's own lock, taken by `up`.
"""
from __future__ import annotations

import dataclasses
import time
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from melange_sky.core.config import Config
from melange_sky.deploy.membership import get_admin_routes, normalise_url
from melange_sky.deploy.plan import Plan, PlanSettings, deployment_from_config
from melange_sky.deploy.router_task import router_certfile
from melange_sky.errors import CallFailed, ControllerError, FleetBusy, MelangeError, UnknownFleet
from melange_sky.fleet import reconcile
from melange_sky.fleet.backends import Backend
from melange_sky.fleet.fleet import Fleet, UpOptions
from melange_sky.fleet.hosted import HOSTED, controller_mode
from melange_sky.fleet.keys import load_keys
from melange_sky.fleet.ledger import FleetLock, Ledger, ReplicaRecord, ReplicaState, Role, safe_name
from melange_sky.fleet.reports import Preview, ReplicaEvent, UpReport
from melange_sky.fleet.up import bring_up, fleet_config, launch_secrets, make_planner, router_setup
from melange_sky.inputs.http import Client, parse_endpoint
from melange_sky.inputs.router_workload import fetch_observed
from melange_sky.inputs.trace_rates import MINUTE_S
from melange_sky.controller import placer, rules
from melange_sky.controller.placer import SpotStep
from melange_sky.controller.rules import Decision, Need, Scale

__all__ = ["Action", "Controller", "DEFAULT_INTERVAL_S", "PassReport", "SpotHolds", "WatchOptions", "read_placer",
           "remember_unavailable", "spot_holds", "watch_lock"]

DEFAULT_INTERVAL_S = 60.0
PROBE_TIMEOUT_S = 5.0  # one readiness probe
PROBE_RETRY_S = 2.0  # a replica is replaced only when a second probe, this much later, fails too
ROUTER_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class WatchOptions:
    """What a pass may do beyond healing: autoscale from observed traffic, within a budget."""

    autoscale: bool = False
    rate_percentile: float = rules.DEFAULT_RATE_PERCENTILE
    scale_down_after_s: float = rules.DEFAULT_SCALE_DOWN_AFTER_MIN * 60
    window_min: int | None = None  # minutes of the router's per-minute rates the need is read from (None: the hold)
    max_cost: float | None = None  # $/h of the replicas and the router together
    workload_url: str | None = None  # a `melange-sky serve` to read /workload from instead of the fleet's router
    min_requests: int = rules.DEFAULT_MIN_REQUESTS
    health_check: bool = True  # probe each replica's readiness path (off: only the launcher's status counts)
    spot_hold_s: float = placer.DEFAULT_SPOT_HOLD_MIN * 60  # a spot pool that failed is avoided this long
    up: UpOptions = UpOptions()
    hosted: bool = False  # this controller runs on the router's host (`controller.hosted`): it never launches it

    @property
    def need_window_min(self) -> int:
        """The window the need is read over: the one given, else the scale-down hold in whole minutes."""
        return self.window_min if self.window_min is not None else rules.default_window_min(self.scale_down_after_s)


@dataclass(frozen=True)
class Action:
    """One thing a pass did or refused, as recorded in the ledger (`kind` is the event's kind)."""

    kind: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message}


@dataclass
class PassReport:
    """What one pass saw and did."""

    fleet: str
    started: float
    plan_rate: float  # req/s the fleet was planned for when the pass began
    actions: list[Action] = field(default_factory=list)
    need: Need | None = None
    decision: Decision | None = None
    cost_planned: float | None = None  # $/h the pass brought up (replicas and router), when it ran `up`
    up: UpReport | None = None
    error: str | None = None
    interrupted: bool = False
    refused: bool = False  # a plan above --max-cost was not launched
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No error, no refusal, not interrupted, and a pass that ran `up` left the fleet complete."""
        return (self.error is None and not self.interrupted and not self.refused
                and (self.up is None or self.up.complete))

    def to_dict(self) -> dict[str, Any]:
        up = self.up
        return {"fleet": self.fleet, "started": self.started, "seconds": round(self.seconds, 3), "ok": self.ok,
                "plan_rate": self.plan_rate, "actions": [a.to_dict() for a in self.actions],
                "need": None if self.need is None else {"rate": self.need.rate, "source": self.need.source,
                                                        "window_min": self.need.window_min},
                "decision": None if self.decision is None else {"scale": self.decision.scale.value,
                                                                "rate": self.decision.rate,
                                                                "reason": self.decision.reason},
                "cost_planned": None if self.cost_planned is None else round(self.cost_planned, 6),
                "up": None if up is None else {"complete": up.complete, "cost_up": round(up.cost, 6),
                                               "replicas_up": [r.cluster for r in up.up], "drained": up.drained,
                                               "unavailable_offers": up.unavailable_offers, "notes": up.notes,
                                               "endpoint": up.endpoint},
                "error": self.error, "interrupted": self.interrupted, "refused": self.refused}


def read_placer(ledger: Ledger, fleet: str) -> placer.Placer:
    """The spot placer's memory of `fleet`: its spot events in the ledger, folded oldest first. `up` reads it too
    (`spot_holds`), so a manual `up` does not relaunch on a pool `watch` just saw fail."""
    events = sorted((e for kind in placer.KINDS for e in ledger.history(fleet=fleet, kind=kind)), key=lambda e: e.id)
    return placer.Placer.of((e.at, e.new_state, e.data) for e in events)


@dataclass(frozen=True)
class SpotHolds:
    """The spot pools a plan of a fleet leaves out now, and one line per pool saying why (`placer.hold_note`)."""

    pools: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()


def spot_holds(ledger: Ledger | None, fleet: str, now: float) -> SpotHolds:
    """What `up` and `up --dryrun` both exclude (so the dry run shows the plan `up` launches), with the reasons.
    The fleet's spot events count even when they were recorded before a `down` of it: the ledger keeps a removed
    fleet's history, and a pool's preemption wave outlives the fleet that met it. None (no ledger yet): none."""
    if ledger is None:
        return SpotHolds()
    holds = read_placer(ledger, fleet).holds(now)
    return SpotHolds(frozenset(h.pool for h in holds), tuple(placer.hold_note(h, now) for h in holds))


def remember_unavailable(ledger: Ledger, fleet: str, offers: list[str], now: float,
                         hold_s: float = placer.DEFAULT_SPOT_HOLD_MIN * 60) -> Action | None:
    """Record the spot pools a launch outside `watch` (`up`) found without capacity, as `watch` would: the next
    plans avoid them for the hold, and `watch` moves the load back once it is over. The action recorded, if any."""
    step = placer.unavailable_spot(offers, now, hold_s)
    if step is None:
        return None
    ledger.record_event(fleet, step.kind, step.message, step.data)
    return Action(step.kind, step.message)


def watch_lock(ledger: Ledger, fleet: str) -> FleetLock:
    """The controller's own lock on `fleet` (not the fleet's lock, which `up` takes for each change), held for the
    whole watch: a second controller is refused with the holder's pid."""
    lock = FleetLock(ledger.home / "locks" / "watch" / f"{safe_name(fleet)}.lock", fleet)
    try:
        return lock.acquire()
    except FleetBusy as exc:
        holder = f"process {exc.pid}" if exc.pid else "another process"
        raise ControllerError(f"fleet {fleet!r} is already watched by {holder}; stop that `melange-sky watch` "
                              f"first (one controller per fleet)") from None


class Controller:
    """Watches one fleet: `check()` once at the start (the errors a user fixes before anything runs), then
    `run_pass()` as often as wanted. Reports progress through callbacks; prints nothing."""

    def __init__(self, fleet: str, backend: Backend, ledger: Ledger, environ: Mapping[str, str],
                 options: WatchOptions = WatchOptions(), *,
                 on_action: Callable[[Action], None] | None = None,
                 on_event: Callable[[ReplicaEvent], None] | None = None,
                 on_warning: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.fleet = fleet
        self.backend = backend
        self.ledger = ledger
        self.environ = environ
        self.options = options
        self.on_action = on_action or (lambda action: None)
        self.on_event = on_event
        self.on_warning = on_warning
        self.clock = clock

    # -- starting -------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse at once what no pass could do: an unknown fleet, one without a stored config, a missing secret,
        autoscaling with no router to read the traffic from."""
        record = self.ledger.get_fleet(self.fleet)
        if controller_mode(record) == HOSTED and not self.options.hosted:
            raise ControllerError(f"the controller of fleet {self.fleet!r} runs on its router's host (`up --controller "
                                  f"hosted`): `melange-sky status {self.fleet}` shows its passes; to watch it from "
                                  f"here instead, `melange-sky down {self.fleet}` and `up --controller local`")
        config, settings = self._config()
        launch_secrets(config, settings, self.environ, self.backend)
        if self.options.autoscale and self.options.workload_url is None and self.ledger.router(self.fleet) is None:
            raise ControllerError(f"--autoscale reads the traffic from the fleet's router, and fleet {self.fleet!r} "
                                  f"has none: `melange-sky up` it without --no-router, or pass --from URL of a "
                                  f"`melange-sky serve` in front of it")

    def _config(self) -> tuple[Config, PlanSettings]:
        record = self.ledger.get_fleet(self.fleet)
        if record is None:
            raise UnknownFleet(f"no fleet {self.fleet!r} in the ledger; `melange-sky status` lists the fleets")
        return fleet_config(record.plan, f"fleet {self.fleet}")

    def _act(self, report: PassReport, kind: str, message: str, data: Mapping[str, Any] | None = None) -> None:
        self.ledger.record_event(self.fleet, kind, message, data)
        action = Action(kind, message)
        report.actions.append(action)
        self.on_action(action)

    # -- one pass -------------------------------------------------------------------------------------------------
    def run_pass(self) -> PassReport:
        """Refresh, replace the dead and the unhealthy, re-size (with autoscale), bring up. A failure the next pass
        may not meet (a busy fleet, an unreachable router, no capacity anywhere) is the report's `error`, recorded;
        an unknown fleet raises UnknownFleet."""
        started = time.monotonic()
        config, settings = self._config()
        report = PassReport(self.fleet, self.clock(), config.total_request_rate)
        try:
            self._pass(report, config, settings)
        except UnknownFleet:
            raise
        except MelangeError as exc:
            report.error = str(exc)
            self._act(report, "pass-failed", str(exc))
        report.seconds = time.monotonic() - started
        return report

    def _pass(self, report: PassReport, config: Config, settings: PlanSettings) -> None:
        fleet = Fleet(self.backend, self.ledger, self.on_event)
        try:
            fleet.status(self.fleet, refresh=True)  # preempted, stopped or vanished clusters are recorded so
        except MelangeError as exc:
            self._act(report, "status-failed", f"the launcher's status failed ({exc}); `up` asks again")
        now = self.clock()
        self._spot(report, self._lost_spot(now))
        placed = self._placer()
        returned = placer.back(placed, now)  # recorded once the plan has been brought up on it (else retried)
        avoid = placed.avoided(now)
        if self.options.health_check:
            self._replace_unhealthy(report, fleet, config, settings)
        target = self._autoscale(report, config) if self.options.autoscale else config
        record = self.ledger.get_fleet(self.fleet)
        assert record is not None  # checked by `_config`; `down` needs the fleet's lock, which is not taken here
        rows = self.ledger.replicas(self.fleet)
        router = self.ledger.router(self.fleet)
        states = {r.cluster: r.state for r in rows}
        missing = [str(r["cluster"]) for r in record.plan.get("replicas") or []
                   if states.get(str(r["cluster"])) is not ReplicaState.UP]
        # a hosted controller runs beside the router: it is not this controller's to relaunch
        router_down = router is not None and router.state is not ReplicaState.UP and not self.options.hosted
        router_cost = router.price_per_hour if router is not None else 0.0
        if target is not config:
            plan = self._planned(target, settings, rows, avoid)
            decision = report.decision
            assert decision is not None
            if self._refused(report, f"{decision.scale.value} to {decision.rate:.4g} req/s needs",
                             plan.cost + router_cost):
                target = config
            else:
                report.cost_planned = plan.cost + router_cost
                self._act(report, decision.scale.value,
                          f"{report.plan_rate:.4g} -> {decision.rate:.4g} req/s: {len(plan.replicas)} replica(s), "
                          f"{_dollars(report.cost_planned, router_cost)} ({decision.reason})")
        if target is config:
            if not missing and not router_down and returned is None:
                self._check_routes(report, fleet, rows, router)
                return
            plan = self._planned(config, settings, rows, avoid)
            what = ", ".join(missing + ([router.cluster] if router is not None and router_down else []))
            doing = f"relaunching {what}" if what else "handing load back to spot"
            if self._refused(report, f"{doing} needs the plan at", plan.cost + router_cost):
                return
            report.cost_planned = plan.cost + router_cost
            if what:
                self._act(report, "relaunch", f"not up: {what}; bringing the plan back "
                                              f"({_dollars(report.cost_planned, router_cost)})")
        self._bring_up(report, target, settings, router, avoid, returned)

    def _placer(self) -> placer.Placer:
        return read_placer(self.ledger, self.fleet)

    def _lost_spot(self, now: float) -> SpotStep | None:
        """Spot replicas a refresh (this pass's, or `status --refresh`'s or `up`'s since) found taken away."""
        rows = [r for r in self.ledger.replicas(self.fleet) if r.use_spot and r.state in
                (ReplicaState.GONE, ReplicaState.STOPPED, ReplicaState.FAILED)]
        last = {}
        for row in rows:
            events = self.ledger.history(cluster=row.cluster)
            if events:
                last[row.cluster] = (events[-1].old_state, events[-1].new_state, events[-1].at)
        return placer.lost_spot(rows, last, self._placer(), now, self.options.spot_hold_s)

    def _spot(self, report: PassReport, step: SpotStep | None) -> None:
        """Record a placer step (one event with its data, one line)."""
        if step is not None:
            self._act(report, step.kind, step.message, step.data)

    def _refused(self, report: PassReport, what: str, cost: float) -> bool:
        """Whether `cost` ($/h) is over --max-cost: then the refusal is an action (event and line), nothing launches."""
        if not rules.over_budget(cost, self.options.max_cost):
            return False
        self._act(report, "over-budget", f"{what} ${cost:.2f}/h > --max-cost ${self.options.max_cost:.2f}/h: not "
                                         f"launched; the fleet stays as it is")
        report.refused = True
        return True

    def _bring_up(self, report: PassReport, config: Config, settings: PlanSettings,
                  router: ReplicaRecord | None, avoid: frozenset[str] = frozenset(),
                  returned: SpotStep | None = None) -> None:
        def on_preview(preview: Preview, notes: list[str]) -> None:
            if preview.changes:
                self._act(report, "plan", _preview_line(preview))

        secrets = launch_secrets(config, settings, self.environ, self.backend)
        setup = router_setup(config, settings, self.environ) if router is not None and not self.options.hosted \
            else None
        up = bring_up(config, settings, self.backend, self.ledger, secrets, self.options.up, confirm=None,
                      on_preview=on_preview, on_event=self.on_event, on_warning=self.on_warning, router=setup,
                      exclude=avoid)
        report.up = up
        report.interrupted = up.interrupted
        if returned is not None and not up.interrupted:  # before a new failure there, which starts a new hold
            running = [r.offer for r in self.ledger.replicas(self.fleet) if r.state is ReplicaState.UP]
            self._spot(report, placer.returned(returned, running, settings.per_offer))
        planned = len(up.plan.replicas)
        done = "interrupted" if up.interrupted else "complete" if up.complete else "incomplete"
        extra = f"; drained {', '.join(up.drained)}" if up.drained else ""
        notes = f"; {'; '.join(up.notes)}" if up.notes and not up.complete else ""
        self._act(report, "up", f"{done}: {len(up.up)}/{planned} planned replica(s) up, replicas ${up.cost:.2f}/h"
                                f"{extra}{notes}")
        self._spot(report, placer.unavailable_spot(up.unavailable_offers, self.clock(), self.options.spot_hold_s))

    def _planned(self, config: Config, settings: PlanSettings, rows: list[ReplicaRecord],
                 avoid: frozenset[str] = frozenset()) -> Plan:
        """The plan `up` would bring up for `config` given the ledger's rows (the rule of `Fleet.up`): the one keeping
        every replica up, unless shrinking is allowed and a fresh plan is cheaper; never adding replicas on the
        spot pools avoided."""
        return reconcile.choose_plan(rows, make_planner(config, settings, exclude=avoid), self.options.up.shrink)[0]

    # -- health ---------------------------------------------------------------------------------------------------
    def _replace_unhealthy(self, report: PassReport, fleet: Fleet, config: Config, settings: PlanSettings) -> None:
        """Probe every replica up (its readiness path) and the router (any HTTP answer); those failing two tries
        leave the router and are torn down, recorded, for the bring-up to relaunch under the same name."""
        path = deployment_from_config(config, settings.template).readiness_path
        targets = {r.cluster: _Probe(r.url.rstrip("/") + path, r.role is Role.ROUTER, router_certfile(r.task))
                   for r in self.ledger.replicas(self.fleet, roles=None)
                   if r.url is not None and not (self.options.hosted and r.role is Role.ROUTER)}
        if not targets:
            return
        results = _probe_all(targets)
        retry = {c: targets[c] for c, (ok, _) in results.items() if not ok}
        if retry:
            time.sleep(PROBE_RETRY_S)
            results.update(_probe_all(retry))
        replace, note = rules.to_replace({c: ok for c, (ok, _) in results.items()})
        if note is not None:
            self._act(report, "probe-unreachable", note)
        if replace:
            self._tear_down_unhealthy(report, fleet, {c: results[c][1] for c in replace})

    def _tear_down_unhealthy(self, report: PassReport, fleet: Fleet, reasons: dict[str, str]) -> None:
        with self.ledger.lock(self.fleet):
            leaving = []
            for cluster, reason in sorted(reasons.items()):
                row = self.ledger.get_replica(cluster)
                if row is None or row.state is not ReplicaState.UP:
                    continue
                changed = self.ledger.transition(cluster, ReplicaState.TERMINATING, expect=row,
                                                 message=f"unhealthy: {reason}; leaves the router")
                if changed is not None:
                    leaving.append((row, reason))
            if not leaving:
                return
            if any(row.role is Role.REPLICA for row, _ in leaving):
                try:
                    fleet.push_members(self.fleet)
                except MelangeError as exc:  # its own probes eject it meanwhile
                    self._act(report, "routes-push-failed", str(exc))
            for row, reason in leaving:
                try:
                    self.backend.down(row.cluster)
                except Exception as exc:  # noqa: BLE001 - a launcher's failure is recorded; `up`/`down` retry
                    self.ledger.transition(row.cluster, ReplicaState.FAILED,
                                           error=f"unhealthy ({reason}); teardown failed: {exc}")
                    self._act(report, "unhealthy", f"{row.cluster}: {reason}; teardown failed ({exc})")
                    continue
                self.ledger.transition(row.cluster, ReplicaState.GONE, endpoint=None,
                                       message=f"unhealthy ({reason}): torn down to be replaced")
                what = "router" if row.role is Role.ROUTER else "replica"
                self._act(report, "unhealthy", f"{what} {row.cluster}: readiness probe failed twice ({reason}); "
                                               f"torn down, to be relaunched")

    def _check_routes(self, report: PassReport, fleet: Fleet, rows: list[ReplicaRecord],
                      router: ReplicaRecord | None) -> None:
        """Nothing to launch: make sure the router routes to the ledger's replicas up (a router restarted, or a push
        that failed earlier), and push them again if not."""
        if router is None or router.url is None:
            return
        keys = load_keys(self.fleet, self.ledger.home)
        if keys is None:
            return
        wanted = sorted(normalise_url(u) for _, _, u in reconcile.members(rows))
        try:
            routes = get_admin_routes(router.url, keys.admin_token, ROUTER_TIMEOUT_S,
                                      cafile=router_certfile(router.task)).get("routes") or {}
        except MelangeError as exc:
            if self.on_warning is not None:
                self.on_warning(f"could not read the router's routes: {exc}")
            return
        served = sorted(str(r.get("url")) for r in routes.get("replicas") or [] if isinstance(r, Mapping))
        if served != wanted:
            self._act(report, "routes-resync", f"the router routes to {len(served)} replica(s), the ledger has "
                                               f"{len(wanted)} up: pushing")
            fleet.push_members(self.fleet)

    # -- autoscale ------------------------------------------------------------------------------------------------
    def _workload_source(self) -> tuple[str, str | None, str | None]:
        """Where to read the traffic: (URL, key, the certificate an https router must show: the fleet's router's
        own; a --from URL is trusted as any https server is)."""
        keys = load_keys(self.fleet, self.ledger.home)
        key = self.environ.get("MELANGE_SKY_API_KEY") or (keys.api_key if keys is not None else None)
        if self.options.workload_url is not None:
            return self.options.workload_url, key, None
        router = self.ledger.router(self.fleet)
        if router is None or router.url is None:
            raise ControllerError(f"the fleet's router is not up ({router.state.value if router else 'none'}): no "
                                  f"traffic to autoscale from this pass")
        return router.url, keys.api_key if keys is not None else key, router_certfile(router.task)

    def _autoscale(self, report: PassReport, config: Config) -> Config:
        """The config to bring up after reading the traffic: the same object when the plan's rate stands."""
        url, key, cafile = self._workload_source()
        source, doc = fetch_observed(url, key, cafile=cafile)
        window = self.options.need_window_min
        need = rules.need_from_workload(doc, self.options.rate_percentile, window)
        report.need = need
        if need is None:
            self._act(report, "no-traffic", f"{source}: no arrivals counted in the last {window} min; no scaling "
                                            f"decision (scaling to nothing is `melange-sky down`)")
            return config
        history = rules.needs_from_events((e.at, e.data)
                                          for e in self.ledger.history(fleet=self.fleet, kind=rules.NEED_EVENT))
        decision = rules.scale_decision(config.total_request_rate, need.rate, history, self.clock(),
                                        self.options.scale_down_after_s, need.recent, window * MINUTE_S)
        report.decision = decision
        self._act(report, rules.NEED_EVENT, f"{rules.need_message(need)}: {decision.reason}", rules.need_data(need))
        if decision.scale not in (Scale.UP, Scale.DOWN):
            return config
        shares, why = rules.distribution_from(doc, config.shape, config.input_buckets, config.output_buckets,
                                              self.options.min_requests)
        if shares is None and self.on_warning is not None:
            self.on_warning(why)
        distribution = (tuple(tuple(row) for row in shares) if shares is not None
                        else config.workload_distribution)
        return dataclasses.replace(config, total_request_rate=decision.rate, workload_distribution=distribution)


@dataclass(frozen=True)
class _Probe:
    """A readiness probe: the URL, whether any HTTP answer will do (the router), the certificate a TLS router shows."""

    url: str
    any_answer: bool = False
    cafile: str | None = None


def _probe_all(targets: Mapping[str, _Probe]) -> dict[str, tuple[bool, str]]:
    with ThreadPoolExecutor(max_workers=min(16, len(targets)), thread_name_prefix="melange-probe") as pool:
        answers = pool.map(lambda item: (item[0], _probe(item[1])), sorted(targets.items()))
        return dict(answers)


def _probe(probe: _Probe) -> tuple[bool, str]:
    """(healthy, why not): a 2xx answer, or for the router (`any_answer`) any HTTP answer (a 503 without routes is
    alive: the next push fixes it); an https one verified against its certificate."""
    parts = urllib.parse.urlsplit(probe.url)
    try:
        endpoint = parse_endpoint(f"{parts.scheme}://{parts.netloc}", "readiness probe", ControllerError)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        status = Client(endpoint, timeout=PROBE_TIMEOUT_S, cafile=probe.cafile).status(path)
    except (CallFailed, ControllerError) as exc:
        return False, f"{probe.url}: {exc.reason if isinstance(exc, CallFailed) else exc}"
    return 200 <= status < 300 or probe.any_answer, f"HTTP {status}" + ("" if status < 300 else f" from {probe.url}")


def _preview_line(preview: Preview) -> str:
    parts = []
    if preview.launch:
        parts.append(f"launch {', '.join(r.cluster for r in preview.launch)} (+${preview.launch_cost:.2f}/h)")
    if preview.router is not None:
        parts.append(f"launch the router {preview.router.cluster}")
    if preview.remove:
        parts.append(f"tear down {', '.join(preview.remove)} (not serving)")
    if preview.drain:
        parts.append(f"drain and tear down {', '.join(r.cluster for r in preview.drain)} "
                     f"(-${preview.drain_saving:.2f}/h)")
    return f"{'; '.join(parts)}; planned replicas ${preview.plan.cost:.2f}/h"


def _dollars(cost: float, router_cost: float) -> str:
    """A $/h that includes the router's, saying so (the plan's and the replicas' figures beside it do not)."""
    return f"${cost:.2f}/h with the router" if router_cost else f"${cost:.2f}/h"

