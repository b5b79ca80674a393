"""SkyPilotBackend against the real SkyPilot library and its real local API server (no cloud credentials needed).

The module fixture points SkyPilot at a private port (SKYPILOT_API_SERVER_LOCAL_PORT), so it never talks to, nor
stops, an API server someone else runs on the default 46580; the SDK of the module's first client (a child process,
started as the module starts) starts the server on first use (≈ 15-25 s). The tests that need no server (validation,
which SkyPilot does in the calling process, and `up --dryrun` in child processes) come first and run while it boots;
every test after them uses that one server, and the fixture stops it (`sky.api_stop()`) even when a test fails. The
session HOME is temporary (conftest), so SkyPilot's state lives there; the last check proves nothing was written
under the real ~/.sky.
"""
from __future__ import annotations

import json
import os
import pwd
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import free_port

from melange_sky.backends import ClusterStatus, LaunchRequest, ValidationLevel
from melange_sky.errors import CapacityError, InvalidTask, LaunchError
from melange_sky.fleet.skypilot import SkyPilotBackend

# One worker runs the whole module (pytest-xdist's loadgroup): one private API server, started once, stopped once.
pytestmark = [pytest.mark.skypilot_server, pytest.mark.xdist_group("skypilot_server")]

T = TypeVar("T")
REAL_SKY_DIR = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".sky"
# The first answer of a freshly started server took ≈ 15-22 s on these machines; allow for a slow shared CI box.
SLOW_CALL_S = 180.0
SECRET = "hf_live_test_secret_value_5f3a"
NO_CLOUD_TASK = {"resources": {"cpus": "1+"}, "run": "echo hello", "secrets": {"HF_TOKEN": None}}


def within(seconds: float, fn: Callable[[], T]) -> T:
    """Run fn in a thread and fail the test (instead of hanging the suite) if it takes longer than `seconds`."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"SkyPilot call took longer than {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]



def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_api_port() -> int:
    """A port for a private SkyPilot API server whose queue manager's port is free too: SkyPilot derives that one
    (50000 + (50011 - 50000 + port - 46580) mod 10000, in the ephemeral range) and refuses to start when it is
    taken, which a plain free port left to chance (1 start in 3 failed on a busy machine). The API port itself is
    drawn below the ephemeral range, where no client socket takes it meanwhile."""
    from sky.server import common as server_common  # noqa: PLC0415 - only this live module pays for sky
    from sky.server.requests.queues import mp_queue  # noqa: PLC0415

    for port in random.Random().sample(range(20000, 32000), 500):
        offset = port - server_common.DEFAULT_SERVER_PORT
        queue = 50000 + (mp_queue.DEFAULT_QUEUE_MANAGER_PORT - 50000 + offset) % 10000
        if _bindable(port) and _bindable(queue):
            return port
    raise AssertionError("no free port pair for a SkyPilot API server")


def _snapshot(path: Path) -> list[tuple[str, float]] | None:
    if not path.exists():
        return None
    return sorted((str(p), p.stat().st_mtime) for p in path.rglob("*") if p.is_file())


#: What the module's first SkyPilot client runs, in a child process as a user's command would: the SDK starts the
#: private API server on first use, then answers a status and a down. It leaves the server running for this module.
_FIRST_CLIENT = (
    "from melange_sky.fleet.skypilot import SkyPilotBackend\n"
    "backend = SkyPilotBackend()\n"
    "print('status:', backend.status(['no-such-cluster'])['no-such-cluster'].status.value, flush=True)\n"
    "print('down:', backend.down('no-such-cluster'), flush=True)\n")


def _fresh_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("NO_PROXY", "SKY_RUNTIME_DIR",
                                                                    "SKYPILOT_API_SERVER_LOCAL_PORT")}
    # A proxy on a closed port for everything but this machine: SkyPilot's catalog download fails at once, online
    # or not, and its local API server still answers.
    closed = f"http://127.0.0.1:{free_port()}"
    return {**env, "HOME": str(home), "MELANGE_SKY_HOME": str(home / "melange"), "HTTPS_PROXY": closed,
            "HTTP_PROXY": closed, "NO_PROXY": "127.0.0.1,localhost", "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
            "FORCE_COLOR": "1", **extra}


def _melange_sky(*runs: tuple[Path, list[str]]) -> list[subprocess.CompletedProcess]:
    """`melange-sky ARGS` in a fresh process per (HOME, ARGS), side by side (they share nothing): each one's run."""
    procs = []
    for home, args in runs:
        home.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "melange_sky.cli", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=_fresh_env(home), cwd=home))
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=SLOW_CALL_S)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
                other.communicate()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


