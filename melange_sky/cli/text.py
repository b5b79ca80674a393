"""Human-readable text for results: the tables and lines the commands print. No printing here."""
from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from melange_sky.deploy.router_task import router_certfile
from melange_sky.errors import ServeError
from melange_sky.fleet.ledger import ReplicaRecord, ReplicaState
from melange_sky.serve.routes import bucket_edges
from melange_sky.solver.result import COMPARISON_SECONDS, Baseline, SolveResult

if TYPE_CHECKING:  # pragma: no cover
    from melange_sky.fleet.reports import (ControllerView, DownReport, DryRunReport, Preview, ReplicaEvent,
                                           StatusReport, UpReport)
    from melange_sky.core.config import Config
    from melange_sky.deploy.plan import Plan, ReplicaPlan


#: Hours in a month for $/month figures (365 x 24 / 12, the clouds' own convention).
HOURS_PER_MONTH = 730


def per_month(cost_per_hour: float) -> str:
    """"$4,891/month" for $6.70/h, run around the clock."""
    return f"${cost_per_hour * HOURS_PER_MONTH:,.0f}/month"


#: What a comparison line says when its time limit stopped it (`solver.result.COMPARISON_SECONDS`).
CUT_SHORT = f"not proven optimal; a comparison gets at most {COMPARISON_SECONDS:g} s"


def format_solve(result: SolveResult) -> str:
    """The `melange-sky solve` report: the fleet, single-GPU baselines, the saving, and a cheaper alternative.
    With `--per-offer`, offers with no replica are left out of the table (counted below it)."""
    lines = [f"Fleet for {result.name}: formulation {result.formulation}, slice_factor {result.slice_factor}, "
             f"{result.total_request_rate:,g} req/s, headroom {100 * result.headroom:g}%", ""]
    shown = [g for g in result.gpus if g.count or g.entry in (None, g.name)]
    markets = result.markets
    if markets is not None:
        shown = [g for g in result.gpus if g.count or (g.entry in (None, g.name) and g.market != "spot")]
    rows: list[tuple[str, ...]] = [
        (_column_label(g.name, g.gpus_per_instance), f"{g.count:,}", _price(g.price), f"{g.cost:,.2f}",
         "-" if g.utilisation is None else f"{100 * g.utilisation:.1f}%") for g in shown]
    rows.append(("total", f"{result.replicas:,}", "", f"{result.cost:,.2f}", ""))
    headers: tuple[str, ...] = ("GPU", "count", "$/h each", "$/h", "utilisation")
    if markets is not None:  # where each column runs, and on which market
        rows = [(*row, g.market.replace("_", "-"), f"{g.cloud or '-'}:{g.region or '-'}")
                for row, g in zip(rows, shown)] + [(*rows[-1], "", "")]
        headers += ("market", "where")
    table = _table(headers, rows, right={1, 2, 3, 4})
    lines += table
    if len(shown) < len(result.gpus):
        lines.append(f"  ({len(result.gpus) - len(shown)} offers with no replica not shown)")
    lines.append(f"  ${result.cost:,.2f}/h = {per_month(result.cost)} ({HOURS_PER_MONTH} h)")
    if markets is not None:
        lines += format_markets(result)

    lines += ["", "Single-GPU-type fleets:"]
    width = len(table[0]) - len(table[0].lstrip()) + max(len(r[0]) for r in rows) - 2
    count_width = max([5] + [len(f"{b.count:,}") for b in result.baselines if b.count])
    best = result.best_baseline
    for b in result.baselines:
        if b.cost is None or not b.count:
            lines.append(f"  {b.gpu:<{width}}  {'cannot serve alone' if b.proven else 'cut short'}: {b.reason}")
            continue
        mark = "  <- cheapest" if best is not None and b.gpu == best.gpu else ""
        mark += "" if b.proven else f"  (cut short: {CUT_SHORT})"
        if _plain(result, b):
            lines.append(f"  {b.gpu:<{width}}  {b.count:>{count_width},} x ${b.cost / b.count:,.2f} = "
                         f"${b.cost:,.2f}/h{mark}")
        else:
            lines.append(f"  {b.gpu:<{width}}  {baseline_fleet(result, b)} = ${b.cost:,.2f}/h{mark}")
    if best is None or best.cost is None or result.saving is None:
        lines.append("No single GPU type can serve this workload alone: the mix is the only fleet.")
    elif result.saving > 1e-9:
        lines.append(f"The mix saves ${result.saving:,.2f}/h ({100 * result.saving / best.cost:.1f}%) against "
                     f"{baseline_fleet(result, best)}.")
    else:
        lines.append(f"No saving: the cheapest fleet is {baseline_fleet(result, best)} alone.")

    alt = result.alternative
    if alt is not None:
        saving = result.cost - alt.cost
        fleet = " + ".join(f"{name} x{count}" for name, count in alt.counts.items() if count)
        lines.append(f"--formulation {alt.formulation} would cost ${alt.cost:.2f}/h (saves ${saving:.2f}/h, "
                     f"{100 * saving / result.cost:.1f}%): {fleet}, by dividing buckets across GPU types in any "
                     f"proportion.")
    lines.append("")
    lines.append(f"Solved by {result.solver} in {result.solve_seconds:.2f} s ({result.status}).")
    if result.status != "optimal" and result.lower_bound is not None:
        lines.append(f"Not proven optimal within the time limit: the optimum lies between "
                     f"${result.lower_bound:.2f}/h and ${result.cost:.2f}/h. Raise --time-limit to keep searching"
                     + (", or use --formulation split (proven in seconds with spot, never dearer)."
                        if markets is not None and result.formulation == "slices" else "."))
    return "\n".join(lines)


