"""The local-process launcher (tests/process_backend.py): real processes, real ports, real requests.

- Through the real CLI (`up` and `down` in subprocesses, `status` in process): `up` starts one fake OpenAI server
  per replica, requests reach each replica at the endpoint the ledger shows, a replica killed out of band is recorded
  gone by `status --refresh` and relaunched by the next `up`, and `down` leaves no process running. No secret value
  lands in the backend's files.
- In process, the router's path (a CPU task): file_mounts, workdir, envs and secrets reach the process, `setup` is
  skipped, inherited PYTHONPATH and MELANGE_SKY_* are not; failures (the process exits, never opens its port, the
  port is taken) are LaunchErrors with the log's tail, secrets masked, and leave nothing running.
- The cached and refreshed status of a killed replica, `down`, relaunch and the replica's API key.

Every test kills whatever the backend started, even on failure (the `backend` fixture). Waits poll with deadlines;
nothing asserts on durations.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from melange_sky.backends import ClusterStatus, LaunchRequest, ValidationLevel, load_backend
from melange_sky.errors import InvalidTask, LaunchCancelled, LaunchError
from process_backend import ProcessBackend

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
EXAMPLE = REPO / "examples" / "example.json"
SECRET = "hf_process_backend_secret_7f3a"
CLI_TIMEOUT_S = 300


@pytest.fixture
def backend(tmp_path):
    """A private process backend; every process group it ever started is killed at the end, pass or fail."""
    pb = ProcessBackend(tmp_path / "pb")
    yield pb
    pb.kill_all()



def request_json(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def stream_events(url: str, body: dict) -> list[dict | str]:
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    events: list[dict | str] = []
    with urllib.request.urlopen(req, timeout=30) as answer:
        for raw in answer:
            line = raw.decode().strip()
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def gpu_task(name: str, gpu: str = "A10G", run: str = "vllm serve x", secrets: tuple[str, ...] = ()) -> dict:
    """A replica task as the vllm template renders it (the parts the backend reads)."""
    return {"name": name, "resources": {"accelerators": f"{gpu}:1", "ports": 8000, "infra": "aws/us-west-2"},
            "envs": {"MODEL_NAME": "test-model", "PORT": "8000", "MELANGE_GPU": gpu},
            "secrets": {key: None for key in secrets}, "run": run, "setup": "pip install vllm"}


# -- through the real CLI -------------------------------------------------------------------------------------------
class Cli:
    """`melange-sky` in a subprocess, as a user runs it, and `status --json` in this process when given
    `in_process` (the conftest CLI runner) and `monkeypatch` (to point it at the same ledger and launcher)."""

    def __init__(self, tmp_path: Path, backend: ProcessBackend, in_process=None, monkeypatch=None):
        self.cwd = tmp_path
        home = tmp_path / "home"
        home.mkdir()
        self.env = {**os.environ, "HOME": str(home), "MELANGE_SKY_HOME": str(tmp_path / "melange-home"),
                    "MELANGE_SKY_BACKEND": "process_backend:ProcessBackend", "PROCESS_BACKEND_DIR": str(backend.dir),
                    "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "HF_TOKEN": SECRET,
                    "PROCESS_BACKEND_TOKEN_DELAY_MS": "A10G=10,A100-80GB=4", "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
        self.env.pop("MELANGE_SKY_DEBUG", None)
        self.in_process = in_process
        if in_process is not None:
            for key in ("MELANGE_SKY_HOME", "MELANGE_SKY_BACKEND", "PROCESS_BACKEND_DIR"):
                monkeypatch.setenv(key, self.env[key])
            monkeypatch.delenv("MELANGE_SKY_DEBUG", raising=False)

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "melange_sky", *args], env=self.env, cwd=self.cwd,
                              capture_output=True, text=True, timeout=CLI_TIMEOUT_S)

    def ok(self, *args: str) -> subprocess.CompletedProcess:
        done = self(*args)
        assert done.returncode == 0, f"melange-sky {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n" \
                                     f"{done.stderr}\n{done.stdout}"
        return done

    def replicas(self, *extra: str) -> dict[str, dict]:
        if self.in_process is None:
            fleets = json.loads(self.ok("status", "--json", *extra).stdout)["fleets"]
        else:
            result = self.in_process("status", "--json", *extra)
            assert result.exit_code == 0, result.stderr
            fleets = json.loads(result.stdout)["fleets"]
        return {r["cluster"]: r for fleet in fleets for r in fleet["replicas"]}


#: `up` of the replicas only: the router `up` also launches is another test's job.
UP_REPLICAS = ("up", str(EXAMPLE), "-y", "--no-router")


def test_cli_up_serves_from_local_processes_and_down_leaves_none_running(tmp_path, backend, cli, monkeypatch):
    cli = Cli(tmp_path, backend, cli, monkeypatch)
    cli.ok(*UP_REPLICAS)

    replicas = cli.replicas()
    assert len(replicas) == 4 and {r["state"] for r in replicas.values()} == {"up"}
    live = backend.live_processes()
    assert set(live) == set(replicas), "one running process group per replica"
    for cluster, replica in replicas.items():
        host, _, port = replica["endpoint"].partition(":")
        assert host == "127.0.0.1" and backend.clusters()[cluster]["port"] == int(port)
        status, answer = request_json(f"http://{replica['endpoint']}/v1/completions",
                                      {"model": "test-model", "prompt": "a b c d", "max_tokens": 5})
        assert status == 200 and answer["served_by"] == cluster and answer["gpu"] == replica["gpu"]
        assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
        events = stream_events(f"http://{replica['endpoint']}/v1/chat/completions",
                               {"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 3})
        assert events[-1] == "[DONE]" and len(events) == 4
        assert {e["served_by"] for e in events[:-1] if isinstance(e, dict)} == {cluster}

    down = cli.ok("down", "example", "-y")
    assert backend.live_processes() == {}, down.stderr
    assert backend.clusters() == {}
    assert cli.replicas() == {}
    files = [path for path in backend.dir.rglob("*") if path.is_file()]
    assert backend.path in files and len([f for f in files if f.suffix == ".log"]) >= 4
    for path in files:
        assert SECRET not in path.read_text(errors="replace"), f"the secret's value is in {path}"


def test_cli_status_refresh_records_a_killed_replica_gone_and_up_relaunches_it(tmp_path, backend, cli, monkeypatch):
    cli = Cli(tmp_path, backend, cli, monkeypatch)
    cli.ok(*UP_REPLICAS)
    before = cli.replicas()
    victim = "example-a10g-0"
    old_pid = backend.clusters()[victim]["pid"]

    assert backend.kill(victim)  # out of band: a preemption
    assert victim not in backend.live_processes()
    assert backend.status([victim])[victim].status is ClusterStatus.UP  # the launcher's cache has not noticed

    after = cli.replicas("--refresh")
    assert after[victim]["state"] != "up" and after[victim]["endpoint"] is None
    assert {c: r["endpoint"] for c, r in after.items() if c != victim} == \
        {c: r["endpoint"] for c, r in before.items() if c != victim}

    cli.ok(*UP_REPLICAS)
    relaunched = cli.replicas()[victim]
    assert relaunched["state"] == "up" and backend.clusters()[victim]["pid"] != old_pid
    status, answer = request_json(f"http://{relaunched['endpoint']}/v1/completions",
                                  {"model": "test-model", "prompt": "x", "max_tokens": 2})
    assert status == 200 and answer["served_by"] == victim
    assert set(backend.live_processes()) == set(before)

    cli.ok("down", "example", "-y")
    assert backend.live_processes() == {}


def test_backend_is_selected_by_module_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PROCESS_BACKEND_DIR", str(tmp_path / "pb"))
    chosen = load_backend("process_backend:ProcessBackend")
    assert isinstance(chosen, ProcessBackend) and chosen.dir == tmp_path / "pb"


# -- a replica, in process --------------------------------------------------------------------------------------------
def test_killed_replica_reads_up_until_a_refresh_then_gone_and_relaunches_afresh(backend):
    info = backend.launch(LaunchRequest("r-a10g-0", gpu_task("r-a10g-0"), port=8000))
    assert info.status is ClusterStatus.UP and info.endpoint and info.endpoint.startswith("127.0.0.1:")
    assert (info.cloud, info.region) == ("aws", "us-west-2")  # where the task asked to run, as status reports it
    assert backend.endpoint("r-a10g-0", 8000) == info.endpoint
    assert backend.endpoint("r-a10g-0", 9999) is None  # the task does not expose that port
    first_pid = backend.clusters()["r-a10g-0"]["pid"]

    assert backend.kill("r-a10g-0")
    assert backend.status(["r-a10g-0"])["r-a10g-0"].status is ClusterStatus.UP  # cached: the last recorded state
    assert backend.status(["r-a10g-0"], refresh=True)["r-a10g-0"].status is ClusterStatus.GONE
    assert backend.status(["r-a10g-0"])["r-a10g-0"].status is ClusterStatus.GONE  # the refresh updated the cache
    assert backend.endpoint("r-a10g-0", 8000) is None
    assert backend.down("r-a10g-0") is False  # the launcher no longer knows it

    again = backend.launch(LaunchRequest("r-a10g-0", gpu_task("r-a10g-0"), port=8000))
    assert backend.clusters()["r-a10g-0"]["pid"] != first_pid
    status, answer = request_json(f"http://{again.endpoint}/v1/completions", {"prompt": "hello", "max_tokens": 1})
    assert status == 200 and answer["served_by"] == "r-a10g-0"


def test_launching_a_running_cluster_reuses_it_and_down_stops_its_whole_group(backend):
    first = backend.launch(LaunchRequest("r-a100-0", gpu_task("r-a100-0", "A100-80GB"), port=8000))
    second = backend.launch(LaunchRequest("r-a100-0", gpu_task("r-a100-0", "A100-80GB"), port=8000))
    assert second.endpoint == first.endpoint and len(backend.live_processes()["r-a100-0"]) == 1
    assert backend.status(["r-a100-0", "never-launched"], refresh=True) == {
        "r-a100-0": backend.status(["r-a100-0"])["r-a100-0"],
        "never-launched": backend.status(["never-launched"])["never-launched"]}
    assert backend.status(["never-launched"])["never-launched"].status is ClusterStatus.GONE

    assert backend.down("r-a100-0") is True
    assert backend.live_processes() == {} and backend.clusters() == {}
    assert backend.down("r-a100-0") is False


def test_replica_demands_the_api_key_its_run_exports_from_a_secret(backend):
    run = 'set -e\nexport VLLM_API_KEY="${MELANGE_UPSTREAM_KEY:?secret MELANGE_UPSTREAM_KEY is empty}"\nvllm serve x'
    task = gpu_task("k-a10g-0", run=run, secrets=("MELANGE_UPSTREAM_KEY",))
    info = backend.launch(LaunchRequest("k-a10g-0", task, secrets={"MELANGE_UPSTREAM_KEY": SECRET}, port=8000))
    url = f"http://{info.endpoint}/v1/completions"
    assert request_json(url, {"prompt": "x", "max_tokens": 1})[0] == 401
    assert request_json(url, {"prompt": "x", "max_tokens": 1}, {"Authorization": f"Bearer {SECRET}"})[0] == 200
    assert SECRET not in backend.state_text() and SECRET not in backend.log("k-a10g-0")
    assert SECRET not in " ".join(Path(f"/proc/{backend.clusters()['k-a10g-0']['pid']}/cmdline").read_text()
                                  .split("\0"))


# -- a CPU task (the router's path), in process ----------------------------------------------------------------------
ECHO_SERVER = '''
import http.server, json, os, sys
port = int(sys.argv[1])
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        home = os.environ["HOME"]
        body = json.dumps({
            "cwd": os.getcwd(), "home": home, "python": sys.executable, "pythonpath": os.environ.get("PYTHONPATH"),
            "greeting": os.environ.get("GREETING"), "token": os.environ.get("ROUTER_TOKEN"),
            "leak": os.environ.get("MELANGE_SKY_LEAK"), "marker": open("marker.txt").read(),
            "settings": open(os.path.join(home, "conf", "settings.txt")).read(),
            "setup_ran": os.path.exists(os.path.join(home, "setup-ran")),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
print("echo server starting", flush=True)
http.server.HTTPServer(("127.0.0.1", port), Echo).serve_forever()
'''


def cpu_task(tmp_path: Path, port: int, run: str) -> dict:
    src = tmp_path / "src" / "echo_pkg"
    src.mkdir(parents=True, exist_ok=True)
    (src / "echo_server.py").write_text(ECHO_SERVER)
    (src / "__pycache__").mkdir(exist_ok=True)
    (src / "__pycache__" / "junk.pyc").write_text("not copied")
    settings = tmp_path / "settings.txt"
    settings.write_text("from a file mount")
    workdir = tmp_path / "wd"
    workdir.mkdir(exist_ok=True)
    (workdir / "marker.txt").write_text("from the workdir")
    return {"name": "router", "resources": {"cpus": "2+", "ports": [port]},
            "file_mounts": {"~/app": str(src), "~/conf/settings.txt": str(settings)}, "workdir": str(workdir),
            "envs": {"GREETING": "hello"}, "secrets": {"ROUTER_TOKEN": None},
            "setup": "touch ~/setup-ran", "run": run}


def test_cpu_task_runs_its_script_with_mounts_workdir_envs_and_secrets(tmp_path, backend, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/not/on/the/remote/host")
    monkeypatch.setenv("MELANGE_SKY_LEAK", "launcher-only")
    monkeypatch.setenv("ROUTER_TOKEN", "the launcher's own value, not the one passed")
    port = free_port()
    run = f"set -e\nPYTHONPATH=~/app${{PYTHONPATH:+:$PYTHONPATH}} exec python -m echo_server {port}\n"
    task = cpu_task(tmp_path, port, run)  # the inherited PYTHONPATH, if any, would show after ~/app
    assert backend.validate(task, {"ROUTER_TOKEN": SECRET}).level is ValidationLevel.SCHEMA

    info = backend.launch(LaunchRequest("fleet-router", task, secrets={"ROUTER_TOKEN": SECRET}, port=port))
    assert info.status is ClusterStatus.UP and info.endpoint == f"127.0.0.1:{port}"
    status, seen = request_json(f"http://{info.endpoint}/")
    host = backend.dir / "clusters" / "fleet-router"
    assert status == 200
    assert seen == {"cwd": str(host / "sky_workdir"), "home": str(host), "python": seen["python"],
                    "pythonpath": str(host / "app"), "greeting": "hello", "token": SECRET, "leak": None,
                    "marker": "from the workdir", "settings": "from a file mount", "setup_ran": False}
    assert Path(seen["python"]).parent == Path(sys.executable).parent  # the venv's python came first on PATH
    assert not (host / "app" / "__pycache__").exists()
    assert "echo server starting" in backend.log("fleet-router")
    assert SECRET not in backend.state_text() and SECRET not in backend.log("fleet-router")

    assert backend.status(["fleet-router"], refresh=True)["fleet-router"].endpoint == f"127.0.0.1:{port}"
    assert backend.down("fleet-router") is True
    assert backend.live_processes() == {} and not host.exists()


def test_cpu_task_that_exits_fails_its_launch_with_the_log_tail_secrets_masked(tmp_path, backend):
    task = cpu_task(tmp_path, free_port(), 'echo "token is $ROUTER_TOKEN"; echo cannot start >&2; exit 3')
    with pytest.raises(LaunchError) as failed:
        backend.launch(LaunchRequest("bad-router", task, secrets={"ROUTER_TOKEN": SECRET}))
    message = str(failed.value)
    assert "exited (3)" in message and "token is ***" in message and "cannot start" in message
    assert SECRET not in message
    assert backend.live_processes() == {}
    assert backend.status(["bad-router"], refresh=True)["bad-router"].status is ClusterStatus.GONE


def test_cpu_task_that_never_opens_its_port_times_out_and_leaves_nothing(tmp_path, backend, monkeypatch):
    monkeypatch.setenv("PROCESS_BACKEND_LAUNCH_TIMEOUT", "1")
    port = free_port()
    task = cpu_task(tmp_path, port, "echo waiting; sleep 600; echo never")  # `sleep` is a child of bash: same group
    with pytest.raises(LaunchError, match=rf"127\.0\.0\.1:{port} did not answer within 1 s: waiting"):
        backend.launch(LaunchRequest("slow-router", task, secrets={"ROUTER_TOKEN": SECRET}))
    assert backend.live_processes() == {} and backend.clusters() == {}


def test_cpu_task_on_a_port_in_use_is_refused_before_anything_starts(tmp_path, backend):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LaunchError, match="already in use"):
            backend.launch(LaunchRequest("r", cpu_task(tmp_path, port, "sleep 600"), secrets={"ROUTER_TOKEN": "x"}))
    assert backend.live_processes() == {} and backend.clusters() == {}


def test_validate_refuses_cpu_tasks_without_port_or_run_and_missing_secrets(tmp_path, backend):
    task = cpu_task(tmp_path, 9999, "true")
    with pytest.raises(InvalidTask, match="resources.ports"):
        backend.validate({**task, "resources": {"cpus": 2}}, {"ROUTER_TOKEN": "x"})
    with pytest.raises(InvalidTask, match="run"):
        backend.validate({**task, "run": ""}, {"ROUTER_TOKEN": "x"})
    with pytest.raises(InvalidTask, match="ROUTER_TOKEN"):
        backend.validate(task, {})
    assert backend.validate(gpu_task("g"), {}).level is ValidationLevel.SCHEMA


def test_kill_all_stops_every_group_even_after_the_cluster_was_forgotten(tmp_path, backend):
    """The fixture finalizer's guarantee: it kills by the groups ever started, not by the clusters still known."""
    port = free_port()
    task = cpu_task(tmp_path, port, f"PYTHONPATH=~/app python -m echo_server {port} & sleep 600")
    backend.launch(LaunchRequest("orphans", task, secrets={"ROUTER_TOKEN": "x"}))
    record = backend.clusters()["orphans"]
    os.kill(record["pid"], signal.SIGKILL)  # the leader dies, its children stay in the group
    deadline = time.monotonic() + 30
    while record["pid"] in backend.live_processes().get("orphans", []) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(backend.live_processes()["orphans"]) == 2  # python and sleep, orphaned
    assert backend.kill_all() == ["orphans"]
    assert backend.live_processes() == {}


