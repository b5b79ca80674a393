"""The fleet controller (`melange-sky watch`): heal, autoscale from the router's observed traffic, within a budget.

`rules` decides (pure); `watch` reads the clouds, the router and the ledger, and acts through `fleet.up`."""
from melange_sky.controller.watch import Action, Controller, PassReport, WatchOptions, watch_lock

__all__ = ["Action", "Controller", "PassReport", "WatchOptions", "watch_lock"]
