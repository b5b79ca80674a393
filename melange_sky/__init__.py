"""melange-sky: Mélange's cheapest GPU mix for LLM serving, deployed with SkyPilot.

The library is usable on its own; `melange_sky.cli` is a thin layer over it. The public names below are loaded on
first use (PEP 562), so `import melange_sky` and `melange-sky --help` stay fast; SkyPilot (`sky`) is imported only by
`melange_sky.fleet.skypilot`, when the SkyPilot backend is used.

The package is laid out by stage, one room (subpackage) per stage, each using only the rooms below it:
`cli` -> `fleet` -> `deploy` -> `solver` -> `core`, and `inputs` -> `core` (README, Development).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "fleet.backends": ("Backend", "ClusterInfo", "ClusterStatus", "LaunchRequest", "load_backend"),
    "deploy.catalog": ("Catalog", "Offer", "default_catalog"),
    "core.config": ("Config", "GpuSpec", "load_config", "parse_config", "with_overrides"),
    "errors": ("AllocationCheckError", "BackendError", "CapacityError", "CatalogError", "ConfigError", "FleetBusy",
               "InfeasibleAllocation", "LaunchError", "LedgerError", "MelangeError", "OutputError", "ProfileError",
               "SolverError", "TemplateError", "TraceError"),
    "fleet.fleet": ("Fleet", "UpOptions", "UpReport"),
    "fleet.ledger": ("Ledger", "ReplicaState"),
    "deploy.offers": ("BoundConfig", "bind_offers", "catalog_pricer"),  # load_config(path, price=catalog_pricer())
    "deploy.plan": ("Plan", "PlanRequest", "PlanSettings", "ReplicaPlan", "build_plan", "make_plan", "write_plan"),
    "inputs.profile": ("profile_endpoint",),
    "inputs.profile_result": ("ProfileResult", "ProfileSettings"),
    "solver.model": ("SolverOptions",),
    "solver.result": ("SolveResult", "solve"),
    "inputs.trace": ("WorkloadResult", "read_trace"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = sorted([*_MODULE_OF, "__version__"])


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'melange_sky' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
