"""The Grafana dashboard (docs/grafana/melange-sky-router.json) shows what the router exports: every metric a panel's
PromQL names is one the router's registry has, read from `melange_sky.serve.metrics.Metrics` itself, so a renamed or
removed metric fails here instead of leaving an empty panel."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from melange_sky.serve.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "melange-sky-router.json"
METRIC_NAME = re.compile(r"\bmelange_[a-zA-Z0-9_]+")
# What issue 21 asks the dashboard to show, as the series it must read.
REQUIRED = {
    "requests": {"melange_requests_total"},
    "latency added": {"melange_added_latency_seconds_bucket"},
    "shares per GPU type": {"melange_requests_total"},
    "spills": {"melange_spills_total"},
    "ejections": {"melange_ejections_total", "melange_ejected_replicas"},
    "in flight": {"melange_in_flight"},
}


class _Empty:
    """Any piece of the router's live state, empty: no replicas, no corrections, zeros and False."""

    def __iter__(self):
        return iter(())

    def items(self):
        return ()

    def __float__(self) -> float:
        return 0.0

    def __bool__(self) -> bool:
        return False


class _EmptyState(dict):
    def __missing__(self, key):
        return _Empty()


def exported_series() -> set[str]:
    """Every series name the router's /metrics can carry: counters as NAME_total, histograms as their three series."""
    metrics = Metrics(lambda: _EmptyState())
    names: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
    return names


def panels() -> list[dict]:
    found: list[dict] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        found += [panel, *panel.get("panels", [])]
    return [panel for panel in found if panel.get("type") != "row"]


def expressions() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in panels() for target in panel["targets"]]


def test_the_router_exports_the_series_a_dashboard_needs() -> None:
    """Guards the reading of the registry below: it finds counters, the histogram and the live gauges."""
    names = exported_series()
    assert {"melange_requests_total", "melange_added_latency_seconds_bucket", "melange_in_flight"} <= names


@pytest.mark.parametrize(("title", "expr"), expressions(), ids=[f"{t}: {e[:40]}" for t, e in expressions()])
def test_every_panel_expression_names_only_metrics_the_router_exports(title: str, expr: str) -> None:
    names = set(METRIC_NAME.findall(expr))
    assert names, f"{title}: the expression names no melange_* metric"
    assert names <= exported_series(), f"{title}: not exported by the router: {sorted(names - exported_series())}"
    for open_, close in ("()", "{}", "[]"):
        assert expr.count(open_) == expr.count(close), f"{title}: unbalanced {open_}{close}"


def test_the_dashboard_shows_what_issue_21_asks_for() -> None:
    used = {name for _, expr in expressions() for name in METRIC_NAME.findall(expr)}
    missing = {what: sorted(series) for what, series in REQUIRED.items() if not series & used}
    assert missing == {}


def test_every_panel_reads_the_chosen_data_source_and_has_a_place_and_an_id() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]][:1] == ["datasource"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_every_metric_the_router_exports_is_described_on_the_serving_page() -> None:
    """The Metrics section names them without the `melange_` prefix (`requests_total{bucket, gpu, status}`)."""
    page = (DASHBOARD.parent.parent / "serving.md").read_text()
    undocumented = []
    for family in Metrics(lambda: _EmptyState()).registry.collect():
        short = family.name.removeprefix("melange_")
        if not re.search(rf"`(melange_)?{re.escape(short)}(_total|_seconds)?[`{{ ]", page):
            undocumented.append(family.name)
    assert undocumented == []
