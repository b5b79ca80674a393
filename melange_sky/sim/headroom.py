"""Headroom advice: the least padding whose plan meets the attainment target on these arrivals.

A plan sized at 100% of every GPU's profiled max rate queues in every burst; `headroom` (the highest planned
utilisation) pads it, at a price. Which headroom a trace needs is what the simulation can say: bisect the config's
headroom between `lowest` and 1, solving the config at each candidate (the same solve as `solve --headroom H`) and
simulating that plan on the same arrivals, and keep the highest headroom (the cheapest padding) whose attainment
reaches the target. Plans are integers, so many headrooms give the same fleet: each distinct fleet is simulated
once. Attainment is not strictly monotone in headroom (a fleet with more of one type may serve a bucket worse), so the
answer is the bisection's, checked at its end.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from melange_sky.core.attainment import DEFAULT_TARGET
from melange_sky.core.config import Config, with_overrides
from melange_sky.core.slo import Slos
from melange_sky.deploy.plan import PlanSettings
from melange_sky.errors import InfeasibleAllocation
from melange_sky.inputs.arrivals import Arrivals
from melange_sky.sim.errors import SimulationError
from melange_sky.sim.plan import SimPlan, plan_from_config
from melange_sky.sim.simulate import SimResult, simulate

__all__ = ["HeadroomAdvice", "HeadroomTrial", "find_headroom"]

#: The bisection stops when the bracket is this narrow (in headroom, 0.02 = 2 points of utilisation).
HEADROOM_PRECISION = 0.02
#: The most padding tried: a plan at 50% utilisation that still misses is not a headroom problem.
LOWEST_HEADROOM = 0.5


@dataclass(frozen=True)
class HeadroomTrial:
    """One headroom tried: its plan and how the simulation judged it."""

    headroom: float
    plan: SimPlan
    result: SimResult

    @property
    def attainment(self) -> float:
        return self.result.report.attainment

    @property
    def meets(self) -> bool:
        return self.result.report.meets_target

    def to_json(self) -> dict[str, object]:
        return {"headroom": round(self.headroom, 4), "counts": dict(self.plan.counts),
                "cost_per_hour": round(self.plan.cost_per_hour, 6), "attainment": round(self.attainment, 6),
                "meets_target": self.meets}


@dataclass(frozen=True)
class HeadroomAdvice:
    """The unpadded plan (headroom 1), the chosen one (None: even `lowest` misses), and every headroom tried."""

    target: float
    unpadded: HeadroomTrial
    chosen: HeadroomTrial | None
    trials: list[HeadroomTrial]
    lowest: float

    @property
    def extra_cost(self) -> float | None:
        """$/h the padding costs over the unpadded plan."""
        return None if self.chosen is None else self.chosen.plan.cost_per_hour - self.unpadded.plan.cost_per_hour

    def to_json(self) -> dict[str, object]:
        return {"target": self.target, "unpadded": self.unpadded.to_json(),
                "chosen": None if self.chosen is None else self.chosen.to_json(),
                "extra_cost_per_hour": None if self.extra_cost is None else round(self.extra_cost, 6),
                "trials": [t.to_json() for t in sorted(self.trials, key=lambda t: -t.headroom)],
                "lowest": self.lowest}


def find_headroom(config: Config, arrivals: Arrivals, slos: Slos, settings: PlanSettings = PlanSettings(compare=False),
                  *, target: float = DEFAULT_TARGET, model: str | None = None, seed: int = 0,
                  lowest: float = LOWEST_HEADROOM, precision: float = HEADROOM_PRECISION, speed: float = 1.0,
                  on_trial: Callable[[HeadroomTrial], None] | None = None) -> HeadroomAdvice:
    """The highest headroom in [`lowest`, 1] whose plan meets `target` on `arrivals` (see the module docstring)."""
    if not 0 < lowest < 1:
        raise SimulationError(f"the lowest headroom to try must be in (0, 1), got {lowest!r}")
    by_counts: dict[tuple[str, ...], SimResult] = {}
    trials: list[HeadroomTrial] = []

    def trial(headroom: float) -> HeadroomTrial:
        plan = plan_from_config(with_overrides(config, headroom=headroom), settings, model, speed)
        key = tuple(sorted(r.gpu for r in plan.replicas))  # the engines run (instances of several GPUs run several)
        result = by_counts.get(key)
        if result is None:
            result = by_counts[key] = simulate(plan, arrivals, slos, target=target, seed=seed)
        found = HeadroomTrial(headroom, plan, result)
        trials.append(found)
        if on_trial is not None:
            on_trial(found)
        return found

    unpadded = trial(1.0)
    if unpadded.meets:
        return HeadroomAdvice(target, unpadded, unpadded, trials, lowest)
    try:
        good = trial(lowest)
    except InfeasibleAllocation as exc:  # e.g. max_count or --max-replicas: no fleet at that much padding
        raise SimulationError(f"--find-headroom: the config cannot be planned at headroom {lowest:g}, the most "
                              f"padding the search tries ({exc})") from None
    if not good.meets:
        return HeadroomAdvice(target, unpadded, None, trials, lowest)
    bad_h = 1.0
    while bad_h - good.headroom > precision:
        mid = trial(round((good.headroom + bad_h) / 2, 4))
        if mid.meets:
            good = mid
        else:
            bad_h = mid.headroom
    return HeadroomAdvice(target, unpadded, good, trials, lowest)

