"""Read and validate a Mélange config: the original format exactly, plus melange-sky's optional extensions.

Every problem is reported as a `ConfigError` naming the file and the JSON field, so the user can fix it in one go.
Soft problems (unknown keys, a distribution that does not sum to 1) become warnings carried on the `Config`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melange_sky.errors import CatalogError, ConfigError

Matrix = tuple[tuple[float, ...], ...]
Bucket = tuple[int, int]

TOP_LEVEL_KEYS = (
    "workload_distribution", "total_request_rate", "slice_factor", "gpu_info",
    # melange-sky extensions
    "name", "input_buckets", "output_buckets", "deployment", "clouds", "headroom",
)
GPU_KEYS = (
    "name", "cost", "tputs",
    # melange-sky extensions
    "cloud", "region", "instance_type", "accelerators", "use_spot", "max_count", "min_count", "quotas",
)
REQUIRED_TOP_LEVEL = ("workload_distribution", "total_request_rate", "gpu_info")
#: Distributions off from 1 by more than this are normalised with a warning (smaller drift is rounding).
NORMALISE_WARN_TOLERANCE = 0.01


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type the solver may buy: its price, its profiled throughput per bucket, and optional limits/pins.

    `cost` is never missing: a config may omit it, and then it is the catalog's price (`cost_source` "catalog").
    `quotas` maps offer patterns ("aws", "azure:eastus", "gcp:us-central1:g2-standard-4") to per-offer caps.
    """

    name: str
    cost: float
    tputs: Matrix
    min_count: int = 0
    max_count: int | None = None
    cloud: str | None = None
    region: str | None = None
    instance_type: str | None = None
    accelerators: str | None = None
    use_spot: bool = False
    quotas: tuple[tuple[str, int], ...] = ()
    cost_source: str = "config"
    entry: str | None = None  # with --per-offer: the GPU entry this offer's column came from (one GPU type)
    path: str | None = field(default=None, compare=False)

    @property
    def field_path(self) -> str:
        """The JSON path of this entry in its config, for messages ("gpu_info.A10G" or "gpu_info[0]")."""
        return self.path or f"gpu_info.{self.name}"

    def tput(self, bucket: Bucket) -> float:
        return self.tputs[bucket[0]][bucket[1]]


#: Prices a GPU entry that has no `cost`: (entry, the config's clouds, the config's source) -> $/h per GPU. Raises
#: `ConfigError` or `CatalogError` saying why there is no price. The catalog's is `melange_sky.deploy.offers`'.
Pricer = Callable[[GpuSpec, "tuple[str, ...] | None", str], float]


@dataclass(frozen=True)
class Config:
    """A validated config. `workload_distribution` is normalised to sum to 1."""

    source: str
    name: str
    workload_distribution: Matrix
    total_request_rate: float
    gpus: tuple[GpuSpec, ...]
    slice_factor: int = 1
    headroom: float = 1.0
    input_buckets: tuple[int, ...] | None = None
    output_buckets: tuple[int, ...] | None = None
    deployment: dict[str, Any] = field(default_factory=dict)
    clouds: tuple[str, ...] | None = None
    warnings: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.workload_distribution), len(self.workload_distribution[0])

    @property
    def buckets(self) -> list[Bucket]:
        rows, cols = self.shape
        return [(i, j) for i in range(rows) for j in range(cols)]

    def bucket_rate(self, bucket: Bucket) -> float:
        """Requests per second that fall into `bucket`."""
        return self.workload_distribution[bucket[0]][bucket[1]] * self.total_request_rate

    def bucket_name(self, bucket: Bucket) -> str:
        """A human name: token ranges when the config has bucket edges, else the matrix cell."""
        i, j = bucket
        if self.input_buckets and self.output_buckets:
            return (f"({i}, {j}) [input {self.input_buckets[i]}-{self.input_buckets[i + 1]}, "
                    f"output {self.output_buckets[j]}-{self.output_buckets[j + 1]} tokens]")
        return f"({i}, {j})"

    def gpu(self, name: str) -> GpuSpec:
        for gpu in self.gpus:
            if gpu.name == name:
                return gpu
        raise KeyError(name)


