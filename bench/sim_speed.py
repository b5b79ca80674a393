"""How fast `melange-sky simulate` runs: one hour of 50 req/s (about 180,000 requests) across a 21-replica plan.

The plan is bench/data/sim_bench.json solved (llama-2-7b, tputs from `melange-sky estimate`, headroom 0.9, at most
12 A100-80GB: 4x A10G + 5x L4 + 12x A100-80GB, as the script's first line prints); arrivals are Poisson at 50 req/s
for --duration seconds with sizes from its histogram (seed 0). Prints the wall and CPU time, the engine steps
simulated, the attainment and the TTFT/TPOT percentiles, and with --compare also the same run stepped one step at a
time (no pure-decode runs), which must give the same answer.

Target (issue 18): <= 30 s on one core. The CPU time is printed beside the wall time: on a shared machine the wall
time includes the time other processes held the core. Run it pinned:
    taskset -c 0 python bench/sim_speed.py
    taskset -c 0 python bench/sim_speed.py --duration 600 --compare
    taskset -c 0 python bench/sim_speed.py --profile     # where the time goes (cProfile, top 20)
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

from melange_sky.core.config import load_config
from melange_sky.core.slo import Slos
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.serve.routes import bucket_edges
from melange_sky.sim import plan_from_config, poisson_arrivals, simulate

CONFIG = os.path.join(os.path.dirname(__file__), "data", "sim_bench.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--compare", action="store_true", help="also run without pure-decode runs (slower)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    config = load_config(CONFIG, price=catalog_pricer())
    t0 = time.perf_counter()
    plan = plan_from_config(config)
    in_edges, out_edges = bucket_edges(config)
    arrivals = poisson_arrivals(args.rate, args.duration, config.workload_distribution, in_edges, out_edges, seed=0)
    prep = time.perf_counter() - t0
    print(f"plan: {plan.describe()} ({len(plan.replicas)} replicas); {len(arrivals):,} arrivals "
          f"({arrivals.description}); solve + arrivals {prep:.2f} s")
    slos = Slos(tpot_ms=120)
    runs = [("runs of pure-decode steps as one event", True)] + ([("one event per step", False)] if args.compare
                                                                  else [])
    answers = []
    for label, skip in runs:
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
        started, cpu_started = time.perf_counter(), time.process_time()
        result = simulate(plan, arrivals, slos, skip=skip)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        if args.profile:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        report = result.report
        answers.append(report.to_json())
        print(f"{label}: {wall:.2f} s wall ({cpu:.2f} s CPU) for {result.end_s:,.0f} s simulated, "
              f"{result.steps:,} engine steps ({result.steps / wall / 1000:.0f}k steps/s), "
              f"{len(arrivals) / wall:,.0f} requests/s; attainment "
              f"{100 * report.attainment:.2f}%, TTFT p50/p99 {report.overall.ttft_ms.p50:.0f}/"
              f"{report.overall.ttft_ms.p99:.0f} ms, TPOT p50/p99 {report.overall.tpot_ms.p50:.1f}/"
              f"{report.overall.tpot_ms.p99:.1f} ms")
    if len(answers) == 2:
        same = answers[0]["attainment"] == answers[1]["attainment"] and answers[0]["ttft_ms"] == answers[1]["ttft_ms"]
        print("same answer both ways" if same else "DIFFERENT answers: a bug")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
