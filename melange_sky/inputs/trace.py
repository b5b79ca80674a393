"""Turn a request trace into Mélange's workload histogram: `melange-sky workload`.

A trace is JSONL (one object per line) or CSV (a header row) with the prompt and completion token counts of each
request, and optionally a timestamp (epoch seconds; a trace whose numbers are milliseconds or microseconds is
recognised by their size, with a warning; or ISO-8601). Gzip (.gz) and a UTF-8 BOM are fine. The reader streams
the file and keeps only bucket counts, so memory does not grow with the number of rows (10^7 rows are the benchmark
in `bench/workload_bench.py`).

Buckets follow `melange_sky.core.buckets`: [e_k, e_{k+1}), the last one closed, lengths outside the edges clamped
into the first or last bucket. Those clamped lengths are counted and reported as warnings, because a histogram that
hides them would make the solver plan for the wrong sizes.
"""
from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import IO, Any

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, Bucketer, check_edges
from melange_sky.core.config import Pricer
from melange_sky.core.config_doc import MergeResult, check_merged, config_shape, gpu_entries, matrix_shape
from melange_sky.errors import BucketEdgesError, TraceError
from melange_sky.inputs.trace_formats import (
    LENGTH_COLUMNS,
    SECONDS_PER_UNIT,
    USAGE_KEYS,
    ColumnChoice,
    TimeUnit,
    TraceColumns,
    expected_names,
    find_columns,
    usage_columns,
)
from melange_sky.inputs.trace_rates import MINUTE_S, MinuteBins, MinuteRates, RatePercentiles, observed_rates

try:  # orjson parses a JSONL row ~8x faster than json; it is installed with SkyPilot, json is the fallback
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _JSON_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError, UnicodeDecodeError)
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads
    _JSON_ERRORS = (json.JSONDecodeError, UnicodeDecodeError)

#: How many broken rows are quoted (line number and reason) when --skip-bad skips them.
_EXAMPLES_KEPT = 5
#: Numeric epoch timestamps above these are milliseconds / microseconds (1e11 s is the year 5138; 1e11 ms is 1973).
_EPOCH_MS_ABOVE, _EPOCH_US_ABOVE = 1e11, 1e14
#: What a corrupt or truncated gzip raises while it is read.
_GZIP_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError, gzip.BadGzipFile, zlib.error)
_BOM = b"\xef\xbb\xbf"


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


# ---- reading -------------------------------------------------------------------------------------------------------
class _BadRow(Exception):
    pass


def _tokens(value: Any, name: str) -> int:
    if type(value) is int:
        if value < 0:
            raise _BadRow(f"{name} is negative ({value})")
        return value
    if isinstance(value, float) and not isinstance(value, bool) and math.isfinite(value) and value.is_integer():
        return _tokens(int(value), name)
    if isinstance(value, str):
        try:
            return _tokens(int(value.strip()), name)
        except ValueError:
            pass
    if value is None or value == "":
        raise _BadRow(f"{name} is missing")
    raise _BadRow(f"{name} must be a whole number of tokens, got {value!r}")


