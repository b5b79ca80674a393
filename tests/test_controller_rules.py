"""The controller's pure rules (melange_sky/controller/rules.py) with injected times and documents: which rate a
router's /workload asks for, when to scale up or down, the budget, which failed probes replace a replica."""
from __future__ import annotations

import pytest

from melange_sky.controller.rules import (Need, Scale, distribution_from, need_from_workload, need_data,
                                          need_message, needs_from_events, over_budget, scale_decision, to_replace)

HOLD = 600.0  # 10 minutes
NOW = 100_000.0


def test_need_is_the_chosen_percentile_of_the_per_minute_rates_not_their_mean():
    # 18 quiet minutes at 5 req/s, 2 bursts at 50 req/s: mean 9.5, p50 5, p95 50.
    doc = {"minute_arrivals": [300] * 18 + [3000] * 2, "total_request_rate": 9.5}
    assert need_from_workload(doc, 95) == Need(50.0, "p95 of 20 complete minute(s)")
    assert need_from_workload(doc, 50).rate == 5.0
    assert need_from_workload(doc, 100).rate == 50.0


def test_need_falls_back_to_rate_percentiles_then_to_the_mean_without_a_complete_minute():
    shown = {"p50": 2.0, "p95": 7.5, "p99": 9.0, "max": 12.0}
    assert need_from_workload({"rate_percentiles": shown, "total_request_rate": 3.0}, 95).rate == 7.5
    fresh = need_from_workload({"minute_arrivals": [], "total_request_rate": 4.25, "span_s": 40}, 95)
    assert fresh == Need(4.25, "mean over 40 s (no complete minute yet)")


def test_no_arrivals_is_no_need_rather_than_a_scale_to_zero():
    assert need_from_workload({"minute_arrivals": [0, 0, 0], "total_request_rate": 0.0}, 95) is None
    assert need_from_workload({"counts": [[0]]}, 95) is None


def test_higher_need_scales_up_at_once_whatever_the_history():
    history = [(NOW - 60, 2.0), (NOW - 30, 2.0)]
    decision = scale_decision(10.0, 12.0, history, NOW, HOLD)
    assert decision.scale is Scale.UP and decision.rate == 12.0


def test_lower_need_waits_for_the_hold_then_scales_down_to_the_windows_highest_need():
    current = 30.0
    history = [(NOW - 700, 40.0), (NOW - 599, 12.0), (NOW - 300, 18.0), (NOW - 60, 9.0)]
    held = scale_decision(current, 8.0, history, NOW, HOLD)  # low since NOW - 599: 9 min 59 s
    assert held.scale is Scale.HOLD and held.rate == current
    assert "for 9 min 59 s of 10 min before scaling down" in held.reason
    later = scale_decision(current, 8.0, history, NOW + 1, HOLD)  # 10 min exactly
    assert later.scale is Scale.DOWN and later.rate == 18.0  # the highest need in the last 10 minutes
    assert later.reason == "need below plan 30 req/s for 10 min (hold 10 min); highest need in that window 18 req/s"


def test_a_need_at_or_above_the_plan_restarts_the_hold():
    history = [(NOW - 900, 5.0), (NOW - 120, 30.0), (NOW - 60, 5.0)]
    assert scale_decision(30.0, 5.0, history, NOW, HOLD).scale is Scale.HOLD
    assert scale_decision(30.0, 30.0, history, NOW, HOLD).scale is Scale.NONE


def test_scale_down_window_ignores_needs_older_than_the_hold_and_future_ones():
    history = [(NOW - 3600, 29.0), (NOW - 10, 4.0), (NOW + 50, 29.5)]
    decision = scale_decision(30.0, 6.0, history, NOW, HOLD)
    assert decision.scale is Scale.DOWN and decision.rate == 6.0


def test_zero_hold_scales_down_on_the_first_lower_need():
    assert scale_decision(30.0, 6.0, [], NOW, 0.0).scale is Scale.DOWN


def test_need_events_round_trip_through_their_data_at_full_precision():
    need = Need(12.345678901, "p95 of 12 complete minute(s)")
    assert need_message(need) == "12.3457 req/s (p95 of 12 complete minute(s))"  # for people, rounded
    events = [(NOW, need_data(need)), (NOW + 1, None), (NOW + 2, {"rate": "12"}), (NOW + 3, {"rate": float("nan")}),
              (NOW + 4, {"rate": True}), (NOW + 5, {"rate": 0.001})]
    assert needs_from_events(events) == [(NOW, 12.345678901), (NOW + 5, 0.001)]


def test_max_cost_refuses_only_what_exceeds_it():
    assert not over_budget(6.70, None)
    assert not over_budget(6.70, 6.70)
    assert over_budget(6.71, 6.70)


@pytest.mark.parametrize(("probes", "replaced", "noted"), [
    ({"a": True, "b": False, "c": True}, ["b"], False),
    ({"a": False}, ["a"], False),  # a fleet of one: replaced
    ({"a": False, "b": False}, [], True),  # every one fails: more likely this machine cannot reach them
    ({"a": True, "b": True}, [], False),
])
def test_failed_probes_replace_replicas_unless_all_of_several_failed(probes, replaced, noted):
    replace, note = to_replace(probes)
    assert replace == replaced and (note is not None) == noted


def test_observed_distribution_is_used_only_with_enough_requests_in_the_configs_buckets():
    doc = {"input_buckets": [1, 100, 1000], "output_buckets": [1, 50, 500], "counts": [[30, 10], [40, 20]]}
    shares, _ = distribution_from(doc, (2, 2), (1, 100, 1000), (1, 50, 500), min_requests=100)
    assert shares == [[0.3, 0.1], [0.4, 0.2]]
    assert distribution_from(doc, (2, 2), None, None, min_requests=100)[0] == shares  # no edges: shape only
    few, why = distribution_from(doc, (2, 2), None, None, min_requests=101)
    assert few is None and "100 request(s) counted (< 101)" in why
    assert distribution_from(doc, (2, 2), (1, 10, 1000), (1, 50, 500), 1)[0] is None  # other edges
    assert distribution_from(doc, (3, 2), None, None, 1)[0] is None  # other shape
