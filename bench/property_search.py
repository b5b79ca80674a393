"""The long random search behind the property tests: the suite runs them from a fixed seed (tests/conftest.py), so a
run that passes passes again; this runs them again and again with fresh random seeds, looking for new counterexamples.

    python bench/property_search.py [--rounds 20] [--seed 1] [-k EXPRESSION]

Each round is one pytest run of tests/test_solver_properties.py with HYPOTHESIS_PROFILE=random and its own seed; a
failure prints hypothesis's reproduction blob and the seed, and the script exits non-zero. Pin what it finds as an
`@example` in the test.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1, help="seed of the first round; round i uses seed + i")
    parser.add_argument("-k", dest="expression", help="only the property tests matching this pytest expression")
    args = parser.parse_args()
    env = {**os.environ, "HYPOTHESIS_PROFILE": "random"}
    failed = []
    started = time.monotonic()
    for i in range(args.rounds):
        seed = args.seed + i
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}",
                   str(REPO / "tests" / "test_solver_properties.py")] + (["-k", args.expression] if args.expression
                                                                          else [])
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"round {i + 1}/{args.rounds} seed {seed}: {last}", flush=True)
        if done.returncode != 0:
            failed.append(seed)
            print(done.stdout[-4000:], flush=True)
    print(f"{args.rounds} rounds in {time.monotonic() - started:.0f} s; failing seeds: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
