"""What a profile produces and how it goes into a config: the settings it ran with, per step and per bucket what
was measured, the GPU's `tputs` matrix, progress events, and `merge_profile` (`profile --into CONFIG`).

Plain records (no I/O, no asyncio): the rate search in `melange_sky.inputs.profile` fills them, the CLI prints and
writes them, and code that only reads or merges a profile does not pull in the HTTP client.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from melange_sky.core.config import Pricer
from melange_sky.core.config_doc import MergeResult, check_merged, edges_for_config, gpu_entry
from melange_sky.errors import ProfileError, ProfileFailed

#: A bucket's cell in the config's matrices: (input bucket index, output bucket index), 0-based.
Cell = tuple[int, int]


class ProfileSize(StrEnum):
    """The length a bucket is profiled at (`--size`)."""

    MID = "mid"  # its midpoint
    UPPER = "upper"  # its largest length: conservative


class Estimate(StrEnum):
    """Which rate becomes a bucket's tput (`--estimate`)."""

    FIT = "fit"  # where a line through the mean TPOT of the bracketing steps meets the SLO
    PASS = "pass"  # the highest rate that passed


class BucketStatus(StrEnum):
    """How a bucket's profile ended."""

    OK = "ok"
    CAPPED = "capped"  # passed at max_rate: the real maximum is higher
    SLO_NOT_MET = "slo_not_met"  # a measured 0: not met even at the lowest rate
    FAILED = "failed"  # no measurement: errors, timeouts, or the server rejects the requests
    NOT_MEASURED = "not_measured"  # not among the buckets asked for

    @property
    def has_tput(self) -> bool:
        """Whether the bucket's tput is a measured maximum rate (ok or capped)."""
        return self in (BucketStatus.OK, BucketStatus.CAPPED)


class EventKind(StrEnum):
    """What a progress event reports."""

    BUCKET_START = "bucket_start"
    STEP = "step"  # one rate tried
    BUCKET_DONE = "bucket_done"


@dataclass(frozen=True)
class ProfileSettings:
    """How hard and how long to measure. Defaults suit a real GPU server; tests shrink them."""

    tpot_slo_ms: float = 120.0
    requests_per_step: int = 50  # measured requests per step (plus warm-up and filler, each at most as many)
    start_rate: float = 1.0  # req/s of the first step
    max_rate: float = 512.0  # stop growing here and report the bucket as capped
    min_rate: float = 0.05  # stop shrinking here and report the SLO as not met
    growth: float = 2.0
    bisect_steps: int = 4  # each halves the interval between the last passing and the first failing rate
    request_timeout: float = 120.0  # seconds for a whole streamed request
    connect_timeout: float = 5.0
    size: ProfileSize = ProfileSize.MID  # representative length of a bucket
    estimate: Estimate = Estimate.FIT  # which rate is the bucket's tput
    ignore_eos: bool = True
    api_key: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.tpot_slo_ms > 0, "--tpot-slo-ms must be positive"),
            (self.requests_per_step >= 1, "--requests-per-step must be at least 1"),
            (0 < self.min_rate <= self.start_rate <= self.max_rate,
             "rates must satisfy 0 < min rate <= --start-rate <= --max-rate"),
            (self.growth > 1, "growth must be above 1"),
            (self.bisect_steps >= 0, "bisect steps must be >= 0"),
            (self.request_timeout > 0 and self.connect_timeout > 0, "timeouts must be positive"),
            (self.size in tuple(ProfileSize), "--size must be mid or upper"),
            (self.estimate in tuple(Estimate), "--estimate must be fit or pass"),
        ]
        for ok, message in checks:
            if not ok:
                raise ProfileError(message)
        # a caller may pass the plain strings ("upper"); keep the enum members
        object.__setattr__(self, "size", ProfileSize(self.size))
        object.__setattr__(self, "estimate", Estimate(self.estimate))