def format_markets(result: SolveResult) -> list[str]:
    """The `spot` block's lines: replicas and $/h per market, the floor kept, the spread, and what spot saves
    against the same plan all on-demand and what the floor costs against floor 0."""
    m = result.markets
    assert m is not None
    parts = [f"{label} {result.market_count(market):,} (${result.market_cost(market):,.2f}/h)"
             for market, label in (("on_demand", "on-demand"), ("spot", "spot"), ("owned", "owned"))
             if market != "owned" or result.market_count(market)]
    spot = sum(m.spot_gpus.values())
    spread = ", ".join(f"{region} {n}" for region, n in m.spot_gpus.items()) or "none"
    lines = ["", "Markets: " + ", ".join(parts) + ".",
             f"  Floor {100 * m.floor:g}%: the on-demand and owned replicas alone can carry "
             f"{100 * m.reliable_share:.1f}% of every bucket.",
             f"  Spot GPUs per region (at most {100 * m.max_region_share:g}% of {spot:,} in one): {spread}."]
    if m.on_demand_cost is None:
        lines.append("  All on-demand: no fleet (none fits without spot, or none was found in time).")
    elif "on_demand" in m.cut_short:
        saving = m.on_demand_cost - result.cost
        lines.append(f"  All on-demand: at most ${m.on_demand_cost:,.2f}/h; spot saves up to ${saving:,.2f}/h "
                     f"(cut short: {CUT_SHORT}).")
    else:
        saving = m.on_demand_cost - result.cost
        lines.append(f"  All on-demand: ${m.on_demand_cost:,.2f}/h; spot saves ${saving:,.2f}/h "
                     f"({100 * saving / m.on_demand_cost:.1f}%).")
    if m.no_floor_cost is not None and "no_floor" in m.cut_short:
        lines.append(f"  The floor costs at least ${result.cost - m.no_floor_cost:,.2f}/h (with floor 0: at most "
                     f"${m.no_floor_cost:,.2f}/h; cut short: {CUT_SHORT}).")
    elif m.no_floor_cost is not None:
        lines.append(f"  The floor costs ${result.cost - m.no_floor_cost:,.2f}/h (with floor 0: "
                     f"${m.no_floor_cost:,.2f}/h).")
    return lines


