"""`sweep`: what the mix and each single GPU type cost over a range of request rates (table, JSON, figure)."""
from __future__ import annotations

import json
from collections.abc import Callable

import click

from melange_sky._io import write_json
from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.options import SolveArgs, per_offer_option, plan_settings, solve_options
from melange_sky.core.slo import Slos
from melange_sky.deploy.offers import bind_offers
from melange_sky.sim.sweep import RateAttainment, simulate_rates
from melange_sky.solver.result import Baseline
from melange_sky.solver.sweep import MixCost, Sweep, check_plotting, plot_sweep, sweep_rates
from melange_sky.solver.sweep import sweep as run_sweep


@main.command()
@click.argument("config", type=click.Path(dir_okay=True, path_type=str))
@click.option("--rates", metavar="R1,R2,...", help="Request rates in req/s, comma-separated (e.g. 1,2,5,10,20).")
@click.option("--from", "start", type=float, help="First rate of an evenly spaced range, req/s (default: --to / "
                                                   "--steps, or --to / 100 with --log).")
@click.option("--to", "stop", type=float, help="Last rate of the range, req/s (default: twice the config's "
                                               "total_request_rate).")
@click.option("--steps", type=int, help="Rates in the range, both ends included (default: 20).")
@click.option("--log", is_flag=True, help="Space the range geometrically (and draw a log rate axis).")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep as JSON on stdout instead of the table.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str),
              help="Also write the sweep as JSON to this file.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.png",
              help="Draw cost vs rate (the mix, split, each GPU type alone) above the mix's GPUs per rate, as a "
                   "PNG. Needs matplotlib: pip install 'melange-sky[plot]'.")
@click.option("--simulate", "simulate_s", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Also simulate each rate's mix under SECONDS of Poisson traffic at that rate (sizes from the "
                   "histogram) and show the share of requests meeting a per-request TPOT <= 120 ms (or "
                   "--tpot-slo-ms / --ttft-slo-ms / --latency-slo-ms): see `melange-sky simulate`.")
@click.option("--tpot-slo-ms", type=click.FloatRange(min=0, min_open=True), help="With --simulate: per request.")
@click.option("--ttft-slo-ms", type=click.FloatRange(min=0, min_open=True), help="With --simulate: per request.")
@click.option("--latency-slo-ms", type=click.FloatRange(min=0, min_open=True), help="With --simulate: per request.")
@per_offer_option
@solve_options
@debug_option
def sweep(config: str, rates: str | None, start: float | None, stop: float | None, steps: int | None, log: bool,
          as_json: bool, output: str | None, plot: str | None, simulate_s: float | None, tpot_slo_ms: float | None,
          ttft_slo_ms: float | None, latency_slo_ms: float | None, per_offer: bool, solve_args: SolveArgs) -> None:
    """Cost of the cheapest mix and of each single GPU type over request rates, for CONFIG.

    Each rate is solved as `solve --rate R` would (GPUs bound to offers as `plan` binds them): the mix under
    --formulation, the `split` mix and every single-GPU-type fleet. A fleet that does not fit, or has more
    replicas than --max-replicas, shows as infeasible (mix and single types alike). --rate sets the config's
    rate that the default range (20 steps up to twice it) is built from.

    \b
    Examples:
      melange-sky sweep examples/example.json
      melange-sky sweep examples/example.json --rates 1,2,5,10,20,50,100 --json
      melange-sky sweep examples/example.json --from 1 --to 100 --steps 50 --plot sweep.png
    """
    _check_applicable(rates, stop, simulate_s, solve_args, tpot=tpot_slo_ms, ttft=ttft_slo_ms, latency=latency_slo_ms)
    if plot:
        check_plotting()  # before any solving: a missing extra is a one-line error, at once
    cfg = solve_args.load(config)
    chosen = sweep_rates(cfg, rates, start, stop, steps, log)
    bound = bind_offers(cfg, per_offer=per_offer, strict=False)  # as `solve` binds them
    warn([w for w in bound.config.warnings if w not in cfg.warnings])
    result = run_sweep(bound.config, chosen, solve_args.formulation, solve_args.solver, caps=bound.caps,
                       max_replicas=solve_args.max_replicas)
    simulated = None
    if simulate_s is not None:
        slos = Slos(tpot_ms=tpot_slo_ms if (tpot_slo_ms or ttft_slo_ms or latency_slo_ms) else 120.0,
                    ttft_ms=ttft_slo_ms, latency_ms=latency_slo_ms)
        feasible = {p.rate for p in result.points if p.mix.feasible}
        simulated = simulate_rates(cfg, chosen, slos, simulate_s, plan_settings(solve_args, per_offer, None, False),
                                   feasible=feasible.__contains__)
    doc = result.to_dict()
    if simulated is not None:
        for point, sim in zip(doc["points"], simulated):
            point["simulated_attainment"] = None if sim.attainment is None else round(sim.attainment, 6)
    written = []
    if output:
        write_json(output, doc)
        written.append(output)
    if plot:
        plot_sweep(result, plot)
        written.append(plot)
    click.echo(json.dumps(doc, indent=2) if as_json else format_sweep(result, simulated))
    if any(p.mix.status == "feasible" or p.split.status == "feasible" for p in result.points):
        warn([f"the solver hit --time-limit {solve_args.time_limit:g} s at some rates (marked *) before proving "
              f"the fleet optimal"])
    for path in written:
        click.echo(f"Wrote {path}", err=True)


