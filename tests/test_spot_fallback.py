"""Spot fallback (issue 20 item 3): the placer's pure rules (melange_sky/controller/placer.py), then `watch`'s passes
against the FakeBackend with an injected clock: spot replicas the cloud takes away are relaunched on other offers
(another region, or another GPU type when every pool of the entry is avoided), never on the pool that just failed,
and the load moves back once its hold is over; each step is one ledger event with data."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fake_backend import FakeBackend
from melange_sky.controller.placer import Placer, back, lost_spot, pool_where, unavailable_spot
from melange_sky.controller.watch import Controller, WatchOptions
from melange_sky.fleet.fleet import UpOptions
from melange_sky.fleet.ledger import Ledger, ReplicaRecord, ReplicaState

EAST2 = "aws:us-east-2:g5.xlarge:spot"
EAST1 = "aws:us-east-1:g5.xlarge:spot"
HOLD = 600.0
NOW = 1_800_000_000.0


def row(cluster: str, state: ReplicaState, offer: str = EAST2, spot: bool = True) -> ReplicaRecord:
    cloud, region, instance = offer.split(":")[:3]
    return ReplicaRecord(cluster=cluster, fleet="f", gpu="A10G", offer=offer, cloud=cloud, region=region,
                         instance_type=instance, use_spot=spot, price_per_hour=0.4, round=1, task=None, state=state,
                         endpoint=None, last_error=None, created=0.0, updated=0.0)


def test_spot_replicas_the_cloud_took_away_are_one_step_avoiding_their_pools_for_the_hold():
    rows = [row("f-a10g-0", ReplicaState.GONE), row("f-a10g-1", ReplicaState.STOPPED),
            row("f-a10g-2", ReplicaState.UP, EAST1)]
    last = {"f-a10g-0": (ReplicaState.UP, "gone", NOW - 5), "f-a10g-1": (ReplicaState.UP, "stopped", NOW - 4),
            "f-a10g-2": (ReplicaState.LAUNCHING, "up", NOW - 9)}
    step = lost_spot(rows, last, Placer({}), NOW, HOLD)
    assert step is not None and step.kind == "spot-preempted" and step.pools == (EAST2,)
    assert step.message == ("f-a10g-0, f-a10g-1 lost on aws us-east-2 g5.xlarge (spot): avoided for 10 min; their "
                            "load is re-planned on the other offers")
    assert step.data == {"pools": [EAST2], "since": NOW, "until": NOW + HOLD}


def test_a_loss_counts_once_whichever_refresh_recorded_it():
    rows = [row("f-a10g-0", ReplicaState.GONE)]
    last = {"f-a10g-0": (ReplicaState.UP, "gone", NOW - 5)}  # e.g. by `status --refresh` between two passes
    step = lost_spot(rows, last, Placer({}), NOW, HOLD)
    assert step is not None
    known = Placer.of([(NOW, step.kind, step.data)])  # the next pass: the loss is recorded
    assert lost_spot(rows, last, known, NOW + 60, HOLD) is None
    later = {"f-a10g-0": (ReplicaState.UP, "gone", NOW + 30)}  # relaunched there and lost again since
    assert lost_spot(rows, later, known, NOW + 60, HOLD) is not None


def test_on_demand_replicas_our_own_teardowns_and_failed_launches_are_not_preemptions():
    od = "aws:us-east-2:g5.xlarge"
    rows = [row("f-a-0", ReplicaState.GONE, od, spot=False), row("f-a10g-0", ReplicaState.GONE),
            row("f-a10g-1", ReplicaState.UNAVAILABLE), row("f-a10g-2", ReplicaState.FAILED)]
    last = {"f-a-0": (ReplicaState.UP, "gone", NOW), "f-a10g-0": (ReplicaState.TERMINATING, "gone", NOW),
            "f-a10g-1": (ReplicaState.LAUNCHING, "unavailable", NOW),
            "f-a10g-2": (ReplicaState.LAUNCHING, "failed", NOW)}
    assert lost_spot(rows, last, Placer({}), NOW, HOLD) is None


def test_only_spot_offers_found_without_capacity_are_avoided():
    step = unavailable_spot(["aws:us-east-2:g5.xlarge", EAST2, EAST1, EAST2], NOW, HOLD)
    assert step is not None and step.kind == "spot-unavailable" and step.pools == (EAST1, EAST2)
    assert unavailable_spot(["aws:us-east-2:g5.xlarge"], NOW, HOLD) is None


def test_the_placer_avoids_a_pool_until_its_latest_end_and_a_return_ends_it():
    events = [(NOW, "spot-preempted", {"pools": [EAST2], "since": NOW, "until": NOW + 600}),
              (NOW + 5, "spot-unavailable", {"pools": [EAST2, EAST1], "since": NOW + 5, "until": NOW + 300}),
              (NOW + 6, "need", {"rate": 3.0}),  # another kind: not the placer's
              (NOW + 7, "spot-preempted", {"pools": ["x"], "until": "soon"}),  # damaged data: skipped
              (NOW + 8, "spot-return", {"pools": [EAST1]})]
    placer = Placer.of(events)
    assert placer.avoided(NOW + 10) == frozenset({EAST2})
    assert placer.avoiding[EAST2].until == NOW + 600  # the later end is kept
    assert placer.avoided(NOW + 599) == frozenset({EAST2}) and placer.avoided(NOW + 600) == frozenset()


def test_a_pool_is_offered_again_once_its_hold_is_over_not_before():
    placer = Placer.of([(NOW, "spot-preempted", {"pools": [EAST2], "since": NOW, "until": NOW + HOLD})])
    assert back(placer, NOW + HOLD - 1) is None
    step = back(placer, NOW + HOLD)
    assert step is not None and step.kind == "spot-return" and step.data == {"pools": [EAST2]}
    assert step.message == "aws us-east-2 g5.xlarge (spot) held 10 min without a failure: offered again"
    assert Placer.of([(NOW, "spot-preempted", step.data | {"until": NOW + HOLD}),
                      (NOW + HOLD, step.kind, step.data)]).avoiding == {}


def test_pools_read_as_people_name_them():
    assert pool_where(EAST2) == "aws us-east-2 g5.xlarge (spot)"
    assert pool_where("gcp:any:a2-highgpu-1g") == "gcp a2-highgpu-1g"


# -- through watch's passes ----------------------------------------------------------------------------------------
SPOT_A10G = {"name": "spotty", "gpu_info": {"A10G": {"tputs": [[2, 1], [5, 2]], "use_spot": True},
                                            "A100-80GB": {"tputs": [[20, 20], [40, 20]]}},
             "workload_distribution": [[0.2, 0.1], [0.5, 0.2]], "total_request_rate": 6, "slice_factor": 1,
             "input_buckets": [1, 25, 100], "output_buckets": [1, 25, 100], "clouds": ["aws"]}


class Clock:
    """The controller's clock, moved by the test (it starts at the real time: `up` reads the real one)."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spot_fleet(cli, tmp_path, monkeypatch, write_config):
    """Bring up a fleet from `config` (FakeBackend, private ledger) and return (fake, controller for it, clock)."""
    home, state = tmp_path / "melange-home", tmp_path / "fake.json"
    for key, value in {"MELANGE_SKY_HOME": str(home), "MELANGE_SKY_BACKEND": "fake_backend:FakeBackend",
                       "MELANGE_SKY_FAKE_STATE": str(state), "HF_TOKEN": "hf_test"}.items():
        monkeypatch.setenv(key, value)
    ledgers = []

    def make(config: dict, *up_args: str):
        result = cli("up", "--no-router", write_config(config), "-y", *up_args)
        assert result.exit_code == 0, result.stderr
        fake, ledger, clock = FakeBackend(str(state)), Ledger(str(home)), Clock(time.time())
        ledgers.append(ledger)
        options = WatchOptions(health_check=False, spot_hold_s=HOLD, up=UpOptions(drain_timeout=0))
        controller = Controller(config["name"], fake, ledger, {"HF_TOKEN": "hf_test"}, options, clock=clock)
        return fake, controller, clock

    yield make
    for ledger in ledgers:
        ledger.close()


