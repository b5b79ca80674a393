"""How close `melange-sky profile` lands to the truth, and how long it takes, through the CLI.

    python bench/profile_bench.py [--grid] [--write bench/results/profile_bench.md]

Each case starts the law server (tests/openai_test_server.py, whose `true_max_rate` is the truth) and runs
`melange-sky profile ... -o FILE -q` against it, as a user would (default --start-rate, --max-rate, --bisect-steps).
The server is pinned to core 0 and the profiler to core 1 with `taskset` when there are 2 cores or more, so they do
not take turns on one. Default cases: issue 11's table (the 3-bucket case in one run, timed; the README law's bucket
0:1). --grid adds the longer accuracy grid: outputs of 4 to 500 tokens, 1 to 100+ requests in flight at the truth.
Prints a markdown table (and writes it with --write); exit 1 if any bucket is off by more than --tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from openai_test_server import start_server, true_max_rate  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    law: dict[str, float]
    slo_ms: float
    input_edges: str | None  # None: the CLI's default edges
    output_edges: str | None
    buckets: str
    extra: tuple[str, ...] = field(default=())  # more CLI options

    def server_args(self) -> list[str]:
        return [f"--{k.replace('_', '-')}={v}" for k, v in self.law.items()]


ISSUE_LAW = {"base_ms": 2.0, "k_ms": 0.1, "prefill_ms_per_token": 0.1}
README_LAW = {"base_ms": 10.0, "k_ms": 0.5, "prefill_ms_per_token": 0.1}
CASES = [
    # issue 11's rows 1-3 in one run: buckets 50/25, 50/125, 550/125 (midpoints of these edges)
    Case("issue table, base 2 / k 0.1 / SLO 10 ms", ISSUE_LAW, 10.0, "1,100,1000", "1,50,100,150", "0:0,0:2,1:2"),
    # issue 11's row 4: the README law with the default edges, bucket 0:1 (13 / 62 tokens)
    Case("README law, base 10 / k 0.5 / SLO 120 ms", README_LAW, 120.0, None, None, "0:1"),
]
GRID = [
    Case("grid: 4 tokens, ~100 in flight", {"base_ms": 90.0, "k_ms": 0.2, "prefill_ms_per_token": 0.1}, 110.0,
         "10,30", "3,6", "0:0"),
    Case("grid: 4 tokens, ~1 in flight (instantaneous law)", {"base_ms": 4.0, "k_ms": 3.0, "prefill_ms_per_token": 0.1},
         10.0, "1,10", "3,6", "0:0"),
    Case("grid: 500 tokens, ~100 in flight", {"base_ms": 10.0, "k_ms": 0.1, "prefill_ms_per_token": 0.1}, 20.0,
         "10,30", "499,502", "0:0"),
]


def pinned(core: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(core)]
    return []


def run_case(case: Case, workdir: Path) -> tuple[list[dict], float]:
    """(per measured bucket: cell, tokens, tput, truth, error, status, limit, seconds), the run's wall time."""
    server, url = start_server(case.server_args(), prefix=pinned(0))
    try:
        out = workdir / "profile.json"
        cmd = [*pinned(1), sys.executable, "-m", "melange_sky.cli", "profile", "--endpoint",
               url, "--model", "test-model", "--tpot-slo-ms",
               str(case.slo_ms), "--buckets", case.buckets, "-o", str(out), "-q", *case.extra]
        if case.input_edges:
            cmd += ["--input-buckets", case.input_edges]
        if case.output_edges:
            cmd += ["--output-buckets", case.output_edges]
        started = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        if run.returncode != 0:
            raise RuntimeError(f"profile failed ({run.returncode}): {run.stderr.strip()}")
        data = json.loads(out.read_text())
    finally:
        server.terminate()
        server.wait(timeout=10)
    rows = []
    for b in data["buckets"]:
        if b["status"] == "not_measured":
            continue
        truth = true_max_rate(case.slo_ms, case.law["base_ms"], case.law["k_ms"], case.law["prefill_ms_per_token"],
                              b["prompt_tokens"], b["output_tokens"])
        in_flight = (case.slo_ms - case.law["base_ms"]) / case.law["k_ms"] - 1
        rows.append({"cell": f"{b['cell'][0]}:{b['cell'][1]}", "tokens": f"{b['prompt_tokens']} / {b['output_tokens']}",
                     "tput": b["tput"], "truth": truth, "error": b["tput"] / truth - 1, "status": b["status"],
                     "limit": b["limit"], "headroom": b["headroom"], "seconds": b["seconds"],
                     "steps": len(b["steps"]), "in_flight": in_flight})
    return rows, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", action="store_true", help="also run the longer accuracy grid")
    parser.add_argument("--only-grid", action="store_true", help="run only the grid")
    parser.add_argument("--tolerance", type=float, default=0.15, help="largest |error| accepted (default 0.15)")
    parser.add_argument("--write", metavar="FILE", help="write the markdown table to FILE")
    args = parser.parse_args()
    cases = ([] if args.only_grid else CASES) + (GRID if args.grid or args.only_grid else [])
    load_before = os.getloadavg()
    lines = ["| case | bucket (prompt / output) | in flight at truth | profile | truth | error | limit | headroom "
             "| steps | bucket time |", "|---|---|---|---|---|---|---|---|---|---|"]
    totals = []
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            rows, seconds = run_case(case, Path(tmp))
            totals.append(f"- {case.name}: {len(rows)} bucket(s) in {seconds:.0f} s ({seconds / 60:.1f} min) "
                          f"through the CLI")
            for r in rows:
                worst = max(worst, abs(r["error"]))
                lines.append(f"| {case.name} | {r['cell']}: {r['tokens']} | {r['in_flight']:.0f} | "
                             f"{r['tput']:.1f} req/s | {r['truth']:.1f} | {100 * r['error']:+.1f}% | {r['limit']} | "
                             f"{r['headroom']} | {r['steps']} | {r['seconds']:.0f} s |")
                print(lines[-1], flush=True)
    load_after = os.getloadavg()
    report = "\n".join([
        *lines, "", *totals, "",
        f"Worst error {100 * worst:.1f}% (tolerance {100 * args.tolerance:g}%). Machine: {os.cpu_count()} cores, "
        f"load average {load_before[0]:.2f} before and {load_after[0]:.2f} after (shared with other work); server "
        f"and profiler {'pinned to cores 0 and 1' if pinned(0) else 'not pinned'}.",
    ])
    print(report)
    if args.write:
        Path(args.write).write_text(report + "\n")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
