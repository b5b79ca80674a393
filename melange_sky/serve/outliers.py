"""Which replicas stop getting traffic after failures, and how many retries the router may add: outlier detection
with limits and a retry budget, as Envoy does them. Plain state, no sockets: the data path reports what happened,
these objects decide; `policy.py` only reads the result (`Replica.ejected`, `Replica.down`).

Two ways out of rotation, both ended by a probe (`GET /health` answering 200), the wait before the next probe
doubling with every ejection or failed probe in a row (`base_s`, capped at `max_s`; the count is forgiven once a
replica has served `max_s` without another ejection):

- **Down** (a fact, not a judgement): its connection was refused or could not be made (no process, no host). No cap:
  a dead replica never keeps getting traffic, even the only one of its GPU type.
- **Ejected** (an outlier, Envoy's consecutive_gateway_failure and consecutive_5xx): `consecutive_gateway_failure`
  resets, read timeouts or empty streams in a row, or `consecutive_5xx` 5xx answers in a row that *another replica
  did not give to the same request*. A request answered 5xx by two replicas is the request's fault (a "query of
  death"): it is not tried a third time and charges neither replica; a 5xx the request got from one replica only
  (no other was tried) charges no one either. At most `max_ejection_percent` of a GPU type's replicas are ejected at
  once, and always at least one: the cap guards against blaming healthy replicas, the floor lets a single broken
  replica of a type of one or two go.

When too few replicas are healthy the policy stops trusting ejections (Envoy's panic threshold; see `policy.py`).

Retries draw on a budget (Envoy's retry budget): at most `percent` % of the requests in flight may be retries in
flight at once, and never fewer than `min_concurrent`, so a burst of failing requests cannot multiply itself.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from melange_sky.serve.policy import Replica, Rotation

__all__ = ["DOWN", "Ejection", "OUTLIER_5XX", "OUTLIER_GATEWAY", "OutlierDetector", "OutlierSettings",
           "RetryBudget"]

#: Why a replica left the rotation (the `reason` label of `melange_ejections_total`).
DOWN = "unreachable"
OUTLIER_GATEWAY = "consecutive_gateway_failure"
OUTLIER_5XX = "consecutive_5xx"


@dataclass(frozen=True)
class OutlierSettings:
    """The limits of outlier detection. The cap is Envoy's default; the thresholds are lower than Envoy's 5 because
    the evidence is stronger (a 5xx counts only when another replica served the same request); the waits are
    shorter than Envoy's 30 s ejections because a probe, not a timer, ends them."""

    consecutive_5xx: int = 3
    consecutive_gateway_failure: int = 2
    max_ejection_percent: float = 10.0
    base_s: float = 1.0
    max_s: float = 60.0


class Ejection(NamedTuple):
    """A replica taken out of rotation now: why (`reason`: DOWN or an outlier rule) and when it is probed; or, with
    `capped`, one the cap on its GPU type kept in rotation."""

    replica: Replica
    reason: str
    detail: str
    probe_in_s: float
    capped: bool = False


