"""One root error class and a few specific ones, so the CLI can map each to an exit code and a one-line message."""
from __future__ import annotations


class MelangeError(Exception):
    """Root of every error melange-sky raises on purpose; its message is meant for the user as is."""

    exit_code = 1


class ConfigError(MelangeError):
    """The config (or a command-line override of it) is wrong; the message names the file and the field."""

    exit_code = 2

    def __init__(self, source: str, field: str | None, message: str):
        self.source = source
        self.field = field
        self.message = message
        where = f"{source}: {field}: " if field else f"{source}: "
        super().__init__(where + message)


class InfeasibleAllocation(MelangeError):
    """No GPU fleet satisfies the constraints (e.g. `max_count` limits leave too little capacity)."""

    exit_code = 2


class SolverError(MelangeError):
    """The MILP solver could not be run or gave no usable answer (missing binary, time limit without a solution)."""

    exit_code = 2


class AllocationCheckError(MelangeError):
    """A solved allocation failed its own post-solve check: a bug in melange-sky, never a user error."""

    exit_code = 1


class OutputError(MelangeError):
    """A result could not be written where the user asked (missing directory, no permission)."""

    exit_code = 2


class TemplateError(MelangeError):
    """A task template cannot be found, has a syntax error, uses an undefined variable or renders invalid YAML."""

    exit_code = 2
