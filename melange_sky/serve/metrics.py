"""The router's Prometheus metrics (`GET /metrics`), all named `melange_*`, in a registry of its own per router.

Counted on the data path: requests by bucket, GPU type and status; upstream errors by replica and kind; retries,
retries the budget refused, requests that failed on two replicas; ejections by GPU type and reason; requests routed
in panic; spills; the router's added latency; estimated and reported prompt tokens. Read at scrape time from the
router's state (so nothing is updated per request): requests in flight per replica, whether each replica takes
traffic, the replicas out of rotation per GPU type, the prompt-token correction factor per endpoint, the routes'
generation and the requests still draining on replicas the routes no longer have.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Added latency is the router's own time: microseconds to a few milliseconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class _Live(Collector):
    """Gauges read from the router when scraped."""

    def __init__(self, state: Callable[[], dict[str, Any]]):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        in_flight = GaugeMetricFamily("melange_in_flight", "Requests in flight per replica", labels=["replica", "gpu"])
        up = GaugeMetricFamily("melange_replica_up", "1 if the replica takes traffic, 0 while ejected",
                               labels=["replica", "gpu"])
        ejected = GaugeMetricFamily("melange_ejected_replicas", "Replicas out of rotation now, by GPU type and reason "
                                    "(unreachable: the connection failed; outlier: failures in a row)",
                                    labels=["gpu", "reason"])
        out: dict[tuple[str, str], int] = {}
        for replica in state["replicas"]:
            in_flight.add_metric([replica.name, replica.gpu], replica.in_flight)
            up.add_metric([replica.name, replica.gpu], 0 if replica.ejected else 1)
            for reason in ("unreachable", "outlier"):
                out.setdefault((replica.gpu, reason), 0)
            if replica.ejected:
                out[(replica.gpu, "unreachable" if replica.down else "outlier")] += 1
        for (gpu, reason), count in sorted(out.items()):
            ejected.add_metric([gpu, reason], count)
        correction = GaugeMetricFamily("melange_prompt_token_correction", "Factor applied to chars/4 (or the "
                                       "tokenizer's count) to estimate prompt tokens, learnt from reported usage",
                                       labels=["endpoint"])
        for kind, value in state["corrections"].items():
            correction.add_metric([str(kind)], value)
        draining = GaugeMetricFamily("melange_draining", "1 while the router drains before exiting")
        draining.add_metric([], 1 if state["draining"] else 0)
        generation = GaugeMetricFamily("melange_routes_generation", "Routes swapped in so far (each push to PUT "
                                       "/admin/routes, each fleet refresh that changed them)")
        generation.add_metric([], state["generation"])
        retired = GaugeMetricFamily("melange_retired_in_flight", "Requests in flight on replicas the routes no "
                                    "longer have (they finish; nothing new goes there)")
        retired.add_metric([], state["retired_in_flight"])
        budget = GaugeMetricFamily("melange_retries_in_flight", "Retries in flight now (what the retry budget bounds)")
        budget.add_metric([], state["retries_in_flight"])
        yield from (in_flight, up, ejected, budget, correction, draining, generation, retired)


class Metrics:
    """One router's metrics. Label children are cached: `.labels()` is the slow part of a counter."""

    def __init__(self, state: Callable[[], dict[str, Any]]):
        disable_created_metrics()  # no `*_created` series: half the text, and nothing a dashboard of this uses
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self._requests = Counter("melange_requests", "Requests answered, by bucket (I:J, or I:* without max_tokens),"
                                 " GPU type that served it and status (HTTP code; stream_error: a stream cut after it "
                                 "began; 499: the client went away)", ["bucket", "gpu", "status"], registry=r)
        self._errors = Counter("melange_upstream_errors", "Failed upstream attempts by replica and kind (connect, "
                               "disconnect, timeout, status_5xx, stream_cut, empty)", ["replica", "gpu", "kind"],
                               registry=r)
        self._retries = Counter("melange_retries", "Requests sent again to another replica after a failure before "
                                "any byte reached the client, by the GPU type that failed", ["gpu"], registry=r)
        self._budget = Counter("melange_retry_budget_exhausted", "Retries not made because the retry budget was spent "
                               "(retries in flight at their limit)", registry=r)
        self._poison = Counter("melange_poison_requests", "Requests answered 5xx by two replicas: not retried "
                               "further, and charged to no replica", ["bucket"], registry=r)
        self._ejections = Counter("melange_ejections", "Replicas taken out of rotation, by GPU type and reason "
                                  "(unreachable, consecutive_gateway_failure, consecutive_5xx)", ["gpu", "reason"],
                                  registry=r)
        self._capped = Counter("melange_ejections_capped", "Ejections not made because the GPU type already had its "
                               "share of replicas ejected (--max-ejection-percent); the replica kept serving",
                               ["gpu", "reason"], registry=r)
        self._panics = Counter("melange_panic_routed", "Requests routed while too few of their bucket's replicas were "
                               "healthy (ejections ignored: the panic threshold)", ["bucket"], registry=r)
        self._spills = Counter("melange_spills", "Requests served by another GPU type than the plan's round-robin "
                               "would pick, because a planned type had no available replica", ["bucket", "gpu"],
                               registry=r)
        self.added_latency = Histogram("melange_added_latency_seconds", "The router's own time per request "
                                       "(parse, route, relay), upstream time excluded", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self._estimated = Counter("melange_prompt_tokens_estimated", "Prompt tokens as estimated for routing, over "
                                  "requests whose answer reported usage", ["endpoint"], registry=r)
        self._reported = Counter("melange_prompt_tokens_reported", "Prompt tokens the replicas reported "
                                 "(usage.prompt_tokens)", ["endpoint"], registry=r)
        r.register(_Live(state))
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, bucket: str, gpu: str, status: int | str) -> None:
        self._child(self._requests, bucket, gpu, str(status)).inc()

    def upstream_error(self, replica: str, gpu: str, kind: str) -> None:
        self._child(self._errors, replica, gpu, kind).inc()

    def retry(self, gpu: str) -> None:
        self._child(self._retries, gpu).inc()

    def budget_exhausted(self) -> None:
        self._budget.inc()

    def poison(self, bucket: str) -> None:
        self._child(self._poison, bucket).inc()

    def ejection(self, gpu: str, reason: str) -> None:
        self._child(self._ejections, gpu, reason).inc()

    def ejection_capped(self, gpu: str, reason: str) -> None:
        self._child(self._capped, gpu, reason).inc()

    def panic(self, bucket: str) -> None:
        self._child(self._panics, bucket).inc()

    def spill(self, bucket: str, gpu: str) -> None:
        self._child(self._spills, bucket, gpu).inc()

    def prompt_tokens(self, endpoint: str, estimated: float, reported: int) -> None:
        self._child(self._estimated, endpoint).inc(estimated)
        self._child(self._reported, endpoint).inc(reported)

    def render(self) -> bytes:
        return generate_latest(self.registry)
