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

from melange_sky.core.config import Pricer, pinned_gpus, tensor_parallel_size
from melange_sky.core.config_doc import (MergeResult, check_merged, edges_for_config, gpu_entries, gpu_entry,
                                         new_gpu_entry, per_gpu_tputs)
from melange_sky.core.gpus import same_gpu
from melange_sky.core.slo import DEFAULT_TPOT_SLO_MS, ProfileSize, Slo, Slos
from melange_sky.errors import ProfileError, ProfileFailed

#: A bucket's cell in the config's matrices: (input bucket index, output bucket index), 0-based.
Cell = tuple[int, int]


class Estimate(StrEnum):
    """Which rate becomes a bucket's tput (`--estimate`)."""

    FIT = "fit"  # where a line through the mean TPOT of the bracketing steps meets the SLO
    PASS = "pass"  # the highest rate that passed


class BucketStatus(StrEnum):
    """How a bucket's profile ended."""

    OK = "ok"
    CAPPED = "capped"  # passed at max_rate: the real maximum is higher
    CUT_SHORT = "cut_short"  # hit --max-minutes: tput is the best it had (0 when nothing had passed yet)
    SLO_NOT_MET = "slo_not_met"  # a measured 0: not met even at the lowest rate
    FAILED = "failed"  # no measurement: errors, timeouts, or the server rejects the requests
    NOT_MEASURED = "not_measured"  # not among the buckets asked for

    @property
    def has_tput(self) -> bool:
        """Whether the bucket's tput is a measured rate (ok, capped, or cut short with the best it had)."""
        return self in (BucketStatus.OK, BucketStatus.CAPPED, BucketStatus.CUT_SHORT)


class EventKind(StrEnum):
    """What a progress event reports."""

    ESTIMATE = "estimate"  # how long the whole profile should take, before measuring
    BUCKET_START = "bucket_start"
    STEP = "step"  # one rate tried
    BUCKET_DONE = "bucket_done"


@dataclass(frozen=True)
class ProfileSettings:
    """What to hold and how hard and long to measure. Defaults suit a real GPU server; tests shrink them.

    Every SLO given must hold; `tpot_slo_ms` alone (120 ms) is the default when none is given.
    """

    tpot_slo_ms: float | None = DEFAULT_TPOT_SLO_MS  # mean time per output token, ms
    ttft_slo_ms: float | None = None  # time to first token at ttft_percentile, ms
    ttft_percentile: float = 90.0
    latency_slo_ms: float | None = None  # whole request at latency_percentile, ms
    latency_percentile: float = 90.0
    requests_per_step: int = 20  # at least this many measured requests per step
    start_rate: float = 1.0  # req/s of the first step
    max_rate: float = 512.0  # stop growing here and report the bucket as capped
    min_rate: float = 0.05  # stop shrinking here and report the SLO as not met
    growth: float = 2.0
    bisect_steps: int = 4  # each halves the interval between the last passing and the first failing rate
    precision: float = 0.03  # a step may end once its SLO estimate pins the rate within this share (see profile.py)
    max_step_seconds: float | None = None  # a step's time cap; None: 30 s or 15 request durations, the larger
    max_minutes: float | None = None  # a bucket's time cap; past it the bucket is cut short
    request_timeout: float = 120.0  # seconds for a whole streamed request
    connect_timeout: float = 5.0
    size: ProfileSize = ProfileSize.MID  # representative length of a bucket
    estimate: Estimate = Estimate.FIT  # which rate is the bucket's tput
    ignore_eos: bool = True
    api_key: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (any(v is not None for v in (self.tpot_slo_ms, self.ttft_slo_ms, self.latency_slo_ms)),
             "give at least one SLO: --tpot-slo-ms, --ttft-slo-ms or --latency-slo-ms"),
            (all(v is None or v > 0 for v in (self.tpot_slo_ms, self.ttft_slo_ms, self.latency_slo_ms)),
             "SLOs must be positive"),
            (0 < self.ttft_percentile < 100 and 0 < self.latency_percentile < 100, "percentiles must be in (0, 100)"),
            (self.requests_per_step >= 1, "--requests-per-step must be at least 1"),
            (0 < self.min_rate <= self.start_rate <= self.max_rate,
             "rates must satisfy 0 < min rate <= --start-rate <= --max-rate"),
            (self.growth > 1, "growth must be above 1"),
            (self.bisect_steps >= 0, "bisect steps must be >= 0"),
            (0 < self.precision < 1, "precision must be in (0, 1)"),
            (self.max_step_seconds is None or self.max_step_seconds > 0, "the step time cap must be positive"),
            (self.max_minutes is None or self.max_minutes > 0, "--max-minutes must be positive"),
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

    @property
    def slo_spec(self) -> Slos:
        """The SLOs as every stage that measures or predicts a rate reads them (`core.slo`)."""
        return Slos(tpot_ms=self.tpot_slo_ms, ttft_ms=self.ttft_slo_ms, ttft_percentile=self.ttft_percentile,
                    latency_ms=self.latency_slo_ms, latency_percentile=self.latency_percentile)

    @property
    def slos(self) -> dict[Slo, float]:
        """The SLOs given, in ms."""
        return self.slo_spec.limits

    def slo_text(self) -> str:
        """The SLOs in words: "mean TPOT <= 120 ms, p90 TTFT <= 500 ms"."""
        return self.slo_spec.text()


