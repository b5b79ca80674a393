"""The fleet's reconciliation rules, pure: given the ledger's rows, a plan and the launcher's answers, what to plan,
launch, keep, record and tear down.

No threads, no ledger, no backend here: `fleet.py` reads and writes, these functions decide, so each rule can be
tested on `ReplicaRecord` values alone (tests/test_reconcile.py).
"""
from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from melange_sky.deploy.plan import Plan, PlanRequest, ReplicaPlan
from melange_sky.errors import CapacityError, LaunchCancelled, LaunchError, LedgerError, MelangeError
from melange_sky.fleet.backends import ClusterStatus
from melange_sky.fleet.ledger import NewReplica, ReplicaRecord, ReplicaState, Role
from melange_sky.fleet.reports import Preview


class Keep(enum.Enum):
    """A field a `Transition` leaves as the ledger has it."""

    KEEP = "keep"


KEEP: Literal[Keep.KEEP] = Keep.KEEP


@dataclass(frozen=True)
class Transition:
    """A ledger write a rule calls for: the new state, the event's message, and the endpoint and last error to
    record (`KEEP`: leave them as they are). The caller makes the write."""

    state: ReplicaState
    message: str = ""
    endpoint: str | None | Keep = KEEP
    error: str | None | Keep = KEEP

    def changes(self) -> dict[str, Any]:
        """The fields to write besides the state, as keyword arguments of `Ledger.transition`."""
        return {name: value for name, value in (("endpoint", self.endpoint), ("error", self.error))
                if value is not KEEP}


# -- planning ------------------------------------------------------------------------------------------------------
def plan_request(rows: Iterable[ReplicaRecord], exclude: frozenset[str] = frozenset(), keep_up: bool = True,
                 drop: frozenset[str] = frozenset()) -> PlanRequest:
    """A fleet's ledger rows as a planning request: capacity up (kept), names to reuse, names taken.

    `keep_up` False plans afresh (a shrink may drop replicas that are up); their names are still reused first, so
    replicas the new plan still wants keep serving. `drop`: up replicas being removed (drained), not capacity."""
    live = [r for r in rows if r.state is not ReplicaState.GONE]
    fixed: dict[tuple[str, str], int] = {}
    names = []
    for row in sorted(live, key=lambda r: (r.state is not ReplicaState.UP, cluster_index(r.cluster), r.cluster)):
        if row.cluster in drop:
            continue
        if row.state is ReplicaState.UP and keep_up:
            fixed[row.gpu, row.offer] = fixed.get((row.gpu, row.offer), 0) + 1
        # Reusable names: up replicas (kept), and not-up ones whose cluster name can take a new launch: any on
        # an offer still in use, and those that found no capacity (no cluster was made) wherever they were.
        if row.state in (ReplicaState.UP, ReplicaState.UNAVAILABLE) or row.offer not in exclude:
            names.append((row.gpu, row.offer, row.cluster))
    return PlanRequest(fixed=fixed, names=tuple(names), exclude=exclude, taken=frozenset(r.cluster for r in live))


def leftovers(rows: Iterable[ReplicaRecord], plan: Plan) -> list[ReplicaRecord]:
    """Rows outside the plan that may bill without serving (failed, out of capacity, never launched): `up` tears
    them down. Up ones outside the plan serve and stopped ones cost disks only: both are kept."""
    planned = {r.cluster for r in plan.replicas}
    return [r for r in rows if r.cluster not in planned and r.state.not_serving]


