"""Read and validate a Mélange config: the original format exactly, plus melange-sky's optional extensions.

A config is JSON, or YAML when its name ends in .yaml or .yml (SkyPilot users write YAML). Every problem is reported
as a `ConfigError` naming the file and the field (and, in a YAML file, its line), so the user can fix it in one go.
An unknown key is an error at every level, as in SkyPilot's own YAML schema (a misspelt optional key would otherwise
be silently left at its default); keys starting with `x-` are the user's own notes, kept in the file and ignored.
Soft problems (a distribution that does not sum to 1) become warnings carried on the `Config`.

Where each part of a config goes (the module that reads it; each points back here):
- `workload_distribution`, `total_request_rate`, `slice_factor`, `headroom`, `gpu_info.*.cost/tputs/min_count/
  max_count`: parsed here into `Config`/`GpuSpec`; the ILP in `melange_sky/solver/model.py` uses them.
- `input_buckets`, `output_buckets`: here; kept in a fleet's plan for its router (`deploy/plan.router_record`),
  which buckets requests by them (`serve/routes.py`); `workload --into` and `profile --into` write them
  (`inputs/workload.py`, `inputs/profile_result.py`, through `core/config_doc.py`).
- `clouds`, `gpu_info.*.cloud/region/instance_type/accelerators/use_spot/quotas`: here; bound to catalog offers by
  `melange_sky/deploy/offers.py` (a missing `cost` is priced there, through `Pricer`).
- `spot` (`floor`, `max_region_share`): here, into `SpotPolicy`; `deploy/offers.py` offers every GPU entry that does
  not pin `use_spot` on both markets (and `cloud: kubernetes`/`ssh` entries as `owned`), and the ILP in
  `solver/model.py` keeps the floor and the regional spread (`solver/result.py` reports them).
- `name`: the fleet's name (cluster names, `melange_sky/deploy/plan.py`; the ledger, `melange_sky/fleet/`).
- `deployment`: only checked to be an object here, and its `tensor_parallel_size` against each GPU entry's GPUs per
  instance (`check_instance_gpus`: a replica's TP GPUs are one instance's); its keys and values are
  `melange_sky/deploy/plan.py`'s
  (`DEPLOYMENT_KEYS`, `deployment_from_config`, rendered by `templates/*.j2`), its `router` block
  `melange_sky/deploy/router_config.py`'s (`ROUTER_KEYS`, `TLS_KEYS`; the task: `deploy/router_task.py`).
A new field is added to the key list of its block (`TOP_LEVEL_KEYS`, `GPU_KEYS`, or the consumer's), parsed where
that list is, and listed in docs/config.md.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melange_sky.errors import CatalogError, ConfigError

Matrix = tuple[tuple[float, ...], ...]
Bucket = tuple[int, int]

TOP_LEVEL_KEYS = (
    "workload_distribution", "total_request_rate", "slice_factor", "gpu_info",
    # melange-sky extensions
    "name", "input_buckets", "output_buckets", "deployment", "clouds", "headroom", "spot",
)
SPOT_KEYS = ("floor", "max_region_share")
#: SkyPilot infra whose GPUs the user owns (a Kubernetes cluster; SSH node pools are a Kubernetes cloud in 0.14): no
#: catalog price, a cost the user sets (0 allowed) and a GPU cap; market "owned", counted as reliable.
OWNED_CLOUDS = ("kubernetes", "ssh")


class Market:
    """Where a replica's GPUs come from. On-demand and owned replicas are reliable (they carry the spot floor);
    spot replicas may be preempted, a region's in waves."""

    ON_DEMAND = "on_demand"
    SPOT = "spot"
    OWNED = "owned"
    RELIABLE = (ON_DEMAND, OWNED)


@dataclass(frozen=True)
class SpotPolicy:
    """The top-level `spot` block: offer spot beside on-demand, keep reliable replicas able to carry `floor` of
    every bucket, and put no more than `max_region_share` of the spot GPUs in one region."""

    floor: float = 0.0
    max_region_share: float = 1.0