def slo_label(slo: Slo, settings: ProfileSettings) -> str:
    """How an SLO's statistic is named in messages: "mean TPOT", "p90 TTFT", "p90 latency"."""
    return settings.slo_spec.label(slo)


@dataclass(frozen=True)
class SloCheck:
    """One SLO's statistic in one step: its estimate, the half-width of its ~95% interval, and the verdict."""

    slo: Slo
    value_ms: float  # mean TPOT, or the TTFT / latency percentile
    half_width_ms: float  # of the statistic's confidence interval (batch means over the step)
    limit_ms: float
    decided: bool  # the interval lies on one side of the limit, or is narrower than the precision asked for

    @property
    def passed(self) -> bool:
        """Whether the estimate is within the SLO."""
        return self.value_ms <= self.limit_ms


@dataclass(frozen=True)
class StepResult:
    """One rate tried on one bucket: the measured requests' statistics and whether every SLO held.

    Only requests started once the load had settled count (see `melange_sky.inputs.profile`); `cut_short` marks a
    step that hit its time cap before its estimate could decide pass or fail (it is judged on what it had).
    """

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
    warmup: int = 0  # requests sent in the step before the measured ones (fillers and before the load settled)
    client_errors: int = 0  # measured requests answered with an HTTP 4xx (but 408, 429): the request is wrong
    failed_on_errors: bool = False  # failed only because more than ERROR_TOLERANCE (profile.py) of the requests errored
    mean_output_tokens: float | None = None  # generated per successful request (usage.completion_tokens)
    checks: tuple[SloCheck, ...] = ()  # per SLO: estimate, interval, verdict
    limit: Slo | None = None  # the SLO that failed (a failing step) or came nearest its limit (a passing one)
    cut_short: bool = False  # hit the step's time cap undecided
    overloaded: bool = False  # requests in flight kept growing past what the SLO allows: no steady state
    settle_seconds: float = 0.0  # from the step's start until measuring began
    in_flight: float | None = None  # mean requests in flight while measuring
    mean_latency_ms: float | None = None


@dataclass(frozen=True)
class BucketProfile:
    """The outcome for one bucket. `tput` is the highest rate at which every SLO holds (0 unless it has a tput)."""

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
    limit: Slo | None = None  # the SLO that set tput
    headroom: float | None = None  # suggested utilisation: tput's lower confidence bound / tput (see `profile`)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", BucketStatus(self.status))  # "ok" given as a plain string is OK too
        if self.limit is not None:
            object.__setattr__(self, "limit", Slo(self.limit))


