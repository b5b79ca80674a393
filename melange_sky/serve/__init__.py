"""`melange-sky serve`: one OpenAI-compatible endpoint in front of a mixed fleet, routing each request by its size.

Modules, by concern. Pure (no sockets, loaded by the CLI): `routes` (the routing table as a validated document,
from a solved config or a fleet's stored plan), `tokens` (a request's size in tokens), `policy` (which replica: the
plan's shares per bucket by smooth weighted round-robin, spills, least-in-flight replica, the panic threshold),
`outliers` (which replicas leave the rotation, within which limits; the retry budget), `observed` (the workload
seen, for re-planning), `settings` (how the router listens, its TLS). On aiohttp, loaded when serving starts and
never for `--help`: `server` (the router's state, the app, startup and shutdown), `relay` (the data path),
`failures` (failed tries, give-up answers, probes), `endpoints` (models, health, metrics, routes, workload, the
admin API), `access` (keys), `openai_errors` (errors in OpenAI's shape), `metrics` (Prometheus).
"""
