"""Editing a config *document*: the raw object of a config file (JSON or YAML), changed in place of the user's own
edits.

`workload --into` and `profile --into` each own a few keys of a config and must keep every other key (unknown ones
too) as the user wrote it; `core.config` only reads. This module holds what both edits share: reading the raw
object, walking `gpu_info` in either of its forms, the bucket shape and edges a document implies, checking the
merged document against the real parser so the user hears what is still wrong before they solve, and writing it
back in the file's own format.

A YAML config is written back as YAML (keys in their order, matrices one row per line). PyYAML cannot keep
comments: when a rewrite would drop some, the previous file is kept beside it as `<name>.bak` and the caller gets
a warning saying so.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, check_edges
from melange_sky._io import config_json, write_text
from melange_sky.core.config import (Config, Pricer, check_instance_gpus, is_yaml, parse_config, parse_gpu_entry,
                                     read_config_document, tensor_parallel_size)
from melange_sky.core.gpus import same_gpu
from melange_sky.errors import BucketEdgesError, ConfigError

#: How a merge's warnings start when the merged document does not pass `parse_config`.
NOT_VALID_YET = "the merged config does not validate yet"


@dataclass(frozen=True)
class MergeResult:
    """A config (as a JSON object) with the workload keys replaced, and what the user must still fix."""

    data: dict[str, Any]
    warnings: tuple[str, ...]
    valid: bool  # False when the merged config would not pass `load_config` (e.g. tputs of the old shape)


def read_config_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw object of a config file, JSON or YAML (`x-` notes and all), so a merge keeps everything it does not
    own. Read exactly as `load_config` reads it, with the same one-line errors."""
    document = read_config_document(path, missing="no such file (--into needs an existing config)")
    if not isinstance(document.data, dict):
        raise ConfigError(document.source, None,
                          "must be a YAML mapping" if document.format == "yaml" else "must be a JSON object")
    return document.data


def config_text(path: str | os.PathLike[str], data: dict[str, Any]) -> str:
    """`data` as the text of a config file named `path`: YAML for .yaml/.yml, else JSON; matrices one row per line."""
    if not is_yaml(path):
        return config_json(data) + "\n"
    import yaml  # noqa: PLC0415 - lazy: only YAML configs need it

    class Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
        """Block style, but a list of plain values on one line: `- [2, 1]`, as a matrix row reads."""

    def represent_list(dumper: Any, value: list[Any]) -> Any:
        flow = bool(value) and not any(isinstance(x, (list, dict)) for x in value)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)


def write_config(path: str | os.PathLike[str], data: dict[str, Any]) -> list[str]:
    """Write a config document atomically in the format its name says (YAML or JSON); the warnings to show. A YAML
    file whose comments the rewrite drops (PyYAML cannot keep them) is first copied to `<name>.bak`."""
    warnings = []
    target = Path(path)
    if is_yaml(target) and target.is_file() and _has_yaml_comments(target):
        backup = target.with_name(target.name + ".bak")
        try:
            shutil.copy2(target, backup)
        except OSError as exc:
            raise ConfigError(str(target), None, f"has comments a rewrite would drop, and the copy to {backup} "
                                                 f"failed ({exc.strerror}): nothing was written") from None
        warnings.append(f"{target}: rewritten without its comments (PyYAML cannot keep them); the previous file, "
                        f"comments and all, is {backup}")
    write_text(target, config_text(target, data))
    return warnings


def _has_yaml_comments(path: Path) -> bool:
    """Whether a YAML file has a comment: a # at a line's start or after a blank, outside quotes."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    for line in text.splitlines():
        quote = None
        for k, char in enumerate(line):
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char == "#" and (k == 0 or line[k - 1] in " \t"):
                return True
    return False


def gpu_entries(gpu_info: Any) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(field path, name, entry) for gpu_info as a dict keyed by name or as a list of {"name": ...}."""
    if isinstance(gpu_info, dict):
        for name, entry in gpu_info.items():
            if isinstance(entry, dict):
                yield f"gpu_info.{name}", str(name), entry
    elif isinstance(gpu_info, list):
        for k, entry in enumerate(gpu_info):
            if isinstance(entry, dict):
                yield f"gpu_info[{k}]", str(entry.get("name", f"#{k}")), entry


def gpu_entry(data: dict[str, Any], gpu: str, source: str = "<config>") -> tuple[dict[str, Any], bool]:
    """`gpu`'s entry in `data`'s gpu_info, matched however it is spelled (`same_gpu`), else a new empty one added
    in the document's own form (a key, or {"name": gpu} appended to the list); and whether it was added."""
    gpu_info = data.get("gpu_info")
    if gpu_info is None:
        gpu_info = data["gpu_info"] = {}
    entry = next((e for _path, name, e in gpu_entries(gpu_info) if same_gpu(name, gpu)), None)
    if entry is not None:
        return entry, False
    if isinstance(gpu_info, list):
        entry = {"name": gpu}
        gpu_info.append(entry)
    elif isinstance(gpu_info, dict):
        entry = gpu_info[gpu] = {}
    else:
        raise ConfigError(source, "gpu_info", "must be an object keyed by GPU name or an array of GPU entries")
    return entry, True


