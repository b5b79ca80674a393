"""`watch`: the fleet controller, one pass (`--once`) or a loop."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

import click

from melange_sky.cli.fleet import (fleet_backend_option, launcher_output, print_event, print_warning,
                                   terminations_interrupt)
from melange_sky.cli.main import INTERRUPTED, debug_option, main
from melange_sky.controller.placer import DEFAULT_SPOT_HOLD_MIN
from melange_sky.controller.rules import DEFAULT_MIN_REQUESTS, DEFAULT_SCALE_DOWN_AFTER_MIN
from melange_sky.controller.hosted import HostedLoop, hosted_backend
from melange_sky.controller.watch import DEFAULT_INTERVAL_S, Action, Controller, PassReport, WatchOptions, watch_lock
from melange_sky.errors import UnknownFleet
from melange_sky.fleet.launchers import asked_launcher, fleet_launcher
from melange_sky.fleet.fleet import DEFAULT_DRAIN_TIMEOUT, DEFAULT_PARALLEL, UpOptions
from melange_sky.fleet.ledger import Ledger
from melange_sky.inputs.trace_rates import parse_rate_percentile


@main.command()
@click.argument("fleet_name", metavar="FLEET")
@click.option("--once", is_flag=True, help="Run one pass and exit (0: the fleet is as planned; 1: the pass failed, "
                                           "left replicas missing, or --max-cost refused a plan). For cron.")
@click.option("--interval", type=click.FloatRange(min=1), default=DEFAULT_INTERVAL_S, show_default=True,
              metavar="SECONDS", help="Seconds between the starts of two passes.")
@click.option("--autoscale", is_flag=True, help="Re-plan from the traffic the fleet's router observes (its "
                                                "/workload): scale up at once, down after --scale-down-after.")
@click.option("--rate-percentile", default="95", show_default=True, metavar="P",
              help="Plan for this percentile of the router's per-minute request rates (95, p99, max), not their "
                   "mean; before a complete minute, the mean is used.")
@click.option("--scale-down-after", type=click.FloatRange(min=0), default=DEFAULT_SCALE_DOWN_AFTER_MIN,
              show_default=True, metavar="MINUTES",
              help="Scale down only once the need has stayed below the plan's rate this long; then to the highest "
                   "need seen in that time.")
@click.option("--window", "window", type=click.IntRange(min=1), metavar="MINUTES",
              help="Read the need from the router's last MINUTES complete minutes (their --rate-percentile), not "
                   "its whole hour, so a burst stops counting once this window has passed it. Default: "
                   "--scale-down-after, rounded up to a whole minute.")
@click.option("--spot-hold", type=click.FloatRange(min=0), default=DEFAULT_SPOT_HOLD_MIN, show_default=True,
              metavar="MINUTES",
              help="A spot pool (instance type and region) whose replicas were preempted, or that had no capacity, "
                   "is kept out of the plan this long (its load goes to other offers), then offered again: the load "
                   "moves back to it when that is cheaper.")
@click.option("--max-cost", type=click.FloatRange(min=0), metavar="$/H",
              help="Never bring up a plan costing more (replicas and router): it is reported and recorded, not "
                   "launched, and the fleet stays as it is.")
@click.option("--from", "workload_url", metavar="URL",
              help="Read the traffic from this `melange-sky serve` router (its endpoint as `up` prints it, with or "
                   "without /v1) instead of the fleet's own router; its key from MELANGE_SKY_API_KEY, else the "
                   "fleet's.")
@click.option("--min-requests", type=click.IntRange(min=1), default=DEFAULT_MIN_REQUESTS, show_default=True,
              help="Use the router's observed bucket shares only once it counted this many requests (else the "
                   "config's workload_distribution).")
@click.option("--no-health-check", is_flag=True,
              help="Do not probe the replicas' readiness path (when this machine cannot reach their endpoints): "
                   "only the launcher's status counts.")
@click.option("--no-shrink", is_flag=True, help="Never remove replicas that are up (scale-downs keep them).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=DEFAULT_DRAIN_TIMEOUT, show_default=True,
              metavar="SECONDS", help="How long a replica leaving the fleet may finish its requests.")
@click.option("--parallel", type=click.IntRange(min=1), default=DEFAULT_PARALLEL, show_default=True,
              help="Launches in flight at once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per pass on stdout (progress stays on "
                                                      "stderr).")
@click.option("--hosted", is_flag=True, hidden=True,
              help="Run as the fleet's hosted controller, on its router's host (the router's task starts it).")
@click.option("--router-url", hidden=True, metavar="URL", help="--hosted: the router on this host.")
@click.option("--router-cafile", hidden=True, metavar="FILE",
              help="--hosted, a TLS router: the certificate it serves (its calls are pinned to it).")
@click.option("--launcher-dir", hidden=True, metavar="DIR",
              help="--hosted: the local launcher's state directory, shared with the user's machine.")
@fleet_backend_option
@debug_option
def watch(fleet_name: str, once: bool, interval: float, autoscale: bool, rate_percentile: str,
          scale_down_after: float, window: int | None, spot_hold: float, max_cost: float | None,
          workload_url: str | None, min_requests: int, no_health_check: bool, no_shrink: bool, drain_timeout: float,
          parallel: int, as_json: bool, hosted: bool, router_url: str | None, router_cafile: str | None,
          launcher_dir: str | None, backend: str | None) -> None:
    """Keep FLEET (brought up by `melange-sky up`) serving: the controller.

    Each pass asks the clouds for every cluster's live state, and probes each replica up at its readiness path
    (deployment.readiness_path, default /health; two tries). Replicas that died, were preempted or stopped, or
    failed both probes (torn down first) are relaunched under their names by the same steps as `up`: an offer
    without capacity is re-planned onto others, and the router learns the new members. The fleet is re-planned
    from the config and settings its last `up` stored in the ledger: no config file is needed.

    With --autoscale, the pass reads the router's observed traffic and plans for the --rate-percentile of its
    per-minute rates over the last --window minutes (by default the --scale-down-after hold). A higher need than
    the plan's rate scales up at once; a lower one scales down only after it has held for --scale-down-after
    minutes, as the router's minutes show (and the need recorded each pass, so `watch --once` from cron keeps the
    hold across a router's restart). A scale-down is make-before-break: replicas no longer needed leave the router
    and drain first.

    Spot replicas the clouds take away (preempted) are relaunched elsewhere: their pool (instance type and region)
    is kept out of the plan for --spot-hold minutes, as is one where a launch found no capacity, so the load is
    re-planned on the other offers (spot in another region, another GPU type); once the hold is over the pool is
    offered again and the load moves back when that is cheaper (new replicas up first, then the others drain):
    with --per-offer plans; without it, load that went to another region of the same GPU entry stays, and the
    spot-return line says so.

    Every action is recorded in the ledger as a fleet event and printed as one line. Ctrl-C leaves the fleet as
    it is (exit 130). One controller per fleet: a second `watch` of it is refused. Secrets the replicas need
    (e.g. HF_TOKEN) must be set in this environment, as for `up`.

    A fleet brought up with `up --controller hosted` (the default with spot replicas) is watched by a controller
    running on its router's host instead; `watch` refuses it, and `status` shows that controller's last pass.

    \b
    Examples:
      melange-sky watch llama2-chat --once                      # heal once: relaunch what died
      melange-sky watch llama2-chat --autoscale --max-cost 40   # heal and follow the load, every 60 s
      melange-sky watch llama2-chat --autoscale --rate-percentile 99 --scale-down-after 30
      melange-sky watch llama2-chat --autoscale --scale-down-after 10 --window 60   # size on the last hour
      melange-sky watch demo --autoscale --from http://127.0.0.1:8080   # a fleet served by `melange-sky serve`
      */5 * * * *  melange-sky watch llama2-chat --once --autoscale --json >> watch.jsonl   # from cron
    """
    options = WatchOptions(autoscale=autoscale, rate_percentile=parse_rate_percentile(rate_percentile),
                           scale_down_after_s=scale_down_after * 60, window_min=window, max_cost=max_cost,
                           workload_url=workload_url, min_requests=min_requests, health_check=not no_health_check,
                           spot_hold_s=spot_hold * 60, hosted=hosted,
                           up=UpOptions(parallel=parallel, shrink=not no_shrink, drain_timeout=drain_timeout))
    if hosted and not router_url:
        raise click.UsageError("--hosted needs --router-url")
    if router_cafile and not hosted:
        raise click.UsageError("--router-cafile goes with --hosted")
    with Ledger() as ledger:
        launcher = (hosted_backend(backend, launcher_dir) if hosted  # the fleet's own (recorded) launcher
                    else fleet_launcher(ledger.get_fleet(fleet_name), asked_launcher(backend)))
        controller = Controller(fleet_name, launcher, ledger, os.environ, options,
                                on_action=_print_action(fleet_name), on_event=print_event,
                                on_warning=print_warning)
        run: Callable[[], PassReport | None] = controller.run_pass
        if hosted:
            assert router_url is not None
            run = HostedLoop(controller, router_url, os.environ, on_action=_print_action(fleet_name),
                             on_warning=print_warning, router_cafile=router_cafile).step
        else:
            controller.check()
        lock = watch_lock(ledger, fleet_name)
        stdout = sys.stdout  # the passes' JSON: this command's output, not the launcher's (sent to stderr)
        try:
            with launcher_output(), terminations_interrupt():
                code = _loop(controller.fleet, run, once, interval, as_json, stdout)
        except KeyboardInterrupt:
            code = INTERRUPTED
        finally:
            lock.release()
    if code == INTERRUPTED:
        click.echo(f"Interrupted: fleet {fleet_name} is left as it is.", err=True)
    sys.exit(code)


def _loop(fleet: str, run: Callable[[], PassReport | None], once: bool, interval: float, as_json: bool,
          stdout: TextIO) -> int:
    """Passes until --once is done, the fleet is gone, or Ctrl-C; the exit code. A pass of None (a hosted
    controller the fleet was not handed to yet) waits for the next interval."""
    while True:
        started = time.monotonic()
        try:
            report = run()
        except UnknownFleet:
            click.echo(f"Fleet {fleet} is no longer in the ledger (`down`?): nothing left to watch.", err=True)
            return 0
        if report is None:
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
            continue
        if as_json:
            click.echo(json.dumps(report.to_dict()), file=stdout)
        else:
            click.echo(_summary(report), err=True)
        if report.interrupted:
            return INTERRUPTED
        if once:
            return 0 if report.ok else 1
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def _print_action(fleet: str) -> Callable[[Action], None]:
    def show(action: Action) -> None:
        click.echo(f"watch {fleet}: {action.kind}: {action.message}", err=True)

    return show


def _summary(report: PassReport) -> str:
    state = "failed" if report.error else "interrupted" if report.interrupted else "ok" if report.ok else "incomplete"
    acted = f"{len(report.actions)} action(s)" if report.actions else "nothing to do"
    return f"watch {report.fleet}: pass {state} in {report.seconds:.1f} s: {acted}"
