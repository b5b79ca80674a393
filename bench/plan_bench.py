"""Plan benchmark for melange-sky: what `melange-sky plan` costs beyond the solve, at 100+ replicas.

Run it from anywhere with the package installed (``pip install -e .``):

    python bench/plan_bench.py              # about 30 s on 2 cores
    python bench/plan_bench.py --runs 11    # more repetitions per measurement (medians)

Markdown goes to stdout, so ``python bench/plan_bench.py > plan_bench.md`` leaves just the report. It asserts
nothing; the target (issue 3) is rendering 100 replicas in under 1 s beyond the solve.

Instances: the original Mélange example (A10G + A100-80GB) with its request rate scaled (in steps of 300 req/s)
until the solve needs at least 100 replicas, once per GPU type (default offers) and once per offer (``--per-offer``,
four clouds, single-GPU instances priced by the catalog, at most 40 instances per offer, so the fleet spills over
several offers and clouds); each with the ``vllm`` and ``sglang`` templates.
Offers come from the bundled catalog snapshot, so results do not depend on a SkyPilot catalog on this machine.

Phases, each timed on its own (median of ``--runs``):

* bind: mapping GPU entries to catalog offers (``offers.bind_offers``; the catalog is read once, before timing);
* solve: the MILP alone (``solver.solve`` with ``compare=False``, as ``up`` re-plans);
* render: ``plan.make_plan``: one Jinja render + YAML parse per replica (template compiled once per process; the
  first, cold render is reported separately);
* write: ``plan.write_plan``: one task YAML per replica plus the two JSON files, into a fresh directory;
* beyond solve = bind + render + write: what ``plan`` adds to the solve;
* CLI: wall time of ``melange-sky plan`` as a subprocess (Python start-up and imports included, the solve too,
  with ``compare`` on as the command does).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2

import melange_sky
from melange_sky.core.config import parse_config
from melange_sky.deploy.catalog import Catalog
from melange_sky.deploy.offers import bind_offers
from melange_sky.deploy.plan import deployment_from_config, make_plan, write_plan
from melange_sky.deploy.render import _compile
from melange_sky.errors import InfeasibleAllocation
from melange_sky.solver.model import SolverOptions
from melange_sky.solver.result import solve

EXAMPLE = json.loads((Path(__file__).resolve().parent.parent / "examples" / "example.json").read_text())
TARGET_REPLICAS = 100
TARGET_SECONDS = 1.0
PER_OFFER_QUOTA = 40  # instances per offer: the cheapest offers fill up, the fleet spills over to the next ones
SOLVER = SolverOptions(time_limit=30)


def median_seconds(runs: int, action: Callable[[], Any]) -> tuple[float, Any]:
    """Median wall time of `runs` calls of `action`, and the last result."""
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def config_data(per_offer: bool, rate: float, template: str) -> dict:
    data = copy.deepcopy(EXAMPLE)
    data["name"] = "bench"
    data["total_request_rate"] = rate
    data["deployment"] = {"template": template}
    if per_offer:
        data["clouds"] = ["aws", "azure", "gcp", "lambda"]
        for gpu, entry in data["gpu_info"].items():
            entry.pop("cost", None)  # priced by the catalog, per offer
            entry["accelerators"] = f"{gpu}:1"  # single-GPU instances: one replica each
            entry["quotas"] = {cloud: PER_OFFER_QUOTA for cloud in data["clouds"]}
    return data


def build(per_offer: bool, rate: float, template: str, catalog: Catalog):
    config = parse_config(config_data(per_offer, rate, template), source="bench.json", catalog=catalog)
    return config, bind_offers(config, catalog, per_offer=per_offer)


def rate_for(per_offer: bool, catalog: Catalog) -> float:
    """The smallest rate (a multiple of 300 req/s) whose solve needs at least TARGET_REPLICAS replicas."""
    rate = 300.0
    while True:
        _, bound = build(per_offer, rate, "vllm", catalog)
        try:
            replicas = sum(g.count for g in solve(bound.config, options=SOLVER, compare=False).gpus)
        except InfeasibleAllocation as exc:
            sys.exit(f"plan_bench: no {TARGET_REPLICAS}-replica instance before the quotas run out: {exc}")
        if replicas >= TARGET_REPLICAS:
            return rate
        rate += 300.0


def measure(per_offer: bool, rate: float, template: str, catalog: Catalog, runs: int) -> dict[str, Any]:
    config, bound = build(per_offer, rate, template, catalog)
    bind_s, _ = median_seconds(runs, lambda: bind_offers(config, catalog, per_offer=per_offer))
    solve_s, result = median_seconds(runs, lambda: solve(bound.config, options=SOLVER, compare=False))
    deployment = deployment_from_config(bound.config)
    offers = {name: offer.to_dict() for name, offer in bound.offers.items()}

    _compile.cache_clear()  # the first render of a process compiles the template
    start = time.perf_counter()
    make_plan(bound.config, result, deployment, offers=offers)
    cold_s = time.perf_counter() - start
    render_s, plan = median_seconds(runs, lambda: make_plan(bound.config, result, deployment, offers=offers))

    with tempfile.TemporaryDirectory(prefix="plan-bench-") as tmp:
        counter = iter(range(10 ** 6))
        write_s, written = median_seconds(runs, lambda: write_plan(plan, Path(tmp) / str(next(counter))))
    return {"mode": "per offer" if per_offer else "per GPU type", "template": template, "rate": rate,
            "replicas": len(plan.replicas), "offers": len({r.offer for r in plan.replicas}),
            "clouds": len(plan.clouds), "files": len(written), "bind": bind_s, "solve": solve_s, "cold": cold_s,
            "render": render_s, "write": write_s, "beyond": bind_s + render_s + write_s}


def cli_seconds(per_offer: bool, rate: float, runs: int) -> float:
    """Median wall time of the `melange-sky plan` command on that config, as a user runs it."""
    with tempfile.TemporaryDirectory(prefix="plan-bench-cli-") as tmp:
        path = Path(tmp) / "bench.json"
        path.write_text(json.dumps(config_data(per_offer, rate, "vllm")))
        env = {**os.environ, "HOME": tmp}  # no SkyPilot catalog there: the bundled snapshot, as above
        args = [sys.executable, "-m", "melange_sky.cli", "plan", str(path), "-o", str(Path(tmp) / "out")]
        if per_offer:
            args.append("--per-offer")
        seconds, _ = median_seconds(runs, lambda: subprocess.run(args, env=env, check=True, capture_output=True))
    return seconds


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="repetitions per measurement (median); default 7")
    args = parser.parse_args(argv)
    catalog = Catalog(skypilot_dir=None)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.1f}"

    print("# melange-sky plan benchmark\n")
    print(markdown_table(["cores", "CPU", "Python", "melange-sky", "Jinja2"],
                         [[os.cpu_count(), cpu_model(), platform.python_version(), melange_sky.__version__,
                           jinja2.__version__]]))
    rows, cli_rows = [], []
    for per_offer in (False, True):
        rate = rate_for(per_offer, catalog)
        for template in ("vllm", "sglang"):
            m = measure(per_offer, rate, template, catalog, args.runs)
            rows.append([m["mode"], m["template"], f"{m['rate']:g}", m["replicas"], m["offers"], m["clouds"],
                         ms(m["solve"]), ms(m["bind"]), ms(m["cold"]), ms(m["render"]), ms(m["write"]),
                         ms(m["beyond"]), "yes" if m["beyond"] < TARGET_SECONDS else "**no**"])
        cli_rows.append(["per offer" if per_offer else "per GPU type", f"{rate:g}",
                         f"{cli_seconds(per_offer, rate, max(3, args.runs // 2)):.2f}"])
    print(f"\n## Beyond the solve, {TARGET_REPLICAS}+ replicas (median of {args.runs} runs, milliseconds)\n")
    print(markdown_table(["mode", "template", "req/s", "replicas", "offers", "clouds", "solve", "bind",
                          "render (cold)", "render", "write", "beyond solve", f"< {TARGET_SECONDS:g} s"], rows))
    print("\n## `melange-sky plan` as a command (seconds, wall, Python start-up and compare solves included)\n")
    print(markdown_table(["mode", "req/s", "wall s"], cli_rows))


if __name__ == "__main__":
    main()