def offers(controller: Controller) -> dict[str, str]:
    return {r.cluster: r.offer for r in controller.ledger.replicas(controller.fleet) if r.state is ReplicaState.UP}


def spot_events(controller: Controller) -> list[tuple[str, dict]]:
    return [(e.new_state, e.data) for e in controller.ledger.history(fleet=controller.fleet)
            if e.cluster is None and e.new_state.startswith("spot-")]


def test_preempted_spot_replicas_go_to_another_region_and_come_back_after_the_hold(spot_fleet):
    fake, controller, clock = spot_fleet(SPOT_A10G, "--per-offer")  # each region priced apart, to move back to
    t0 = clock.now
    planned = offers(controller)
    assert set(planned.values()) == {EAST2} and len(planned) == 3  # the cheapest spot pool
    for cluster in planned:  # one wave: every spot replica of the region, and no spot capacity left there
        fake.remove_cluster(cluster)
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-east-2"}])
    launches = len(fake.calls("launch"))

    report = controller.run_pass()
    assert report.ok, report.to_dict()
    assert [a.kind for a in report.actions] == ["spot-preempted", "relaunch", "plan", "up"]
    moved = offers(controller)
    assert len(moved) == 3 and set(moved.values()) == {EAST1}  # spot elsewhere
    assert len(fake.calls("launch")) == launches + 3  # none tried on the pool that just failed
    assert spot_events(controller) == [("spot-preempted", {"pools": [EAST2], "since": t0, "until": t0 + HOLD})]

    fake.configure(capacity_failures=[])  # spot is back in us-east-2, but the hold is not over
    clock.now = t0 + HOLD - 1
    assert controller.run_pass().actions == [] and offers(controller) == moved

    clock.now = t0 + HOLD
    report = controller.run_pass()
    assert report.ok, report.to_dict()
    assert [a.kind for a in report.actions] == ["plan", "spot-return", "up"]
    assert report.actions[1].message.endswith("offered again: 3 replica(s) run there again")
    assert report.up is not None and sorted(report.up.drained) == sorted(moved)  # make-before-break
    assert set(offers(controller).values()) == {EAST2} and len(offers(controller)) == 3
    assert [kind for kind, _ in spot_events(controller)] == ["spot-preempted", "spot-return"]
    assert controller.run_pass().actions == []  # settled