def _column_label(name: str, gpus_per_instance: int) -> str:
    """A column's name, saying where its count means instances of several GPUs."""
    return f"{name} ({gpus_per_instance}-GPU instance)" if gpus_per_instance > 1 else name


def _plain(result: SolveResult, baseline: Baseline) -> bool:
    """A baseline of one single-GPU column: "12 x $1.01" says it all."""
    sizes = {g.name: g.gpus_per_instance for g in result.gpus}
    return len(baseline.counts) <= 1 and all(sizes.get(c, 1) == 1 for c in baseline.counts)


def baseline_fleet(result: SolveResult, baseline: Baseline) -> str:
    """A single-GPU-type fleet in words: "12 x A100-80GB", "1 x 8-GPU instance + 4 x A100-80GB"."""
    sizes = {g.name: g.gpus_per_instance for g in result.gpus}
    by_size: dict[int, int] = {}
    for column, n in baseline.counts.items():
        by_size[sizes.get(column, 1)] = by_size.get(sizes.get(column, 1), 0) + n
    if not by_size:
        return f"{baseline.count:,} x {baseline.gpu}"
    parts = [f"{n:,} x {k}-GPU instance" if k > 1 else f"{n:,} x {baseline.gpu}"
             for k, n in sorted(by_size.items(), reverse=True)]
    return " + ".join(parts)


def format_offers(offers: list, sources: dict[str, str] | None = None) -> str:
    """The `melange-sky catalog` table: one offer per line, cheapest per GPU first, and where prices come from.

    `offers` are `melange_sky.catalog.Offer`s; `sources` maps cloud -> the file its prices were read from.
    """
    if not offers:
        return "No offers."
    header = ("GPU", "cloud", "region", "instance type", "GPUs", "$/h", "$/GPU/h", "spot $/h", "source")
    rows = [(o.gpu, o.cloud, o.region, o.instance_type, str(o.gpu_count), f"{o.price:.3f}",
             f"{o.price_per_gpu:.3f}", "-" if o.spot_price is None else f"{o.spot_price:.3f}", o.source)
            for o in offers]
    lines = _table(header, rows, right={4, 5, 6, 7}, indent="")
    if sources:
        lines += ["", "Prices per hour, on demand and spot, per instance; $/GPU/h divides by the GPUs per instance.",
                  *(f"  {cloud}: {path}" for cloud, path in sources.items())]
    return "\n".join(lines)


# ---- melange-sky workload / profile ----------------------------------------------------------------------------------
def format_matrix(key: str, matrix: list[list[float]]) -> str:
    """`"key": [[...], ...]` with one row per line, to paste into a config."""
    rows = ",\n".join("    " + json.dumps(row) for row in matrix)
    return f'"{key}": [\n{rows}\n]'


# ---- plan, up, status, down ----------------------------------------------------------------------------------------
#: A launcher's own price list in a validation detail ("(Azure Standard_NC24ads_A100_v4 $3.67/h; ...)"): the
#: catalog's price, which differs from the plan's where the config gives its own cost. One price per replica: ours.
_LAUNCHER_PRICES = re.compile(r" \((?:[^()$;]+ \$[\d.,]+/h(?:; )?)+\)")

_MARKS = {ReplicaState.UP: "✓", ReplicaState.FAILED: "⨯", ReplicaState.UNAVAILABLE: "↺", ReplicaState.GONE: "✓",
          ReplicaState.PENDING: "·", ReplicaState.LAUNCHING: "…", ReplicaState.TERMINATING: "…",
          ReplicaState.STOPPED: "■"}


