"""How faithful `melange-sky simulate` is to a real fleet: a local fleet of `melange-sky emulate` replicas of two GPU
types behind `melange-sky serve` (the real router), `replay`ed at several loads, and `simulate`d on the same traces.

The plan is bench/data/sim_fidelity.json (llama-3.1-8b; tputs from `melange-sky estimate --gpus A10G,L4
--tpot-slo-ms 80`; 2x2 buckets up to 1024 prompt and 256 output tokens), solved at its 10 req/s: 1 A10G + 2 L4.
Its *capacity* is the rate at which its busiest GPU type reaches 100% of its planned load (the solve's rate over
that type's utilisation). Each point is a trace of --duration seconds (Poisson arrivals with sizes from the config's
histogram, seed per point; steady, or in bursts of 2x the mean for a third of every 90 s and 0.5x between) at a
share of that capacity.

Everything runs --speed times faster than real time (each emulator with `--speed X`, the trace's timestamps divided
by X, `simulate --speed X`), so a point of 180 s of traffic takes 180 / X s; the SLOs (TPOT <= 100 ms and TTFT <= 2 s
per request) are divided by X too. Each request goes through the router as a prompt of token ids (`replay --prompt
ids`), so the router counts its prompt exactly, as `simulate` gives its policy the exact sizes.

Compared per point (issue 18's bar): attainment within 2 points below 95% of capacity and within 5 above; p50 and
p90 TPOT within 10%; p50 TTFT within 20%; the same verdict (target 99%).

Pinned where `taskset` exists: the emulators and the router on core 0, `replay` (then `simulate`) on core 1.
    python bench/sim_fidelity.py                       # the full run (~12 min at --speed 2)
    python bench/sim_fidelity.py --points steady:0.5,bursty:0.9 --duration 60     # a quick look
    python bench/sim_fidelity.py --write               # + bench/results/sim_fidelity.md
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from melange_sky.core.attainment import RequestRecord
from melange_sky.core.config import load_config
from melange_sky.core.slo import Slos, percentile
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.deploy.plan import PlanSettings
from melange_sky.inputs.arrivals import Burst, poisson_arrivals, trace_arrivals
from melange_sky.inputs.replay import PromptKind, ReplaySettings, replay
from melange_sky.serve.routes import Routes, bucket_edges
from melange_sky.sim import plan_from_config, simulate

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "data", "sim_fidelity.json")
RESULTS = os.path.join(HERE, "results", "sim_fidelity.md")
#: Per request, in real time (divided by --speed). Looser than the 80 ms mean TPOT the tputs were estimated at, so
#: that the lighter points meet the 99% target and the heavier miss it: the verdicts differ from point to point.
TPOT_SLO_MS, TTFT_SLO_MS = 100.0, 2000.0
BURST = Burst(2.0, 30.0, 90.0)  # in real time: divided by --speed
POINTS = "steady:0.5,steady:0.7,steady:0.85,steady:1.0,steady:1.1,bursty:0.5,bursty:0.7,bursty:0.85"
EPOCH = 1_765_000_000.0
MELANGE = [sys.executable, "-m", "melange_sky"]


@dataclass(frozen=True)
class Point:
    shape: str  # steady | bursty
    load: float  # share of the plan's capacity (the mean, for bursty)
    seed: int


def capacity(routes: Routes, counts: dict[str, int]) -> tuple[float, str]:
    """The rate at which the busiest GPU type reaches its count: each type's load per req/s is the sum over buckets
    of the bucket's share of traffic x the routing table's share for the type / the type's tput there."""
    dist = routes.distribution
    total = sum(sum(row) for row in dist)
    per_rate: dict[str, float] = {}
    for (i, j), shares in routes.shares.items():
        for gpu, share in shares.items():
            route = routes.gpu(gpu)
            assert route is not None and route.tputs is not None
            if share > 0:
                per_rate[gpu] = per_rate.get(gpu, 0.0) + dist[i][j] / total * share / route.tputs[i][j]
    limits = {gpu: counts[gpu] / load for gpu, load in per_rate.items()}
    gpu = min(limits, key=limits.__getitem__)
    return limits[gpu], gpu


def pin(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else []


def start(args: list[str], log: str) -> tuple[subprocess.Popen, str]:
    """A server subprocess; (it, its URL) once it prints "Listening on URL"."""
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Listening on "):
            return proc, line.split()[2]
    proc.wait()
    raise RuntimeError(f"{' '.join(args)} did not start: see {log}")


def write_trace(path: str, times: list[float], prompts: list[int], outputs: list[int], speed: float) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "input_len", "output_len"])
        for t, p, o in zip(times, prompts, outputs):
            writer.writerow([f"{EPOCH + t / speed:.6f}", p, o])


