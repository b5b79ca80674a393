"""Choosing a backend by name, the SkyPilot adapter's lazy import, and the test double's own contract."""
from __future__ import annotations

import dataclasses

import os
import subprocess
import sys
import textwrap
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

import melange_sky.fleet.backends as backends
from melange_sky.backends import Backend, ClusterStatus, LaunchRequest, ValidationLevel, load_backend
from melange_sky.errors import BackendError, CapacityError, InvalidTask, LaunchCancelled, LaunchError, UnknownBackend

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from fake_backend import FakeBackend, offer_of  # noqa: E402

A10G_TASK = {"resources": {"cloud": "aws", "region": "us-east-1", "instance_type": "g5.xlarge",
                           "accelerators": "A10G:1", "ports": 8000}, "run": "serve", "secrets": {"HF_TOKEN": None}}
# Loads without SkyPilot's catalog (no cloud, no instance type), so adapter unit tests never touch the network.
OFFLINE_TASK = {"resources": {"cpus": "1+", "ports": 8000}, "run": "serve", "secrets": {"HF_TOKEN": None}}
L4_TASK = {"resources": {"infra": "gcp/us-central1", "accelerators": {"L4": 1}}, "run": "serve"}


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=REPO)


# -- load_backend -------------------------------------------------------------------------------------------------
def test_skypilot_is_registered_in_the_entry_point_group():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group=backends.ENTRY_POINT_GROUP)}
    assert eps.get("skypilot") == "melange_sky.fleet.skypilot:SkyPilotBackend"


def test_default_backend_is_skypilot_and_loading_it_does_not_import_sky():
    result = run_python("""
        import sys
        from melange_sky.backends import load_backend
        backend = load_backend(None)
        print(type(backend).__name__, backend.name, "sky" in sys.modules)
        """, MELANGE_SKY_BACKEND="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SkyPilotBackend", "skypilot", "False"]


def test_a_plugin_is_loaded_through_its_entry_point(monkeypatch):
    plugin = metadata.EntryPoint(name="fake", value="fake_backend:FakeBackend", group=backends.ENTRY_POINT_GROUP)
    monkeypatch.setattr(backends, "_entry_points", lambda: {"fake": plugin})
    monkeypatch.delenv("MELANGE_SKY_FAKE_STATE", raising=False)
    backend = load_backend("fake")
    assert isinstance(backend, FakeBackend) and isinstance(backend, Backend)
    assert "fake" in backends.available_backends()


def test_module_class_path_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("MELANGE_SKY_FAKE_STATE", str(tmp_path / "fake.json"))
    backend = load_backend("fake_backend:FakeBackend")
    assert isinstance(backend, FakeBackend) and backend.path == tmp_path / "fake.json"


def test_environment_variable_chooses_the_backend_when_no_name_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("MELANGE_SKY_BACKEND", "fake_backend:FakeBackend")
    monkeypatch.setenv("MELANGE_SKY_FAKE_STATE", str(tmp_path / "fake.json"))
    assert isinstance(load_backend(None), FakeBackend)
    assert type(load_backend("skypilot")).__name__ == "SkyPilotBackend"  # an explicit name wins


def test_unknown_name_is_one_line_listing_the_available_backends():
    with pytest.raises(UnknownBackend) as err:
        load_backend("nosuch")
    message = str(err.value)
    assert "\n" not in message
    registered = sorted(ep.name for ep in metadata.entry_points(group="melange_sky.backends"))  # as installed
    assert "skypilot" in registered
    assert "unknown backend 'nosuch'" in message and f"available: {', '.join(registered)}" in message
    assert "module:Class" in message
    assert err.value.exit_code == 2


@pytest.mark.parametrize("spec, expected", [
    ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
    ("fake_backend:NoSuchClass", "has no 'NoSuchClass'"),
    ("fake_backend:offer_of", "could not be created"),
    ("melange_sky.fleet.ledger:ReplicaState", "could not be created"),
    ("melange_sky.fleet.ledger:NewReplica", "could not be created"),
    ("collections:OrderedDict", "does not implement the Backend interface"),
])
def test_a_bad_module_class_path_is_a_clear_error(spec, expected):
    with pytest.raises(UnknownBackend, match=expected):
        load_backend(spec)


