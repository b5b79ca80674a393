"""`up`, `status` and `down`: the fleet's lifecycle."""
from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

import click

from melange_sky.cli.main import debug_option, main, warn
from melange_sky.cli.options import SolveArgs, plan_options, plan_settings, solve_options
from melange_sky.cli.text import (format_down, format_dryrun, format_event, format_preview, format_status, format_up,
                                   simulate_hint)
from melange_sky.controller.watch import DEFAULT_INTERVAL_S, remember_unavailable, spot_holds
from melange_sky.fleet.fleet import DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_ROUNDS, DEFAULT_PARALLEL, Fleet, UpOptions
from melange_sky.fleet.launchers import asked_launcher, fleet_launchers, up_launcher
from melange_sky.fleet.ledger import Ledger
from melange_sky.fleet.reports import Preview, ReplicaEvent
from melange_sky.fleet.hosted import HOSTED, LOCAL
from melange_sky.fleet.up import bring_up, controller_choice, dry_run, launch_secrets, router_setup


def launcher_output() -> contextlib.redirect_stdout:
    """What a launcher prints (SkyPilot says "Running on cluster: ...") goes to stderr with the progress lines, so
    stdout holds only this command's own output (and stays parseable with --json)."""
    return contextlib.redirect_stdout(sys.stderr)


@contextlib.contextmanager
def terminations_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal, a killed job) stop `up` the way Ctrl-C does: launches cancelled, every
    replica's true state recorded. Previous handlers are restored after."""
    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    saved = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def fleet_backend_option(command):
    """--backend for commands on a fleet that exists: its recorded launcher is the default, another is refused."""
    return click.option("--backend", metavar="NAME|MODULE:CLASS",
                        help="Launcher (default: the one the fleet was brought up with, as the ledger records it; "
                             "for a new fleet skypilot, or $MELANGE_SKY_BACKEND). Naming another than a fleet's "
                             "own is an error: it would not know the fleet's clusters.")(command)


PROMPT_POLL_S = 0.1  # how soon a Ctrl-C at a confirmation prompt is acted on


def confirm_or_refuse(question: str, yes: bool) -> bool:
    """Ask before spending money or deleting; never wait on a missing stdin."""
    if yes:
        return True
    if not sys.stdin or not sys.stdin.isatty():
        raise click.UsageError(f"{question} Refusing without confirmation: no terminal to ask on; pass -y.")
    click.echo(f"{question} [y/N]: ", nl=False)
    while True:
        # Not input(): a Ctrl-C that lands as the prompt appears (or on another thread) is only noticed by a blocked
        # read once Enter is pressed. Waiting in short slices lets Python run the interrupt at once.
        ready, _, _ = select.select([sys.stdin], [], [], PROMPT_POLL_S)
        if ready:
            break
    answer = sys.stdin.readline()
    if not answer:  # end of input (Ctrl-D)
        click.echo()
        raise click.Abort()
    if answer.strip().lower() not in ("y", "yes"):
        raise click.Abort()
    return True


@main.command()
@click.argument("config", type=click.Path(dir_okay=True, path_type=str))
@click.option("--name", "fleet_name", help="Fleet name (default: the config's `name`, else its file name).")
@click.option("--dryrun", is_flag=True, help="Plan and validate every task with SkyPilot, launch nothing, write "
                                             "nothing: says what would be launched.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation before launching.")
@click.option("--parallel", type=click.IntRange(min=1), default=DEFAULT_PARALLEL, show_default=True,
              help="Launches in flight at once.")
@click.option("--max-rounds", type=click.IntRange(min=1), default=DEFAULT_MAX_ROUNDS, show_default=True,
              help="Launch rounds at most: the first, plus one re-plan after each round that found an offer "
                   "without capacity (1: never re-plan).")
@click.option("--retry-until-up", is_flag=True, help="Let SkyPilot keep retrying an offer until it has capacity "
                                                     "(instead of re-planning onto other offers).")
@click.option("--idle-minutes-to-autostop", "-i", type=click.IntRange(min=0),
              help="Stop (with --down: tear down) each cluster after this many idle minutes.")