def format_plan(plan: Plan) -> str:
    """The `melange-sky plan` report: one line per replica with its offer and price, then the total."""
    lines = [f"Plan for fleet {plan.fleet}: {len(plan.replicas)} replicas, template {plan.template}, "
             f"model {plan.deployment.model}", ""]
    rows = [(r.cluster, r.gpu, r.cloud or "-", r.region or "-", r.instance_type or "-", _gpus(r.accelerators),
             _price(r.price)) for r in plan.replicas]
    lines += _table(("replica", "GPU", "cloud", "region", "instance type", "GPUs", "$/h"), rows, right={5, 6})
    lines += [""] + _plan_totals(plan)
    return "\n".join(lines)


def _price(price: float) -> str:
    """A replica's $/h, the same wherever it is shown (solve, plan, the dry run)."""
    return f"{price:,.4g}" if price < 1000 else f"{price:,.0f}"


def _gpus(accelerators: str) -> str:
    _, _, count = accelerators.partition(":")
    return count or "1"


def _plan_totals(plan: Plan) -> list[str]:
    """The plan's $/h and $/month, where it runs, and what it saves (or what another formulation would)."""
    lines = [f"Total ${plan.cost:,.2f}/h ({per_month(plan.cost)}) across {', '.join(plan.clouds) or 'any cloud'}."]
    best = plan.result.best_baseline
    if best is not None and best.cost and plan.result.saving is not None and plan.result.saving > 1e-9:
        lines.append(f"Saves ${plan.result.saving:,.2f}/h ({100 * plan.result.saving / best.cost:.1f}%) against "
                     f"{baseline_fleet(plan.result, best)} alone.")
    alt = plan.result.alternative
    if alt is not None:
        lines.append(f"--formulation {alt.formulation} would cost ${alt.cost:.2f}/h "
                     f"(${plan.result.cost - alt.cost:.2f}/h less), by dividing buckets across GPU types.")
    return lines


def format_event(event: ReplicaEvent) -> str:
    """One progress line of `up` / `down`: ✓ up, ⨯ failed, ↺ no capacity (re-planned), … in progress."""
    if not event.cluster:
        return f"  ! {event.message}"
    mark = _MARKS.get(event.state, " ") if event.state else "!"
    took = f" {event.elapsed:6.1f}s" if event.elapsed else "        "
    message = f"  {event.message}" if event.message else ""
    state = event.state.value if event.state else ""
    return f"  {mark} {event.cluster:<40} {state:<12}{took}{message}"


def format_preview(preview: Preview, notes: list[str] | None = None) -> str:
    """What `up` will do, shown before it asks: the plan, and which replicas launch and which are kept."""
    lines = [format_plan(preview.plan), ""]
    if preview.keep:
        lines.append(f"Already up and kept: {len(preview.keep)} replica(s).")
    router = " and the router" if preview.router is not None else ""
    lines.append(f"To launch: {len(preview.launch)} replica(s){router}, +${preview.launch_cost:,.2f}/h "
                 f"(+{per_month(preview.launch_cost)})." if preview.launch or preview.router
                 else "Nothing to launch: every planned replica is up.")
    if preview.remove:
        lines.append(f"To tear down (not in the plan, not serving): {', '.join(preview.remove)}.")
    if preview.drain:
        lines.append(f"To drain, then tear down once the plan is up (no longer needed): "
                     f"{', '.join(r.cluster for r in preview.drain)}, -${preview.drain_saving:,.2f}/h "
                     f"(-{per_month(preview.drain_saving)}).")
    lines += [f"Note: {note}" for note in (preview.notes if notes is None else notes)]
    return "\n".join(lines)


