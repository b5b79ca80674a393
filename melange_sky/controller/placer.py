"""Where spot replicas may go: the spot pools (a cloud's region and instance type, spot) the fleet just lost replicas
in, or could not launch in, are avoided for a hold, then offered again. Pure: no clock, no ledger.

SkyServe's "dynamic fallback" placer is the model: a location whose spot replica was preempted leaves its active set,
and the next replica goes to the cheapest active location not in use. Ours differs where the plan can do more:
- a pool is the unit spot capacity comes and goes in (an instance type in a region: preemptions of one type in one
  place come in waves, minutes apart), named by its offer key (`aws:us-east-2:g5.xlarge:spot`);
- avoided pools are excluded from the plan, so the solver re-plans their load over every offer left: spot elsewhere,
  another GPU type, or (with markets) on-demand; nothing resets when every pool is avoided, since the plan has other
  offers to fall back on;
- a pool comes back after a hold since its last failure (SkyServe has no timer: it waits for a preemption elsewhere),
  and the plan then hands the load back to it if that is cheaper, replicas there first, the fallback drained after
  (with --per-offer; without it, only load that went to another GPU type or market moves back, see `returned`).

The placer's memory is the ledger's fleet events (`watch` records each step as one, with data): `Placer.of` folds
them back, so passes of separate processes share it.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from melange_sky.fleet.ledger import ReplicaRecord, ReplicaState

__all__ = ["DEFAULT_SPOT_HOLD_MIN", "Avoid", "Placer", "SpotStep", "Why", "back", "hold_note", "lost_spot",
           "pool_where", "returned", "unavailable_spot"]

DEFAULT_SPOT_HOLD_MIN = 10.0


class Why(enum.StrEnum):
    """Why a pool is avoided; each is the kind of the fleet event that records it."""

    PREEMPTED = "spot-preempted"
    UNAVAILABLE = "spot-unavailable"


#: The kind of the event that offers a pool again.
RETURN_EVENT = "spot-return"
KINDS = (Why.PREEMPTED.value, Why.UNAVAILABLE.value, RETURN_EVENT)


@dataclass(frozen=True)
class Avoid:
    """A pool kept out of the plan until `until` (seconds since the epoch), and why."""

    pool: str
    why: Why
    since: float
    until: float


@dataclass(frozen=True)
class SpotStep:
    """One thing the placer learnt or decided: the fleet event to record (kind, message, data) and the pools it is
    about. `watch` records it and prints it as one line."""

    kind: str
    message: str
    pools: tuple[str, ...]
    since: float | None = None  # when the pools started to be avoided (the controller's clock)
    until: float | None = None

    @property
    def data(self) -> dict[str, Any]:
        span = {} if self.until is None else {"since": self.since, "until": self.until}
        return {"pools": list(self.pools), **span}


@dataclass(frozen=True)
class Placer:
    """The pools avoided now (their latest reason and end), as folded from the fleet's events, and when each pool
    was last named by one (a loss recorded before that is known already)."""

    avoiding: Mapping[str, Avoid]
    named: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, events: Iterable[tuple[float, str, Mapping[str, Any] | None]]) -> Placer:
        """The placer after these (time, kind, data) fleet events, oldest first; other kinds and events without
        usable data are skipped. A pool marked again keeps the later end."""
        avoiding: dict[str, Avoid] = {}
        named: dict[str, float] = {}
        for at, kind, data in events:
            pools = [p for p in (data or {}).get("pools") or [] if isinstance(p, str)]
            for pool in pools:
                named[pool] = max(at, named.get(pool, at))
            if kind == RETURN_EVENT:
                for pool in pools:
                    avoiding.pop(pool, None)
                continue
            until = _number((data or {}).get("until"))
            if kind not in (Why.PREEMPTED.value, Why.UNAVAILABLE.value) or until is None:
                continue
            since = _number((data or {}).get("since"))
            for pool in pools:
                old = avoiding.get(pool)
                if old is None or until > old.until:
                    avoiding[pool] = Avoid(pool, Why(kind), at if since is None else since, until)
        return cls(avoiding, named)

    def avoided(self, now: float) -> frozenset[str]:
        """The pools to keep out of a plan made at `now`."""
        return frozenset(p for p, a in self.avoiding.items() if a.until > now)

    def holds(self, now: float) -> list[Avoid]:
        """The holds in force at `now`, by pool."""
        return [a for _, a in sorted(self.avoiding.items()) if a.until > now]


def hold_note(hold: Avoid, now: float) -> str:
    """Why a plan made at `now` leaves `hold`'s pool out, as one line for `up` and its dry run. A hold is kept after
    the fleet's `down`: a preemption wave (or a pool out of capacity) is a fact about the pool, minutes long, not
    about the fleet, so an `up` right after a `down` avoids it too."""
    what = ("its spot replicas were preempted" if hold.why is Why.PREEMPTED
            else "a launch found no spot capacity there")
    return (f"spot pool {pool_where(hold.pool)} is left out of the plan for {_minutes(hold.until - now)} more: "
            f"{what} {_minutes(max(0.0, now - hold.since))} ago (a wave of preemptions is the pool's, not the "
            f"fleet's: the hold outlives a `down`)")


def lost_spot(rows: Sequence[ReplicaRecord], last: Mapping[str, tuple[ReplicaState | None, str, float]],
              placer: Placer, now: float, hold_s: float) -> SpotStep | None:
    """The spot replicas the clouds took away: rows whose latest ledger event (`last`: cluster -> (old state, new
    state, time)) went straight from up to gone, stopped or failed (a refresh saw it: our own teardowns go through
    terminating), recorded after any spot event naming their pool (so each loss counts once, whichever command's
    refresh recorded it). Their pools are avoided for `hold_s`; one step for all of them (a wave)."""
    lost = []
    for row in rows:
        event = last.get(row.cluster)
        if (row.use_spot and event is not None and event[0] is ReplicaState.UP
                and event[1] in (ReplicaState.GONE.value, ReplicaState.STOPPED.value, ReplicaState.FAILED.value)
                and row.state.value == event[1] and event[2] > placer.named.get(row.offer, -math.inf)):
            lost.append(row)
    if not lost:
        return None
    lost.sort(key=lambda r: r.cluster)
    pools = tuple(sorted({r.offer for r in lost}))
    names = ", ".join(r.cluster for r in lost)
    return SpotStep(Why.PREEMPTED.value, f"{names} lost on {_pools_text(pools)}: avoided for {_minutes(hold_s)}; "
                                         f"their load is re-planned on the other offers", pools, now, now + hold_s)


def unavailable_spot(offers: Iterable[str], now: float, hold_s: float) -> SpotStep | None:
    """The spot pools a launch found without capacity (`offers`: offer keys, as `up` reports them), avoided for
    `hold_s` (a pool retried after its hold and still full starts a new one)."""
    pools = tuple(sorted({o for o in offers if o.endswith(":spot")}))
    if not pools:
        return None
    return SpotStep(Why.UNAVAILABLE.value, f"no spot capacity on {_pools_text(pools)}: avoided for "
                                           f"{_minutes(hold_s)}", pools, now, now + hold_s)


def back(placer: Placer, now: float) -> SpotStep | None:
    """The pools whose hold is over at `now`: offered to the plan again, which may move load back to them
    (make-before-break); `returned` says whether it did, once the plan is known."""
    pools = tuple(sorted(p for p, a in placer.avoiding.items() if a.until <= now))
    if not pools:
        return None
    held = min(now - placer.avoiding[p].since for p in pools)
    return SpotStep(RETURN_EVENT, f"{_pools_text(pools)} held {_minutes(held)} without a failure: offered again",
                    pools)


def returned(step: SpotStep, running: Iterable[str], per_offer: bool) -> SpotStep:
    """`step` (from `back`) saying what bringing the plan up did with the pools (`running`: the offer keys of the
    replicas up after it): a promise that load "moves back" would be false where the plan cannot move it. Without
    `per_offer` a GPU entry is priced at its cheapest offer wherever its replicas run, so load that went to another
    region of the same entry stays there (docs/fleet.md); only a re-plan with --per-offer moves it."""
    placed = sum(1 for offer in running if offer in step.pools)
    if placed:
        outcome = f": {placed} replica(s) run there again"
    elif per_offer:
        outcome = "; no replica runs there now: the load stays where it runs until the plan finds it cheaper there"
    else:
        outcome = ("; the load stays where it runs: without --per-offer a GPU entry's replicas are priced at its "
                   "cheapest offer wherever they run, so re-plan with --per-offer (`melange-sky up CONFIG "
                   "--per-offer`) to move it back")
    return SpotStep(step.kind, step.message + outcome, step.pools, step.since, step.until)


def pool_where(pool: str) -> str:
    """`aws:us-east-2:g5.xlarge:spot` as people read it: `aws us-east-2 g5.xlarge (spot)`."""
    parts = pool.split(":")
    spot = parts[-1] == "spot"
    return " ".join(p for p in (parts[:-1] if spot else parts) if p != "any") + (" (spot)" if spot else "")


def _pools_text(pools: Sequence[str]) -> str:
    return ", ".join(pool_where(p) for p in pools)


def _minutes(seconds: float) -> str:
    """`10 min`, `45 s`: whole seconds, truncated."""
    whole = int(seconds)
    minutes, rest = divmod(whole, 60)
    if not minutes:
        return f"{rest} s"
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def _number(value: Any) -> float | None:
    """A finite number as a float; None for anything else (data written by another version, or damaged)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
