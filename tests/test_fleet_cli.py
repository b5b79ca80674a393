"""`up`, `status` and `down` end to end through the CLI, against the FakeBackend test double (tests/fake_backend.py):
injected latency, capacity and hard failures, interrupts, re-runs and concurrent runs. The ledger is read back with
the real `Ledger` to prove what was recorded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from fake_backend import FakeBackend
from melange_sky.fleet.ledger import Ledger, ReplicaState

EXAMPLE = str(REPO / "examples" / "example.json")
PLANNED = ["example-a100-80gb-0", "example-a10g-0", "example-a10g-1", "example-a10g-2"]
#: `up` as these tests use it: the replicas' lifecycle alone (the router is tests/test_fleet_service.py's), a shrink
#: tearing down at once (no router to ask what is in flight, it would wait the whole drain timeout)
UP = ("up", "--no-router", "--drain-timeout", "0")


@pytest.fixture
def fleet_env(tmp_path, monkeypatch):
    """A private ledger and fake backend for one test, visible to in-process and subprocess CLI runs alike."""
    env = {
        "MELANGE_SKY_HOME": str(tmp_path / "melange-home"),
        "MELANGE_SKY_BACKEND": "fake_backend:FakeBackend",
        "MELANGE_SKY_FAKE_STATE": str(tmp_path / "fake.json"),
        "HF_TOKEN": "hf_test_token_value",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fake = FakeBackend(env["MELANGE_SKY_FAKE_STATE"])
    return fake, env


def ledger_rows(env) -> dict[str, ReplicaState]:
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        return {r.cluster: r.state for r in ledger.replicas()}


def ledger_offer(env, cluster: str) -> str:
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        return ledger.get_replica(cluster).offer


def run_cli(env, *args, **popen):
    """The real CLI in a subprocess (fake backend importable from tests/)."""
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    return subprocess.Popen([sys.executable, "-m", "melange_sky.cli", *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_up_launches_every_replica_and_records_endpoints(cli, fleet_env):
    fake, env = fleet_env
    result = cli(*UP, EXAMPLE, "-y")
    assert result.exit_code == 0, result.stderr
    assert sorted(fake.clusters()) == PLANNED
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        rows = ledger.replicas("example")
        assert {r.cluster: r.state for r in rows} == {c: ReplicaState.UP for c in PLANNED}
        assert all(r.endpoint and r.endpoint.endswith(":8000") for r in rows)
        by_cluster = {r.cluster: r for r in rows}
        assert by_cluster["example-a10g-0"].offer == "aws:us-west-2:g5.xlarge"
        assert by_cluster["example-a100-80gb-0"].offer == "azure:eastus:Standard_NC24ads_A100_v4"
        history = [e.new_state for e in ledger.history(cluster="example-a10g-0")]
    assert history == ["pending", "launching", "up"]  # intent recorded before the launch was requested
    assert "4/4 planned replicas up" in result.stdout and "$6.70/h running" in result.stdout
    assert all(c["secret_names"] == ["HF_TOKEN"] for c in fake.clusters().values())


def test_secret_value_is_passed_to_the_launcher_but_never_stored(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    files = [f for f in Path(env["MELANGE_SKY_HOME"]).rglob("*") if f.is_file()]
    assert any(b"example-a10g-0" in f.read_bytes() for f in files)  # the scan sees what the ledger wrote
    assert not [f for f in files if b"hf_test_token_value" in f.read_bytes()]


def test_missing_secret_stops_before_anything_is_launched(cli, fleet_env, monkeypatch):
    fake, env = fleet_env
    monkeypatch.delenv("HF_TOKEN")
    result = cli(*UP, EXAMPLE, "-y")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("Error: HF_TOKEN not set in the environment")
    assert '"deployment": {"secrets": []}' in result.stderr
    assert fake.calls("launch") == [] and ledger_rows(env) == {}


def test_offer_without_capacity_is_replanned_onto_other_offers(cli, fleet_env):
    fake, env = fleet_env
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-west-2", "instance_type": "g5.xlarge"}])
    result = cli(*UP, EXAMPLE, "-y", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["complete"] and report["rounds"] == 2
    assert report["unavailable_offers"] == ["aws:us-west-2:g5.xlarge"]
    up = [r for r in report["replicas"] if r["state"] == "up"]
    # The re-planned fleet still serves the load: the same GPU types in the same numbers, on offers with capacity.
    assert sorted(r["gpu"] for r in up) == ["A100-80GB", "A10G", "A10G", "A10G"]
    assert all(r["offer"] != "aws:us-west-2:g5.xlarge" for r in up)
    assert sorted(r["cluster"] for r in up) == PLANNED == sorted(fake.clusters())  # names reused, no strays
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        history = [e.new_state for e in ledger.history(cluster="example-a10g-0")]
    assert history == ["pending", "launching", "unavailable", "pending", "launching", "up"]
    assert ledger_offer(env, "example-a10g-0") == "aws:us-east-1:g5.xlarge"  # the row follows the re-plan


def test_capacity_everywhere_stops_after_max_rounds_with_a_report(cli, fleet_env):
    fake, env = fleet_env
    fake.configure(capacity_failures=[{"accelerators": "a10g"}])
    result = cli(*UP, EXAMPLE, "-y", "--max-rounds", "2")
    assert result.exit_code == 1
    assert "No capacity on:" in result.stdout and "not up" in result.stdout
    states = ledger_rows(env)
    assert states["example-a100-80gb-0"] is ReplicaState.UP
    assert ReplicaState.UNAVAILABLE in states.values()


def test_hard_launch_failure_is_reported_and_down_removes_the_rest(cli, fleet_env):
    fake, env = fleet_env
    fake.configure(hard_failures={"example-a10g-1": "disk quota exceeded"})
    result = cli(*UP, EXAMPLE, "-y")
    assert result.exit_code == 1
    assert "disk quota exceeded" in result.stdout + result.stderr and "Traceback" not in result.stderr
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        failed = ledger.get_replica("example-a10g-1")
        assert failed.state is ReplicaState.FAILED and "disk quota exceeded" in failed.last_error
        assert sum(r.state is ReplicaState.UP for r in ledger.replicas("example")) == 3
    down = cli("down", "example", "-y")
    assert down.exit_code == 0, down.stderr
    assert fake.clusters() == {}  # the failed launch's half-made cluster too
    assert ledger_rows(env) == {}


def test_rerunning_up_keeps_what_is_up_and_never_duplicates(cli, fleet_env):
    fake, env = fleet_env
    fake.configure(hard_failures={"example-a10g-2": "transient"})
    assert cli(*UP, EXAMPLE, "-y").exit_code == 1
    fake.configure(hard_failures={})
    again = cli(*UP, EXAMPLE, "-y")
    assert again.exit_code == 0, again.stderr
    assert sorted(fake.clusters()) == PLANNED
    assert {c: fake.launch_count(c) for c in PLANNED} == {c: 1 for c in PLANNED}
    third = cli(*UP, EXAMPLE, "-y")
    assert third.exit_code == 0 and len(fake.calls("launch")) == 5  # 4 + the retried one; nothing new
    assert ledger_rows(env) == {c: ReplicaState.UP for c in PLANNED}


def test_rerun_relaunches_a_replica_that_vanished(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    fake.remove_cluster("example-a10g-1")  # deleted in the cloud console
    result = cli(*UP, EXAMPLE, "-y")
    assert result.exit_code == 0, result.stderr
    assert sorted(fake.clusters()) == PLANNED and fake.launch_count("example-a10g-1") == 2


def test_status_lists_fleets_and_refresh_records_clusters_that_are_gone(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    plain = cli("status")
    assert plain.exit_code == 0 and "Fleet example: 4/4 up, $6.70/h" in plain.stdout
    fake.remove_cluster("example-a10g-0")
    refreshed = cli("status", "example", "--refresh", "--json")
    record = json.loads(refreshed.stdout)
    states = {r["cluster"]: r["state"] for r in record["fleets"][0]["replicas"]}
    assert states["example-a10g-0"] == "gone" and states["example-a10g-1"] == "up"
    assert any(c["refresh"] for c in fake.calls("status"))


def test_status_of_an_unknown_fleet_is_a_clean_error(cli, fleet_env):
    result = cli("status", "nope")
    assert result.exit_code == 2 and result.stderr.startswith("Error: no fleet 'nope'")


def test_down_twice_second_is_a_no_op(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    first = cli("down", "example", "-y")
    assert first.exit_code == 0 and "4 torn down" in first.stdout and "removed from the ledger" in first.stdout
    downs = len(fake.calls("down"))
    second = cli("down", "example", "-y")
    assert second.exit_code == 0 and "nothing to tear down" in second.stdout
    assert len(fake.calls("down")) == downs


def test_failed_teardown_keeps_the_fleet_and_the_next_down_retries(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    fake.configure(down_failures={"example-a10g-0": "API timeout"})
    first = cli("down", "example", "-y")
    assert first.exit_code == 1 and "API timeout" in first.stdout
    assert ledger_rows(env) == {"example-a10g-0": ReplicaState.FAILED, **{c: ReplicaState.GONE for c in PLANNED
                                                                          if c != "example-a10g-0"}}
    fake.configure(down_failures={})
    second = cli("down", "example", "-y")
    assert second.exit_code == 0 and ledger_rows(env) == {} and fake.clusters() == {}


def test_down_without_yes_and_without_a_terminal_refuses_instead_of_hanging(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    proc = run_cli(env, "down", "example", stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "pass -y" in err
    assert len(fake.clusters()) == 4


def test_down_all_tears_down_every_fleet(cli, fleet_env, tmp_path, example, write_config):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    assert cli(*UP, EXAMPLE, "-y", "--name", "second").exit_code == 0
    assert len(fake.clusters()) == 8
    result = cli("down", "--all", "-y")
    assert result.exit_code == 0 and fake.clusters() == {} and ledger_rows(env) == {}


def test_up_is_concurrent_and_bounded_by_parallel(cli, fleet_env):
    fake, env = fleet_env
    fake.configure(latency={"launch": 0.5})
    assert cli(*UP, EXAMPLE, "-y", "--parallel", "2").exit_code == 0
    assert fake.max_concurrency() == 2
    assert cli("down", "example", "-y").exit_code == 0
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    assert fake.max_concurrency() == 4


def test_launch_options_reach_the_backend(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y", "--retry-until-up", "-i", "30", "--down").exit_code == 0
    record = fake.clusters()["example-a10g-0"]
    assert record["retry_until_up"] and record["down"] and record["idle_minutes_to_autostop"] == 30


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_mid_launch_leaves_every_replica_in_the_ledger_and_up_resumes(cli, fleet_env, stop):
    fake, env = fleet_env
    fake.configure(latency={"launch": 30.0})
    proc = run_cli(env, *UP, EXAMPLE, "-y", "--parallel", "2")
    wait_for(lambda: len(fake.clusters()) == 2, what="two launches in flight")
    proc.send_signal(stop)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Interrupted" in out and "Traceback" not in err
    states = ledger_rows(env)
    assert sorted(states) == PLANNED  # no replica missing
    assert sorted(s.value for s in states.values()) == ["failed", "failed", "pending", "pending"]
    fake.configure(latency={"launch": 0.0})
    resumed = cli(*UP, EXAMPLE, "-y")  # in this process: only the interrupted run's signals need a process of its own
    assert resumed.exit_code == 0, resumed.stderr
    assert ledger_rows(env) == {c: ReplicaState.UP for c in PLANNED} and sorted(fake.clusters()) == PLANNED


def test_a_ctrl_c_landing_inside_the_launch_wait_is_taken_at_a_safe_point(fleet_env, tmp_path):
    # A KeyboardInterrupt raised inside concurrent.futures.wait (while it holds the futures' locks) could leave a
    # lock held, so no launch could ever finish and `up` would hang after Ctrl-C. While launches run, a Ctrl-C only
    # sets a flag that the wait loop checks. Here the signal is delivered inside the wait itself.
    fake, env = fleet_env
    fake.configure(latency={"launch": 30.0})
    probe = tmp_path / "raised-inside-wait"
    code = f"""