def format_up(report: UpReport, shown: Collection[str] = ()) -> str:
    """The summary after `up`: every replica's outcome and endpoint, $/h, and what to run next. Notes in `shown`
    (those the preview printed) are not repeated."""
    up = {r.cluster for r in report.up}
    planned_up = sum(1 for r in report.plan.replicas if r.cluster in up)
    router = report.router.price_per_hour if report.router is not None and report.router.state is ReplicaState.UP \
        else None
    lines = [f"Fleet {report.fleet}: {planned_up}/{len(report.plan.replicas)} planned replicas up, "
             f"{_costs(report.cost, report.plan.cost, router)}, {report.rounds} round(s), {report.seconds:.1f} s", ""]
    lines += _live_replica_table([*report.replicas, *([report.router] if report.router is not None else [])],
                                 planned={r.cluster for r in report.plan.replicas})
    if report.drained:
        lines += ["", f"Drained and torn down {len(report.drained)} replica(s) the plan no longer needs: "
                      f"{', '.join(report.drained)}."]
    if report.endpoint:
        lines += ["", f"Endpoint: {report.endpoint}/v1  (OpenAI-compatible; clients send the key in "
                      f"$MELANGE_SKY_HOME/keys/{report.fleet}.json as 'Authorization: Bearer KEY'"
                      f"{_trust(report.router)})"]
    if report.unavailable_offers:
        lines += ["", f"No capacity on: {', '.join(report.unavailable_offers)}."]
    lines += [f"Note: {note}" for note in dict.fromkeys(report.notes) if note not in shown]
    if report.interrupted:
        lines += ["", "Interrupted. Every replica's state is in the ledger. Resume with the same `melange-sky up` "
                      f"command, or remove what was launched with `melange-sky down {report.fleet}`."]
    elif not report.complete:
        lines += ["", f"Not complete: {len(report.problems)} replica(s) not up. Rerun `melange-sky up` to retry, "
                      f"`melange-sky status {report.fleet} --refresh` to check, or "
                      f"`melange-sky down {report.fleet}` to remove the fleet."]
    return "\n".join(lines)


def format_dryrun(report: DryRunReport) -> str:
    preview = report.preview
    lines = [f"Dry run for fleet {preview.plan.fleet}: would launch {len(preview.launch)} replica(s)"
             + (f", keep {len(preview.keep)} already up" if preview.keep else "") + "; nothing was provisioned.", ""]
    rows = [(r.cluster, r.gpu, r.cloud or "-", r.region or "-", r.instance_type or "-", _gpus(r.accelerators),
             _price(r.price), report.validations[r.cluster].level.value) for r in preview.launch]
    lines += _table(("replica", "GPU", "cloud", "region", "instance type", "GPUs", "$/h", "validated"), rows,
                    right={5, 6})
    lines += [""] + _plan_totals(preview.plan)
    kinds: dict[str, list[ReplicaPlan]] = {}  # one line per kind of offer, priced as in the table
    for replica in preview.launch:
        kinds.setdefault(replica.offer, []).append(replica)
    for offer, replicas in kinds.items():
        v = report.validations[replicas[0].cluster]
        lines.append(f"Validated {offer}: {len(replicas)} replica{'s' if len(replicas) > 1 else ''} at "
                     f"${_price(replicas[0].price)}/h, {v.level.value}: {_LAUNCHER_PRICES.sub('', v.detail)}")
    lines += [f"Note: {note}" for note in dict.fromkeys([*preview.notes, *report.notes])]
    if preview.launch:
        clouds = ", ".join(preview.plan.clouds) or "the planned clouds"
        lines.append(f"A real launch needs SkyPilot credentials for {clouds}: run `sky check` and make sure it "
                     f"lists them as enabled, then rerun without --dryrun.")
        if report.missing_secrets:
            lines.append(f"It also needs {', '.join(report.missing_secrets)} set in your environment (not set now).")
    return "\n".join(lines)


def _trust(router: ReplicaRecord | None) -> str:
    """For a TLS router's endpoint line: the certificate its clients verify it with (deployment.router.tls)."""
    certfile = router_certfile(router.task) if router is not None else None
    return f" and trust the certificate {certfile}" if certfile else ""


