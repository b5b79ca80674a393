"""The simulator's room: a plan x arrivals x serve's routing policy x the engine model -> SLO attainment.

`plan_from_config` / `plan_from_fleet` say what runs (the replicas, the routes `serve` would use, each GPU type's
engine model); `trace_arrivals` / `poisson_arrivals` (from `inputs.arrivals`, shared with `replay`) what is offered;
`simulate` runs them on one event queue and returns the shared attainment report (`melange_sky.core.attainment`) with
per-replica statistics; `find_headroom` searches the least padding whose plan meets the target. Above `serve` (it
drives its policy object) and below the CLI.
"""
from melange_sky.inputs.arrivals import (Arrivals, ArrivalsError, Burst, parse_burst, poisson_arrivals,
                                        trace_arrivals)
from melange_sky.sim.errors import SimulationError
from melange_sky.sim.headroom import HeadroomAdvice, HeadroomTrial, find_headroom
from melange_sky.sim.plan import GpuModel, SimPlan, plan_from_config, plan_from_fleet
from melange_sky.sim.simulate import ReplicaStats, SimResult, build_policy, simulate

__all__ = ["Arrivals", "ArrivalsError", "Burst", "GpuModel", "HeadroomAdvice", "HeadroomTrial", "ReplicaStats",
           "SimPlan", "SimResult", "SimulationError", "build_policy", "find_headroom", "parse_burst",
           "plan_from_config", "plan_from_fleet", "poisson_arrivals", "simulate", "trace_arrivals"]
