"""The `melange-sky` command line. Importing this package registers every command on `main`."""
from melange_sky.cli import (  # noqa: F401 - registers the commands
    emulate, estimate, fleet, plan, profile, replay, serve, simulate, sweep, watch, workload)
from melange_sky.cli.main import main

__all__ = ["main"]