GPU_KEYS = (
    "name", "cost", "tputs",
    # melange-sky extensions
    "cloud", "region", "instance_type", "accelerators", "use_spot", "max_count", "min_count", "quotas",
)
#: The dearest GPU a config may price, $/h per GPU (the dearest cloud GPUs cost ~$10/h). Far above any price, and
#: low enough for the solver: HiGHS reads a cost from 1e20 as infinite, and a fleet's $/h must stay small enough
#: (500 replicas x 1e6 = 5e8) that its absolute optimality gap of 1e-6 $/h is still above double rounding (~1e-7).
MAX_GPU_COST = 1e6
REQUIRED_TOP_LEVEL = ("workload_distribution", "total_request_rate", "gpu_info")
#: A key starting with this, at any level of a config, is the user's own note: kept, never read, never an error.
NOTE_PREFIX = "x-"
#: File name endings read as YAML; every other config file is JSON.
YAML_SUFFIXES = (".yaml", ".yml")
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
    #: `Market.*`: pinned by the entry (`use_spot`, an owned cloud) or set on a bound column; None: an entry that
    #: leaves it to the plan (on-demand without a `spot` block, both markets with one).
    market: str | None = None
    path: str | None = field(default=None, compare=False)

    @property
    def field_path(self) -> str:
        """The JSON path of this entry in its config, for messages ("gpu_info.A10G" or "gpu_info[0]")."""
        return self.path or f"gpu_info.{self.name}"

    def tput(self, bucket: Bucket) -> float:
        return self.tputs[bucket[0]][bucket[1]]

    @property
    def reliable(self) -> bool:
        """Whether this column's replicas count towards the spot floor (on-demand or owned, not spot)."""
        return not self.use_spot and self.market != Market.SPOT


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
    spot: SpotPolicy | None = None
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


def tensor_parallel_size(deployment: Any) -> int | None:
    """A deployment block's `tensor_parallel_size` when it is a whole number >= 1, else None (absent; a wrong value
    is its reader's to report: `melange_sky.engine.EngineSettings.from_deployment`)."""
    value = deployment.get("tensor_parallel_size") if isinstance(deployment, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def pinned_gpus(accelerators: Any) -> int | None:
    """GPUs per instance an `accelerators` pin gives ("A10G:4" -> 4, "A10G" -> 1, as SkyPilot reads it); None when the
    pin is malformed (`deploy/offers.py` says why)."""
    if not isinstance(accelerators, str):
        return None
    name, _, count = accelerators.partition(":")
    try:
        number = float(count) if count.strip() else 1.0
    except ValueError:
        return None
    return int(number) if name.strip() and number.is_integer() and number >= 1 else None


def check_instance_gpus(source: str, path: str, name: str, accelerators: Any, instance_type: Any,
                        tp: int | None) -> ConfigError | None:
    """The error for a GPU entry whose instances cannot run replicas of `tp` GPUs, else None. A replica's tensor-
    parallel GPUs are GPUs of one instance, and an instance of k GPUs runs k / tp replicas (templates/vllm.j2), so k
    must be a multiple of tp. k is what the entry's `accelerators` pin says; without one an entry gets single-GPU
    instances (`deploy/offers.py` picks those first), so tp > 1 needs the pin."""
    if tp is None or tp <= 1:
        return None
    field_path = f"{path}.accelerators"
    base = name
    if accelerators is None:
        why = (f"instance_type {instance_type!r} alone does not say its GPUs per instance" if instance_type else
               f"without an accelerators pin {name} gets single-GPU instances")
        return ConfigError(source, field_path, f"missing: deployment.tensor_parallel_size is {tp}, so each replica "
                                               f"needs {tp} GPUs of one instance, and {why}; pin "
                                               f"\"{base}:{tp}\" (or another multiple of {tp})")
    count = pinned_gpus(accelerators)
    if count is None or count % tp == 0:
        return None  # a malformed pin is the offers layer's to report
    base = str(accelerators).partition(":")[0].strip() or name
    return ConfigError(source, field_path, f"{accelerators!r} is {count} GPU(s) per instance, which "
                                           f"deployment.tensor_parallel_size {tp} does not divide: each replica needs "
                                           f"{tp} GPUs of one instance; pin \"{base}:{tp}\" (or another multiple of "
                                           f"{tp}), or set tensor_parallel_size to a divisor of {count}")


def is_note(key: object) -> bool:
    """Whether a config key is the user's own note (`x-...`), which every block ignores."""
    return isinstance(key, str) and key.startswith(NOTE_PREFIX)


def unknown_key(source: str, block: str, key: object, known: Sequence[str], hint: str = "") -> ConfigError:
    """The error for `key`, unknown in `block` ("" at the top level; "deployment.router"): the known key it looks
    like a misspelling of, else the known keys; `hint` adds what else the block takes; and how to keep a note."""
    where = f"{block}.{key}" if block else str(key)
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    found = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    extra = f"{hint}; " if hint else ""
    return ConfigError(source, where, f"unknown key; {found} ({extra}a note of your own: start its name with "
                                      f"{NOTE_PREFIX})")


def check_keys(obj: Mapping[Any, Any], known: Sequence[str], source: str, block: str, hint: str = "") -> None:
    """`unknown_key` for the first key of `obj` (a config block) that is neither known nor a note."""
    for key in obj:
        if key not in known and not is_note(key):
            raise unknown_key(source, block, key, known, hint)


def is_yaml(path: str | os.PathLike[str]) -> bool:
    """Whether a config file is YAML (by its name: .yaml or .yml), else JSON."""
    return Path(path).suffix.lower() in YAML_SUFFIXES


@dataclass(frozen=True)
class ConfigDocument:
    """A config file decoded (JSON or YAML) but not validated, and the line of each field in it (YAML only)."""

    source: str
    data: Any
    format: str  # "json" or "yaml"
    lines: Mapping[str, int] = field(default_factory=dict)  # field path ("gpu_info.A10G.tputs[1][0]") -> line


def read_config_document(path: str | os.PathLike[str], missing: str = "no such file") -> ConfigDocument:
    """Read and decode a config file, JSON or YAML by its name; `ConfigError` (one line, with the line and column of
    a syntax error) if it cannot be read or decoded. `missing` is the message for a file that does not exist."""
    source = str(path)
    yaml_file = is_yaml(path)
    kind = "YAML" if yaml_file else "JSON"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, None, missing) from None
    except IsADirectoryError:
        raise ConfigError(source, None, f"is a directory, expected a {kind} file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror}") from None
    if not text.strip():
        raise ConfigError(source, None, f"file is empty, expected a {'YAML mapping' if yaml_file else 'JSON object'}")
    if yaml_file:
        data, lines = _decode_yaml(text, source)
        return ConfigDocument(source, data, "yaml", lines)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise ConfigError(source, None, f"duplicate key {exc.key!r} in one JSON object") from None
    except json.JSONDecodeError as exc:
        hint = ("; a YAML config needs a name ending in .yaml or .yml"
                if exc.lineno == 1 and exc.colno == 1 and not text.lstrip().startswith(("{", "[")) else "")
        raise ConfigError(source, None, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}){hint}") \
            from None
    return ConfigDocument(source, data, "json")


