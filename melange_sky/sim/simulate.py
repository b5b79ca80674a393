"""The discrete-event simulation: arrivals, serve's routing policy and one engine model per replica on one event
queue.

One clock, two kinds of event, taken in time order:
  * an **arrival** (from the sorted arrival lists, never on the heap): the router's policy object — the
    `SizeAwarePolicy` `serve` runs, built from the same routes — picks a GPU type (smooth weighted round-robin over
    the plan's shares, spills) and the replica with the fewest requests in flight; the request enters that engine
    (its API server, then its waiting queue) at its arrival time. An idle engine's clock first catches up with the
    time it sat idle and starts a step at once; a busy one takes the request at its next step boundary (vLLM's
    engine loop does the same).
  * a **step end** (on a heap of (time, replica)): the step's emitters get their token at its end; a request's first
    token is its TTFT, its last its latency; finished requests leave the replica's in-flight count (what the policy
    reads). The next step starts at once if the engine has work.

A replica's runs of pure-decode steps (no arrival, first token or finish among them) are one event, not one per step:
`Engine.skip_decodes` on a copy says where the run ends, and an arrival in the middle of a run applies it up to the
arrival. Otherwise the engine is called once per step (`Engine.step()`, whose cost does not grow with the batch); the
simulator adds a heap push and pop per event and a few additions for the replica's statistics (busy share, mean
batch, KV cache use, queue), weighted by step time. bench/sim_speed.py: an hour of 50 req/s on 21 replicas in ~10 s.
"""
from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from melange_sky.core.attainment import DEFAULT_TARGET, AttainmentReport, RequestRecord, summarise
from melange_sky.core.buckets import Bucketer
from melange_sky.core.slo import Slos
from melange_sky.engine import CLIENT_ENDPOINT, Engine
from melange_sky.engine.errors import EngineError
from melange_sky.inputs.arrivals import Arrivals
from melange_sky.serve.policy import NoReplica, Replica, Rotation, SizeAwarePolicy
from melange_sky.serve.tokens import Sizer
from melange_sky.sim.errors import SimulationError
from melange_sky.sim.plan import SimPlan

__all__ = ["ReplicaStats", "SimResult", "build_policy", "simulate"]

#: Progress is reported every this many arrivals.
_PROGRESS_EVERY = 5000

Progress = Callable[[int, int, float], None]  # (arrivals routed, arrivals in all, simulated seconds)


@dataclass(frozen=True)
class ReplicaStats:
    """One replica over the run: requests served, busy share (of the run's span), and step-time-weighted means of
    its batch (requests running), KV cache use and waiting queue."""

    name: str
    gpu: str
    requests: int
    busy_share: float
    mean_batch: float
    kv_cache_mean: float
    kv_cache_peak: float
    mean_queue: float
    max_queue: int
    preemptions: int
    steps: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "gpu": self.gpu, "requests": self.requests,
                "busy_share": round(self.busy_share, 4), "mean_batch": round(self.mean_batch, 3),
                "kv_cache_mean": round(self.kv_cache_mean, 4), "kv_cache_peak": round(self.kv_cache_peak, 4),
                "mean_queue": round(self.mean_queue, 3), "max_queue": self.max_queue,
                "preemptions": self.preemptions, "steps": self.steps}


