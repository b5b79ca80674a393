"""The engine room's errors: each one line the user can act on, exit code 2 (bad input, not a crash)."""
from __future__ import annotations

from melange_sky.errors import MelangeError


class EngineError(MelangeError):
    """The engine model cannot be built as asked: an unknown model or GPU, an unsupported architecture, bad settings."""

    exit_code = 2


class DoesNotFit(EngineError):
    """The model's weights (÷ TP) leave no room for a KV cache on this GPU: an answer, not a crash.

    The message reads "does not fit: 140 GB of weights on 24 GB" (+ what would help)."""

    def __init__(self, message: str, weights_gb: float = 0.0, memory_gb: float = 0.0):
        self.weights_gb = weights_gb
        self.memory_gb = memory_gb
        super().__init__(message)
