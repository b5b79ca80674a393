"""Does `melange-sky profile` against `melange-sky emulate` find the rate `melange-sky estimate` predicts?

    python bench/emulate_agreement.py [--model llama-3.1-8b] [--gpus L4,A10G] [--speed 1] [--write]

Per GPU type: an emulator of the model on it (`melange-sky emulate`, its own process), profiled bucket by bucket
(`melange_sky.inputs.profile.profile_endpoint`: Poisson arrivals, steady state, the fitted SLO crossing), and the
table-mode estimate of the same buckets (`melange_sky.engine.estimate.max_rates`, the engine on a virtual clock)
for seed 0 (what `estimate` prints) and for --seeds seeds (its spread: each seed is one Poisson sample per rate
tried). Both answer the same question with the same representative lengths and SLO statistic; `emulate` and
`estimate` run one engine model on two clocks, so the difference is the two searches' precision.
At --speed X the emulator's step times are divided by X and the SLO with them; rates are reported at speed 1.
--write appends the table (with the machine's load average at the start and the end) to bench/results/emulate.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from emulate_bench import engine_version  # bench/, the script's directory

from melange_sky.core.slo import Slos, bucket_tokens
from melange_sky.engine import load_model
from melange_sky.engine.estimate import max_rates
from melange_sky.inputs.profile import profile_endpoint
from melange_sky.inputs.profile_result import ProfileSettings

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "emulate.md"


def start_emulator(model: str, gpu: str, speed: float) -> tuple[subprocess.Popen, str]:
    """`melange-sky emulate` on a free port: (the process, its URL) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "melange_sky", "emulate", "--model", model, "--gpu", gpu,
                             "--port", "0", "--speed", f"{speed:g}"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own autogroup: not weighed with the busy profiler
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise SystemExit(f"the emulator of {model} on {gpu} did not start")
        if line.startswith("Listening on "):
            return proc, line.split()[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--gpus", default="L4,A10G")
    parser.add_argument("--input-edges", default="100,200,800,1600")
    parser.add_argument("--output-edges", default="25,50")
    parser.add_argument("--tpot-slo-ms", type=float, default=120.0)
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=8, help="estimate seeds for its spread")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="profile time cap per bucket")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    model = load_model(args.model)
    in_edges = [int(x) for x in args.input_edges.split(",")]
    out_edges = [int(x) for x in args.output_edges.split(",")]
    slos = Slos(tpot_ms=args.tpot_slo_ms)
    args.load_start = os.getloadavg()  # the machine is shared: its load goes with the table
    rows = []
    for gpu in args.gpus.split(","):
        tables = [max_rates(model, [gpu], in_edges, out_edges, slos, seed=seed)[gpu] for seed in range(args.seeds)]
        proc, url = start_emulator(args.model, gpu, args.speed)
        try:
            for i in range(len(in_edges) - 1):
                for j in range(len(out_edges) - 1):
                    rates = [t.tputs[i][j] for t in tables if t.tputs]
                    mean = statistics.fmean(rates)
                    prompt, output = bucket_tokens((in_edges[i], in_edges[i + 1]), (out_edges[j], out_edges[j + 1]))
                    settings = ProfileSettings(tpot_slo_ms=args.tpot_slo_ms / args.speed,
                                               start_rate=0.5 * mean * args.speed, max_rate=4 * mean * args.speed,
                                               min_rate=0.01, bisect_steps=3, max_minutes=args.max_minutes,
                                               request_timeout=600)
                    began = time.monotonic()
                    result = profile_endpoint(url, args.model, input_edges=in_edges, output_edges=out_edges,
                                              cells=[(i, j)], settings=settings)
                    bucket = next(b for b in result.buckets if b.cell == (i, j))
                    row = {"gpu": gpu, "prompt": prompt, "output": output, "estimate": rates[0],
                           "mean": mean, "sd": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                           "profile": bucket.tput / args.speed, "status": str(bucket.status),
                           "headroom": bucket.headroom, "steps": len(bucket.steps),
                           "minutes": (time.monotonic() - began) / 60, "message": bucket.message}
                    rows.append(row)
                    print(f"{gpu} {prompt}/{output}: estimate {row['estimate']:.3g} (seeds: {mean:.3g} ± "
                          f"{row['sd']:.2g}), profile of emulate {row['profile']:.3g} ({row['status']}, "
                          f"{row['steps']} steps, {row['minutes']:.1f} min): {row['message']}", flush=True)
        finally:
            proc.terminate()
            proc.wait()
    args.load_end = os.getloadavg()
    table = _table(rows, args)
    print(table)
    if args.write:
        text = RESULTS.read_text()
        marker = "<!-- agreement rows -->\n"
        RESULTS.write_text(text.replace(marker, marker + table + "\n", 1))


def _load(averages: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in averages)


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{time.strftime('%Y-%m-%d')}, engine {engine_version()}: {args.model}, mean TPOT <= "
             f"{args.tpot_slo_ms:g} ms, emulate at speed {args.speed:g} (rates at speed 1), estimate over "
             f"{args.seeds} seeds. Load average (1/5/15 min) {_load(args.load_start)} at the start, "
             f"{_load(args.load_end)} at the end.", "",
             "| GPU | prompt / output | estimate (seed 0) | estimate seeds mean ± sd | profile of emulate | profile / "
             "estimate | profile / seeds mean | profile status, steps, minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpu']} | {r['prompt']} / {r['output']} | {r['estimate']:.3g} | {r['mean']:.3g} ± "
                     f"{r['sd']:.2g} ({100 * r['sd'] / r['mean']:.0f}%) | {r['profile']:.3g} | "
                     f"{r['profile'] / r['estimate']:.3f} | {r['profile'] / r['mean']:.3f} | {r['status']}, "
                     f"{r['steps']}, {r['minutes']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
