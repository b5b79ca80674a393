"""The local launcher (`--backend local`): real processes, real ports, real requests.

- Through the unchanged CLI (in process): a fleet of emulated GPU replicas of two types behind the real router: up,
  a request through the endpoint, status, a replica killed from outside that `watch` replaces (the healthy one
  untouched), a `down` that leaves no process, and no secret value in any file the launcher wrote.
- A replica, in process: one process known by pid and start time, reused while it runs, GONE once killed from
  outside (a frozen one still runs: health is the router's business), relaunched afresh; the speed it is given and
  the API key its task exports from a secret reach the emulator (the key never in the launcher's files nor `ps`).
- The router's path (a CPU task), in process: the fleet's rendered router task comes up from the shipped source with
  its admin token; a process left in its group when the leader dies is stopped; a task that exits, never listens
  or is cancelled fails its launch with the log's tail (secrets masked) and leaves nothing running.
- The process identity check (a recycled pid is not a replica) and the one-line errors of a task the launcher
  cannot run.

Every test kills whatever it started, pass or fail. Waits poll with deadlines; nothing asserts on durations.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from melange_sky.errors import InvalidTask, LaunchCancelled, LaunchError
from melange_sky.fleet.backends import ClusterStatus, LaunchRequest, ValidationLevel, load_backend
from melange_sky.fleet.local import LocalBackend, ProcessId, engine_settings, process_id, running

REPO = Path(__file__).resolve().parent.parent
FLEET = "localfleet"
A10G, A100, ROUTER = f"{FLEET}-a10g-0", f"{FLEET}-a100-80gb-0", f"{FLEET}-router"
SECRET = "hf_local_launcher_secret_7f3a"


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _reap(pid: int) -> None:
    """A child of this test process (the in-process `up` started it) that exited: reap it, so /proc forgets it."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _kill_groups(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _reap(pid)


