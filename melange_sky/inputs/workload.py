"""A workload histogram, whichever source it came from (a trace, a router's counts), and its merge into a config.

`WorkloadResult` is the record `melange-sky workload` prints and writes: requests per (input bucket, output bucket),
the request rate and where it came from, and what was odd about the source (clamped lengths, skipped rows).
`merge_workload` puts it into a Mélange config, keeping everything else and refusing to break a working config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from melange_sky.core.config import Pricer
from melange_sky.core.config_doc import MergeResult, check_merged, config_shape, gpu_entries, matrix_shape
from melange_sky.errors import BucketEdgesError
from melange_sky.inputs.trace_rates import RatePercentiles


class RateSource(StrEnum):
    """Where a histogram's total_request_rate came from."""

    GIVEN = "given"  # --rate
    TIMESTAMPS = "timestamps"  # measured between the first and the last timestamp
    OBSERVED = "observed"  # arrivals a router counted over its window (`workload --from URL`)
    NONE = "none"  # neither: the config keeps its own rate, or the user must give one


@dataclass(frozen=True)
class WorkloadResult:
    """The histogram of one trace: counts per (input bucket, output bucket), the rate, and what was odd about it."""

    source: str
    format: str
    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]
    rows: int  # requests counted into the histogram
    skipped: int  # broken rows skipped (skip_bad)
    skipped_examples: tuple[str, ...]  # "line N: reason" for the first few skipped rows
    input_overflow: int  # input lengths above the last input edge, counted in the last bucket
    output_overflow: int
    input_underflow: int  # below the first edge, counted in the first bucket
    output_underflow: int
    timestamped_rows: int
    first_timestamp: float | None
    last_timestamp: float | None
    rate: float | None  # req/s: given, or measured from the timestamps; None if neither
    rate_source: RateSource
    warnings: tuple[str, ...] = field(default=())
    mean_rate: float | None = None  # req/s over the whole span (timestamps, or the router's window)
    rate_percentiles: RatePercentiles | None = None  # of the per-minute rate; None without a complete minute
    rate_percentile: float | None = None  # `rate` is this percentile of the per-minute rate (--rate-percentile)
    trace_format: str | None = None  # the public trace format recognised by its columns (KnownFormat.key)
    columns: str = ""  # how the token counts were read, for the report
    failed: int = 0  # failed requests the format marks (0 output tokens in BurstGPT), skipped and counted

    @property
    def shape(self) -> tuple[int, int]:
        """(input buckets, output buckets): the shape every GPU's tputs must have in the config."""
        return len(self.counts), len(self.counts[0])

    @property
    def distribution(self) -> list[list[float]]:
        """Shares per bucket, summing to 1 (the config's `workload_distribution`)."""
        return [[c / self.rows for c in row] for row in self.counts]

    @property
    def duration(self) -> float | None:
        """Seconds between the first and the last timestamp, the span the measured rate is over; None without."""
        if self.first_timestamp is None or self.last_timestamp is None:
            return None
        return self.last_timestamp - self.first_timestamp

    def config_fragment(self) -> dict[str, Any]:
        """The config keys this trace determines, ready to paste into (or merge with) a Mélange config."""
        fragment: dict[str, Any] = {"workload_distribution": [[_round_share(x) for x in row]
                                                              for row in self.distribution]}
        if self.rate is not None:
            fragment["total_request_rate"] = _round_rate(self.rate)
        fragment["input_buckets"] = list(self.input_edges)
        fragment["output_buckets"] = list(self.output_edges)
        return fragment

    def to_dict(self) -> dict[str, Any]:
        """The full record as JSON-ready data (`workload --json`)."""
        return {
            "source": self.source, "format": self.format, "rows": self.rows, "skipped": self.skipped,
            "skipped_examples": list(self.skipped_examples),
            "input_buckets": list(self.input_edges), "output_buckets": list(self.output_edges),
            "counts": [list(row) for row in self.counts],
            "workload_distribution": self.config_fragment()["workload_distribution"],
            "total_request_rate": self.rate, "rate_source": self.rate_source,
            "timestamped_rows": self.timestamped_rows, "first_timestamp": self.first_timestamp,
            "last_timestamp": self.last_timestamp, "duration_s": self.duration,
            "input_overflow": self.input_overflow, "output_overflow": self.output_overflow,
            "input_underflow": self.input_underflow, "output_underflow": self.output_underflow,
            "mean_request_rate": self.mean_rate, "rate_percentile": self.rate_percentile,
            "rate_percentiles": self.rate_percentiles.to_dict() if self.rate_percentiles is not None else None,
            "trace_format": self.trace_format, "failed": self.failed,
            "warnings": list(self.warnings),
        }

    @property
    def burst_ratio(self) -> float | None:
        """How far the busiest 5% of minutes exceed the mean (p95 / mean); None when either is unknown."""
        if self.rate_percentiles is None or not self.mean_rate:
            return None
        return self.rate_percentiles.p95 / self.mean_rate