def paired(replayed: list[RequestRecord], simulated: list[RequestRecord]) -> dict[str, Any]:
    """Request by request (both in arrival order): how much later replay's TTFT and TPOT were than the simulation's
    (ms; p10, p50, p90 of the differences), and how many requests went to another GPU type."""
    assert len(replayed) == len(simulated)
    ttft, tpot, moved = [], [], 0
    for r, s in zip(replayed, simulated):
        moved += r.gpu != s.gpu
        if r.ok and s.ok and r.ttft_s is not None and s.ttft_s is not None:
            ttft.append(1000 * (r.ttft_s - s.ttft_s))
            if r.tpot_s is not None and s.tpot_s is not None:
                tpot.append(1000 * (r.tpot_s - s.tpot_s))
    ttft.sort()
    tpot.sort()
    return {"ttft_diff_ms": {q: round(percentile(ttft, p), 2) for q, p in (("p10", .1), ("p50", .5), ("p90", .9))},
            "tpot_diff_ms": {q: round(percentile(tpot, p), 3) for q, p in (("p10", .1), ("p50", .5), ("p90", .9))},
            "other_gpu": moved}


def rel(a: float | None, b: float | None) -> float | None:
    """(replay - simulate) / replay."""
    return None if a is None or b is None or a == 0 else (b - a) / a


def compare(point: Point, replayed: dict[str, Any], simulated: dict[str, Any]) -> dict[str, Any]:
    att_r, att_s = replayed["attainment"], simulated["attainment"]
    att_tol = 0.02 if point.load < 0.95 else 0.05
    checks = {
        "attainment": abs(att_r - att_s) <= att_tol + 1e-9,
        "tpot_p50": abs(rel(replayed["tpot_ms"]["p50"], simulated["tpot_ms"]["p50"]) or 0) <= 0.10,
        "tpot_p90": abs(rel(replayed["tpot_ms"]["p90"], simulated["tpot_ms"]["p90"]) or 0) <= 0.10,
        "ttft_p50": abs(rel(replayed["ttft_ms"]["p50"], simulated["ttft_ms"]["p50"]) or 0) <= 0.20,
        "verdict": replayed["meets_target"] == simulated["meets_target"],
    }
    return {"point": point.__dict__, "replay": replayed, "simulate": simulated, "checks": checks,
            "ok": all(checks.values())}


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def fmt_rel(a: float | None, b: float | None) -> str:
    r = rel(a, b)
    return "-" if r is None else f"{100 * r:+.0f}%"


def table(rows: list[dict[str, Any]], rate_at: dict[str, float]) -> list[str]:
    head = ("| point | req/s | requests | attainment replay / sim (diff) | TPOT p50 replay / sim | TPOT p90 replay / "
            "sim | TTFT p50 replay / sim | verdict replay / sim | within the bar | TTFT replay - sim, per request: "
            "p10 / p50 / p90 | machine load |")
    lines = [head, "|" + "---|" * 11]
    for row in rows:
        p, r, s, c = row["point"], row["replay"], row["simulate"], row["checks"]
        d = row["paired"]["ttft_diff_ms"]
        key = f"{p['shape']}:{p['load']:g}"
        missed = [name for name, ok in c.items() if not ok]
        lines.append(
            f"| {p['shape']} {100 * p['load']:.0f}% | {rate_at[key]:.2f} | {r['requests']:,} | "
            f"{100 * r['attainment']:.1f}% / {100 * s['attainment']:.1f}% "
            f"({100 * (s['attainment'] - r['attainment']):+.1f}) | "
            f"{fmt_ms(r['tpot_ms']['p50'])} / {fmt_ms(s['tpot_ms']['p50'])} "
            f"({fmt_rel(r['tpot_ms']['p50'], s['tpot_ms']['p50'])}) | "
            f"{fmt_ms(r['tpot_ms']['p90'])} / {fmt_ms(s['tpot_ms']['p90'])} "
            f"({fmt_rel(r['tpot_ms']['p90'], s['tpot_ms']['p90'])}) | "
            f"{fmt_ms(r['ttft_ms']['p50'])} / {fmt_ms(s['ttft_ms']['p50'])} "
            f"({fmt_rel(r['ttft_ms']['p50'], s['ttft_ms']['p50'])}) | "
            f"{'meets' if r['meets_target'] else 'misses'} / {'meets' if s['meets_target'] else 'misses'} | "
            f"{'yes' if row['ok'] else 'no: ' + ', '.join(missed)} | "
            f"{d['p10']:+.1f} / {d['p50']:+.1f} / {d['p90']:+.1f} ms | {row['load_average']:.1f} |")
    return lines


