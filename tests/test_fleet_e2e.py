"""The fleet as one service, end to end with real processes (issue 10, "What it must show").

Through the real CLI in subprocesses, on the local-process launcher (tests/process_backend.py: every GPU replica a
fake OpenAI server, the router the real `melange-sky serve --pushed` from templates/router.j2), with a continuous
open-loop client load (tests/e2e_load.py) through the fleet's one endpoint from the moment `up` returns until
`down`:

1. `up --rate LOW` brings up the replicas and the router; requests through the endpoint `status --json` shows
   succeed (at START, twice LOW), every replica serves some.
2. A replica is killed out of band (a preemption), with requests in flight on it; the controller's single pass
   (`watch FLEET --once`) relaunches it: a new process, up in the ledger, back in the router's routes, serving.
3. The load rises; once the router observes it, `watch FLEET --once --autoscale` grows the fleet (a --max-cost below
   the new plan's cost first: reported, nothing launched). The router has no complete minute within a test, so the
   need is its /workload mean since it started, as `watch` says; the load stays high until that mean is.
4. The load falls, and `up --rate LOW` shrinks make-before-break: the replicas no longer needed (those its dry run
   names) leave the router, drain (each is torn down with nothing in flight: they were made slow so requests are in
   flight on them when the shrink starts, and those requests succeed), and are removed.
5. `down` leaves no process running and no fleet in the ledger.

After every step the router's membership (`GET /admin/routes` with the admin token from the fleet's key file) is the
ledger's up replicas. At the end: no client request failed, except streams that were in flight on the killed
replica when it died (matched by the replica that served them and their start/end around the kill); the admin token
and the API key appear in no file under $MELANGE_SKY_HOME but the key file, in no CLI output and in no file the
launcher wrote (logs, state, hosts).

Waits poll with deadlines; nothing asserts on durations. The fixture kills every process the launcher ever started.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port

from e2e_load import Load, Outcome
from melange_sky.fleet.ledger import Ledger, ReplicaState
from process_backend import ProcessBackend

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CONFIG = TESTS / "data" / "e2e_fleet.json"
FLEET = "e2e"
LOW, HIGH = 4.0, 16.0  # req/s: LOW is 1 L4 + 1 A10G ($1.81/h)
#: req/s of the client load from `up` until it rises: the fleet is planned for LOW, the load runs at twice that, so
#: the L4's small share reaches a few requests soon and the router's mean since it started is near NEED before the
#: rise (HIGH then takes it past NEED in a second or two, not in ~0.7x the time spent so far). Nothing is sized on it.
START = 8.0
NEED = 9.0  # req/s observed before autoscaling: 3 or 4 replicas ($2.8-4.0/h) whatever the observed bucket shares
HF_SECRET = "hf_e2e_secret_value_5d1c"
CLI_TIMEOUT_S = 120
WAIT_S = 45.0  # the deadline of any one wait (generous: the machine is shared)



@dataclass
class Fleet:
    """The test's handle on one fleet: the CLI with its environment, the launcher, and what every command said."""

    tmp: Path
    pb: ProcessBackend
    config: Path
    home: Path
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    def cli(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "melange_sky", *args], env=self.env, cwd=self.tmp,
                              capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        self.outputs += [done.stdout, done.stderr]
        assert done.returncode == expect, (f"melange-sky {' '.join(args)} exited {done.returncode}:\n"
                                      f"{done.stdout}\n{done.stderr}")
        return done

    def keys(self) -> dict:
        return json.loads((self.home / "keys" / f"{FLEET}.json").read_text())

    def endpoint(self) -> str:
        fleets = json.loads(self.cli("status", "--json").stdout)["fleets"]
        return next(f["endpoint"] for f in fleets if f["name"] == FLEET)

    def ledger_up(self) -> dict[str, str]:
        """The replicas the ledger has up, by cluster: their base URL."""
        with Ledger(self.home) as ledger:
            rows = ledger.replicas(FLEET)
        return {r.cluster: f"http://{r.endpoint}" for r in rows if r.state is ReplicaState.UP}

    def fleet_in_ledger(self) -> bool:
        with Ledger(self.home) as ledger:
            return ledger.get_fleet(FLEET) is not None

    def router_members(self, url: str) -> dict[str, str]:
        request = urllib.request.Request(f"{url}/admin/routes",
                                         headers={"Authorization": f"Bearer {self.keys()['admin_token']}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            doc = json.loads(answer.read())
        return {r["name"]: r["url"] for r in doc["routes"]["replicas"]}

    def check_membership(self, url: str, step: str) -> dict[str, str]:
        """The router routes to exactly the ledger's up replicas, each a live process of the launcher."""
        up = self.ledger_up()
        assert self.router_members(url) == up, f"after {step}: the router's membership is not the ledger's"
        live = self.pb.live_processes()
        assert set(up) | {f"{FLEET}-router"} == set(live), f"after {step}: running processes {sorted(live)}"
        return up

    def secrets_in_sight(self, secrets: list[str]) -> list[str]:
        """Where any of `secrets` shows: files under $MELANGE_SKY_HOME but the key file, files the launcher wrote
        (its state, logs and hosts), and every CLI output so far."""
        found = []
        key_file = self.home / "keys" / f"{FLEET}.json"
        files = [p for root in (self.home, self.pb.dir) for p in root.rglob("*") if p.is_file() and p != key_file]
        for path in files:
            data = path.read_bytes()
            found += [f"{path} holds {s[:4]}..." for s in secrets if s.encode() in data]
        for n, text in enumerate(self.outputs):
            found += [f"CLI output #{n} holds {s[:4]}..." for s in secrets if s in text]
        return found


@pytest.fixture
def fleet(tmp_path):
    pb = ProcessBackend(tmp_path / "pb")
    config = json.loads(CONFIG.read_text())
    config["deployment"]["router"]["port"] = free_port()
    path = tmp_path / "e2e_fleet.json"
    path.write_text(json.dumps(config, indent=2))
    home = tmp_path / "melange-home"
    (tmp_path / "home").mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "MELANGE_SKY_HOME": str(home),
           "MELANGE_SKY_BACKEND": "process_backend:ProcessBackend", "PROCESS_BACKEND_DIR": str(pb.dir),
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "HF_TOKEN": HF_SECRET,
           # a large stream (80 tokens) lasts ~0.4-0.6 s: long enough to be caught in flight by a kill or a drain
           "PROCESS_BACKEND_TOKEN_DELAY_MS": "L4=7,A10G=5,5", "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    for name in ("MELANGE_SKY_DEBUG", "MELANGE_SKY_API_KEY"):
        env.pop(name, None)
    yield Fleet(tmp_path, pb, path, home, env)
    pb.kill_all()


def wait_for(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)


def explained_by_kill(outcome: Outcome, victim: str, killed: tuple[float, float]) -> bool:
    """A request that failed because the killed replica died under it: served by it and in flight at the kill."""
    return outcome.served_by == victim and outcome.started <= killed[1] and outcome.ended >= killed[0]


def test_fleet_serves_heals_grows_and_shrinks_under_continuous_load_and_down_leaves_nothing(fleet):
    # 1. up: replicas and router; the endpoint serves --------------------------------------------------------------
    fleet.cli("up", str(fleet.config), "--rate", str(LOW), "-y")
    keys_file = fleet.home / "keys" / f"{FLEET}.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    keys = fleet.keys()
    url = fleet.endpoint()
    first = fleet.check_membership(url, "up")
    assert sorted(first) == [f"{FLEET}-a10g-0", f"{FLEET}-l4-0"]

    load = Load(url, keys["api_key"], rate=START).start()
    try:
        since = time.monotonic()
        load.wait_until(lambda lo: all(lo.served(since)[c] >= 3 for c in first), WAIT_S, "every replica to serve")

        # 2. a replica dies with requests in flight; one pass of the controller replaces it -------------------------
        victim = f"{FLEET}-a10g-0"
        old_pid = fleet.pb.clusters()[victim]["pid"]
        wait_for(lambda: (fleet.pb.stats(victim) or {}).get("in_flight", 0) >= 1, f"a request in flight on {victim}")
        killed_at = time.monotonic()
        assert fleet.pb.kill(victim)
        killed = (killed_at, time.monotonic())
        healing = fleet.cli("watch", FLEET, "--once")
        said = healing.stdout + healing.stderr
        assert any(victim in line and "relaunch" in line for line in said.splitlines()), said  # one line per action
        assert fleet.pb.clusters()[victim]["pid"] != old_pid, "the dead replica was not relaunched"
        healed = fleet.check_membership(url, "watch --once")
        assert set(healed) == set(first) and healed[victim] != first[victim]  # a new process on a new port
        since = time.monotonic()
        load.wait_until(lambda lo: lo.served(since)[victim] >= 3, WAIT_S, f"{victim} to serve again")

        # 3. the load rises: the controller, reading the router's observed traffic, grows the fleet -----------------
        # Its per-minute rates need a complete minute; before one, the router's /workload gives the mean since it
        # started, which is what `watch --autoscale` then sizes on (said in its output). The load goes to HIGH until
        # that mean is well above what 2 replicas can take.
        load.set_rate(HIGH)
        wait_for(lambda: observed_rate(url, keys["api_key"]) >= NEED, f"the router to observe >= {NEED} req/s")
        capped = fleet.cli("watch", FLEET, "--once", "--autoscale", "--max-cost", "2.5", expect=1)
        said = capped.stdout + capped.stderr
        assert any("--max-cost" in line and "not launched" in line for line in said.splitlines()), said
        assert fleet.check_membership(url, "watch --autoscale --max-cost (refused)") == healed
        fleet.cli("watch", FLEET, "--once", "--autoscale")
        grown = fleet.check_membership(url, "watch --once --autoscale")
        assert len(grown) > len(first), f"the fleet did not grow: {sorted(grown)}"
        since = time.monotonic()
        load.wait_until(lambda lo: all(lo.served(since)[c] >= 2 for c in grown), WAIT_S, "every replica to serve")

        # 4. the load falls: shrink, make-before-break, with drain --------------------------------------------------
        # The replicas the smaller plan does not reuse are made slow (a large stream then lasts ~3 s), so the
        # shrink finds requests in flight on them: the drain has something to wait for.
        plan = json.loads(fleet.cli("up", str(fleet.config), "--rate", str(LOW), "--dryrun", "--json").stdout)
        leaving = set(drain_list(plan))
        assert leaving and leaving < set(grown), f"the dry run of the shrink drains {sorted(leaving)}"
        for cluster in leaving:
            fleet.pb.control(cluster, token_delay_ms=40)
        wait_for(lambda: all((fleet.pb.stats(c) or {}).get("in_flight", 0) >= 1 for c in leaving),
                 "requests in flight on the replicas about to leave")
        load.set_rate(LOW)
        shrink_started = time.monotonic()
        shrink = fleet.cli("up", str(fleet.config), "--rate", str(LOW), "-y", "--drain-timeout", "30")
        shrunk = fleet.check_membership(url, "up --rate LOW (shrink)")
        removed = set(grown) - set(shrunk)
        assert removed == leaving, "the shrink did not remove what its preview said"
        assert len(shrunk) == 2 and len(grown) > 2
        preview = shrink.stdout.split(f"Fleet {FLEET}:")[0]
        for cluster in removed:
            assert cluster in preview, f"the preview did not say {cluster} would be removed:\n{shrink.stdout}"
        downs = {e["cluster"]: e for e in fleet.pb.history("down") if e["cluster"] in removed}
        assert set(downs) == removed
        assert all(e["in_flight"] == 0 for e in downs.values()), f"torn down mid-request: {downs}"
        after_shrink = time.monotonic()
        load.wait_until(lambda lo: sum(lo.served(after_shrink).values()) >= 10, WAIT_S, "traffic after the shrink")
    finally:
        load.stop()

    # 5. down: nothing left -------------------------------------------------------------------------------------------
    assert not [o for o in load.outcomes() if o.ok and o.started >= after_shrink and o.served_by in removed]
    secrets = [keys["admin_token"], keys["api_key"], HF_SECRET]
    assert fleet.secrets_in_sight(secrets) == []
    fleet.cli("down", FLEET, "-y")
    assert fleet.pb.live_processes() == {}
    assert not fleet.fleet_in_ledger()
    assert fleet.secrets_in_sight(secrets) == []

    # the client's view of the whole run ----------------------------------------------------------------------------
    outcomes = load.outcomes()
    drained = [o for o in outcomes if o.served_by in removed and o.overlaps(shrink_started)]
    assert drained and all(o.ok for o in drained), "no request was in flight on a drained replica, or one failed"
    assert len(outcomes) == load.sent and len(outcomes) >= 40
    unexplained = [o for o in load.failures() if not explained_by_kill(o, victim, killed)]
    assert unexplained == [], f"{len(unexplained)} requests failed outside the kill: {unexplained[:5]}"


def observed_rate(url: str, api_key: str) -> float:
    request = urllib.request.Request(f"{url}/workload", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return float(json.loads(answer.read())["total_request_rate"])


def drain_list(dryrun: dict) -> list[str]:
    """The replicas `up --dryrun --json` says the real `up` will drain and tear down."""
    return list(dryrun["drain"])