def test_without_per_offer_the_spot_return_says_the_load_stays_and_how_to_move_it_back(spot_fleet, cli):
    fake, controller, clock = spot_fleet(SPOT_A10G)  # one A10G column, priced at its cheapest offer
    t0 = clock.now
    for cluster in offers(controller):
        fake.remove_cluster(cluster)
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-east-2"}])
    assert controller.run_pass().ok and set(offers(controller).values()) == {EAST1}
    fake.configure(capacity_failures=[])
    clock.now = t0 + HOLD
    report = controller.run_pass()
    [line] = [a.message for a in report.actions if a.kind == "spot-return"]
    assert line.endswith("offered again; the load stays where it runs: without --per-offer a GPU entry's replicas are "
                         "priced at its cheapest offer wherever they run, so re-plan with --per-offer (`melange-sky up "
                         "CONFIG --per-offer`) to move it back")
    assert set(offers(controller).values()) == {EAST1}  # what the line says: nothing moved
    status = cli("status", "spotty").stdout.splitlines()[0]  # the plan's figure is labelled as the plan's
    running, planned = (float(status.split(label)[1].split("/h")[0]) for label in ("replicas $", "plan $"))
    assert running > planned and f"replicas ${running:.2f}/h running, plan ${planned:.2f}/h at its offers" in status