def format_status(report: StatusReport) -> str:
    """`melange-sky status`: per fleet, its endpoint, what it costs (serving, planned, so far) and its replicas with
    state, endpoint, uptime and cost to date."""
    if not report.fleets:
        return "No fleets in the ledger. Start one with `melange-sky up CONFIG`."
    lines: list[str] = []
    for fleet in report.fleets:
        rows = report.of(fleet.name)
        counts = report.counts(fleet.name)
        serving, planned = report.serving_cost(fleet.name), report.planned_cost(fleet.name)
        router = report.routers.get(fleet.name)
        router_cost = router.price_per_hour if router is not None and router.state is ReplicaState.UP else None
        outside = f" (+{counts.up_outside_plan} outside the plan)" if counts.up_outside_plan else ""
        lines.append(f"Fleet {fleet.name}: {counts.up}/{counts.planned} up{outside}, ${serving:.2f}/h serving"
                     f"{' with the router' if router_cost is not None else ''} ({per_month(serving)}; "
                     f"{_costs(serving - (router_cost or 0.0), planned, router_cost)}), "
                     f"${report.cost_to_date(fleet.name):,.2f} so far")
        hosted = report.controllers.get(fleet.name)
        hosted = hosted if hosted is not None and hosted.mode == "hosted" else None
        missing = counts.gone_to_replace + counts.not_launched
        if missing:
            lines.append(f"  {len(missing)} planned replica(s) not running, not yet replaced: {', '.join(missing)}; "
                         f"{_relauncher(hosted)}")
        unsure = [r for r in rows if r.state in (ReplicaState.FAILED, ReplicaState.STOPPED)]
        if unsure:
            lines.append(f"  {len(unsure)} failed or stopped replica(s) may still bill (a failed launch may hold a "
                         f"cluster, a stopped one its disks): `melange-sky status {fleet.name} --refresh` checks")
        endpoint = report.endpoint(fleet.name)
        if endpoint:
            lines.append(f"  Endpoint: {endpoint}/v1  (clients send the key in $MELANGE_SKY_HOME/keys/"
                         f"{fleet.name}.json as 'Authorization: Bearer KEY'{_trust(router)})")
        elif router is not None and router.state.may_have_cluster:
            lines.append(f"  Router {router.cluster}: {router.state.value}"
                         + (f" ({router.last_error})" if router.last_error else "")
                         + ("; `melange-sky up` relaunches it (and the hosted controller on it)" if hosted is not None
                            else "; `melange-sky up` or `watch` relaunches it"))
        lines.append("")
        lines += _replica_table(report.shown(fleet.name), report)
        if counts.gone_replaced:
            lines.append(f"  ({counts.gone_replaced} gone replica(s) not shown: replaced or torn down)")
        lines.append("")
    if len(report.fleets) > 1:
        total = sum(report.serving_cost(f.name) for f in report.fleets)
        lines.append(f"All fleets: ${total:.2f}/h serving ({per_month(total)})")
    return "\n".join(lines).rstrip()


def _costs(replicas: float, planned: float | None, router: float | None) -> str:
    """The replicas' running $/h beside the plan's, each labelled, and the router's apart: `up`, `status` and `watch`
    all say which figure includes the router (the plan's never does; after a fallback the replicas may run on other
    offers than those the plan priced)."""
    text = f"replicas ${replicas:.2f}/h running" + (f", plan ${planned:.2f}/h at its offers"
                                                     if planned is not None else "")
    return text + (f", router ${router:.2f}/h" if router is not None else "")


def _relauncher(hosted: ControllerView | None) -> str:
    """Who brings missing replicas back: the hosted controller (when its next pass is due), or `up`/`watch`."""
    if hosted is None:
        return "`melange-sky up` (or `watch`) relaunches them"
    if not hosted.healthy or hosted.interval is None or hosted.age is None:
        why = f": {hosted.reason}" if hosted.reason else ""
        return f"the hosted controller relaunches them, but it is unhealthy{why}; `melange-sky up` does it too"
    due = max(hosted.interval - hosted.age, 0.0)
    return f"the hosted controller relaunches them (its next pass in about {due:.0f} s)"


