"""The simulator's error: a simulation that cannot run as asked (a plan that cannot be modelled, no requests)."""
from __future__ import annotations

from melange_sky.errors import MelangeError

__all__ = ["SimulationError"]


class SimulationError(MelangeError):
    """A simulation that cannot run as asked; the message says what to change."""

    exit_code = 2