def preview(fleet: str, plan: Plan, rows: Sequence[ReplicaRecord], owners: Mapping[str, str] | None = None,
            stored_digest: str | None = None, digest: str | None = None, shrink: bool = False,
            router: ReplicaPlan | None = None) -> Preview:
    """What `up` would do with `plan` given the fleet's `rows`. `owners`: the fleet owning each planned cluster
    name the ledger has outside these rows (a name taken by another fleet is an error); `stored_digest`: the config
    digest the fleet was last planned from, compared with `digest`. With `shrink`, replicas up outside the plan are
    drained and torn down (else kept, as surplus); `router`: the router task to launch (None: none to launch)."""
    by_name = {r.cluster: r for r in rows}
    owners = owners or {}
    taken = [r.cluster for r in plan.replicas if r.cluster not in by_name and owners.get(r.cluster, fleet) != fleet]
    if taken:
        raise LedgerError(f"cluster {taken[0]} already belongs to fleet {owners[taken[0]]!r} (fleet names that "
                          f"differ only in case or punctuation share cluster names); choose another --name")
    up = {c for c, r in by_name.items() if r.state is ReplicaState.UP}
    planned = {r.cluster: r for r in plan.replicas}
    outside = sorted(c for c in up if c not in planned)
    return Preview(
        plan=plan, launch=[r for r in plan.replicas if r.cluster not in up],
        remove=sorted(r.cluster for r in leftovers(rows, plan)),
        surplus_stopped=sorted(c for c, r in by_name.items() if c not in planned and r.state is ReplicaState.STOPPED),
        keep=sorted(c for c in up if c in planned), surplus=[] if shrink else outside,
        drain=[by_name[c] for c in outside] if shrink else [], router=router,
        stale=sorted(c for c in up if c in planned and task_differs(by_name[c].task, planned[c].task)),
        config_changed=stored_digest is not None and digest is not None and stored_digest != digest)


#: A fresh plan replaces the one that keeps every replica up only when it saves more than this ($/h) and this share
#: of the fleet's cost: replicas that serve are not churned (relaunched elsewhere, drained) for pennies.
SHRINK_MIN_SAVING = 0.01
SHRINK_MIN_FRACTION = 0.05


def worth_shrinking(kept: Plan, fresh: Plan) -> bool:
    """Whether to adopt `fresh` (planned afresh, dropping replicas that are up) over `kept` (every replica up kept)."""
    return fresh.cost < kept.cost - max(SHRINK_MIN_SAVING, SHRINK_MIN_FRACTION * kept.cost)


def choose_plan(rows: Sequence[ReplicaRecord], planner: Callable[[PlanRequest], Plan],
                shrink: bool) -> tuple[Plan, bool]:
    """The plan `up` brings up, and whether it shrinks: the plan keeping every replica up, unless `shrink` and a
    fresh plan (which reuses the replicas it wants) is cheaper by more than `SHRINK_MIN_SAVING`. One rule for `up`
    and for a controller pricing what `up` would do."""
    kept = planner(plan_request(rows))
    if not shrink or not any(r.state is ReplicaState.UP for r in rows):
        return kept, False
    try:
        fresh = planner(plan_request(rows, keep_up=False))
    except MelangeError:  # keep what runs
        return kept, False
    return (fresh, True) if worth_shrinking(kept, fresh) else (kept, False)


def shrink_note(plan: Plan, unconstrained: Plan) -> str | None:
    """The note when the replicas already up make the fleet dearer than its load alone needs."""
    if unconstrained.cost < 0.99 * plan.cost:
        return (f"the load alone needs ${unconstrained.cost:.2f}/h ({len(unconstrained.replicas)} replica(s)); the "
                f"replicas already up are kept, so the fleet costs ${plan.cost:.2f}/h: `down` and `up` again to "
                f"shrink it")
    return None


def new_replica(replica: ReplicaPlan, round_: int, role: Role = Role.REPLICA) -> NewReplica:
    """What the ledger records of a planned replica (or the router) before its launch is requested."""
    return NewReplica(cluster=replica.cluster, gpu=replica.entry, offer=replica.offer, price_per_hour=replica.price,
                      cloud=replica.cloud, region=replica.region, instance_type=replica.instance_type,
                      use_spot=replica.use_spot, round=round_, task=replica.task, role=role)


def members(rows: Iterable[ReplicaRecord]) -> list[tuple[str, str, str]]:
    """The replicas a router may send requests to, as (cluster, GPU entry, URL): those the ledger has up at a known
    endpoint. Pushed after every change, so the router's membership is the ledger's."""
    return [(r.cluster, r.gpu, r.url) for r in rows if r.url is not None and r.role is Role.REPLICA]


def drained(inflight: Mapping[str, int], urls: Iterable[str]) -> bool:
    """Whether none of `urls` has a request in flight at the router (its `GET /admin/routes` "inflight")."""
    return all(inflight.get(url, 0) == 0 for url in urls)