@dataclass(frozen=True)
class SimResult:
    """A simulation's report (the shared attainment report), its replicas, and what was simulated."""

    report: AttainmentReport
    replicas: list[ReplicaStats]
    plan: SimPlan
    arrivals: Arrivals
    end_s: float  # simulated time when the last request finished
    wall_s: float  # how long the simulation took
    steps: int  # engine steps run, all replicas
    notes: tuple[str, ...] = field(default=())
    records: list[RequestRecord] = field(default_factory=list, repr=False)  # every request, in arrival order

    @property
    def share_per_gpu(self) -> dict[str, float]:
        """The share of routed requests each GPU type served."""
        total = sum(r.requests for r in self.replicas) or 1
        shares: dict[str, float] = {}
        for r in self.replicas:
            shares[r.gpu] = shares.get(r.gpu, 0.0) + r.requests / total
        return shares

    @property
    def planned_share_per_gpu(self) -> dict[str, float]:
        """The share of these requests the routing table gives each GPU type (bucket by bucket, the plan's shares
        weighted by the requests in the bucket): what the realised split should follow."""
        counts: dict[tuple[int, int], int] = {}
        for record in self.records:
            counts[record.bucket] = counts.get(record.bucket, 0) + 1
        total = sum(counts.values()) or 1
        planned: dict[str, float] = {}
        for bucket, n in counts.items():
            for gpu, share in self.plan.routes.shares.get(bucket, {}).items():
                planned[gpu] = planned.get(gpu, 0.0) + n * share / total
        return planned

    def to_json(self) -> dict[str, Any]:
        return {**self.report.to_json(), "verdict": self.report.verdict,
                "planned_share_per_gpu": {g: round(v, 6) for g, v in self.planned_share_per_gpu.items()},
                "per_replica": [r.to_json() for r in self.replicas], "plan": self.plan.to_json(),
                "arrivals": {"description": self.arrivals.description, "requests": len(self.arrivals),
                             "duration_s": round(self.arrivals.duration_s, 3),
                             "mean_rate": round(self.arrivals.mean_rate, 4)},
                "simulated_s": round(self.end_s, 3), "wall_s": round(self.wall_s, 3), "steps": self.steps,
                "notes": list(self.notes)}


class _Server:
    """One replica in the simulation: its engine, the policy's `Replica` (whose in-flight count the policy reads),
    what it is doing (idle, a step in flight, or a run of pure-decode steps not yet applied), and step-weighted sums
    for its statistics."""

    __slots__ = ("ahead", "batch_s", "busy", "busy_s", "engine", "gpu", "idle_since", "kv_s", "max_queue", "name",
                 "queue_s", "replica", "run", "run_from", "served", "step", "steps", "version")

    def __init__(self, engine: Engine, replica: Replica):
        self.engine = engine
        self.replica = replica
        self.name = replica.name
        self.gpu = replica.gpu
        self.step: Any = None  # the step in flight, or None during a run of pure-decode steps
        self.run_from = 0.0  # when that run started ...
        self.ahead: Engine | None = None  # ... the engine as it will be at its end
        self.run = (0, 0.0)  # ... and its steps and seconds
        self.busy = False
        self.idle_since = 0.0  # when it last ran out of work: its engine's clock stands there until told
        self.version = 0  # bumped when a scheduled run end is cut short by an arrival (its heap entry is stale)
        self.busy_s = self.batch_s = self.kv_s = self.queue_s = 0.0
        self.max_queue = self.steps = self.served = 0

    def account(self, seconds: float, steps: int, batch: int) -> None:
        """Add `seconds` of work (`steps` steps, `batch` requests running) to the replica's statistics."""
        engine = self.engine
        self.busy_s += seconds
        self.batch_s += batch * seconds
        self.kv_s += engine.kv_cache_usage * seconds
        waiting = engine.waiting
        if waiting:
            self.queue_s += waiting * seconds
            if waiting > self.max_queue:
                self.max_queue = waiting
        self.steps += steps


def build_policy(plan: SimPlan, seed: int = 0) -> tuple[SizeAwarePolicy, list[Replica]]:
    """The router's policy over the plan's replicas, as `serve` builds it (its tie-breaks seeded). Its `Rotation`
    is the one an outlier detector would keep, and no replica leaves it here: simulated replicas do not fail."""
    replicas = [Replica(r.name, r.gpu, r.url) for r in plan.routes.replicas]
    policy = SizeAwarePolicy(plan.routes, replicas, Sizer(), rng=random.Random(seed), rotation=Rotation())
    return policy, replicas


