"""The controller hosted with the fleet (`up --controller hosted`): on the local launcher the router's task runs
`watch --hosted` beside `serve`, so the whole story runs here — a replica killed from outside is healed by the
hosted controller with no `watch` run by the test, `status` shows the controller's last pass, and `down` stops the
controller first and leaves no process. Plus the router task that carries it, rendered and validated by SkyPilot,
and where `up` puts the controller when asked nothing."""
from __future__ import annotations

import configparser
import contextlib
import dataclasses
import http.client
import ipaddress
import json
import os
import signal
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from melange_sky.core.config import load_config
from melange_sky.deploy.plan import PlanSettings
from melange_sky.deploy.router_task import (ROUTER_REQUIREMENTS, HostedController, build_router_plan,
                                            router_certfile)
from melange_sky.errors import ControllerError
from melange_sky.fleet.ledger import Ledger
from melange_sky.fleet.local import LocalBackend, ProcessId, running
from melange_sky.fleet.up import controller_choice, skypilot_api_server
from test_router_tls import make_pair, serving_https

FLEET = "hostedfleet"
A10G, A100, ROUTER = f"{FLEET}-a10g-0", f"{FLEET}-a100-80gb-0", f"{FLEET}-router"
ROOT = Path(__file__).resolve().parent.parent
HF_TOKEN = "hf-secret-7d1c9a"  # handed to the hosted controller as a secret: never in a file