def load_config(path: str | os.PathLike[str], price: Pricer | None = None) -> Config:
    """Read, parse and validate a config file (JSON, or YAML by its name); raise `ConfigError` with file and field
    (and line, in YAML) on any problem. The one way to load a config: the offers layer adds only its `price`
    (`melange_sky.deploy.offers.catalog_pricer()`); the `deployment` block is checked by its reader
    (`melange_sky.deploy.plan.deployment_from_config`)."""
    document = read_config_document(path)
    return parse_config(document.data, source=document.source, default_name=Path(path).stem, price=price,
                        lines=document.lines, kind="YAML mapping" if document.format == "yaml" else "JSON object")


def parse_config(data: Any, source: str = "<config>", default_name: str = "melange",
                 price: Pricer | None = None, *, lines: Mapping[str, int] | None = None,
                 kind: str = "JSON object") -> Config:
    """Validate an already-decoded config object (the dict `json.load` or `read_config_document` gives).

    A GPU entry without `cost` is priced by `price` (`melange_sky.deploy.offers.catalog_pricer()` gives the
    catalog's price, as every command does); without one, a missing cost is an error. Configs that give every cost
    never need a price. With `lines` (field path -> line, as `read_config_document` gives for YAML), messages say
    "file:line: field: ...".
    """
    return _Parser(source, price, lines, kind).parse(data, default_name)