def per_gpu_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| point | GPU | requests replay / sim | attainment replay / sim | TTFT p50 replay / sim | "
             "TPOT p50 replay / sim | latency p90 replay / sim |", "|" + "---|" * 7]
    for row in rows:
        p, r, s = row["point"], row["replay"], row["simulate"]
        for gpu in sorted(set(r["per_gpu"]) | set(s["per_gpu"])):
            a, b = r["per_gpu"].get(gpu), s["per_gpu"].get(gpu)
            if a is None or b is None:
                lines.append(f"| {p['shape']} {100 * p['load']:.0f}% | {gpu} | {'-' if a is None else a['requests']}"
                             f" / {'-' if b is None else b['requests']} | | | | |")
                continue
            lines.append(
                f"| {p['shape']} {100 * p['load']:.0f}% | {gpu} | {a['requests']:,} / {b['requests']:,} | "
                f"{100 * a['attainment']:.1f}% / {100 * b['attainment']:.1f}% | "
                f"{fmt_ms(a['ttft_ms']['p50'])} / {fmt_ms(b['ttft_ms']['p50'])} | "
                f"{fmt_ms(a['tpot_ms']['p50'])} / {fmt_ms(b['tpot_ms']['p50'])} | "
                f"{fmt_ms(a['latency_ms']['p90'])} / {fmt_ms(b['latency_ms']['p90'])} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", type=float, default=2.0, help="emulators, traces and simulate this much faster")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of traffic per point (real time)")
    parser.add_argument("--points", default=POINTS, help="shape:load,... (load: share of the plan's capacity)")
    parser.add_argument("--write", action="store_true", help=f"write {os.path.relpath(RESULTS)}")
    parser.add_argument("--prompt", choices=["ids", "words"], default="ids", help="how replay sends prompts (words: "
                        "the router estimates their size from characters, as for most clients)")
    parser.add_argument("--keep", help="keep the traces, logs and JSON reports in this directory")
    args = parser.parse_args()
    speed = args.speed
    config = load_config(CONFIG, price=catalog_pricer())
    plan = plan_from_config(config, PlanSettings(compare=False), speed=speed)
    cap, binding = capacity(plan.routes, plan.counts)
    points = []
    for item in args.points.split(","):
        shape, _, load = item.partition(":")
        # the seed follows the point, not its place in --points: a point run alone offers the same trace
        points.append(Point(shape, float(load), seed=round(100 * float(load)) + (1000 if shape == "bursty" else 0)))
    work = args.keep or tempfile.mkdtemp(prefix="sim-fidelity-")
    os.makedirs(work, exist_ok=True)
    print(f"plan: {plan.describe()}; capacity {cap:.2f} req/s (binding: {binding}); speed x{speed:g}; "
          f"{args.duration:g} s of traffic per point ({args.duration / speed:g} s each); work in {work}", flush=True)
    procs: list[subprocess.Popen] = []
    rows: list[dict[str, Any]] = []
    rate_at: dict[str, float] = {}
    slos = Slos(tpot_ms=TPOT_SLO_MS / speed, ttft_ms=TTFT_SLO_MS / speed)
    in_edges, out_edges = bucket_edges(config)
    model = config.deployment.get("model") if isinstance(config.deployment, dict) else None
    try:
        replicas = []
        for k, spec in enumerate(plan.replicas):
            proc, url = start([*pin(0), *MELANGE, "emulate", "--model", str(model or "llama-3.1-8b"), "--gpu",
                               spec.gpu, "--config", CONFIG, "--speed", f"{speed:g}", "--port", "0"],
                              os.path.join(work, f"emulate-{k}.log"))
            procs.append(proc)
            replicas += ["--replica", f"{spec.gpu}={url}"]
        router, router_url = start([*pin(0), *MELANGE, "serve", "--config", CONFIG, *replicas, "--port", "0"],
                                   os.path.join(work, "serve.log"))
        procs.append(router)
        print(f"router {router_url} over {len(plan.replicas)} emulators", flush=True)
        if pin(1):  # replay and simulate run here, on the other core
            os.sched_setaffinity(0, {1})
        for point in points:
            rate = point.load * cap
            key = f"{point.shape}:{point.load:g}"
            rate_at[key] = rate
            routes = plan.routes
            arrivals = poisson_arrivals(rate, args.duration, routes.distribution, routes.input_edges,
                                        routes.output_edges, seed=point.seed,
                                        burst=BURST if point.shape == "bursty" else None)
            trace = os.path.join(work, f"{point.shape}-{point.load:g}.csv")
            write_trace(trace, arrivals.times, arrivals.prompts, arrivals.outputs, speed)
            offered = trace_arrivals(trace)  # the file both read, as `replay` and `simulate` would read it
            started = time.monotonic()
            measured = replay(offered, slos, ReplaySettings(endpoint=router_url, prompt=PromptKind(args.prompt),
                                                            input_edges=in_edges, output_edges=out_edges))
            replay_s = time.monotonic() - started
            modelled = simulate(plan, offered, slos)
            replayed, simulated = measured.to_json(), modelled.to_json()
            for name, doc in (("replay", replayed), ("simulate", simulated)):
                with open(os.path.join(work, f"{point.shape}-{point.load:g}.{name}.json"), "w") as handle:
                    json.dump(doc, handle, indent=1)
            row = compare(point, replayed, simulated)
            row["paired"] = paired(measured.records, modelled.records)
            row["load_average"] = os.getloadavg()[0]
            rows.append(row)
            lag = replayed["replay"]["send_lag_ms"]
            print(f"{key}: {rate:.2f} req/s, {replayed['requests']} requests in {replay_s:.0f} s (send lag p99 "
                  f"{lag['p99']:.1f} ms): attainment {100 * replayed['attainment']:.1f}% replayed, "
                  f"{100 * simulated['attainment']:.1f}% simulated; paired TTFT diff p50 "
                  f"{row['paired']['ttft_diff_ms']['p50']:+.1f} ms (load average {row['load_average']:.1f}); "
                  f"{'ok' if row['ok'] else 'MISS'}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    with open(os.path.join(work, "rows.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    lines = table(rows, rate_at)
    print()
    print("\n".join(lines))
    print()
    print("\n".join(per_gpu_lines(rows)))
    if args.write:
        write_results(rows, rate_at, lines, plan.describe(), cap, binding, speed, args.duration)
    return 0 if all(r["ok"] for r in rows) else 1


def write_results(rows: list[dict[str, Any]], rate_at: dict[str, float], lines: list[str], plan: str, cap: float,
                  binding: str, speed: float, duration: float) -> None:
    commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    load = os.getloadavg()[0]
    doc = [
        "# `simulate` against a fleet of emulators (bench/sim_fidelity.py)", "",
        f"Plan: `bench/data/sim_fidelity.json` solved at 10 req/s: {plan}; capacity {cap:.2f} req/s (where "
        f"{binding} reaches 100% of its planned load). Each point: {duration:g} s of Poisson traffic (sizes from "
        f"the config's histogram; bursty: 2x the mean for 30 s of every 90 s, 0.5x between) at a share of the "
        f"capacity, replayed through `melange-sky serve` to `melange-sky emulate` replicas and simulated with "
        f"`simulate` on the same trace. Everything at speed x{speed:g} (emulators, trace timestamps, `simulate "
        f"--speed`), so the times below are 1/{speed:g} of real time; SLOs per request TPOT <= "
        f"{TPOT_SLO_MS / speed:g} ms and TTFT <= {TTFT_SLO_MS / speed:g} ms ({TPOT_SLO_MS:g} ms and "
        f"{TTFT_SLO_MS / 1000:g} s in real time; the plan's tputs hold a mean TPOT of 80 ms), target 99%.", "",
        f"Run at commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, on the 2-core machine "
        f"shared with the other helpers (load average {load:.1f} at the end); emulators and router pinned to core "
        f"0, replay and simulate to core 1.", "",
        "The bar (issue 18): attainment within 2 points below 95% of capacity (5 above), p50 and p90 TPOT within "
        "10%, p50 TTFT within 20%, the same verdict. Differences are (simulate - replay) / replay.", "",
        *lines, "", "Per GPU type:", "", *per_gpu_lines(rows), "",
    ]
    with open(RESULTS, "w") as handle:
        handle.write("\n".join(doc))
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
