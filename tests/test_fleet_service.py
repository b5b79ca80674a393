"""The fleet as one service, against the FakeBackend: `up` launches the router with the fleet's keys (kept in a 0600
file, nowhere else), `up` reconciles with the clouds' refreshed state, a cheaper re-plan shrinks make-before-break
(the preview says what goes and what it saves), `--no-shrink` keeps today's behaviour, `down` removes the router and
the keys. Membership pushes to a real router are in tests/test_fleet_e2e.py (real processes)."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from melange_sky.fleet.ledger import Ledger, ReplicaState
from test_fleet_cli import EXAMPLE, PLANNED
from test_fleet_cli import fleet_env  # noqa: F401 - a fixture: the one service_env extends

ROUTER = "example-router"


@pytest.fixture
def service_env(fleet_env, tmp_path, monkeypatch):  # noqa: F811 - the imported fixture, as an argument
    """test_fleet_cli's private ledger and fake launcher, no client key in the environment, and env["CONFIG"]: the
    example with bucket edges (a router can only route a config that has them, or Mélange's default 8x6)."""
    fake, env = fleet_env
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    config = json.loads(Path(EXAMPLE).read_text())
    config.update(input_buckets=[1, 100, 4000], output_buckets=[1, 100, 2000])
    (tmp_path / "conf").mkdir()
    routed = tmp_path / "conf" / "example.json"
    routed.write_text(json.dumps(config))
    return fake, {**env, "CONFIG": str(routed)}


def rows(env, roles=None) -> dict[str, ReplicaState]:
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        return {r.cluster: r.state for r in ledger.replicas(roles=roles)}


def test_up_launches_the_router_beside_the_replicas_with_the_fleets_keys_as_secrets(cli, service_env):
    fake, env = service_env
    result = cli("up", env["CONFIG"], "-y")
    assert result.exit_code == 0, result.stderr
    assert sorted(fake.clusters()) == sorted([*PLANNED, ROUTER])
    router = fake.clusters()[ROUTER]
    assert sorted(router["secret_names"]) == ["MELANGE_SKY_ADMIN_TOKEN", "MELANGE_SKY_API_KEY"]
    assert router["idle_minutes_to_autostop"] is None  # the endpoint is never idle-stopped with the replicas
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        assert [r.cluster for r in ledger.replicas("example")] == sorted(PLANNED)  # routed to: replicas only
        row = ledger.router("example")
        assert row is not None and row.state is ReplicaState.UP and row.endpoint.endswith(":8080")
    status = json.loads(cli("status", "example", "--json").stdout)
    [fleet] = status["fleets"]
    assert fleet["endpoint"] == f"http://{row.endpoint}" and fleet["router"]["cluster"] == ROUTER


def test_the_fleets_keys_live_only_in_a_0600_file_never_in_the_ledger_or_the_output(cli, service_env):
    fake, env = service_env
    result = cli("up", env["CONFIG"], "-y")
    assert result.exit_code == 0, result.stderr
    key_file = Path(env["MELANGE_SKY_HOME"], "keys", "example.json")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    keys = json.loads(key_file.read_text())
    secrets = [keys["admin_token"].encode(), keys["api_key"].encode()]
    assert all(len(s) >= 32 for s in secrets)
    others = [f for f in Path(env["MELANGE_SKY_HOME"]).rglob("*") if f.is_file() and f != key_file]
    assert others and not [f for f in others for s in secrets if s in f.read_bytes()]
    assert not [s for s in secrets if s.decode() in result.stdout + result.stderr]
    again = cli("up", env["CONFIG"], "-y")  # the admin token stays while the fleet lives
    assert again.exit_code == 0 and json.loads(key_file.read_text())["admin_token"] == keys["admin_token"]


def test_the_users_client_key_is_the_routers_when_it_is_set(cli, service_env, monkeypatch):
    fake, env = service_env
    monkeypatch.setenv("MELANGE_SKY_API_KEY", "users-own-key-0123456789")
    assert cli("up", env["CONFIG"], "-y").exit_code == 0
    keys = json.loads(Path(env["MELANGE_SKY_HOME"], "keys", "example.json").read_text())
    assert keys["api_key"] == "users-own-key-0123456789" and keys["api_key_generated"] is False


def test_no_router_launches_none_and_status_shows_no_endpoint(cli, service_env):
    fake, env = service_env
    assert cli("up", "--no-router", env["CONFIG"], "-y").exit_code == 0
    assert ROUTER not in fake.clusters()
    [fleet] = json.loads(cli("status", "--json").stdout)["fleets"]
    assert fleet["endpoint"] is None and fleet["router"] is None


def test_down_removes_the_router_and_forgets_the_keys(cli, service_env):
    fake, env = service_env
    assert cli("up", env["CONFIG"], "-y").exit_code == 0
    result = cli("down", "example", "-y")
    assert result.exit_code == 0, result.stderr
    assert fake.clusters() == {}
    assert not Path(env["MELANGE_SKY_HOME"], "keys", "example.json").exists()
    assert rows(env) == {}


def test_the_router_is_relaunched_when_the_cloud_lost_it(cli, service_env):
    fake, env = service_env
    assert cli("up", env["CONFIG"], "-y").exit_code == 0
    fake.remove_cluster(ROUTER)  # preempted, or deleted in the console
    result = cli("up", env["CONFIG"], "-y")
    assert result.exit_code == 0, result.stderr
    assert ROUTER in fake.clusters() and rows(env)[ROUTER] is ReplicaState.UP


def test_up_reconciles_with_the_clouds_refreshed_state_not_the_launchers_cache(cli, service_env):
    fake, env = service_env
    assert cli("up", "--no-router", env["CONFIG"], "-y").exit_code == 0
    fake.remove_cluster("example-a10g-1", cached_until_refresh=True)  # the cache still says up
    result = cli("up", "--no-router", env["CONFIG"], "-y")
    assert result.exit_code == 0, result.stderr
    launched = [c["cluster"] for c in fake.calls("launch")]
    assert launched.count("example-a10g-1") == 2 and len(launched) == 5
    assert rows(env)["example-a10g-1"] is ReplicaState.UP


def test_a_lower_rate_shrinks_after_saying_what_goes_and_what_it_saves(cli, service_env):
    fake, env = service_env
    assert cli("up", "--no-router", env["CONFIG"], "-y", "--rate", "30").exit_code == 0
    big = set(fake.clusters())
    preview = cli("up", "--no-router", env["CONFIG"], "--rate", "6", "--dryrun", "--json")
    assert preview.exit_code == 0, preview.stderr
    dry = json.loads(preview.stdout)
    assert dry["drain"] and dry["drain_saving"] > 0 and dry["launch"] == []
    result = cli("up", "--no-router", env["CONFIG"], "-y", "--rate", "6", "--drain-timeout", "0", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["drained"]) == sorted(dry["drain"])  # the preview said exactly what then happened
    assert set(fake.clusters()) == big - set(dry["drain"])
    states = rows(env)
    assert all(states[c] is ReplicaState.GONE for c in dry["drain"])
    assert round(report["cost_up"], 6) == round(report["cost_planned"], 6)
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        history = [(e.new_state, e.message) for e in ledger.history(cluster=dry["drain"][0])]
    assert ("terminating", "draining: left the router") in history and history[-1][0] == "gone"


def test_no_shrink_keeps_the_replicas_up_and_only_reports_them(cli, service_env):
    fake, env = service_env
    assert cli("up", "--no-router", env["CONFIG"], "-y", "--rate", "30").exit_code == 0
    big = set(fake.clusters())
    result = cli("up", "--no-router", env["CONFIG"], "-y", "--rate", "6", "--no-shrink", "--json")
    assert result.exit_code == 0, result.stderr
    assert set(fake.clusters()) == big and json.loads(result.stdout)["drained"] == []


def test_the_same_rate_again_changes_nothing(cli, service_env):
    fake, env = service_env
    assert cli("up", "--no-router", env["CONFIG"], "-y").exit_code == 0
    again = cli("up", "--no-router", env["CONFIG"], "-y", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["drained"] == []
    assert len(fake.calls("launch")) == 4


def test_dryrun_validates_the_routers_task_too(cli, service_env):
    fake, env = service_env
    result = cli("up", env["CONFIG"], "--dryrun", "--json")
    assert result.exit_code == 0, result.stderr
    dry = json.loads(result.stdout)
    assert dry["router"]["cluster"] == ROUTER and ROUTER in dry["validation"]
    assert fake.calls("launch") == []


def test_cost_to_date_counts_the_time_a_cluster_billed_and_uptime_its_current_stretch():
    from melange_sky.fleet.ledger import Event, ReplicaRecord
    from melange_sky.fleet.reports import usage

    row = ReplicaRecord("f-a10g-0", "f", "A10G", "aws", "aws", None, None, False, 3.6, 1, None, ReplicaState.UP,
                        None, None, 0.0, 0.0)

    def event(i: int, state: str, at: float) -> Event:
        return Event(i, "f", "f-a10g-0", None, state, "", at)

    events = [event(1, "pending", 1000), event(2, "launching", 1010), event(3, "up", 1100),
              event(4, "failed", 1500), event(5, "pending", 1600), event(6, "launching", 1700),
              event(7, "up", 1800)]
    spent = usage(row, events, now=2800)
    # billed: launching 90 s + up 400 s (failed: not claimed) + launching 100 s + up 1,000 s
    assert spent.billed_seconds == 1590 and spent.uptime_seconds == 1000
    assert spent.cost_to_date == pytest.approx(1590 / 3600 * 3.6)
    assert usage(row, events, now=2800, since=1650).billed_seconds == 1100  # an earlier fleet of that name


def test_status_of_a_fleet_whose_replicas_all_failed_claims_no_serving_cost(cli, service_env):
    fake, env = service_env
    fake.configure(hard_failures={c: "boom" for c in PLANNED})
    assert cli("up", "--no-router", env["CONFIG"], "-y").exit_code == 1
    status = cli("status", "example")
    assert "0/4 up, $0.00/h serving" in status.stdout and "may still bill" in status.stdout
    [fleet] = json.loads(cli("status", "example", "--json").stdout)["fleets"]
    assert fleet["cost_serving"] == 0 and fleet["cost_planned"] == pytest.approx(6.70)


def test_a_config_the_router_cannot_route_gets_no_router_and_says_why(cli, service_env, example, write_config):
    fake, env = service_env
    example.pop("input_buckets", None)  # the original Mélange example: a 2x2 histogram without bucket edges
    example.pop("output_buckets", None)
    result = cli("up", write_config(example, "example.json"), "-y")  # fleet "example"
    assert result.exit_code == 0, result.stderr
    assert ROUTER not in fake.clusters() and "no router is launched" in result.stdout
    assert "input_buckets/output_buckets" in result.stdout


def test_another_client_key_than_the_routers_is_refused_not_silently_split(cli, service_env, monkeypatch):
    fake, env = service_env
    monkeypatch.setenv("MELANGE_SKY_API_KEY", "first-key-0123456789")
    assert cli("up", env["CONFIG"], "-y").exit_code == 0
    monkeypatch.setenv("MELANGE_SKY_API_KEY", "second-key-0123456789")
    result = cli("up", env["CONFIG"], "-y")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "is not the client key fleet example's router was launched with" in result.stderr
    assert "second-key" not in result.stderr and "first-key" not in result.stderr
    monkeypatch.delenv("MELANGE_SKY_API_KEY")  # unset: the fleet's own key
    assert cli("up", env["CONFIG"], "-y").exit_code == 0