def test_a_pool_still_full_after_its_hold_is_avoided_again_and_the_fleet_stays_served(spot_fleet):
    fake, controller, clock = spot_fleet(SPOT_A10G, "--per-offer")
    t0 = clock.now
    for cluster in offers(controller):
        fake.remove_cluster(cluster)
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-east-2"}])
    assert controller.run_pass().ok and set(offers(controller).values()) == {EAST1}
    clock.now = t0 + HOLD  # offered again, still without capacity: the trial fails, the fleet keeps serving
    report = controller.run_pass()
    kinds = [a.kind for a in report.actions]
    assert "spot-return" in kinds and kinds.index("spot-return") < kinds.index("spot-unavailable") == len(kinds) - 1
    assert len(offers(controller)) == 3 and set(offers(controller).values()) == {EAST1}
    kind, data = spot_events(controller)[-1]
    assert kind == "spot-unavailable" and data == {"pools": [EAST2], "since": t0 + HOLD, "until": t0 + 2 * HOLD}


def test_with_every_pool_of_a_pinned_spot_entry_avoided_the_load_moves_to_another_gpu_type_and_back(spot_fleet):
    pinned = {**SPOT_A10G, "name": "pinned",  # spot A10G in one region only; on-demand L4, one at least
              "gpu_info": {"A10G": {"tputs": [[2, 1], [5, 2]], "use_spot": True, "region": "us-east-2"},
                           "L4": {"tputs": [[2, 1], [5, 2]], "min_count": 1}}}
    fake, controller, clock = spot_fleet(pinned)
    t0 = clock.now

    def reliable() -> int:
        return sum(1 for offer in offers(controller).values() if not offer.endswith(":spot"))

    start = offers(controller)
    floor = reliable()
    assert floor == 1 and any(o == EAST2 for o in start.values())
    for cluster, offer in start.items():
        if offer == EAST2:
            fake.remove_cluster(cluster)
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-east-2"}])
    report = controller.run_pass()
    assert report.ok, report.to_dict()
    assert not any(o.endswith(":spot") for o in offers(controller).values())  # another GPU type covers the load
    assert reliable() > floor
    fake.configure(capacity_failures=[])
    clock.now = t0 + HOLD
    report = controller.run_pass()
    assert report.ok, report.to_dict()
    assert any(o == EAST2 for o in offers(controller).values()) and reliable() >= floor  # back on spot, floor kept
    assert report.up is not None and report.up.drained


# -- the chaos runner's spot scenarios (real CLI processes against the fault-injecting cloud) ------------------------
def test_a_regional_spot_outage_is_covered_by_watch_and_handed_back_without_breaking_the_floor(tmp_path):
    """The pinned kind (the load goes to the on-demand type and back); `spot-outage` (spot in another region and
    back) is the in-process test above, and runs in the chaos runner (`python tests/chaos.py spot-outage:1`)."""
    from chaos import run_scenario

    s = run_scenario("spot-outage-pinned", 1, tmp_path)
    assert not s.violations, "\n".join(map(str, s.violations)) + "\n" + "\n".join(s.steps)
    assert [r.args[0] for r in s.runs] == ["up", "watch", "watch", "down"]