def _wait(predicate, timeout: float = 60.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@pytest.fixture
def hosted_env(tmp_path, monkeypatch, example, write_config):
    """A fresh home, the local launcher, one A10G and one A100-80GB (with bucket edges: a router) at 20x speed.
    Kills whatever a failed test left."""
    home = tmp_path / "home"
    monkeypatch.setenv("MELANGE_SKY_HOME", str(home))
    monkeypatch.setenv("MELANGE_SKY_BACKEND", "local")
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    monkeypatch.delenv("MELANGE_SKY_LOCAL_SPEED", raising=False)
    example.update(name=FLEET, total_request_rate=3, input_buckets=[1, 25, 100], output_buckets=[1, 25, 100],
                   deployment={"local": {"speed": 20}})
    for gpu in ("A10G", "A100-80GB"):
        example["gpu_info"][gpu].update(min_count=1, max_count=1)
    example["gpu_info"]["A10G"]["use_spot"] = True  # a fleet with spot: its controller is hosted by default
    config = write_config(example, "hosted.json")
    seen: set[int] = set()
    yield config, home, seen
    for record in LocalBackend(home / "local").records().values():
        seen.add(int(record["pid"]))
    for pid in seen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _reap(pid)


def _status(cli) -> dict:
    answer = cli("status", FLEET, "--json")
    assert answer.exit_code == 0, answer.stderr + answer.stdout
    [fleet] = json.loads(answer.stdout)["fleets"]
    return fleet


def _group_alive(leader: int) -> bool:
    """Any process of the group `leader` started (the router's: bash, serve, the controller) still runs."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == leader and fields[0] not in ("Z", "X"):
                    return True
    return False


def test_the_hosted_controller_heals_a_killed_replica_status_shows_its_pass_and_down_stops_it_first(cli, hosted_env):
    config, home, seen = hosted_env
    up = cli("up", config, "-y", "--controller-interval", "1")
    assert up.exit_code == 0, up.stderr + up.stdout
    records = LocalBackend(home / "local").records()
    assert set(records) == {A10G, A100, ROUTER}
    seen.update(int(r["pid"]) for r in records.values())
    router_pid = int(records[ROUTER]["pid"])

    # The controller adopts the fleet `up` handed over, and its passes reach `status` through the router.
    assert _wait(lambda: (_status(cli)["controller"] or {}).get("last_pass_at") is not None), \
        (home / "local" / "logs" / f"{ROUTER}.log").read_text()
    assert _status(cli)["controller"]["mode"] == "hosted"

    # A replica killed from outside: the hosted controller relaunches it (a new process), no `watch` run here.
    victim = ProcessId(int(records[A10G]["pid"]), int(records[A10G]["started"]))
    os.kill(victim.pid, signal.SIGKILL)
    assert _wait(lambda: not running(victim))
    _reap(victim.pid)

    def healed() -> bool:
        record = LocalBackend(home / "local").records().get(A10G)
        return record is not None and record["status"] == "up" and int(record["pid"]) != victim.pid

    assert _wait(healed), (home / "local" / "logs" / f"{ROUTER}.log").read_text()
    seen.add(int(LocalBackend(home / "local").records()[A10G]["pid"]))
    log = (home / "local" / "logs" / f"{ROUTER}.log").read_text()
    assert f"watch {FLEET}: adopted: " in log and f"watch {FLEET}: relaunch: not up: {A10G}" in log

    # The relaunch is one event in the controller's own ledger (on its host), not in the user's.
    host_home = home / "local" / "clusters" / ROUTER / "melange-sky-router" / "home"
    with Ledger(host_home) as theirs:
        assert [e.message for e in theirs.history(fleet=FLEET, kind="relaunch")]
    with Ledger(home) as ours:
        assert not ours.history(fleet=FLEET, kind="relaunch")

    # status learns the relaunch from the controller and shows its last pass and health in one line.
    def shown() -> bool:
        fleet = _status(cli)
        states = {r["cluster"]: r["state"] for r in fleet["replicas"]}
        return states == {A10G: "up", A100: "up"} and fleet["controller"]["healthy"] is True
    assert _wait(shown)
    text = cli("status", FLEET)
    assert f"{FLEET}: controller: hosted on {ROUTER}: last pass " in text.stdout and "healthy" in text.stdout
    assert any(a.startswith(f"relaunch: not up: {A10G}") for a in _status(cli)["controller"]["recent"])

    # No secret value in any file but the key files (yours, and the host's own): not in the task, the ledgers, the
    # launcher's state or any log.
    keys = json.loads((home / "keys" / f"{FLEET}.json").read_text())
    secrets = [HF_TOKEN.encode(), keys["admin_token"].encode(), keys["api_key"].encode()]
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.parent.name != "keys":
            data = path.read_bytes()
            assert not any(secret in data for secret in secrets), path

    # `up` again: it adopts the controller's rows first (nothing to launch), then hands the fleet over again.
    again = cli("up", config, "-y", "--controller", "hosted", "--controller-interval", "1")
    assert again.exit_code == 0, again.stderr + again.stdout
    assert set(LocalBackend(home / "local").records()) == {A10G, A100, ROUTER}
    assert _wait(lambda: (home / "local" / "logs" / f"{ROUTER}.log").read_text().count(f"watch {FLEET}: adopted: ")
                 == 2)

    # down: the controller's host goes first (the controller with it), then the replicas; no process is left.
    down = cli("down", FLEET, "-y")
    assert down.exit_code == 0, down.stderr + down.stdout
    assert f"{FLEET}: hosted controller: stopped first, with its host {ROUTER}" in down.stdout
    with Ledger(home) as ours:
        gone = [e for e in ours.history(fleet=FLEET) if e.new_state == "gone"]
        terminating = [e for e in ours.history(fleet=FLEET) if e.new_state == "terminating"]
    first_gone = next(e for e in gone if e.cluster == ROUTER)
    assert all(e.id > first_gone.id for e in terminating if e.cluster != ROUTER)
    assert not _group_alive(router_pid)
    for pid in seen:
        _reap(pid)
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"), pid
    assert LocalBackend(home / "local").records() == {}
    assert LocalBackend(home / "local").leftovers() == {}


def _listening_ports(leader: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in a process of the group `leader` started (from /proc)."""
    inodes = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != leader:
                continue
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    address, port = fields[1].split(":")
                    shown = str(ipaddress.IPv4Address(bytes.fromhex(address)[::-1])) if width == 8 else address
                    found.add((shown, int(port, 16)))
    return found


def test_a_tls_router_keeps_its_hosted_controller_which_calls_it_over_https_pinned_and_heals(cli, hosted_env,
                                                                                             tmp_path):
    """The secure configuration loses nothing: with deployment.router.tls the controller still runs with the fleet.
    It calls the router's one listener, https, on the host's loopback, pinned to the certificate the router serves
    there (this one names router.example only: the pin is checked, not a name); the router has no other listener
    (none in clear text); its pass reaches `status`, and it heals a killed replica."""
    config, home, seen = hosted_env
    cert, key = make_pair(tmp_path, "router")
    data = json.loads(Path(config).read_text())
    data["deployment"]["router"] = {"tls": {"certfile": str(cert), "keyfile": str(key)}}
    Path(config).write_text(json.dumps(data))
    up = cli("up", config, "-y", "--controller-interval", "1")
    assert up.exit_code == 0, up.stderr + up.stdout
    assert "controller stays on this machine" not in up.stdout + up.stderr
    records = LocalBackend(home / "local").records()
    seen.update(int(r["pid"]) for r in records.values())
    log = home / "local" / "logs" / f"{ROUTER}.log"
    assert _wait(lambda: (_status(cli)["controller"] or {}).get("last_pass_at") is not None), log.read_text()
    url = _status(cli)["endpoint"]
    port = urllib.parse.urlsplit(url).port
    assert url.startswith("https://127.0.0.1:")

    # The controller's own ledger: the router at its https loopback URL, pinned to the certificate on its host.
    host = home / "local" / "clusters" / ROUTER / "melange-sky-router"
    with Ledger(host / "home") as theirs:
        router = theirs.router(FLEET)
        assert router is not None and router.url == url
        assert router_certfile(router.task) == str(host / "tls" / "cert.pem")
    # One listener, the https one: the admin API is nowhere in clear text (the local launcher binds 127.0.0.1).
    assert _listening_ports(int(records[ROUTER]["pid"])) == {("127.0.0.1", port)}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises((OSError, http.client.HTTPException)):  # TLS only: plain HTTP gets no answer
        opener.open(f"http://127.0.0.1:{port}/admin/controller", timeout=30)

    victim = ProcessId(int(records[A10G]["pid"]), int(records[A10G]["started"]))
    os.kill(victim.pid, signal.SIGKILL)
    assert _wait(lambda: not running(victim))
    _reap(victim.pid)

    def healed() -> bool:
        fleet = _status(cli)
        states = {r["cluster"]: r["state"] for r in fleet["replicas"]}
        record = LocalBackend(home / "local").records().get(A10G)
        return (states == {A10G: "up", A100: "up"} and fleet["controller"]["healthy"] is True
                and record is not None and int(record["pid"]) != victim.pid)

    assert _wait(healed), log.read_text()
    seen.add(int(LocalBackend(home / "local").records()[A10G]["pid"]))
    text = log.read_text().split("Listening on https://127.0.0.1:", 1)[-1]  # what ran, after the script
    assert f"watch {FLEET}: relaunch: not up: {A10G}" in text
    assert "routes pushed (generation 2)" in text  # the controller's push of the new replica, over https
    assert "could not" not in text and "certificate" not in text, text  # every call to the router went through

    down = cli("down", FLEET, "-y")
    assert down.exit_code == 0, down.stderr + down.stdout
    assert f"{FLEET}: hosted controller: stopped first, with its host {ROUTER}" in down.stdout
    assert not _group_alive(int(records[ROUTER]["pid"]))
    assert LocalBackend(home / "local").records() == {} and LocalBackend(home / "local").leftovers() == {}
    body = b"".join(line for line in key.read_bytes().splitlines() if not line.startswith(b"-----"))
    for path in home.rglob("*"):  # the key: only in the host's copy of the file mount (as SkyPilot makes one)
        if path.is_file() and not path.is_symlink() and path != host / "tls" / "key.pem":
            assert body not in path.read_bytes(), path


@contextlib.contextmanager
def _admin_api_over_tls(cert: Path, key: Path) -> Iterator[tuple[str, list[str | None]]]:
    """A stand-in for the router's admin API over TLS with `cert`: answers GET /admin/controller with no documents
    and keeps the Authorization header of every request that reached it."""
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            body = b'{"docs": {}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serving_https(Handler, cert, key) as url:
        yield url, seen


def test_the_hosted_controller_sends_the_admin_token_only_to_the_router_showing_the_pinned_certificate(tmp_path):
    """A process that took the router's port (the router restarting) cannot pass for it without its key: the TLS
    handshake fails before any request, so the admin token never leaves; and the controller never falls back to
    clear text or to the system's CAs."""
    from fake_backend import FakeBackend

    from melange_sky.controller.hosted import HostedLoop
    from melange_sky.controller.watch import Controller, WatchOptions

    cert, key = make_pair(tmp_path, "router")
    other_cert, other_key = make_pair(tmp_path, "other")
    environ = {"MELANGE_SKY_ADMIN_TOKEN": "admin-token-3f9b", "MELANGE_SKY_API_KEY": "client-key-77ac"}
    with Ledger(tmp_path / "home") as ledger:
        controller = Controller(FLEET, FakeBackend(tmp_path / "fake.json"), ledger, environ,
                                WatchOptions(hosted=True))
        for impostor, (served_cert, served_key) in ((True, (other_cert, other_key)), (False, (cert, key))):
            warnings: list[str] = []
            with _admin_api_over_tls(served_cert, served_key) as (url, seen):
                loop = HostedLoop(controller, url, environ, on_warning=warnings.append, router_cafile=str(cert))
                assert loop.step() is None  # no fleet handed over (yet)
            if impostor:
                assert seen == [] and len(warnings) == 1 and "certificate" in warnings[0]
                assert "admin-token-3f9b" not in warnings[0]
            else:  # the router itself: the call went through, with the token
                assert seen == ["Bearer admin-token-3f9b"] and warnings == []
        with pytest.raises(ControllerError, match="not https: the admin token would cross in clear text"):
            HostedLoop(controller, "http://127.0.0.1:9", environ, router_cafile=str(cert))
        with pytest.raises(ControllerError, match="is https: give --router-cafile"):
            HostedLoop(controller, "https://127.0.0.1:9", environ)


# ---- where `up` puts the controller -----------------------------------------------------------------------------

class _Launcher:
    def __init__(self, name: str, directory: Path | None = None):
        self.name = name
        if directory is not None:
            self.dir = directory


@pytest.fixture
def spot_config(write_config, example):
    example["gpu_info"]["A10G"]["use_spot"] = True
    return load_config(write_config({**example, "name": FLEET, "input_buckets": [1, 25, 100],
                                     "output_buckets": [1, 25, 100]}))


def test_a_fleet_with_spot_is_hosted_by_default_where_the_launcher_can_be_shared(spot_config, tmp_path):
    settings = PlanSettings()
    hosted, note = controller_choice(spot_config, settings, _Launcher("local", tmp_path), {}, None, router=True)
    assert note is None and hosted is not None and hosted.launcher_dir == str(tmp_path)
    assert hosted.secrets == ("HF_TOKEN",)  # the replicas' secret: the controller relaunches them
    # SkyPilot through this machine's own API server: the host could not see the replicas; local, and why.
    hosted, note = controller_choice(spot_config, settings, _Launcher("skypilot"), {}, None, router=True)
    assert hosted is None and "sky api login" in note
    custom = PlanSettings(template=str(ROOT / "templates" / "vllm.j2"))  # a file the host would not have
    hosted, note = controller_choice(spot_config, custom, _Launcher("skypilot"),
                                     {"SKYPILOT_API_SERVER_ENDPOINT": "https://sky.example.com"}, None, router=True)
    assert hosted is None and "a file on this machine only" in note
    with pytest.raises(ControllerError, match="--controller hosted: .*--no-router"):
        controller_choice(spot_config, settings, _Launcher("local", tmp_path), {}, "hosted", router=False)
    # A TLS router is no reason to keep it local: it calls the router over https, pinned to its certificate.
    tls = dataclasses.replace(spot_config, deployment={"router": {"tls": {"certfile": "/c.pem", "keyfile": "/k.pem"}}})
    hosted, note = controller_choice(tls, settings, _Launcher("local", tmp_path), {}, None, router=True)
    assert hosted is not None and note is None
    # A shared SkyPilot API server: hosted, told the endpoint (a setting) and the token's name (a secret).
    environ = {"SKYPILOT_API_SERVER_ENDPOINT": "https://sky.example.com", "SKYPILOT_SERVICE_ACCOUNT_TOKEN": "t0k"}
    hosted, note = controller_choice(spot_config, settings, _Launcher("skypilot"), environ, None, router=True)
    assert hosted is not None and hosted.envs == {"SKYPILOT_API_SERVER_ENDPOINT": "https://sky.example.com"}
    assert hosted.secrets == ("HF_TOKEN", "SKYPILOT_SERVICE_ACCOUNT_TOKEN")


def test_a_fleet_without_spot_keeps_its_controller_local_unless_asked(write_config, example, tmp_path):
    config = load_config(write_config({**example, "input_buckets": [1, 25, 100], "output_buckets": [1, 25, 100]}))
    assert controller_choice(config, PlanSettings(), _Launcher("local", tmp_path), {}, None, router=True) == \
        (None, None)
    hosted, _ = controller_choice(config, PlanSettings(), _Launcher("local", tmp_path), {}, "hosted", router=True)
    assert hosted is not None


def test_only_an_api_server_another_host_can_reach_is_shared(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("api_server:\n  endpoint: http://10.1.2.3:46580\n")
    assert skypilot_api_server({}, str(config)) == "http://10.1.2.3:46580"
    config.write_text("api_server:\n  endpoint: http://127.0.0.1:46580\n")
    assert skypilot_api_server({}, str(config)) is None
    assert skypilot_api_server({}, str(tmp_path / "none.yaml")) is None


# ---- the router task that carries it ----------------------------------------------------------------------------

def test_the_controller_requirements_are_melange_skys_own():
    """What the host installs for the controller: setup.cfg's install_requires, nothing else and nothing less."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    wanted = {line.split(";")[0].strip() for line in parser["options"]["install_requires"].splitlines()
              if line.strip() and not line.strip().startswith("#")}
    hosted = HostedController(backend="skypilot", clouds=("aws",))
    installed = {r.replace("[aws]", "") for r in [*ROUTER_REQUIREMENTS, *hosted.requirements()]}
    assert installed == wanted


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # pandas, inside SkyPilot's GCP catalog
def test_real_skypilot_validates_the_router_task_with_its_hosted_controller_plain_and_tls(spot_config,
                                                                                          sky_catalog_home,
                                                                                          monkeypatch, tmp_path):
    from melange_sky.backends import ValidationLevel
    from melange_sky.deploy.catalog import Catalog
    from melange_sky.fleet.skypilot import SkyPilotBackend

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("SKYPILOT_SERVICE_ACCOUNT_TOKEN", "sky_secret_value")
    environ = {**os.environ, "SKYPILOT_API_SERVER_ENDPOINT": "https://sky.example.com"}
    hosted, _ = controller_choice(spot_config, PlanSettings(), _Launcher("skypilot"), environ, "hosted",
                                  router=True, interval=30, watch_args=("--autoscale",))
    assert hosted is not None
    plan = build_router_plan(spot_config, ["aws"], api_key=True, catalog=Catalog(skypilot_dir=None),
                             controller=hosted)
    assert "hf_secret_value" not in plan.yaml and "sky_secret_value" not in plan.yaml
    assert plan.task["secrets"] == {"MELANGE_SKY_ADMIN_TOKEN": None, "MELANGE_SKY_API_KEY": None, "HF_TOKEN": None,
                                    "SKYPILOT_SERVICE_ACCOUNT_TOKEN": None}
    assert plan.task["envs"]["SKYPILOT_API_SERVER_ENDPOINT"] == "https://sky.example.com"
    run = plan.task["run"]
    assert (f"MELANGE_SKY_HOME=\"$ROUTER_DIR/home\" python -m melange_sky watch {FLEET} --hosted --interval 30 "
            f"--backend skypilot --autoscale --router-url \"$ROUTER_URL\" || true") in run
    assert "python -m melange_sky serve --pushed --host 0.0.0.0 --port 8080" in run and 'wait "$SERVE_PID"' in run
    assert "'skypilot>=0.14.1,<0.15'" in plan.task["setup"] and "'pulp>=3.3,<3.4'" in plan.task["setup"]
    # the replicas' templates go with the source, where it looks for them (an installed package has them inside)
    assert (Path(plan.task["file_mounts"]["~/melange-sky-router/src/templates"]) / "vllm.j2").is_file()
    assert SkyPilotBackend().validate(plan.task).level is ValidationLevel.FULL

    # With TLS: serve gets the mounted certificate and key, the controller the https loopback URL and the certificate
    # to pin; nothing else changes (one listener, the certificate's contents never in the task).
    cert, key = make_pair(tmp_path, "router")
    tls = dataclasses.replace(spot_config, deployment={"router": {"tls": {"certfile": str(cert),
                                                                          "keyfile": str(key)}}})
    secure = build_router_plan(tls, ["aws"], api_key=True, catalog=Catalog(skypilot_dir=None), controller=hosted)
    lines = secure.task["run"].splitlines()
    [serve] = [line for line in lines if "melange_sky serve" in line]
    assert serve.startswith("python -m melange_sky serve --pushed --host 0.0.0.0 --port 8080 --ssl-certfile "
                            "\"$ROUTER_DIR/tls/cert.pem\" --ssl-keyfile \"$ROUTER_DIR/tls/key.pem\" > >(tee")
    assert '  ROUTER_URL="https://127.0.0.1:$ROUTER_PORT"' in lines
    assert '--router-url "$ROUTER_URL" --router-cafile "$ROUTER_DIR/tls/cert.pem" || true' in secure.task["run"]
    assert router_certfile(secure.task) == str(cert)
    assert SkyPilotBackend().validate(secure.task).level is ValidationLevel.FULL


# ---- one controller per fleet, and `down` when the host does not answer -----------------------------------------

def _hosted_fleet(home: Path, backend) -> Ledger:
    """A hosted fleet in the ledger: a replica and a router up at an address nothing answers on."""
    from melange_sky.fleet.ledger import NewReplica, ReplicaState, Role

    ledger = Ledger(home)
    ledger.save_fleet(FLEET, "h", {"controller": {"mode": "hosted", "interval": 1}})
    for cluster, role in ((A10G, Role.REPLICA), (ROUTER, Role.ROUTER)):
        ledger.add_replica(FLEET, NewReplica(cluster, "A10G" if role is Role.REPLICA else "router", "o", 1.0,
                                             role=role))
        ledger.transition(cluster, ReplicaState.UP, endpoint="127.0.0.1:9")  # the discard port: refused
        backend.add_cluster(cluster)
    return ledger


def test_watch_here_refuses_a_fleet_whose_controller_is_hosted(tmp_path):
    from fake_backend import FakeBackend

    from melange_sky.controller.watch import Controller

    backend = FakeBackend(tmp_path / "fake.json")
    with _hosted_fleet(tmp_path / "home", backend) as ledger:
        with pytest.raises(ControllerError, match=f"^the controller of fleet '{FLEET}' runs on its router's host"):
            Controller(FLEET, backend, ledger, {}).check()


def test_down_stops_the_controllers_host_first_and_keeps_the_replicas_when_it_cannot(tmp_path):
    from fake_backend import FakeBackend

    from melange_sky.fleet.fleet import Fleet

    backend = FakeBackend(tmp_path / "fake.json")
    backend.configure(down_failures={ROUTER: "the cloud refused"})
    with _hosted_fleet(tmp_path / "home", backend) as ledger:
        kept = Fleet(backend, ledger).down(FLEET)
        assert list(kept.failed) == [ROUTER] and "the cloud refused" in kept.failed[ROUTER] and not kept.fleet_removed
        assert "could not be torn down" in kept.controller and "replicas are kept" in kept.controller
        assert [c["cluster"] for c in backend.calls("down")] == [ROUTER]  # the replica was not touched
        backend.configure(down_failures={})
        done = Fleet(backend, ledger).down(FLEET)
    assert done.fleet_removed and sorted(done.removed) == [A10G, ROUTER]
    assert "stopped first" in done.controller and "not read" in done.controller  # the router did not answer
    assert [c["cluster"] for c in backend.calls("down")][1] == ROUTER


def test_up_checks_the_hosted_controllers_watch_options_and_its_dryrun_says_where_it_runs(cli, hosted_env):
    config, home, _ = hosted_env
    typo = cli("up", config, "--controller", "hosted", "--watch-args", "--autoscal", "-y")
    assert typo.exit_code == 2 and "--watch-args" in typo.stderr and "--autoscale" in typo.stderr
    own = cli("up", config, "--controller", "hosted", "--watch-args", "--interval 5", "-y")
    assert own.exit_code == 2 and "--controller-interval" in own.stderr
    assert not (home / "local").exists()  # nothing was launched
    dry = cli("up", config, "--controller", "hosted", "--watch-args", "--autoscale --max-cost 20", "--dryrun")
    assert dry.exit_code == 0, dry.stderr + dry.stdout
    assert "the controller runs on the router's host (`watch --hosted`, every 60 s), driving the local launcher" \
        in dry.stdout


def test_the_routers_controller_document_is_the_admin_tokens_only_and_holds_one_json_object():
    import asyncio

    import aiohttp
    from fake_openai_upstream import Fleet as Upstreams
    from test_serve_cli import HANG_GUARD_S
    from test_serve_policy import DOC

    from melange_sky.deploy.membership import ADMIN_CONTROLLER_PATH

    admin, client = "admin-token-5e1d", "client-key-9c0a"

    async def scenario():
        async with Upstreams(DOC, {"a100-0": "A100-80GB"}, api_key=client, admin_token=admin) as fleet, \
                aiohttp.ClientSession() as session:
            url = fleet.url + ADMIN_CONTROLLER_PATH

            async def call(method: str, token: str, data: bytes | None = None) -> tuple[int, dict]:
                async with session.request(method, url, data=data,
                                           headers={"Authorization": f"Bearer {token}"}) as answer:
                    return answer.status, await answer.json()

            assert await call("GET", admin) == (200, {"docs": {}})  # nothing handed over yet
            for token in (client, "wrong"):
                assert (await call("GET", token))[0] == 401
                assert (await call("PUT", token, b'{"writer": "up"}'))[0] == 401
            for bad in (b"[1, 2]", b"not json", b'{"at": 1}', b'{"writer": ""}'):
                assert (await call("PUT", admin, bad))[0] == 400, bad
            assert await call("PUT", admin, b'{"writer": "controller", "at": 1.5}') == (200, {"accepted": True})
            assert await call("PUT", admin, b'{"writer": "up", "at": 2.5}') == (200, {"accepted": True})
            # each writer's latest: `up` handing over never hides the controller's pass, nor the other way round
            assert await call("GET", admin) == (200, {"docs": {"controller": {"writer": "controller", "at": 1.5},
                                                               "up": {"writer": "up", "at": 2.5}}})
            for writer in ("a", "b"):
                assert (await call("PUT", admin, json.dumps({"writer": writer}).encode()))[0] == 200
            assert (await call("PUT", admin, b'{"writer": "one-too-many"}'))[0] == 400

    asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_S))


def _controller_snapshot(controller: Ledger, pass_started: float) -> dict:
    from melange_sky.fleet import hosted

    return hosted.snapshot(controller, "h", "controller", {"started": pass_started, "ok": True, "actions": []})


def test_an_older_controller_snapshot_never_brings_back_a_replica_this_machine_saw_die(tmp_path):
    from melange_sky.fleet import hosted
    from melange_sky.fleet.ledger import NewReplica, ReplicaState

    new = NewReplica(cluster="h-a10g-0", gpu="A10G", offer="local", price_per_hour=1.0)
    with Ledger(tmp_path / "controller") as controller, Ledger(tmp_path / "user") as user:
        controller.save_fleet("h", "digest", {"cost": 1.0})
        controller.add_replica("h", new)
        controller.transition(new.cluster, ReplicaState.UP, endpoint="127.0.0.1:9")
        user.save_fleet("h", "digest", {"cost": 1.0})
        first_pass = time.time()
        assert hosted.adopt(user, _controller_snapshot(controller, first_pass), message="m") == [new.cluster]
        assert user.get_replica(new.cluster).state is ReplicaState.UP

        time.sleep(0.01)  # the clock moves: this machine's refresh is later than that pass
        user.transition(new.cluster, ReplicaState.GONE, endpoint=None, message="backend: not found")
        user.save_fleet("h", "digest2", {"cost": 2.0})  # and an `up` here re-planned after it
        stale = _controller_snapshot(controller, first_pass)  # the router still holds that pass's view
        assert hosted.adopt(user, stale, message="from the hosted controller") == []
        assert user.get_replica(new.cluster).state is ReplicaState.GONE
        assert user.get_fleet("h").plan == {"cost": 2.0}  # nor an older plan over a newer one
        assert [e.new_state for e in user.history(cluster=new.cluster)][-1] == "gone"

        time.sleep(0.01)  # the controller's next pass (it saw the death too, and relaunched): that is newer
        controller.transition(new.cluster, ReplicaState.LAUNCHING)
        controller.transition(new.cluster, ReplicaState.UP, endpoint="127.0.0.1:10")
        controller.save_fleet("h", "digest3", {"cost": 3.0})
        fresh = _controller_snapshot(controller, time.time())
        assert hosted.adopt(user, fresh, message="from the hosted controller") == [new.cluster]
        row = user.get_replica(new.cluster)
        assert (row.state, row.endpoint) == (ReplicaState.UP, "127.0.0.1:10")
        assert user.get_fleet("h").plan == {"cost": 3.0}
