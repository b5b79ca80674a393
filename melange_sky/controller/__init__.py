"""The fleet controller (`melange-sky watch`): heal, autoscale from the router's observed traffic, within a budget.

`rules` decides (pure); `watch` reads the clouds, the router and the ledger, and acts through `fleet.up`. Import
them by module (`melange_sky.controller.watch`): this file imports none of its modules, so none imports it back.
"""