@dataclass(frozen=True)
class StepResult:
    """One rate tried on one bucket: the measured requests' statistics and whether the SLO held."""

    rate: float
    sent: int
    measured: int
    ok: int
    errors: int
    timeouts: int
    passed: bool
    reason: str
    mean_tpot_ms: float | None = None
    p50_tpot_ms: float | None = None
    p99_tpot_ms: float | None = None
    mean_ttft_ms: float | None = None
    p50_ttft_ms: float | None = None
    p99_ttft_ms: float | None = None
    p50_latency_ms: float | None = None
    p99_latency_ms: float | None = None
    server_prompt_tokens: float | None = None  # mean usage.prompt_tokens
    first_error: str | None = None
    seconds: float = 0.0
    warmup: int = 0  # requests sent before the first measured one
    client_errors: int = 0  # measured requests answered with an HTTP 4xx (but 408, 429): the request is wrong
    failed_on_errors: bool = False  # failed only because more than ERROR_TOLERANCE (profile.py) of the requests errored
    mean_output_tokens: float | None = None  # generated per successful request (usage.completion_tokens)


@dataclass(frozen=True)
class BucketProfile:
    """The outcome for one bucket. `tput` is the highest passing rate (0 unless status is ok or capped)."""

    cell: Cell
    input_range: tuple[int, int]
    output_range: tuple[int, int]
    prompt_tokens: int
    output_tokens: int
    status: BucketStatus
    tput: float
    message: str = ""
    best: StepResult | None = None  # the step at `tput`: its TTFT / TPOT / latency percentiles
    steps: tuple[StepResult, ...] = ()
    warnings: tuple[str, ...] = ()
    timeout: float | None = None  # seconds each request of this bucket may take (see `bucket_timeout`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", BucketStatus(self.status))  # "ok" given as a plain string is OK too


@dataclass(frozen=True)
class ProfileResult:
    """The profile of one GPU type: a `tputs` matrix over the buckets, and per bucket how it was measured."""

    endpoint: str
    model: str
    tpot_slo_ms: float
    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    buckets: tuple[BucketProfile, ...]
    settings: ProfileSettings
    seconds: float

    @property
    def tputs(self) -> list[list[float]]:
        """Requests/s per bucket; 0 where not measured, failed or the SLO was never met (see `buckets`)."""
        rows, cols = len(self.input_edges) - 1, len(self.output_edges) - 1
        matrix = [[0.0] * cols for _ in range(rows)]
        for b in self.buckets:
            matrix[b.cell[0]][b.cell[1]] = round(b.tput, 3)
        return matrix

    @property
    def not_measured(self) -> list[Cell]:
        """Cells left out (`--buckets`): a merge keeps the config's previous values there."""
        return [b.cell for b in self.buckets if b.status == BucketStatus.NOT_MEASURED]

    @property
    def failed(self) -> list[Cell]:
        """Cells with no measurement (errors, timeouts): a merge keeps the config's previous values there too."""
        return [b.cell for b in self.buckets if b.status == BucketStatus.FAILED]

    @property
    def warnings(self) -> list[str]:
        """Every bucket's warnings, for the CLI to show once."""
        return [w for b in self.buckets for w in b.warnings]

    def check_usable(self, into: str | None = None) -> None:
        """`ProfileFailed` unless at least one bucket is ok or capped: a profile of only zeros is not a profile."""
        measured = [b for b in self.buckets if b.status != BucketStatus.NOT_MEASURED]
        if any(b.status.has_tput for b in measured):
            return
        failed = [b for b in measured if b.status == BucketStatus.FAILED]
        if len(failed) == len(measured):
            what = f"no bucket was measured: all {len(failed)} failed (first: {failed[0].message})"
        else:
            what = (f"no bucket met the SLO: {len(measured) - len(failed)} not met even at the lowest rate, "
                    f"{len(failed)} failed")
        raise ProfileFailed(f"{what}" + (f"; {into} not changed" if into else ""))

    def to_dict(self) -> dict[str, Any]:
        """The full profile as JSON-ready data (`profile --json` / `-o`), without the API key."""
        settings = asdict(self.settings)
        settings.pop("api_key", None)  # never written to a file
        return {"endpoint": self.endpoint, "model": self.model, "tpot_slo_ms": self.tpot_slo_ms,
                "input_buckets": list(self.input_edges), "output_buckets": list(self.output_edges),
                "tputs": self.tputs, "seconds": round(self.seconds, 2), "settings": settings,
                "buckets": [_bucket_dict(b) for b in self.buckets]}


def _bucket_dict(b: BucketProfile) -> dict[str, Any]:
    d = asdict(b)
    d["cell"] = list(b.cell)
    d["input_range"], d["output_range"] = list(b.input_range), list(b.output_range)
    return d