# -- what the launcher's answers mean ------------------------------------------------------------------------------
def status_transition(row: ReplicaRecord, status: ClusterStatus, endpoint: str | None = None) -> Transition | None:
    """What a status answer means for a row, one rule for `up` and `status --refresh`: UP → up (at `endpoint`, the
    one the caller knows or looked up); STOPPED → stopped; INIT on an up row → failed (unhealthy); GONE → gone,
    unless the row is pending (its launch is not requested yet). None when the row already says so.

    (Rows whose launch or teardown is in flight are the lock holder's to write: the caller checks
    `row.state.in_flight` first.)"""
    if status is ClusterStatus.UP:
        if row.state is not ReplicaState.UP or endpoint != row.endpoint:
            return Transition(ReplicaState.UP, "backend: up", endpoint=endpoint, error=None)
    elif status is ClusterStatus.STOPPED and row.state is not ReplicaState.STOPPED:
        return Transition(ReplicaState.STOPPED, "backend: stopped", endpoint=None)
    elif status is ClusterStatus.INIT and row.state is ReplicaState.UP:
        return Transition(ReplicaState.FAILED, endpoint=None,
                          error="the launcher reports it INIT (provisioning or unhealthy); `up` relaunches it")
    elif status is ClusterStatus.GONE and row.state is not ReplicaState.PENDING:
        return Transition(ReplicaState.GONE, "backend: not found", endpoint=None)
    return None


def interrupted_transition(row: ReplicaRecord, status: ClusterStatus | None,
                           endpoint: str | None = None) -> Transition | None:
    """After Ctrl-C, what the launcher's answer (None: no answer) means for a launch that was in flight: up → up;
    gone → pending again (no cluster was made); otherwise a row still launching → failed, its cluster may exist."""
    if status is ClusterStatus.UP:
        return Transition(ReplicaState.UP, "interrupted, but the launch had finished", endpoint=endpoint, error=None)
    if status is ClusterStatus.GONE:
        return Transition(ReplicaState.PENDING, "interrupted before a cluster existed", error=None)
    if row.state is ReplicaState.LAUNCHING:
        return Transition(ReplicaState.FAILED, error="interrupted during launch; the cluster may exist: rerun `up` "
                                                     "to resume or `down` to remove it")
    return None


def launch_failure(exc: Exception) -> tuple[ReplicaState, str]:
    """The state and reason to record for a launch that raised: no capacity → unavailable (re-planned elsewhere);
    anything else → failed, a backend's bug included, so the replica's state is never lost."""
    if isinstance(exc, CapacityError):
        return ReplicaState.UNAVAILABLE, exc.reason
    if isinstance(exc, LaunchCancelled):
        return ReplicaState.FAILED, f"cancelled: {exc.reason}; the cluster may exist"
    if isinstance(exc, LaunchError):
        return ReplicaState.FAILED, exc.reason
    if isinstance(exc, MelangeError):
        return ReplicaState.FAILED, str(exc)
    return ReplicaState.FAILED, f"{type(exc).__name__}: {exc}"


# -- tasks and names -----------------------------------------------------------------------------------------------
def task_differs(stored: Mapping[str, Any] | None, planned: Mapping[str, Any]) -> bool:
    """Whether a running replica's task is not the plan's, ignoring what only names or places it (a re-plan may
    render a kept replica at another offer of the same GPU)."""
    if stored is None:
        return False

    def essence(task: Mapping[str, Any]) -> str:
        resources = {k: v for k, v in (task.get("resources") or {}).items()
                     if k not in ("cloud", "region", "instance_type", "use_spot")}
        return json.dumps({**task, "name": None, "resources": resources}, sort_keys=True, default=str)

    return essence(stored) != essence(planned)


def task_shape(task: Mapping[str, Any]) -> str:
    """A task without its name: replicas of one offer share it, so a dry run validates each shape once."""
    return json.dumps({**task, "name": None}, sort_keys=True, default=str)


def task_port(task: Mapping[str, Any] | None) -> int | None:
    """The serving port a rendered task opens (`resources.ports`: an int, a string or a list of them)."""
    ports = ((task or {}).get("resources") or {}).get("ports")
    first = ports[0] if isinstance(ports, list) and ports else ports
    try:
        return int(str(first).split("-")[0]) if first is not None else None
    except ValueError:
        return None


def cluster_index(cluster: str) -> int:
    """The replica number a cluster name ends with (`<fleet>-<gpu>-<i>`); 0 without one."""
    match = re.search(r"-(\d+)$", cluster)
    return int(match.group(1)) if match else 0
