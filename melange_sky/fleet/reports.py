"""What the fleet's operations return: plain records the CLI prints (text or `--json`) and a controller could read.

No I/O here; `to_dict()` is each record's `--json` form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from melange_sky.deploy.plan import Plan, ReplicaPlan
from melange_sky.fleet.backends import Validation
from melange_sky.fleet.ledger import Event, FleetRecord, ReplicaRecord, ReplicaState, running_cost

#: States in which a cluster's instance bills for sure: provisioning, serving, being torn down. A failed launch may
#: or may not hold one; its time is not counted (a cost to date never claims what may not have been paid).
BILLED_STATES = frozenset({ReplicaState.LAUNCHING.value, ReplicaState.UP.value, ReplicaState.TERMINATING.value})


@dataclass(frozen=True)
class Usage:
    """A cluster's time and money so far, from its ledger events: how long it billed, and its current stretch up."""

    billed_seconds: float
    uptime_seconds: float  # since it last came up (0 when it is not up)
    cost_to_date: float  # billed hours x its $/h

    def to_dict(self) -> dict[str, Any]:
        return {"billed_seconds": round(self.billed_seconds, 1), "uptime_seconds": round(self.uptime_seconds, 1),
                "cost_to_date": round(self.cost_to_date, 6)}


def usage(row: ReplicaRecord, events: list[Event], now: float, since: float = 0.0) -> Usage:
    """`Usage` of `row` from its events (oldest first) at or after `since` (the fleet's creation: a name reused by
    an earlier fleet does not bill this one)."""
    billed = 0.0
    state: str | None = None
    at = up_since = 0.0
    for event in events:
        if event.at < since:
            continue
        if state in BILLED_STATES:
            billed += max(0.0, event.at - at)
        if event.new_state == ReplicaState.UP.value and state != ReplicaState.UP.value:
            up_since = event.at
        state, at = event.new_state, event.at
    if state in BILLED_STATES:
        billed += max(0.0, now - at)
    uptime = now - up_since if state == ReplicaState.UP.value else 0.0
    return Usage(billed, max(0.0, uptime), billed / 3600 * row.price_per_hour)


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
    #: replicas up that the plan no longer needs: once the plan is up, they leave the router, finish what they
    #: serve (up to the drain timeout) and are torn down
    drain: list[ReplicaRecord] = field(default_factory=list)
    router: ReplicaPlan | None = None  # the fleet's router, to launch (None: up already, or not deployed)

    @property
    def launch_cost(self) -> float:
        return sum(r.price for r in self.launch) + (self.router.price if self.router is not None else 0.0)

    @property
    def drain_saving(self) -> float:
        """$/h no longer paid once the drained replicas are torn down."""
        return sum(r.price_per_hour for r in self.drain)

    @property
    def changes(self) -> bool:
        """Whether `up` would launch or tear down anything: what the user is asked to confirm."""
        return bool(self.launch or self.remove or self.drain or self.router)

    @property
    def notes(self) -> list[str]:
        """What the user should know before confirming: changed config, surplus or outdated replicas."""
        notes = []
        if self.config_changed:
            notes.append("the config or plan settings changed since this fleet was last brought up")
        if self.router is not None:
            notes.append(f"router {self.router.cluster} on {self.router.offer} (${self.router.price:.2f}/h) will be "
                         f"launched: the fleet's endpoint")
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
                "drain": [r.cluster for r in self.drain], "drain_saving": round(self.drain_saving, 6),
                "router": self.router.summary() if self.router is not None else None,
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
    drained: list[str] = field(default_factory=list)  # replicas the plan no longer needed: drained and torn down
    router: ReplicaRecord | None = None  # the fleet's router row after `up` (None: the fleet has none)
    expects_router: bool = False  # `up` was asked to have a router up

    @property
    def endpoint(self) -> str | None:
        """The fleet's one endpoint: its router's, when it is up."""
        return self.router.url if self.router is not None else None

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
                and all(r.cluster in planned for r in self.plan.replicas)
                and (not self.expects_router or self.endpoint is not None))

    @property
    def cost(self) -> float:
        return sum(r.price_per_hour for r in self.up)

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "complete": self.complete, "interrupted": self.interrupted,
                "rounds": self.rounds, "seconds": round(self.seconds, 3), "cost_up": round(self.cost, 6),
                "cost_planned": round(self.plan.cost, 6), "unavailable_offers": self.unavailable_offers,
                "notes": self.notes, "replicas": [r.to_dict() for r in self.replicas], "drained": self.drained,
                "endpoint": self.endpoint, "router": self.router.to_dict() if self.router is not None else None}