@click.option("--down", "autodown", is_flag=True, help="Tear clusters down instead of stopping them when idle "
                                                       "(needs --idle-minutes-to-autostop).")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON on stdout (needs -y when "
                                                      "anything is to be launched or torn down).")
@click.option("--no-router", is_flag=True, help="Launch no router (the fleet's one endpoint); serve the replicas "
                                                "yourself, e.g. with `melange-sky serve FLEET`.")
@click.option("--no-shrink", is_flag=True, help="Keep every replica that is up, even when a fresh plan needs fewer "
                                                "or another mix (the surplus is reported, not removed). Without it, "
                                                "up shrinks when the fresh plan saves over 5% of the fleet's $/h.")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=DEFAULT_DRAIN_TIMEOUT, show_default=True,
              metavar="SECONDS", help="A replica the plan no longer needs leaves the router first; its requests in "
                                      "flight get this long to finish before it is torn down.")
@click.option("--controller", type=click.Choice([HOSTED, LOCAL]),
              help="Where the fleet's controller (healing, spot fallback) runs: `hosted` on the router's host, "
                   "launched with it, so a sleeping laptop leaves nothing unhealed; `local`: run `melange-sky "
                   "watch` yourself. Default: hosted when the fleet may have spot replicas and the launcher can be "
                   "shared with the router's host (the local launcher, or a SkyPilot API server both reach).")
@click.option("--controller-interval", type=click.FloatRange(min=1), default=DEFAULT_INTERVAL_S, show_default=True,
              metavar="SECONDS", help="A hosted controller's seconds between passes.")
@click.option("--watch-args", metavar="'OPTIONS'", default="",
              help="`watch` options for the hosted controller, quoted as one argument (e.g. '--autoscale "
                   "--max-cost 20'); checked here, before anything launches.")
@fleet_backend_option
@plan_options
@solve_options
@debug_option
def up(config: str, fleet_name: str | None, dryrun: bool, yes: bool, parallel: int, max_rounds: int,
       retry_until_up: bool, idle_minutes_to_autostop: int | None, autodown: bool, as_json: bool, no_router: bool,
       no_shrink: bool, drain_timeout: float, controller: str | None, controller_interval: float,
       watch_args: str, backend: str | None, per_offer: bool, template: str | None, solve_args: SolveArgs) -> None:
    """Launch the cheapest mixed fleet for CONFIG: one SkyPilot cluster per replica, across clouds, and a router
    (a small CPU instance) as the fleet's one OpenAI-compatible endpoint.

    Every replica is recorded in the ledger ($MELANGE_SKY_HOME, default ~/.melange-sky) before its launch is
    requested. Launches run in parallel; an offer without capacity is re-planned onto others. Rerunning `up`
    reconciles with the clouds' live state: replicas up are kept, dead or preempted ones relaunched, nothing
    duplicated; when the config now needs fewer replicas or a cheaper mix, the new ones come up first, then the
    ones no longer needed leave the router, finish their requests (--drain-timeout) and are torn down.

    Clients send MELANGE_SKY_API_KEY to the router (made for the fleet when unset: it is in
    $MELANGE_SKY_HOME/keys/FLEET.json, mode 0600). The router's admin token lives only there.

    \b
    Examples:
      melange-sky up examples/example.json --dryrun
      HF_TOKEN=hf_... melange-sky up config.json -y --idle-minutes-to-autostop 60
      melange-sky up config.json --rate 5 -y          # shrink: drain, then tear down what is no longer needed
    """
    if autodown and idle_minutes_to_autostop is None:
        raise click.UsageError("--down needs --idle-minutes-to-autostop")
    cfg = solve_args.load(config, fleet_name)
    settings = plan_settings(solve_args, per_offer, template)
    on_event = None if as_json else print_event
    launcher = up_launcher(cfg.name, asked_launcher(backend))  # a fleet in the ledger: its own launcher
    hosted, note = controller_choice(cfg, settings, launcher, os.environ, controller, router=not no_router,
                                     interval=controller_interval, watch_args=_watch_args(cfg.name, watch_args))
    if note is not None:
        print_warning(note)
    if dryrun:  # writes nothing: no ledger is created on a machine that has none
        with (Ledger() if Ledger.exists() else contextlib.nullcontext()) as ledger, launcher_output():
            holds = spot_holds(ledger, cfg.name, time.time())  # the spot pools `up` would leave out, and why
            dry = dry_run(cfg, settings, launcher, ledger, os.environ, on_event=on_event, on_warning=print_warning,
                          router=not no_router, shrink=not no_shrink, controller=hosted, exclude=holds.pools,
                          notes=holds.notes)
        click.echo(json.dumps(dry.to_dict(), indent=2) if as_json else format_dryrun(dry))
        hint = None if as_json else simulate_hint(config, cfg)
        if hint:
            click.echo(hint, err=True)
        return
    secrets = launch_secrets(cfg, settings, os.environ, launcher)  # the local launcher needs no HF_TOKEN
    stdout = sys.stdout  # the preview is this command's output, not the launcher's
    shown: list[str] = []  # notes the preview printed: the summary does not repeat them

    def show(preview: Preview, notes: list[str]) -> None:
        shown.extend(notes)
        if not as_json:
            click.echo(format_preview(preview, notes), file=stdout)

    options = UpOptions(parallel=parallel, max_rounds=max_rounds, retry_until_up=retry_until_up,
                        idle_minutes_to_autostop=idle_minutes_to_autostop, down=autodown, shrink=not no_shrink,
                        drain_timeout=drain_timeout)
    router = None if no_router else router_setup(cfg, settings, os.environ, hosted)
    mode = {"mode": HOSTED, "interval": controller_interval} if hosted is not None else {"mode": LOCAL}
    with Ledger() as ledger, launcher_output(), terminations_interrupt():
        holds = spot_holds(ledger, cfg.name, time.time())  # pools `watch` (or an `up`) saw fail, as the dry run
        report = bring_up(cfg, settings, launcher, ledger, secrets, options,
                          confirm=_up_confirmation(yes, as_json), on_preview=show, on_event=on_event,
                          on_warning=print_warning, router=router, exclude=holds.pools, notes=holds.notes,
                          controller=mode)
        full = remember_unavailable(ledger, cfg.name, report.unavailable_offers, time.time())
    if full is not None:
        click.echo(f"up {cfg.name}: {full.kind}: {full.message}", err=True)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_up(report, shown))
    if report.interrupted:
        sys.exit(130)
    if not report.complete:
        sys.exit(1)


