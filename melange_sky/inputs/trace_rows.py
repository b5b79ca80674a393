"""Reading a request trace into rows of (input tokens, output tokens, arrival time): JSONL or CSV, gzip or not.

What a row holds is found once per trace, from its first object's keys or its CSV header (`trace_formats`: the
user's column names, a recognised public trace's, or the generic ones); each row is then read on a short path,
because a trace has millions of rows. Times are epoch seconds, milliseconds or microseconds (recognised by size,
or as `--time-unit` says) or ISO-8601 strings. A broken row raises `TraceError` naming its line, or is skipped and
counted (`skip_bad`). Nothing here counts: `trace.read_trace` turns the rows into a histogram.
"""
from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import math
import os
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import IO, Any

from melange_sky.errors import TraceError
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
GZIP_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError, gzip.BadGzipFile, zlib.error)
_BOM = b"\xef\xbb\xbf"


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


def open_binary(path: str) -> IO[bytes]:
    opener: Callable[..., IO[bytes]] = gzip.open if path.endswith(".gz") else open  # type: ignore[assignment]
    try:
        return opener(path, "rb")  # closed by the caller (a GzipFile opened by name closes its file too)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, expected a JSONL or CSV trace") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None


def gzip_reason(exc: BaseException) -> str:
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
    with open_binary(path) as handle:
        try:
            head = handle.read(4096)
        except GZIP_ERRORS as exc:
            raise TraceError(f"{path}: cannot read: {gzip_reason(exc)}") from None
    return "jsonl" if head.removeprefix(_BOM).lstrip()[:1] == b"{" else "csv"


#: One row: input tokens, output tokens, arrival time in seconds (None without one).
Row = tuple[int, int, float | None]


class TraceRows:
    """The rows of one trace, and what reading them found: its columns, its clock (time unit), the broken rows
    skipped (`skip_bad`) and the failed requests a format marks (skipped and counted)."""

    def __init__(self, source: str, skip_bad: bool, choice: ColumnChoice):
        self.source = source
        self.skip_bad = skip_bad
        # CSV headers are compared lower-cased, and so are the user's column names
        self.choice = ColumnChoice(_lower(choice.input), _lower(choice.output), _lower(choice.time),
                                   choice.time_unit)
        self.columns: TraceColumns | None = None
        self.clock = _Clock(choice.time_unit)
        self.skipped = self.failed = 0
        self.examples: list[str] = []

    def bad(self, line: int, reason: str) -> None:
        if not self.skip_bad:
            raise TraceError(f"{self.source}: line {line}: {reason}. Fix the row, or pass --skip-bad to skip and "
                             f"count broken rows")
        self.skipped += 1
        if len(self.examples) < _EXAMPLES_KEPT:
            self.examples.append(f"line {line}: {reason}")


    def _found(self, columns: TraceColumns) -> TraceColumns:
        self.columns = columns
        self.clock = _Clock(columns.time_unit)
        return columns

    def jsonl_rows(self, handle: IO[bytes]) -> Iterator[Row]:
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
                    columns = self._json_columns(names)
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

    def _json_columns(self, names: dict[str, str]) -> TraceColumns | None:
        """The columns of a JSONL trace, judged by its first object's keys (lower-cased, nested ones dotted)."""
        columns = find_columns(list(names), self.choice, self.source, spelled=list(names.values()))
        if columns is None and "usage" in names:
            columns = usage_columns(self.choice)
        return self._found(columns) if columns is not None else None

    def csv_rows(self, handle: IO[bytes]) -> Iterator[Row]:
        text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")  # -sig: a leading BOM is dropped
        try:
            header_line = text.readline()
        except UnicodeDecodeError as exc:
            raise TraceError(f"{self.source}: line 1: not UTF-8 text ({exc.reason})") from None
        if not header_line.strip():
            raise TraceError(f"{self.source}: empty trace, expected a CSV header row naming the token columns "
                             f"(input_len,output_len or prompt_tokens,completion_tokens)")
        delimiter = "\t" if header_line.count("\t") > header_line.count(",") else ","
        written = [h.strip() for h in next(csv.reader([header_line], delimiter=delimiter))]
        header = [h.lower() for h in written]  # compared lower-cased; named to the user as the file spells them
        columns = find_columns(header, self.choice, self.source, spelled=written)
        usage_col = None
        if columns is None and "usage" in header:
            columns, usage_col = usage_columns(self.choice), header.index("usage")
        if columns is None:
            raise TraceError(f"{self.source}: line 1: the CSV header has no token columns (found "
                             f"{', '.join(written) or 'nothing'}); expected {expected_names()}")
        self._found(columns)
        lengths = None
        if columns.input is not None and columns.output is not None:
            in_col, out_col = header.index(columns.input), header.index(columns.output)
            lengths = (in_col, out_col, written[in_col], written[out_col])
        ts_col = next((header.index(c) for c in columns.times if c in header), None)
        ts_name = written[ts_col] if ts_col is not None else ""
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



__all__ = ["GZIP_ERRORS", "Row", "TraceRows", "detect_format", "gzip_reason", "open_binary"]
