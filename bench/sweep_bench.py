"""Sweep benchmark for melange-sky: what `melange-sky sweep` costs, against issue 12's target of 50 rates on the
example in under 5 s, solved in-process.

Run it from anywhere with the package installed (``pip install -e '.[plot]'``):

    python bench/sweep_bench.py              # about a minute on 2 cores
    python bench/sweep_bench.py --runs 9     # more repetitions per measurement (medians)
    python bench/sweep_bench.py --no-large   # skip the 60-bucket, 40-offer instance

Markdown goes to stdout, so ``python bench/sweep_bench.py > sweep_bench.md`` leaves just the report. It asserts
nothing. Measurements (median, min and max of ``--runs``):

* library: ``solver.sweep.sweep`` on examples/example.json at 50 rates (2, 4, ..., 100 req/s) for each
  ``--formulation``: the formulation's mix, the ``split`` mix (not solved twice when the formulation is ``split``)
  and the single-GPU-type baselines the solver reports, per rate;
* figure: ``plot_sweep`` of that sweep to a PNG (matplotlib imported before timing);
* CLI: ``melange-sky sweep examples/example.json --from 2 --to 100 --steps 50`` as a subprocess (Python start-up,
  imports and the table included), without and with ``--plot`` (matplotlib's import included);
* large: bench/solve_bench.py's seed-1 instance (10 x 6 buckets, 40 offers of 8 GPU types, slice_factor 8) at 10
  rates from 0.25x to 2.5x its own rate, to show how a sweep grows with the model.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import pulp

import melange_sky
from melange_sky.core.config import load_config
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.solver.model import SolverOptions
from melange_sky.solver.sweep import Sweep, plot_sweep, rate_range, sweep
from solve_bench import cpu_model, load_instance  # bench/, the script's directory

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "example.json"
RATES = rate_range(2, 100, 50)
TARGET_SECONDS = 5.0
LARGE_TIME_LIMIT = 60.0


def timed(fn: Callable[[], object], runs: int) -> tuple[list[float], object]:
    seconds, value = [], None
    for _ in range(runs):
        started = time.perf_counter()
        value = fn()
        seconds.append(time.perf_counter() - started)
    return seconds, value


def stats(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.2f} | {min(seconds):.2f} | {max(seconds):.2f}"


def fleets(result: Sweep) -> int:
    return sum(1 if p.split is p.mix else 2 for p in result.points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="repetitions per measurement (default 5)")
    parser.add_argument("--no-large", action="store_true", help="skip the 60-bucket, 40-offer instance")
    args = parser.parse_args()

    print("# melange-sky sweep benchmark\n")
    print("| cores | CPU | Python | melange-sky | PuLP | matplotlib | load average at start (1 min) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {os.cpu_count()} | {cpu_model()} | {platform.python_version()} | {melange_sky.__version__} | "
          f"{pulp.__version__} | {matplotlib.__version__} | {os.getloadavg()[0]:.1f} |\n")

    config = load_config(EXAMPLE, price=catalog_pricer())
    sweep(config, RATES[:2])  # warm: PuLP and HiGHS imported, not timed
    print(f"## Library: `sweep()` on examples/example.json, 50 rates ({RATES[0]:g} to {RATES[-1]:g} req/s), "
          f"seconds over {args.runs} runs\n")
    print("| formulation | fleets solved | median | min | max | ms per fleet | < 5 s |")
    print("|---|---|---|---|---|---|---|")
    slices_result = None
    for formulation in ("slices", "split", "paper"):
        seconds, result = timed(lambda f=formulation: sweep(config, RATES, f), args.runs)
        assert isinstance(result, Sweep)
        slices_result = slices_result or result
        n = fleets(result)
        print(f"| {formulation} | {n} | {stats(seconds)} | {1000 * statistics.median(seconds) / n:.1f} | "
              f"{'yes' if max(seconds) < TARGET_SECONDS else 'NO'} |", flush=True)
    assert slices_result is not None

    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "sweep.png"
        plot_sweep(slices_result, png)  # warm: matplotlib's font cache and Agg
        seconds, _ = timed(lambda: plot_sweep(slices_result, png), args.runs)
        print(f"\n## Figure: `plot_sweep()` of that sweep to a PNG ({png.stat().st_size // 1024} KiB)\n")
        print("| median s | min s | max s |\n|---|---|---|")
        print(f"| {stats(seconds)} |\n", flush=True)

        print("## `melange-sky sweep` as a command (wall seconds, Python start-up and imports included)\n")
        print("| command | median | min | max | < 5 s |\n|---|---|---|---|---|")
        base = [sys.executable, "-m", "melange_sky", "sweep", str(EXAMPLE), "--from", "2", "--to", "100",
                "--steps", "50"]
        for label, argv in (("--from 2 --to 100 --steps 50", base),
                            ("... --plot sweep.png", [*base, "--plot", str(png)])):
            seconds, _ = timed(lambda a=argv: subprocess.run(a, check=True, capture_output=True), args.runs)
            print(f"| `{label}` | {stats(seconds)} | {'yes' if max(seconds) < TARGET_SECONDS else 'NO'} |",
                  flush=True)

    print(f"\nLoad average (1 min) after these: {os.getloadavg()[0]:.1f} (other processes share the cores).")
    if args.no_large:
        return
    large = load_instance(1)
    rates = rate_range(0.25 * large.total_request_rate, 2.5 * large.total_request_rate, 10)
    options = SolverOptions(time_limit=LARGE_TIME_LIMIT)
    print(f"\n## Large: solve_bench seed 1 ({len(large.buckets)} buckets, {len(large.gpus)} offers, slice_factor "
          f"{large.slice_factor}), 10 rates from {rates[0]:.3g} to {rates[-1]:.3g} req/s, one run\n")
    print("| formulation | fleets solved | seconds | slowest rate s | all optimal |")
    print("|---|---|---|---|---|")
    for formulation in ("slices", "split"):
        result = sweep(large, rates, formulation, options)
        optimal = all(p.mix.status == "optimal" and p.split.status == "optimal" for p in result.points)
        print(f"| {formulation} | {fleets(result)} | {result.seconds:.2f} | "
              f"{max(p.seconds for p in result.points):.2f} | {'yes' if optimal else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
