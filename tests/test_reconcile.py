"""The fleet's reconciliation rules (melange_sky.fleet.reconcile) and the replica-state vocabulary, on plain values:
no threads, no subprocess, no ledger file, no backend. The end-to-end behaviour is in test_fleet_cli.py."""
from __future__ import annotations

from typing import Any

import pytest

from melange_sky.deploy.plan import Deployment, Plan, PlanRequest, ReplicaPlan
from melange_sky.errors import CapacityError, LaunchCancelled, LaunchError, LedgerError, MelangeError
from melange_sky.fleet import reconcile
from melange_sky.fleet.backends import ClusterStatus
from melange_sky.fleet.ledger import ReplicaRecord, ReplicaState, running_cost

AWS = "aws:us-west-2:g5.xlarge"
AZURE = "azure:eastus:Standard_NV36ads_A10_v5"
S = ReplicaState


def task(cluster: str, model: str = "m", cloud: str = "aws", port: Any = 8000) -> dict[str, Any]:
    return {"name": cluster, "envs": {"MODEL": model},
            "resources": {"cloud": cloud, "accelerators": "A10G:1", "ports": port}}


def row(cluster: str, state: ReplicaState, offer: str = AWS, gpu: str = "A10G", fleet: str = "f",
        endpoint: str | None = None, last_error: str | None = None, price: float = 1.0,
        task_: dict[str, Any] | None = None) -> ReplicaRecord:
    return ReplicaRecord(cluster=cluster, fleet=fleet, gpu=gpu, offer=offer, cloud=offer.split(":")[0],
                         region=offer.split(":")[1], instance_type=offer.split(":")[2], use_spot=False,
                         price_per_hour=price, round=1, task=task_, state=state, endpoint=endpoint,
                         last_error=last_error, created=0.0, updated=0.0)


def replica(cluster: str, price: float = 1.0, model: str = "m", cloud: str = "aws", gpu: str = "A10G",
            entry: str = "A10G") -> ReplicaPlan:
    region, instance_type = ("us-west-2", "g5.xlarge") if cloud == "aws" else ("eastus", "Standard_NV36ads_A10_v5")
    return ReplicaPlan(cluster=cluster, gpu=gpu, entry=entry, index=reconcile.cluster_index(cluster),
                       file_name=f"{cluster}.yaml", cloud=cloud, region=region, instance_type=instance_type,
                       accelerators="A10G:1", use_spot=False, price=price, task=task(cluster, model, cloud), yaml="")


def plan(*replicas: ReplicaPlan) -> Plan:
    # The rules read only the plan's replicas (and their prices): no solve result is needed.
    return Plan(fleet="f", result=None, deployment=Deployment(), template="vllm",  # type: ignore[arg-type]
                replicas=list(replicas))


# -- the state vocabulary ------------------------------------------------------------------------------------------
def test_state_groups_say_which_states_bill_serve_or_are_in_flight():
    assert {s for s in S if s.billing} == {S.UP, S.LAUNCHING, S.TERMINATING, S.FAILED}
    assert {s for s in S if s.not_serving} == {S.PENDING, S.LAUNCHING, S.FAILED, S.UNAVAILABLE}
    assert {s for s in S if s.in_flight} == {S.PENDING, S.LAUNCHING, S.TERMINATING}
    assert {s for s in S if s.cluster_uncertain} == {S.LAUNCHING, S.FAILED}
    assert {s for s in S if not s.may_have_cluster} == {S.GONE}


def test_a_stopped_replica_neither_bills_for_its_instance_nor_is_torn_down_as_a_leftover():
    assert not S.STOPPED.billing and not S.STOPPED.not_serving


def test_running_cost_counts_only_replicas_that_may_bill_for_an_instance():
    rows = [row("f-a10g-0", S.UP, price=1.0), row("f-a10g-1", S.FAILED, price=2.0),
            row("f-a10g-2", S.STOPPED, price=4.0), row("f-a10g-3", S.PENDING, price=8.0),
            row("f-a10g-4", S.GONE, price=16.0), row("f-a10g-5", S.UNAVAILABLE, price=32.0)]
    assert running_cost(rows) == 3.0
    assert running_cost([]) == 0


def test_a_records_json_form_keeps_the_documented_keys_and_leaves_the_task_out():
    record = row("f-a10g-0", S.UP, endpoint="http://1.2.3.4:8000", task_=task("f-a10g-0"))
    assert list(record.to_dict()) == ["cluster", "fleet", "gpu", "offer", "cloud", "region", "instance_type",
                                      "use_spot", "price_per_hour", "state", "endpoint", "last_error", "round",
                                      "created", "updated", "role"]
    assert record.to_dict()["state"] == "up"