def load_config(path: str | os.PathLike[str], price: Pricer | None = None) -> Config:
    """Read, parse and validate a config file; raise `ConfigError` with file and field on any problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, None, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(source, None, "is a directory, expected a JSON file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror}") from None
    if not text.strip():
        raise ConfigError(source, None, "file is empty, expected a JSON object")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise ConfigError(source, None, f"duplicate key {exc.key!r} in one JSON object") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(source, None, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    return parse_config(data, source=source, default_name=Path(path).stem, price=price)


def parse_config(data: Any, source: str = "<config>", default_name: str = "melange",
                 price: Pricer | None = None) -> Config:
    """Validate an already-decoded config object (the dict `json.load` gives).

    A GPU entry without `cost` is priced by `price` (`melange_sky.deploy.offers.catalog_pricer` gives the catalog's
    price); without one, a missing cost is an error. Configs that give every cost never need a price.
    """
    return _Parser(source, price).parse(data, default_name)


def with_overrides(config: Config, *, rate: float | None = None, headroom: float | None = None) -> Config:
    """The config with command-line overrides applied, validated like the file's own values."""
    changes: dict[str, Any] = {}
    if rate is not None:
        changes["total_request_rate"] = _Parser("--rate").positive(rate, None)
    if headroom is not None:
        changes["headroom"] = _Parser("--headroom").fraction(headroom, None)
    return dataclasses.replace(config, **changes) if changes else config


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; two GPUs of one name would vanish without a word.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _describe(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


class _Parser:
    def __init__(self, source: str, price: Pricer | None = None):
        self.source = source
        self.price = price
        self.clouds: tuple[str, ...] | None = None
        self.warnings: list[str] = []

    def fail(self, field_path: str | None, message: str) -> ConfigError:
        return ConfigError(self.source, field_path, message)

    def warn(self, field_path: str | None, message: str) -> None:
        where = f"{self.source}: {field_path}: " if field_path else f"{self.source}: "
        self.warnings.append(where + message)

    # ---- scalars -------------------------------------------------------------------------------------------------
    def number(self, value: Any, path: str | None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"must be a number, got {_type_name(value)} {_describe(value)}")
        if not math.isfinite(value):
            raise self.fail(path, f"must be a finite number, got {_describe(value)}")
        return float(value)

    def positive(self, value: Any, path: str | None) -> float:
        number = self.number(value, path)
        if number <= 0:
            raise self.fail(path, f"must be a positive number, got {_describe(value)}")
        return number

    def non_negative(self, value: Any, path: str | None, meaning: str = "") -> float:
        number = self.number(value, path)
        if number < 0:
            raise self.fail(path, f"must be a number >= 0{meaning}, got {_describe(value)}")
        return number

    def fraction(self, value: Any, path: str | None) -> float:
        number = self.number(value, path)
        if not 0 < number <= 1:
            raise self.fail(path, f"must be in (0, 1] (the highest planned utilisation of a GPU), "
                                  f"got {_describe(value)}")
        return number

    def integer(self, value: Any, path: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            raise self.fail(path, f"must be an integer >= {minimum}, got {_describe(value)}")
        if value < minimum:
            raise self.fail(path, f"must be an integer >= {minimum}, got {_describe(value)}")
        return int(value)

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"must be a non-empty string, got {_type_name(value)} {_describe(value)}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {_describe(value)}")
        return value

    # ---- structure -----------------------------------------------------------------------------------------------
    def check_keys(self, obj: dict[str, Any], known: tuple[str, ...], prefix: str) -> None:
        for key in obj:
            if key in known:
                continue
            where = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            self.warn(where, f"unknown key, ignored{hint}")

    def matrix(self, value: Any, path: str, shape: tuple[int, int] | None, cell) -> Matrix:
        """A non-empty rectangular list of lists; with `shape`, it must match it."""
        if not isinstance(value, list) or not value:
            raise self.fail(path, f"must be a non-empty array of rows, got {_type_name(value)} {_describe(value)}")
        rows: list[tuple[float, ...]] = []
        for i, row in enumerate(value):
            if not isinstance(row, list) or not row:
                raise self.fail(f"{path}[{i}]", f"must be a non-empty array of numbers, got {_describe(row)}")
            if len(row) != len(value[0]):
                raise self.fail(f"{path}[{i}]", f"has {len(row)} columns but row 0 has {len(value[0])}: "
                                                f"the matrix must be rectangular")
            rows.append(tuple(cell(x, f"{path}[{i}][{j}]") for j, x in enumerate(row)))
        if shape is not None and (len(rows), len(rows[0])) != shape:
            raise self.fail(path, f"is {len(rows)}x{len(rows[0])} but workload_distribution is "
                                  f"{shape[0]}x{shape[1]}: every tputs matrix needs one entry per bucket")
        return tuple(rows)

    def edges(self, value: Any, path: str, count: int, axis: str) -> tuple[int, ...]:
        if not isinstance(value, list) or len(value) < 2:
            raise self.fail(path, f"must be an array of at least 2 token counts, got {_describe(value)}")
        edges = tuple(self.integer(x, f"{path}[{k}]", 0) for k, x in enumerate(value))
        for k in range(1, len(edges)):
            if edges[k] <= edges[k - 1]:
                raise self.fail(f"{path}[{k}]", f"must be greater than {path}[{k - 1}] ({edges[k - 1]}): "
                                                f"bucket edges must increase")
        if len(edges) != count + 1:
            raise self.fail(path, f"has {len(edges)} edges, so {len(edges) - 1} {axis} buckets, but "
                                  f"workload_distribution has {count} (edges = buckets + 1)")
        return edges

    # ---- the config ----------------------------------------------------------------------------------------------
    def parse(self, data: Any, default_name: str) -> Config:
        if not isinstance(data, dict):
            raise self.fail(None, f"must be a JSON object with {', '.join(REQUIRED_TOP_LEVEL)}, "
                                  f"got {_type_name(data)}")
        self.check_keys(data, TOP_LEVEL_KEYS, "")
        for key in REQUIRED_TOP_LEVEL:
            if key not in data:
                raise self.fail(key, "missing (required)")

        dist = self.matrix(data["workload_distribution"], "workload_distribution", None,
                           lambda x, p: self.non_negative(x, p))
        total = sum(sum(row) for row in dist)
        if total <= 0:
            raise self.fail("workload_distribution", "all shares are zero: at least one bucket needs demand")
        if abs(total - 1.0) > NORMALISE_WARN_TOLERANCE:
            self.warn("workload_distribution", f"shares sum to {total:.4g}, not 1; normalised")
        dist = tuple(tuple(x / total for x in row) for row in dist)
        shape = (len(dist), len(dist[0]))

        rate = self.positive(data["total_request_rate"], "total_request_rate")
        slice_factor = self.integer(data.get("slice_factor", 1), "slice_factor", 1)
        headroom = self.fraction(data["headroom"], "headroom") if "headroom" in data else 1.0
        clouds = None
        if "clouds" in data:  # before gpu_info: a GPU without a cost is priced from the catalog in these clouds
            if not isinstance(data["clouds"], list) or not data["clouds"]:
                raise self.fail("clouds", f"must be a non-empty array of cloud names, got {_describe(data['clouds'])}")
            clouds = tuple(self.string(c, f"clouds[{k}]").lower() for k, c in enumerate(data["clouds"]))
        self.clouds = clouds
        gpus = self.gpu_info(data["gpu_info"], shape)

        name = self.string(data["name"], "name") if "name" in data else default_name
        input_edges = output_edges = None
        if "input_buckets" in data:
            input_edges = self.edges(data["input_buckets"], "input_buckets", shape[0], "input")
        if "output_buckets" in data:
            output_edges = self.edges(data["output_buckets"], "output_buckets", shape[1], "output")
        deployment = data.get("deployment", {})
        if not isinstance(deployment, dict):
            raise self.fail("deployment", f"must be an object, got {_type_name(deployment)}")

        config = Config(source=self.source, name=name, workload_distribution=dist, total_request_rate=rate,
                        gpus=gpus, slice_factor=slice_factor, headroom=headroom, input_buckets=input_edges,
                        output_buckets=output_edges, deployment=deployment, clouds=clouds,
                        warnings=tuple(self.warnings))
        self.check_servable(config)
        return config

    def gpu_info(self, value: Any, shape: tuple[int, int]) -> tuple[GpuSpec, ...]:
        # The original format allows a dict keyed by name or a list of {"name", "cost", "tputs"}.
        if isinstance(value, dict):
            entries = [(f"gpu_info.{name}", name, entry) for name, entry in value.items()]
        elif isinstance(value, list):
            entries = []
            for k, entry in enumerate(value):
                if not isinstance(entry, dict):
                    raise self.fail(f"gpu_info[{k}]", f"must be an object, got {_type_name(entry)}")
                if "name" not in entry:
                    raise self.fail(f"gpu_info[{k}].name", "missing (required in the list form of gpu_info)")
                entries.append((f"gpu_info[{k}]", entry["name"], entry))
        else:
            raise self.fail("gpu_info", f"must be an object keyed by GPU name or an array of GPU entries, "
                                        f"got {_type_name(value)}")
        if not entries:
            raise self.fail("gpu_info", "is empty: at least one GPU type is needed")

        gpus: list[GpuSpec] = []
        seen: dict[str, str] = {}
        for path, name, entry in entries:
            name = self.string(name, f"{path}.name" if path.endswith("]") else "gpu_info")
            if name in seen:
                raise self.fail(f"{path}.name", f"duplicate GPU name {name!r} (also {seen[name]})")
            seen[name] = path
            gpus.append(self.gpu(path, name, entry, shape))
        return tuple(gpus)

    def gpu(self, path: str, name: str, entry: Any, shape: tuple[int, int]) -> GpuSpec:
        if not isinstance(entry, dict):
            raise self.fail(path, f"must be an object with cost and tputs, got {_type_name(entry)}")
        self.check_keys(entry, GPU_KEYS, path)
        if "tputs" not in entry:
            raise self.fail(f"{path}.tputs", "missing (required)")
        cost = self.positive(entry["cost"], f"{path}.cost") if "cost" in entry else None
        tputs = self.matrix(entry["tputs"], f"{path}.tputs", shape,
                            lambda x, p: self.non_negative(x, p, " (0 means this GPU cannot serve the bucket)"))
        min_count = self.integer(entry.get("min_count", 0), f"{path}.min_count", 0)
        max_count = self.integer(entry["max_count"], f"{path}.max_count", 0) if "max_count" in entry else None
        if max_count is not None and max_count < min_count:
            raise self.fail(f"{path}.max_count", f"is {max_count}, below min_count {min_count}")
        pins = {key: self.string(entry[key], f"{path}.{key}")
                for key in ("cloud", "region", "instance_type", "accelerators") if key in entry}
        use_spot = self.boolean(entry["use_spot"], f"{path}.use_spot") if "use_spot" in entry else False
        quotas = self.quotas(entry["quotas"], f"{path}.quotas") if "quotas" in entry else ()
        spec = GpuSpec(name=name, cost=cost if cost is not None else 0.0, tputs=tputs, min_count=min_count,
                       max_count=max_count, use_spot=use_spot, quotas=quotas, path=path, **pins)
        return spec if cost is not None else self.catalog_cost(spec)

    def quotas(self, value: Any, path: str) -> tuple[tuple[str, int], ...]:
        """{"cloud[:region[:instance_type]]": max instances of each matching offer}."""
        if not isinstance(value, dict) or not value:
            raise self.fail(path, f'must be an object like {{"aws": 2, "azure:eastus": 1}}, got {_describe(value)}')
        result = []
        for pattern, cap in value.items():
            parts = pattern.split(":")
            if not 1 <= len(parts) <= 3 or not all(p.strip() for p in parts):
                raise self.fail(f"{path}.{pattern}", "must be cloud, cloud:region or cloud:region:instance_type")
            result.append((":".join([parts[0].strip().lower(), *(p.strip() for p in parts[1:])]),
                           self.integer(cap, f"{path}.{pattern}", 0)))
        return tuple(result)

    def catalog_cost(self, spec: GpuSpec) -> GpuSpec:
        """`spec` priced per GPU by the pricer; ConfigError naming `cost` if there is no price for it."""
        if self.price is None:
            raise self.fail(f"{spec.field_path}.cost", "missing: add a cost in $/h per GPU")
        try:
            cost = self.price(spec, self.clouds, self.source)
        except (ConfigError, CatalogError) as exc:
            reason = exc.message if isinstance(exc, ConfigError) else str(exc)
            raise self.fail(f"{spec.field_path}.cost", f"missing, and the catalog has no price for it ({reason}); "
                                                      f"add a cost in $/h per GPU") from None
        return dataclasses.replace(spec, cost=cost, cost_source="catalog")

    def check_servable(self, config: Config) -> None:
        for bucket in config.buckets:
            if config.bucket_rate(bucket) > 0 and not any(g.tput(bucket) > 0 for g in config.gpus):
                i, j = bucket
                raise self.fail(f"workload_distribution[{i}][{j}]",
                                f"bucket {config.bucket_name(bucket)} has demand but every GPU's tputs "
                                f"for it is 0: no GPU can serve it")
