"""`sweep --simulate`: beside each rate's cost, the simulated SLO attainment of the plan at that rate.

A cost curve says what a rate costs if every GPU runs at its profiled maximum; the attainment beside it says whether
the plan at that rate holds its SLOs under Poisson traffic at that rate (sizes from the config's histogram), so the
rates where integer rounding leaves a plan with no slack stand out.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from melange_sky.core.config import Config, with_overrides
from melange_sky.core.slo import Slos
from melange_sky.deploy.plan import PlanSettings
from melange_sky.inputs.arrivals import poisson_arrivals
from melange_sky.sim.plan import plan_from_config
from melange_sky.sim.simulate import simulate

__all__ = ["RateAttainment", "simulate_rates"]


@dataclass(frozen=True)
class RateAttainment:
    """The simulated attainment of the plan at one rate (None: no plan there)."""

    rate: float
    attainment: float | None
    requests: int = 0


def simulate_rates(config: Config, rates: Sequence[float], slos: Slos, seconds: float,
                   settings: PlanSettings = PlanSettings(compare=False), *, seed: int = 0,
                   feasible: Callable[[float], bool] = lambda _rate: True) -> list[RateAttainment]:
    """For each rate that `feasible` admits: the config's plan at that rate (as `solve --rate` makes it), simulated
    under `seconds` of Poisson arrivals at that rate with sizes from the config's histogram."""
    found = []
    for rate in rates:
        if not feasible(rate):
            found.append(RateAttainment(rate, None))
            continue
        plan = plan_from_config(with_overrides(config, rate=rate), settings)
        routes = plan.routes
        arrivals = poisson_arrivals(rate, seconds, routes.distribution, routes.input_edges, routes.output_edges,
                                    seed=seed)
        result = simulate(plan, arrivals, slos, seed=seed)
        found.append(RateAttainment(rate, result.report.attainment, result.report.requests))
    return found
