"""How a router listens and behaves, the rule that keeps it from serving the world without a key, and its TLS.

Plain data, no aiohttp: the CLI checks these before the server (and its heavy imports) is loaded.
"""
from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from melange_sky.deploy.membership import ADMIN_TOKEN_ENV
from melange_sky.errors import ServeError

__all__ = ["ServeSettings", "admin_token_from_env", "check_exposure", "is_loopback", "plain_http_warning",
           "tls_context"]


@dataclass(frozen=True)
class ServeSettings:
    """How the router listens and behaves. Keys are kept out of `repr`."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = field(default=None, repr=False)
    upstream_api_key: str | None = field(default=None, repr=False)
    #: Enables `GET`/`PUT /admin/routes` (membership pushed by the fleet). From the environment only
    #: (`admin_token_from_env`): a command-line flag would show in `ps`.
    admin_token: str | None = field(default=None, repr=False)
    retries: int = 2  # other replicas to try after a failure before any byte reached the client
    #: Retries in flight at once: at most this % of the requests in flight, and at least `retry_budget_min`.
    retry_budget_percent: float = 20.0
    retry_budget_min: int = 3
    #: Outlier detection: at most this % of a GPU type's replicas ejected at once (always at least one).
    max_ejection_percent: float = 10.0
    consecutive_5xx: int = 3
    consecutive_gateway_failure: int = 2
    #: Below this % of healthy replicas among those that can serve a bucket, its ejections are ignored.
    panic_percent: float = 50.0
    max_body_mb: float = 64.0  # the largest request body taken; larger ones get 413
    #: HTTPS: the router's certificate (PEM, a chain after it if any) and its unencrypted private key; both or none.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    drain_s: float = 30.0
    refresh_s: float = 10.0
    window_s: float = 3600.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0  # the longest silence from an upstream (between stream chunks, or to the answer)
    probe_interval_s: float = 0.5  # how often ejected replicas are checked for a due probe
    probe_timeout_s: float = 5.0
    eject_base_s: float = 1.0
    eject_max_s: float = 60.0
    seed: int | None = None  # tie-breaks between equally loaded replicas (tests fix it)

    def __post_init__(self) -> None:
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            given, missing = (("--ssl-certfile", "--ssl-keyfile") if self.ssl_certfile else
                              ("--ssl-keyfile", "--ssl-certfile"))
            raise ServeError(f"{given} needs {missing} too: HTTPS takes the certificate and its private key")
        if self.admin_token and self.api_key and self.admin_token == self.api_key:
            raise ServeError(f"{ADMIN_TOKEN_ENV} is the same as the API key: the admin endpoints must not accept "
                             f"the key clients hold; give the router a token of its own")


def admin_token_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """The router's admin token, from MELANGE_SKY_ADMIN_TOKEN (surrounding blanks dropped; empty: none)."""
    token = environ.get(ADMIN_TOKEN_ENV, "").strip()
    return token or None


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", "::1") or host.startswith("127."):
        return True
    with contextlib.suppress(OSError):
        infos = socket.getaddrinfo(host, None)
        return bool(infos) and all(str(i[4][0]).startswith("127.") or i[4][0] == "::1" for i in infos)
    return False


def check_exposure(settings: ServeSettings, no_auth: bool) -> None:
    """Refuse to serve a non-loopback address without an API key, unless the user said --no-auth."""
    if settings.api_key or no_auth or is_loopback(settings.host):
        return
    raise ServeError(f"refusing to serve on {settings.host} without an API key: anyone who can reach it could use "
                     f"your GPUs. Set MELANGE_SKY_API_KEY (or --api-key), or pass --no-auth if something in front "
                     f"of the router checks clients")


def tls_context(settings: ServeSettings) -> ssl.SSLContext | None:
    """The router's TLS server context (None: plain HTTP). Checked when `serve` starts, so an unreadable file, a key
    that does not match the certificate or an encrypted key is one line before anything listens."""
    if not settings.ssl_certfile or not settings.ssl_keyfile:
        return None
    for flag, path in (("--ssl-certfile", settings.ssl_certfile), ("--ssl-keyfile", settings.ssl_keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ServeError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:  # an encrypted key would prompt on the terminal: the empty password makes it an error instead
        context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ServeError(f"--ssl-certfile {settings.ssl_certfile} and --ssl-keyfile {settings.ssl_keyfile} are not a "
                         f"PEM certificate and its unencrypted private key ({exc.reason or exc})") from None
    return context


def plain_http_warning(settings: ServeSettings) -> str | None:
    """A warning when the router serves other machines without TLS: keys and prompts cross the network in clear."""
    if settings.ssl_certfile or is_loopback(settings.host):
        return None
    return (f"serving plain HTTP on {settings.host}: the API key and every prompt cross the network in clear text; "
            f"give the router a certificate (--ssl-certfile/--ssl-keyfile, or deployment.router.tls for a fleet) "
            f"or put a TLS proxy in front")
