"""A fleet whose controller runs with it, on its router's host (`up --controller hosted`): the state document the
user's machine and the controller hand each other through the router, and how each side adopts the other's.

Two ledgers, one writer each: the user's machine writes only its own ledger, the controller only its own (under
its host's `MELANGE_SKY_HOME`). They meet through the router's admin API (`PUT/GET /admin/controller`, admin token
only), which keeps the latest *snapshot*: the fleet's record (plan, config, settings) and every cluster row (tasks
carry secret names only, never values), plus, from the controller, its last pass.
- `up` pushes its snapshot once the fleet is up (`writer: up`); the controller adopts it before its next pass.
- the controller pushes its own after every pass (`writer: controller`); `status` and `down` adopt its rows, so the
  user's ledger knows every cluster the controller launched (and `down` tears them down).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from melange_sky.deploy.membership import get_controller_doc, push_controller_doc
from melange_sky.deploy.router_task import router_certfile, with_certfile
from melange_sky.errors import MelangeError
from melange_sky.fleet.keys import load_keys
from melange_sky.fleet.ledger import FleetRecord, Ledger, NewReplica, ReplicaState, Role
from melange_sky.fleet.reports import ControllerView

__all__ = ["HOSTED", "LOCAL", "SNAPSHOT_VERSION", "adopt", "controller_mode", "controller_settings", "fetch",
           "push", "push_from_ledger", "snapshot", "sync_from_controller"]

HOSTED, LOCAL = "hosted", "local"
SNAPSHOT_VERSION = 1
#: A hosted controller whose last pass is older than this many intervals (plus one pass's slack) is unhealthy.
STALE_INTERVALS = 3
TIMEOUT_S = 5.0  # one call to the router from `status` or `down`


def controller_settings(record: FleetRecord | Mapping[str, Any] | None) -> dict[str, Any]:
    """The `controller` block `up` stored beside the fleet's plan ({"mode", "interval", ...}); {} for a fleet
    watched from the user's machine."""
    plan = record.plan if isinstance(record, FleetRecord) else (record or {})
    block = plan.get("controller")
    return dict(block) if isinstance(block, Mapping) else {}


def controller_mode(record: FleetRecord | Mapping[str, Any] | None) -> str:
    return HOSTED if controller_settings(record).get("mode") == HOSTED else LOCAL