def format_down(report: DownReport) -> str:
    if report.busy:
        return f"Fleet {report.fleet}: skipped: {report.busy}"
    if not (report.removed or report.already_gone or report.failed or report.fleet_removed):
        return f"Fleet {report.fleet} is not in the ledger: nothing to tear down."
    lines = [f"Fleet {report.fleet}: {len(report.removed)} torn down, {len(report.already_gone)} already gone"
             + (f", {len(report.failed)} failed" if report.failed else "") + "."]
    for cluster, reason in sorted(report.failed.items()):
        lines.append(f"  ⨯ {reason}" if reason.startswith(cluster) else f"  ⨯ {cluster}: {reason}")
    if report.fleet_removed:
        lines.append(f"Fleet {report.fleet} removed from the ledger.")
    else:
        lines.append(f"Kept in the ledger: rerun `melange-sky down {report.fleet}` to retry the failed ones.")
    return "\n".join(lines)


def _live_replica_table(replicas: list[ReplicaRecord], planned: Collection[str] = ()) -> list[str]:
    """The replicas that may have a cluster, and the `planned` ones gone (not yet replaced); the other gone ones
    (torn down, or replaced after no capacity) only counted."""
    shown = [r for r in replicas if r.state.may_have_cluster or r.cluster in planned]
    gone = len(replicas) - len(shown)
    return (_replica_table(shown)
            + ([f"  ({gone} gone replica(s) not shown: replaced or torn down)"] if gone else []))


def _replica_table(replicas: list[ReplicaRecord], report: StatusReport | None = None) -> list[str]:
    """Every row given: a gone one listed is one still to be replaced (⨯), not one torn down (✓)."""
    def mark(r: ReplicaRecord) -> str:
        return "⨯" if r.state is ReplicaState.GONE else _MARKS.get(r.state, " ")

    if report is None:
        plain = [(f"{mark(r)} {r.cluster}", r.gpu, r.offer, r.state.value,
                  r.endpoint or "-", f"{r.price_per_hour:.4g}", (r.last_error or "")[:80]) for r in replicas]
        return _table(("replica", "GPU", "offer", "state", "endpoint", "$/h", "last error"), plain)
    rows: list[tuple[str, ...]] = []
    for r in replicas:
        spent = report.usage.get(r.cluster)
        rows.append((f"{mark(r)} {r.cluster}", r.gpu, r.offer, r.state.value, r.endpoint or "-",
                     f"{r.price_per_hour:.4g}", _duration(spent.uptime_seconds) if spent else "-",
                     f"{spent.cost_to_date:,.2f}" if spent else "-", (r.last_error or "")[:80]))
    return _table(("replica", "GPU", "offer", "state", "endpoint", "$/h", "uptime", "$ so far", "last error"), rows,
                  right={5, 6, 7})


def _duration(seconds: float) -> str:
    """"-" when not up, else "42s", "17m", "3h05m", "2d04h"."""
    if seconds <= 0:
        return "-"
    minutes, hours = int(seconds // 60), int(seconds // 3600)
    if seconds < 60:
        return f"{int(seconds)}s"
    if hours < 1:
        return f"{minutes}m"
    if hours < 48:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _table(headers: tuple[str, ...], rows: Sequence[Sequence[object]], right: Collection[int] = frozenset(),
           indent: str = "  ") -> list[str]:
    """Aligned text columns (those in `right` right-aligned, for numbers), one line per row, header first."""
    widths = [max([len(h)] + [len(str(row[k])) for row in rows]) for k, h in enumerate(headers)]
    fmt = indent + "  ".join(f"{{:{'>' if k in right else '<'}{w}}}" for k, w in enumerate(widths))
    return [fmt.format(*headers).rstrip()] + [fmt.format(*map(str, row)).rstrip() for row in rows]


def simulate_hint(path: str, config: Config) -> str | None:
    """The one line `solve` and `up --dryrun` print after a plan: how to check it on real traffic first; None when
    the config cannot be simulated (no bucket edges for its routes)."""
    try:
        bucket_edges(config)
    except ServeError:
        return None
    return f"Simulate this plan on your traffic before paying for it: melange-sky simulate {path} --trace FILE"