def _iso_seconds(text: str, name: str) -> float:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _BadRow(f"{name} {text!r} is neither a number nor an ISO-8601 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class _Clock:
    """Timestamps to seconds: numbers in the trace's time unit, ISO-8601 strings (naive means UTC).

    With the unit `auto`, the first numeric timestamp decides it for the whole trace: epoch seconds, or epoch
    milliseconds / microseconds when the number is too large for seconds (1e11 s is the year 5138)."""

    def __init__(self, unit: TimeUnit):
        self.auto = unit is TimeUnit.AUTO
        self.scale: float | None = None if self.auto else SECONDS_PER_UNIT[unit]
        self.example: float | None = None  # the numeric timestamp that decided an auto unit
        self.iso = False  # the times seen are ISO-8601 strings: try that first
        self.minute_text = ""  # "2023-11-16 18:15", the minute of the last ISO time read ...
        self.minute_start = 0.0  # ... and its epoch seconds

    def _iso(self, text: str, name: str) -> float:
        """An ISO-8601 time in epoch seconds. Traces write times to the minute alike row after row, so the date and
        minute (`YYYY-MM-DD HH:MM`) are parsed once per minute, and only the seconds per row."""
        if len(text) > 17 and text[16] == ":" and text[13] == ":":
            if text[:16] != self.minute_text:
                try:
                    self.minute_start, self.minute_text = _iso_seconds(text[:16], name), text[:16]
                except _BadRow:
                    return _iso_seconds(text, name)
            try:
                second = float(text[17:])  # a zone ("Z", "+02:00") after the seconds is not a float: parsed whole
            except ValueError:
                return _iso_seconds(text, name)
            if 0 <= second < 61:
                return self.minute_start + second
        return _iso_seconds(text, name)

    def seconds(self, value: Any, name: str) -> float | None:
        kind = type(value)
        if kind is float or kind is int:
            raw = float(value)
        elif value is None or value == "":
            return None
        elif kind is str:
            text = value.strip()
            if self.iso:
                try:
                    return self._iso(text, name)
                except _BadRow:
                    pass  # a number among ISO times: read below
            try:
                raw = float(text)
            except ValueError:
                self.iso = True
                return self._iso(text, name)
        else:
            raise _BadRow(f"{name} must be a number or an ISO-8601 string, got {value!r}")
        if not math.isfinite(raw):
            raise _BadRow(f"{name} is not finite ({value!r})")
        scale = self.scale
        if scale is None:
            self.example = raw
            scale = self.scale = 1e-6 if raw > _EPOCH_US_ABOVE else 1e-3 if raw > _EPOCH_MS_ABOVE else 1.0
        return raw * scale

    def unit_warnings(self, first: float, last: float) -> tuple[list[str], bool]:
        """What to say about an auto unit (ms or µs read by size), and whether the units look mixed."""
        if not self.auto or self.scale is None:
            return [], False
        if self.scale == 1.0:
            return [], last > _EPOCH_MS_ABOVE
        unit = "microseconds" if self.scale < 1e-3 else "milliseconds"
        said = [f"the timestamps look like epoch {unit} (e.g. {self.example:.0f}), not seconds: read them as {unit}"]
        return said, first < _EPOCH_MS_ABOVE * 1e-3  # a seconds value among them reads as 1973 or before


def _lower(name: str | None) -> str | None:
    return name.strip().lower() if name and name.strip() else None


def _json_names(obj: dict[str, Any]) -> dict[str, str]:
    """An object's keys, and one level of nested keys as `a.b`, lower-cased -> as written."""
    names = {k.lower(): k for k in obj}
    for key, value in obj.items():
        if isinstance(value, dict):
            names.update((f"{key.lower()}.{sub.lower()}", f"{key}.{sub}") for sub in value)
    return names


def _lookup(obj: dict[str, Any], key: str) -> Any:
    """obj[key], or a dotted path into nested objects (`usage.prompt_tokens`); None when absent."""
    if key in obj:
        return obj[key]
    value: Any = obj
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _json_lengths(obj: Any) -> tuple[Any, Any, str, str]:
    """The raw input/output values of one JSONL object and the names they came from."""
    if not isinstance(obj, dict):
        raise _BadRow(f"expected a JSON object, got {type(obj).__name__}")
    for in_key, out_key in LENGTH_COLUMNS[:3]:
        if in_key in obj or out_key in obj:
            return obj.get(in_key), obj.get(out_key), in_key, out_key
    usage = obj.get("usage")
    if isinstance(usage, dict):
        for in_key, out_key in USAGE_KEYS:
            if in_key in usage or out_key in usage:
                return usage.get(in_key), usage.get(out_key), f"usage.{in_key}", f"usage.{out_key}"
    raise _BadRow("no token counts: expected input_len/output_len, prompt_tokens/completion_tokens or a "
                  "`usage` object")


def _open_binary(path: str) -> IO[bytes]:
    opener: Callable[..., IO[bytes]] = gzip.open if path.endswith(".gz") else open  # type: ignore[assignment]
    try:
        return opener(path, "rb")  # closed by the caller (a GzipFile opened by name closes its file too)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, expected a JSONL or CSV trace") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None


def _gzip_reason(exc: BaseException) -> str:
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return f"not a valid gzip file, or truncated ({exc})"
    return str(exc)


def detect_format(path: str) -> str:
    """"jsonl" or "csv": by extension (.jsonl/.ndjson/.json, .csv/.tsv, also .gz), else by the first character."""
    name = path[:-3] if path.endswith(".gz") else path
    suffix = os.path.splitext(name)[1].lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    with _open_binary(path) as handle:
        try:
            head = handle.read(4096)
        except _GZIP_ERRORS as exc:
            raise TraceError(f"{path}: cannot read: {_gzip_reason(exc)}") from None
    return "jsonl" if head.removeprefix(_BOM).lstrip()[:1] == b"{" else "csv"


def read_trace(path: str | os.PathLike[str], *, input_edges: Sequence[int] = DEFAULT_INPUT_EDGES,
               output_edges: Sequence[int] = DEFAULT_OUTPUT_EDGES, rate: float | None = None,
               skip_bad: bool = False, fmt: str | None = None, columns: ColumnChoice | None = None,
               rate_percentile: float | None = None) -> WorkloadResult:
    """Stream a trace into a histogram, with its mean and per-minute peak rates.

    `rate` (req/s) overrides the rate measured from timestamps; `rate_percentile` (0-100] makes the rate that
    percentile of the per-minute rate instead of the mean. `columns` names the token and time columns (else a
    recognised format's, or the generic names, are used). A broken row raises `TraceError` naming its line, unless
    `skip_bad`, which skips and counts it. Raises `TraceError` for an unreadable or empty trace.
    """
    source = os.fspath(path)
    in_edges = check_edges(list(input_edges), "input buckets")
    out_edges = check_edges(list(output_edges), "output buckets")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise TraceError(f"--rate must be a positive number of requests per second, got {rate!r}")
    if rate is not None and rate_percentile is not None:
        raise TraceError("give --rate or --rate-percentile, not both")
    fmt = fmt or detect_format(source)
    if fmt not in ("jsonl", "csv"):
        raise TraceError(f"{source}: unknown trace format {fmt!r}; use jsonl or csv")
    counter = _Counter(source, in_edges, out_edges, skip_bad, columns or ColumnChoice())
    with _open_binary(source) as handle:
        try:
            if fmt == "jsonl":
                counter.count(counter.jsonl_rows(handle))
            else:
                counter.count(counter.csv_rows(handle))
        except _GZIP_ERRORS as exc:
            raise TraceError(f"{source}: cannot read: {_gzip_reason(exc)}") from None
    return counter.result(fmt, rate, rate_percentile)


class _Counter:
    """The streaming state: bucket counts, overflow counts, timestamp range, arrivals per minute. Never a list of
    rows."""

    def __init__(self, source: str, in_edges: tuple[int, ...], out_edges: tuple[int, ...], skip_bad: bool,
                 choice: ColumnChoice):
        self.source = source
        self.in_edges, self.out_edges = in_edges, out_edges
        self.skip_bad = skip_bad
        # CSV headers are compared lower-cased, and so are the user's column names
        self.choice = ColumnChoice(_lower(choice.input), _lower(choice.output), _lower(choice.time),
                                   choice.time_unit)
        self.columns: TraceColumns | None = None
        self.clock = _Clock(choice.time_unit)
        self.cols = len(out_edges) - 1
        self.flat = [0] * ((len(in_edges) - 1) * self.cols)
        self.rows = self.skipped = self.failed = 0
        self.examples: list[str] = []
        self.in_over = self.out_over = self.in_under = self.out_under = 0
        self.ts_rows = 0
        self.ts_min = math.inf
        self.ts_max = -math.inf
        self.minutes = MinuteBins()

    def bad(self, line: int, reason: str) -> None:
        if not self.skip_bad:
            raise TraceError(f"{self.source}: line {line}: {reason}. Fix the row, or pass --skip-bad to skip and "
                             f"count broken rows")
        self.skipped += 1
        if len(self.examples) < _EXAMPLES_KEPT:
            self.examples.append(f"line {line}: {reason}")

    def count(self, rows: Iterator[tuple[int, int, float | None]]) -> None:
        """Count (input length, output length, seconds or None) rows into the histogram and the minutes: the hot
        loop, kept inline (lookup tables, local names) because it runs once per request of the trace."""
        in_b, out_b = Bucketer(self.in_edges), Bucketer(self.out_edges)
        in_table, out_table = in_b.table, out_b.table
        in_max, out_max = self.in_edges[-1], self.out_edges[-1]
        in_min, out_min = self.in_edges[0], self.out_edges[0]
        in_last, out_last = in_b.last, out_b.last
        cols, flat = self.cols, self.flat
        bins, anchor = self.minutes.bins, self.minutes.anchor
        minute, in_minute, lo, hi = 0, 0, 0.0, 0.0  # the minute being counted: [lo, hi), mostly the next row's too
        floor, width = math.floor, MINUTE_S
        for i_len, o_len, ts in rows:
            if i_len > in_max:
                self.in_over += 1
                i = in_last
            else:
                i = in_table[i_len] if in_table is not None else in_b.index(i_len)
                if i_len < in_min:
                    self.in_under += 1
            if o_len > out_max:
                self.out_over += 1
                j = out_last
            else:
                j = out_table[o_len] if out_table is not None else out_b.index(o_len)
                if o_len < out_min:
                    self.out_under += 1
            flat[i * cols + j] += 1
            self.rows += 1
            if ts is not None:
                self.ts_rows += 1
                if ts < self.ts_min:
                    self.ts_min = ts
                if ts > self.ts_max:
                    self.ts_max = ts
                if lo <= ts < hi:
                    in_minute += 1
                else:
                    if in_minute:
                        bins[minute] = bins.get(minute, 0) + in_minute
                    if anchor is None:
                        anchor = self.minutes.anchor = ts
                    minute = floor((ts - anchor) / width)
                    lo = anchor + minute * width
                    hi, in_minute = lo + width, 1
        if in_minute:
            bins[minute] = bins.get(minute, 0) + in_minute

    def _found(self, columns: TraceColumns) -> TraceColumns:
        self.columns = columns
        self.clock = _Clock(columns.time_unit)
        return columns

    def jsonl_rows(self, handle: IO[bytes]) -> Iterator[tuple[int, int, float | None]]:
        loads, errors = _loads, _JSON_ERRORS
        clock = self.clock
        seconds = clock.seconds
        # the keys, found in the first object with token counts: (input, output, time keys, by the names in it)
        in_key: str | None = None
        out_key = ""
        ts_keys: tuple[str, ...] = ()
        exact = fail_zero = False  # exact: only these keys (the user's, or a known format's), no generic fallback
        found = False
        lineno = 0
        first_line = next(handle, b"")
        for lineno, raw in enumerate(itertools.chain([first_line.removeprefix(_BOM)], handle), 1):
            try:
                obj = loads(raw)
            except errors as exc:
                if not raw.strip():
                    continue  # blank lines are not rows
                self.bad(lineno, f"not valid JSON ({exc})")
                continue
            try:
                if not found and type(obj) is dict:
                    names = _json_names(obj)
                    columns = self._json_columns(list(names))
                    if columns is not None:
                        found = True
                        clock = self.clock
                        seconds = clock.seconds
                        in_key, out_key = columns.input, columns.output or ""
                        ts_keys = tuple(names.get(t, t) for t in columns.times)
                        exact = columns.known is not None or bool(self.choice.input or self.choice.output)
                        fail_zero = columns.zero_output_is_failure
                        if in_key is not None:
                            in_key, out_key = names.get(in_key, in_key), names.get(out_key, out_key)
                if type(obj) is dict and in_key is not None and in_key in obj:  # the common case, inline
                    i_raw, o_raw, i_name, o_name = obj[in_key], obj.get(out_key), in_key, out_key
                elif exact and type(obj) is dict and in_key is not None:
                    i_raw, o_raw, i_name, o_name = _lookup(obj, in_key), _lookup(obj, out_key), in_key, out_key
                else:
                    i_raw, o_raw, i_name, o_name = _json_lengths(obj)
                i_len = i_raw if type(i_raw) is int and i_raw >= 0 else _tokens(i_raw, i_name)
                o_len = o_raw if type(o_raw) is int and o_raw >= 0 else _tokens(o_raw, o_name)
                ts: float | None = None
                for key in ts_keys:
                    value = obj.get(key)
                    if value is not None:
                        scale = clock.scale
                        # the common case inline: a float in a unit already known
                        ts = value * scale if type(value) is float and scale is not None else seconds(value, key)
                        break
            except _BadRow as exc:
                self.bad(lineno, str(exc))
                continue
            if fail_zero and o_len == 0:
                self.failed += 1
                continue
            yield i_len, o_len, ts

    def _json_columns(self, names: list[str]) -> TraceColumns | None:
        """The columns of a JSONL trace, judged by its first object's keys (lower-cased, nested ones dotted)."""
        columns = find_columns(names, self.choice, self.source)
        if columns is None and "usage" in names:
            columns = usage_columns(self.choice)
        return self._found(columns) if columns is not None else None

    def csv_rows(self, handle: IO[bytes]) -> Iterator[tuple[int, int, float | None]]:
        text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")  # -sig: a leading BOM is dropped
        try:
            header_line = text.readline()
        except UnicodeDecodeError as exc:
            raise TraceError(f"{self.source}: line 1: not UTF-8 text ({exc.reason})") from None
        if not header_line.strip():
            raise TraceError(f"{self.source}: empty trace, expected a CSV header row naming the token columns "
                             f"(input_len,output_len or prompt_tokens,completion_tokens)")
        delimiter = "\t" if header_line.count("\t") > header_line.count(",") else ","
        header = [h.strip().lower() for h in next(csv.reader([header_line], delimiter=delimiter))]
        columns = find_columns(header, self.choice, self.source)
        usage_col = None
        if columns is None and "usage" in header:
            columns, usage_col = usage_columns(self.choice), header.index("usage")
        if columns is None:
            raise TraceError(f"{self.source}: line 1: the CSV header has no token columns (found "
                             f"{', '.join(header) or 'nothing'}); expected {expected_names()}")
        self._found(columns)
        lengths = ((header.index(columns.input), header.index(columns.output), columns.input, columns.output)
                   if columns.input is not None and columns.output is not None else None)
        ts_col = next((header.index(c) for c in columns.times if c in header), None)
        ts_name = header[ts_col] if ts_col is not None else ""
        fail_zero = columns.zero_output_is_failure
        seconds = self.clock.seconds

        width = len(header)
        reader = csv.reader(text, delimiter=delimiter)
        rows = iter(reader)
        while True:
            try:
                record = next(rows)
            except StopIteration:
                break
            except UnicodeDecodeError as exc:
                raise TraceError(f"{self.source}: line {reader.line_num + 2}: not UTF-8 text ({exc.reason})") from None
            except csv.Error as exc:
                self.bad(reader.line_num + 1, f"malformed CSV ({exc})")
                continue
            lineno = reader.line_num + 1  # +1: the header was read before the csv reader started
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            try:
                if len(record) != width:
                    raise _BadRow(f"has {len(record)} fields but the header has {width}")
                if lengths is not None:
                    i_len = _tokens(record[lengths[0]], lengths[2])
                    o_len = _tokens(record[lengths[1]], lengths[3])
                else:
                    i_len, o_len = self.csv_usage(record[usage_col])  # type: ignore[index]
                ts = seconds(record[ts_col], ts_name) if ts_col is not None else None
            except _BadRow as exc:
                self.bad(lineno, str(exc))
                continue
            if fail_zero and o_len == 0:
                self.failed += 1
                continue
            yield i_len, o_len, ts

    @staticmethod
    def csv_usage(cell: str) -> tuple[int, int]:
        try:
            usage = json.loads(cell)
        except json.JSONDecodeError:
            raise _BadRow(f"the usage column is not a JSON object: {cell[:40]!r}") from None
        i_raw, o_raw, i_name, o_name = _json_lengths({"usage": usage})
        return _tokens(i_raw, i_name), _tokens(o_raw, o_name)

    def result(self, fmt: str, rate: float | None, rate_percentile: float | None) -> WorkloadResult:
        columns = self.columns
        known = columns.known if columns is not None else None
        failed_note = ""
        if self.failed:
            failed_note = (f"skipped {self.failed} failed request(s) ({known.title if known else 'the format'} "
                           f"logs a failure as 0 {known.output if known else 'output tokens'})")
        if self.rows == 0:
            hint = f" ({self.skipped} broken rows skipped)" if self.skipped else ""
            hint += f" ({failed_note})" if failed_note else ""
            raise TraceError(f"{self.source}: no requests in the trace{hint}; a histogram needs at least one row")
        warnings: list[str] = []
        if failed_note:
            warnings.append(f"{failed_note}, of {self.rows + self.failed}: the histogram and the rate count the "
                            f"{self.rows} answered")
        if self.skipped:
            warnings.append(f"skipped {self.skipped} broken row(s) of {self.rows + self.skipped} "
                            f"(first: {'; '.join(self.examples)})")
        for count, axis, edges, what in (
                (self.in_over, "input", self.in_edges, "above the last input edge"),
                (self.out_over, "output", self.out_edges, "above the last output edge")):
            if count:
                warnings.append(f"{count} request(s) ({100 * count / self.rows:.2g}%) have {axis} lengths {what} "
                                f"({edges[-1]} tokens) and were counted in the last {axis} bucket; add an edge "
                                f"(--{axis}-buckets ...,{_suggest_edge(edges)}) to keep them apart")
        for count, axis, edges in ((self.in_under, "input", self.in_edges), (self.out_under, "output", self.out_edges)):
            if count:
                warnings.append(f"{count} request(s) have {axis} lengths below the first {axis} edge ({edges[0]}) "
                                f"and were counted in the first {axis} bucket")
        first = self.ts_min if self.ts_rows else None
        last = self.ts_max if self.ts_rows else None
        mixed = False
        if first is not None and last is not None:
            said, mixed = self.clock.unit_warnings(first, last)
            warnings += said
            if mixed:
                warnings.append(f"the timestamps mix units (from {first:.0f} to {last:.0f} s: seconds and "
                                f"milliseconds?), so the rate from them is wrong: pass --rate REQ_PER_S, or "
                                f"--time-unit")
        mean_rate: float | None = None
        minutes: MinuteRates | None = None
        if self.ts_rows >= 2 and first is not None and last is not None and last > first:
            # (n - 1) arrivals happen in the span between the first and the last one
            mean_rate = (self.ts_rows - 1) / (last - first)
            minutes = None if mixed else self.minutes.complete(first, last)
            if self.ts_rows < self.rows:
                warnings.append(f"{self.rows - self.ts_rows} row(s) have no timestamp; the rate counts only the "
                                f"{self.ts_rows} timestamped rows")
        rate_source = RateSource.GIVEN if rate is not None else RateSource.NONE
        if rate is None and rate_percentile is not None:
            if minutes is None:
                span = f"span {last - first:.0f} s" if mean_rate is not None and first is not None \
                    and last is not None else "have no two distinct times"
                raise TraceError(f"{self.source}: --rate-percentile needs at least one complete minute of "
                                 f"timestamps, and the trace's timestamps {span}: pass --rate REQ_PER_S")
            rate, rate_source = minutes.percentile(rate_percentile), RateSource.TIMESTAMPS
        elif rate is None and mean_rate is not None:
            rate, rate_source = mean_rate, RateSource.TIMESTAMPS
        elif rate is None:
            why = "no timestamps" if self.ts_rows == 0 else "fewer than 2 distinct timestamps"
            warnings.append(f"the trace has {why}, so total_request_rate is not known: pass --rate REQ_PER_S")
        counts = tuple(tuple(self.flat[i * self.cols:(i + 1) * self.cols]) for i in range(len(self.in_edges) - 1))
        return WorkloadResult(
            source=self.source, format=fmt, input_edges=self.in_edges, output_edges=self.out_edges, counts=counts,
            rows=self.rows, skipped=self.skipped, skipped_examples=tuple(self.examples),
            input_overflow=self.in_over, output_overflow=self.out_over, input_underflow=self.in_under,
            output_underflow=self.out_under, timestamped_rows=self.ts_rows, first_timestamp=first,
            last_timestamp=last, rate=rate, rate_source=rate_source, warnings=tuple(warnings), mean_rate=mean_rate,
            rate_percentiles=minutes.shown() if minutes is not None else None,
            rate_percentile=rate_percentile if rate_source is RateSource.TIMESTAMPS else None,
            trace_format=known.key if known else None, columns=columns.describe() if columns else "",
            failed=self.failed)


def _suggest_edge(edges: tuple[int, ...]) -> int:
    return edges[-1] * 2


def _round_share(x: float) -> float:
    return float(f"{x:.6g}")  # significant digits: a rare bucket keeps its (tiny) share instead of rounding to 0


def _round_rate(x: float) -> float:
    return float(f"{x:.6g}")


# ---- a router's observed workload (`workload --from URL`) ---------------------------------------------------------
#: The most bytes read from a router's /workload answer (a few KB in practice).
_OBSERVED_LIMIT = 1 << 24


def fetch_observed(url: str, api_key: str | None = None, timeout: float = 10.0) -> tuple[str, dict[str, Any]]:
    """GET the observed workload of a `melange-sky serve` router: (the URL read, without credentials, and its JSON).

    `url` is the router's base URL (`/workload` is added) or the full `.../workload` URL; `api_key` goes as a Bearer
    token. Every failure is a one-line `TraceError`."""
    parts = urllib.parse.urlsplit(url.strip())
    netloc = parts.netloc.rpartition("@")[2]
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TraceError(f"--from {url!r} is not an http(s) URL; give the router's URL, e.g. http://127.0.0.1:8080")
    path = parts.path.rstrip("/")
    if not path.endswith("/workload"):
        path += "/workload"
    shown = urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")),
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked above
            data = response.read(_OBSERVED_LIMIT)
    except urllib.error.HTTPError as exc:
        hint = (": pass the router's key with --api-key or MELANGE_SKY_API_KEY" if exc.code == 401
                else ": is this a melange-sky router (`melange-sky serve`)?" if exc.code == 404 else "")
        raise TraceError(f"{shown}: HTTP {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TraceError(f"{shown}: cannot reach the router ({reason})") from None
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TraceError(f"{shown}: the answer is not JSON: is this a melange-sky router?") from None
    if not isinstance(doc, dict):
        raise TraceError(f"{shown}: the answer is not a workload document (a JSON object)")
    return shown, doc


def observed_workload(doc: dict[str, Any], source: str, rate: float | None = None,
                      rate_percentile: float | None = None) -> WorkloadResult:
    """The histogram a router counted (its `GET /workload` document) as a `WorkloadResult`, like a trace's: counts
    per bucket by reported sizes, its edges, and its arrival rate unless `rate` is given.

    `rate_percentile` takes that percentile of the router's per-minute arrivals (`minute_arrivals`, or its
    `rate_percentiles`) instead of its mean rate; a router too old to send them makes that a `TraceError`."""
    if rate is not None and rate_percentile is not None:
        raise TraceError("give --rate or --rate-percentile, not both")
    try:
        in_edges = check_edges(doc.get("input_buckets") or [], "input_buckets")
        out_edges = check_edges(doc.get("output_buckets") or [], "output_buckets")
    except BucketEdgesError as exc:
        raise TraceError(f"{source}: not a workload document: {exc}") from None
    counts = doc.get("counts")
    shape = (len(in_edges) - 1, len(out_edges) - 1)
    if (not isinstance(counts, list) or len(counts) != shape[0]
            or not all(isinstance(row, list) and len(row) == shape[1] for row in counts)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for row in counts for c in row)):
        raise TraceError(f"{source}: not a workload document: counts must be a {shape[0]}x{shape[1]} matrix of "
                         f"request counts")
    rows = sum(sum(row) for row in counts)
    span = doc.get("span_s")
    if rows == 0:
        raise TraceError(f"{source}: the router has counted no answered requests in its window yet"
                         + (f" ({span:.0f} s)" if isinstance(span, (int, float)) else "")
                         + "; send traffic through it first")
    warnings = []
    observed = doc.get("total_request_rate")
    mean_rate = (float(observed) if isinstance(observed, (int, float)) and not isinstance(observed, bool)
                 and observed > 0 else None)
    minutes, shown = observed_rates(doc)
    rate_source = RateSource.GIVEN
    if rate is None and rate_percentile is not None:
        picked = shown.get(rate_percentile) if shown is not None else None
        if picked is None and minutes is not None:
            picked = minutes.percentile(rate_percentile)
        if picked is None and isinstance(doc.get("minute_arrivals"), list) and not doc["minute_arrivals"]:
            counted = f" (it has counted for {span:.0f} s)" if isinstance(span, (int, float)) else ""
            raise TraceError(f"{source}: the router has no complete minute of arrivals yet{counted}, so "
                             f"--rate-percentile cannot be read from it: ask again later, or pass --rate")
        if picked is None:
            which = ("no per-minute arrivals (minute_arrivals)" if shown is None
                     else f"no per-minute arrivals (minute_arrivals) and no p{rate_percentile:g} in rate_percentiles")
            raise TraceError(f"{source}: the router reports {which}, so --rate-percentile cannot be read from it "
                             f"(a melange-sky router older than this command?). Drop --rate-percentile, or pass "
                             f"--rate")
        rate, rate_source = picked, RateSource.OBSERVED
    elif rate is None:
        if mean_rate is not None:
            rate, rate_source = mean_rate, RateSource.OBSERVED
        else:
            rate_source = RateSource.NONE
            warnings.append("the router reported no arrival rate, so total_request_rate is not known: pass --rate")
    window = doc.get("window_s")
    if isinstance(span, (int, float)) and isinstance(window, (int, float)) and span < window:
        warnings.append(f"the router has counted for {span:.0f} s of its {window:.0f} s window: a short sample")
    usage = doc.get("usage_source")
    estimated = usage.get("estimated", 0) if isinstance(usage, dict) else 0
    if isinstance(estimated, int) and estimated > 0:
        warnings.append(f"{estimated} of {rows} request(s) were counted from the router's estimates (streams "
                        f"without usage); clients that send stream_options.include_usage give exact sizes")
    clamped: dict[str, int] = {}
    for key in ("input_overflow", "output_overflow", "input_underflow", "output_underflow"):
        value = doc.get(key)
        clamped[key] = value if isinstance(value, int) and value >= 0 else 0
    for axis, edges in (("input", in_edges), ("output", out_edges)):
        if clamped[f"{axis}_overflow"]:
            warnings.append(f"{clamped[f'{axis}_overflow']} request(s) have {axis} lengths above the last {axis} "
                            f"edge ({edges[-1]} tokens) and were counted in the last {axis} bucket")
    return WorkloadResult(
        source=source, format="router", input_edges=in_edges, output_edges=out_edges,
        counts=tuple(tuple(row) for row in counts), rows=rows, skipped=0, skipped_examples=(),
        input_overflow=clamped["input_overflow"], output_overflow=clamped["output_overflow"],
        input_underflow=clamped["input_underflow"], output_underflow=clamped["output_underflow"],
        timestamped_rows=0, first_timestamp=None, last_timestamp=None, rate=rate, rate_source=rate_source,
        warnings=tuple(warnings), mean_rate=mean_rate, rate_percentiles=shown,
        rate_percentile=rate_percentile if rate_source is RateSource.OBSERVED else None)


# ---- merging into a config -----------------------------------------------------------------------------------------
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
