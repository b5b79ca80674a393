"""The local launcher (`--backend local`): a real fleet on this machine — emulated GPU replicas of two types behind
the real router — driven by the unchanged CLI: up, a request through the endpoint, status, a replica killed from
outside that `watch` replaces, and a `down` that leaves no process. Plus the process identity check (a recycled pid
is not a replica) and the one-line errors of a task the launcher cannot run."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from melange_sky.errors import InvalidTask, LaunchError
from melange_sky.fleet.backends import ClusterStatus, LaunchRequest, load_backend
from melange_sky.fleet.local import LocalBackend, ProcessId, engine_settings, process_id, running

FLEET = "localfleet"
A10G, A100, ROUTER = f"{FLEET}-a10g-0", f"{FLEET}-a100-80gb-0", f"{FLEET}-router"


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


@pytest.fixture
def local_env(tmp_path, monkeypatch, example, write_config):
    """A fresh MELANGE_SKY_HOME, the local launcher chosen by the environment, and a config of one A10G and one
    A100-80GB with bucket edges (so a router is launched) at 20x speed. Kills whatever a failed test left."""
    home = tmp_path / "home"
    monkeypatch.setenv("MELANGE_SKY_HOME", str(home))
    monkeypatch.setenv("MELANGE_SKY_BACKEND", "local")
    monkeypatch.setenv("HF_TOKEN", "unused-by-emulators")
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    monkeypatch.delenv("MELANGE_SKY_LOCAL_SPEED", raising=False)
    example.update(name=FLEET, total_request_rate=3, input_buckets=[1, 25, 100], output_buckets=[1, 25, 100],
                   deployment={"local": {"speed": 20}})
    for gpu in ("A10G", "A100-80GB"):  # one of each
        example["gpu_info"][gpu].update(min_count=1, max_count=1)
    config = write_config(example, "local.json")
    seen: set[int] = set()
    yield config, home, seen
    for record in LocalBackend(home / "local").records().values():
        seen.add(int(record["pid"]))
    for pid in seen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _reap(pid)


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
    key = json.loads((home / "keys" / f"{FLEET}.json").read_text())["api_key"]
    request = urllib.request.Request(f"{fleet['endpoint']}/v1/completions", method="POST",
                                     data=json.dumps({"model": "meta-llama/Llama-2-7b-chat-hf", "prompt": "Hello",
                                                      "max_tokens": 5}).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        body = json.loads(answer.read())
    assert body["usage"]["completion_tokens"] == 5 and body["object"] == "text_completion"

    # Each replica has its log; the emulator says what it emulates, at the config's speed.
    for cluster in (A10G, A100):
        log = (home / "local" / "logs" / f"{cluster}.log").read_text()
        assert "Emulating llama-2-7b on" in log and "At 20x speed" in log and "Listening on" in log
    assert "Listening on http://127.0.0.1:" in (home / "local" / "logs" / f"{ROUTER}.log").read_text()

    # Killed from outside: the next status sees it gone, and one pass of watch brings it back (a new process).
    victim = ProcessId(int(records[A10G]["pid"]), int(records[A10G]["started"]))
    os.kill(victim.pid, signal.SIGKILL)
    assert _wait(lambda: not running(victim))
    _reap(victim.pid)
    assert _states(cli("status", FLEET, "--refresh", "--json")) == {A10G: "gone", A100: "up"}
    watch = cli("watch", FLEET, "--once")
    assert watch.exit_code == 0, watch.stderr + watch.stdout
    healed = _records(home)[A10G]
    seen.add(int(healed["pid"]))
    assert healed["status"] == "up" and int(healed["pid"]) != victim.pid
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


def _gpu_task(model: str, run: str = 'vllm serve "$MODEL_NAME" --host 0.0.0.0 --port "$PORT"') -> dict:
    return {"resources": {"accelerators": "A10G:1", "ports": 8000}, "envs": {"MODEL_NAME": model}, "run": run}


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


def test_a_speed_given_to_the_launcher_reaches_the_emulator(tmp_path):
    backend = LocalBackend(tmp_path, speed=7)
    info = backend.launch(LaunchRequest(cluster="f-a10g-0", task=_gpu_task("llama-2-7b")))
    try:
        assert info.status is ClusterStatus.UP and info.endpoint is not None
        assert "At 7x speed" in backend.log_path("f-a10g-0").read_text()
        assert set(backend.leftovers()) == set()  # a known cluster's process is not a leftover
    finally:
        assert backend.down("f-a10g-0") is True
    assert backend.leftovers() == {} and backend.records() == {}


def test_the_local_launcher_is_registered_by_name():
    assert isinstance(load_backend("local"), LocalBackend)