def parse_gpu_entry(data: Mapping[str, Any], path: str, name: str, entry: Mapping[str, Any],
                    source: str = "<config>", price: Pricer | None = None) -> GpuSpec:
    """One GPU entry of the config document `data`, checked alone as `parse_config` checks it — its pins and limits,
    its cost or the catalog's price in the document's clouds, the deployment's tensor parallelism — whatever else the
    document still lacks. A command about to write tputs for it (`estimate --into`) calls this first, so it never
    writes an entry that cannot validate. The entry's own tputs are not read (the caller replaces them)."""
    parser = _Parser(source, price)
    clouds = data.get("clouds")
    if isinstance(clouds, list) and clouds and all(isinstance(c, str) and c.strip() for c in clouds):
        parser.clouds = tuple(c.lower() for c in clouds)
    spec = parser.gpu(path, parser.string(name, f"{path}.name"), {**entry, "tputs": [[1.0]]}, None)
    problem = check_instance_gpus(source, spec.field_path, spec.name, spec.accelerators, spec.instance_type,
                                  tensor_parallel_size(data.get("deployment")))
    if problem is not None:
        raise problem
    return spec


# ---- YAML ---------------------------------------------------------------------------------------------------------
# PyYAML is imported only when a YAML config is read: `melange-sky --help` and JSON configs never pay for it.

def _yaml_loader_class() -> Any:
    """PyYAML's safe loader (C-accelerated when available), also reading 1e6 as a number, as YAML 1.2 and JSON do
    (YAML 1.1 wants 1.0e+6 and would hand the parser the string "1e6")."""
    global _YAML_LOADER
    if _YAML_LOADER is None:
        import yaml  # noqa: PLC0415 - lazy: only YAML configs need it

        base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

        class Loader(base):  # type: ignore[misc, valid-type]
            pass

        Loader.add_implicit_resolver(
            "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
            list("-+0123456789"))
        _YAML_LOADER = Loader
    return _YAML_LOADER


_YAML_LOADER: Any = None


def _decode_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """The YAML document's data (as JSON would give it: string keys, no duplicates) and the line of every field."""
    import yaml  # noqa: PLC0415 - lazy: only YAML configs need it

    loader = _yaml_loader_class()(text)
    lines: dict[str, int] = {}
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(source, None, "has no YAML document (only comments?), expected a YAML mapping")
        data = _from_node(loader, node, "", lines, source, set(), {})
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = " ".join((exc.problem or exc.context or "syntax error").split())
        if exc.problem and exc.context:  # "expected a single document in the stream" + "but found another document"
            context = " ".join(exc.context.split())
            problem = f"{context}, {problem}" if problem.startswith("but ") else f"{problem} ({context})"
        if mark is not None and _char_at(text, mark.line, mark.column) == "\t":
            problem = "a tab where YAML does not allow one: indent with spaces"
        raise ConfigError(where, None, f"not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, None, f"not valid YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()
    return data, lines


def _char_at(text: str, line: int, column: int) -> str:
    lines = text.splitlines()
    return lines[line][column] if line < len(lines) and column < len(lines[line]) else ""


def _from_node(loader: Any, node: Any, path: str, lines: dict[str, int], source: str, open_nodes: set[int],
               built: dict[int, Any]) -> Any:
    """`node` as plain data, recording each field's line under its path; an aliased node is built once (shared, as
    PyYAML does), so a document of nested aliases costs its size, not its expansion."""
    import yaml  # noqa: PLC0415 - lazy: only YAML configs need it

    if isinstance(node, yaml.ScalarNode):
        return loader.construct_object(node, deep=True)
    if id(node) in open_nodes:  # an alias to a node that contains it
        raise ConfigError(f"{source}:{node.start_mark.line + 1}", path or None, "refers to itself (recursive alias)")
    if id(node) in built:
        return built[id(node)]
    open_nodes.add(id(node))
    try:
        built[id(node)] = value = _collection(loader, node, path, lines, source, open_nodes, built)
        return value
    finally:
        open_nodes.discard(id(node))


def _collection(loader: Any, node: Any, path: str, lines: dict[str, int], source: str, open_nodes: set[int],
                built: dict[int, Any]) -> Any:
    import yaml  # noqa: PLC0415 - lazy: only YAML configs need it

    if isinstance(node, yaml.SequenceNode):
        items = []
        for k, child in enumerate(node.value):
            lines.setdefault(f"{path}[{k}]", child.start_mark.line + 1)
            items.append(_from_node(loader, child, f"{path}[{k}]", lines, source, open_nodes, built))
        return items
    own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)  # YAML merge keys (<<: *defaults) first, then the mapping's own keys override them
    merged = len(node.value) - own
    mapping: dict[str, Any] = {}
    written: set[str] = set()  # keys the mapping itself gives (two of them is a duplicate, unlike an override)
    for k, (key_node, value_node) in enumerate(node.value):
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{source}:{line}", path or None, "a key must be a plain name, not a list or mapping")
        raw = loader.construct_object(key_node, deep=True)
        key = raw if isinstance(raw, str) else str(key_node.value)  # JSON's keys are strings: 4090 -> "4090"
        if k >= merged:
            if key in written:
                raise ConfigError(f"{source}:{line}", path or None, f"duplicate key {key!r} in one YAML mapping")
            written.add(key)
        child_path = f"{path}.{key}" if path else key
        lines[child_path] = line
        mapping[key] = _from_node(loader, value_node, child_path, lines, source, open_nodes, built)
    return mapping


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
    # default=str: a YAML config can hold values JSON cannot (a date, a set), and they still need describing
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