@pytest.fixture(scope="module", autouse=True)
def sky_server_boot(session_home) -> Iterator[dict[str, Any]]:
    """Start the module's private SkyPilot API server as the module starts, without waiting for it: its first client
    (a child process, see test_talking_to_skypilots_api_server_prints_nothing_of_skypilots) boots it while the tests
    that need no server run. Stopped at the end whatever happened (after its first client is done, if it is not)."""
    real_before = _snapshot(REAL_SKY_DIR)
    assert Path.home() == session_home, "conftest must point HOME at the session's temporary directory"
    saved_port = os.environ.get("SKYPILOT_API_SERVER_LOCAL_PORT")
    port = str(_free_api_port())
    os.environ["SKYPILOT_API_SERVER_LOCAL_PORT"] = port
    import sky  # noqa: PLC0415 - only this live module pays for it
    from sky.client import sdk  # noqa: PLC0415
    from sky.server import common as server_common  # noqa: PLC0415

    server_common.get_server_url.cache_clear()  # the URL is cached process-wide; make it see the private port
    boot: dict[str, Any] = {"real_before": real_before}
    try:
        # The server keeps its state in the session HOME, as this process's SDK calls expect; the child sees
        # SkyPilot's colours forced on and every network address but this machine closed.
        boot["proc"] = subprocess.Popen(
            [sys.executable, "-c", _FIRST_CLIENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=session_home, env=_fresh_env(session_home, SKYPILOT_API_SERVER_LOCAL_PORT=port))
        yield boot
    finally:
        try:
            if "proc" in boot:
                _first_client_done(boot)  # a server is stopped only once its first client has started it
            sky.api_stop()
            assert not sdk._local_api_server_running(), "the SkyPilot API server is still running"  # noqa: SLF001
        finally:
            if saved_port is None:
                os.environ.pop("SKYPILOT_API_SERVER_LOCAL_PORT", None)
            else:
                os.environ["SKYPILOT_API_SERVER_LOCAL_PORT"] = saved_port
            server_common.get_server_url.cache_clear()


def _first_client_done(boot: dict[str, Any]) -> subprocess.CompletedProcess:
    """The first client's run, once it has ended (after the server answered it twice); killed past SLOW_CALL_S."""
    if "first_client" not in boot:
        proc: subprocess.Popen = boot["proc"]
        try:
            out, err = proc.communicate(timeout=SLOW_CALL_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        boot["first_client"] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return boot["first_client"]


@pytest.fixture(scope="module")
def sky_server(sky_server_boot) -> dict[str, Any]:
    """The module's private SkyPilot API server, started: its first client has ended (the test below says how)."""
    _first_client_done(sky_server_boot)
    return sky_server_boot


@pytest.fixture(scope="module")
def validator(sky_catalog_home) -> SkyPilotBackend:
    """The adapter with SkyPilot's catalog at hand (the bundled snapshot, seeded), so it validates in this process as
    a user's machine does (SkyPilot validates in its caller, no API server involved); the tests of the offline
    fallbacks take it away themselves."""
    return SkyPilotBackend()


@pytest.fixture(scope="module")
def backend(sky_server, sky_catalog_home) -> SkyPilotBackend:
    """The adapter with the module's API server to talk to (status, down, endpoint, launch)."""
    return SkyPilotBackend()


@pytest.fixture
def live_fleet_env(monkeypatch, tmp_path, sky_catalog_home):
    monkeypatch.setenv("MELANGE_SKY_HOME", str(tmp_path / "melange-home"))
    monkeypatch.delenv("MELANGE_SKY_BACKEND", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return tmp_path


# ---- while the server boots: validation (in this process and in child processes) and `up --dryrun` ----------
# Listed first, so they run while the module's first client boots the API server; none of them talks to it.
# SkyPilot's own log lines stay out of melange-sky's output (shown with --debug): in child processes, since
# SkyPilot's handler writes to the stdout it saw at import, which only a fresh process shows as a user would see
# it. Each gets its own fresh HOME (so SkyPilot has no catalog and must try to fetch one).

def test_up_dryrun_keeps_skypilots_catalog_messages_out_of_its_output_unless_debug(tmp_path, example, write_config):
    # One GPU type, one replica: one task to validate (each validation without a catalog is a child process).
    example["gpu_info"] = {"A10G": example["gpu_info"]["A10G"]}
    example["workload_distribution"] = [[0.5, 0.5], [0, 0]]
    example["total_request_rate"] = 1.0
    config = write_config(example, "one-a10g.json")
    quiet, debug = _melange_sky((tmp_path / "quiet", ["up", config, "--dryrun"]),
                                (tmp_path / "debug", ["up", config, "--dryrun", "--debug"]))
    assert quiet.returncode == 0, quiet.stderr
    assert "would launch 1 replica(s)" in quiet.stdout and "full" in quiet.stdout  # it did validate
    for stream in (quiet.stdout, quiet.stderr):
        assert "Failed to fetch" not in stream and "catalog common/accelerators.csv" not in stream
        assert "\x1b[" not in stream
    assert quiet.stderr == ""

    assert debug.returncode == 0, debug.stderr
    assert "[skypilot] Failed to fetch common catalog common/accelerators.csv." in debug.stderr
    assert "\x1b[" not in debug.stderr  # shown, but without colour codes
    assert debug.stdout == quiet.stdout


def test_offline_validation_uses_the_bundled_catalog_snapshot_in_a_child_process(monkeypatch):
    import requests  # noqa: PLC0415

    def offline(self, task, secrets, catalog="SkyPilot's catalog"):
        raise requests.exceptions.ConnectionError("network is unreachable (injected)")

    monkeypatch.setattr(SkyPilotBackend, "_validate_full", offline)  # this process only; the child is untouched
    backend = SkyPilotBackend()
    task = {"resources": {"cloud": "aws", "region": "us-west-2", "instance_type": "g5.xlarge",
                          "accelerators": "A10G:1", "ports": 8000}, "secrets": {"HF_TOKEN": None}, "run": "serve"}
    result = within(120, lambda: backend.validate(task))
    assert result.level is ValidationLevel.FULL
    assert "bundled catalog snapshot" in result.detail and "g5.xlarge $1.01/h" in result.detail
    wrong = {**task, "resources": {**task["resources"], "accelerators": "H100:1"}}  # g5.xlarge has no H100
    with pytest.raises(InvalidTask):
        within(120, lambda: backend.validate(wrong))


def test_validate_falls_back_to_schema_only_when_the_catalog_cannot_be_downloaded(monkeypatch):
    import requests  # noqa: PLC0415
    from sky.catalog import common as catalog_common  # noqa: PLC0415

    # A cloud whose catalog no test has seeded into the session HOME, so SkyPilot must try to download it.
    # (Clouds outside melange-sky's bundled snapshot: for those, the bundled-catalog fallback cannot help either.)
    cloud, instance_type = next(((c, i) for c, i in (("runpod", "1x_A100-80GB_SECURE"),
                                                     ("fluidstack", "A100_PCIE_80GB::1"))
                                 if not Path(catalog_common.get_catalog_path(f"{c}/vms.csv")).exists()),
                                (None, None))
    if cloud is None:
        pytest.skip("every candidate cloud's catalog is present; nothing to download")

    class Offline:
        exceptions = requests.exceptions

        @staticmethod
        def get(*_args: Any, **_kwargs: Any) -> None:
            raise requests.exceptions.ConnectionError("network is unreachable (injected)")

    monkeypatch.setattr(catalog_common, "requests", Offline)
    task = {"resources": {"cloud": cloud, "instance_type": instance_type}, "run": "serve"}
    backend = SkyPilotBackend()  # a fresh one: the module's backend may already know it is offline
    result = within(60, lambda: backend.validate(task))
    assert result.level is ValidationLevel.SCHEMA
    assert "could not download its catalog" in result.detail and "injected" in result.detail
    with pytest.raises(InvalidTask, match="nonsense_field"):  # the schema is still enforced
        within(60, lambda: backend.validate({**task, "nonsense_field": 1}))


def test_validate_accepts_a_good_task_and_says_how_deeply(validator):
    from sky.catalog import common as catalog_common  # noqa: PLC0415

    task = {"resources": {"cloud": "aws", "instance_type": "g5.xlarge", "accelerators": "A10G:1", "ports": 8000},
            "envs": {"MODEL": "meta-llama/Llama-2-7b-chat-hf"}, "secrets": {"HF_TOKEN": None}, "run": "serve"}
    catalog_present = (Path(catalog_common.get_catalog_path("aws/vms.csv")).exists()
                       and Path(catalog_common.get_catalog_path("common/accelerators.csv")).exists())
    result = validator.validate(task, {"HF_TOKEN": SECRET})
    if catalog_present:
        assert result.level is ValidationLevel.FULL and "g5.xlarge $" in result.detail
    else:  # offline and no catalog: SkyPilot validates against melange-sky's bundled snapshot, and says so
        assert result.level is ValidationLevel.FULL and "bundled catalog snapshot" in result.detail


@pytest.mark.parametrize("task, expected", [
    ({"resources": {"accelerators": "A10G:1"}, "run": "serve", "nonsense_field": 1}, "nonsense_field"),
    ({"resources": {"accelerators": "A10G:1"}, "run": "serve", "envs": {"MODEL": None}}, "MODEL"),
    ({"resources": {"cloud": "aws", "ports": "not-a-port"}, "run": "serve"}, "not-a-port"),
])
def test_validate_rejects_a_bad_task_in_one_line(validator, task, expected):
    with pytest.raises(InvalidTask) as err:
        within(60, lambda: validator.validate(task))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_cli_up_dryrun_with_skypilot_and_no_credentials_says_what_a_real_launch_needs(live_fleet_env, cli):
    from conftest import REPO  # noqa: PLC0415

    result = within(SLOW_CALL_S, lambda: cli("up", str(REPO / "examples" / "example.json"), "--dryrun"))
    assert result.exit_code == 0, result.stderr
    assert "would launch 4 replica(s); nothing was provisioned" in result.stdout
    assert "run `sky check`" in result.stdout and "aws, azure" in result.stdout


def test_a_task_skypilot_refuses_leaves_the_processs_tracebacks_whole():
    """SkyPilot hides a schema error's traceback by setting `sys.tracebacklimit = 0`, and never puts it back when the
    error leaves; the adapter does, so `--debug` and a router's internal-error log in the same process keep theirs."""
    before = getattr(sys, "tracebacklimit", None)
    with pytest.raises(InvalidTask, match="nonsense_field"):
        SkyPilotBackend().validate({"resources": {"accelerators": "A10G:1"}, "run": "serve", "nonsense_field": 1})
    assert getattr(sys, "tracebacklimit", None) == before


# ---- through the module's API server ---------------------------------------------------------------------------

def test_clusters_skypilot_does_not_know_are_gone(backend, sky_server):
    start = time.monotonic()
    answer = within(SLOW_CALL_S, lambda: backend.status(["msky-live-a10g-0", "msky-live-l4-0"]))
    sky_server["first_status_s"] = time.monotonic() - start
    assert {name: info.status for name, info in answer.items()} == {
        "msky-live-a10g-0": ClusterStatus.GONE, "msky-live-l4-0": ClusterStatus.GONE}
    refreshed = within(SLOW_CALL_S, lambda: backend.status(["msky-live-a10g-0"], refresh=True))
    assert refreshed["msky-live-a10g-0"].status is ClusterStatus.GONE


def test_down_of_an_unknown_cluster_is_already_gone_twice(backend, sky_server):
    start = time.monotonic()
    assert within(SLOW_CALL_S, lambda: backend.down("msky-live-a10g-0")) is False
    sky_server["down_unknown_s"] = time.monotonic() - start
    assert within(SLOW_CALL_S, lambda: backend.down("msky-live-a10g-0", purge=True)) is False


def test_endpoint_of_an_unknown_cluster_is_none(backend):
    assert within(SLOW_CALL_S, lambda: backend.endpoint("msky-live-a10g-0", 8000)) is None


def test_launch_without_an_enabled_cloud_fails_in_one_line_with_skypilots_reason(backend, session_home):
    request = LaunchRequest("msky-live-cpu-0", NO_CLOUD_TASK, secrets={"HF_TOKEN": SECRET})
    with pytest.raises(LaunchError) as err:
        within(SLOW_CALL_S, lambda: backend.launch(request))
    assert not isinstance(err.value, CapacityError)
    message = str(err.value)
    assert message.startswith("msky-live-cpu-0: no cloud enabled in SkyPilot")
    assert "sky check" in message and "\n" not in message and "\x1b" not in message and "Traceback" not in message
    assert within(SLOW_CALL_S, lambda: backend.status(["msky-live-cpu-0"]))["msky-live-cpu-0"].status \
        is ClusterStatus.GONE
    assert backend.cancel() == []  # nothing left in flight
    leaked = [p for p in session_home.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == [], "the secret value reached a file"


# ---- the CLI's real code path: `up`, `status --refresh` and `down` with the default (SkyPilot) backend ----------

def test_cli_status_refresh_and_down_treat_clusters_skypilot_does_not_know_as_gone(sky_server, live_fleet_env, cli):
    from melange_sky.fleet.ledger import Ledger, NewReplica, ReplicaState  # noqa: PLC0415

    with Ledger() as ledger:  # a fleet the ledger believes is up, whose clusters SkyPilot has never seen
        ledger.save_fleet("ghost", "0" * 16, {"fleet": "ghost"})
        for name in ("ghost-a10g-0", "ghost-a100-80gb-0"):
            ledger.add_replica("ghost", NewReplica(cluster=name, gpu="A10G", offer="aws:us-west-2:g5.xlarge",
                                                   price_per_hour=1.01))
            ledger.transition(name, ReplicaState.LAUNCHING)
            ledger.transition(name, ReplicaState.UP, endpoint="10.1.2.3:8000")
    status = within(SLOW_CALL_S, lambda: cli("status", "ghost", "--refresh", "--json"))
    assert status.exit_code == 0, status.stderr
    states = {r["cluster"]: r["state"] for r in json.loads(status.stdout)["fleets"][0]["replicas"]}
    assert states == {"ghost-a10g-0": "gone", "ghost-a100-80gb-0": "gone"}
    down = within(SLOW_CALL_S, lambda: cli("down", "ghost", "-y"))
    assert down.exit_code == 0, down.stderr
    assert "removed from the ledger" in down.stdout
    with Ledger() as ledger:
        assert ledger.get_fleet("ghost") is None


def test_cli_up_without_enabled_clouds_fails_in_one_line_marks_replicas_failed_and_down_clears_them(
        sky_server, live_fleet_env, cli, example, write_config):
    from melange_sky.fleet.ledger import Ledger, ReplicaState  # noqa: PLC0415

    example["gpu_info"] = {"A10G": example["gpu_info"]["A10G"]}
    example["workload_distribution"] = [[0.5, 0.5], [0, 0]]
    example["total_request_rate"] = 1.0  # one A10G replica
    config = write_config(example, "live.json")
    result = within(SLOW_CALL_S * 2, lambda: cli("up", config, "-y"))
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    with Ledger() as ledger:
        rows = ledger.replicas("live")
        assert [r.state for r in rows] == [ReplicaState.FAILED]
        reason = rows[0].last_error
    assert "\n" not in reason and ("sky check" in reason or "network" in reason), reason
    assert reason[:60] in result.stdout + result.stderr
    down = within(SLOW_CALL_S, lambda: cli("down", "live", "-y"))
    assert down.exit_code == 0, down.stderr
    with Ledger() as ledger:
        assert ledger.get_fleet("live") is None
    leaked = [p for p in live_fleet_env.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_talking_to_skypilots_api_server_prints_nothing_of_skypilots(sky_server):
    """The module's first client (the sky_server fixture's child process) started the API server and asked it twice:
    its output is melange-sky's alone, with no "Starting SkyPilot API server", spinner or colour codes."""
    done = sky_server["first_client"]
    assert done.returncode == 0, done.stderr
    assert done.stdout == "status: gone\ndown: False\n"
    assert done.stderr == ""


def test_nothing_was_written_under_the_real_sky_dir(sky_server):
    """Runs last in this module: the server and SDK kept all their state in the session's temporary HOME."""
    assert _snapshot(REAL_SKY_DIR) == sky_server["real_before"]
    assert (Path.home() / ".sky").is_dir()