def _check_applicable(rates: str | None, stop: float | None, simulate_s: float | None, solve_args: SolveArgs,
                      **slos: float | None) -> None:
    """A flag this sweep would ignore is a usage error, not silence: SLOs judge only simulated traffic, and --rate
    only builds the default range, which --rates or --to replace."""
    given = [f"--{name}-slo-ms" for name, value in slos.items() if value is not None]
    if given and simulate_s is None:
        raise click.UsageError(f"{'/'.join(given)} applies to --simulate's traffic only: add --simulate SECONDS or "
                               f"drop it")
    if solve_args.rate is not None and (rates is not None or stop is not None):
        other = "--rates" if rates is not None else "--to"
        raise click.UsageError(f"--rate only sets the rate the default range is built from, and {other} replaces "
                               f"that range: drop --rate")


def format_sweep(result: Sweep, simulated: list[RateAttainment] | None = None) -> str:
    """The sweep as an aligned table: one rate per line, $/h per fleet, the saving, the mix's simulated attainment
    (with --simulate) and the mix's GPUs."""
    split = result.formulation != "split"
    names = result.baseline_names
    headers = ["req/s", f"{result.formulation} $/h", *(["split $/h"] if split else []),
               *(f"{n} $/h" for n in names), "saving", *(["attainment"] if simulated else []),
               f"fleet ({result.formulation})"]
    rate = _rate_format(result.rates)
    rows = []
    for k, p in enumerate(result.points):
        by_name = {b.gpu: b for b in p.baselines}
        saving, best = p.saving, p.best_baseline
        attained = simulated[k].attainment if simulated else None
        rows.append([rate(p.rate), _mix_cell(p.mix), *([_mix_cell(p.split)] if split else []),
                     *(_baseline_cell(by_name.get(n)) for n in names),
                     "-" if saving is None or best is None or not best.cost
                     else f"{saving:,.2f} ({100 * saving / best.cost:.1f}%)",
                     *([("-" if attained is None else f"{100 * attained:.2f}%")] if simulated else []),
                     " + ".join(_fleet_part(result, g, n) for g, n in p.mix.counts.items()) or "-"])
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(headers)]
    last = len(headers) - 1

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) if k == last else c.rjust(w)
                                for k, (c, w) in enumerate(zip(cells, widths))).rstrip()

    span = f"{rate(result.rates[0])} to {rate(result.rates[-1])}"
    lines = [f"Cost sweep for {result.name}: {len(result.points)} rate(s), {span} req/s; formulation "
             f"{result.formulation}, slice_factor {result.slice_factor}, headroom {100 * result.headroom:g}%. "
             f"Costs in $/h.", "", line(headers), *(line(r) for r in rows)]
    notes = _infeasible_notes(result, rate)
    if notes:
        lines += ["", *notes]
    if any("*" in cell for r in rows for cell in r[1:-1]):
        lines.append("* the time limit stopped the search before this fleet was proven optimal")
    solves = len(result.points) * (2 if split else 1)
    lines += ["", f"Solved {solves} fleets at {len(result.points)} rate(s) in {result.seconds:.2f} s "
                  f"({result.solver}); saving: the mix against the cheapest single-GPU-type fleet."]
    if simulated:
        lines.append("attainment: the share of requests meeting the SLOs when the mix is simulated under Poisson "
                     "traffic at that rate (`melange-sky simulate`).")
    return "\n".join(lines)


def _fleet_part(result: Sweep, column: str, count: int) -> str:
    """"3 A10G", or "2 A100-80GB (8-GPU instances)" where a count means instances of a bound offer."""
    k = result.instance_gpus.get(column, 1)
    return f"{count:,} {column}" + (f" ({k}-GPU instance{'s' if count > 1 else ''})" if k > 1 else "")


def _mix_cell(mix: MixCost) -> str:
    if mix.cost is None:
        return "infeasible"
    return f"{mix.cost:,.2f}" + ("*" if mix.status == "feasible" else "")


def _baseline_cell(baseline: Baseline | None) -> str:
    return "infeasible" if baseline is None or baseline.cost is None else f"{baseline.cost:,.2f}"


def _rate_format(rates: list[float]) -> Callable[[float], str]:
    """How a sweep's rates print: whole rates as integers (1,000,000 rather than 1e+06, up to 1e+15); a range with
    fractions (--from 1 --to 12 --steps 8: 2.57142857...) with the table's 2 decimals throughout, or as many more as
    keep neighbouring rates apart and a small rate above 0 (at most 6)."""
    if all(r == int(r) for r in rates):  # up to 1e15: a 1e308 as digits would be a line of 400
        return lambda rate: f"{int(rate):,}" if rate < 1e15 else f"{rate:g}"
    places = next((d for d in range(2, 7) if _distinct(rates, d)), 6)
    return lambda rate: f"{rate:,.{places}f}"


def _distinct(rates: list[float], places: int) -> bool:
    shown = [f"{r:.{places}f}" for r in rates]
    return len(set(shown)) == len(shown) and all(float(text) > 0 for text in shown)


def _infeasible_notes(result: Sweep, rate: Callable[[float], str]) -> list[str]:
    """Why each infeasible column is so: how many rates, the first one, and the solver's reason there."""
    seen: dict[str, tuple[int, float, str]] = {}

    def note(label: str, rate: float, reason: str | None) -> None:
        count, first, why = seen.get(label, (0, rate, reason or "no fleet fits"))
        seen[label] = (count + 1, first, why)

    for p in result.points:
        for mix in [p.mix] if p.split is p.mix else [p.mix, p.split]:
            if mix.cost is None:
                note(f"mix ({mix.formulation})", p.rate, mix.reason)
        for b in p.baselines:
            if b.cost is None:
                note(f"{b.gpu} alone", p.rate, b.reason)
    total = len(result.points)
    return [f"{label}: infeasible at {count} of {total} rate(s), first at {rate(first)} req/s: {why}"
            for label, (count, first, why) in seen.items()]