def _round_share(x: float) -> float:
    return float(f"{x:.6g}")  # significant digits: a rare bucket keeps its (tiny) share instead of rounding to 0


def _round_rate(x: float) -> float:
    return float(f"{x:.6g}")


def merge_workload(config: dict[str, Any], result: WorkloadResult, source: str = "<config>",
                   in_place: bool = False, price: Pricer | None = None, target: str | None = None) -> MergeResult:
    """`config` with workload_distribution, total_request_rate and the bucket edges from `result`; the rest kept.

    A GPU whose tputs has the old shape makes the config invalid. Written elsewhere (`in_place` False, to `target`)
    that is a warning saying what to run on `target`, because the histogram is still what the user asked for;
    `in_place` (the merge would overwrite `source`) it raises `BucketEdgesError` instead, so a working config is
    never broken.
    `price` prices GPU entries without a cost while the merged config is checked (see `core.config.Pricer`).
    """
    data = dict(config)
    fragment = result.config_fragment()
    warnings: list[str] = []
    if "total_request_rate" not in fragment:
        if "total_request_rate" in data:
            warnings.append(f"kept total_request_rate {data['total_request_rate']} from {source}: the trace has no "
                            f"timestamps and no --rate was given")
    for key, value in fragment.items():
        data[key] = value
    rows, cols = result.shape
    mismatched = []
    written = source if in_place or target is None else target  # the file the re-profile must go into
    for path, name, entry in gpu_entries(data.get("gpu_info")):
        shape = matrix_shape(entry.get("tputs"))
        if shape is not None and shape != (rows, cols):
            mismatched.append(f"{name} {shape[0]}x{shape[1]}")
            warnings.append(
                f"{written}: {path}.tputs is {shape[0]}x{shape[1]} but the new workload_distribution is "
                f"{rows}x{cols}: the config is invalid until it is re-profiled for these buckets: melange-sky "
                f"profile --endpoint URL --model MODEL --into {written} --gpu {name}")
    valid = not mismatched
    problems: list[str] = []
    if valid:
        parsed, found = check_merged(data, source, price)
        warnings.extend(found)
        if parsed is None:
            valid, problems = False, found
    if in_place and not valid:
        old = config_shape(config)
        fit = (f"pass --input-buckets and --output-buckets with {old[0] + 1} and {old[1] + 1} edges (the config's "
               f"{old[0]}x{old[1]} buckets), " if old is not None
               else "pass --input-buckets/--output-buckets that fit it, ")
        if mismatched:
            problem = f"the trace's {rows}x{cols} buckets do not fit the tputs ({', '.join(mismatched)})"
        else:
            problem = problems[0] if problems else "invalid"
        raise BucketEdgesError(f"{source}: not changed, the merged config would be invalid: {problem}; {fit}or write "
                               f"the merged config elsewhere with -o FILE")
    return MergeResult(data=data, warnings=tuple(warnings), valid=valid)


__all__ = ["RateSource", "WorkloadResult", "merge_workload"]
