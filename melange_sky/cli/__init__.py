"""The `melange-sky` command line. Importing this package registers every command on `main`."""
from melange_sky.cli import emulate, estimate, fleet, plan, profile, serve, sweep, watch, workload  # noqa: F401 - registers the commands
from melange_sky.cli.main import main

__all__ = ["main"]
