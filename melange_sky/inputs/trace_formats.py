"""Which columns of a trace hold the token counts and the arrival time, and in what unit that time is.

Public LLM traces name their columns each their own way, and some give time in milliseconds from the trace's start,
which no size rule can tell from seconds. A `TraceColumns` fixes all of that for one trace: the input, output and
time columns and the time unit. It comes from the user's `--input-column/--output-column/--time-column/--time-unit`,
or from the names of a recognised format (`KNOWN_FORMATS`), or from the generic names (`LENGTH_COLUMNS`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from melange_sky.errors import TraceError


class TimeUnit(StrEnum):
    """The unit of numeric timestamps. AUTO: epoch seconds, or ms / µs when the numbers are too large for seconds."""

    AUTO = "auto"
    SECONDS = "s"
    MILLISECONDS = "ms"
    MICROSECONDS = "us"


#: Seconds per unit of a numeric timestamp.
SECONDS_PER_UNIT: dict[TimeUnit, float] = {TimeUnit.SECONDS: 1.0, TimeUnit.MILLISECONDS: 1e-3,
                                           TimeUnit.MICROSECONDS: 1e-6}


@dataclass(frozen=True)
class KnownFormat:
    """A public trace's column names (lower case: CSV headers are compared lower-cased) and what its values mean."""

    key: str  # short name, in --json's trace_format
    title: str  # shown to the user
    input: str
    output: str
    time: str
    time_unit: TimeUnit
    zero_output_is_failure: bool = False  # rows with 0 output tokens are failed requests: skipped and counted


#: The public traces `workload` reads as they come, tried in this order.
KNOWN_FORMATS: tuple[KnownFormat, ...] = (
    # TIMESTAMP,ContextTokens,GeneratedTokens; times like 2023-11-16 18:15:46.6805900
    KnownFormat("azure", "Azure LLM inference trace", "contexttokens", "generatedtokens", "timestamp",
                TimeUnit.AUTO),
    # Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type; seconds from the trace's start
    KnownFormat("burstgpt", "BurstGPT", "request tokens", "response tokens", "timestamp", TimeUnit.SECONDS,
                zero_output_is_failure=True),
    # {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [...]}; ms from the start
    KnownFormat("mooncake", "Mooncake", "input_length", "output_length", "timestamp", TimeUnit.MILLISECONDS),
)

#: Generic column (or key) pairs naming the input and output token counts, in the order they are tried.
LENGTH_COLUMNS: tuple[tuple[str, str], ...] = (
    ("input_len", "output_len"),
    ("prompt_tokens", "completion_tokens"),
    ("input_tokens", "output_tokens"),
    ("usage.prompt_tokens", "usage.completion_tokens"),  # CSV flattened from OpenAI usage objects
    ("usage.input_tokens", "usage.output_tokens"),
)
#: Keys inside an OpenAI-style `usage` object (chat/completions, then the Responses API).
USAGE_KEYS: tuple[tuple[str, str], ...] = (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens"))
TIMESTAMP_COLUMNS: tuple[str, ...] = ("timestamp", "created")


@dataclass(frozen=True)
class ColumnChoice:
    """What the user said about the columns (None: find it)."""

    input: str | None = None
    output: str | None = None
    time: str | None = None
    time_unit: TimeUnit = TimeUnit.AUTO

    @property
    def names_columns(self) -> bool:
        return bool(self.input or self.output or self.time)


@dataclass(frozen=True)
class TraceColumns:
    """The columns one trace is read by. `input`/`output` None (JSONL only): an OpenAI `usage` object per row."""

    input: str | None
    output: str | None
    times: tuple[str, ...]  # the time column, or the names tried in turn
    time_unit: TimeUnit
    known: KnownFormat | None = None  # the public format recognised, if any
    zero_output_is_failure: bool = False

    def describe(self) -> str:
        """"Azure LLM inference trace columns", or the columns read, for the report's first line."""
        if self.known is not None:
            return f"{self.known.title} columns"
        if self.input is None:
            return "usage objects"
        return f"columns {self.input}, {self.output}"


def _choose(found: TraceColumns, choice: ColumnChoice) -> TraceColumns:
    """`found` with the user's columns and unit put over it."""
    unit = choice.time_unit if choice.time_unit is not TimeUnit.AUTO else found.time_unit
    return replace(found, input=choice.input or found.input, output=choice.output or found.output,
                   times=(choice.time,) if choice.time else found.times, time_unit=unit)


def find_columns(names: Sequence[str], choice: ColumnChoice, source: str,
                 spelled: Sequence[str] | None = None) -> TraceColumns | None:
    """The columns among `names` (a CSV header lower-cased, or the keys of a trace's first JSON object);
    `spelled`: the same names as the file writes them, for messages.

    None when neither a recognised format, nor the generic names, nor the user's columns give both token counts.
    Raises `TraceError` when a column the user named is not among `names`.
    """
    present = set(names)
    for given, option in ((choice.input, "--input-column"), (choice.output, "--output-column"),
                          (choice.time, "--time-column")):
        if given and given not in present:
            raise TraceError(f"{source}: {option} {given!r} is not a column of the trace (found "
                             f"{', '.join(spelled if spelled is not None else names) or 'nothing'})")
    found: TraceColumns | None = None
    for known in KNOWN_FORMATS:
        if known.input in present and known.output in present:
            found = TraceColumns(known.input, known.output, (known.time,), known.time_unit, known,
                                 known.zero_output_is_failure)
            break
    else:
        pair = next(((a, b) for a, b in LENGTH_COLUMNS if a in present and b in present), None)
        if pair is not None:
            found = TraceColumns(pair[0], pair[1], TIMESTAMP_COLUMNS, TimeUnit.AUTO)
    if found is None:
        if not (choice.input and choice.output):
            return None
        found = TraceColumns(choice.input, choice.output, TIMESTAMP_COLUMNS, TimeUnit.AUTO)
    elif (choice.input and choice.input != found.input) or (choice.output and choice.output != found.output):
        found = replace(found, known=None, zero_output_is_failure=False)  # the user's own reading, not the format's
    return _choose(found, choice)


def usage_columns(choice: ColumnChoice) -> TraceColumns:
    """The columns of a trace whose token counts are in a `usage` object (or column)."""
    return _choose(TraceColumns(None, None, TIMESTAMP_COLUMNS, TimeUnit.AUTO), choice)


def expected_names() -> str:
    """The column names `workload` looks for, for error messages."""
    known = "; ".join(f"{k.title} ({k.input}/{k.output})" for k in KNOWN_FORMATS)
    generic = ", ".join(f"{a}/{b}" for a, b in LENGTH_COLUMNS)
    return f"one of {generic}, a `usage` column, or a known trace: {known}; or name them with --input-column and " \
           f"--output-column"