@dataclass(frozen=True)
class ProfileResult:
    """The profile of one GPU type: a `tputs` matrix over the buckets, and per bucket how it was measured."""

    endpoint: str
    model: str
    tpot_slo_ms: float | None
    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    buckets: tuple[BucketProfile, ...]
    settings: ProfileSettings
    seconds: float
    #: What it was measured on, for `estimate --calibrate` to check the record against its --gpu and --model: the GPU
    #: type (None: not known, `profile --endpoint` without --gpu), whether the server was the local launcher's
    #: emulator (None: not known) and, if so, how many times faster than real it ran (`deployment.local.speed`).
    gpu: str | None = None
    emulated: bool | None = None
    speed: float | None = None

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
        """Cells with no measurement (errors, timeouts, cut short before any rate passed): a merge keeps the
        config's previous values there too."""
        return [b.cell for b in self.buckets if b.status == BucketStatus.FAILED
                or (b.status == BucketStatus.CUT_SHORT and b.tput <= 0)]

    @property
    def headroom(self) -> float | None:
        """The utilisation to plan with (config `headroom`): the lowest of the measured buckets' suggestions."""
        found = [b.headroom for b in self.buckets if b.headroom is not None and b.status.has_tput and b.tput > 0]
        return min(found) if found else None

    @property
    def warnings(self) -> list[str]:
        """Every bucket's warnings, for the CLI to show once."""
        return [w for b in self.buckets for w in b.warnings]

    def check_usable(self, into: str | None = None) -> None:
        """`ProfileFailed` unless at least one bucket is ok or capped: a profile of only zeros is not a profile."""
        measured = [b for b in self.buckets if b.status != BucketStatus.NOT_MEASURED]
        if any(b.status.has_tput and b.tput > 0 for b in measured):
            return
        failed = [b for b in measured if b.status == BucketStatus.FAILED]
        if len(failed) == len(measured):
            what = f"no bucket was measured: all {len(failed)} failed (first: {failed[0].message})"
        else:
            what = (f"no bucket met the SLO: {len(measured) - len(failed)} not met even at the lowest rate, "
                    f"{len(failed)} failed")
        raise ProfileFailed(f"{what}" + (f"; {into} not changed" if into else ""))

    def to_dict(self) -> dict[str, Any]:
        """The full profile as JSON-ready data (`profile --json` / `-o`), without the API key. `model` is the name
        the server serves (it listed it); `gpu`, `emulated` and `speed` only where known."""
        settings = asdict(self.settings)
        settings.pop("api_key", None)  # never written to a file
        known = {key: value for key, value in (("gpu", self.gpu), ("emulated", self.emulated), ("speed", self.speed))
                 if value is not None}
        return {"endpoint": self.endpoint, "model": self.model, **known, "tpot_slo_ms": self.tpot_slo_ms,
                "slos": {str(slo): value for slo, value in self.settings.slos.items()},
                "input_buckets": list(self.input_edges), "output_buckets": list(self.output_edges),
                "tputs": self.tputs, "headroom": self.headroom, "seconds": round(self.seconds, 2),
                "settings": settings,
                "buckets": [_bucket_dict(b) for b in self.buckets]}


def _bucket_dict(b: BucketProfile) -> dict[str, Any]:
    d = asdict(b)
    d["cell"] = list(b.cell)
    d["input_range"], d["output_range"] = list(b.input_range), list(b.output_range)
    return d


@dataclass(frozen=True)
class ProfileEvent:
    """Progress for a live display: the expected duration, a bucket starts, a step ends, or a bucket ends."""

    kind: EventKind
    cell: Cell = (0, 0)
    index: int = 0  # 1-based position among the buckets being measured
    total: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    step: StepResult | None = None
    bucket: BucketProfile | None = None
    seconds: float | None = None  # ESTIMATE: the whole profile's expected duration
    max_seconds: float | None = None  # ESTIMATE: its bound from --max-minutes, if given


ProgressCallback = Callable[[ProfileEvent], None]


