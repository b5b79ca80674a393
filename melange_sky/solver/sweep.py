"""A cost sweep over request rates: what the cheapest mix and each single GPU type cost as traffic grows.

Every rate is solved in this process by what the `solve` command's `solve()` runs (`solve_fleet` under the config's
formulation, then `split`, and its `baselines` once), so a sweep's row at rate r is exactly what `solve --rate r`
reports. A rate no fleet fits is a row marked infeasible with its reason, not an error. `plot_sweep` draws the
Mélange paper's cost-vs-rate figure with the fleet's composition beneath; matplotlib is an optional extra
(`melange-sky[plot]`), imported only to draw.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from melange_sky._io import write_bytes
from melange_sky.core.config import Config, with_overrides
from melange_sky.errors import ConfigError, InfeasibleAllocation, OutputError
from melange_sky.solver.model import Formulation, SharedCap, SolverOptions, resolve_formulation
from melange_sky.solver.result import SAME_COST, Baseline, SolveResult, baselines, solve_fleet

#: More rates than this is a typo (a --steps of 10000), not a figure anyone can read.
MAX_RATES = 1000
#: Steps of the default range: --to defaults to twice the config's rate, --from to its first step.
DEFAULT_STEPS = 20
PLOT_EXTRA = "pip install 'melange-sky[plot]'"


@dataclass(frozen=True)
class MixCost:
    """The cheapest mix under one formulation at one rate, or why none fits (`cost` None, `reason` set)."""

    formulation: Formulation
    cost: float | None
    counts: dict[str, int]  # GPUs (or instances, per offer column) of the fleet; empty when infeasible
    status: str  # optimal, feasible (time limit hit before the proof) or infeasible
    reason: str | None = None

    @property
    def feasible(self) -> bool:
        return self.cost is not None

    def to_dict(self) -> dict[str, Any]:
        return {"formulation": str(self.formulation), "cost": None if self.cost is None else round(self.cost, 6),
                "counts": dict(self.counts), "status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class SweepPoint:
    """One rate of a sweep: the mix (the config's formulation), the `split` mix and every single-type fleet."""

    rate: float
    mix: MixCost
    split: MixCost  # the same record as `mix` when the sweep's formulation is split
    baselines: list[Baseline]
    seconds: float

    @property
    def best_baseline(self) -> Baseline | None:
        feasible = [b for b in self.baselines if b.cost is not None]
        return min(feasible, key=lambda b: b.cost or 0.0) if feasible else None

    @property
    def saving(self) -> float | None:
        """$/h the mix saves against the cheapest single-GPU-type fleet (None when either is infeasible)."""
        best = self.best_baseline
        if best is None or best.cost is None or self.mix.cost is None:
            return None
        saving = best.cost - self.mix.cost
        return 0.0 if abs(saving) < SAME_COST else saving

    def to_dict(self) -> dict[str, Any]:
        best, saving = self.best_baseline, self.saving
        return {
            "rate": self.rate,
            "mix": self.mix.to_dict(),
            "split": self.split.to_dict(),
            "baselines": [asdict(b) for b in self.baselines],
            "best_baseline": best.gpu if best else None,
            "saving": None if saving is None else round(saving, 6),
            "saving_pct": (None if saving is None or best is None or not best.cost
                           else round(100 * saving / best.cost, 2)),
            "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True)
class Sweep:
    """A whole sweep: its settings, the GPU columns in the config's order and one point per rate, ascending."""

    name: str
    source: str
    formulation: Formulation
    solver: str
    headroom: float
    slice_factor: int
    gpus: list[str]  # the solver's columns (GPU types, or offers with --per-offer), in the config's order
    types: dict[str, str]  # column -> the GPU type it belongs to (the baselines' labels)
    points: list[SweepPoint]
    seconds: float
    instance_gpus: dict[str, int] = field(default_factory=dict)  # column -> GPUs per instance (counts are instances)

    @property
    def rates(self) -> list[float]:
        return [p.rate for p in self.points]

    @property
    def baseline_names(self) -> list[str]:
        """Every single-type fleet any point reports, in the order the solver reports them."""
        names: list[str] = []
        for point in self.points:
            names += [b.gpu for b in point.baselines if b.gpu not in names]
        return names

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.source, "formulation": str(self.formulation),
                "solver": self.solver, "headroom": self.headroom, "slice_factor": self.slice_factor,
                "gpus": list(self.gpus), "types": dict(self.types), "instance_gpus": dict(self.instance_gpus),
                "seconds": round(self.seconds, 4),
                "points": [p.to_dict() for p in self.points]}


def parse_rates(text: str, option: str = "--rates") -> list[float]:
    """Comma-separated request rates ("1,2,5,10"), checked by `check_rates`."""
    rates = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            rates.append(float(part))
        except ValueError:
            raise ConfigError(option, None, f"{part!r} is not a number (expected req/s like 1,2,5,10)") from None
    return check_rates(rates, option)


def rate_range(start: float, stop: float, steps: int, log: bool = False) -> list[float]:
    """`steps` rates from `start` to `stop` inclusive, evenly spaced (geometrically with `log`)."""
    _check_steps(steps)
    if not (math.isfinite(start) and start > 0):
        raise ConfigError("--from", None, f"must be a positive number of req/s, got {start:g}")
    if not (math.isfinite(stop) and stop > start):
        raise ConfigError("--to", None, f"must be above --from ({start:g} req/s), got {stop:g}")
    if log:
        rates = [start * (stop / start) ** (k / (steps - 1)) for k in range(steps)]
    else:
        rates = [start + (stop - start) * k / (steps - 1) for k in range(steps)]
    rates[-1] = stop  # no 59.99999999 for 60
    return [_tidy(r) for r in rates]


def default_range(config: Config, start: float | None = None, stop: float | None = None, steps: int | None = None,
                  log: bool = False) -> list[float]:
    """The rates of `--from/--to/--steps`, any of them left out: `--to` twice the config's rate (or twice --from),
    `--steps` `DEFAULT_STEPS`, `--from` the first step (3, 6, ..., 60 req/s for a 30 req/s config; with `log`,
    two decades below --to)."""
    steps = DEFAULT_STEPS if steps is None else steps
    _check_steps(steps)
    if stop is None:
        stop = 2 * max(config.total_request_rate, start or 0.0)
    if start is None:
        start = stop / 100 if log else stop / steps
    return rate_range(start, stop, steps, log)


def _check_steps(steps: int) -> None:
    if steps < 2:
        raise ConfigError("--steps", None, f"must be at least 2 (both ends), got {steps}; for one rate use --rates")
    if steps > MAX_RATES:
        raise ConfigError("--steps", None, f"at most {MAX_RATES} rates, got {steps}")


def sweep_rates(config: Config, rates: str | None = None, start: float | None = None, stop: float | None = None,
                steps: int | None = None, log: bool = False) -> list[float]:
    """The rates the command asked for: `--rates` as listed, or `--from/--to/--steps` (see `default_range`)."""
    if rates is not None:
        ranged = [name for name, given in (("--from", start is not None), ("--to", stop is not None),
                                           ("--steps", steps is not None), ("--log", log)) if given]
        if ranged:
            raise ConfigError("--rates", None, f"give either --rates or {'/'.join(ranged)}, not both")
        return parse_rates(rates)
    return default_range(config, start, stop, steps, log)


def check_rates(rates: list[float], option: str = "--rates") -> list[float]:
    """Rates as a sweep takes them: positive, finite, at most `MAX_RATES`, ascending without repeats."""
    if not rates:
        raise ConfigError(option, None, "no rates given (expected req/s like 1,2,5,10)")
    bad = next((r for r in rates if not (math.isfinite(r) and r > 0)), None)
    if bad is not None:
        raise ConfigError(option, None, f"rates must be positive req/s, got {bad:g}")
    unique = sorted(set(rates))
    if len(unique) > MAX_RATES:
        raise ConfigError(option, None, f"at most {MAX_RATES} rates, got {len(unique)}")
    return unique


def sweep(config: Config, rates: list[float], formulation: Formulation | str = Formulation.SLICES,
          options: SolverOptions = SolverOptions(), caps: Sequence[SharedCap] = (),
          max_replicas: int | None = None) -> Sweep:
    """Solve `config` at every rate (in this process): the mix under `formulation`, the `split` mix and the
    single-GPU-type fleets, as `solve` reports them. `caps` are the shared quotas of a config bound to offers (see
    `solve`). A fleet that does not fit, or has more than `max_replicas` instances (the mix's or a single GPU
    type's), is infeasible at that rate with its reason, not an error."""
    formulation = resolve_formulation(config, formulation)
    rates = check_rates(list(rates))
    started = time.perf_counter()
    points = []
    instance_gpus = {g.name: 1 for g in config.gpus}
    for rate in rates:
        at_rate = with_overrides(config, rate=rate)
        begun = time.perf_counter()
        mix, result = _mix(at_rate, formulation, options, caps, max_replicas)
        split = (mix if formulation is Formulation.SPLIT
                 else _mix(at_rate, Formulation.SPLIT, options, caps, max_replicas)[0])
        found = _within_replicas(baselines(at_rate, formulation, options, caps),  # once per rate: the mix's
                                 max_replicas)
        if result is not None:
            instance_gpus.update({g.name: g.gpus_per_instance for g in result.gpus})
        points.append(SweepPoint(rate=rate, mix=mix, split=split, baselines=found,
                                 seconds=time.perf_counter() - begun))
    return Sweep(name=config.name, source=config.source, formulation=formulation, solver=options.name,
                 headroom=config.headroom, slice_factor=config.slice_factor, gpus=[g.name for g in config.gpus],
                 types={g.name: g.entry or g.name for g in config.gpus}, points=points,
                 seconds=time.perf_counter() - started, instance_gpus=instance_gpus)


def _mix(config: Config, formulation: Formulation, options: SolverOptions,
         caps: Sequence[SharedCap], max_replicas: int | None) -> tuple[MixCost, SolveResult | None]:
    try:
        result = solve_fleet(config, formulation, options, caps, max_replicas)
    except InfeasibleAllocation as exc:
        return MixCost(formulation, None, {}, "infeasible", _reason(str(exc), config.source)), None
    return MixCost(formulation, result.cost, {k: v for k, v in result.counts.items() if v}, str(result.status)), result


def _within_replicas(found: list[Baseline], max_replicas: int | None) -> list[Baseline]:
    """Single-GPU-type fleets above `max_replicas` instances are infeasible at this rate, as the mix is: a sweep
    never prints a fleet the command would refuse to plan."""
    if max_replicas is None:
        return found
    return [dataclasses.replace(b, count=None, cost=None, counts={},
                                reason=f"needs {_count(b.count)} replicas, above --max-replicas {max_replicas:,}")
            if b.count is not None and b.count > max_replicas else b for b in found]


def _count(count: int) -> str:
    """A replica count for a message: 37,500, or 4e+307 for a count no one should read 300 digits of."""
    return f"{count:,}" if count < 1e15 else f"{count:.3g}"


def _reason(message: str, source: str) -> str:
    return message[len(source) + 2:] if message.startswith(f"{source}: ") else message


def _tidy(rate: float) -> float:
    """Round away float noise (2.9999999999999996 -> 3.0) while keeping real precision."""
    return float(f"{rate:.10g}")


# ---- the figure --------------------------------------------------------------------------------------------------
def _matplotlib() -> Any:
    """matplotlib's Agg figure (no pyplot, no GUI backend, no global state), or a one-line error naming the extra."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 - optional heavy extra, only for --plot
    except ImportError:
        raise OutputError(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}") from None
    return Figure


def check_plotting() -> None:
    """Raise the one-line `OutputError` before any solving when `--plot` cannot draw."""
    _matplotlib()


def plot_sweep(result: Sweep, path: str | os.PathLike[str]) -> None:
    """Draw the cost-vs-rate figure (the mix, split and each single GPU type, $/h) above the mix's composition per
    rate (stacked GPUs per type) and write it as a PNG, atomically."""
    Figure = _matplotlib()
    fig = Figure(figsize=(10, 7.5), dpi=120, layout="constrained")
    cost_ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    rates = result.rates
    log = _is_geometric(rates)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    types = list(dict.fromkeys([*result.baseline_names, *result.types.values()]))
    colour = {t: palette[k % len(palette)] for k, t in enumerate(types)}

    def costs(values: list[float | None]) -> list[float]:
        return [math.nan if v is None else v for v in values]

    mix = costs([p.mix.cost for p in result.points])
    best = costs([None if p.best_baseline is None else p.best_baseline.cost for p in result.points])
    for name in result.baseline_names:
        by_rate = [next((b.cost for b in p.baselines if b.gpu == name), None) for p in result.points]
        cost_ax.plot(rates, costs(by_rate), color=colour[name], marker="o", markersize=3, linewidth=1.3,
                     alpha=0.9, zorder=3, label=f"{name} only")
    if result.formulation is not Formulation.SPLIT:
        cost_ax.plot(rates, costs([p.split.cost for p in result.points]), color="black", linestyle="--",
                     linewidth=1.5, zorder=2.5, label="mix, split (buckets divided freely)")
    cost_ax.plot(rates, mix, color="black", marker="s", markersize=4,
                 linewidth=3, zorder=2, label=f"mix, {result.formulation} (melange-sky's fleet)")
    cost_ax.fill_between(rates, mix, best, where=[b > m + 1e-9 for m, b in zip(mix, best)], interpolate=True,
                         color="#2ca02c", alpha=0.2, linewidth=0, label="saving vs the cheapest single type")
    infeasible = [p.rate for p in result.points if not p.mix.feasible]
    if infeasible:
        cost_ax.plot(infeasible, [0.0] * len(infeasible), linestyle="none", marker="x", color="red",
                     markersize=9, markeredgewidth=2, clip_on=False, zorder=4, label="no fleet fits")
    cost_ax.set_ylabel("Cost ($/h)")
    cost_ax.set_ylim(bottom=0)
    cost_ax.grid(True, alpha=0.3)
    cost_ax.legend(loc="upper left", fontsize=9, frameon=True)
    cost_ax.set_title(f"Cost of serving {result.name} vs request rate: the GPU mix and each GPU type alone\n"
                      f"(formulation {result.formulation}, slice_factor {result.slice_factor}, "
                      f"headroom {100 * result.headroom:g}%, solver {result.solver})", fontsize=11)

    lefts, widths = _bar_spans(rates, log)
    bottom = [0.0] * len(rates)
    for t in types:
        heights = [float(sum(n for g, n in p.mix.counts.items() if result.types.get(g, g) == t))
                   for p in result.points]
        if not any(heights):
            continue
        count_ax.bar(lefts, heights, width=widths, bottom=bottom, align="edge", color=colour[t], label=t,
                     edgecolor="white", linewidth=0.4)
        bottom = [b + h for b, h in zip(bottom, heights)]
    instances = any(k > 1 for k in result.instance_gpus.values())
    count_ax.set_ylabel(f"{'Instances' if instances else 'GPUs'} in the mix ({result.formulation})")
    count_ax.set_xlabel("Request rate (req/s)")
    count_ax.grid(True, axis="y", alpha=0.3)
    count_ax.legend(loc="upper left", fontsize=9, title="GPU type", title_fontsize=9)
    count_ax.yaxis.get_major_locator().set_params(integer=True)
    if log:
        count_ax.set_xscale("log")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())


def _is_geometric(rates: list[float]) -> bool:
    """Rates spread over more than a decade with growing gaps read best on a log axis (1,2,5,10,20,50 or --log)."""
    if len(rates) < 3 or rates[-1] / rates[0] < 20:
        return False
    gaps = [b - a for a, b in zip(rates, rates[1:])]
    return gaps[-1] > 4 * gaps[0]


def _bar_spans(rates: list[float], log: bool) -> tuple[list[float], list[float]]:
    """Left edge and width of each rate's bar: 80% of the space to its nearer neighbour, on the axis's scale."""
    forward = [math.log(r) for r in rates] if log else list(rates)
    if len(forward) == 1:
        half = [0.4 * (abs(forward[0]) or 1.0)] if not log else [0.2]
    else:
        gaps = [b - a for a, b in zip(forward, forward[1:])]
        half = [0.4 * min(gaps[max(k - 1, 0)], gaps[min(k, len(gaps) - 1)]) for k in range(len(forward))]
    back = math.exp if log else float
    lefts = [back(x - h) for x, h in zip(forward, half)]
    rights = [back(x + h) for x, h in zip(forward, half)]
    return lefts, [r - left for left, r in zip(lefts, rights)]


__all__ = ["MixCost", "Sweep", "SweepPoint", "check_plotting", "check_rates", "default_range", "parse_rates",
           "plot_sweep", "rate_range", "sweep", "sweep_rates"]
