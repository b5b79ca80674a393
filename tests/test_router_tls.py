"""`deployment.router.tls`: the router's certificate and key reach its host as file mounts of its task (their paths,
never their contents: not in the task, the plan, the ledger or the output), the task runs `serve --ssl-certfile
--ssl-keyfile` (real SkyPilot validates it offline: tests/test_router_task.py, beside the plain task), `up` and
`status` show an https:// endpoint, and the fleet's own calls to the router verify it against that certificate
(pinned: no other certificate passes)."""
from __future__ import annotations

import json
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from melange_sky.core.config import load_config
from melange_sky.deploy.catalog import Catalog
from melange_sky.deploy.membership import get_admin_routes, push_routes
from melange_sky.deploy.router_config import router_spec
from melange_sky.deploy.router_task import TLS_CERT_MOUNT, build_router_plan, router_certfile
from melange_sky.errors import ConfigError, RouterError
from melange_sky.fleet.ledger import Ledger

EDGES = {"input_buckets": [1, 100, 4000], "output_buckets": [1, 100, 2000]}


def make_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name`.example and its unencrypted key, written by openssl."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", f"/CN={name}.example", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict[str, Path]:
    """Two self-signed pairs (the router's and another), and the router's key encrypted."""
    folder = tmp_path_factory.mktemp("pem")
    cert, key = make_pair(folder, "router")
    other_cert, other_key = make_pair(folder, "other")
    encrypted = folder / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
                   check=True, capture_output=True, timeout=60)
    return {"cert": cert, "key": key, "other_cert": other_cert, "other_key": other_key, "encrypted": encrypted}


def tls_config(write_config, example, pem, **tls):
    tls = {"certfile": str(pem["cert"]), "keyfile": str(pem["key"]), **tls}
    return load_config(write_config({**example, **EDGES, "deployment": {"router": {"tls": tls}}}))


def _body(path: Path) -> bytes:
    """A PEM file's base64 body, the part that must never be copied anywhere."""
    return b"".join(line for line in path.read_bytes().splitlines() if not line.startswith(b"-----"))


def test_the_task_mounts_the_certificate_and_key_from_their_paths_and_serves_https(write_config, example, pem):
    plan = build_router_plan(tls_config(write_config, example, pem), ["aws"], api_key=True,
                             catalog=Catalog(skypilot_dir=None))
    mounts = plan.task["file_mounts"]
    assert mounts[TLS_CERT_MOUNT] == str(pem["cert"]) and mounts["~/melange-sky-router/tls/key.pem"] == str(pem["key"])
    assert ('--ssl-certfile "$ROUTER_DIR/tls/cert.pem" --ssl-keyfile "$ROUTER_DIR/tls/key.pem"'
            in plan.task["run"].splitlines()[-1])
    assert router_certfile(plan.task) == str(pem["cert"])
    written = (plan.yaml + json.dumps(plan.to_dict())).encode()
    assert _body(pem["key"]) not in written and _body(pem["cert"]) not in written


def test_a_router_without_tls_serves_plain_http(write_config, example):
    plan = build_router_plan(load_config(write_config({**example, **EDGES})), ["aws"],
                             catalog=Catalog(skypilot_dir=None))
    assert router_certfile(plan.task) is None and "--ssl" not in plan.task["run"]


@pytest.mark.parametrize("tls, fragment", [
    ({"certfile": "router.crt"}, "deployment.router.tls.certfile: must be an absolute path (or start with ~/)"),
    ({"keyfile": None}, "deployment.router.tls.keyfile: missing (required with tls)"),
    ({"cafile": "/x"}, "deployment.router.tls.cafile: unknown key; did you mean 'certfile'?"),
])
def test_a_malformed_tls_block_is_an_error_when_the_config_loads(cli, write_config, example, pem, tls, fragment):
    data = {"certfile": str(pem["cert"]), "keyfile": str(pem["key"]), **tls}
    result = cli("solve", write_config({**example, "deployment": {"router": {"tls": data}}}))
    assert result.exit_code == 2 and fragment in result.stderr, result.stderr


@pytest.mark.parametrize("tls, fragment", [
    ({"certfile": "/no/such/cert.pem"}, "deployment.router.tls.certfile: /no/such/cert.pem is not a file"),
    ({"keyfile": "other_key"}, "are not a PEM certificate and its private key"),
    ({"keyfile": "encrypted"}, "is encrypted: the router starts unattended"),
])
def test_tls_files_are_checked_when_the_router_is_planned(write_config, example, pem, tls, fragment):
    config = tls_config(write_config, example, pem, **{k: str(pem.get(v, v)) for k, v in tls.items()})
    assert router_spec(config).tls is not None  # the config loads: it may be solved where the files are not
    with pytest.raises(ConfigError, match=fragment):
        build_router_plan(config, ["aws"], catalog=Catalog(skypilot_dir=None))


@contextmanager
def https_router(cert: Path, key: Path) -> Iterator[str]:
    """A stand-in for the router's admin API over TLS: answers GET and PUT /admin/routes."""
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            body = json.dumps({"accepted": True, "generation": 7, "routes": {}, "inflight": {}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = _answer

        def log_message(self, *args: object) -> None:
            pass

    with serving_https(Handler, cert, key) as url:
        yield url


@contextmanager
def serving_https(handler: type[BaseHTTPRequestHandler], cert: Path, key: Path) -> Iterator[str]:
    """`handler` served over TLS with `cert` on a free loopback port, in a thread; yields its https URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_membership_calls_verify_the_router_against_its_own_certificate(pem, tmp_path):
    with https_router(pem["cert"], pem["key"]) as url:
        assert push_routes(url, {"version": 1}, "token", cafile=str(pem["cert"]))["generation"] == 7
        assert get_admin_routes(url, "token", cafile=str(pem["cert"]))["generation"] == 7
        with pytest.raises(RouterError, match="certificate") as caught:
            push_routes(url, {"version": 1}, "token", cafile=str(pem["other_cert"]))
        assert "token" not in str(caught.value)
        with pytest.raises(RouterError, match="certificate"):  # self-signed: the system's CAs do not know it
            get_admin_routes(url, "token")
    chain = tmp_path / "chain.pem"  # pinned to the file's first certificate, not to every one it holds
    chain.write_bytes(pem["other_cert"].read_bytes() + pem["cert"].read_bytes())
    with https_router(pem["cert"], pem["key"]) as url, pytest.raises(RouterError, match="certificate"):
        get_admin_routes(url, "token", cafile=str(chain))


@pytest.fixture
def fleet_env(tmp_path, monkeypatch):
    """A private ledger and the fake launcher, for the in-process CLI."""
    env = {"MELANGE_SKY_HOME": str(tmp_path / "home"), "MELANGE_SKY_BACKEND": "fake_backend:FakeBackend",
           "MELANGE_SKY_FAKE_STATE": str(tmp_path / "fake.json"), "HF_TOKEN": "hf_test_token_value"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    return env


def test_up_and_status_show_an_https_endpoint_and_push_to_it_with_the_certificate(cli, write_config, example, pem,
                                                                                   fleet_env, monkeypatch):
    pushed = []

    def push(url, doc, admin_token, timeout=10.0, *, cafile=None):
        pushed.append((url, cafile))
        return {"generation": 1}

    monkeypatch.setattr("melange_sky.fleet.fleet.push_routes", push)
    config = write_config({**example, **EDGES, "name": "tls", "deployment": {
        "router": {"tls": {"certfile": str(pem["cert"]), "keyfile": str(pem["key"])}}}})
    result = cli("up", config, "-y")
    assert result.exit_code == 0, result.stderr
    with Ledger(fleet_env["MELANGE_SKY_HOME"]) as ledger:
        router = ledger.router("tls")
        assert router is not None and router.url is not None and router.url.startswith("https://127.0.0.")
    assert f"Endpoint: {router.url}/v1" in result.stdout and f"trust the certificate {pem['cert']}" in result.stdout
    assert pushed and set(pushed) == {(router.url, str(pem["cert"]))}
    status = cli("status", "tls")
    assert f"Endpoint: {router.url}/v1" in status.stdout
    assert json.loads(cli("status", "tls", "--json").stdout)["fleets"][0]["endpoint"] == router.url
    home = Path(fleet_env["MELANGE_SKY_HOME"])
    written = b"".join(f.read_bytes() for f in home.rglob("*") if f.is_file())
    assert _body(pem["key"]) not in written and _body(pem["key"]).decode() not in result.stdout + status.stdout


@pytest.fixture
def processes(tmp_path, monkeypatch):
    """The local launcher (melange_sky/fleet/local.py) for the in-process CLI: the router task really runs `serve`
    with its mounted certificate, the replica is an emulator. Every process it started is killed at the end."""
    import os
    import signal

    from melange_sky.fleet.local import LocalBackend

    for key, value in {"MELANGE_SKY_HOME": str(tmp_path / "home"), "MELANGE_SKY_BACKEND": "local",
                       "MELANGE_SKY_LOCAL_SPEED": "20"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MELANGE_SKY_API_KEY", raising=False)
    backend = LocalBackend(tmp_path / "home" / "local")
    yield backend
    for record in backend.records().values():
        try:
            os.killpg(int(record["pid"]), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_a_tls_router_brought_up_serves_https_with_its_certificate_and_takes_pushes_over_it(
        cli, write_config, pem, processes, tmp_path):
    from melange_sky.core.tls import client_context
    from melange_sky.fleet.keys import load_keys

    config = write_config({"name": "tls", "workload_distribution": [[1.0]], "total_request_rate": 1,
                           "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[2]]}}, "input_buckets": [1, 4000],
                           "output_buckets": [1, 2000], "deployment": {"router": {
                               "tls": {"certfile": str(pem["cert"]), "keyfile": str(pem["key"])}}}})
    result = cli("up", config, "-y")
    assert result.exit_code == 0, result.stdout + result.stderr
    [fleet] = json.loads(cli("status", "tls", "--json").stdout)["fleets"]
    url = fleet["endpoint"]
    assert url.startswith("https://127.0.0.1:") and f"Endpoint: {url}/v1" in result.stdout
    assert "could not update the router's routes" not in result.stdout + result.stderr  # pushed over https
    key = load_keys("tls").api_key
    request = urllib.request.Request(f"{url}/v1/completions", method="POST",
                                     data=json.dumps({"model": "meta-llama/Llama-2-7b-chat-hf", "prompt": "hi",
                                                      "max_tokens": 2}).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30, context=client_context(pem["cert"])) as answer:
        assert answer.status == 200 and answer.headers["X-Melange-Gpu"] == "A10G"  # the replica's answer, relayed
        assert json.loads(answer.read())["usage"]["completion_tokens"] == 2
    with pytest.raises(urllib.error.URLError):  # the system's CAs do not know a self-signed certificate
        urllib.request.urlopen(f"{url}/health", timeout=30)
    assert cli("down", "tls", "-y").exit_code == 0
    assert processes.records() == {} and processes.leftovers() == {}
    written = b"".join(f.read_bytes() for f in (tmp_path / "home").rglob("*") if f.is_file())
    assert _body(pem["key"]) not in written