@dataclass(frozen=True)
class DryRunReport:
    """What `up --dryrun` found: the plan, which replicas would launch or stay, and how each task validated."""

    preview: Preview
    validations: dict[str, Validation]
    missing_secrets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. why no router would be launched

    @property
    def plan(self) -> Plan:
        return self.preview.plan

    def to_dict(self) -> dict[str, Any]:
        return {**self.preview.to_dict(), "dryrun": True, "clouds": self.plan.clouds,
                "missing_secrets": self.missing_secrets, "notes": [*self.preview.notes, *self.notes],
                "validation": {k: str(v) for k, v in self.validations.items()}}


@dataclass(frozen=True)
class ControllerView:
    """Where a fleet's controller runs and, for one hosted on its router's host, its last pass and health."""

    mode: str  # "hosted" (on the router's host) or "local" (`melange-sky watch` on the user's machine)
    host: str | None = None  # the cluster it runs on
    interval: float | None = None
    reachable: bool = True
    last_pass_at: float | None = None
    last_pass_ok: bool | None = None
    actions: list[str] = field(default_factory=list)
    error: str | None = None
    healthy: bool | None = None
    reason: str = ""
    age: float | None = None  # seconds since its last pass began
    adopted: bool = False  # its snapshot was read and its rows written into this ledger
    recent: list[str] = field(default_factory=list)  # its latest actions ("kind: message"), oldest first
    last_action: str | None = None
    last_action_age: float | None = None  # seconds ago

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "host": self.host, "interval": self.interval, "reachable": self.reachable,
                "last_pass_at": self.last_pass_at, "last_pass_ok": self.last_pass_ok, "actions": self.actions,
                "error": self.error, "healthy": self.healthy, "reason": self.reason, "adopted": self.adopted,
                "recent": self.recent}

    def line(self, fleet: str) -> str:
        """One line for `status` (and `down`)."""
        if self.mode != "hosted":
            return f"{fleet}: controller: local (run `melange-sky watch {fleet}`)"
        where = f"hosted on {self.host}" if self.host else "hosted"
        if self.last_pass_at is None:
            return f"{fleet}: controller: {where}: unhealthy: {self.reason}"
        health = "healthy" if self.healthy else f"unhealthy: {self.reason}"
        did = "; ".join(self.actions) if self.actions else "nothing to do"
        acted = ("" if self.last_action is None or self.actions
                 else f"; last action {self.last_action_age or 0.0:.0f} s ago: {self.last_action}")
        return (f"{fleet}: controller: {where}: last pass {self.age or 0.0:.0f} s ago, "
                f"{'ok' if self.last_pass_ok else 'failed'} ({did}); {health}{acted}")


@dataclass(frozen=True)
class FleetCounts:
    """A fleet's replicas against its plan, for `status`'s "N/M up": the planned ones up out of those planned
    (the plan's count, not the rows left in the ledger: a replica that died, or one an interrupted `up` never
    launched, still counts), those up outside the plan, and the gone ones still to be replaced apart from the
    gone ones truly replaced or torn down."""

    up: int  # planned replicas up
    planned: int  # replicas the plan has (rows that may have a cluster, for a fleet whose plan lists none)
    up_outside_plan: int  # replicas up that the plan no longer has (kept by --no-shrink, or draining)
    gone_to_replace: list[str]  # planned replicas gone (dead, preempted, torn down as unhealthy): not yet back
    not_launched: list[str]  # planned replicas with no row yet (an `up` interrupted before recording them)
    gone_replaced: int  # gone replicas outside the plan: replaced (re-planned elsewhere) or torn down

    def to_dict(self) -> dict[str, Any]:
        return {"up": self.up, "planned": self.planned, "up_outside_plan": self.up_outside_plan,
                "gone_to_replace": self.gone_to_replace, "not_launched": self.not_launched,
                "gone_replaced": self.gone_replaced}


def fleet_counts(plan: dict[str, Any], replicas: list[ReplicaRecord]) -> FleetCounts:
    """`FleetCounts` of one fleet's replica rows (its router aside) against its stored plan."""
    planned = [str(r["cluster"]) for r in plan.get("replicas") or [] if isinstance(r, dict) and r.get("cluster")]
    wanted = set(planned)
    rows = {r.cluster: r for r in replicas}
    up = [r for r in replicas if r.state is ReplicaState.UP]
    gone = [r for r in replicas if r.state is ReplicaState.GONE]
    if not planned:  # a plan stored without its replicas: count what may have a cluster, as before
        return FleetCounts(len(up), sum(1 for r in replicas if r.state.may_have_cluster), 0, [], [], len(gone))
    return FleetCounts(up=sum(1 for r in up if r.cluster in wanted), planned=len(planned),
                       up_outside_plan=sum(1 for r in up if r.cluster not in wanted),
                       gone_to_replace=[r.cluster for r in gone if r.cluster in wanted],
                       not_launched=[c for c in planned if c not in rows],
                       gone_replaced=sum(1 for r in gone if r.cluster not in wanted))