def _run_ahead(engine: Engine) -> tuple[Engine, int, float]:
    """The engine as it will be after its coming run of pure-decode steps, how many steps and how long, without
    touching `engine`: `Engine.skip_decodes` on a shallow copy (the run changes only the copy's counters, and drops
    stale entries of a heap both share, which changes nothing for either). If no arrival cuts the run short, the
    copy *is* the engine at the run's end and replaces it; if one does, `engine` applies the run up to the arrival.
    tests/test_sim.py pins that a simulation with runs equals one stepped one step at a time."""
    ahead = Engine.__new__(Engine)
    ahead.__dict__.update(engine.__dict__)
    count, seconds = ahead.skip_decodes(math.inf)
    return ahead, count, seconds


def simulate(plan: SimPlan, arrivals: Arrivals, slos: Slos, *, target: float = DEFAULT_TARGET, seed: int = 0,
             progress: Progress | None = None, policy: SizeAwarePolicy | None = None,
             skip: bool = True) -> SimResult:
    """Run `arrivals` through the plan: the policy routes each request, each replica's engine model serves it; the
    report of every request against `slos`, each replica's statistics. Runs until every request has finished.

    `skip`: a replica's runs of pure-decode steps (no arrival, first token or finish among them) are one event, not
    one per step (`Engine.skip_decodes`); an arrival in the middle of a run applies the run up to it. The same
    answer as stepping one step at a time, several times faster."""
    if not len(arrivals):
        raise SimulationError("no requests to simulate")
    started = time.perf_counter()
    if policy is None:
        policy, replicas = build_policy(plan, seed)
    else:
        replicas = policy.replicas
    servers = [_Server(plan.engines[r.gpu].make(), r) for r in replicas]
    by_name = {s.name: k for k, s in enumerate(servers)}
    routes = plan.routes
    in_b, out_b = Bucketer(routes.input_edges), Bucketer(routes.output_edges)
    bucket_names = {(i, j): routes.bucket_name((i, j)) for i in range(routes.shape[0]) for j in range(routes.shape[1])}

    times, prompts, outputs = arrivals.times, arrivals.prompts, arrivals.outputs
    n = len(times)
    first = [math.nan] * n
    where = [-1] * n
    records: list[RequestRecord | None] = [None] * n
    in_index, out_index = in_b.index, out_b.index
    buckets = [(in_index(p), out_index(o)) for p, o in zip(prompts, outputs)]
    heap: list[tuple[float, int, int]] = []  # (time, replica, its version): a step's end, or a run's
    heappush, heappop = heapq.heappush, heapq.heappop
    sized, choose = policy.sized, policy.choose
    answered = RequestRecord.answered
    inf = math.inf
    too_long = 0

    def step_at(server: _Server, k: int, now: float, peek: bool = skip) -> None:
        """Start the replica's next step at `now` (or, with `peek`, a run of pure-decode steps when one comes
        next); idle without work."""
        engine = server.engine
        if peek and engine.has_work:
            ahead, count, seconds = _run_ahead(engine)
            if count:
                server.step = None
                server.run_from = now
                server.ahead = ahead
                server.run = (count, seconds)
                server.busy = True
                heappush(heap, (now + seconds, k, server.version))
                return
        step = engine.step()
        if step is None:
            server.busy = False
            server.idle_since = now
            return
        server.step = step
        server.busy = True
        d = step.duration_s
        server.account(d, 1, engine.running + len(step.finished))
        heappush(heap, (now + d, k, server.version))

    def apply_run(server: _Server, limit: float) -> float:
        """Apply the pure-decode steps of the replica's run that end within `limit` s of its start; their time."""
        engine = server.engine
        count, seconds = engine.skip_decodes(limit)
        if count:
            server.account(seconds, count, engine.running)
        return seconds

    a = 0
    next_arrival = times[0]
    now = 0.0
    while True:
        if a < n and (not heap or next_arrival <= heap[0][0]):
            now = next_arrival
            rid = a
            a += 1
            next_arrival = times[a] if a < n else inf
            prompt, output = prompts[rid], outputs[rid]
            try:
                choice = choose(sized(prompt, output))
            except NoReplica:
                records[rid] = RequestRecord.failed(now, None, None, buckets[rid], prompt, output)
                continue
            k = by_name[choice.replica.name]
            server = servers[k]
            where[rid] = k
            if server.busy and server.step is None:  # in a run: apply it up to now, start the step in flight now
                server.version += 1
                server.ahead = None
                step_at(server, k, server.run_from + apply_run(server, now - server.run_from), peek=False)
            try:
                # charged as the completions `replay` sends (CLIENT_ENDPOINT) cost vLLM's API server
                if server.busy:  # it joins at the next step boundary; the API server takes it from now
                    server.engine.add(rid, prompt, output, at=now, endpoint=CLIENT_ENDPOINT)
                else:  # the engine's clock catches up with the time it sat idle
                    server.engine.idle(now - server.idle_since)
                    server.idle_since = now
                    server.engine.add(rid, prompt, output, endpoint=CLIENT_ENDPOINT)
            except EngineError:  # longer than the model's context: vLLM answers 400
                records[rid] = RequestRecord.failed(now, server.gpu, server.name, buckets[rid], prompt, output)
                too_long += 1
                continue
            server.replica.in_flight += 1
            server.replica.served += 1
            server.served += 1
            if not server.busy:
                step_at(server, k, now)
            if progress is not None and a % _PROGRESS_EVERY == 0:
                progress(a, n, now)
        elif heap:
            now, k, version = heappop(heap)
            server = servers[k]
            if version != server.version:
                continue  # a run cut short by an arrival
            step = server.step
            if step is None:  # a run's natural end: the engine ahead is the engine now; the next step is eventful
                assert server.ahead is not None
                server.engine = server.ahead
                server.ahead = None
                server.account(server.run[1], server.run[0], server.engine.running)
                step_at(server, k, now, peek=False)
                continue
            for rid in step.first_token:
                first[rid] = now
            if step.finished:
                for rid in step.finished:
                    f = first[rid]
                    arrival = times[rid]
                    records[rid] = answered(arrival, server.gpu, server.name, buckets[rid], prompts[rid],
                                            outputs[rid], f - arrival, now - arrival)
                server.replica.in_flight -= len(step.finished)
            step_at(server, k, now)
        else:
            break
    unfinished = [rid for rid, r in enumerate(records) if r is None]
    for rid in unfinished:  # never happens unless the engine stalls: counted as unanswered rather than lost
        k = where[rid]
        records[rid] = RequestRecord.failed(times[rid], servers[k].gpu if k >= 0 else None,
                                            servers[k].name if k >= 0 else None, buckets[rid], prompts[rid],
                                            outputs[rid])
    if progress is not None:
        progress(n, n, now)
    done: list[RequestRecord] = records  # type: ignore[assignment]  # every slot is filled by now
    report = summarise(done, slos, target, bucket_names, duration_s=arrivals.duration_s)
    span = max(now, arrivals.duration_s, 1e-9)
    stats = []
    for s in servers:
        busy = s.busy_s or 1e-12
        stats.append(ReplicaStats(
            name=s.name, gpu=s.gpu, requests=s.served, busy_share=s.busy_s / span, mean_batch=s.batch_s / busy,
            kv_cache_mean=s.kv_s / busy, kv_cache_peak=s.engine.peak_blocks_used / s.engine.kv_blocks,
            mean_queue=s.queue_s / busy, max_queue=s.max_queue, preemptions=s.engine.preemptions, steps=s.steps))
    notes = list(arrivals.warnings) + list(plan.notes)
    if too_long:
        limits = sorted({s.engine.max_model_len for s in servers})
        notes.append(f"{too_long:,} request(s) were longer (prompt + output) than the model's context "
                     f"({' or '.join(map(str, limits))} tokens) and were refused, as vLLM answers 400: they count as "
                     f"missing every SLO")
    if unfinished:
        notes.append(f"{len(unfinished)} request(s) never finished (an engine stopped with work left): counted as "
                     f"missing every SLO")
    return SimResult(report, stats, plan, arrivals, now, time.perf_counter() - started, sum(s.steps for s in stats),
                     tuple(notes), done)
