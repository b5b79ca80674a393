"""`watch` through the real CLI against the FakeBackend (tests/fake_backend.py): a pass relaunches what the cloud
lost and replaces what stops answering, a second controller is refused, --max-cost refuses a plan and records it,
and --autoscale follows a router's /workload (a small local HTTP server here): up at once, down after the hold. The
ledger is read back to prove what was recorded. On real processes (the local launcher), one pass replacing a replica
killed from outside is tests/test_local_backend.py's."""
from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port

from fake_backend import FakeBackend
from melange_sky.fleet.keys import load_keys
from melange_sky.fleet.ledger import Ledger, ReplicaState
from test_fleet_cli import EXAMPLE, PLANNED, run_cli, wait_for


@pytest.fixture
def fleet_env(tmp_path, monkeypatch):
    """A private ledger and fake backend (as in test_fleet_cli), for in-process and subprocess CLI runs alike."""
    env = {"MELANGE_SKY_HOME": str(tmp_path / "melange-home"), "MELANGE_SKY_BACKEND": "fake_backend:FakeBackend",
           "MELANGE_SKY_FAKE_STATE": str(tmp_path / "fake.json"), "HF_TOKEN": "hf_test_token_value"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return FakeBackend(env["MELANGE_SKY_FAKE_STATE"]), env


def events(env, kind: str) -> list[str]:
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        return [e.message for e in ledger.history(fleet="example") if e.cluster is None and e.new_state == kind]


def up_replicas(env) -> list[str]:
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        return sorted(r.cluster for r in ledger.replicas("example") if r.state is ReplicaState.UP)


@contextmanager
def http_server(host: str, port: int, handler_for):
    """A loopback HTTP server answering GET with `handler_for(path, authorization) -> (status, body dict)`, and PUT
    with `handler_for(path, authorization, body)` when it takes a third argument."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self._answer(handler_for(self.path, self.headers.get("Authorization")))

        def do_PUT(self):  # noqa: N802
            sent = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            self._answer(handler_for(self.path, self.headers.get("Authorization"), sent))

        def _answer(self, answer):
            status, body = answer
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()



def test_watch_once_relaunches_a_replica_the_cloud_lost(cli, fleet_env):
    fake, env = fleet_env
    assert cli("up", "--no-router", EXAMPLE, "-y").exit_code == 0
    fake.remove_cluster("example-a10g-1")  # preempted and gone: the ledger still says up
    result = cli("watch", "example", "--once", "--no-health-check")
    assert result.exit_code == 0, result.stderr
    assert sorted(fake.clusters()) == PLANNED and up_replicas(env) == PLANNED
    assert fake.launch_count("example-a10g-1") == 2
    assert [c["cluster"] for c in fake.calls("launch")][4:] == ["example-a10g-1"]  # only the lost one
    assert "watch example: relaunch: not up: example-a10g-1" in result.stderr
    assert "watch example: up: complete: 4/4 planned replica(s) up, replicas $6.70/h" in result.stderr
    assert events(env, "relaunch") == ["not up: example-a10g-1; bringing the plan back ($6.70/h)"]  # no router
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        history = [e.new_state for e in ledger.history(cluster="example-a10g-1")]
    assert history[-4:] == ["gone", "pending", "launching", "up"]


def test_watch_once_on_a_whole_fleet_does_nothing_and_says_so(cli, fleet_env):
    fake, env = fleet_env
    assert cli("up", "--no-router", EXAMPLE, "-y").exit_code == 0
    result = cli("watch", "example", "--once", "--no-health-check", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["actions"] == [] and report["up"] is None
    assert len(fake.calls("launch")) == 4


def test_replica_failing_its_readiness_probe_twice_is_torn_down_and_relaunched(cli, fleet_env, example,
                                                                               write_config, monkeypatch):
    fake, env = fleet_env
    # The second probe comes 2 s after the first in the product; here 0.2 s (the sick replica's address has no
    # server at all, so it fails both, whatever the gap).
    monkeypatch.setattr("melange_sky.controller.watch.PROBE_RETRY_S", 0.2)
    port = free_port()
    config = write_config({**example, "name": "example", "deployment": {"port": port}})
    assert cli("up", "--no-router", config, "-y").exit_code == 0
    hosts = {c: r["endpoint"].split(":")[0] for c, r in fake.clusters().items()}
    assert len(set(hosts.values())) == 4  # one loopback address each
    sick = "example-a10g-2"
    probed = []

    def health(path, _auth):
        probed.append(path)
        return 200, {"status": "ok"}

    with contextlib_servers([(hosts[c], port) for c in PLANNED if c != sick], health):
        result = cli("watch", "example", "--once")
    assert result.exit_code == 0, result.stderr
    assert set(probed) == {"/health"}
    assert fake.launch_count(sick) == 2 and all(fake.launch_count(c) == 1 for c in PLANNED if c != sick)
    assert up_replicas(env) == PLANNED
    assert f"unhealthy: replica {sick}: readiness probe failed twice" in result.stderr
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        history = [(e.new_state, e.message) for e in ledger.history(cluster=sick)]
    assert [s for s, _ in history[-5:]] == ["terminating", "gone", "pending", "launching", "up"]
    assert "unhealthy" in history[-4][1]
    assert len(events(env, "unhealthy")) == 1


@contextmanager
def contextlib_servers(addresses, handler_for):
    servers = []
    try:
        for host, port in addresses:
            cm = http_server(host, port, handler_for)
            cm.__enter__()
            servers.append(cm)
        yield
    finally:
        for cm in reversed(servers):
            cm.__exit__(None, None, None)


def test_second_watcher_is_refused_naming_the_first_and_ctrl_c_leaves_the_fleet(cli, fleet_env):
    fake, env = fleet_env
    assert cli("up", "--no-router", EXAMPLE, "-y").exit_code == 0
    first = run_cli(env, "watch", "example", "--no-health-check", "--interval", "3600")
    try:
        wait_for(lambda: "pass ok" in (first.stderr.readline() or ""), what="the first watcher's pass")
        second = cli("watch", "example", "--once", "--no-health-check")
        assert second.exit_code == 2
        assert second.stderr.strip() == (f"Error: fleet 'example' is already watched by process {first.pid}; stop "
                                         f"that `melange-sky watch` first (one controller per fleet)")
        first.send_signal(signal.SIGINT)
        _out, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130
    assert "Interrupted: fleet example is left as it is." in err
    assert fake.calls("down") == [] and up_replicas(env) == PLANNED
    assert cli("watch", "example", "--once", "--no-health-check").exit_code == 0  # the lock went with it


def test_plan_above_max_cost_is_reported_recorded_and_not_launched(cli, fleet_env):
    fake, env = fleet_env
    assert cli("up", "--no-router", EXAMPLE, "-y").exit_code == 0
    fake.remove_cluster("example-a100-80gb-0")
    result = cli("watch", "example", "--once", "--no-health-check", "--max-cost", "5", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["refused"] and report["up"] is None
    assert [a["kind"] for a in report["actions"]] == ["over-budget"]
    message = events(env, "over-budget")
    assert message == ["relaunching example-a100-80gb-0 needs the plan at $6.70/h > --max-cost $5.00/h: not "
                       "launched; the fleet stays as it is"]
    assert len(fake.calls("launch")) == 4  # nothing launched
    assert cli("watch", "example", "--once", "--no-health-check", "--max-cost", "6.70").exit_code == 0
    assert up_replicas(env) == PLANNED


def workload_doc(per_minute: int, minutes: int = 10, counts=((40, 20), (100, 40))) -> dict:
    """A router's /workload: the example's 2x2 buckets, `per_minute` arrivals in each complete minute."""
    return minutes_doc([per_minute] * minutes, counts)


def minutes_doc(minute_arrivals: list[int], counts=((40, 20), (100, 40))) -> dict:
    """A router's /workload with these arrivals per complete minute (oldest first) and their percentiles."""
    rates = sorted(n / 60 for n in minute_arrivals)
    return {"input_buckets": [1, 100, 1000], "output_buckets": [1, 100, 1000], "counts": [list(r) for r in counts],
            "total_request_rate": sum(rates) / len(rates), "requests": sum(map(sum, counts)),
            "minute_arrivals": list(minute_arrivals),
            "rate_percentiles": {"p50": rates[(len(rates) + 1) // 2 - 1], "p95": rates[-1], "p99": rates[-1],
                                 "max": rates[-1]}}


def percentiles_only(doc: dict) -> dict:
    """The same document from a router that sends no per-minute counts (older than `minute_arrivals`)."""
    return {k: v for k, v in doc.items() if k != "minute_arrivals"}


@pytest.fixture
def router_stub():
    """A loopback `/workload` whose document the test changes; it records the Authorization headers it got."""
    state = {"doc": workload_doc(1800), "auth": []}

    def answer(path, auth):
        state["auth"].append(auth)
        return (200, state["doc"]) if path == "/workload" else (404, {})

    with http_server("127.0.0.1", 0, answer) as server:
        state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
        yield state


def test_after_a_burst_minute_autoscale_scales_down_once_the_quiet_window_it_names_has_passed(cli, fleet_env,
                                                                                              router_stub):
    """Issue 20's try: one busy minute (38 req/s) among quiet ones (2 req/s). With --scale-down-after 2 the need is
    read over the router's last 2 minutes: up at once on the burst, the same while the burst is in the window, down
    to 2 req/s at the first pass after 2 quiet minutes, whatever the passes before it recorded."""
    fake, env = fleet_env
    assert cli("up", "--no-router", EXAMPLE, "-y").exit_code == 0  # planned for 30 req/s: $6.70/h
    common = ["--once", "--no-health-check", "--autoscale", "--from", router_stub["url"], "--drain-timeout", "0",
              "--scale-down-after", "2", "--json"]
    quiet = [120] * 20
    router_stub["doc"] = minutes_doc(quiet + [2280])
    burst = cli("watch", "example", *common)
    assert burst.exit_code == 0, burst.stderr
    report = json.loads(burst.stdout)
    assert report["decision"]["scale"] == "scale-up" and report["need"] == {
        "rate": 38, "window_min": 2, "source": "p95 over a 2 min window (the last 2 of 21 complete minutes)"}
    grown, downs = up_replicas(env), len(fake.calls("down"))

    router_stub["doc"] = minutes_doc(quiet + [2280, 120])  # one quiet minute: the burst is still in the window
    held = cli("watch", "example", *common)
    assert held.exit_code == 0, held.stderr
    assert json.loads(held.stdout)["decision"]["scale"] == "none"
    assert up_replicas(env) == grown and len(fake.calls("down")) == downs

    router_stub["doc"] = minutes_doc(quiet + [2280, 120, 120])  # the 2 min window has passed the burst
    shrink = cli("watch", "example", "--once", "--no-health-check", "--autoscale", "--from", router_stub["url"],
                 "--drain-timeout", "0", "--scale-down-after", "2")
    assert shrink.exit_code == 0, shrink.stderr
    assert ("watch example: need: 2 req/s (p95 over a 2 min window (the last 2 of 23 complete minutes)): need below "
            "plan 38 req/s for 2 min of the router's minutes (2 min window, hold 2 min); highest need in the hold 2 "
            "req/s") in shrink.stderr
    assert "watch example: scale-down: 38 -> 2 req/s: " in shrink.stderr
    assert len(fake.calls("down")) > downs and set(up_replicas(env)) != set(grown)
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        assert ledger.get_fleet("example").plan["config"]["total_request_rate"] == 2
    assert [m.split(" (")[0] for m in events(env, "need")] == ["38 req/s", "38 req/s", "2 req/s"]


def test_a_burst_scales_up_at_once_with_a_window_longer_than_the_hold(cli, fleet_env, router_stub):
    fake, env = fleet_env
    assert cli("up", "--no-router", EXAMPLE, "-y").exit_code == 0
    router_stub["doc"] = minutes_doc([120] * 40 + [2280])
    result = cli("watch", "example", "--once", "--no-health-check", "--autoscale", "--from", router_stub["url"],
                 "--scale-down-after", "1", "--window", "15", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["decision"]["scale"] == "scale-up" and report["need"]["rate"] == 38
    assert report["need"]["window_min"] == 15 and report["up"]["complete"]


def test_autoscale_without_per_minute_counts_scales_down_only_after_the_recorded_hold(cli, fleet_env, router_stub):
    """A router that sends only its percentiles (no `minute_arrivals`): the hold is the passes' recorded needs."""
    fake, env = fleet_env
    assert cli("up", "--no-router", EXAMPLE, "-y").exit_code == 0  # planned for 30 req/s: $6.70/h
    common = ["--once", "--no-health-check", "--autoscale", "--from", router_stub["url"], "--drain-timeout", "0",
              "--json"]
    router_stub["doc"] = percentiles_only(workload_doc(60 * 60))  # 60 req/s in every minute
    grow = cli("watch", "example", *common, "--scale-down-after", "0.04")
    assert grow.exit_code == 0, grow.stderr
    report = json.loads(grow.stdout)
    assert report["decision"]["scale"] == "scale-up" and report["need"]["rate"] == 60
    assert report["up"]["complete"] and report["up"]["cost_up"] > 6.70
    grown, grown_cost, downs = up_replicas(env), report["up"]["cost_up"], len(fake.calls("down"))
    assert events(env, "scale-up")[0].startswith("30 -> 60 req/s")

    router_stub["doc"] = percentiles_only(workload_doc(10 * 60))  # the load falls to 10 req/s
    held = cli("watch", "example", *common, "--scale-down-after", "0.04")  # 2.4 s
    assert held.exit_code == 0, held.stderr
    assert json.loads(held.stdout)["decision"]["scale"] == "hold"
    assert up_replicas(env) == grown and len(fake.calls("down")) == downs
    time.sleep(2.6)
    shrink = cli("watch", "example", *common, "--scale-down-after", "0.04")
    assert shrink.exit_code == 0, shrink.stderr
    report = json.loads(shrink.stdout)
    assert report["decision"]["scale"] == "scale-down" and report["decision"]["rate"] == 10
    assert report["up"]["drained"] and report["up"]["cost_up"] < 6.70 < grown_cost
    assert report["up"]["complete"] and set(up_replicas(env)) != set(grown)
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        stored = ledger.get_fleet("example").plan["config"]
    assert stored["total_request_rate"] == 10  # the next pass plans from the scaled config
    assert stored["workload_distribution"] == [[0.2, 0.1], [0.5, 0.2]]
    assert [m.split(" (")[0] for m in events(env, "need")] == ["60 req/s", "10 req/s", "10 req/s"]
    assert "its whole window: it sends no per-minute counts to cut a 1 min window from" in events(env, "need")[0]


def test_autoscale_above_max_cost_keeps_the_fleet(cli, fleet_env, router_stub):
    fake, env = fleet_env
    assert cli("up", "--no-router", EXAMPLE, "-y").exit_code == 0
    router_stub["doc"] = workload_doc(100 * 60)
    result = cli("watch", "example", "--once", "--no-health-check", "--autoscale", "--from", router_stub["url"],
                 "--max-cost", "10")
    assert result.exit_code == 1
    assert "watch example: over-budget: scale-up to 100 req/s needs $" in result.stderr
    assert len(fake.calls("launch")) == 4 and up_replicas(env) == PLANNED
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        assert ledger.get_fleet("example").plan["config"]["total_request_rate"] == 30


def test_autoscale_without_a_router_or_from_is_a_one_line_error(cli, fleet_env):
    fake, env = fleet_env
    assert cli("up", "--no-router", EXAMPLE, "-y").exit_code == 0
    result = cli("watch", "example", "--once", "--autoscale")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: --autoscale reads the traffic from the fleet's router")
    assert "--from URL" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_fleet_and_missing_secret_are_one_line_errors(cli, fleet_env, monkeypatch):
    fake, env = fleet_env
    result = cli("watch", "nope", "--once")
    assert result.exit_code == 2 and result.stderr.startswith("Error: no fleet 'nope' in the ledger")
    assert cli("up", "--no-router", EXAMPLE, "-y").exit_code == 0
    monkeypatch.delenv("HF_TOKEN")
    result = cli("watch", "example", "--once")
    assert result.exit_code == 2 and result.stderr.startswith("Error: HF_TOKEN not set in the environment")
    assert len(fake.calls("launch")) == 4


class RouterStub:
    """The fleet router's admin and workload API at its ledger endpoint (a loopback address of the fake backend):
    /workload wants the fleet's client key, /admin/routes its admin token; pushed documents are kept."""

    def __init__(self, keys):
        self.keys = keys
        self.doc = workload_doc(1800)
        self.routes = None
        self.pushes = []
        self.workload_auth = []

    def __call__(self, path, auth, sent=None):
        if path == "/workload":
            self.workload_auth.append(auth)
            return (200, self.doc) if auth == f"Bearer {self.keys.api_key}" else (401, {})
        if path == "/admin/routes":
            if auth != f"Bearer {self.keys.admin_token}":
                return 401, {}
            if sent is None:
                return 200, {"routes": self.routes, "generation": len(self.pushes), "inflight": {}, "draining": {}}
            self.routes = sent
            self.pushes.append(sent)
            return 200, {"accepted": True, "replicas": len(sent["replicas"]), "generation": len(self.pushes)}
        return 200, {"status": "ok"}


@pytest.fixture
def routed_fleet(cli, fleet_env, example, write_config):
    """The example fleet up with its router, and a RouterStub listening where the ledger says the router is."""
    fake, env = fleet_env
    port = free_port()
    config = write_config({**example, "name": "example", "input_buckets": [1, 100, 1000],
                           "output_buckets": [1, 100, 1000], "deployment": {"router": {"port": port}}})
    assert cli("up", config, "-y").exit_code == 0
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        host, router_port = ledger.router("example").endpoint.split(":")
    keys = load_keys("example", env["MELANGE_SKY_HOME"])
    stub = RouterStub(keys)
    with http_server(host, int(router_port), stub):
        yield fake, env, stub


def test_a_router_that_lost_its_routes_is_pushed_the_ledgers_replicas(cli, routed_fleet):
    fake, env, router = routed_fleet
    result = cli("watch", "example", "--once", "--no-health-check")
    assert result.exit_code == 0, result.stderr
    assert "routes-resync: the router routes to 0 replica(s), the ledger has 4 up: pushing" in result.stderr
    assert sorted(r["name"] for r in router.pushes[-1]["replicas"]) == PLANNED
    again = cli("watch", "example", "--once", "--no-health-check", "--json")
    assert json.loads(again.stdout)["actions"] == [] and len(router.pushes) == 1  # in step: nothing pushed


def test_autoscale_reads_the_fleets_router_with_its_client_key_and_pushes_the_new_members(cli, routed_fleet):
    fake, env, router = routed_fleet
    router.doc = workload_doc(60 * 60, counts=((10, 10), (60, 20)))  # 100 requests: enough for its shares
    result = cli("watch", "example", "--once", "--no-health-check", "--autoscale", "--drain-timeout", "0",
                 "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["decision"]["scale"] == "scale-up" and report["up"]["complete"]
    assert router.workload_auth == [f"Bearer {router.keys.api_key}"]
    assert sorted(r["name"] for r in router.pushes[-1]["replicas"]) == up_replicas(env) != PLANNED
    assert router.keys.api_key not in result.stderr + result.stdout
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:  # the router's histogram replaced the config's
        assert ledger.get_fleet("example").plan["config"]["workload_distribution"] == [[0.1, 0.1], [0.6, 0.2]]
    assert router.pushes[-1]["workload_distribution"] == [[0.1, 0.1], [0.6, 0.2]]


def test_watch_once_relaunches_the_router_the_cloud_lost(cli, fleet_env, example, write_config):
    fake, env = fleet_env
    config = write_config({**example, "name": "example", "input_buckets": [1, 100, 1000],
                           "output_buckets": [1, 100, 1000]})  # routable: up launches a router for it
    assert cli("up", config, "-y").exit_code == 0
    fake.remove_cluster("example-router")
    result = cli("watch", "example", "--once", "--no-health-check")
    assert result.exit_code == 0, result.stderr
    assert "watch example: relaunch: not up: example-router;" in result.stderr
    assert fake.launch_count("example-router") == 2 and all(fake.launch_count(c) == 1 for c in PLANNED)
    assert sorted(fake.clusters()["example-router"]["secret_names"]) == ["MELANGE_SKY_ADMIN_TOKEN",
                                                                         "MELANGE_SKY_API_KEY"]
