"""`serve`: one OpenAI-compatible endpoint in front of the fleet, routing each request by its size."""
from __future__ import annotations

import click

from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.options import SolveArgs, per_offer_option, plan_settings, solve_options, warn_time_limit
from melange_sky.deploy.membership import ADMIN_ROUTES_PATH, ADMIN_TOKEN_ENV
from melange_sky.deploy.plan import solve_offers
from melange_sky.errors import ServeError
from melange_sky.serve.routes import (FleetSource, Routes, RoutesSource, StaticSource, load_routes_file,
                                      name_replicas, parse_replica_arg, routes_from_solve)
from melange_sky.serve.settings import (ServeSettings, admin_token_from_env, check_exposure, plain_http_warning,
                                        tls_context)
from melange_sky.serve.tokens import Sizer, load_tokenizer


@main.command()
@click.argument("fleet", required=False)
@click.option("--config", type=click.Path(dir_okay=False, path_type=str), metavar="CONFIG",
              help="Serve a static set of servers (--replica) with the routing table of this config's solve "
                   "(instead of a FLEET from the ledger).")
@click.option("--replica", "replica_args", multiple=True, metavar="GPU=URL",
              help="With --config: an OpenAI-compatible server and its GPU type (a gpu_info name), e.g. "
                   "A10G=http://10.0.0.5:8000. Repeat for each server.")
@click.option("--pushed", is_flag=True,
              help=f"Serve the routes pushed to PUT {ADMIN_ROUTES_PATH} (the fleet's own router, on a VM without "
                   f"the ledger): no FLEET, no --config; needs {ADMIN_TOKEN_ENV}. Answers 503 until the first push.")
@click.option("--routes", "routes_file", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="With --pushed: serve this routes document (JSON, as GET /routes shows) until the first push.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Any other than loopback needs an API key (or --no-auth).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port, printed at start).")
@click.option("--api-key", envvar="MELANGE_SKY_API_KEY", metavar="KEY",
              help="Clients must send it as 'Authorization: Bearer KEY' [env MELANGE_SKY_API_KEY; prefer the env: "
                   "a command line is visible to other users]. Never logged or written.")
@click.option("--no-auth", is_flag=True, help="Serve anyone, even on a public --host (something in front of the "
                                               "router checks clients).")
@click.option("--upstream-api-key", envvar="MELANGE_SKY_UPSTREAM_API_KEY", metavar="KEY",
              help="Bearer key sent to the replicas [env MELANGE_SKY_UPSTREAM_API_KEY; default: the --api-key, "
                   "which is what replicas launched with deployment.api_key_secret expect].")
@click.option("--ssl-certfile", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="Serve HTTPS with this PEM certificate (its chain after it, if any); needs --ssl-keyfile.")
@click.option("--ssl-keyfile", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="The certificate's private key (PEM, not encrypted); needs --ssl-certfile.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=str), metavar="PATH",
              help="Count prompt tokens with this tokenizer.json (pip install 'melange-sky[tokenizers]') instead "
                   "of characters / 4.")
@click.option("--refresh-s", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="FLEET: re-read the replicas from the ledger this often.")
@click.option("--drain-s", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM or Ctrl-C: how long requests in flight may take to finish.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Other replicas to try when one fails before any byte reached the client (a request answered "
                   "5xx by two replicas is not tried again).")
@click.option("--retry-budget-percent", type=click.FloatRange(0, 100), default=20.0, show_default=True,
              help="Retries in flight at once: at most this % of the requests in flight (and at least 3).")
@click.option("--max-ejection-percent", type=click.FloatRange(0, 100), default=10.0, show_default=True,
              help="At most this % of a GPU type's replicas ejected at once for failing (always at least one; "
                   "a replica that cannot be reached is taken out whatever this says).")
@click.option("--panic-percent", type=click.FloatRange(0, 100), default=50.0, show_default=True,
              help="When fewer than this % of the replicas that can serve a bucket are healthy, its requests ignore "
                   "ejections (those that cannot be reached aside).")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="The largest request body taken, in MiB; a larger one gets 413.")