def test_with_markets_a_lost_spot_pool_is_re_solved_over_every_offer_and_the_floor_is_never_drained(spot_fleet):
    """A fleet planned with markets (a floor, a regional spread; the stored spot block is read back by watch)."""
    markets = {**SPOT_A10G, "name": "markets", "total_request_rate": 30,
               "gpu_info": {"A10G": {"tputs": [[2, 1], [5, 2]]}, "L4": {"tputs": [[2, 1], [5, 2]]}},
               "spot": {"floor": 0.5, "max_region_share": 0.5}}
    fake, controller, clock = spot_fleet(markets, "--per-offer")
    t0 = clock.now

    def reliable() -> int:
        return sum(1 for offer in offers(controller).values() if not offer.endswith(":spot"))

    start = offers(controller)
    floor = reliable()
    lost = sorted(c for c, o in start.items() if o == EAST2)
    assert floor >= 1 and lost
    for cluster in lost:
        fake.remove_cluster(cluster)
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-east-2"}])
    report = controller.run_pass()
    assert report.ok, report.to_dict()
    assert report.actions[0].kind == "spot-preempted" and EAST2 not in offers(controller).values()
    assert len(offers(controller)) == len(start) and reliable() >= floor  # here: spot of another type elsewhere
    fake.configure(capacity_failures=[])
    clock.now = t0 + HOLD
    report = controller.run_pass()
    assert report.ok, report.to_dict()
    assert "spot-return" in [a.kind for a in report.actions] and reliable() >= floor


def test_a_manual_up_does_not_move_back_onto_a_pool_watch_is_avoiding(spot_fleet, cli, write_config):
    fake, controller, clock = spot_fleet(SPOT_A10G, "--per-offer")  # the clock is the real one here, as up's
    for cluster in offers(controller):
        fake.remove_cluster(cluster)
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-east-2"}])
    assert controller.run_pass().ok and set(offers(controller).values()) == {EAST1}
    fake.configure(capacity_failures=[])  # us-east-2 would take them again, and is cheaper: up would shrink onto it
    launches = len(fake.calls("launch"))
    again = cli("up", "--no-router", write_config(SPOT_A10G), "-y", "--per-offer")
    assert again.exit_code == 0, again.stderr
    assert set(offers(controller).values()) == {EAST1} and len(fake.calls("launch")) == launches


def test_a_loss_a_status_refresh_recorded_before_the_pass_is_still_avoided(spot_fleet, cli):
    fake, controller, clock = spot_fleet(SPOT_A10G, "--per-offer")
    for cluster in offers(controller):
        fake.remove_cluster(cluster)
    assert cli("status", "spotty", "--refresh").exit_code == 0  # the ledger says gone before watch looks
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-east-2"}])
    launches = len(fake.calls("launch"))
    report = controller.run_pass()
    assert report.ok and report.actions[0].kind == "spot-preempted"
    assert set(offers(controller).values()) == {EAST1} and len(fake.calls("launch")) == launches + 3
    assert [a.kind for a in controller.run_pass().actions] == []  # counted once


def test_a_move_back_the_pass_could_not_make_is_tried_again_by_the_next_pass(spot_fleet):
    fake, controller, clock = spot_fleet(SPOT_A10G, "--per-offer")
    t0 = clock.now
    for cluster in offers(controller):
        fake.remove_cluster(cluster)
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-east-2"}])
    assert controller.run_pass().ok
    fake.configure(capacity_failures=[])
    clock.now = t0 + HOLD
    with controller.ledger.lock(controller.fleet):  # another `up` holds the fleet: the pass cannot bring it up
        busy = controller.run_pass()
    assert busy.error is not None and "spot-return" not in [a.kind for a in busy.actions]
    report = controller.run_pass()
    assert report.ok and "spot-return" in [a.kind for a in report.actions]
    assert set(offers(controller).values()) == {EAST2}


def test_a_spot_pool_up_found_full_is_remembered_and_watch_moves_back_after_its_hold(spot_fleet, tmp_path):
    FakeBackend(str(tmp_path / "fake.json")).configure(capacity_failures=[{"cloud": "aws", "region": "us-east-2"}])
    fake, controller, clock = spot_fleet(SPOT_A10G, "--per-offer")  # up: us-east-2 full, so us-east-1
    t0 = clock.now
    assert set(offers(controller).values()) == {EAST1}
    kind, data = spot_events(controller)[0]
    assert kind == "spot-unavailable" and data["pools"] == [EAST2] and data["until"] >= t0 + HOLD - 60
    fake.configure(capacity_failures=[])
    assert controller.run_pass().actions == []  # still held
    clock.now = t0 + HOLD + 60
    report = controller.run_pass()
    assert report.ok and "spot-return" in [a.kind for a in report.actions]
    assert set(offers(controller).values()) == {EAST2}


