"""The controller's pure rules (melange_sky/controller/rules.py) with injected times and documents: which rate a
router's /workload asks for, when to scale up or down, the budget, which failed probes replace a replica."""
from __future__ import annotations

import pytest

from melange_sky.controller.rules import (Need, Scale, default_window_min, distribution_from, need_data,
                                          need_from_workload, need_message, needs_from_events, over_budget,
                                          scale_decision, to_replace)

HOLD = 600.0  # 10 minutes
NOW = 100_000.0


def test_need_is_the_chosen_percentile_of_the_per_minute_rates_not_their_mean():
    # 18 quiet minutes at 5 req/s, 2 bursts at 50 req/s: mean 9.5, p50 5, p95 50.
    doc = {"minute_arrivals": [300] * 18 + [3000] * 2, "total_request_rate": 9.5}
    need = need_from_workload(doc, 95, 20)
    assert (need.rate, need.window_min) == (50.0, 20)
    assert need.source == "p95 over a 20 min window (the last 20 of 20 complete minutes)"
    assert need_from_workload(doc, 50, 20).rate == 5.0
    assert need_from_workload(doc, 100, 20).rate == 50.0


def test_need_is_read_over_the_window_of_the_latest_minutes_with_each_earlier_windows_need():
    doc = {"minute_arrivals": [300, 3000, 600, 120, 60]}  # oldest first
    need = need_from_workload(doc, 95, 2)
    assert need.rate == 2.0 and need.source == "p95 over a 2 min window (the last 2 of 5 complete minutes)"
    assert need.recent == (2.0, 10.0, 50.0, 50.0)  # the windows ending 0, 1, 2 and 3 minutes ago
    assert need_from_workload(doc, 95, 5).recent == (50.0,)


def test_a_window_longer_than_the_routers_minutes_reads_what_it_has_and_says_so():
    need = need_from_workload({"minute_arrivals": [120, 240]}, 95, 10)
    assert need == Need(4.0, "p95 over 2 min of a 10 min window (the router has counted 2 complete minute(s))",
                        10, ())


def test_need_falls_back_to_rate_percentiles_then_to_the_mean_without_a_complete_minute():
    shown = {"p50": 2.0, "p95": 7.5, "p99": 9.0, "max": 12.0}
    whole = need_from_workload({"rate_percentiles": shown, "total_request_rate": 3.0}, 95, 10)
    assert whole.rate == 7.5 and whole.window_min is None and "its whole window" in whole.source
    fresh = need_from_workload({"minute_arrivals": [], "total_request_rate": 4.25, "span_s": 40}, 95, 10)
    assert fresh == Need(4.25, "mean over 40 s (no complete minute yet)")


def test_no_arrivals_is_no_need_rather_than_a_scale_to_zero():
    assert need_from_workload({"minute_arrivals": [0, 0, 0], "total_request_rate": 0.0}, 95, 3) is None
    assert need_from_workload({"counts": [[0]]}, 95, 3) is None


def test_the_default_window_is_the_hold_in_whole_minutes():
    assert [default_window_min(s) for s in (0, 2.4, 60, 61, 600)] == [1, 1, 1, 2, 10]


def passes_after_a_burst(hold_min: float, window: int, quiet_minutes: int, plan: float = 38.0):
    """Issue 20's try: minutes at 2 req/s, one at 38 req/s, then quiet ones; one pass at the end of each quiet
    minute (none recorded: `watch --once` passes with nothing in the ledger). The decisions, oldest first."""
    decisions = []
    for quiet in range(quiet_minutes + 1):
        need = need_from_workload({"minute_arrivals": [120] * 10 + [2280] + [120] * quiet}, 95, window)
        decisions.append(scale_decision(plan, need.rate, [], NOW + 60 * quiet, hold_min * 60, need.recent,
                                        window * 60))
    return decisions


def test_after_a_burst_minute_the_fleet_scales_down_once_the_quiet_window_has_passed_not_before():
    one = passes_after_a_burst(hold_min=1, window=default_window_min(60), quiet_minutes=4)
    assert [d.scale for d in one] == [Scale.NONE, Scale.DOWN, Scale.DOWN, Scale.DOWN, Scale.DOWN]
    assert one[1].rate == 2.0
    assert one[1].reason == ("need below plan 38 req/s for 1 min of the router's minutes (1 min window, hold 1 min); "
                             "highest need in the hold 2 req/s")
    three = passes_after_a_burst(hold_min=3, window=default_window_min(180), quiet_minutes=4)
    assert [d.scale for d in three] == [Scale.NONE, Scale.NONE, Scale.NONE, Scale.DOWN, Scale.DOWN]
    assert three[3].rate == 2.0


def test_a_hold_longer_than_the_window_needs_every_window_in_it_below_the_plan():
    decisions = passes_after_a_burst(hold_min=3, window=1, quiet_minutes=3)
    assert [d.scale for d in decisions] == [Scale.NONE, Scale.HOLD, Scale.HOLD, Scale.DOWN]
    assert decisions[1].reason == ("need 2 req/s < plan 38 req/s for 1 min of 3 min before scaling down (1 min "
                                   "window)")
    assert decisions[3].rate == 2.0


def test_a_window_longer_than_the_hold_keeps_the_burst_until_it_leaves_the_window():
    decisions = passes_after_a_burst(hold_min=1, window=5, quiet_minutes=5)
    assert [d.scale for d in decisions] == [Scale.NONE] * 5 + [Scale.DOWN]


def test_scale_down_goes_to_the_highest_window_need_in_the_hold():
    need = need_from_workload({"minute_arrivals": [2280, 600, 300, 120]}, 95, 1)
    decision = scale_decision(38.0, need.rate, [], NOW, 180, need.recent, 60)
    assert decision.scale is Scale.DOWN and decision.rate == 10.0  # the 3 min hold: 10, 5 and 2 req/s


def test_a_burst_scales_up_at_once_whatever_the_window_and_the_quiet_before_it():
    for window in (1, 5, 15):  # p95 of 20 minutes or fewer is their busiest
        need = need_from_workload({"minute_arrivals": [120] * 30 + [2280]}, 95, window)
        low_for_long = [(NOW - 60 * k, 2.0) for k in range(1, 30)]
        decision = scale_decision(2.0, need.rate, low_for_long, NOW, 600, need.recent, window * 60)
        assert decision.scale is Scale.UP and decision.rate == 38.0


def test_too_few_router_minutes_for_the_hold_fall_back_to_the_recorded_needs():
    need = need_from_workload({"minute_arrivals": [120, 120, 120]}, 95, 1)  # a router restarted 3 minutes ago
    alone = scale_decision(38.0, need.rate, [], NOW, 600, need.recent, 60)
    assert alone.scale is Scale.HOLD and "for 3 min of 10 min before scaling down" in alone.reason
    remembered = [(NOW - 700, 40.0), (NOW - 650, 3.0), (NOW - 300, 2.5)]  # passes saw it low for 10 min 50 s
    decision = scale_decision(38.0, need.rate, remembered, NOW, 600, need.recent, 60)
    assert decision.scale is Scale.DOWN and decision.rate == 2.5


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
