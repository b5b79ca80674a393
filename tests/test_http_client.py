"""The one HTTP client for the project's own endpoints (`melange_sky.inputs.http`): endpoint forms, the key, JSON
calls, one-line errors, no redirects, timeouts, and TLS verified against a given certificate."""
from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import json
import ssl
import threading

import pytest
from conftest import free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from melange_sky.errors import CallFailed, ProfileError, TraceError
from melange_sky.inputs.http import Client, parse_endpoint
from melange_sky.inputs.router_workload import fetch_observed

KEY = "sk-test-123"
#: The stand-in router's observed workload (GET /workload).
WORKLOAD = {"input_buckets": [1, 100], "output_buckets": [1, 100], "counts": [[3]], "total_request_rate": 1.5}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers by path: /workload and /v1/models (JSON, key required), /echo (PUT: the body back), /redirect,
    /text (not JSON), /down (503), /slow (never answers), /leak (a 401 quoting the key)."""

    seen: list[tuple[str, str, str | None]]  # (method, path, Authorization), per server

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {"Content-Type": "application/json"}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/slow":
            self.server.release.wait(10)  # type: ignore[attr-defined]
            return
        if self.path == "/leak":
            message = f"bad key {self.headers.get('Authorization')}"
            return self._answer(401, json.dumps({"error": {"message": message, "type": "auth"}}).encode())
        if self.path in ("/workload", "/prefix/workload", "/v1/models", "/echo") and \
                self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._answer(401, json.dumps({"error": {"message": "missing or wrong key\nsecond line",
                                                           "type": "invalid_request_error"}}).encode())
        if self.path in ("/workload", "/prefix/workload"):
            return self._answer(200, json.dumps({**WORKLOAD, "path": self.path}).encode())
        if self.path == "/echo":
            return self._answer(200, json.dumps({"got": json.loads(body),
                                                 "type": self.headers.get("Content-Type")}).encode())
        if self.path == "/redirect":
            return self._answer(302, b"", {"Location": "/workload"})
        if self.path == "/text":
            return self._answer(200, b"hello\nworld", {"Content-Type": "text/plain"})
        if self.path == "/down":
            return self._answer(503, b"no routes")
        return self._answer(404, b"not found", {"Content-Type": "text/plain"})

    do_GET = do_PUT = _route  # noqa: N815 - the stdlib's names

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(tls: ssl.SSLContext | None = None):
    """A threaded stand-in server on a free loopback port: (base URL, the requests it saw)."""
    handler = type("Handler", (_Handler,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.release = threading.Event()  # type: ignore[attr-defined]
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    scheme = "https" if tls is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}", handler.seen
    finally:
        server.release.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    with serving() as running:
        yield running


def _self_signed(directory, name: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files: (certfile, keyfile)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = directory / f"{name}.pem", directory / f"{name}.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


@pytest.mark.parametrize(("url", "base", "shown"), [
    ("http://h:8080", "", "http://h:8080"),
    ("http://h:8080/v1", "", "http://h:8080/v1"),  # what `up` and `status` print
    ("http://h:8080/v1/", "", "http://h:8080/v1"),
    ("https://user:pw@h/prefix/v1", "/prefix", "https://h/prefix/v1"),
])
def test_an_endpoint_is_its_base_url_with_or_without_v1_and_never_shows_credentials(url, base, shown):
    endpoint = parse_endpoint(url)
    assert endpoint.base_path == base and endpoint.url == shown
    assert endpoint.full_url("/workload") == shown.removesuffix("/v1") + "/workload"
    assert endpoint.port == (443 if url.startswith("https") else 8080)


def test_endpoints_that_are_not_base_urls_are_one_line_errors_of_the_callers_kind():
    with pytest.raises(TraceError, match=r"^--from 'ftp://h' is not an http\(s\) URL; .* e\.g\. http://x:1$"):
        parse_endpoint("ftp://h", "--from", TraceError, "http://x:1")
    with pytest.raises(ProfileError, match=r"points into the API .* e\.g\. http://h:1/p \("):
        parse_endpoint("http://h:1/p/v1/chat/completions")
    with pytest.raises(ProfileError, match="invalid port"):
        parse_endpoint("http://h:99999")


def test_json_calls_send_the_key_as_a_bearer_token_and_read_json_objects(server):
    url, seen = server
    client = Client(parse_endpoint(url + "/v1"), api_key=KEY)
    assert client.get_json("/workload") == {**WORKLOAD, "path": "/workload"}
    assert client.put_json("/echo", {"a": [1, 2]}) == {"got": {"a": [1, 2]}, "type": "application/json"}
    assert seen[-2:] == [("GET", "/workload", f"Bearer {KEY}"), ("PUT", "/echo", f"Bearer {KEY}")]
    assert client.status("/down") == 503  # a probe reads any status


def test_error_answers_are_one_line_with_the_servers_message_and_never_the_key(server):
    url, _ = server
    with pytest.raises(CallFailed) as refused:
        Client(parse_endpoint(url)).get_json("/workload")
    assert refused.value.status == 401
    assert str(refused.value) == f"GET {url}/workload: HTTP 401: missing or wrong key second line"
    with pytest.raises(CallFailed) as leaked:
        Client(parse_endpoint(url), api_key=KEY).get_json("/leak")
    assert KEY not in str(leaked.value) and "bad key Bearer [key]" in str(leaked.value)
    with pytest.raises(CallFailed, match=r"the answer is not a JSON object: hello$") as text:
        Client(parse_endpoint(url)).get_json("/text")
    assert text.value.status == 200


def test_a_redirect_is_not_followed(server):
    url, seen = server
    with pytest.raises(CallFailed) as redirected:
        Client(parse_endpoint(url), api_key=KEY).get_json("/redirect")
    assert redirected.value.status == 302 and seen[-1][1] == "/redirect"  # the key went nowhere else


def test_no_answer_is_a_one_line_error_saying_why(server):
    url, _ = server
    refused = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CallFailed) as nobody:
        Client(parse_endpoint(refused)).get_json("/workload")
    assert nobody.value.status is None
    assert str(nobody.value) == f"GET {refused}/workload: connection refused"
    with pytest.raises(CallFailed, match=r"/slow: timed out$") as slow:
        Client(parse_endpoint(url), timeout=0.3).get_json("/slow")
    assert slow.value.status is None


def test_https_is_verified_against_the_certificate_given(tmp_path, cli):
    certfile, keyfile = _self_signed(tmp_path, "router")
    other, _ = _self_signed(tmp_path, "other")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certfile, keyfile)
    with serving(tls) as (url, seen):
        assert Client(parse_endpoint(url + "/v1"), api_key=KEY, cafile=certfile).get_json("/workload")["counts"]
        # the system's CAs do not know a self-signed certificate, nor does another one: no key is sent
        for cafile in (None, other):
            with pytest.raises(CallFailed, match="TLS certificate not trusted") as untrusted:
                Client(parse_endpoint(url), api_key=KEY, cafile=cafile).get_json("/workload")
            assert untrusted.value.status is None and "\n" not in str(untrusted.value)
        assert len(seen) == 1  # only the trusted call reached the server
        source, doc = fetch_observed(url + "/v1", KEY, cafile=certfile)
        assert source == f"{url}/workload" and doc["path"] == "/workload"
        run = cli("workload", "--from", url + "/v1", "--api-key", KEY, "--cacert", certfile, "--json")
        assert run.exit_code == 0, run.stderr
        assert json.loads(run.stdout)["counts"] == [[3]]
        refused = cli("workload", "--from", url + "/v1", "--api-key", KEY)
        assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
        assert "TLS certificate not trusted" in refused.stderr and "(workload --cacert FILE)" \
            in refused.stderr


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/", "/workload", "/prefix/v1", "/prefix/workload"])
def test_a_routers_workload_is_read_from_any_form_of_its_endpoint(server, suffix):
    url, _ = server
    source, doc = fetch_observed(url + suffix, KEY)
    path = "/prefix/workload" if suffix.startswith("/prefix") else "/workload"
    assert doc["path"] == path and source == url + path


def test_a_router_that_refuses_or_is_not_a_router_says_what_to_do(server):
    url, _ = server
    with pytest.raises(TraceError, match=r"/workload: HTTP 401: pass the router's key with --api-key"):
        fetch_observed(url)
    with pytest.raises(TraceError, match=r"^--from .* points into the API"):
        fetch_observed(url + "/v1/models")
    with pytest.raises(TraceError, match=r"/nothing/workload: HTTP 404: is this a melange-sky router"):
        fetch_observed(url + "/nothing", KEY)