#: `watch` options a hosted controller's task sets itself (or `up` sets with its own options).
_HOSTED_OWN = ("--once", "--interval", "--json", "--from", "--backend", "--hosted", "--router-url", "--launcher-dir",
               "--debug")


def _watch_args(fleet: str, text: str) -> list[str]:
    """--watch-args as words, checked by `watch`'s own parser (a typo fails here, not on the router's host)."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--watch-args") from None
    own = [w for w in words if w.split("=", 1)[0] in _HOSTED_OWN]
    if own:
        raise click.BadParameter(f"{own[0]} is set by the hosted controller's task itself "
                                 f"(--controller-interval for its interval)", param_hint="--watch-args")
    if words:
        watch = main.get_command(click.get_current_context(), "watch")  # loaded now, and no import loop
        assert watch is not None
        try:
            watch.make_context("watch", [fleet, *words])
        except click.UsageError as exc:
            raise click.BadParameter(exc.format_message(), param_hint="--watch-args") from None
    return words


def _up_confirmation(yes: bool, as_json: bool) -> Callable[[Preview], bool]:
    """The question `up` asks before launching or tearing down; with --json only -y answers it."""
    def confirm(preview: Preview) -> bool:
        if as_json and not yes:  # a prompt would corrupt the JSON on stdout
            raise click.UsageError("up --json would launch or tear down replicas: pass -y as well")
        launching = len(preview.launch) + (preview.router is not None)
        what = "replica(s)" if preview.router is None else "cluster(s), the router included"
        actions = [f"launch {launching} {what} (+${preview.launch_cost:.2f}/h)"] if launching else []
        actions += [f"tear down {len(preview.remove)} that are not serving"] if preview.remove else []
        actions += ([f"drain and tear down {len(preview.drain)} no longer needed (-${preview.drain_saving:.2f}/h)"]
                    if preview.drain else [])
        return confirm_or_refuse(f"Fleet {preview.plan.fleet}: {' and '.join(actions)}?", yes)

    return confirm


def print_event(event: ReplicaEvent) -> None:
    click.echo(format_event(event), err=True)


def print_warning(message: str) -> None:
    warn([message])


@main.command()
@click.argument("fleet_name", metavar="[FLEET]", required=False)
@click.option("--refresh", is_flag=True, help="Ask each fleet's launcher (the one it was brought up with) for "
                                              "each cluster's live state and endpoint first, and record it.")
@click.option("--json", "as_json", is_flag=True, help="Print fleets and replicas as JSON on stdout.")
@fleet_backend_option
@debug_option
def status(fleet_name: str | None, refresh: bool, as_json: bool, backend: str | None) -> None:
    """Show every fleet (or FLEET): replicas, their state, endpoint and $/h, from the ledger.

    \b
    Examples:
      melange-sky status
      melange-sky status llama2-chat --refresh --json
    """
    with Ledger() as ledger, launcher_output():
        launchers = fleet_launchers(ledger, [fleet_name] if fleet_name else None,
                                    asked_launcher(backend)) if refresh else {}  # each fleet's own
        report = Fleet(None, ledger, launchers=launchers).status_report(fleet_name, refresh)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_status(report))
    if not as_json:
        for name, view in sorted(report.controllers.items()):
            click.echo(view.line(name))


@main.command()
@click.argument("fleet_name", metavar="[FLEET]", required=False)
@click.option("--all", "all_fleets", is_flag=True, help="Tear down every fleet in the ledger.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--purge", is_flag=True, help="Forget clusters SkyPilot cannot tear down cleanly (may leave cloud "
                                            "resources behind: check your cloud console).")
@click.option("--parallel", type=click.IntRange(min=1), default=DEFAULT_PARALLEL, show_default=True,
              help="Teardowns in flight at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON on stdout.")
@fleet_backend_option
@debug_option
def down(fleet_name: str | None, all_fleets: bool, yes: bool, purge: bool, parallel: int, as_json: bool,
         backend: str | None) -> None:
    """Tear down FLEET (or --all): every replica's cluster, concurrently.

    Each fleet is torn down through the launcher it was brought up with (the ledger records it); a cluster that
    launcher no longer knows counts as gone. The fleet leaves the ledger only when all its
    clusters are gone; failures are kept and retried by the next `down`.

    A FLEET the ledger does not hold (already down, or never up: check the name with `melange-sky status`) is a
    no-op that says so and exits 0, as `sky down` does for a cluster it does not know: a retried or scripted `down`
    never fails for having nothing left to do. (`status FLEET` exits 2 for it: there is nothing to show.)

    Exit codes: 0 every fleet named is gone (or was not in the ledger), 1 a teardown failed (the fleet stays in
    the ledger), 2 bad input, 3 a fleet is busy (another melange-sky process holds it), 130 interrupted.

    \b
    Examples:
      melange-sky down llama2-chat
      melange-sky down --all -y
    """
    if all_fleets == bool(fleet_name):
        raise click.UsageError("name one FLEET or pass --all")
    with Ledger() as ledger:
        names = [f.name for f in ledger.fleets()] if all_fleets or not fleet_name else [fleet_name]
        known = [n for n in names if ledger.get_fleet(n) is not None]
        launchers = fleet_launchers(ledger, known, asked_launcher(backend))  # each fleet's own, checked first
        if known:
            confirm_or_refuse(f"Tear down {', '.join(known)}? Their clusters and disks are deleted.", yes)
        fleet = Fleet(None, ledger, on_event=None if as_json else print_event, launchers=launchers)
        with launcher_output():
            reports = [fleet.down(name, purge=purge, parallel=parallel) for name in names]
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2) if as_json
                   else "\n".join(format_down(r) + (f"\n{r.fleet}: {r.controller}" if r.controller else "")
                                  for r in reports) or "No fleets in the ledger: nothing to tear down.")
    if any(r.failed for r in reports):
        sys.exit(1)
    if any(r.busy for r in reports):
        sys.exit(3)
