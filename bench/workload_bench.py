"""Benchmark for `melange-sky workload`: wall time and peak memory on a 10^7-row request trace, and its peak rates.

    python bench/workload_bench.py                    # 10^7 rows: JSONL, CSV and Azure CSV (about 5 minutes, 2 cores)
    python bench/workload_bench.py --rows 1000000     # a quicker look
    python bench/workload_bench.py --formats jsonl    # one format only (jsonl, csv, azure)

It writes a synthetic trace to a temporary directory (deleted afterwards): bursty arrivals whose rate alternates
5 and 50 req/s minute by minute (evenly spaced within each minute, so every minute holds exactly 300 or 3,000
requests: mean 27.5 req/s, per-minute p50 5 and p95 50), and log-normal prompt/completion lengths (medians ~250 and
~120 tokens, a long tail beyond the last edges so overflow is exercised). `jsonl` and `csv` carry epoch seconds;
`azure` is the Azure LLM inference trace's own shape (TIMESTAMP,ContextTokens,GeneratedTokens, times like
2023-11-16 18:15:46.6805900), so the date parsing is measured too. The generator picks each row from a table of
65536 pre-formatted length pairs and knows the exact histogram it produced; the benchmark checks that `workload`
reproduces it exactly, and that its per-minute percentiles are the generator's. `melange-sky workload TRACE --json`
runs as a child process; its wall time and its own peak RSS (`os.wait4`'s ru_maxrss for that child alone) are
reported. Targets: < 60 s and < 200 MB. Markdown on stdout.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES

TIME_TARGET_S = 60.0
RSS_TARGET_MB = 200.0
RATES = (5, 50)  # req/s of the synthetic trace, alternating minute by minute
TABLE_BITS = 16
CHUNK = 100_000


@dataclass(frozen=True)
class Trace:
    path: Path
    rows: int
    counts: list[list[int]]
    seconds: float


@dataclass(frozen=True)
class Run:
    fmt: str
    rows: int
    megabytes: float
    generate_s: float
    wall_s: float
    rss_mb: float
    exact: bool
    mean: float
    p50: float
    p95: float
    rates_exact: bool


def _bucket(value: int, edges: tuple[int, ...]) -> int:
    return min(max(bisect.bisect_right(edges, value) - 1, 0), len(edges) - 2)


def arrival_times(t0: float) -> Iterator[float]:
    """Evenly spaced arrivals, 5 req/s for a minute, then 50 req/s for a minute, and so on."""
    minute = 0
    while True:
        rate = RATES[minute % 2]
        start = t0 + 60 * minute
        for k in range(60 * rate):
            yield start + k / rate
        minute += 1


def generate(path: Path, rows: int, fmt: str, seed: int = 1) -> Trace:
    """Write `rows` requests to `path` and return the histogram they make (under the default Mélange edges)."""
    rng = random.Random(seed)
    pairs = [(max(1, int(rng.lognormvariate(5.5, 1.3))), max(1, int(rng.lognormvariate(4.8, 1.1))))
             for _ in range(1 << TABLE_BITS)]
    if fmt == "jsonl":
        fragments = [f'"input_len": {i}, "output_len": {o}}}\n' for i, o in pairs]
    else:
        fragments = [f",{i},{o}\n" for i, o in pairs]
    cells = [(_bucket(i, DEFAULT_INPUT_EDGES), _bucket(o, DEFAULT_OUTPUT_EDGES)) for i, o in pairs]
    picks = [0] * len(pairs)
    start = time.perf_counter()
    t0 = 1_700_000_000.0
    epoch = datetime.fromtimestamp(t0, UTC).replace(tzinfo=None)
    times = arrival_times(t0)
    getrandbits = rng.getrandbits
    with open(path, "w", encoding="utf-8") as out:
        if fmt == "csv":
            out.write("timestamp,input_len,output_len\n")
        elif fmt == "azure":
            out.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        for begin in range(0, rows, CHUNK):
            idx = [getrandbits(TABLE_BITS) for _ in range(min(CHUNK, rows - begin))]
            stamps = [next(times) for _ in idx]
            for k in idx:
                picks[k] += 1
            if fmt == "jsonl":
                out.write("".join([f'{{"timestamp": {t:.3f}, {fragments[k]}' for t, k in zip(stamps, idx)]))
            elif fmt == "csv":
                out.write("".join([f"{t:.3f}{fragments[k]}" for t, k in zip(stamps, idx)]))
            else:  # 7 fractional digits, as the Azure trace writes them
                out.write("".join([f"{(epoch + timedelta(seconds=t - t0)).isoformat(' ', 'microseconds')}0"
                                   f"{fragments[k]}" for t, k in zip(stamps, idx)]))
    counts = [[0] * (len(DEFAULT_OUTPUT_EDGES) - 1) for _ in range(len(DEFAULT_INPUT_EDGES) - 1)]
    for k, n in enumerate(picks):
        i, j = cells[k]
        counts[i][j] += n
    return Trace(path, rows, counts, time.perf_counter() - start)


def run_workload(trace: Trace, workdir: Path) -> tuple[float, float, dict]:
    """Run the CLI on the trace in a child process: (wall seconds, the child's peak RSS in MB, its --json output)."""
    out_path = workdir / "workload.json"
    with open(out_path, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "melange_sky.cli", "workload", str(trace.path), "--json"],
                                stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"melange-sky workload failed with exit code {proc.returncode}")
    rss_mb = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20  # KB on Linux
    return wall, rss_mb, json.loads(out_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--formats", default="jsonl,csv,azure", help="comma-separated: jsonl, csv, azure")
    args = parser.parse_args()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="melange-workload-bench-") as tmp:
        workdir = Path(tmp)
        for fmt in args.formats.split(","):
            path = workdir / f"trace.{'jsonl' if fmt == 'jsonl' else 'csv'}"
            print(f"generating {args.rows:,} rows of {fmt} ...", file=sys.stderr)
            trace = generate(path, args.rows, fmt)
            size_mb = path.stat().st_size / 2**20
            print(f"running melange-sky workload on {size_mb:.0f} MB ...", file=sys.stderr)
            wall, rss, output = run_workload(trace, workdir)
            exact = output["counts"] == trace.counts and output["rows"] == trace.rows
            pct = output["rate_percentiles"] or {}
            rates_exact = (pct.get("p50") == min(RATES) and pct.get("p95") == max(RATES)
                           and abs(output["total_request_rate"] - sum(RATES) / 2) < 0.01 * sum(RATES) / 2)
            runs.append(Run(fmt, trace.rows, size_mb, trace.seconds, wall, rss, exact, output["total_request_rate"],
                            pct.get("p50", float("nan")), pct.get("p95", float("nan")), rates_exact))
            path.unlink()
    cpu = platform.processor() or platform.machine()
    print(f"`melange-sky workload` on {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}\n")
    print("| format | rows | file MB | generate s | workload s | rows/s | peak RSS MB | histogram exact "
          "| mean / p50 / p95 req/s (generator: 27.5 / 5 / 50) | targets |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in runs:
        ok = r.wall_s < TIME_TARGET_S and r.rss_mb < RSS_TARGET_MB
        print(f"| {r.fmt} | {r.rows:,} | {r.megabytes:.0f} | {r.generate_s:.1f} | {r.wall_s:.1f} | "
              f"{r.rows / r.wall_s:,.0f} | {r.rss_mb:.0f} | {'yes' if r.exact else 'NO'} | "
              f"{r.mean:.4g} / {r.p50:.4g} / {r.p95:.4g} {'(match)' if r.rates_exact else '(MISMATCH)'} | "
              f"{'met' if ok else 'MISSED'} (< {TIME_TARGET_S:.0f} s, < {RSS_TARGET_MB:.0f} MB) |")
    if not all(r.exact and r.rates_exact for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
