"""A fleet's keys: the router's admin token (for `PUT /admin/routes`) and the key its clients send.

They live in one file per fleet, `$MELANGE_SKY_HOME/keys/<fleet>.json`, created with mode 0600 in a 0700 directory
before anything could write them elsewhere, and nowhere else: not in the ledger database, not in a plan or task
file, not in a log. They reach the router as SkyPilot secrets (in memory). `down` deletes the file once the fleet
is gone.
"""
from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from melange_sky.errors import LedgerError, MissingSecret
from melange_sky.fleet.ledger import ledger_home, safe_name

__all__ = ["ADMIN_TOKEN_ENV", "API_KEY_ENV", "FleetKeys", "fleet_keys", "forget_keys", "keys_path", "load_keys",
           "store_keys"]

#: The environment variables the router reads its keys from (passed as SkyPilot secrets).
ADMIN_TOKEN_ENV = "MELANGE_SKY_ADMIN_TOKEN"
API_KEY_ENV = "MELANGE_SKY_API_KEY"


@dataclass(frozen=True)
class FleetKeys:
    """The values are kept out of repr, so a record in a log or a traceback shows none."""

    path: Path
    admin_token: str = field(repr=False)
    api_key: str = field(repr=False)
    api_key_generated: bool = False  # made here (the environment had none), not the user's own


def keys_path(fleet: str, home: str | os.PathLike[str] | None = None) -> Path:
    return (Path(home) if home is not None else ledger_home()) / "keys" / f"{safe_name(fleet)}.json"


def fleet_keys(fleet: str, api_key: str | None = None, home: str | os.PathLike[str] | None = None) -> FleetKeys:
    """The fleet's keys, made at its first `up`: a random admin token, and the client key `api_key` (the user's
    MELANGE_SKY_API_KEY) or, without one, a random one. They never change while the fleet lives: its router was
    launched with them, so a different `api_key` later is refused (it would not be the key the router admits)."""
    path = keys_path(fleet, home)
    stored = _read(path)
    if stored is not None:
        if api_key is not None and api_key != stored["api_key"]:
            raise MissingSecret(f"MELANGE_SKY_API_KEY is not the client key fleet {fleet}'s router was launched "
                                f"with (in {path}): unset it to use the fleet's key, or `melange-sky down {fleet}` "
                                f"and `up` again to change keys")
        return FleetKeys(path, stored["admin_token"], stored["api_key"], bool(stored.get("api_key_generated")))
    admin = secrets.token_urlsafe(32)
    key, generated = (api_key, False) if api_key else (secrets.token_urlsafe(32), True)
    _write(path, {"admin_token": admin, "api_key": key, "api_key_generated": generated})
    return FleetKeys(path, admin, key, generated)


def load_keys(fleet: str, home: str | os.PathLike[str] | None = None) -> FleetKeys | None:
    """The fleet's keys if it has them (never makes new ones: for `down`, `watch`, pushes)."""
    path = keys_path(fleet, home)
    stored = _read(path)
    if stored is None:
        return None
    return FleetKeys(path, stored["admin_token"], stored["api_key"], bool(stored.get("api_key_generated")))


def store_keys(fleet: str, admin_token: str, api_key: str, home: str | os.PathLike[str] | None = None) -> FleetKeys:
    """Keep keys the fleet already has (a hosted controller's, given to its host as secrets) in this home's 0600
    key file, as `fleet_keys` keeps the ones it makes."""
    path = keys_path(fleet, home)
    _write(path, {"admin_token": admin_token, "api_key": api_key, "api_key_generated": False})
    return FleetKeys(path, admin_token, api_key)


def forget_keys(fleet: str, home: str | os.PathLike[str] | None = None) -> None:
    """Delete the fleet's key file (after `down` removed the fleet: its router is gone with the tokens)."""
    keys_path(fleet, home).unlink(missing_ok=True)


def _read(path: Path) -> dict[str, str] | None:
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(f"cannot read the fleet's key file {path}: {exc.strerror}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise LedgerError(f"{path} is readable by other users (mode {stat.S_IMODE(info.st_mode):o}): it holds the "
                          f"fleet's admin token; `chmod 600 {path}` and rerun")
    try:
        data = json.loads(text)
        if not (isinstance(data, dict) and isinstance(data.get("admin_token"), str)
                and isinstance(data.get("api_key"), str)):
            raise ValueError("missing admin_token or api_key")
    except ValueError as exc:
        raise LedgerError(f"the fleet's key file {path} is damaged ({exc}); move it away and run `melange-sky down` "
                          f"then `up` to make new keys") from None
    return data


def _write(path: Path, data: dict[str, object]) -> None:
    """Atomically, and never readable by others for an instant: the temporary file is created 0600."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except OSError as exc:
        raise LedgerError(f"cannot write the fleet's key file {path}: {exc.strerror}") from None