@dataclass(frozen=True)
class ProfileEvent:
    """Progress for a live display: a bucket starts, a step ends, or a bucket ends."""

    kind: EventKind
    cell: Cell
    index: int  # 1-based position among the buckets being measured
    total: int
    prompt_tokens: int
    output_tokens: int
    step: StepResult | None = None
    bucket: BucketProfile | None = None


ProgressCallback = Callable[[ProfileEvent], None]


# ---- merging into a config -----------------------------------------------------------------------------------------
def config_edges(config: dict[str, Any], input_edges: Sequence[int] | None, output_edges: Sequence[int] | None,
                 source: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The bucket edges to profile for `--into CONFIG`, checked against its workload shape before any measuring."""
    dist = config.get("workload_distribution")
    shape = (len(dist), len(dist[0])) if isinstance(dist, list) and dist and isinstance(dist[0], list) else None
    in_edges, out_edges = edges_for_config(config, input_edges, output_edges, source)
    if shape is not None and shape != (len(in_edges) - 1, len(out_edges) - 1):
        raise ProfileError(
            f"{source}: workload_distribution is {shape[0]}x{shape[1]} but the buckets to profile are "
            f"{len(in_edges) - 1}x{len(out_edges) - 1}; pass --input-buckets and --output-buckets with "
            f"{shape[0] + 1} and {shape[1] + 1} edges (or add input_buckets/output_buckets to the config)")
    return in_edges, out_edges


def merge_profile(config: dict[str, Any], result: ProfileResult, gpu: str, cost: float | None = None,
                  source: str = "<config>", price: Pricer | None = None) -> MergeResult:
    """`config` with `gpu`'s tputs set from `result` (gpu_info as a dict or a list); a new GPU entry if needed.

    `gpu` matches an entry case-insensitively and through the GPU aliases of `core.gpus` ("a10g" is "A10G"). Buckets not
    measured, and buckets that failed (errors, timeouts: no measurement), keep the GPU's previous value when it had
    a tputs matrix of the same shape, else 0; a bucket whose SLO was not met is a measured 0. `price` prices a GPU
    added without `cost` (see `core.config.Pricer`); without one the merge warns that the GPU needs a cost.
    """
    data = copy.deepcopy(config)
    warnings: list[str] = []
    tputs = result.tputs
    rows, cols = len(tputs), len(tputs[0])
    entry, added = gpu_entry(data, gpu, source)
    if cost is not None:
        entry["cost"] = cost
    old = entry.get("tputs")
    previous = (old if isinstance(old, list) and len(old) == rows
                and all(isinstance(r, list) and len(r) == cols for r in old) else None)
    for cells, why in ((result.not_measured, "were not measured"), (result.failed, "failed")):
        if not cells:
            continue
        for i, j in cells:
            if previous is not None:
                tputs[i][j] = previous[i][j]
        what = "kept their previous values" if previous is not None else "are 0"
        warnings.append(f"{len(cells)} bucket(s) {why} and {what}: {', '.join(f'{i}:{j}' for i, j in cells)}")
    entry["tputs"] = tputs
    data.setdefault("input_buckets", list(result.input_edges))
    data.setdefault("output_buckets", list(result.output_edges))
    parsed, found = check_merged(data, source, price)
    warnings.extend(found)
    valid = parsed is not None
    if added and cost is None:
        spec = next((g for g in parsed.gpus if g.name == gpu), None) if parsed is not None else None
        if spec is not None and spec.cost_source == "catalog":
            warnings.append(f"{source}: added GPU {gpu!r}, priced from the catalog at ${spec.cost:.4g}/h per GPU "
                            f"(pass --cost to set your own price)")
        else:
            warnings.append(f"{source}: added GPU {gpu!r} without a cost: set its $/h (or pass --cost) before "
                            f"solving")
    return MergeResult(data=data, warnings=tuple(warnings), valid=valid)


__all__ = [
    "BucketProfile", "BucketStatus", "Cell", "Estimate", "EventKind", "ProfileEvent", "ProfileResult",
    "ProfileSettings", "ProfileSize", "ProgressCallback", "StepResult", "config_edges", "merge_profile",
]