def test_help_and_solve_never_import_sky_or_the_adapter():
    result = run_python("""
        import sys
        from click.testing import CliRunner
        from melange_sky.cli import main
        for args in (["--help"], ["solve", "--help"], ["solve", "examples/example.json", "-o", "/dev/null"]):
            out = CliRunner().invoke(main, args)
            assert out.exit_code == 0, (args, out.output)
        print(sorted(m for m in sys.modules if m == "sky" or m.startswith("sky.") or m.endswith("sky_adapter")))
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_launch_request_repr_never_shows_secret_values():
    request = LaunchRequest("demo-a10g-0", A10G_TASK, secrets={"HF_TOKEN": "hf_supersecret"})
    assert "hf_supersecret" not in repr(request)


# -- the test double keeps the interface's promises ---------------------------------------------------------------
@pytest.fixture
def fake(tmp_path):
    return FakeBackend(tmp_path / "fake.json")


def test_fake_reads_offers_from_the_task_resources():
    assert offer_of(A10G_TASK) == [{"cloud": "aws", "region": "us-east-1", "instance_type": "g5.xlarge",
                                    "accelerators": "a10g"}]
    assert offer_of(L4_TASK) == [{"cloud": "gcp", "region": "us-central1", "accelerators": "l4"}]


def test_fake_launch_status_endpoint_down_round_trip(fake):
    info = fake.launch(LaunchRequest("demo-a10g-0", A10G_TASK, secrets={"HF_TOKEN": "hf_secret_value"}, port=8000))
    assert info.status is ClusterStatus.UP and info.endpoint.endswith(":8000") and info.cloud == "aws"
    # Like SkyPilot's status, the fake's carries no endpoint: `endpoint()` gives it.
    assert fake.status(["demo-a10g-0", "nope"]) == {"demo-a10g-0": dataclasses.replace(info, endpoint=None),
                                                    "nope": fake.status(["nope"])["nope"]}
    assert fake.status(["nope"])["nope"].status is ClusterStatus.GONE
    assert fake.endpoint("demo-a10g-0", 8000) == info.endpoint
    assert "hf_secret_value" not in fake.path.read_text()  # secret values are never stored
    assert fake.down("demo-a10g-0") is True
    assert fake.down("demo-a10g-0") is False


def test_fake_capacity_failure_matches_the_offer_and_leaves_no_cluster(fake):
    fake.configure(capacity_failures=[{"cloud": "AWS", "instance_type": "g5.xlarge"}])
    with pytest.raises(CapacityError, match="no capacity"):
        fake.launch(LaunchRequest("demo-a10g-0", A10G_TASK))
    assert fake.status(["demo-a10g-0"])["demo-a10g-0"].status is ClusterStatus.GONE
    assert fake.launch(LaunchRequest("demo-l4-0", L4_TASK)).status is ClusterStatus.UP


def test_fake_capacity_failure_with_times_recovers(fake):
    fake.configure(capacity_failures=[{"accelerators": "l4", "times": 1}])
    with pytest.raises(CapacityError):
        fake.launch(LaunchRequest("demo-l4-0", L4_TASK))
    assert fake.launch(LaunchRequest("demo-l4-0", L4_TASK)).status is ClusterStatus.UP


def test_fake_hard_failure_leaves_an_init_cluster_that_down_removes(fake):
    fake.configure(hard_failures={"demo-a10g-1": "disk full"})
    with pytest.raises(LaunchError, match="demo-a10g-1: disk full") as err:
        fake.launch(LaunchRequest("demo-a10g-1", A10G_TASK))
    assert not isinstance(err.value, CapacityError)
    assert fake.status(["demo-a10g-1"])["demo-a10g-1"].status is ClusterStatus.INIT
    assert fake.down("demo-a10g-1") is True


def test_fake_down_failure_is_reported_and_retry_succeeds(fake):
    fake.add_cluster("demo-a10g-0")
    fake.configure(down_failures={"demo-a10g-0": "api timeout"})
    with pytest.raises(BackendError, match="api timeout"):
        fake.down("demo-a10g-0")
    fake.configure(down_failures={})
    assert fake.down("demo-a10g-0") is True


def test_fake_launches_concurrently_and_measures_it(fake):
    fake.configure(latency={"launch": 0.5})
    threads = [threading.Thread(target=fake.launch, args=(LaunchRequest(f"demo-a10g-{i}", A10G_TASK),))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.max_concurrency() == 6
    assert sorted(fake.clusters()) == [f"demo-a10g-{i}" for i in range(6)]


def test_fake_relaunch_of_an_up_cluster_reuses_it(fake):
    fake.launch(LaunchRequest("demo-a10g-0", A10G_TASK))
    fake.launch(LaunchRequest("demo-a10g-0", A10G_TASK))
    assert fake.launch_count("demo-a10g-0") == 1
    assert [c["outcome"] for c in fake.calls("launch")] == ["up", "reused"]


def test_fake_cancel_stops_an_in_flight_launch(fake):
    fake.configure(latency={"launch": 30})
    errors: list[BaseException] = []

    def launch() -> None:
        try:
            fake.launch(LaunchRequest("demo-a10g-0", A10G_TASK))
        except LaunchError as exc:
            errors.append(exc)

    worker = threading.Thread(target=launch)
    worker.start()
    deadline = time.monotonic() + 10
    while fake.cancel() == [] and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.join(10)
    assert not worker.is_alive() and isinstance(errors[0], LaunchCancelled)
    assert fake.status(["demo-a10g-0"])["demo-a10g-0"].status is ClusterStatus.INIT


def test_fake_state_is_shared_with_a_subprocess(fake):
    fake.configure(hard_failures={"demo-a10g-1": "boom"})
    result = run_python("""
        from melange_sky.backends import LaunchRequest, load_backend
        from melange_sky.errors import LaunchError
        backend = load_backend(None)
        backend.launch(LaunchRequest("demo-a10g-0", {"resources": {"cloud": "aws"}}, port=8000))
        try:
            backend.launch(LaunchRequest("demo-a10g-1", {"resources": {"cloud": "aws"}}))
        except LaunchError as exc:
            print(exc)
        """, MELANGE_SKY_BACKEND="fake_backend:FakeBackend", MELANGE_SKY_FAKE_STATE=str(fake.path),
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "demo-a10g-1: boom"
    assert fake.status(["demo-a10g-0"])["demo-a10g-0"].status is ClusterStatus.UP
    assert {c["pid"] for c in fake.calls("launch")} != {os.getpid()}


def test_fake_validate_requires_every_referenced_secret(fake):
    with pytest.raises(InvalidTask, match="HF_TOKEN"):
        fake.validate(A10G_TASK, {})
    assert fake.validate(A10G_TASK, {"HF_TOKEN": "x"}).level is ValidationLevel.SCHEMA


# -- SkyPilotBackend's mapping of SkyPilot's answers (SDK calls replaced; the live module runs the real server) -----
@pytest.fixture
def sky_sdk(monkeypatch):
    """The real `sky` module with its request functions replaced by ones that answer from `answers`."""
    sky = pytest.importorskip("sky")
    answers: dict[str, Any] = {}
    calls: list[tuple[str, Any]] = []

    def request(kind: str):
        def submit(*args: Any, **kwargs: Any) -> str:
            calls.append((kind, (args, kwargs)))
            return f"{kind}-request"
        return submit

    def get(request_id: str) -> Any:
        answer = answers[request_id.removesuffix("-request")]
        answer = answer() if callable(answer) else answer
        if isinstance(answer, BaseException):
            raise answer
        return answer

    for kind in ("launch", "status", "down", "endpoints", "api_cancel"):
        monkeypatch.setattr(sky, kind, request(kind))
    monkeypatch.setattr(sky, "get", get)
    return sky, answers, calls


def test_adapter_maps_skypilot_statuses_and_reports_unknown_clusters_gone(sky_sdk):
    from sky.utils import status_lib

    from melange_sky.fleet.skypilot import SkyPilotBackend

    sky, answers, calls = sky_sdk
    answers["status"] = [{"name": "f-a-0", "status": status_lib.ClusterStatus.UP, "cloud": "AWS", "region": "us-east-1",
                          "handle": None},
                         {"name": "f-a-1", "status": status_lib.ClusterStatus.INIT,
                          "init_status_reason": "ray\nunhealthy"},
                         {"name": "f-a-2", "status": status_lib.ClusterStatus.AUTOSTOPPING}]
    result = SkyPilotBackend().status(["f-a-0", "f-a-1", "f-a-2", "f-a-3"], refresh=True)
    assert {n: i.status for n, i in result.items()} == {"f-a-0": ClusterStatus.UP, "f-a-1": ClusterStatus.INIT,
                                                        "f-a-2": ClusterStatus.UP, "f-a-3": ClusterStatus.GONE}
    assert (result["f-a-0"].cloud, result["f-a-0"].region) == ("aws", "us-east-1")
    assert result["f-a-1"].message == "ray unhealthy"
    assert calls[-1][1][1]["refresh"] is sky.StatusRefreshMode.FORCE


def test_adapter_maps_no_capacity_to_capacity_error_with_the_reason_in_one_line(sky_sdk):
    from sky import exceptions as sky_exc

    from melange_sky.fleet.skypilot import SkyPilotBackend

    _sky, answers, calls = sky_sdk
    answers["launch"] = sky_exc.ResourcesUnavailableError("Failed to acquire resources in all zones\nof us-east-1")
    with pytest.raises(CapacityError) as err:
        SkyPilotBackend().launch(LaunchRequest("f-a10g-0", OFFLINE_TASK, secrets={"HF_TOKEN": "hf_x"}, down=True,
                                               retry_until_up=True, idle_minutes_to_autostop=30))
    assert str(err.value) == ("f-a10g-0: no capacity: Failed to acquire resources in all zones of us-east-1 "
                              "(logs: sky api logs launch-request)")
    (task,), options = calls[0][1]
    assert options == {"cluster_name": "f-a10g-0", "retry_until_up": True, "idle_minutes_to_autostop": 30,
                       "down": True}
    assert {k: v.get_secret_value() for k, v in task.secrets.items()} == {"HF_TOKEN": "hf_x"}  # in memory only


def test_adapter_turns_other_skypilot_failures_into_launch_errors(sky_sdk):
    from melange_sky.fleet.skypilot import SkyPilotBackend

    _sky, answers, _calls = sky_sdk
    answers["launch"] = RuntimeError("\x1b[31mprovisioning\nfailed\x1b[0m")
    with pytest.raises(LaunchError, match=r"^f-a10g-0: RuntimeError: provisioning failed \(logs") as err:
        SkyPilotBackend().launch(LaunchRequest("f-a10g-0", OFFLINE_TASK, secrets={"HF_TOKEN": "x"}))
    assert not isinstance(err.value, CapacityError)


def test_adapter_down_treats_cluster_does_not_exist_as_already_gone(sky_sdk):
    from sky import exceptions as sky_exc

    from melange_sky.fleet.skypilot import SkyPilotBackend

    _sky, answers, _calls = sky_sdk
    answers["down"] = sky_exc.ClusterDoesNotExist("Cluster 'f-a-0' does not exist.")
    assert SkyPilotBackend().down("f-a-0") is False
    answers["down"] = None
    assert SkyPilotBackend().down("f-a-0") is True
    answers["down"] = RuntimeError("cloud said no")
    with pytest.raises(BackendError, match="f-a-0: teardown failed: RuntimeError: cloud said no"):
        SkyPilotBackend().down("f-a-0")


def test_adapter_cancel_cancels_the_in_flight_launch_request(sky_sdk):
    from sky import exceptions as sky_exc

    from melange_sky.fleet.skypilot import SkyPilotBackend

    _sky, answers, calls = sky_sdk
    cancelled = threading.Event()
    answers["api_cancel"] = lambda: cancelled.set()
    answers["launch"] = lambda: (sky_exc.RequestCancelled("cancelled by another process")
                                 if cancelled.wait(10) else RuntimeError("never cancelled"))
    backend = SkyPilotBackend()
    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(
        LaunchError, backend.launch, LaunchRequest("f-a10g-0", OFFLINE_TASK, secrets={"HF_TOKEN": "x"})).value))
    worker.start()
    deadline = time.monotonic() + 10
    while not any(kind == "launch" for kind, _ in calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert backend.cancel() == ["f-a10g-0"]
    worker.join(10)
    assert isinstance(errors[0], LaunchCancelled)
    assert ("api_cancel", ((["launch-request"],), {"silent": True})) in calls


def test_adapter_reports_a_launched_cluster_up_even_when_its_endpoint_lookup_fails(sky_sdk):
    import types

    from melange_sky.fleet.skypilot import SkyPilotBackend

    _sky, answers, _calls = sky_sdk
    answers["launch"] = (1, types.SimpleNamespace(head_ip="10.0.0.9", launched_resources=None))
    answers["endpoints"] = ConnectionError("API server went away")  # a failure, not a "not up" answer
    info = SkyPilotBackend().launch(LaunchRequest("f-a10g-0", OFFLINE_TASK, secrets={"HF_TOKEN": "x"}, port=8000))
    assert info.status is ClusterStatus.UP and info.endpoint is None and info.head_ip == "10.0.0.9"


def test_debug_shows_the_libraries_log_lines_for_that_command_only(cli, monkeypatch, tmp_path):
    import logging  # noqa: PLC0415

    import melange_sky.cli.plan as plan_cli  # noqa: PLC0415
    from melange_sky.fleet.skypilot import SKY_LOG  # noqa: PLC0415

    logger = logging.getLogger("melange_sky")
    before = (list(logger.handlers), logger.level)
    shown = plan_cli.default_catalog

    def logging_catalog():  # stands in for SkyPilot saying something while a command runs
        SKY_LOG.error("Failed to fetch aws catalog aws/vms.csv.")
        return shown()

    monkeypatch.setattr(plan_cli, "default_catalog", logging_catalog)
    debug = cli("catalog", "A10G", "--debug")
    assert debug.exit_code == 0, debug.stderr
    assert debug.stderr == "[skypilot] Failed to fetch aws catalog aws/vms.csv.\n"
    quiet = cli("catalog", "A10G")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert (list(logger.handlers), logger.level) == before