def test_without_per_offer_spot_kept_in_the_region_a_lost_pool_moves_to_is_no_reason_to_fail_the_re_plan(spot_fleet):
    """Each entry's cheapest offer per market: A10G spot in us-east-2, L4 spot and on demand in us-east-1. Losing
    us-east-2 moves A10G's spot column to us-east-1, beside the 3 L4 spot replicas kept there: with them counted
    in, max_region_share 0.5 had no solution. A region's share rises to what already runs there instead, and the
    kept replicas of each market are theirs alone (the L4 spot column is not also given the L4 on-demand ones)."""
    markets = {**SPOT_A10G, "name": "markets", "total_request_rate": 30,
               "gpu_info": {"A10G": {"tputs": [[2, 1], [5, 2]]}, "L4": {"tputs": [[2, 1], [5, 2]]}},
               "spot": {"floor": 0.5, "max_region_share": 0.5}}
    fake, controller, clock = spot_fleet(markets)
    start = offers(controller)
    lost = sorted(c for c, o in start.items() if o == EAST2)
    kept = {c: o for c, o in start.items() if c not in lost}
    assert lost and any(o.endswith(":spot") for o in kept.values())
    for cluster in lost:
        fake.remove_cluster(cluster)
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-east-2"}])
    report = controller.run_pass()
    assert report.ok, report.to_dict()
    now = offers(controller)
    assert EAST2 not in now.values() and kept.items() <= now.items()  # nothing kept was drained or moved
    assert len(now) == len(start)  # the lost load is carried again (here: on demand, us-east-1 holds all spot)
    assert sum(o.endswith(":spot") for o in now.values()) == sum(o.endswith(":spot") for o in kept.values())
    assert report.up is not None and report.cost_planned == pytest.approx(report.up.cost)  # what runs is the plan


def test_up_dryrun_plans_what_up_launches_with_a_hold_recorded_before_the_fleets_down(spot_fleet, cli):
    fake, controller, clock = spot_fleet(SPOT_A10G, "--per-offer")
    assert set(offers(controller).values()) == {EAST2}
    for cluster in offers(controller):  # a wave: the pass records it, avoids the pool, relaunches elsewhere
        fake.remove_cluster(cluster)
    assert controller.run_pass().ok and set(offers(controller).values()) == {EAST1}
    assert cli("down", "spotty", "-y").exit_code == 0  # the fleet leaves the ledger; the pool's wave is still on

    config = str(Path.cwd() / "config.json")  # what spot_fleet wrote
    dry = cli("up", "--no-router", config, "--dryrun", "--per-offer")
    assert dry.exit_code == 0, dry.stderr
    why = "spot pool aws us-east-2 g5.xlarge (spot) is left out of the plan for 9 min"  # of the 10 min hold
    assert f"Note: {why}" in dry.stdout and "its spot replicas were preempted" in dry.stdout
    assert "the hold outlives a `down`" in dry.stdout
    dry_json = json.loads(cli("up", "--no-router", config, "--dryrun", "--per-offer", "--json").stdout)
    planned = sorted(r["offer"] for r in dry_json["launch"])
    assert planned and EAST2 not in planned and any(why in n for n in dry_json["notes"])

    up = json.loads(cli("up", "--no-router", config, "-y", "--per-offer", "--json").stdout)
    assert sorted(r["offer"] for r in up["replicas"] if r["state"] == "up") == planned  # what the dry run showed
    assert any(why in n for n in up["notes"])
