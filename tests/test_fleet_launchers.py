"""A fleet is driven through the launcher it was brought up with (the ledger records it): `status --refresh`,
`down` and `watch` without --backend use it, and another one named by --backend or MELANGE_SKY_BACKEND is refused
before it can take the fleet's running clusters for gone. Real processes on the local launcher, one emulated
replica at high speed, in-process CLI runs."""
from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest

from fake_backend import FakeBackend
from melange_sky.errors import LauncherMismatch
from melange_sky.fleet.fleet import Fleet
from melange_sky.fleet.launchers import fleet_launcher, launcher_record
from melange_sky.fleet.ledger import Ledger, NewReplica, ReplicaState
from melange_sky.fleet.local import LocalBackend, ProcessId, running

FLEET = "solo"
REPLICA = f"{FLEET}-a10g-0"


@pytest.fixture
def solo(tmp_path, monkeypatch, example, write_config):
    """A fresh MELANGE_SKY_HOME, no launcher in the environment (the default would be SkyPilot, which must never
    be loaded here: it would start its API server), and a config of one A10G at 20x speed."""
    home = tmp_path / "home"
    monkeypatch.setenv("MELANGE_SKY_HOME", str(home))
    for name in ("MELANGE_SKY_BACKEND", "MELANGE_SKY_API_KEY", "MELANGE_SKY_LOCAL_SPEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MELANGE_SKY_FAKE_STATE", str(tmp_path / "fake.json"))  # the launcher --backend names

    def no_skypilot(self):
        raise AssertionError("the SkyPilot launcher was loaded for a fleet brought up on the local launcher")

    monkeypatch.setattr("melange_sky.fleet.skypilot.SkyPilotBackend.__init__", no_skypilot)
    example.update(name=FLEET, total_request_rate=1, deployment={"local": {"speed": 20}})
    example["gpu_info"] = {"A10G": {**example["gpu_info"]["A10G"], "min_count": 1, "max_count": 1}}
    yield write_config(example, "solo.json"), home
    for record in LocalBackend(home / "local").records().values():  # whatever a failed test left
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(record["pid"]), signal.SIGKILL)


def test_a_local_fleet_is_refreshed_and_torn_down_by_its_own_launcher_without_the_flag(cli, solo, monkeypatch):
    config, home = solo
    up = cli("up", config, "-y", "--no-router", "--backend", "local")
    assert up.exit_code == 0, up.stderr + up.stdout
    [record] = LocalBackend(home / "local").records().values()
    process = ProcessId(int(record["pid"]), int(record["started"]))
    with Ledger(home) as ledger:
        assert ledger.get_fleet(FLEET).launcher == {"name": "local", "class": "melange_sky.fleet.local:LocalBackend",
                                                    "dir": str((home / "local").absolute())}

    status = cli("status", FLEET, "--refresh", "--json")  # no --backend, no MELANGE_SKY_BACKEND: its own
    assert status.exit_code == 0, status.stderr
    [fleet] = json.loads(status.stdout)["fleets"]
    assert [(r["cluster"], r["state"]) for r in fleet["replicas"]] == [(REPLICA, "up")]

    for args, env in (((FLEET, "--refresh", "--backend", "fake_backend:FakeBackend"), None),
                      ((FLEET, "--refresh"), "fake_backend:FakeBackend")):
        if env:
            monkeypatch.setenv("MELANGE_SKY_BACKEND", env)
        refused = cli("status", *args)
        assert refused.exit_code == 2, refused.stderr
        assert refused.stderr.startswith(f"Error: fleet '{FLEET}' was brought up with the launcher 'local' (state in ")
        assert "not 'fake_backend:FakeBackend'" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        refused = cli("down", FLEET, "-y", *args[2:])
        assert refused.exit_code == 2 and "brought up with the launcher 'local'" in refused.stderr
        monkeypatch.delenv("MELANGE_SKY_BACKEND", raising=False)
    assert running(process)
    with Ledger(home) as ledger:
        assert ledger.get_replica(REPLICA).state is ReplicaState.UP

    down = cli("down", FLEET, "-y")
    assert down.exit_code == 0, down.stderr + down.stdout
    assert "1 torn down, 0 already gone" in down.stdout and "removed from the ledger" in down.stdout
    assert not running(process)
    assert LocalBackend(home / "local").records() == {} and LocalBackend(home / "local").leftovers() == {}


def test_a_library_fleet_on_another_launcher_never_marks_the_clusters_gone(tmp_path):
    local = LocalBackend(tmp_path / "local")
    fake = FakeBackend(tmp_path / "fake.json")
    with Ledger(tmp_path / "home") as ledger:
        ledger.save_fleet("f", "h", {}, launcher=launcher_record(local))
        ledger.add_replica("f", NewReplica(cluster="f-a10g-0", gpu="A10G", offer="local", price_per_hour=1.0))
        ledger.transition("f-a10g-0", ReplicaState.UP, endpoint="127.0.0.1:1")
        other = Fleet(fake, ledger)
        with pytest.raises(LauncherMismatch, match="brought up with the launcher 'local'"):
            other.status("f", refresh=True)
        with pytest.raises(LauncherMismatch):
            other.down("f")
        assert ledger.get_replica("f-a10g-0").state is ReplicaState.UP and ledger.get_fleet("f") is not None
        assert fake.calls() == []
        # a local launcher on another state directory is another launcher too
        with pytest.raises(LauncherMismatch):
            Fleet(LocalBackend(tmp_path / "elsewhere"), ledger).status("f", refresh=True)
        # `--backend local` names the fleet's own kind of launcher: it gets its recorded state directory
        chosen = fleet_launcher(ledger.get_fleet("f"), "local")
        assert isinstance(chosen, LocalBackend) and chosen.dir == (tmp_path / "local").absolute()
