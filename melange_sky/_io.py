"""Files written the same way everywhere: atomically (temporary file, then rename), so an interrupted run never
leaves half a file, and with one `OutputError` naming the path when the disk says no."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from melange_sky.errors import OutputError


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented JSON, atomically, so an interrupted run never leaves half a file."""
    write_text(path, json.dumps(data, indent=4) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` atomically (temporary file, then rename), so an interrupted run never leaves half a file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None


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