def snapshot(ledger: Ledger, fleet: str, writer: str, last_pass: Mapping[str, Any] | None = None,
             recent: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The fleet as `ledger` has it, as a document: record and every cluster row (tasks with secret names only);
    from the controller, its last pass and its latest actions ({"at", "kind", "message"})."""
    record = ledger.get_fleet(fleet)
    if record is None:
        raise MelangeError(f"no fleet {fleet!r} in the ledger")
    rows = ledger.replicas(fleet, roles=None)
    return {"version": SNAPSHOT_VERSION, "fleet": fleet, "writer": writer, "at": time.time(),
            "record": {"config_hash": record.config_hash, "plan": record.plan, "updated": record.updated},
            "clusters": [{**r.to_dict(), "task": r.task} for r in rows], "pass": last_pass, "recent": recent or []}


def adopt(ledger: Ledger, doc: Mapping[str, Any], *, router_url: str | None = None,
          router_cafile: str | None = None, message: str) -> list[str]:
    """Write the snapshot's record and rows into `ledger` (each changed row one history event, saying `message`);
    the clusters changed. `router_url` (the controller's side): the router's row gets this endpoint, since the
    controller reaches the router on its own host, and with `router_cafile` (a TLS router) its task names that
    certificate, the file the router serves on this host (the user's task names a file on the user's machine), so
    every call to the router from here is pinned to it; None (the user's side): the router's row is the user's own
    (the controller never launches the router it runs beside), so it is left as it is.

    An older view never overwrites a newer one: the snapshot knew each row as of its own last change or the
    writer's last look at the launcher (a controller's pass began with one), whichever is later; a row (or the
    fleet's record) this ledger wrote after that is kept (`Ledger.adopt_replica`'s `as_of`). Both sides' clocks are
    compared: hosts kept in time (NTP) are assumed."""
    fleet = str(doc["fleet"])
    record = doc.get("record") or {}
    checked = _checked_at(doc)
    current = ledger.get_fleet(fleet)
    record_as_of = _latest(record.get("updated"), checked)
    if current is None or ((current.plan != record.get("plan") or current.config_hash != record.get("config_hash"))
                           and (record_as_of is None or current.updated <= record_as_of)):
        ledger.save_fleet(fleet, str(record.get("config_hash")), record.get("plan") or {})
    changed = []
    for row in doc.get("clusters") or []:
        role = Role(row.get("role") or Role.REPLICA.value)
        endpoint = row.get("endpoint")
        task = row.get("task")
        if role is Role.ROUTER:
            if router_url is None:
                continue
            if row.get("state") == ReplicaState.UP.value:
                endpoint = router_url
            if router_cafile is not None:
                task = with_certfile(task, router_cafile)
        new = NewReplica(cluster=row["cluster"], gpu=row["gpu"], offer=row["offer"],
                         price_per_hour=float(row["price_per_hour"]), cloud=row.get("cloud"),
                         region=row.get("region"), instance_type=row.get("instance_type"),
                         use_spot=bool(row.get("use_spot")), round=int(row.get("round") or 0), task=task,
                         role=role)
        if ledger.adopt_replica(fleet, new, ReplicaState(row["state"]), endpoint=endpoint,
                                error=row.get("last_error"), message=message,
                                as_of=_latest(row.get("updated"), checked)) is not None:
            changed.append(new.cluster)
    return changed


def _checked_at(doc: Mapping[str, Any]) -> float | None:
    """When the snapshot's writer last looked at the launcher: a controller's pass starts with a refresh."""
    last = doc.get("pass")
    return _latest(last.get("started") if isinstance(last, Mapping) else None)


def _latest(*times: Any) -> float | None:
    """The latest of the numbers given (None for none: a snapshot from before rows were dated is adopted as is)."""
    found = [float(t) for t in times if isinstance(t, int | float) and not isinstance(t, bool)]
    return max(found) if found else None


def _link(ledger: Ledger, fleet: str) -> tuple[str, str, str | None]:
    """The router's URL, admin token and certificate, to call its admin API; MelangeError when there is none."""
    router = ledger.router(fleet)
    if router is None or router.url is None:
        raise MelangeError(f"the router is not up ({router.state.value if router is not None else 'none'})")
    keys = load_keys(fleet, ledger.home)
    if keys is None:
        raise MelangeError(f"no keys for fleet {fleet!r} in {ledger.home / 'keys'}")
    return router.url, keys.admin_token, router_certfile(router.task)


def push(url: str, admin_token: str, doc: Mapping[str, Any], cafile: str | None = None,
         timeout: float = TIMEOUT_S) -> None:
    """Hand the router a snapshot (RouterError when it cannot be reached)."""
    push_controller_doc(url, doc, admin_token, timeout, cafile=cafile)


def fetch(url: str, admin_token: str, writer: str, cafile: str | None = None,
          timeout: float = TIMEOUT_S) -> dict[str, Any] | None:
    """`writer`'s latest snapshot on the router ("up" or "controller"), None if it pushed none (RouterError when
    the router cannot be reached)."""
    docs = get_controller_doc(url, admin_token, timeout, cafile=cafile).get("docs")
    doc = docs.get(writer) if isinstance(docs, dict) else None
    return doc if isinstance(doc, dict) else None


def push_from_ledger(ledger: Ledger, fleet: str, writer: str) -> None:
    """`up`'s snapshot, handed to the fleet's router for its hosted controller to adopt."""
    url, token, cafile = _link(ledger, fleet)
    push(url, token, snapshot(ledger, fleet, writer), cafile)


def sync_from_controller(ledger: Ledger, fleet: str, now: float | None = None) -> ControllerView:
    """Ask a hosted fleet's router for its controller's latest snapshot, adopt its rows into the user's ledger
    (so every cluster the controller launched is known here), and say how the controller is doing."""
    record = ledger.get_fleet(fleet)
    settings = controller_settings(record)
    if controller_mode(record) != HOSTED:
        return ControllerView(mode=LOCAL)
    interval = float(settings.get("interval") or 60.0)
    router = ledger.router(fleet)
    host = router.cluster if router is not None else None
    now = time.time() if now is None else now
    try:
        url, token, cafile = _link(ledger, fleet)
        doc = fetch(url, token, "controller", cafile)
    except MelangeError as exc:
        return ControllerView(mode=HOSTED, host=host, interval=interval, reachable=False, healthy=False,
                              reason=f"cannot reach the controller's host: {exc}")
    if doc is None or doc.get("writer") != "controller" or doc.get("fleet") != fleet:
        return ControllerView(mode=HOSTED, host=host, interval=interval, healthy=False,
                              reason="no pass yet: the controller has not adopted the fleet")
    adopt(ledger, doc, message="from the hosted controller")
    last = doc.get("pass") or {}
    at = float(last["started"]) if last.get("started") else None
    age = now - (at if at is not None else float(doc.get("at") or 0.0))
    stale = age > STALE_INTERVALS * interval + float(last.get("seconds") or 0.0)
    ok = bool(last.get("ok"))
    actions = [f"{a.get('kind')}: {a.get('message')}" for a in last.get("actions") or []]
    reason = (f"no pass for {age:.0f} s (every {interval:g} s expected)" if stale
              else "" if ok else "its first pass is still running" if not last
              else str(last.get("error") or "the last pass left the fleet incomplete"))
    recent = [a for a in doc.get("recent") or [] if isinstance(a, Mapping)]
    latest = recent[-1] if recent else None
    return ControllerView(mode=HOSTED, host=host, interval=interval, last_pass_at=at,
                          last_pass_ok=ok if at is not None else None, actions=actions, error=last.get("error"),
                          healthy=ok and not stale, reason=reason, age=age, adopted=True,
                          recent=[f"{a.get('kind')}: {a.get('message')}" for a in recent],
                          last_action=None if latest is None else f"{latest.get('kind')}: {latest.get('message')}",
                          last_action_age=None if latest is None else now - float(latest.get("at") or now))