class OutlierDetector:
    """Counts each replica's failures in a row and ejects within the cap; re-admits on a good probe."""

    def __init__(self, settings: OutlierSettings = OutlierSettings(), rotation: Rotation | None = None):
        self.settings = settings
        self.rotation = rotation or Rotation()
        self.replicas: list[Replica] = []
        self.totals: dict[str, int] = {}  # replicas per GPU type in the routes

    def track(self, replicas: Iterable[Replica]) -> None:
        """The replicas the routes hold now (after each swap): the caps are shares of these."""
        self.replicas = list(replicas)
        self.totals = {}
        for replica in self.replicas:
            self.totals[replica.gpu] = self.totals.get(replica.gpu, 0) + 1
        self._count()

    def _count(self) -> None:  # on swaps, ejections and re-admissions only: rare
        self.rotation.out = sum(1 for r in self.replicas if r.ejected)

    def allowed(self, gpu: str) -> int:
        """How many of a GPU type's replicas may be ejected as outliers at once: the share, at least one."""
        return max(1, math.floor(self.totals.get(gpu, 0) * self.settings.max_ejection_percent / 100 + 1e-9))

    def ejected(self, gpu: str) -> int:
        """Replicas of the type ejected as outliers now (down ones are not counted: they are not a judgement)."""
        return sum(1 for r in self.replicas if r.gpu == gpu and r.ejected and not r.down)

    # -- what the data path reports ----------------------------------------------------------------------------------
    def unreachable(self, replica: Replica, detail: str, now: float) -> Ejection | None:
        """Its connection was refused or could not be made: down at once, whatever the cap."""
        replica.last_error = detail
        replica.failures += 1
        if replica.ejected and replica.down:
            return None
        replica.down = True
        return self._eject(replica, DOWN, detail, now, capped=False)

    def gateway_failure(self, replica: Replica, detail: str, now: float) -> Ejection | None:
        """A reset, a read timeout or a stream that ended before any data."""
        replica.last_error = detail
        replica.failures += 1
        if replica.failures < self.settings.consecutive_gateway_failure:
            return None
        return self._eject(replica, OUTLIER_GATEWAY, detail, now, capped=True)

    def confirmed_5xx(self, replica: Replica, detail: str, now: float) -> Ejection | None:
        """A 5xx answer to a request another replica then served (a non-5xx answer): evidence against this one."""
        replica.last_error = detail
        replica.strikes += 1
        if replica.strikes < self.settings.consecutive_5xx:
            return None
        return self._eject(replica, OUTLIER_5XX, detail, now, capped=True)

    def answered(self, replica: Replica) -> None:
        """A non-5xx answer: the runs of failures end."""
        if replica.failures or replica.strikes:
            replica.failures = replica.strikes = 0

    def probed(self, replica: Replica, ok: bool, detail: str | None, now: float) -> bool:
        """The outcome of a health probe while out of rotation: re-admit (True), or wait twice as long."""
        if not replica.ejected:
            return False
        if ok:
            replica.ejected = replica.down = False
            self._count()
            replica.failures = replica.strikes = 0
            replica.readmitted_at = now
            return True
        replica.last_error = detail or replica.last_error
        replica.retry_at = now + self._wait(replica)
        replica.backoff += 1
        return False

    def _eject(self, replica: Replica, reason: str, detail: str, now: float, capped: bool) -> Ejection | None:
        if replica.ejected:
            if reason == DOWN:  # an outlier found dead: no longer counted against its type's cap
                return Ejection(replica, reason, detail, max(replica.retry_at - now, 0.0))
            return None
        if capped and self.ejected(replica.gpu) >= self.allowed(replica.gpu):
            replica.capped += 1
            return Ejection(replica, reason, detail, 0.0, capped=True)
        if replica.readmitted_at is not None and now - replica.readmitted_at >= self.settings.max_s:
            replica.backoff = 0  # served well for a while since its last ejection: start afresh
        replica.ejected = True
        self._count()
        wait = self._wait(replica)
        replica.retry_at = now + wait
        replica.backoff += 1
        replica.ejections += 1
        return Ejection(replica, reason, detail, wait)

    def _wait(self, replica: Replica) -> float:
        return min(self.settings.base_s * 2 ** min(replica.backoff, 30), self.settings.max_s)


class RetryBudget:
    """Envoy's retry budget: retries in flight ≤ max(`min_concurrent`, `percent` % of the requests in flight)."""

    def __init__(self, percent: float = 20.0, min_concurrent: int = 3):
        self.percent = percent
        self.min_concurrent = min_concurrent
        self.active = 0

    def acquire(self, in_flight: int) -> bool:
        """Take a retry from the budget (`in_flight`: the requests in flight, this one included); False: spent."""
        if self.active >= max(self.min_concurrent, in_flight * self.percent / 100):
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1
