"""Files written the same way everywhere, so an `-o`/`--into` behaves as a shell redirection would, only safer:
a regular file is replaced atomically (a temporary file beside it, then a rename) so an interrupted run never leaves
half a file, keeping its mode and owner; a symlink is written through (its target is replaced, the link stays); a
device, FIFO or the process's own stream (/dev/null, /dev/stdout) is written directly, never replaced. One
`OutputError` names the path when the disk says no."""
from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from melange_sky.errors import OutputError


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented JSON, atomically, so an interrupted run never leaves half a file."""
    write_text(path, json.dumps(data, indent=4) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) the way `write_bytes` does."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to what `path` names: a regular file (or a new one) atomically, through symlinks, keeping its
    mode and owner; anything else (a device, a FIFO, /dev/stdout) directly, since renaming over it would destroy
    it."""
    try:
        if _write_directly(path):
            with open(path, "wb") as handle:
                handle.write(data)
            return
        _replace_atomically(Path(os.path.realpath(path)), data)
    except OSError as exc:
        raise OutputError(f"cannot write {os.fspath(path)}: {exc.strerror or exc}") from None


def _write_directly(path: str | os.PathLike[str]) -> bool:
    """Whether `path` (symlinks followed) is something other than a regular file or a missing one, or names one of
    the process's own streams on the way: /dev/stdout redirected to a file is a regular file, but replacing it would
    leave the shell's descriptor on the old one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        return True
    hop = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on a chain of symlinks
        if hop.startswith(("/dev/", "/proc/")):
            return True
        if not os.path.islink(hop):
            return False
        hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    return False


def _replace_atomically(target: Path, data: bytes) -> None:
    """Write a temporary file in `target`'s directory (same filesystem, so the rename is atomic), with the replaced
    file's mode from the start (a 0600 secret is never readable by others, not even for an instant) and its owner
    where we may set it, then rename it over `target`. Any interruption removes the temporary file."""
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # A new file gets 0666 less the umask, as open() would give it; a replaced one its own permission bits.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if old is None else stat.S_IMODE(old.st_mode))
    try:
        with os.fdopen(fd, "wb") as handle:
            if old is not None:
                os.fchmod(handle.fileno(), stat.S_IMODE(old.st_mode))
                if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                    try:
                        os.fchown(handle.fileno(), old.st_uid, old.st_gid)
                    except PermissionError:
                        pass  # only root may give a file away; the group may still fail: keep ours
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def config_json(data: Any, indent: int = 4, _level: int = 0) -> str:
    """JSON like `write_json`'s, but every list of numbers on one line, so a config's matrices read as matrices."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(data, list) and data and not any(isinstance(x, (list, dict)) for x in data):
        return json.dumps(data, ensure_ascii=False)
    if isinstance(data, list) and data:
        return "[\n" + ",\n".join(inner + config_json(x, indent, _level + 1) for x in data) + "\n" + pad + "]"
    if isinstance(data, dict) and data:
        items = (f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {config_json(v, indent, _level + 1)}"
                 for k, v in data.items())
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    return json.dumps(data, ensure_ascii=False)


def write_config_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write a config atomically (like `write_json`), matrices one row per line."""
    write_text(path, config_json(data) + "\n")
