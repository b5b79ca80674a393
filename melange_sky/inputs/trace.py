"""Turn a request trace into Mélange's workload histogram: `melange-sky workload`.

A trace is JSONL (one object per line) or CSV (a header row) with the prompt and completion token counts of each
request, and optionally a timestamp (epoch seconds; a trace whose numbers are milliseconds or microseconds is
recognised by their size, with a warning; or ISO-8601). Gzip (.gz) and a UTF-8 BOM are fine. The reader streams
the file and keeps only bucket counts, so memory does not grow with the number of rows (10^7 rows are the benchmark
in `bench/workload_bench.py`).

Buckets follow `melange_sky.core.buckets`: [e_k, e_{k+1}), the last one closed, lengths outside the edges clamped
into the first or last bucket. Those clamped lengths are counted and reported as warnings, because a histogram that
hides them would make the solver plan for the wrong sizes.

This module counts; beside it: `trace_rows` reads a file's rows (formats, columns, times), `trace_formats` knows the
public traces' columns, `trace_rates` the per-minute rates, `workload` the resulting record and its merge into a
config, and `router_workload` the other source of the same record (a router's counts, `workload --from URL`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, Bucketer, check_edges
from melange_sky.errors import TraceError
from melange_sky.inputs.trace_formats import ColumnChoice
from melange_sky.inputs.trace_rates import MINUTE_S, MinuteBins, MinuteRates
from melange_sky.inputs.trace_rows import GZIP_ERRORS, Row, TraceRows, detect_format, gzip_reason, open_binary
from melange_sky.inputs.workload import RateSource, WorkloadResult


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
    rows = TraceRows(source, skip_bad, columns or ColumnChoice())
    counter = _Counter(source, in_edges, out_edges)
    with open_binary(source) as handle:
        try:
            counter.count(rows.jsonl_rows(handle) if fmt == "jsonl" else rows.csv_rows(handle))
        except GZIP_ERRORS as exc:
            raise TraceError(f"{source}: cannot read: {gzip_reason(exc)}") from None
    return counter.result(rows, fmt, rate, rate_percentile)


class _Counter:
    """The streaming state: bucket counts, overflow counts, timestamp range, arrivals per minute. Never a list of
    rows."""

    def __init__(self, source: str, in_edges: tuple[int, ...], out_edges: tuple[int, ...]):
        self.source = source
        self.in_edges, self.out_edges = in_edges, out_edges
        self.cols = len(out_edges) - 1
        self.flat = [0] * ((len(in_edges) - 1) * self.cols)
        self.rows = 0
        self.in_over = self.out_over = self.in_under = self.out_under = 0
        self.ts_rows = 0
        self.ts_min = math.inf
        self.ts_max = -math.inf
        self.minutes = MinuteBins()

    def count(self, rows: Iterator[Row]) -> None:
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

    def result(self, read: TraceRows, fmt: str, rate: float | None, rate_percentile: float | None) -> WorkloadResult:
        """The histogram counted, its rate (given, the mean, or a per-minute percentile) and its warnings."""
        columns = read.columns
        known = columns.known if columns is not None else None
        failed_note = ""
        if read.failed:
            failed_note = (f"skipped {read.failed} failed request(s) ({known.title if known else 'the format'} "
                           f"logs a failure as 0 {known.output if known else 'output tokens'})")
        if self.rows == 0:
            hint = f" ({read.skipped} broken rows skipped)" if read.skipped else ""
            hint += f" ({failed_note})" if failed_note else ""
            raise TraceError(f"{self.source}: no requests in the trace{hint}; a histogram needs at least one row")
        warnings: list[str] = []
        if failed_note:
            warnings.append(f"{failed_note}, of {self.rows + read.failed}: the histogram and the rate count the "
                            f"{self.rows} answered")
        if read.skipped:
            warnings.append(f"skipped {read.skipped} broken row(s) of {self.rows + read.skipped} "
                            f"(first: {'; '.join(read.examples)})")
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
            said, mixed = read.clock.unit_warnings(first, last)
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
            rows=self.rows, skipped=read.skipped, skipped_examples=tuple(read.examples),
            input_overflow=self.in_over, output_overflow=self.out_over, input_underflow=self.in_under,
            output_underflow=self.out_under, timestamped_rows=self.ts_rows, first_timestamp=first,
            last_timestamp=last, rate=rate, rate_source=rate_source, warnings=tuple(warnings), mean_rate=mean_rate,
            rate_percentiles=minutes.shown() if minutes is not None else None,
            rate_percentile=rate_percentile if rate_source is RateSource.TIMESTAMPS else None,
            trace_format=known.key if known else None, columns=columns.describe() if columns else "",
            failed=read.failed)


def _suggest_edge(edges: tuple[int, ...]) -> int:
    return edges[-1] * 2


__all__ = ["WorkloadResult", "detect_format", "read_trace"]