# ---- merging into a config -----------------------------------------------------------------------------------------
def config_edges(config: dict[str, Any], input_edges: Sequence[int] | None, output_edges: Sequence[int] | None,
                 source: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The bucket edges to measure for CONFIG (`profile`, `estimate`: both take --input-buckets/--output-buckets),
    checked against its workload shape before any measuring. A config without edges (Mélange's original 2x2 example)
    gets Mélange's default 8x6 edges only if its matrices are 8x6: no other grid implies token ranges."""
    dist = config.get("workload_distribution")
    shape = (len(dist), len(dist[0])) if isinstance(dist, list) and dist and isinstance(dist[0], list) else None
    in_edges, out_edges = edges_for_config(config, input_edges, output_edges, source)
    if shape is not None and shape != (len(in_edges) - 1, len(out_edges) - 1):
        origin = ("the --input-buckets/--output-buckets given make" if input_edges or output_edges else
                  "its input_buckets/output_buckets make" if "input_buckets" in config or "output_buckets" in config
                  else "it gives no bucket edges, and Mélange's defaults (only for its 8x6 grid) make")
        raise ProfileError(
            f"{source}: workload_distribution is {shape[0]}x{shape[1]} but {origin} "
            f"{len(in_edges) - 1}x{len(out_edges) - 1} buckets; pass --input-buckets and --output-buckets with "
            f"{shape[0] + 1} and {shape[1] + 1} edges, the token ranges the config's matrices are for (or add "
            f"input_buckets/output_buckets to the config)")
    return in_edges, out_edges


@dataclass(frozen=True)
class ServerGpus:
    """The GPUs a profiled server runs on, and where that number comes from (said in `profile`'s output). A config's
    tputs are per GPU (an instance of k GPUs serves k times them: `deploy/offers.py`), while a server answers for all
    of its GPUs: its rates are divided by `count` before they go into a config."""

    count: int
    source: str  # e.g. "--server-gpus", "gpu_info.A10G.accelerators 'A10G:4'", "deployment.tensor_parallel_size"

    def text(self) -> str:
        return f"{self.count} GPU(s), from {self.source}"


def server_gpus(config: dict[str, Any] | None, gpu: str | None, given: int | None = None,
                source: str = "<config>") -> ServerGpus:
    """The GPUs of the server `profile --endpoint` measured, for a config's per-GPU tputs: `given` (--server-gpus),
    else the GPUs per instance of `gpu`'s entry's `accelerators` pin (an instance of k GPUs runs k / TP data-parallel
    engines behind one server: templates/vllm.j2), else the deployment's tensor_parallel_size (one replica), else 1.
    ProfileError when `given` is not a multiple of the deployment's tensor parallelism (no server of the config has
    that many GPUs)."""
    tp = tensor_parallel_size((config or {}).get("deployment"))
    if given is not None:
        if tp is not None and given % tp:
            raise ProfileError(f"--server-gpus {given} is not a multiple of {source}'s deployment.tensor_parallel_size "
                               f"({tp}): a server of that config runs on a multiple of {tp} GPUs")
        return ServerGpus(given, "--server-gpus")
    if config is not None and gpu is not None:
        for path, name, entry in gpu_entries(config.get("gpu_info")):
            if same_gpu(name, gpu) and (count := pinned_gpus(entry.get("accelerators"))) is not None:
                return ServerGpus(count, f"{source}: {path}.accelerators {entry['accelerators']!r}")
    if tp is not None:
        return ServerGpus(tp, f"{source}: deployment.tensor_parallel_size")
    return ServerGpus(1, "the default: one GPU")


def merge_profile(config: dict[str, Any], result: ProfileResult, gpu: str, cost: float | None = None,
                  source: str = "<config>", price: Pricer | None = None, gpus: int = 1) -> MergeResult:
    """`config` with `gpu`'s tputs set from `result` (gpu_info as a dict or a list); a new GPU entry if needed.

    `gpu` matches an entry case-insensitively and through the GPU aliases of `core.gpus` ("a10g" is "A10G"). Buckets not
    measured, and buckets that failed (errors, timeouts: no measurement), keep the GPU's previous value when it had
    a tputs matrix of the same shape, else 0; a bucket whose SLO was not met is a measured 0. `price` prices a GPU
    added without `cost` (see `core.config.Pricer`); without one the merge warns that the GPU needs a cost.
    A config's tputs are per GPU: the measured rates of a server of `gpus` GPUs (`server_gpus`) are divided by
    `gpus` (a kept previous value is per GPU already); a new entry under tensor parallelism gets the pin
    `accelerators: "GPU:tp"` (`core.config_doc.new_gpu_entry`), as `estimate --into` adds it.
    """
    data = copy.deepcopy(config)
    warnings: list[str] = []
    tputs = per_gpu_tputs(result.tputs, gpus)
    rows, cols = len(tputs), len(tputs[0])
    entry, added = gpu_entry(data, gpu, source)
    if added:
        entry.update(new_gpu_entry(gpu, tensor_parallel_size(data.get("deployment"))))
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
    "ProfileSettings", "ProfileSize", "ProgressCallback", "ServerGpus", "Slo", "SloCheck", "StepResult",
    "config_edges", "merge_profile", "server_gpus", "slo_label",
]