class _Parser:
    def __init__(self, source: str, price: Pricer | None = None, lines: Mapping[str, int] | None = None,
                 kind: str = "JSON object"):
        self.source = source
        self.price = price
        self.lines = lines or {}
        self.kind = kind
        self.clouds: tuple[str, ...] | None = None
        self.warnings: list[str] = []

    def where(self, field_path: str | None) -> str:
        """The source, with the field's line when known ("config.yaml:7"); a field the file lacks (a missing key)
        gets the line of the nearest enclosing field it has."""
        path = field_path or ""
        while path:
            if path in self.lines:
                return f"{self.source}:{self.lines[path]}"
            cut = max(path.rfind("."), path.rfind("["))
            if cut <= 0:
                break
            path = path[:cut]
        return self.source

    def fail(self, field_path: str | None, message: str, at: str | None = None) -> ConfigError:
        """The error for `field_path`; `at` names another field whose line to give (a misspelling of it)."""
        return ConfigError(self.where(at or field_path), field_path, message)

    def warn(self, field_path: str | None, message: str) -> None:
        source = self.where(field_path)
        where = f"{source}: {field_path}: " if field_path else f"{source}: "
        self.warnings.append(where + message)

    def require(self, obj: dict[str, Any], key: str, prefix: str, known: tuple[str, ...]) -> None:
        """ConfigError if `key` is missing from `obj`, naming the unknown key that looks like a misspelling of it."""
        if key in obj:
            return
        path = f"{prefix}.{key}" if prefix else key
        unknown = [str(k) for k in obj if k not in known and not is_note(k)]
        close = difflib.get_close_matches(key, unknown, n=1, cutoff=0.6)
        if close:
            typo = f"{prefix}.{close[0]}" if prefix else close[0]
            raise self.fail(path, f"missing (required); the config has {close[0]!r}: did you mean {key!r}?", at=typo)
        raise self.fail(path, "missing (required)")

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
        """`unknown_key` for a key of `obj` that is neither known nor a note, at the line of that key."""
        try:
            check_keys(obj, known, self.source, prefix)
        except ConfigError as exc:
            raise self.fail(exc.field, exc.message) from None

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
            raise self.fail(None, f"must be a {self.kind} with {', '.join(REQUIRED_TOP_LEVEL)}, "
                                  f"got {_type_name(data)}")
        for key in REQUIRED_TOP_LEVEL:  # first: a misspelt required key is named as the key it should be
            self.require(data, key, "", TOP_LEVEL_KEYS)
        self.check_keys(data, TOP_LEVEL_KEYS, "")

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
        spot = self.spot(data["spot"]) if "spot" in data else None
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
        tp = tensor_parallel_size(deployment)
        for gpu in gpus:
            problem = check_instance_gpus(self.source, gpu.field_path, gpu.name, gpu.accelerators,
                                          gpu.instance_type, tp)
            if problem is not None:
                raise self.fail(problem.field, problem.message)

        config = Config(source=self.source, name=name, workload_distribution=dist, total_request_rate=rate,
                        gpus=gpus, slice_factor=slice_factor, headroom=headroom, input_buckets=input_edges,
                        output_buckets=output_edges, deployment=deployment, clouds=clouds, spot=spot,
                        warnings=tuple(self.warnings))
        self.check_servable(config)
        return config

    def gpu_info(self, value: Any, shape: tuple[int, int]) -> tuple[GpuSpec, ...]:
        # The original format allows a dict keyed by name or a list of {"name", "cost", "tputs"}.
        if isinstance(value, dict):
            entries = [(f"gpu_info.{name}", name, entry) for name, entry in value.items() if not is_note(name)]
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

    def gpu(self, path: str, name: str, entry: Any, shape: tuple[int, int] | None) -> GpuSpec:
        if not isinstance(entry, dict):
            raise self.fail(path, f"must be an object with cost and tputs, got {_type_name(entry)}")
        self.require(entry, "tputs", path, GPU_KEYS)
        self.check_keys(entry, GPU_KEYS, path)
        owned = str(entry.get("cloud", "")).lower() in OWNED_CLOUDS
        if owned:  # the user's own GPUs: no catalog price, a cost of their own (0 allowed) and a cap
            self.require(entry, "cost", path, GPU_KEYS)
            if "max_count" not in entry and "quotas" not in entry:
                raise self.fail(f"{path}.max_count", f"missing: GPUs on {entry['cloud']} are your own, so give "
                                                     f"their number (max_count or quotas)")
            if entry.get("use_spot"):
                raise self.fail(f"{path}.use_spot", f"must be false on {entry['cloud']} (your own GPUs)")
        cost = (self.non_negative(entry["cost"], f"{path}.cost", " ($/h per GPU: 0, or what owning it costs)")
                if owned else self.positive(entry["cost"], f"{path}.cost") if "cost" in entry else None)
        if cost is not None and cost > MAX_GPU_COST:
            raise self.fail(f"{path}.cost", f"must be at most {MAX_GPU_COST:g} $/h per GPU, got {_describe(cost)}")
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
        market = (Market.OWNED if owned else None if "use_spot" not in entry
                  else Market.SPOT if use_spot else Market.ON_DEMAND)
        if owned:
            pins["cloud"] = pins["cloud"].lower()
        spec = GpuSpec(name=name, cost=cost if cost is not None else 0.0, tputs=tputs, min_count=min_count,
                       max_count=max_count, use_spot=use_spot, quotas=quotas, market=market, path=path, **pins)
        return spec if cost is not None else self.catalog_cost(spec)

    def spot(self, value: Any) -> SpotPolicy:
        """{"floor": share of every bucket the reliable replicas alone must carry, "max_region_share": most of the
        spot GPUs one region may hold}."""
        if not isinstance(value, dict):
            raise self.fail("spot", f'must be an object like {{"floor": 0.5, "max_region_share": 0.5}}, '
                                    f"got {_describe(value)}")
        self.check_keys(value, SPOT_KEYS, "spot")
        floor = self.number(value.get("floor", 0.0), "spot.floor")
        if not 0 <= floor <= 1:
            raise self.fail("spot.floor", f"must be in [0, 1] (the share of every bucket on-demand and owned "
                                          f"replicas alone must carry), got {_describe(value['floor'])}")
        share = self.number(value.get("max_region_share", 1.0), "spot.max_region_share")
        if not 0 < share <= 1:
            raise self.fail("spot.max_region_share", f"must be in (0, 1] (the most of the spot GPUs one region may "
                                                     f"hold), got {_describe(value['max_region_share'])}")
        return SpotPolicy(floor=floor, max_region_share=share)

    def quotas(self, value: Any, path: str) -> tuple[tuple[str, int], ...]:
        """{"cloud[:region[:instance_type]]": max instances of each matching offer}."""
        if not isinstance(value, dict) or not value:
            raise self.fail(path, f'must be an object like {{"aws": 2, "azure:eastus": 1}}, got {_describe(value)}')
        result = []
        for pattern, cap in value.items():
            if is_note(pattern):
                continue
            parts = pattern.split(":")
            if not 1 <= len(parts) <= 3 or not all(p.strip() for p in parts):
                raise self.fail(f"{path}.{pattern}", "must be cloud, cloud:region or cloud:region:instance_type")
            result.append((":".join([parts[0].strip().lower(), *(p.strip() for p in parts[1:])]),
                           self.integer(cap, f"{path}.{pattern}", 0)))
        return tuple(result)

    def catalog_cost(self, spec: GpuSpec) -> GpuSpec:
        """`spec` priced per GPU by the pricer; ConfigError naming `cost` if there is no price for it."""
        if self.price is None:
            raise self.fail(f"{spec.field_path}.cost", "missing: add a cost in $/h per GPU (or load the config with "
                                                      "price=melange_sky.deploy.offers.catalog_pricer() for the "
                                                      "catalog's)")
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