@click.option("--window-s", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="GET /workload counts the requests of this last span.")
@per_offer_option
@solve_options
@debug_option
@click.pass_context
def serve(ctx: click.Context, fleet: str | None, config: str | None, replica_args: tuple[str, ...], pushed: bool,
          routes_file: str | None, host: str, port: int, api_key: str | None, no_auth: bool,
          upstream_api_key: str | None, ssl_certfile: str | None, ssl_keyfile: str | None, tokenizer: str | None,
          refresh_s: float, drain_s: float, retries: int, retry_budget_percent: float, max_ejection_percent: float,
          panic_percent: float, max_body_mb: float, window_s: float, per_offer: bool, solve_args: SolveArgs) -> None:
    """Serve one OpenAI-compatible endpoint that routes each request to the GPU type the plan chose for its size.

    FLEET: the replicas that are up in the ledger (re-read every --refresh-s) and the routing table of the fleet's
    stored plan. --config CONFIG --replica GPU=URL ...: any OpenAI-compatible servers, with the routing table of
    CONFIG's solve (the solve options apply). --pushed: only what the fleet pushes (`up`, `down` and `watch` do,
    with the fleet's admin token); no ledger is read.

    A request's bucket: its prompt at 4 characters per token (corrected by the replicas' reported counts, or exact
    with --tokenizer) and its max_tokens (without one, its input row). Its GPU type: the plan's shares of the
    bucket, by smooth weighted round-robin; a type without a healthy replica spills to the others. Its replica:
    the fewest requests in flight. POST /v1/completions and /v1/chat/completions (streaming or not), GET
    /v1/models, /health, /metrics (Prometheus), /routes, /workload (the observed histogram and per-minute arrival
    rates: see `workload --from`).

    Failures: a request that fails before any byte reached the client is retried on another replica (--retries,
    within the retry budget), unless two replicas answered it 5xx: then the request is at fault, and no replica is
    blamed. A replica that cannot be reached is taken out at once; one that fails requests others then serve is
    ejected (at most --max-ejection-percent of its GPU type); a good GET /health brings either back. Every error
    is in OpenAI's shape; X-Request-Id (the client's, or one made here) goes to the replica and back.

    Admin API, when MELANGE_SKY_ADMIN_TOKEN is set (from the environment only; never the clients' key): PUT
    /admin/routes swaps in a whole routes document at once (an invalid one gets 400 and the old routes keep
    serving); GET /admin/routes shows it with the requests in flight per replica. A replica a push removes gets no
    new request; those in flight finish. In FLEET mode a ledger change seen by the refresh replaces pushed routes.

    \b
    Examples:
      melange-sky serve example
      melange-sky serve --config config.json --replica A10G=http://10.0.0.5:8000 --replica A100-80GB=http://10.0.0.6:8000
      MELANGE_SKY_API_KEY=... melange-sky serve example --host 0.0.0.0 --port 8080
      MELANGE_SKY_ADMIN_TOKEN=... MELANGE_SKY_API_KEY=... melange-sky serve --pushed --host 0.0.0.0
    """
    if pushed and (fleet or config or replica_args):
        raise click.UsageError("--pushed serves only the routes pushed to it: no FLEET, --config or --replica")
    if routes_file and not pushed:
        raise click.UsageError("--routes FILE goes with --pushed (FLEET and --config make their own routes)")
    if not pushed and bool(fleet) == bool(config):
        raise click.UsageError("give a FLEET from the ledger, or --config CONFIG with --replica GPU=URL ..., "
                               "or --pushed")
    admin_token = admin_token_from_env()
    if pushed and not admin_token:
        raise ServeError(f"--pushed needs {ADMIN_TOKEN_ENV} in the environment: the fleet pushes the routes with "
                         f"that token (`melange-sky up` makes one per fleet and passes it to its router)")
    if fleet and replica_args:
        raise click.UsageError("--replica goes with --config: a fleet's replicas come from the ledger")
    if config and not replica_args:
        raise click.UsageError("--config needs the servers to route to: --replica GPU=URL (repeat for each)")
    settings = ServeSettings(host=host, port=port, api_key=None if no_auth else api_key,
                             upstream_api_key=upstream_api_key or api_key, admin_token=admin_token, retries=retries,
                             retry_budget_percent=retry_budget_percent, max_ejection_percent=max_ejection_percent,
                             panic_percent=panic_percent, max_body_mb=max_body_mb, drain_s=drain_s,
                             refresh_s=refresh_s, window_s=window_s, ssl_certfile=ssl_certfile,
                             ssl_keyfile=ssl_keyfile)
    check_exposure(settings, no_auth)
    tls = tls_context(settings)
    warn(filter(None, [plain_http_warning(settings)]))
    sizer = Sizer(load_tokenizer(tokenizer) if tokenizer else None)
    source: RoutesSource | None = None
    routes: Routes | None = None
    if pushed:
        routes = load_routes_file(routes_file) if routes_file else None
    elif config:
        cfg = solve_args.load(config)
        result = solve_offers(cfg, plan_settings(solve_args, per_offer, None, compare=False))  # as `solve` plans
        warn_time_limit(result, solve_args)
        pairs = [parse_replica_arg(arg, [g.name for g in cfg.gpus]) for arg in replica_args]
        source = StaticSource(routes_from_solve(cfg, result, name_replicas(pairs)))
    else:
        assert fleet is not None
        source = FleetSource(fleet)
    if source is not None:
        routes = source.load()
    if routes is not None:
        warn(routes.warnings)
        click.echo(_summary(routes, settings, bool(tokenizer)))
        warn(_shortfalls(routes))
    else:
        click.echo(f"No routes yet: requests get 503 until the fleet pushes them to PUT {ADMIN_ROUTES_PATH}.\n"
                   + _auth_line(settings, bool(tokenizer)))
    if settings.admin_token and not pushed:
        click.echo(f"Admin API on ({ADMIN_TOKEN_ENV}): pushes to PUT {ADMIN_ROUTES_PATH} swap the routes"
                   + ("; the ledger's next change replaces them." if fleet else "."))
    from melange_sky.serve import server  # noqa: PLC0415 - heavy: kept off --help

    router = server.Router(routes, settings, sizer, source, log=lambda line: click.echo(line, err=True))
    code = server.run(router, on_listening=lambda url: click.echo(f"Listening on {url}  (Ctrl-C or SIGTERM "
                                                                  f"drains and stops)"), ssl_context=tls)
    ctx.exit(code)


