"""melange-sky: Mélange's cheapest GPU mix for LLM serving, deployed with SkyPilot.

The library is usable on its own; `melange_sky.cli` is a thin layer over it.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, GpuSpec, load_config, parse_config, with_overrides
from .errors import (AllocationCheckError, ConfigError, InfeasibleAllocation, MelangeError, OutputError,
                     SolverError)
from .solver import SolveResult, SolverOptions, solve

__all__ = [
    "AllocationCheckError", "Config", "ConfigError", "GpuSpec", "InfeasibleAllocation", "MelangeError",
    "OutputError", "SolveResult", "SolverError", "SolverOptions", "__version__", "load_config", "parse_config",
    "solve", "with_overrides",
]
