"""Human-readable text for results, and JSON files written the same way everywhere. No printing here."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import OutputError
from .solver import SolveResult


def format_solve(result: SolveResult) -> str:
    """The `melange-sky solve` report: the fleet, single-GPU baselines, the saving, and a cheaper alternative."""
    lines = [f"Fleet for {result.name}: formulation {result.formulation}, slice_factor {result.slice_factor}, "
             f"{result.total_request_rate:g} req/s, headroom {100 * result.headroom:g}%", ""]
    width = max([len("GPU")] + [len(g.name) for g in result.gpus])
    lines.append(f"  {'GPU':<{width}}  {'count':>5}  {'$/h each':>8}  {'$/h':>8}  {'utilisation':>11}")
    for g in result.gpus:
        util = "-" if g.utilisation is None else f"{100 * g.utilisation:.1f}%"
        lines.append(f"  {g.name:<{width}}  {g.count:>5}  {g.price:>8.2f}  {g.cost:>8.2f}  {util:>11}")
    total = sum(g.count for g in result.gpus)
    lines.append(f"  {'total':<{width}}  {total:>5}  {'':>8}  {result.cost:>8.2f}")

    lines += ["", "Single-GPU-type fleets:"]
    best = result.best_baseline
    for b in result.baselines:
        if b.cost is None:
            lines.append(f"  {b.gpu:<{width}}  cannot serve alone: {b.reason}")
        else:
            mark = "  <- cheapest" if best is not None and b.gpu == best.gpu else ""
            lines.append(f"  {b.gpu:<{width}}  {b.count:>5} x ${result_price(result, b.gpu):.2f} = "
                         f"${b.cost:.2f}/h{mark}")
    if best is None:
        lines.append("No single GPU type can serve this workload alone: the mix is the only fleet.")
    elif result.saving > 1e-9:
        lines.append(f"The mix saves ${result.saving:.2f}/h ({100 * result.saving / best.cost:.1f}%) against "
                     f"{best.count} x {best.gpu}.")
    else:
        lines.append(f"No saving: the cheapest fleet is {best.count} x {best.gpu}.")

    alt = result.alternative
    if alt is not None:
        saving = result.cost - alt.cost
        fleet = " + ".join(f"{name} x{count}" for name, count in alt.counts.items() if count)
        lines.append(f"--formulation {alt.formulation} would cost ${alt.cost:.2f}/h (saves ${saving:.2f}/h, "
                     f"{100 * saving / result.cost:.1f}%): {fleet}, by dividing buckets across GPU types in any "
                     f"proportion.")
    lines.append("")
    lines.append(f"Solved by {result.solver} in {result.solve_seconds:.2f} s ({result.status}).")
    if result.status != "optimal" and result.lower_bound is not None:
        lines.append(f"Not proven optimal within the time limit: the optimum lies between "
                     f"${result.lower_bound:.2f}/h and ${result.cost:.2f}/h. Raise --time-limit to keep searching.")
    return "\n".join(lines)


def result_price(result: SolveResult, gpu: str) -> float:
    return next(g.price for g in result.gpus if g.name == gpu)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented JSON, atomically, so an interrupted run never leaves half a file."""
    write_text(path, json.dumps(data, indent=4) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` atomically (temporary file, then rename), so an interrupted run never leaves half a file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
