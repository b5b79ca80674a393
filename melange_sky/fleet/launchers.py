"""Which launcher a fleet's commands use: the one it was brought up with, as the ledger records it.

A launcher knows only the clusters it launched: asked about another's, it answers "gone". So `up` records its
launcher beside the fleet (its name, its class, and what reaches it again: the local launcher's state directory),
and `status --refresh`, `down` and `watch` use that one by default. `--backend` (or `MELANGE_SKY_BACKEND`) naming
another is refused, naming both, rather than marking running clusters gone or removing a fleet whose instances
still bill. A fleet recorded before launchers were (no record) keeps the old rule: the launcher the command is
given. `up` may move a fleet to another launcher only while none of its clusters may exist.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from melange_sky.errors import LauncherMismatch, UnknownBackend
from melange_sky.fleet.backends import ENV_VAR, Backend, load_backend
from melange_sky.fleet.ledger import FleetRecord, Ledger

__all__ = ["asked_launcher", "check_launcher", "fleet_launcher", "fleet_launchers", "launcher_record", "state_dir",
           "launcher_text", "reaches", "up_launcher"]


def asked_launcher(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The launcher a command was explicitly given: `--backend`, else `$MELANGE_SKY_BACKEND`; None for neither."""
    env = os.environ if environ is None else environ
    return flag or env.get(ENV_VAR) or None


def _class_path(backend: object) -> str:
    return _path_of(type(backend))


def _path_of(kind: type) -> str:
    return f"{kind.__module__}:{kind.__qualname__}"


def state_dir(backend: object) -> str | None:
    """What reaches a launcher keeping its state in a directory (the local launcher's `dir`), absolute."""
    directory = getattr(backend, "dir", None) if getattr(backend, "name", None) == "local" else None
    return str(Path(directory).absolute()) if directory is not None else None


def launcher_record(backend: Backend) -> dict[str, Any]:
    """What the ledger keeps of a fleet's launcher: enough to load it again (`module:Class`, as `--backend` takes
    it) and to reach the same clusters (the local launcher's state directory)."""
    record: dict[str, Any] = {"name": str(backend.name), "class": _class_path(backend)}
    directory = state_dir(backend)
    if directory is not None:
        record["dir"] = directory
    return record


def launcher_text(record: Mapping[str, Any]) -> str:
    """A recorded launcher as a message names it: `'local' (state in /home/me/.melange-sky/local)`."""
    where = f" (state in {record['dir']})" if record.get("dir") else ""
    return f"{str(record.get('name') or record.get('class'))!r}{where}"


def _same_kind(record: Mapping[str, Any], backend: object) -> bool:
    return record.get("class") == _class_path(backend)


def reaches(record: Mapping[str, Any], backend: object) -> bool:
    """Whether `backend` is the recorded launcher: the same class, and for one with a state directory, that one."""
    if not _same_kind(record, backend):
        return False
    wanted, given = record.get("dir"), state_dir(backend)
    return wanted is None or given is None or Path(wanted).resolve() == Path(given).resolve()


def check_launcher(fleet: FleetRecord | None, backend: object) -> None:
    """Refuse to drive `fleet` through a launcher other than its own (LauncherMismatch): that one would record its
    running clusters gone. A fleet with no recorded launcher (an older ledger) is not checked."""
    if fleet is None or fleet.launcher is None or reaches(fleet.launcher, backend):
        return
    raise LauncherMismatch(_mismatch(fleet, f"{getattr(backend, 'name', _class_path(backend))!r}"
                                            f"{f' (state in {state_dir(backend)})' if state_dir(backend) else ''}"))


def _mismatch(fleet: FleetRecord, given: str) -> str:
    assert fleet.launcher is not None
    return (f"fleet {fleet.name!r} was brought up with the launcher {launcher_text(fleet.launcher)}, not {given}, "
            f"which does not know its clusters; drop --backend and unset {ENV_VAR} to use its own")


def _load_recorded(fleet: FleetRecord) -> Backend:
    """The fleet's own launcher, loaded again: its class, on its state directory when it has one."""
    record = fleet.launcher
    assert record is not None
    spec = str(record.get("class") or "")
    if record.get("dir"):
        from melange_sky.fleet.local import LocalBackend  # noqa: PLC0415 - only a local fleet needs it

        if spec == _path_of(LocalBackend):
            return LocalBackend(Path(record["dir"]))
    try:
        return load_backend(spec)
    except UnknownBackend as exc:
        raise UnknownBackend(f"fleet {fleet.name!r} was brought up with the launcher {launcher_text(record)}, "
                             f"which cannot be loaded here ({exc}); install it, then rerun") from None


def fleet_launcher(fleet: FleetRecord | None, asked: str | None, may_switch: bool = False) -> Backend:
    """The launcher for a command on `fleet`: its recorded one; `asked` (`asked_launcher`) must name that one, else
    LauncherMismatch (with `may_switch`, for an `up` of a fleet none of whose clusters may exist: the asked one).
    A fleet not in the ledger, or recorded before launchers were: `asked`, else the default (skypilot)."""
    if fleet is None or fleet.launcher is None:
        return load_backend(asked)
    if asked is None:
        return _load_recorded(fleet)
    given = load_backend(asked)
    if reaches(fleet.launcher, given):
        return given
    if _same_kind(fleet.launcher, given):  # `--backend local` of a fleet on another state directory: that one
        return _load_recorded(fleet)
    if may_switch:
        return given
    raise LauncherMismatch(_mismatch(fleet, f"{asked!r} (--backend or {ENV_VAR})"))


def fleet_launchers(ledger: Ledger, fleets: Iterable[str] | None, asked: str | None) -> dict[str, Backend]:
    """`fleet_launcher` of each named fleet in the ledger (None: every fleet; unknown names skipped), all checked
    before any is used, one object per launcher."""
    found: dict[str, Backend] = {}
    shared: dict[str, Backend] = {}
    for name in fleets if fleets is not None else [f.name for f in ledger.fleets()]:
        record = ledger.get_fleet(name)
        if record is None:
            continue
        key = repr(sorted(record.launcher.items())) if record.launcher is not None else f"asked:{asked}"
        if key not in shared:
            shared[key] = fleet_launcher(record, asked)
        found[name] = shared[key]
    return found


def up_launcher(fleet: str, asked: str | None) -> Backend:
    """The launcher `up` brings `fleet` up with: a fleet in the ledger keeps its own (`fleet_launcher`); it may move
    to the `asked` one only while none of its clusters may exist. Reads the ledger only if there is one."""
    if not Ledger.exists():
        return load_backend(asked)
    with Ledger() as ledger:
        record = ledger.get_fleet(fleet)
        idle = record is not None and not any(r.state.may_have_cluster for r in ledger.replicas(fleet, roles=None))
    return fleet_launcher(record, asked, may_switch=idle)