def _summary(routes: Routes, settings: ServeSettings, tokenizer: bool) -> str:
    rows, cols = routes.shape
    lines = [f"Routing {routes.source}: {rows}x{cols} buckets (input edges {list(routes.input_edges)}, output edges "
             f"{list(routes.output_edges)}), {len(routes.shares)} with demand in the plan", ""]
    width = max([len("GPU")] + [len(g.name) for g in routes.gpus])
    lines.append(f"  {'GPU':<{width}}  planned  replicas")
    for gpu in routes.gpus:
        mine = [r.url for r in routes.replicas if r.gpu == gpu.name]
        lines.append(f"  {gpu.name:<{width}}  {gpu.planned:>7}  {len(mine):>8}  {', '.join(mine)}")
    lines.append("")
    lines.append(_auth_line(settings, tokenizer))
    return "\n".join(lines)


def _auth_line(settings: ServeSettings, tokenizer: bool) -> str:
    return (("Clients must send the API key (Authorization: Bearer)." if settings.api_key else
             "No API key: the router serves anyone who can reach it.")
            + (" Replicas get a Bearer key." if settings.upstream_api_key else "")
            + (" Prompt tokens: counted by --tokenizer." if tokenizer else
               " Prompt tokens: characters / 4, corrected by reported usage."))


def _shortfalls(routes: Routes) -> list[str]:
    warnings = []
    for gpu in routes.gpus:
        live = sum(1 for r in routes.replicas if r.gpu == gpu.name)
        if live < gpu.planned:
            warnings.append(f"{gpu.name} has {live} live replica(s), the plan counts {gpu.planned}: its share of "
                            f"the traffic goes to {'them' if live else 'other GPU types that can serve it'}")
        elif gpu.planned == 0 and live:
            warnings.append(f"{gpu.name} has {live} replica(s) but the plan buys none: they get only spilled "
                            f"traffic")
    if not routes.replicas:
        warnings.append("no replica is up yet: requests get 503 until one is")
    return warnings