def matrix_shape(value: Any) -> tuple[int, int] | None:
    """(rows, columns) of a JSON matrix (a list of lists), judged by its first row; None if it is not one."""
    if isinstance(value, list) and value and all(isinstance(r, list) for r in value):
        return len(value), len(value[0])
    return None


def config_shape(config: dict[str, Any]) -> tuple[int, int] | None:
    """The (input, output) bucket shape a config already has: its workload_distribution's, else a GPU's tputs'."""
    shape = matrix_shape(config.get("workload_distribution"))
    if shape is None:
        shape = next((s for _p, _n, e in gpu_entries(config.get("gpu_info"))
                      if (s := matrix_shape(e.get("tputs"))) is not None), None)
    return shape


def edges_for_config(config: dict[str, Any] | None, input_edges: Sequence[int] | None,
                     output_edges: Sequence[int] | None, source: str = "<config>"
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Edges to bucket a trace with: those given, else the config's own (so its tputs keep fitting), else Mélange's."""
    chosen = []
    for given, key, default in ((input_edges, "input_buckets", DEFAULT_INPUT_EDGES),
                                (output_edges, "output_buckets", DEFAULT_OUTPUT_EDGES)):
        if given is not None:
            chosen.append(check_edges(list(given), f"--{key.replace('_', '-')}"))
        elif config is not None and key in config:
            try:
                chosen.append(check_edges(config[key], key))
            except BucketEdgesError as exc:
                raise ConfigError(source, key, str(exc).split(": ", 1)[-1]) from None
        else:
            chosen.append(tuple(default))
    return chosen[0], chosen[1]


def new_gpu_entry(gpu: str, tp: int | None) -> dict[str, Any]:
    """What a merge adds for a GPU the config lacks: nothing but, under tensor parallelism, the GPUs per instance a
    replica needs (`accelerators: "GPU:tp"`), since an entry's instances must hold whole replicas."""
    return {"accelerators": f"{gpu}:{tp}"} if tp is not None and tp > 1 else {}


def per_gpu_tputs(tputs: Sequence[Sequence[float]], gpus: int) -> list[list[float]]:
    """A server's (or replica's) measured rates as a config's `tputs`, which are per GPU: divided by the `gpus` it
    ran on (rounded to 4 places; untouched for one GPU). One place, so what is printed and what is written agree."""
    return [[round(x / gpus, 4) if gpus > 1 else x for x in row] for row in tputs]


def check_gpu_entries(data: dict[str, Any], source: str = "<config>", gpus: Sequence[str] = (),
                      price: Pricer | None = None) -> None:
    """ConfigError, before any work, for what would leave `data` invalid once tputs of `gpus` are written into it:
    an existing entry whose instances the deployment's tensor parallelism does not fit (every command refuses that
    config), and an entry of `gpus` — as it is, or the empty one a merge would add — that cannot validate (no cost and
    no catalog price, a pin or TP it cannot meet). A merge that would only write a broken entry should not run."""
    gpu_info = data.get("gpu_info")
    tp = tensor_parallel_size(data.get("deployment"))
    for path, name, entry in gpu_entries(gpu_info):
        problem = check_instance_gpus(source, path, name, entry.get("accelerators"), entry.get("instance_type"), tp)
        if problem is not None:
            raise problem
    for gpu in gpus:
        found = next(((p, n, e) for p, n, e in gpu_entries(gpu_info) if same_gpu(n, gpu)), None)
        path, name, entry = found or ((f"gpu_info[{len(gpu_info)}]" if isinstance(gpu_info, list)
                                       else f"gpu_info.{gpu}"), gpu, new_gpu_entry(gpu, tp))
        try:
            parse_gpu_entry(data, path, name, entry, source, price)
        except ConfigError as exc:
            raise ConfigError(exc.source, exc.field, f"{exc.message} (nothing was estimated or written: --into "
                                                     f"writes no GPU entry that would not validate; fix the entry, "
                                                     f"or leave {gpu} out)") from None


def check_merged(data: dict[str, Any], source: str = "<config>", price: Pricer | None = None
                 ) -> tuple[Config | None, list[str]]:
    """The merged document parsed as a config, and the warnings to show with it: the parser's own, or (parsed None)
    the one reason it does not validate yet. A merge still writes an invalid document where the user asked, so the
    reason is a warning for them to act on, not an error."""
    try:
        parsed = parse_config(data, source=source, price=price)
    except ConfigError as exc:
        return None, [f"{NOT_VALID_YET}: {exc}"]
    return parsed, list(parsed.warnings)
