"""How long `melange-sky up` takes when each launch takes 2 s: concurrency, measured with the real CLI.

Runs `melange-sky up` as a subprocess against the FakeBackend test double (tests/fake_backend.py), whose every launch
sleeps for --latency seconds, on a config that plans --replicas replicas, for several --parallel values; then
`melange-sky down`. Everything lives in a temporary directory (ledger, fake cluster state); nothing is provisioned.

    python bench/up_bench.py                 # 8 replicas, 2 s per launch, parallel 1, 4, 8 (default)
    python bench/up_bench.py --replicas 16 --latency 1

Prints a Markdown table. Wall time includes the CLI's start-up, the solve and the ledger writes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fake_backend import FakeBackend  # noqa: E402


def config(replicas: int) -> dict:
    """One GPU type whose every replica serves 1 req/s: `replicas` req/s need exactly that many."""
    return {"name": "bench", "workload_distribution": [[1.0]], "total_request_rate": float(replicas),
            "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[1.0]]}}}


def run(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "melange_sky.cli", *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"melange-sky {' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--latency", type=float, default=2.0, help="seconds per launch")
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "bench.json")
        path.write_text(json.dumps(config(args.replicas)))
        state = Path(tmp, "fake.json")
        env = {**os.environ, "MELANGE_SKY_HOME": str(Path(tmp, "home")), "HF_TOKEN": "hf_bench",
               "MELANGE_SKY_BACKEND": "fake_backend:FakeBackend", "MELANGE_SKY_FAKE_STATE": str(state),
               "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
        for parallel in args.parallel:
            state.unlink(missing_ok=True)  # a fresh double: its call log and max concurrency start at zero
            fake = FakeBackend(state)
            fake.configure(latency={"launch": args.latency})
            wall = run(["up", str(path), "-y", "--parallel", str(parallel), "--json"], env)
            launched = len(fake.clusters())
            concurrency = fake.max_concurrency()
            run(["down", "bench", "-y"], env)
            rows.append((parallel, launched, wall, concurrency))
            print(f"  parallel {parallel}: {wall:.2f} s", file=sys.stderr)
    serial = args.replicas * args.latency
    print(f"# `melange-sky up`: {args.replicas} replicas, {args.latency:g} s per launch (fake backend)\n")
    print("| --parallel | replicas up | wall s | launches in flight (max) | serial would be |")
    print("|---|---|---|---|---|")
    for parallel, launched, wall, concurrency in rows:
        print(f"| {parallel} | {launched} | {wall:.2f} | {concurrency} | {serial:.0f} s |")


if __name__ == "__main__":
    main()