def test_down_records_the_requests_a_replica_had_in_flight(backend, monkeypatch):
    """What the drain checks of issue 10 read: a replica torn down mid-request says so in the history."""
    monkeypatch.setenv("PROCESS_BACKEND_TOKEN_DELAY_MS", "50")
    idle = backend.launch(LaunchRequest("idle-a10g-0", gpu_task("idle-a10g-0"), port=8000))
    busy = backend.launch(LaunchRequest("busy-a10g-0", gpu_task("busy-a10g-0"), port=8000))
    assert request_json(f"http://{idle.endpoint}/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200
    outcome: list[object] = []
    client = threading.Thread(target=lambda: outcome.append(_try_stream(f"http://{busy.endpoint}/v1/completions")))
    client.start()
    deadline = time.monotonic() + 30
    while (backend.stats("busy-a10g-0") or {}).get("in_flight") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.down("busy-a10g-0") and backend.down("idle-a10g-0")
    client.join(30)
    downs = {e["cluster"]: e for e in backend.history("down")}
    assert (downs["busy-a10g-0"]["in_flight"], downs["busy-a10g-0"]["finished"]) == (1, 0)
    assert (downs["idle-a10g-0"]["in_flight"], downs["idle-a10g-0"]["finished"]) == (0, 1)
    cut = outcome[0] if outcome else None  # the stream (200 tokens x 50 ms) was cut by the teardown
    assert isinstance(cut, Exception) or (isinstance(cut, list) and "[DONE]" not in cut and len(cut) < 200)
    assert [e["event"] for e in backend.history() if e["cluster"] == "busy-a10g-0"] == ["launched", "up", "down"]


def _try_stream(url: str) -> object:
    try:
        return stream_events(url, {"prompt": "x", "max_tokens": 200})
    except Exception as exc:
        return exc


def test_cancel_stops_a_launch_in_flight_and_leaves_nothing(tmp_path, backend):
    task = cpu_task(tmp_path, free_port(), "sleep 600")
    failures: list[BaseException] = []

    def launch() -> None:
        try:
            backend.launch(LaunchRequest("cancelled-router", task, secrets={"ROUTER_TOKEN": "x"}))
        except BaseException as exc:
            failures.append(exc)

    launcher = threading.Thread(target=launch)
    launcher.start()
    deadline = time.monotonic() + 30
    while not backend.cancel() and time.monotonic() < deadline:  # until the launch is in flight
        time.sleep(0.02)
    launcher.join(60)
    assert len(failures) == 1 and isinstance(failures[0], LaunchCancelled)
    assert backend.live_processes() == {} and backend.clusters() == {}
    assert backend.cancel() == []


def test_a_sick_or_frozen_replica_still_reads_up_and_down_still_stops_it(backend):
    """Application health is not the launcher's business (SkyPilot reports hosts): only the router's probes see it."""
    info = backend.launch(LaunchRequest("sick-a10g-0", gpu_task("sick-a10g-0"), port=8000))
    assert backend.control("sick-a10g-0", healthy=False, token_delay_ms=1)["healthy"] is False
    assert request_json(f"http://{info.endpoint}/health")[0] == 503
    assert request_json(f"http://{info.endpoint}/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200
    assert backend.status(["sick-a10g-0"], refresh=True)["sick-a10g-0"].status is ClusterStatus.UP

    assert backend.kill("sick-a10g-0", signal.SIGSTOP)
    with pytest.raises(OSError):  # accepted by the kernel, answered by no one
        urllib.request.urlopen(f"http://{info.endpoint}/health", timeout=0.5)
    assert backend.status(["sick-a10g-0"], refresh=True)["sick-a10g-0"].status is ClusterStatus.UP
    assert backend.down("sick-a10g-0") is True
    assert backend.live_processes() == {}
    assert [e["event"] for e in backend.history()] == ["launched", "up", "control", "sigstop", "down"]


def test_the_fleets_rendered_router_task_comes_up_from_the_shipped_source(tmp_path, backend, monkeypatch):
    """The real router task (deploy/router_task.py, templates/router.j2) on this backend, as issue 10's end-to-end
    test will run it: its file_mounts, its `run` and its admin token secret work on a "host" without the repository
    on PYTHONPATH. The source that runs is the shipped copy: Python writes its bytecode next to it."""
    from melange_sky.core.config import load_config
    from melange_sky.deploy.router_task import ADMIN_TOKEN_SECRET, build_router_plan

    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    config_path = tmp_path / "fleet.json"
    config_path.write_text(json.dumps({**json.loads(EXAMPLE.read_text()), "name": "pb",
                                       "deployment": {"router": {"port": free_port()}}}))
    plan = build_router_plan(load_config(config_path), ["aws"])
    token = "admin-token-for-the-process-router"
    assert backend.validate(plan.task, {ADMIN_TOKEN_SECRET: token}).level is ValidationLevel.SCHEMA
    info = backend.launch(LaunchRequest(plan.cluster, plan.task, secrets={ADMIN_TOKEN_SECRET: token}, port=plan.port))
    assert info.endpoint == f"127.0.0.1:{plan.port}"

    status, health = request_json(f"http://{info.endpoint}/health")
    assert (status, health["status"]) == (503, "no_routes")  # up, and waiting for the fleet to push its routes
    assert request_json(f"http://{info.endpoint}/admin/routes")[0] == 401
    status, routes = request_json(f"http://{info.endpoint}/admin/routes", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and routes["routes"] is None
    shipped = Path(backend.clusters()[plan.cluster]["host"]).rglob("melange_sky/__pycache__/__init__*.pyc")
    assert list(shipped), "the router imported melange_sky from somewhere else than its file_mounts"
    assert token not in backend.state_text() and token not in backend.log(plan.cluster)
    assert backend.down(plan.cluster) and backend.live_processes() == {}