import os, signal, sys, time
import melange_sky.fleet.fleet as fleet_module
real_wait = fleet_module.wait
def wait(*args, **kwargs):
    fleet_module.wait = real_wait
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    except KeyboardInterrupt:
        open({str(probe)!r}, "w").close()
        raise
    return real_wait(*args, **kwargs)
fleet_module.wait = wait
sys.argv = ["melange-sky", "up", "--no-router", "--drain-timeout", "0", {EXAMPLE!r}, "-y", "--parallel", "2"]
from melange_sky.__main__ import run
run()
"""
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert not probe.exists() and "Traceback" not in done.stderr
    assert sorted(ledger_rows(env)) == PLANNED


def test_a_second_concurrent_up_on_the_same_fleet_is_refused(cli, fleet_env, tmp_path):
    fake, env = fleet_env
    release = tmp_path / "release-launch"
    fake.configure(holds={"launch": release})  # the first up's first launch waits until the second up is done
    first = run_cli(env, *UP, EXAMPLE, "-y")
    wait_for(lambda: bool(fake.held("launch")) or first.poll() is not None, what="the first up to be launching")
    second = cli(*UP, EXAMPLE, "-y")  # in this process, while the first one launches
    release.touch()
    assert second.exit_code == 3 and "is busy" in second.stderr and str(first.pid) in second.stderr
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert {c: fake.launch_count(c) for c in PLANNED} == {c: 1 for c in PLANNED}


def test_dryrun_validates_and_launches_nothing(cli, fleet_env):
    fake, env = fleet_env
    result = cli(*UP, EXAMPLE, "--dryrun")
    assert result.exit_code == 0, result.stderr
    assert "would launch 4 replica(s)" in result.stdout and "sky check" in result.stdout
    assert fake.calls("launch") == [] and len(fake.calls("validate")) == 2  # one per distinct offer
    assert not Path(env["MELANGE_SKY_HOME"], "ledger.db").exists() or ledger_rows(env) == {}


def test_unknown_backend_is_a_one_line_error(cli, fleet_env):
    result = cli(*UP, EXAMPLE, "-y", "--backend", "nosuch")
    assert result.exit_code == 2 and result.stderr.startswith("Error: unknown backend 'nosuch'")


def test_rerun_in_per_offer_mode_keeps_the_replicas_already_up(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    again = cli(*UP, EXAMPLE, "-y", "--per-offer")
    assert again.exit_code == 0, again.stderr
    assert sorted(fake.clusters()) == PLANNED and len(fake.calls("launch")) == 4
    assert "Nothing to launch" in again.stdout


def test_what_up_shows_is_what_it_launches_on_an_existing_fleet(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    bigger = cli(*UP, EXAMPLE, "-y", "--rate", "60", "--no-shrink")
    assert bigger.exit_code == 0, bigger.stderr
    shown = int(bigger.stdout.split("To launch: ")[1].split(" ")[0])
    assert shown == len(fake.calls("launch")) - 4 > 0
    assert "Already up and kept: 4 replica(s)" in bigger.stdout
    assert "config or plan settings changed" in bigger.stdout


def test_up_on_a_complete_fleet_asks_nothing_even_without_a_terminal(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    proc = run_cli(env, *UP, EXAMPLE, stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Nothing to launch" in out and len(fake.calls("launch")) == 4


def test_a_smaller_plan_keeps_surplus_replicas_and_says_so(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    smaller = cli(*UP, EXAMPLE, "-y", "--rate", "10", "--no-shrink")
    assert smaller.exit_code == 0, smaller.stderr
    assert "the load alone needs $3.67/h (1 replica(s))" in smaller.stdout and len(fake.clusters()) == 4


def test_stopped_clusters_are_recorded_and_relaunched_by_up(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    fake.add_cluster("example-a10g-0", status="stopped")  # autostopped
    fake.add_cluster("example-a10g-1", status="init")  # unhealthy
    status = json.loads(cli("status", "example", "--refresh", "--json").stdout)
    states = {r["cluster"]: r["state"] for r in status["fleets"][0]["replicas"]}
    assert states["example-a10g-0"] == "stopped" and states["example-a10g-1"] == "failed"
    again = cli(*UP, EXAMPLE, "-y")
    assert again.exit_code == 0, again.stderr
    assert ledger_rows(env) == {c: ReplicaState.UP for c in PLANNED}
    assert fake.launch_count("example-a10g-0") == 2 and fake.launch_count("example-a10g-1") == 2


def test_fleet_names_that_share_cluster_names_are_refused(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    clash = cli(*UP, EXAMPLE, "-y", "--name", "Example")
    assert clash.exit_code == 1 and "already belongs to fleet 'example'" in clash.stderr
    assert len(fake.calls("launch")) == 4


def test_a_failed_replica_left_out_of_the_replan_is_torn_down(cli, fleet_env):
    fake, env = fleet_env
    fake.configure(capacity_failures=[{"cloud": "aws", "region": "us-west-2", "times": 2}],
                   hard_failures={"example-a10g-2": "boom"})
    result = cli(*UP, EXAMPLE, "-y", "--json")
    report = json.loads(result.stdout)
    states = {r["cluster"]: r["state"] for r in report["replicas"]}
    assert states["example-a10g-2"] == "gone"  # not left billing in INIT
    assert "example-a10g-2" not in fake.clusters()
    assert result.exit_code == 0 and report["complete"]
    assert sum(s == "up" for s in states.values()) == 4


def test_down_json_is_json_even_when_there_is_nothing_to_do(cli, fleet_env):
    result = cli("down", "nosuch", "-y", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["fleet"] == "nosuch"
    result = cli("down", "--all", "-y", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_long_launches_report_their_elapsed_time_once_per_heartbeat(fleet_env):
    import functools

    from melange_sky.core.config import load_config
    from melange_sky.fleet.fleet import Fleet
    from melange_sky.deploy.plan import PlanSettings, build_plan

    fake, env = fleet_env
    fake.configure(latency={"launch": 1.3})
    events = []
    fleet = Fleet(fake, Ledger(env["MELANGE_SKY_HOME"]), on_event=events.append, heartbeat=0.5)
    planner = functools.partial(build_plan, load_config(EXAMPLE), PlanSettings(compare=False))
    assert fleet.up("example", planner, {"HF_TOKEN": "x"}, "digest", __import__("melange_sky").UpOptions(
        parallel=4)).complete
    for cluster in PLANNED:  # each in flight 1.3 s, a beat every 0.5 s: one to three lines, with the time so far
        beats = [e for e in events if e.cluster == cluster and e.message == "still launching"]
        assert 1 <= len(beats) <= 3, (cluster, [round(b.elapsed, 2) for b in beats])
        assert all(0 < b.elapsed < 1.3 + 0.5 for b in beats)


def test_a_replacement_on_another_offer_is_priced_from_the_catalog_not_the_configs_cost(cli, fleet_env):
    from melange_sky.deploy.catalog import Catalog

    fake, env = fleet_env
    fake.configure(capacity_failures=[{"cloud": "azure", "region": "eastus"}])
    report = json.loads(cli(*UP, EXAMPLE, "-y", "--json").stdout)
    [a100] = [r for r in report["replicas"] if r["gpu"] == "A100-80GB" and r["state"] == "up"]
    assert a100["offer"] != "azure:eastus:Standard_NC24ads_A100_v4"
    cloud, region, instance_type = a100["offer"].split(":")
    [offer] = [o for o in Catalog(skypilot_dir=None).offers("A100-80GB")
               if (o.cloud, o.region, o.instance_type) == (cloud, region, instance_type)]
    assert a100["price_per_hour"] == pytest.approx(offer.price)  # the config's $3.67 is for azure eastus only


def test_leftover_failed_replicas_are_torn_down_only_after_confirmation(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y", "--rate", "60").exit_code == 0
    fake.configure(hard_failures={"example-a10g-9": "boom"})
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:  # a failed replica outside any plan, its cluster left in INIT
        ledger.add_replica("example", __import__("melange_sky.fleet.ledger", fromlist=["NewReplica"]).NewReplica(
            cluster="example-a10g-9", gpu="A10G", offer="aws:us-west-2:g5.xlarge", price_per_hour=1.01))
        ledger.transition("example-a10g-9", ReplicaState.FAILED, error="boom")
    fake.add_cluster("example-a10g-9", status="init")
    # no -y, no terminal: refuses, removes nothing
    proc = run_cli(env, *UP, EXAMPLE, "--rate", "60", stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "tear down 1" in err and "example-a10g-9" in out
    assert "example-a10g-9" in fake.clusters()
    assert cli(*UP, EXAMPLE, "-y", "--rate", "60").exit_code == 0
    assert "example-a10g-9" not in fake.clusters() and ledger_rows(env)["example-a10g-9"] is ReplicaState.GONE


def test_stopped_replicas_outside_the_plan_are_kept(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y", "--rate", "60").exit_code == 0
    extra = sorted(fake.clusters())[-1]
    fake.add_cluster(extra, status="stopped")
    assert cli("status", "--refresh").exit_code == 0
    assert cli(*UP, EXAMPLE, "-y", "--rate", "10").exit_code == 0
    assert extra in fake.clusters() and not [c for c in fake.calls("down") if c["cluster"] == extra]


def test_up_json_refuses_to_launch_without_yes(cli, fleet_env):
    fake, env = fleet_env
    result = cli(*UP, EXAMPLE, "--json")
    assert result.exit_code == 2 and "pass -y" in result.stderr and result.stdout == ""
    assert fake.calls("launch") == []


def test_status_refresh_never_blocks_up_or_down(cli, fleet_env, tmp_path):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    release = tmp_path / "release-status"
    fake.configure(holds={"status": release})  # status --refresh's backend call waits until down is done
    watcher = run_cli(env, "status", "--refresh")
    wait_for(lambda: bool(fake.held("status")) or watcher.poll() is not None,
             what="status to be asking the backend")
    down = run_cli(env, "down", "example", "-y")
    out, err = down.communicate(timeout=60)
    assert fake.held("status"), "status --refresh was no longer waiting on the backend"
    release.touch()
    assert down.returncode == 0, err
    watcher.communicate(timeout=60)
    assert watcher.returncode == 0 and fake.clusters() == {}


def test_a_replica_found_up_by_a_refresh_gets_its_endpoint_from_the_backend(cli, fleet_env):
    fake, env = fleet_env
    fake.configure(hard_failures={"example-a10g-0": "flaky"})
    assert cli(*UP, EXAMPLE, "-y").exit_code == 1
    fake.add_cluster("example-a10g-0", status="up")  # it came up after all (the fake then knows no head ip)
    with fake._state() as state:
        state["clusters"]["example-a10g-0"]["head_ip"] = "10.9.9.9"
    record = json.loads(cli("status", "example", "--refresh", "--json").stdout)
    row = {r["cluster"]: r for r in record["fleets"][0]["replicas"]}["example-a10g-0"]
    assert row["state"] == "up" and row["endpoint"] == "10.9.9.9:8000"


def test_status_counts_a_dead_replica_against_the_plan_and_shows_it_until_it_is_replaced(cli, fleet_env):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    fake.remove_cluster("example-a10g-1")  # died: the refresh records it gone, nothing replaces it yet
    text = cli("status", "example", "--refresh")
    assert text.exit_code == 0, text.stderr
    assert text.stdout.startswith("Fleet example: 3/4 up, $5.69/h serving")
    assert "1 planned replica(s) not running, not yet replaced: example-a10g-1" in text.stdout
    [dead] = [line for line in text.stdout.splitlines() if "example-a10g-1" in line and "aws" in line]
    assert dead.split()[:2] == ["⨯", "example-a10g-1"] and " gone " in dead
    assert "not shown" not in text.stdout  # it is neither replaced nor torn down
    [fleet] = json.loads(cli("status", "example", "--json").stdout)["fleets"]
    assert fleet["replicas_count"] == {"up": 3, "planned": 4, "up_outside_plan": 0,
                                       "gone_to_replace": ["example-a10g-1"], "not_launched": [], "gone_replaced": 0}
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0  # replaced under its name: counted up again
    assert cli("status", "example").stdout.startswith("Fleet example: 4/4 up")


def test_status_counts_the_plan_after_an_interrupted_up_and_hides_only_replicas_truly_replaced():
    from melange_sky.fleet.ledger import ReplicaRecord
    from melange_sky.fleet.reports import fleet_counts

    def row(cluster: str, state: ReplicaState) -> ReplicaRecord:
        return ReplicaRecord(cluster, "f", "A10G", "o", None, None, None, False, 1.0, 0, None, state, None, None,
                             0.0, 0.0)

    plan = {"replicas": [{"cluster": f"f-a10g-{i}"} for i in range(4)]}
    interrupted = fleet_counts(plan, [row("f-a10g-0", ReplicaState.FAILED), row("f-a10g-1", ReplicaState.PENDING)])
    assert (interrupted.up, interrupted.planned, interrupted.not_launched) == (0, 4, ["f-a10g-2", "f-a10g-3"])
    replaced = fleet_counts(plan, [*(row(f"f-a10g-{i}", ReplicaState.UP) for i in range(4)),
                                   row("f-a10g-9", ReplicaState.GONE), row("f-a10g-8", ReplicaState.UP)])
    assert (replaced.up, replaced.planned, replaced.up_outside_plan, replaced.gone_replaced) == (4, 4, 1, 1)
    assert replaced.gone_to_replace == []


def test_a_fleet_keeps_its_launcher_a_rerun_up_on_another_is_refused_and_down_uses_its_own(cli, fleet_env,
                                                                                            monkeypatch):
    fake, env = fleet_env
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    other = cli(*UP, EXAMPLE, "-y", "--backend", "local")
    assert other.exit_code == 2 and other.stderr.startswith("Error: fleet 'example' was brought up with the "
                                                            "launcher 'fake', not 'local'")
    monkeypatch.delenv("MELANGE_SKY_BACKEND")  # no launcher named at all: the fleet's own, not SkyPilot
    again = cli(*UP, EXAMPLE, "-y")
    assert again.exit_code == 0 and "Nothing to launch" in again.stdout and len(fake.calls("launch")) == 4
    assert cli("down", "example", "-y").exit_code == 0 and fake.clusters() == {}
