"""`serve --ssl-certfile F --ssl-keyfile F` (issue 21, item 3): the router serves HTTPS, and the official `openai`
SDK talks to it with the certificate (self-signed, made here); the flags go together, and a file that cannot be
used is one line before anything listens."""
from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_openai_upstream import FakeUpstream, Fleet
from test_serve_cli import MIX, LoopThread, start_cli, stop
from test_serve_e2e import run
from test_serve_policy import DOC

from melange_sky.serve.settings import ServeSettings, plain_http_warning, tls_context

PROMPT = "x" * 2000


def self_signed(folder: Path, name: str, password: bytes | None = None) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (encrypted with `password`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           encryption))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(folder, "router")
    _, other_key = self_signed(folder, "other")
    _, locked_key = self_signed(folder, "locked", password=b"secret")
    return {"cert": cert, "key": key, "other_key": other_key, "locked_key": locked_key}


def trusting(cert: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert)


def test_the_openai_sdk_talks_to_the_router_over_https_with_its_certificate(pem):
    async def scenario():
        context = tls_context(ServeSettings(ssl_certfile=pem["cert"], ssl_keyfile=pem["key"]))
        async with Fleet(DOC, {"a100-0": "A100-80GB"}, ssl_context=context) as fleet:
            assert fleet.url.startswith("https://127.0.0.1:")
            sdk = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="k", max_retries=0,
                                     http_client=openai.DefaultAsyncHttpxClient(verify=trusting(pem["cert"])))
            untrusting = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="k", max_retries=0)
            try:
                answer = await sdk.completions.create(model="m", prompt=PROMPT, max_tokens=3)
                assert answer.choices[0].text == "tok tok tok " and answer.usage.prompt_tokens == 500
                stream = await sdk.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=4, stream=True)
                deltas = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
                assert "".join(deltas) == "tok " * 4
                with pytest.raises(openai.APIConnectionError):  # the system's CAs do not know a self-signed one
                    await untrusting.completions.create(model="m", prompt="hi", max_tokens=1)
            finally:
                await sdk.close()
                await untrusting.close()

    run(scenario)


@pytest.mark.parametrize(("flags", "message"), [
    (("--ssl-certfile", "CERT"), "--ssl-certfile needs --ssl-keyfile too"),
    (("--ssl-keyfile", "KEY"), "--ssl-keyfile needs --ssl-certfile too"),
    (("--ssl-certfile", "/no/such.crt", "--ssl-keyfile", "KEY"), "cannot read --ssl-certfile /no/such.crt: No such"),
    (("--ssl-certfile", "CERT", "--ssl-keyfile", "OTHER"), "are not a PEM certificate and its unencrypted private key"),
    (("--ssl-certfile", "CERT", "--ssl-keyfile", "LOCKED"), "are not a PEM certificate and its unencrypted"),
    (("--ssl-certfile", "KEY", "--ssl-keyfile", "KEY"), "are not a PEM certificate"),
])
def test_tls_flags_go_together_and_unusable_files_are_one_line_errors(cli, write_config, pem, flags, message):
    files = {"CERT": pem["cert"], "KEY": pem["key"], "OTHER": pem["other_key"], "LOCKED": pem["locked_key"]}
    result = cli("serve", "--config", write_config(MIX), "--replica", "A10G=http://127.0.0.1:1",
                 *[files.get(f, f) for f in flags])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_serve_with_a_certificate_listens_on_https_and_the_sdk_gets_answers_within_its_body_limit(write_config, pem):
    loop = LoopThread()
    upstream = FakeUpstream("A10G")
    proc = None
    try:
        url = loop.run(upstream.start())
        proc, base, _ = start_cli("serve", "--config", write_config(MIX), "--port", "0", "--replica", f"A10G={url}",
                                  "--ssl-certfile", pem["cert"], "--ssl-keyfile", pem["key"], "--max-body-mb", "0.01")
        assert base.startswith("https://127.0.0.1:")
        with openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=30,
                           http_client=openai.DefaultHttpxClient(verify=trusting(pem["cert"]))) as sdk:
            answer = sdk.completions.create(model="m", prompt="x" * 40, max_tokens=2)
            with pytest.raises(openai.APIStatusError, match="larger than the router's limit of 0.01 MiB") as info:
                sdk.completions.create(model="m", prompt="x" * 20_000, max_tokens=2)
        assert answer.choices[0].text == "tok tok " and answer.model == "test-model"
        assert info.value.status_code == 413
    finally:
        if proc is not None:
            stop(proc)
        loop.run(upstream.stop())
        loop.close()


def test_a_public_router_without_tls_warns_that_keys_cross_in_clear_text():
    assert plain_http_warning(ServeSettings(host="127.0.0.1")) is None
    assert plain_http_warning(ServeSettings(host="0.0.0.0", ssl_certfile="c", ssl_keyfile="k")) is None
    assert "clear text" in plain_http_warning(ServeSettings(host="0.0.0.0"))  # type: ignore[operator]
