"""Request-size buckets: the edges that cut input and output lengths (in tokens) into a config's matrix cells.

With edges e0 < e1 < ... < en, bucket k holds lengths in [e_k, e_{k+1}); the last bucket also holds en. Lengths
above the last edge go into the last bucket and lengths below the first into the first, so every request has a
bucket; callers that care (the trace reader) count those clamped lengths and say so.

The trace reader, the profiler and a router all bucket with these rules, so one module owns them.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

from melange_sky.errors import BucketEdgesError

#: The original Mélange bucket ranges (README: 1-25, 25-100, 100-250, ...).
DEFAULT_INPUT_EDGES: tuple[int, ...] = (1, 25, 100, 250, 500, 1000, 2000, 4000, 8000)
DEFAULT_OUTPUT_EDGES: tuple[int, ...] = (1, 25, 100, 250, 500, 1000, 2000)
#: Above this last edge the bucket lookup table would be large; bisect is used instead.
_LOOKUP_TABLE_LIMIT = 1 << 20


def parse_edges(text: str, option: str = "--input-buckets") -> tuple[int, ...]:
    """Edges from the command line ("1,25,100"), validated by `check_edges`."""
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    values: list[int] = []
    for part in parts:
        try:
            values.append(int(part))
        except ValueError:
            raise BucketEdgesError(f"{option}: {part!r} is not a whole number of tokens; give increasing edges "
                                   f"like 1,25,100,250") from None
    return check_edges(values, option)


def check_edges(edges: Sequence[int], option: str = "edges") -> tuple[int, ...]:
    """At least 2 integer edges >= 0, strictly increasing: n edges make n - 1 buckets."""
    if len(edges) < 2:
        raise BucketEdgesError(f"{option}: needs at least 2 edges (n edges make n - 1 buckets), got "
                               f"{len(edges)}: e.g. 1,25,100,250")
    for k, edge in enumerate(edges):
        if isinstance(edge, bool) or not isinstance(edge, int) or edge < 0:
            raise BucketEdgesError(f"{option}: edge {edge!r} is not a token count >= 0")
        if k and edge <= edges[k - 1]:
            raise BucketEdgesError(f"{option}: edges must increase, but {edge} follows {edges[k - 1]}")
    return tuple(edges)


class Bucketer:
    """Maps a length to its bucket index: a lookup table when the last edge is small, else bisect.

    `table` (index v -> bucket of length v, for 0 <= v <= the last edge) is public so a hot loop over millions of
    rows can index it directly; `index` is the same answer for any length, clamped into the first and last bucket.
    """

    def __init__(self, edges: tuple[int, ...]):
        self.edges = edges
        self.last = len(edges) - 2
        self.table: list[int] | None = None
        if edges[-1] <= _LOOKUP_TABLE_LIMIT:
            # the last edge itself is in the last bucket
            self.table = [min(max(bisect.bisect_right(edges, v) - 1, 0), self.last) for v in range(edges[-1] + 1)]

    def index(self, value: int) -> int:
        """The bucket of a length `value`."""
        return min(max(bisect.bisect_right(self.edges, value) - 1, 0), self.last)