def _request(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of a GET (no body) or POST."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            raw = answer.read()
            return answer.status, json.loads(raw) if raw else {}, dict(answer.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else {}, dict(exc.headers)


@pytest.fixture
def local_env(tmp_path, monkeypatch, example, write_config):
    """A fresh MELANGE_SKY_HOME, the local launcher chosen by the environment, and a config of one A10G and one
    A100-80GB with bucket edges (so a router is launched) at 20x speed. HF_TOKEN is set (to a value to look for in
    the launcher's files), not needed. Kills whatever a failed test left."""
    home = tmp_path / "home"
    monkeypatch.setenv("MELANGE_SKY_HOME", str(home))
    monkeypatch.setenv("MELANGE_SKY_BACKEND", "local")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    monkeypatch.delenv("MELANGE_SKY_LOCAL_SPEED", raising=False)
    example.update(name=FLEET, total_request_rate=3, input_buckets=[1, 25, 100], output_buckets=[1, 25, 100],
                   deployment={"local": {"speed": 20}})
    for gpu in ("A10G", "A100-80GB"):  # one of each
        example["gpu_info"][gpu].update(min_count=1, max_count=1)
    config = write_config(example, "local.json")
    seen: set[int] = set()
    yield config, home, seen
    seen.update(int(record["pid"]) for record in LocalBackend(home / "local").records().values())
    _kill_groups(seen)


def _states(status) -> dict[str, str]:
    """Each replica's state in `status --json` (a replica gone and not replaced is not listed: "gone")."""
    [fleet] = json.loads(status.stdout)["fleets"]
    states = {r["cluster"]: r["state"] for r in fleet["replicas"]}
    return {cluster: states.get(cluster, "gone") for cluster in (A10G, A100)}


def _records(home: Path) -> dict[str, dict]:
    return LocalBackend(home / "local").records()


def test_a_fleet_on_the_local_launcher_serves_heals_and_leaves_no_process(cli, local_env):
    config, home, seen = local_env
    up = cli("up", config, "-y")
    assert up.exit_code == 0, up.stderr + up.stdout
    records = _records(home)
    assert set(records) == {A10G, A100, ROUTER}
    seen.update(int(r["pid"]) for r in records.values())

    # A request through the fleet's endpoint (the router), with the client key `up` made for the fleet.
    [fleet] = json.loads(cli("status", FLEET, "--json").stdout)["fleets"]
    keys = json.loads((home / "keys" / f"{FLEET}.json").read_text())
    status, body, headers = _request(f"{fleet['endpoint']}/v1/completions",
                                     {"model": "meta-llama/Llama-2-7b-chat-hf", "prompt": "Hello", "max_tokens": 5},
                                     {"Authorization": f"Bearer {keys['api_key']}"})
    assert status == 200 and body["usage"]["completion_tokens"] == 5 and body["object"] == "text_completion"
    assert headers["X-Melange-Gpu"] in ("A10G", "A100-80GB")

    # Each replica has its log; the emulator says what it emulates, at the config's speed.
    for cluster in (A10G, A100):
        log = (home / "local" / "logs" / f"{cluster}.log").read_text()
        assert "Emulating llama-2-7b on" in log and "At 20x speed" in log and "Listening on" in log
    assert "Listening on http://127.0.0.1:" in (home / "local" / "logs" / f"{ROUTER}.log").read_text()

    # Killed from outside: the next status sees it gone, and one pass of watch brings it back (a new process);
    # the healthy replica is left as it was.
    victim = ProcessId(int(records[A10G]["pid"]), int(records[A10G]["started"]))
    os.kill(victim.pid, signal.SIGKILL)
    assert _wait(lambda: not running(victim))
    _reap(victim.pid)
    assert _states(cli("status", FLEET, "--refresh", "--json")) == {A10G: "gone", A100: "up"}
    watch = cli("watch", FLEET, "--once")
    assert watch.exit_code == 0, watch.stderr + watch.stdout
    assert "relaunch: not up: " + A10G in watch.stderr
    after = _records(home)
    seen.add(int(after[A10G]["pid"]))
    assert after[A10G]["status"] == "up" and int(after[A10G]["pid"]) != victim.pid
    assert (after[A100]["pid"], after[A100]["port"]) == (records[A100]["pid"], records[A100]["port"])
    assert _states(cli("status", FLEET, "--json")) == {A10G: "up", A100: "up"}

    # down: every process of every launch is gone, and the launcher forgets the clusters.
    down = cli("down", FLEET, "-y")
    assert down.exit_code == 0, down.stderr + down.stdout
    for pid in seen:
        _reap(pid)
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"), pid
    assert _records(home) == {}
    assert LocalBackend(home / "local").leftovers() == {}
    written = [f for f in (home / "local").rglob("*") if f.is_file()]
    assert len([f for f in written if f.suffix == ".log"]) == 3
    for path in written:  # no secret value: not the model's token, not the fleet's client key nor its admin token
        text = path.read_text(errors="replace")
        for value in (SECRET, keys["api_key"], keys["admin_token"]):
            assert value not in text, f"a secret's value is in {path}"


# -- a replica, in process ----------------------------------------------------------------------------------------
def _gpu_task(model: str, run: str = 'vllm serve "$MODEL_NAME" --host 0.0.0.0 --port "$PORT"') -> dict:
    return {"resources": {"accelerators": "A10G:1", "ports": 8000}, "envs": {"MODEL_NAME": model}, "run": run}


KEYED_RUN = ('set -e\nexport VLLM_API_KEY="${UPSTREAM_KEY:?secret UPSTREAM_KEY is empty}"\n'
             'vllm serve "$MODEL_NAME" --host 0.0.0.0 --port "$PORT"')


def test_a_replica_is_one_process_reused_while_it_runs_gone_once_killed_and_relaunched_afresh(tmp_path):
    """Also: the speed given to the launcher and the API key the task exports from a secret reach the emulator,
    and the key is in none of the launcher's files nor on the emulator's command line."""
    backend = LocalBackend(tmp_path, speed=7)
    task = {**_gpu_task("llama-2-7b", KEYED_RUN), "secrets": {"UPSTREAM_KEY": None}}
    request = LaunchRequest(cluster="f-a10g-0", task=task, secrets={"UPSTREAM_KEY": SECRET}, port=8000)
    started: list[int] = []
    try:
        info = backend.launch(request)
        first = backend.records()["f-a10g-0"]
        started.append(int(first["pid"]))
        assert info.status is ClusterStatus.UP and info.endpoint == f"127.0.0.1:{first['port']}"
        assert backend.endpoint("f-a10g-0", 8000) == info.endpoint
        log = backend.log_path("f-a10g-0").read_text()
        assert "At 7x speed" in log
        url = f"http://{info.endpoint}/v1/completions"
        ask = {"model": "llama-2-7b", "prompt": "x y", "max_tokens": 2}
        assert _request(url, ask)[0] == 401
        status, answer, _ = _request(url, ask, {"Authorization": f"Bearer {SECRET}"})
        assert status == 200 and answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
        assert SECRET not in Path(f"/proc/{first['pid']}/cmdline").read_text()
        assert backend.leftovers() == {}  # a known cluster's process is not a leftover

        again = backend.launch(request)  # it runs: reused, nothing started
        assert again.endpoint == info.endpoint and backend.records()["f-a10g-0"]["pid"] == first["pid"]

        os.killpg(first["pid"], signal.SIGSTOP)  # hung: the host runs, nothing answers; the router's probes see it
        assert backend.status(["f-a10g-0"])["f-a10g-0"].status is ClusterStatus.UP
        os.killpg(first["pid"], signal.SIGKILL)  # killed from outside
        assert _wait(lambda: not running(ProcessId(first["pid"], first["started"])))
        gone = backend.status(["f-a10g-0", "never-launched"])
        assert {c: i.status for c, i in gone.items()} == {"f-a10g-0": ClusterStatus.GONE,
                                                          "never-launched": ClusterStatus.GONE}
        assert backend.endpoint("f-a10g-0", 8000) is None and backend.records() == {}
        assert backend.down("f-a10g-0") is False  # the launcher no longer knows it

        relaunched = backend.launch(request)  # afresh: a new process
        started.append(int(backend.records()["f-a10g-0"]["pid"]))
        assert started[1] != started[0]
        assert _request(f"http://{relaunched.endpoint}/v1/completions", ask,
                        {"Authorization": f"Bearer {SECRET}"})[0] == 200
        assert backend.down("f-a10g-0") is True
        assert backend.down("f-a10g-0") is False
        assert backend.leftovers() == {} and backend.records() == {}
        for path in (p for p in tmp_path.rglob("*") if p.is_file()):
            assert SECRET not in path.read_text(errors="replace"), f"the secret's value is in {path}"
    finally:
        _kill_groups(started)


# -- the router's path (a CPU task), in process ---------------------------------------------------------------------
def test_the_fleets_rendered_router_task_comes_up_from_the_shipped_source(tmp_path, write_config, example):
    """The real router task (deploy/router_task.py, templates/router.j2): its file_mounts (melange-sky's source,
    linked), its `run` (setup skipped, `python` this interpreter) and its admin token secret work; the router listens
    on 127.0.0.1 on a port the OS chose. A helper process beside the router (as a hosted controller would be) is
    stopped with it when the router dies."""
    from melange_sky.core.config import load_config
    from melange_sky.deploy.router_task import ADMIN_TOKEN_SECRET, build_router_plan

    config = load_config(write_config({**example, "name": "lr", "input_buckets": [1, 25, 100],
                                       "output_buckets": [1, 25, 100]}))
    plan = build_router_plan(config, ["aws"])
    task = {**plan.task, "run": plan.task["run"].replace("set -e\n", "set -e\nsleep 600 &\n", 1)}
    token = "admin-token-for-the-local-router"
    backend = LocalBackend(tmp_path / "local")
    assert backend.validate(task, {ADMIN_TOKEN_SECRET: token}).level is ValidationLevel.SCHEMA
    try:
        info = backend.launch(LaunchRequest(plan.cluster, task, secrets={ADMIN_TOKEN_SECRET: token}, port=plan.port))
        record = backend.records()[plan.cluster]
        assert info.endpoint == f"127.0.0.1:{record['port']}" and record["port"] != plan.port
        status, health, _ = _request(f"http://{info.endpoint}/health")
        assert (status, health["status"]) == (503, "no_routes")  # up, waiting for the fleet to push its routes
        assert _request(f"http://{info.endpoint}/admin/routes")[0] == 401
        status, routes, _ = _request(f"http://{info.endpoint}/admin/routes",
                                     headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and routes["routes"] is None
        serve = Path(f"/proc/{record['pid']}")
        assert (serve / "exe").resolve() == Path(sys.executable).resolve()
        host = backend.dir / "clusters" / plan.cluster
        environ = dict(v.split("=", 1) for v in (serve / "environ").read_text().split("\0") if "=" in v)
        source = environ["PYTHONPATH"].split(":")[0]  # the mount, where the router imports melange_sky from
        assert Path(source).is_relative_to(host) and (Path(source) / "melange_sky").resolve() == REPO / "melange_sky"
        assert environ["HOME"] == str(host) and not any(k.startswith("MELANGE_SKY_HOME") for k in environ)
        assert token not in json.dumps(backend.records()) and token not in backend.log_path(plan.cluster).read_text()

        group = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _pgid(int(pid)) == record["pid"]]
        assert len(group) == 2  # the router and its helper
        os.kill(record["pid"], signal.SIGKILL)  # the router dies; its helper is left in the group
        assert _wait(lambda: not running(ProcessId(record["pid"], record["started"])))
        assert backend.leftovers() == {}  # still a known cluster: not a leftover yet
        assert backend.status([plan.cluster])[plan.cluster].status is ClusterStatus.GONE
        assert backend.leftovers() == {} and backend.records() == {}  # the helper went with it
        assert not [pid for pid in group if _pgid(pid) == record["pid"]]
    finally:
        _kill_groups([int(r["pid"]) for r in backend.records().values()])


def _pgid(pid: int) -> int | None:
    """The process group of a live process (None for none, or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[2])


def _router_like(run: str) -> dict:
    """A CPU task the launcher accepts (it runs `melange-sky serve`, after `run` here, which never gets there)."""
    return {"resources": {"cpus": "2+", "ports": [8080]}, "secrets": {"ROUTER_TOKEN": None},
            "run": f"{run}\nexec python -m melange_sky serve --pushed --port 8080"}


def test_a_task_that_exits_fails_its_launch_with_the_log_tail_secrets_masked(tmp_path):
    """Its `workdir` and `file_mounts` were in place, where SkyPilot puts them (`run` starts in ~/sky_workdir)."""
    backend = LocalBackend(tmp_path / "local")
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "marker.txt").write_text("from the workdir")
    (tmp_path / "settings.txt").write_text("from a file mount")
    task = {**_router_like('echo "token is $ROUTER_TOKEN"; echo "in $(basename "$PWD"): $(cat marker.txt)"; '
                           'cat ~/conf/settings.txt; echo cannot start >&2; exit 3'),
            "workdir": str(tmp_path / "wd"), "file_mounts": {"~/conf/settings.txt": str(tmp_path / "settings.txt")}}
    with pytest.raises(LaunchError) as failed:
        backend.launch(LaunchRequest("bad-router", task, secrets={"ROUTER_TOKEN": SECRET}))
    message = str(failed.value)
    assert "exited (3)" in message and "token is ***" in message and "cannot start" in message
    assert "in sky_workdir: from the workdir" in message and "from a file mount" in message
    assert SECRET not in message and "\n" not in message
    assert backend.leftovers() == {} and backend.records() == {}
    assert backend.status(["bad-router"])["bad-router"].status is ClusterStatus.GONE


def test_a_task_that_never_listens_times_out_and_leaves_nothing(tmp_path):
    backend = LocalBackend(tmp_path, launch_timeout_s=1)
    with pytest.raises(LaunchError, match=r"not listening after 1 s .*: waiting"):
        backend.launch(LaunchRequest("slow-router", _router_like("echo waiting; sleep 600")))
    assert backend.leftovers() == {} and backend.records() == {}


def test_cancel_stops_a_launch_in_flight_and_leaves_nothing(tmp_path):
    backend = LocalBackend(tmp_path)
    failures: list[BaseException] = []

    def launch() -> None:
        try:
            backend.launch(LaunchRequest("cancelled-router", _router_like("sleep 600")))
        except BaseException as exc:  # noqa: BLE001 - what the launch raised is the test's subject
            failures.append(exc)

    launcher = threading.Thread(target=launch)
    launcher.start()
    assert _wait(lambda: bool(backend.cancel()))  # once the launch is in flight
    launcher.join(60)
    assert len(failures) == 1 and isinstance(failures[0], LaunchCancelled)
    assert backend.leftovers() == {} and backend.records() == {}
    assert backend.cancel() == []


def test_a_launcher_killed_before_it_recorded_its_process_leaves_none_running(tmp_path):
    """`up` killed (-9) after the launcher started a process and before state.json records it: the process runs
    nothing and exits (it waits for the launcher's word on a pipe), so no process ever runs unknown to `down`."""
    marker = tmp_path / f"ran-{os.getpid()}"
    task = _router_like(f"touch {marker}; sleep 600")
    script = f"""
import os, signal
from melange_sky.fleet import local
from melange_sky.fleet.backends import LaunchRequest
replace = os.replace
def killed(src, dst):  # the launcher dies as it is about to record the process it started
    if str(dst).endswith("state.json") and '"pid"' in open(src).read():
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
local.os.replace = killed
local.LocalBackend({str(tmp_path / "local")!r}).launch(LaunchRequest("orphan", {task!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr

    def alive() -> list[int]:  # processes of that launch, found by the marker on their command line
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and str(marker) in (entry / "cmdline").read_text():
                    found.append(int(entry.name))
        return found

    _wait(lambda: not alive(), 10)
    leaked = alive()
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leaked == [], "the unrecorded process still runs"
    assert not marker.exists(), "the unrecorded process ran its command"
    assert LocalBackend(tmp_path / "local").records() == {}


def test_a_launch_timeout_from_the_environment_must_be_a_positive_number(monkeypatch):
    monkeypatch.setenv("MELANGE_SKY_LOCAL_LAUNCH_TIMEOUT", "2.5")
    assert LocalBackend().launch_timeout_s == 2.5
    monkeypatch.setenv("MELANGE_SKY_LOCAL_LAUNCH_TIMEOUT", "soon")
    with pytest.raises(LaunchError, match="MELANGE_SKY_LOCAL_LAUNCH_TIMEOUT='soon': expected a number"):
        LocalBackend()


# -- secrets --------------------------------------------------------------------------------------------------------
def test_up_on_the_local_launcher_needs_no_model_token_but_still_the_replicas_api_key(tmp_path, cli, example,
                                                                                      write_config, monkeypatch):
    """An emulator downloads no weights: HF_TOKEN is passed when set, not required. A launcher that fetches the
    model (SkyPilot; no backend given) still requires it, and the local one still requires the replicas' API key."""
    from melange_sky.core.config import load_config
    from melange_sky.deploy.plan import PlanSettings
    from melange_sky.errors import MissingSecret
    from melange_sky.fleet.up import launch_secrets

    config = load_config(write_config(example))
    local = LocalBackend(tmp_path / "local")
    assert launch_secrets(config, PlanSettings(), {}, local) == {}
    assert launch_secrets(config, PlanSettings(), {"HF_TOKEN": "x"}, local) == {"HF_TOKEN": "x"}
    with pytest.raises(MissingSecret, match="^HF_TOKEN not set in the environment"):
        launch_secrets(config, PlanSettings(), {})
    keyed = load_config(write_config({**example, "deployment": {"api_key_secret": "REPLICA_KEY"}}, "keyed.json"))
    with pytest.raises(MissingSecret, match="^REPLICA_KEY not set"):
        launch_secrets(keyed, PlanSettings(), {"HF_TOKEN": "x"}, local)

    monkeypatch.setenv("MELANGE_SKY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    dry = cli("up", write_config(example), "--dryrun", "--backend", "local")
    assert dry.exit_code == 0 and "local launcher" in dry.stdout, dry.stderr
    assert "HF_TOKEN" not in dry.stdout  # the dry run does not ask for it either


# -- identity and refusals -----------------------------------------------------------------------------------------
def test_a_recycled_pid_is_not_taken_for_the_replica_it_once_was(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        me = process_id(sleeper.pid)
        assert me is not None and running(me)
        impostor = ProcessId(sleeper.pid, me.started - 1)  # same pid, another start: the replica's pid reused
        assert not running(impostor)
        backend = LocalBackend(tmp_path)
        with backend._state() as state:  # a replica recorded with that pid, whose own process died long ago
            state["clusters"]["fleet-a10g-0"] = {"status": "up", "kind": "replica", "pid": sleeper.pid,
                                                 "started": impostor.started, "port": 1, "log": "x", "offset": 0}
        assert backend.status(["fleet-a10g-0"])["fleet-a10g-0"].status is ClusterStatus.GONE
        assert backend.endpoint("fleet-a10g-0", 8000) is None
        assert running(me)  # the process now holding the pid was left alone
        assert backend.records() == {}
        assert backend.down("fleet-a10g-0") is False
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_model_the_engine_does_not_know_is_a_one_line_error_naming_the_fix(tmp_path):
    backend = LocalBackend(tmp_path)
    with pytest.raises(LaunchError) as caught:
        backend.launch(LaunchRequest(cluster="f-a10g-0", task=_gpu_task("acme/secret-model-9b")))
    message = str(caught.value)
    assert "\n" not in message and "deployment.model 'acme/secret-model-9b'" in message
    assert "llama-2-7b" in message and "config.json" in message
    with pytest.raises(InvalidTask):
        backend.validate(_gpu_task("acme/secret-model-9b"))
    with pytest.raises(InvalidTask, match="router"):
        backend.validate({"resources": {"ports": 8000}, "run": "python -m http.server"})
    assert backend.records() == {}


def test_the_emulator_models_the_engine_flags_the_task_gives_vllm():
    run = ('set -e\n  vllm serve "$MODEL_NAME" --host 0.0.0.0 --port "$PORT" --max-num-seqs 64 '
           '--gpu-memory-utilization 0.8 --no-enable-prefix-caching --quantization fp8 --tensor-parallel-size 2 '
           '--enable-lora')
    assert engine_settings(run) == {"max_num_seqs": 64, "gpu_memory_utilization": 0.8,
                                    "enable_prefix_caching": False, "dtype": "fp8", "tensor_parallel_size": 2}


def test_the_local_launcher_is_registered_by_name():
    assert isinstance(load_backend("local"), LocalBackend)
