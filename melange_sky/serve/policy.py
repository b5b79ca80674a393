"""Which replica serves a request: the routing policy, apart from the data path, so it is tested without a socket.

The size-aware policy does what the plan assumes:

1. **Bucket**: the request's input tokens (`tokens.Sizer`) and its `max_tokens` pick a bucket with the bucket rules
   of `core.buckets` (lengths past the edges go to the nearest bucket, as `workload` counts them). Without an output
   length the request is routed by its input *row*: each GPU type's share is the plan's shares in that row weighted
   by the histogram's output distribution for the row.
2. **GPU type**: smooth weighted round-robin over the bucket's shares (nginx's algorithm: every pick adds each
   type's weight to its running score, the highest score wins and pays back the total), so the realised split
   follows the plan request by request, even at low rates. Only types with a replica that can take a request take
   part; when the chosen type has none, its share goes to the others in proportion to theirs (a spill).
3. **Spill beyond the plan**: when no type with a share is available, types that can serve the bucket (tputs > 0)
   take it in proportion to their planned capacity for it. When none can, the request is refused with the reason.
4. **Replica**: the one of the type with the fewest requests in flight; ties broken at random.
5. **Panic**: replicas out of rotation take no part, but when fewer than half (`panic_percent`) of the replicas
   that can serve a lane are healthy, its ejected replicas count as available again (Envoy's panic threshold):
   ejections may be wrong, and the plan's shares piled onto the few left would overload them. Replicas that are
   *down* (their connection failed) never do.

Replica health is plain state on `Replica`, changed by `outliers.OutlierDetector`; the policy only reads it.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from melange_sky.core.buckets import Bucketer
from melange_sky.core.config import Bucket
from melange_sky.serve.routes import Routes
from melange_sky.serve.tokens import Kind, Sizer, output_tokens

#: Envoy's default panic threshold: below this share of healthy replicas, a lane stops trusting ejections.
DEFAULT_PANIC_PERCENT = 50.0

__all__ = ["Choice", "Lane", "NoReplica", "NoRoutesPolicy", "Policy", "Replica", "Rotation", "SizeAwarePolicy",
           "Target"]


@dataclass(eq=False)
class Replica:
    """A server behind the router and what the router knows of it right now (`outliers.OutlierDetector` changes
    its health; the policy only reads `ejected` and `down`)."""

    name: str
    gpu: str
    url: str
    in_flight: int = 0
    ejected: bool = False  # out of rotation (down, or an outlier) until a probe re-admits it
    down: bool = False  # out because its connection failed (a fact: even a panicking lane sends nothing there)
    failures: int = 0  # connection-level failures in a row (resets, timeouts, empty streams)
    strikes: int = 0  # 5xx answers in a row that another replica did not give to the same request
    backoff: int = 0  # ejections and failed probes in a row: each doubles the wait before the next probe
    ejections: int = 0  # ejections so far
    capped: int = 0  # ejections the cap on its GPU type prevented
    readmitted_at: float | None = None
    retry_at: float = 0.0  # while ejected: when to probe GET /health again (monotonic seconds)
    last_error: str | None = None
    served: int = 0  # requests sent to it

    @property
    def state(self) -> str:
        return "down" if self.down else "ejected" if self.ejected else "up"

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "gpu": self.gpu, "url": self.url, "state": self.state,
                "in_flight": self.in_flight, "served": self.served, "failures_in_a_row": self.failures,
                "5xx_in_a_row": self.strikes, "ejections": self.ejections, "ejections_capped": self.capped,
                "last_error": self.last_error,
                "next_probe_in_s": round(max(self.retry_at - now, 0.0), 3) if self.ejected else None}


@dataclass
class Rotation:
    """How many replicas are out of rotation now, shared by the outlier detector (which keeps it) and the policy
    (which looks at a lane's health only when it is not 0: the common case costs one attribute read)."""

    out: int = 0


@dataclass(eq=False)
class Lane:
    """Where the requests of one bucket (or, without an output length, one input row) may go, with the running
    scores of the weighted round-robin."""

    label: str  # "2:3", or "2:*" for an input row
    description: str
    plan: list[tuple[str, float]]  # (GPU type, plan share > 0)
    spill: list[tuple[str, float]]  # (GPU type, weight): types that can serve it but have no share
    unservable: tuple[str, ...]  # types whose tputs say they cannot serve it
    scores: dict[str, float] = field(default_factory=dict)
    spill_scores: dict[str, float] = field(default_factory=dict)
    members: list[Replica] = field(default_factory=list)  # the replicas of its plan and spill types

    def shares(self) -> dict[str, float]:
        total = sum(w for _, w in self.plan)
        return {g: w / total for g, w in self.plan} if total else {}


class Target(NamedTuple):
    """A request as the policy sees it: its lane and the sizes it was put there by. (A named tuple: made once per
    request, it costs a third of a frozen dataclass.)"""

    lane: Lane
    kind: Kind
    input_tokens: int
    raw_input: float  # the uncorrected estimate (what reported usage corrects)
    output_tokens: int | None
    stream: bool


class Choice(NamedTuple):
    replica: Replica
    spilled: bool  # a planned type of the lane was unavailable, or none was and a type without a share took it
    panic: bool = False  # too few of the lane's replicas were healthy: ejections were ignored


class NoReplica(Exception):
    """No replica can take the request; `reason` says why, for the 503."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Policy:
    """A routing policy: sizes a request (`target`) and picks its replica (`choose`), given the routes and the
    replicas (whose health it reads, never changes). The router holds one, rebuilt at each swap of the routes.

    `SizeAwarePolicy` routes requests (the plan's shares); `NoRoutesPolicy` stands in until a router has routes.
    A new policy is a subclass with these two methods, built where the router builds `SizeAwarePolicy`
    (`Router.swap`): there is no registry by name and no `--policy` flag while one policy routes."""

    def target(self, body: dict[str, Any], kind: Kind) -> Target:
        raise NotImplementedError

    def choose(self, target: Target, exclude: Sequence[Replica] = ()) -> Choice:
        raise NotImplementedError


class NoRoutesPolicy(Policy):
    """A router without routes yet (`serve --pushed` before the first `PUT /admin/routes`): every request is refused
    with `reason`."""

    def __init__(self, reason: str):
        self.why = reason
        self.lane = Lane("none", "no routes", [], [], ())

    def target(self, body: dict[str, Any], kind: Kind) -> Target:
        return Target(self.lane, kind, 0, 0.0, None, body.get("stream") is True)

    def choose(self, target: Target, exclude: Sequence[Replica] = ()) -> Choice:
        raise NoReplica(self.why)


class SizeAwarePolicy(Policy):
    """The plan's shares per bucket, by smooth weighted round-robin; spills; least-in-flight replica; and, when
    fewer than `panic_percent` % of the replicas that can serve a lane are healthy, ejections ignored for it.

    `rotation` is shared with the outlier detector (see `Rotation`); without one, the policy counts for itself."""

    def __init__(self, routes: Routes, replicas: Sequence[Replica], sizer: Sizer, rng: random.Random | None = None,
                 panic_percent: float = DEFAULT_PANIC_PERCENT, rotation: Rotation | None = None):
        self.routes = routes
        self.replicas = list(replicas)
        self.sizer = sizer
        self.rng = rng or random.Random()
        self.panic_percent = panic_percent
        self.rotation = rotation
        self.by_gpu: dict[str, list[Replica]] = {g.name: [] for g in routes.gpus}
        for replica in self.replicas:
            if replica.gpu in self.by_gpu:
                self.by_gpu[replica.gpu].append(replica)
        self.inputs = Bucketer(routes.input_edges)
        self.outputs = Bucketer(routes.output_edges)
        rows, cols = routes.shape
        self.lanes = {(i, j): self._bucket_lane((i, j)) for i in range(rows) for j in range(cols)}
        self.rows = {i: self._row_lane(i) for i in range(rows)}
        for lane in (*self.lanes.values(), *self.rows.values()):
            lane.members = [r for gpu, _ in lane.plan + lane.spill for r in self.by_gpu.get(gpu, ())]

    # -- lanes -------------------------------------------------------------------------------------------------------
    def _capacity(self, gpu_name: str, bucket: Bucket) -> float:
        gpu = self.routes.gpu(gpu_name)
        if gpu is None or gpu.tputs is None:
            return 0.0
        return max(gpu.planned, 1) * gpu.tputs[bucket[0]][bucket[1]]

    def _bucket_lane(self, bucket: Bucket) -> Lane:
        shares = self.routes.shares.get(bucket, {})
        plan = [(g.name, shares[g.name]) for g in self.routes.gpus if shares.get(g.name, 0) > 0]
        spill = [(g.name, self._capacity(g.name, bucket)) for g in self.routes.gpus
                 if g.name not in shares and self._capacity(g.name, bucket) > 0]
        unservable = tuple(g.name for g in self.routes.gpus if g.tputs is not None and not g.serves(bucket))
        return Lane(f"{bucket[0]}:{bucket[1]}", self.routes.bucket_name(bucket), plan, spill, unservable)

    def _row_lane(self, row: int) -> Lane:
        cols = self.routes.shape[1]
        weights = list(self.routes.distribution[row])
        if sum(weights) <= 0:
            weights = [1.0] * cols
        planned: dict[str, float] = {}
        covered = sum(w for j, w in enumerate(weights) if self.routes.shares.get((row, j)))
        for j, w in enumerate(weights):
            for name, share in self.routes.shares.get((row, j), {}).items():
                planned[name] = planned.get(name, 0.0) + w * share / covered
        plan = [(g.name, planned[g.name]) for g in self.routes.gpus if planned.get(g.name, 0) > 0]
        spill = []
        for gpu in self.routes.gpus:
            weight = sum(w * self._capacity(gpu.name, (row, j)) for j, w in enumerate(weights))
            if gpu.name not in planned and weight > 0:
                spill.append((gpu.name, weight))
        unservable = tuple(g.name for g in self.routes.gpus
                           if g.tputs is not None and not any(g.serves((row, j)) for j in range(cols)))
        edges = self.routes.input_edges
        return Lane(f"{row}:*", f"input {edges[row]}-{edges[row + 1]} tokens, no max_tokens", plan, spill,
                    unservable)

    # -- choosing ----------------------------------------------------------------------------------------------------
    def target(self, body: dict[str, Any], kind: Kind) -> Target:
        tokens, raw = self.sizer.prompt_tokens(body, kind)
        return self.sized(tokens, output_tokens(body), kind, raw, body.get("stream") is True)

    def sized(self, tokens: int, out: int | None, kind: Kind = Kind.COMPLETIONS, raw: float | None = None,
              stream: bool = True) -> Target:
        """The target of a request whose sizes are known (what `target` does after sizing a body; the simulator
        routes its requests through here, with no body to read)."""
        row = self.inputs.index(tokens)
        lane = self.rows[row] if out is None else self.lanes[(row, self.outputs.index(out))]
        return Target(lane, kind, tokens, float(tokens) if raw is None else raw, out, stream)

    def choose(self, target: Target, exclude: Sequence[Replica] = ()) -> Choice:
        lane = target.lane
        panic = (self.rotation is None or self.rotation.out > 0) and self.panicking(lane)
        gpu, skipped = self._round_robin(lane.plan, lane.scores, exclude, panic)
        if gpu is None:
            gpu, _ = self._round_robin(lane.spill, lane.spill_scores, exclude, panic)
            if gpu is None:
                raise NoReplica(self.reason(lane, exclude))
            skipped = True
        return Choice(self._least_loaded(gpu, exclude, panic), skipped, panic)

    def panicking(self, lane: Lane) -> bool:
        """Envoy's panic threshold over the replicas that can serve the lane (down ones aside: they cannot take a
        request either way): when fewer than `panic_percent` % of them are healthy, ejections are not trusted, and
        the plan's shares go to every replica that is not down, rather than piling onto the few left."""
        reachable = healthy = 0
        for replica in lane.members:
            if not replica.down:
                reachable += 1
                if not replica.ejected:
                    healthy += 1
        return healthy < reachable and healthy * 100 < self.panic_percent * reachable

    def available(self, gpu: str, exclude: Sequence[Replica] = (), panic: bool = False) -> bool:
        for replica in self.by_gpu.get(gpu, ()):  # a plain loop: this runs for every type of a lane, per request
            if not (replica.down if panic else replica.ejected) and replica not in exclude:
                return True
        return False

    def _round_robin(self, weights: list[tuple[str, float]], scores: dict[str, float],
                     exclude: Sequence[Replica], panic: bool) -> tuple[str | None, bool]:
        """Smooth weighted round-robin among the available types: (the pick, whether a type was unavailable)."""
        best: str | None = None
        best_score = 0.0
        total = 0.0
        skipped = False
        for gpu, weight in weights:
            if not self.available(gpu, exclude, panic):
                skipped = True
                continue
            score = scores.get(gpu, 0.0) + weight
            scores[gpu] = score
            total += weight
            if best is None or score > best_score:
                best, best_score = gpu, score
        if best is not None:
            scores[best] = best_score - total
        return best, skipped

    def _least_loaded(self, gpu: str, exclude: Sequence[Replica], panic: bool) -> Replica:
        least: list[Replica] = []
        low = 0
        for replica in self.by_gpu[gpu]:
            if (replica.down if panic else replica.ejected) or replica in exclude:
                continue
            if not least or replica.in_flight < low:
                least, low = [replica], replica.in_flight
            elif replica.in_flight == low:
                least.append(replica)
        return least[0] if len(least) == 1 else self.rng.choice(least)

    def reason(self, lane: Lane, exclude: Sequence[Replica] = ()) -> str:
        """Why no replica can take a request of this lane: per GPU type, its replicas and their state."""
        parts = []
        for gpu, _ in lane.plan + lane.spill:
            replicas = self.by_gpu.get(gpu, [])
            if not replicas:
                parts.append(f"{gpu} has no replica")
                continue
            ejected = [r for r in replicas if r.ejected and not r.down]
            down = [r for r in replicas if r.down]
            tried = [r for r in replicas if r in exclude and not r.ejected]
            counts = [f"{len(down)} down"] * bool(down) + [f"{len(ejected)} ejected"] * bool(ejected)
            state = f"{gpu}: {len(replicas)} replica(s), " + (", ".join(counts) or "none out of rotation")
            if tried:
                state += f", {len(tried)} already tried for this request"
            errors = sorted({r.last_error for r in replicas if r.last_error})
            if errors:
                state += f" (last error: {errors[-1]})"
            parts.append(state)
        parts.extend(f"{gpu} cannot serve it (tputs 0)" for gpu in lane.unservable)
        if not lane.plan and not lane.spill and not lane.unservable:
            parts.append("no GPU type of the plan has throughput figures for it")
        return f"no replica can take this request (bucket {lane.label}: {lane.description}): " + "; ".join(parts)