# -- planning requests -----------------------------------------------------------------------------------------------
def test_up_replicas_are_fixed_capacity_per_gpu_entry_and_offer():
    request = reconcile.plan_request([row("f-a10g-0", S.UP), row("f-a10g-1", S.UP), row("f-a10g-2", S.UP, AZURE),
                                      row("f-a10g-3", S.FAILED)])
    assert request.fixed == {("A10G", AWS): 2, ("A10G", AZURE): 1}


def test_names_are_reused_up_replicas_first_then_by_replica_number_not_text():
    request = reconcile.plan_request([row("f-a10g-10", S.FAILED), row("f-a10g-2", S.FAILED), row("f-a10g-11", S.UP)])
    assert [name for _, _, name in request.names] == ["f-a10g-11", "f-a10g-2", "f-a10g-10"]


def test_a_name_on_an_offer_out_of_capacity_is_reused_only_if_no_cluster_was_made_there():
    rows = [row("f-a10g-0", S.UP, AZURE), row("f-a10g-1", S.UNAVAILABLE, AZURE), row("f-a10g-2", S.FAILED, AZURE),
            row("f-a10g-3", S.FAILED, AWS)]
    request = reconcile.plan_request(rows, exclude=frozenset({AZURE}))
    assert [name for _, _, name in request.names] == ["f-a10g-0", "f-a10g-1", "f-a10g-3"]
    assert request.exclude == {AZURE}


def test_gone_rows_neither_count_nor_block_their_name_and_live_ones_are_taken():
    request = reconcile.plan_request([row("f-a10g-0", S.GONE), row("f-a10g-1", S.UP), row("f-a10g-2", S.FAILED)])
    assert request.taken == {"f-a10g-1", "f-a10g-2"}
    assert "f-a10g-0" not in [name for _, _, name in request.names]
    assert reconcile.plan_request([]) == PlanRequest()


# -- the preview and the leftovers ---------------------------------------------------------------------------------
def test_the_preview_launches_what_is_not_up_and_keeps_what_is():
    rows = [row("f-a10g-0", S.UP, task_=task("f-a10g-0")), row("f-a10g-1", S.FAILED)]
    preview = reconcile.preview("f", plan(replica("f-a10g-0"), replica("f-a10g-1", 2.0), replica("f-a10g-2", 4.0)),
                                rows)
    assert [r.cluster for r in preview.launch] == ["f-a10g-1", "f-a10g-2"]
    assert preview.keep == ["f-a10g-0"] and preview.launch_cost == 6.0 and preview.changes
    assert not (preview.remove or preview.surplus or preview.stale or preview.config_changed)


def test_outside_the_plan_not_serving_replicas_are_torn_down_up_ones_and_stopped_ones_kept():
    rows = [row(f"f-a10g-{i}", state) for i, state in enumerate(
        [S.UP, S.PENDING, S.LAUNCHING, S.FAILED, S.UNAVAILABLE, S.STOPPED, S.GONE, S.UP])]
    planned = plan(replica("f-a10g-7"))
    preview = reconcile.preview("f", planned, rows)
    assert preview.remove == ["f-a10g-1", "f-a10g-2", "f-a10g-3", "f-a10g-4"]
    assert [r.cluster for r in reconcile.leftovers(rows, planned)] == preview.remove
    assert preview.surplus == ["f-a10g-0"] and preview.surplus_stopped == ["f-a10g-5"]
    assert preview.keep == ["f-a10g-7"] and not preview.launch
    assert preview.changes  # tearing down needs the same confirmation as launching


def test_nothing_to_launch_or_tear_down_needs_no_confirmation():
    preview = reconcile.preview("f", plan(replica("f-a10g-0")), [row("f-a10g-0", S.UP, task_=task("f-a10g-0"))])
    assert not preview.changes and not preview.notes


def test_an_up_replica_is_stale_when_its_model_changed_not_when_the_plan_moved_its_offer():
    rows = [row("f-a10g-0", S.UP, task_=task("f-a10g-0", model="old")),
            row("f-a10g-1", S.UP, task_=task("f-a10g-1", cloud="azure"))]
    preview = reconcile.preview("f", plan(replica("f-a10g-0"), replica("f-a10g-1")), rows)
    assert preview.stale == ["f-a10g-0"]
    assert any("older task" in note for note in preview.notes)


def test_a_cluster_name_owned_by_another_fleet_is_refused():
    with pytest.raises(LedgerError, match="f-a10g-0 already belongs to fleet 'F'"):
        reconcile.preview("f", plan(replica("f-a10g-0")), [], owners={"f-a10g-0": "F"})
    assert reconcile.preview("f", plan(replica("f-a10g-0")), [], owners={}).launch


