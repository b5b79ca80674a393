"""`melange-sky serve`: one OpenAI-compatible endpoint in front of a mixed fleet, routing each request by its size.

Modules: `routes` (the routing table as a validated document, from a solved config or a fleet's stored plan),
`tokens` (a request's size in tokens), `policy` (which replica: the plan's shares per bucket by smooth weighted
round-robin, spills, least-in-flight replica), `observed` (the workload seen, for re-planning), `settings`, and the
data path in `server` (aiohttp; with `metrics`, Prometheus) — only `server` and `metrics` import the heavy packages,
so the CLI loads them when it starts serving, never for `--help`.
"""
