"""The chaos run, long: the real CLI against the fault-injecting launcher (tests/chaos_backend.py), or the local
launcher (real emulator processes: --backend local), a few hundred CLI runs across every scenario kind, with
invariants checked after every scenario (tests/chaos.py says which).

    python bench/chaos.py                      # seed 1, about 400 CLI runs (a few minutes on 2 cores)
    python bench/chaos.py --backend local --runs 100   # the kinds that need no fault injection, on real processes
    python bench/chaos.py --seed 7 --runs 1000 --json bench/results/chaos.json
    python bench/chaos.py --kinds status-race interrupt --runs 100
    python bench/chaos.py --replay status-race:123456   # one scenario again, its files kept

Prints a summary table (scenarios, CLI runs, violations, leaked clusters, tracebacks, per scenario kind) and every
violation with the scenario that reproduces it (`--replay KIND:SUBSEED`) and its command sequence. Exits 1 if any
violation was found, 0 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chaos import BACKENDS, KINDS, LOCAL_KINDS, Scenario, replay, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="master seed (default 1)")
    parser.add_argument("--runs", type=int, default=400, help="CLI runs to spend, at least (default 400)")
    parser.add_argument("--backend", choices=BACKENDS, default="chaos",
                        help="chaos: the fault-injecting launcher (default); local: the local launcher, real "
                             f"processes ({', '.join(LOCAL_KINDS)} only)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, metavar="KIND",
                        help=f"scenario kinds to draw from (default all: {', '.join(KINDS)}; with --backend local: "
                             f"{', '.join(LOCAL_KINDS)})")
    parser.add_argument("--json", metavar="PATH", help="also write the report, with every violation, as JSON")
    parser.add_argument("--keep", action="store_true", help="keep every scenario's directory (by default only "
                                                            "those with a violation are kept)")
    parser.add_argument("--workdir", help="where scenario directories go (default: a new temporary directory)")
    parser.add_argument("--replay", metavar="KIND:SUBSEED", help="rerun one scenario, print its steps and findings")
    parser.add_argument("-q", "--quiet", action="store_true", help="no line per scenario")
    args = parser.parse_args(argv)
    kinds = args.kinds or list(KINDS if args.backend == "chaos" else LOCAL_KINDS)
    if args.backend == "local" and set(kinds) - set(LOCAL_KINDS):
        parser.error(f"--backend local runs only {', '.join(LOCAL_KINDS)} (the others need fault injection)")

    if args.replay:
        s = replay(args.replay, workdir=args.workdir, backend=args.backend)
        print("\n".join(s.steps))
        print(f"\n{len(s.violations)} violation(s); files in {s.dir}")
        for v in s.violations:
            print(f"  {v}")
        return 1 if s.violations else 0

    started = time.monotonic()

    def progress(s: Scenario) -> None:
        if not args.quiet:
            found = f"  {len(s.violations)} violation(s)" if s.violations else ""
            print(f"[{time.monotonic() - started:6.1f}s] {s.replay:32s} {len(s.runs):2d} runs{found}", flush=True)

    report = run(args.seed, kinds, args.runs, on_scenario=progress, keep=args.keep, workdir=args.workdir,
                 backend=args.backend)
    print()
    print(report.summary())
    if report.violations:
        print(f"\nviolations (replay one with: python bench/chaos.py --backend {args.backend} --replay KIND:SUBSEED):")
        for invariant, found in report.by_invariant().items():
            print(f"\n== {invariant} ({len(found)})")
            for v in found:
                print(f"  {v.replay}: {v.description}")
                for step in v.steps:
                    print(f"      {step}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return 1 if report.violations or report.leaked_clusters or report.tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