def test_a_config_change_is_noted_only_when_both_digests_are_known():
    planned = plan(replica("f-a10g-0"))
    assert reconcile.preview("f", planned, [], stored_digest="a", digest="b").config_changed
    assert not reconcile.preview("f", planned, [], stored_digest="a", digest="a").config_changed
    assert not reconcile.preview("f", planned, [], stored_digest=None, digest="b").config_changed
    assert not reconcile.preview("f", planned, [], stored_digest="a", digest=None).config_changed


def test_keeping_up_replicas_is_noted_only_when_it_costs_more_than_one_percent():
    assert reconcile.shrink_note(plan(replica("f-a10g-0", 3.0)), plan(replica("f-a10g-0", 2.0))) is not None
    assert reconcile.shrink_note(plan(replica("f-a10g-0", 1.0)), plan(replica("f-a10g-0", 0.995))) is None


def test_a_replica_is_recorded_under_its_config_entry_and_offer_not_its_solver_column():
    new = reconcile.new_replica(replica("f-a10g-0", gpu="A10G@aws:us-west-2:g5.xlarge", entry="A10G"), round_=3)
    assert (new.gpu, new.offer, new.round, new.price_per_hour) == ("A10G", AWS, 3, 1.0)
    assert new.task == task("f-a10g-0")


# -- what the launcher's answers mean ------------------------------------------------------------------------------
@pytest.mark.parametrize("state, status, endpoint, expected", [
    (S.LAUNCHING, ClusterStatus.UP, "http://e:8000", S.UP),
    (S.UP, ClusterStatus.UP, "http://new:8000", S.UP),  # the endpoint moved: recorded
    (S.UP, ClusterStatus.UP, "http://e:8000", None),  # nothing new
    (S.UP, ClusterStatus.STOPPED, None, S.STOPPED),
    (S.STOPPED, ClusterStatus.STOPPED, None, None),
    (S.UP, ClusterStatus.INIT, None, S.FAILED),  # unhealthy: `up` relaunches it
    (S.LAUNCHING, ClusterStatus.INIT, None, None),  # still provisioning
    (S.FAILED, ClusterStatus.GONE, None, S.GONE),
    (S.PENDING, ClusterStatus.GONE, None, None),  # its launch is not requested yet
])
def test_what_a_status_answer_means_for_a_row(state, status, endpoint, expected):
    change = reconcile.status_transition(row("f-a10g-0", state, endpoint="http://e:8000"), status, endpoint)
    assert (change.state if change else None) is expected


def test_a_replica_found_up_gets_its_endpoint_and_loses_its_last_error():
    change = reconcile.status_transition(row("f-a10g-0", S.FAILED, last_error="boom"), ClusterStatus.UP, "http://e")
    assert change is not None and change.changes() == {"endpoint": "http://e", "error": None}


def test_a_replica_found_stopped_or_gone_keeps_its_last_error_but_not_its_endpoint():
    for status in (ClusterStatus.STOPPED, ClusterStatus.GONE):
        change = reconcile.status_transition(row("f-a10g-0", S.UP, endpoint="http://e"), status)
        assert change is not None and change.changes() == {"endpoint": None}


def test_an_unhealthy_replica_is_failed_with_a_reason_that_says_up_relaunches_it():
    change = reconcile.status_transition(row("f-a10g-0", S.UP), ClusterStatus.INIT)
    assert change is not None and "`up` relaunches it" in change.changes()["error"]


@pytest.mark.parametrize("state, status, expected", [
    (S.LAUNCHING, ClusterStatus.UP, S.UP),  # the launch had finished
    (S.FAILED, ClusterStatus.UP, S.UP),  # cancelled, but up after all
    (S.LAUNCHING, ClusterStatus.GONE, S.PENDING),  # no cluster was made: launch it next time
    (S.LAUNCHING, None, S.FAILED),  # no answer: the cluster may exist
    (S.LAUNCHING, ClusterStatus.INIT, S.FAILED),
    (S.FAILED, None, None),  # already says so
])
def test_what_an_interrupted_launch_is_recorded_as(state, status, expected):
    change = reconcile.interrupted_transition(row("f-a10g-0", state), status, "http://e")
    assert (change.state if change else None) is expected


def test_an_interrupted_launch_with_no_cluster_keeps_its_endpoint_field_and_clears_its_error():
    change = reconcile.interrupted_transition(row("f-a10g-0", S.LAUNCHING), ClusterStatus.GONE)
    assert change is not None and change.changes() == {"error": None}


