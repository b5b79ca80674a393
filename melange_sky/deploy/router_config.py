"""The config's `deployment.router` block, checked: where the fleet's router runs, its port, and its TLS certificate
and key. Read by `deploy.router_task` (the router's SkyPilot task) and checked with the rest of the `deployment`
block by `deploy.plan.deployment_from_config`; the key list of the whole config is in `core.config`'s docstring.

`tls` names two files on the user's machine, `{"certfile": PATH, "keyfile": PATH}`. They reach the router's host as
file mounts of its task (their *paths* are in the task; their contents never are, nor in the ledger, a plan or any
output), and the fleet's own clients of the router verify it against the certificate (`core.tls`).
"""
from __future__ import annotations

import difflib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melange_sky.core.config import Config, check_keys
from melange_sky.deploy.catalog import KNOWN_CLOUDS
from melange_sky.errors import ConfigError

__all__ = ["DEFAULT_ROUTER_PORT", "ROUTER_KEYS", "TLS_KEYS", "RouterSpec", "RouterTls", "check_tls_files",
           "parse_router_block", "router_spec"]

DEFAULT_ROUTER_PORT = 8080
ROUTER_KEYS = ("cloud", "region", "instance_type", "cpus", "port", "use_spot", "tls")
TLS_KEYS = ("certfile", "keyfile")
_CPUS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(\+?)\s*$")
_PATH = "deployment.router"


@dataclass(frozen=True)
class RouterTls:
    """The router's certificate (PEM, the server's own first, then any chain) and private key: absolute paths on
    the machine that runs `up` and `watch`."""

    certfile: str
    keyfile: str


@dataclass(frozen=True)
class RouterSpec:
    """The config's `deployment.router` block, checked: what the user pinned (None: choose), the port, and TLS."""

    cloud: str | None = None
    region: str | None = None
    instance_type: str | None = None
    cpus: str | None = None  # SkyPilot's form: "2" exactly, "2+" at least
    port: int = DEFAULT_ROUTER_PORT
    use_spot: bool = False
    tls: RouterTls | None = None  # None: plain HTTP


def router_spec(config: Config) -> RouterSpec:
    """The config's `deployment.router` block, checked (defaults when absent)."""
    return parse_router_block(config.deployment.get("router"), config.source)


def parse_router_block(raw: Any, source: str) -> RouterSpec:
    """`deployment.router` as a RouterSpec; a ConfigError naming the field (and a close key name) otherwise. The TLS
    files are checked when the router is planned (`check_tls_files`), not here: a config is solved anywhere."""
    if raw is None:
        return RouterSpec()
    if not isinstance(raw, dict):
        raise ConfigError(source, _PATH, f"must be an object such as {{\"cloud\": \"aws\", \"port\": 8080}}, got "
                                         f"{type(raw).__name__}")
    check_keys(raw, ROUTER_KEYS, source, _PATH)

    def string(key: str) -> str | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip() or value != value.strip():
            raise ConfigError(source, f"{_PATH}.{key}", f"must be a non-empty string without surrounding blanks, "
                                                        f"got {value!r}")
        return value

    cloud = string("cloud")
    if cloud is not None:
        cloud = cloud.lower()
        if cloud not in KNOWN_CLOUDS:
            close = difflib.get_close_matches(cloud, KNOWN_CLOUDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known clouds: {', '.join(KNOWN_CLOUDS)}"
            raise ConfigError(source, f"{_PATH}.cloud", f"unknown cloud {raw['cloud']!r}; {hint}")
    instance_type = string("instance_type")
    cpus = _cpus(raw.get("cpus"), source, f"{_PATH}.cpus")
    if instance_type is not None and cpus is not None:
        raise ConfigError(source, f"{_PATH}.cpus", "give instance_type or cpus, not both (an instance type fixes its "
                                                   "vCPUs)")
    port = raw.get("port", DEFAULT_ROUTER_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(source, f"{_PATH}.port", f"must be an integer port in 1..65535, got {port!r}")
    use_spot = raw.get("use_spot", False)
    if use_spot is not False:
        raise ConfigError(source, f"{_PATH}.use_spot", f"must be false, got {use_spot!r}: the router is the fleet's "
                                                       f"only endpoint, and a preempted spot instance takes it down")
    tls = _tls(raw["tls"], source) if raw.get("tls") is not None else None
    return RouterSpec(cloud=cloud, region=string("region"), instance_type=instance_type, cpus=cpus, port=port,
                      tls=tls)


def _tls(raw: Any, source: str) -> RouterTls:
    path = f"{_PATH}.tls"
    if not isinstance(raw, dict):
        raise ConfigError(source, path, f'must be an object {{"certfile": PATH, "keyfile": PATH}} (files on this '
                                        f'machine), got {type(raw).__name__}')
    check_keys(raw, TLS_KEYS, source, path)
    files = []
    for key in TLS_KEYS:
        value = raw.get(key)
        if value is None:
            raise ConfigError(source, f"{path}.{key}", "missing (required with tls)")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(source, f"{path}.{key}", f"must be a file path, got {value!r}")
        file = Path(value).expanduser()
        if not file.is_absolute():
            raise ConfigError(source, f"{path}.{key}", f"must be an absolute path (or start with ~/), got {value!r}: "
                                                       f"`watch` relaunches the router from any directory")
        files.append(str(file))
    return RouterTls(certfile=files[0], keyfile=files[1])


class _Encrypted(Exception):
    """The key asks for a passphrase."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def check_tls_files(tls: RouterTls, source: str) -> None:
    """That the certificate and key can be read and belong together, as the router will load them; ConfigError
    naming the field otherwise. Reads them in memory only (never copies or prints them)."""
    path = f"{_PATH}.tls"
    for key, file in (("certfile", tls.certfile), ("keyfile", tls.keyfile)):
        if not Path(file).is_file():
            raise ConfigError(source, f"{path}.{key}", f"{file} is not a file on this machine")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.certfile, tls.keyfile, password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(source, f"{path}.keyfile", f"{tls.keyfile} is encrypted: the router starts unattended, "
                                                     f"so give it an unencrypted key (readable only by you: "
                                                     f"chmod 600)") from None
    except OSError as exc:
        raise ConfigError(source, path, f"{tls.certfile} and {tls.keyfile} are not a PEM certificate and its "
                                        f"private key ({getattr(exc, 'reason', None) or exc.strerror or exc})") \
            from None


def _cpus(value: Any, source: str, path: str) -> str | None:
    """SkyPilot's `cpus`: a number (exactly) or "N+" (at least), as a string."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = f"{value:g}"
    elif isinstance(value, str):
        text = value.strip()
    else:
        text = ""
    match = _CPUS_RE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(source, path, f"must be a vCPU count such as 2 or \"2+\" (at least 2), got {value!r}")
    return f"{float(match.group(1)):g}{match.group(2)}"
