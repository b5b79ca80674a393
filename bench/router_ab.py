"""Two versions of the router on the same core, alternating: did a change cost CPU on the hot path?

    git worktree add /tmp/before HEAD~5       # or: mkdir /tmp/before && git archive REV | tar -x -C /tmp/before
    python bench/router_ab.py /tmp/before .   # A = the first tree, B = the second
    python bench/router_ab.py A B --trials 8 --duration 5 -o bench/results/router_ab.md

Each tree's `melange-sky serve` (run with PYTHONPATH=TREE) is pinned to core 0, with the same config, upstreams and
load generator as `router_bench.py` (whose machinery this reuses; the upstreams and load run on core 1). Trials
alternate A and B (and which goes first), non-streaming and streaming, closed loop. The figure to read is CPU time
per request (the router process's own, from /proc): on a machine other work shares, it holds up far better than
req/s, and the paired difference per trial (B - A, same moment) better still.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import router_bench as rb  # noqa: E402 - the bench's own machinery, next to this file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="the first source tree (A)")
    parser.add_argument("b", type=Path, help="the second source tree (B)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("-o", "--output", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args()
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    for tree in trees.values():
        if not (tree / "melange_sky" / "cli" / "serve.py").is_file():
            raise SystemExit(f"{tree} is not a melange-sky source tree")
    os.sched_setaffinity(0, {rb.LOAD_CPU})
    wrk = rb._find_wrk(False)
    pin_router, pin_load = ["taskset", "-c", str(rb.ROUTER_CPU)], ["taskset", "-c", str(rb.LOAD_CPU)]
    base = {k: v for k, v in os.environ.items()
            if k not in ("MELANGE_SKY_API_KEY", "MELANGE_SKY_UPSTREAM_API_KEY", "PYTHONPATH")}
    cpu: dict[tuple[str, bool], list[float]] = {(n, s): [] for n in trees for s in (False, True)}
    rate: dict[tuple[str, bool], list[float]] = {(n, s): [] for n in trees for s in (False, True)}
    foreign: list[float] = []
    with tempfile.TemporaryDirectory(prefix="router-ab-") as tmp, rb.Processes(Path(tmp)) as procs:
        work = Path(tmp)
        env = {**base, "MELANGE_SKY_HOME": str(work / "home"), "PYTHONPATH": str(trees["B"])}
        line, upstream_pid = procs.start("upstreams", [*pin_load, sys.executable, rb.__file__, "--role", "upstream",
                                                       "--ports", str(len(rb.REPLICA_GPUS))], "PORTS", env)
        ports = [int(p) for p in line.split()[1:]]
        config = work / "router-ab.json"
        config.write_text(json.dumps(rb.CONFIG))
        targets: dict[str, int] = {}
        own = {p: upstream_pid for p in ports}
        for name, tree in trees.items():
            line, pid = procs.start(name, [*pin_router, sys.executable, "-m", "melange_sky.cli", "serve", "--config",
                                           str(config), "--formulation", "split", "--port", "0",
                                           *rb._replica_args([f"http://127.0.0.1:{p}" for p in ports])],
                                    "Listening on", {**env, "PYTHONPATH": str(tree)})
            targets[name] = int(line.split()[2].rsplit(":", 1)[1])
            own[targets[name]] = pid
        loader = rb.Loader(wrk, work, pin_load, 500_000, own)
        for port in targets.values():  # warm-up
            loader.run(port, rb._body(False), args.connections, 1.0)
            loader.run(port, rb._body(True), args.connections, 1.0, check="sse")
        for trial in range(args.trials):
            for stream in (False, True):
                order = list(targets.items())
                for name, port in order if trial % 2 == 0 else order[::-1]:
                    run = loader.run(port, rb._body(stream), args.connections, args.duration,
                                     check="sse" if stream else "json")
                    cpu[(name, stream)].append(run.cpu_us)
                    rate[(name, stream)].append(run.rate)
                    foreign.append(run.foreign_pct)
                    rb.progress(f"  trial {trial + 1}/{args.trials} {'stream' if stream else 'plain '} {name} "
                                f"{run.rate:8,.0f} req/s  {run.cpu_us:6.1f} µs CPU/req  errors {run.error_count}  "
                                f"other load {run.foreign_pct:3.0f}%")
    lines = [f"# The router, A against B, on one core ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)", "",
             f"`python bench/router_ab.py A B --trials {args.trials} --duration {args.duration:g}`: A = `{trees['A']}`,"
             f" B = `{trees['B']}`; {args.connections} connections, closed loop, trials alternating A and B. Other "
             f"load (CPU that processes outside the benchmark used, % of both cores): median "
             f"{statistics.median(foreign):.0f}%, worst {max(foreign):.0f}%.", "",
             "| | CPU/req A | CPU/req B | B / A | paired B − A (median, range) | req/s A | req/s B |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for stream in (False, True):
        a, b = cpu[("A", stream)], cpu[("B", stream)]
        paired = [y - x for x, y in zip(a, b, strict=True)]
        lines.append(f"| {'streaming (32 events)' if stream else 'non-streaming'} | {statistics.median(a):.0f} µs | "
                     f"{statistics.median(b):.0f} µs | {statistics.median(b) / statistics.median(a):.3f} | "
                     f"{statistics.median(paired):+.1f} µs ({min(paired):+.0f} … {max(paired):+.0f}) | "
                     f"{statistics.median(rate[('A', stream)]):,.0f} | {statistics.median(rate[('B', stream)]):,.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