@pytest.mark.parametrize("exc, expected", [
    (CapacityError("c", "no A10G in us-west-2"), (S.UNAVAILABLE, "no A10G in us-west-2")),
    (LaunchCancelled("c", "Ctrl-C"), (S.FAILED, "cancelled: Ctrl-C; the cluster may exist")),
    (LaunchError("c", "bad credentials"), (S.FAILED, "bad credentials")),
    (MelangeError("ledger says no"), (S.FAILED, "ledger says no")),
    (ValueError("a backend bug"), (S.FAILED, "ValueError: a backend bug")),
])
def test_only_a_capacity_failure_makes_a_replica_unavailable_for_a_re_plan(exc, expected):
    assert reconcile.launch_failure(exc) == expected


# -- tasks and names -----------------------------------------------------------------------------------------------
def test_a_task_differs_by_what_it_runs_not_by_its_name_or_placement():
    assert not reconcile.task_differs(task("a", cloud="aws"), task("b", cloud="azure"))
    assert reconcile.task_differs(task("a", model="x"), task("a", model="y"))
    assert reconcile.task_differs(task("a", port=8000), task("a", port=8080))
    assert not reconcile.task_differs(None, task("a"))  # a row from before tasks were stored


def test_replicas_that_differ_only_in_name_share_a_validation_shape():
    assert reconcile.task_shape(task("a")) == reconcile.task_shape(task("b"))
    assert reconcile.task_shape(task("a")) != reconcile.task_shape(task("a", cloud="azure"))


@pytest.mark.parametrize("ports, port", [(8000, 8000), ("8080", 8080), ("9000-9010", 9000), ([8001, 8002], 8001),
                                         (None, None), ([], None), ("http", None)])
def test_the_serving_port_is_the_first_port_a_task_opens(ports, port):
    assert reconcile.task_port(task("a", port=ports)) == port
    assert reconcile.task_port(None) is None


def test_the_replica_number_is_read_from_the_end_of_the_cluster_name():
    assert reconcile.cluster_index("llama-a100-80gb-12") == 12
    assert reconcile.cluster_index("llama") == 0


def test_a_fresh_plan_replaces_the_running_one_only_for_a_real_saving():
    kept = plan(replica("f-a10g-0", 3.0), replica("f-a10g-1", 3.0))
    assert reconcile.worth_shrinking(kept, plan(replica("f-a10g-0", 3.0)))  # half the cost
    assert not reconcile.worth_shrinking(kept, plan(replica("f-a10g-0", 2.9), replica("f-a10g-1", 2.9)))  # 3%
    assert not reconcile.worth_shrinking(plan(replica("f-a10g-0", 0.1)), plan(replica("f-a10g-0", 0.091)))  # <1c


def test_a_shrinking_plan_request_reuses_the_names_of_replicas_up_without_fixing_their_capacity():
    rows = [row("f-a10g-0", S.UP), row("f-a10g-1", S.UP), row("f-a10g-2", S.FAILED)]
    request = reconcile.plan_request(rows, keep_up=False)
    assert request.fixed == {} and [n[2] for n in request.names][:2] == ["f-a10g-0", "f-a10g-1"]
    drained = reconcile.plan_request(rows, drop=frozenset({"f-a10g-1"}))
    assert drained.fixed == {("A10G", AWS): 1} and "f-a10g-1" not in [n[2] for n in drained.names]


def test_a_shrinking_preview_drains_the_replicas_up_outside_the_plan_instead_of_keeping_them():
    rows = [row("f-a10g-0", S.UP), row("f-a10g-1", S.UP, price=2.5)]
    shrinking = reconcile.preview("f", plan(replica("f-a10g-0")), rows, shrink=True)
    assert [r.cluster for r in shrinking.drain] == ["f-a10g-1"] and shrinking.surplus == []
    assert shrinking.drain_saving == 2.5 and shrinking.changes
    keeping = reconcile.preview("f", plan(replica("f-a10g-0")), rows)
    assert keeping.drain == [] and keeping.surplus == ["f-a10g-1"] and not keeping.changes


def test_the_routers_members_are_the_replicas_up_at_a_known_endpoint():
    rows = [row("f-a10g-0", S.UP, endpoint="1.2.3.4:8000"), row("f-a10g-1", S.UP, endpoint=None),
            row("f-a10g-2", S.FAILED, endpoint="1.2.3.5:8000")]
    assert reconcile.members(rows) == [("f-a10g-0", "A10G", "http://1.2.3.4:8000")]
    assert reconcile.drained({"http://1.2.3.4:8000": 0}, ["http://1.2.3.4:8000"])
    assert not reconcile.drained({"http://1.2.3.4:8000": 2}, ["http://1.2.3.4:8000"])