@dataclass(frozen=True)
class StatusReport:
    """Fleets and their replicas as the ledger has them (after a refresh, as the launcher saw them)."""

    fleets: list[FleetRecord]
    replicas: list[ReplicaRecord]
    routers: dict[str, ReplicaRecord] = field(default_factory=dict)  # fleet -> its router's row, if it has one
    usage: dict[str, Usage] = field(default_factory=dict)  # cluster -> its time and cost so far
    controllers: dict[str, ControllerView] = field(default_factory=dict)  # fleet -> its hosted controller

    def serving_cost(self, fleet: str) -> float:
        """$/h of what serves: replicas up, and the router when up (what the fleet costs while it works)."""
        return sum(r.price_per_hour for r in self.clusters(fleet) if r.state is ReplicaState.UP)

    def planned_cost(self, fleet: str) -> float | None:
        record = next((f for f in self.fleets if f.name == fleet), None)
        cost = record.plan.get("cost") if record is not None else None
        return float(cost) if isinstance(cost, (int, float)) else None

    def cost_to_date(self, fleet: str) -> float:
        return sum(self.usage[r.cluster].cost_to_date for r in self.clusters(fleet) if r.cluster in self.usage)

    def of(self, fleet: str) -> list[ReplicaRecord]:
        return [r for r in self.replicas if r.fleet == fleet]

    def clusters(self, fleet: str) -> list[ReplicaRecord]:
        """The fleet's replicas and its router: every cluster that bills."""
        router = self.routers.get(fleet)
        return [*self.of(fleet), *([router] if router is not None else [])]

    def endpoint(self, fleet: str) -> str | None:
        """The fleet's one endpoint: its router's URL while the router is up."""
        router = self.routers.get(fleet)
        return router.url if router is not None else None

    def counts(self, fleet: str) -> FleetCounts:
        record = next((f for f in self.fleets if f.name == fleet), None)
        return fleet_counts(record.plan if record is not None else {}, self.of(fleet))

    def shown(self, fleet: str) -> list[ReplicaRecord]:
        """The clusters `status` lists: every one that may exist, and the gone ones still to be replaced (planned
        replicas, and the router, which `up` and `watch` relaunch); the others are only counted."""
        replace = set(self.counts(fleet).gone_to_replace)
        return [r for r in self.clusters(fleet)
                if r.state.may_have_cluster or r.cluster in replace or r.role.value == "router"]

    def to_dict(self) -> dict[str, Any]:
        return {"fleets": [{"name": f.name, "config_hash": f.config_hash, "created": f.created,
                            "updated": f.updated,
                            "cost_running": round(running_cost(self.clusters(f.name)), 6),
                            "cost_serving": round(self.serving_cost(f.name), 6),
                            "cost_planned": self.planned_cost(f.name),
                            "cost_to_date": round(self.cost_to_date(f.name), 6),
                            "endpoint": self.endpoint(f.name),
                            "replicas_count": self.counts(f.name).to_dict(),
                            "router": self._row(self.routers[f.name]) if f.name in self.routers else None,
                            "replicas": [self._row(r) for r in self.of(f.name)],
                            "controller": (self.controllers[f.name].to_dict() if f.name in self.controllers
                                           else None)} for f in self.fleets]}

    def _row(self, row: ReplicaRecord) -> dict[str, Any]:
        return {**row.to_dict(), **(self.usage[row.cluster].to_dict() if row.cluster in self.usage else {})}


@dataclass
class DownReport:
    """What `down` did to one fleet: torn down, already gone, failed (kept for the next `down`), or busy."""

    fleet: str
    removed: list[str]  # torn down now
    already_gone: list[str]
    failed: dict[str, str]  # cluster -> reason; kept in the ledger for the next `down`
    fleet_removed: bool
    busy: str | None = None  # another process held the fleet's lock: nothing was done
    controller: str | None = None  # how its hosted controller was stopped (first), or why the rest was kept

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "removed": self.removed, "already_gone": self.already_gone,
                "failed": self.failed, "fleet_removed": self.fleet_removed, "busy": self.busy,
                "controller": self.controller}
