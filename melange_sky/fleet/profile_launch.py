"""`profile --launch`: each GPU type's `tputs` measured on a replica launched for the purpose, then torn down.

Measuring a GPU type used to take a launch by hand, a `profile`, and remembering the teardown. Here the replicas are
one fleet (`<config name>-profile`) brought up through the launcher like any other (`Fleet.up`: recorded in the
ledger before each launch, so `status` shows them and `down --all` finds any a crash left), one replica per GPU
type, rendered from the config's template and engine settings (a GPU type the config lacks is priced from the
catalog). Each replica is profiled as soon as it answers, all of them at once (a thread each: the profiles share no
server), and the fleet is torn down whatever happens: after the profiles, after a failure, after Ctrl-C (held, as
`up` holds it, so the teardown itself is never cut short).

A local launcher (`--backend local`) runs emulated GPUs `speed` times faster than real: its replicas are profiled
with every SLO / speed, and the rates found are divided by speed, so what is written is the real GPU's tputs. Each
profile record says what it measured (`ProfileResult.gpu`, `emulated`, `speed`): `--calibrate` refuses to fit the
engine model to a local replica (the engine model itself, plus HTTP overhead the speed-up does not scale) unless
forced.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from melange_sky._signals import signals_held
from melange_sky.core.config import Config, parse_config, pinned_gpus, tensor_parallel_size
from melange_sky.core.config_doc import MergeResult, gpu_entries, new_gpu_entry
from melange_sky.core.gpus import same_gpu
from melange_sky.deploy.offers import bind_offers, catalog_pricer
from melange_sky.deploy.plan import Plan, PlanSettings, deployment_from_config, make_plan
from melange_sky.engine.calibrate import CalibrationResult, calibrate
from melange_sky.engine.errors import EngineError
from melange_sky.engine.estimate import max_rates
from melange_sky.engine.models import load_model
from melange_sky.engine.settings import EngineSettings
from melange_sky.errors import MelangeError, ProfileError
from melange_sky.fleet.backends import Backend, needs_model_secrets
from melange_sky.fleet.fleet import Fleet, UpOptions
from melange_sky.fleet.ledger import Ledger, ReplicaState
from melange_sky.fleet.local import launch_speed
from melange_sky.fleet.reports import DownReport, ReplicaEvent
from melange_sky.fleet.up import config_digest, fleet_record, secrets_from_env
from melange_sky.inputs.profile import profile_endpoint
from melange_sky.inputs.profile_result import (Cell, ProfileEvent, ProfileResult, ProfileSettings,
                                               merge_profile)
from melange_sky.solver.model import Formulation, SolveStatus
from melange_sky.solver.result import GpuAllocation, SolveResult

__all__ = ["DEFAULT_READY_TIMEOUT", "GpuProfile", "LaunchProfileReport", "LaunchProfileRequest", "launched_record",
           "merge_profiles", "profile_fleet_name", "profile_launched", "real_time"]

#: How long a replica may take, once launched, to answer its readiness path (a vLLM server loads its weights).
DEFAULT_READY_TIMEOUT = 1200.0
READY_POLL_S = 0.5
#: Seconds one readiness request may take.
_READY_REQUEST_S = 5.0
#: After the teardown, how long a profile thread gets to notice (its server is gone: it fails fast).
_THREAD_JOIN_S = 10.0
#: While the profiles run, how soon a held Ctrl-C is seen.
_JOIN_POLL_S = 0.2
#: With `start_at_estimate`, the first rate tried, as a share of the estimate (the lowest over the buckets measured).
ESTIMATE_START_SHARE = 0.8
#: ... and the rate grows by this factor while the SLOs hold (not x2): from just below the answer, doubling would
#: overshoot into an overload that takes a step to drain, and bills for it.
ESTIMATE_GROWTH = 1.3
#: What a GPU entry of the config keeps for its profiling replica: where it runs and what it costs, not its limits.
_ENTRY_KEYS = ("cost", "cloud", "region", "instance_type", "accelerators", "use_spot")


@dataclass(frozen=True)
class LaunchProfileRequest:
    """What to measure: `gpus` (one replica each) serving `model`, the config object (`read_config_object`; None:
    a default deployment) whose template, engine settings and clouds the replicas use, its buckets and the
    profile's settings (SLOs in real time)."""

    gpus: tuple[str, ...]
    model: str
    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    settings: ProfileSettings
    config: Mapping[str, Any] | None = None
    source: str = "<config>"
    name: str = "melange"  # the config's name: the fleet is `<name>-profile`
    cells: Sequence[Cell] | None = None
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    #: Start each GPU type's search just below the engine model's estimate (where it knows the GPU and model)
    #: instead of at `settings.start_rate`: fewer steps, so less time billed.
    start_at_estimate: bool = False


@dataclass(frozen=True)
class GpuProfile:
    """One GPU type's outcome: its replica, what it cost, and its profile (in real time) or why there is none."""

    gpu: str
    cluster: str
    price: float  # $/h of the replica's instance
    seconds: float  # billed: from the launch request until its teardown returned
    result: ProfileResult | None = None
    error: str | None = None
    calibration: CalibrationResult | None = None
    calibration_note: str | None = None
    #: GPUs of the replica's instance: its server answers for all of them (k / TP data-parallel engines,
    #: templates/vllm.j2), so the config's per-GPU tputs are its rates / gpus (`merge_profiles`)
    gpus: int = 1

    @property
    def cost(self) -> float:
        return self.price * self.seconds / 3600


@dataclass
class LaunchProfileReport:
    """What `profile --launch` did: per GPU type its profile and cost, whether it was interrupted, the teardown."""

    fleet: str
    speed: float
    launcher: str = ""
    gpus: list[GpuProfile] = field(default_factory=list)
    interrupted: bool = False
    teardown: DownReport | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cost(self) -> float:
        return sum(g.cost for g in self.gpus)

    @property
    def left(self) -> list[str]:
        """Clusters the teardown could not remove (`down FLEET` retries them); [] when nothing is left."""
        if self.teardown is None:
            return []
        return sorted(self.teardown.failed) + ([] if self.teardown.busy is None else [self.fleet])

    @property
    def failed(self) -> list[GpuProfile]:
        return [g for g in self.gpus if g.result is None]

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "launcher": self.launcher, "speed": self.speed, "interrupted": self.interrupted,
                "seconds": round(self.seconds, 2), "cost": round(self.cost, 6), "notes": list(self.notes),
                "left": self.left,
                "gpus": {g.gpu: {"cluster": g.cluster, "instance_gpus": g.gpus, "price": g.price,
                                 "seconds": round(g.seconds, 2), "cost": round(g.cost, 6), "error": g.error,
                                 "profile": g.result.to_dict() if g.result is not None else None,
                                 "calibration": g.calibration.to_json() if g.calibration is not None else None,
                                 "calibration_note": g.calibration_note}
                         for g in self.gpus}}


def profile_fleet_name(name: str) -> str:
    return f"{name}-profile"


# ---- the plan: one replica per GPU type ----------------------------------------------------------------------------
def _profiling_config(request: LaunchProfileRequest) -> Config:
    """The config the profiling fleet is planned from: the user's deployment (its model replaced), clouds and bucket
    shape, and one GPU entry per type asked for (the config's own, for where it runs and its price, else a new one
    the catalog prices)."""
    given = dict(request.config or {})
    rows, cols = len(request.input_edges) - 1, len(request.output_edges) - 1
    gpu_info: dict[str, Any] = {}
    tp = tensor_parallel_size(given.get("deployment"))
    for gpu in request.gpus:
        # a GPU type the config lacks gets, under tensor parallelism, the pin a TP replica needs (as --into adds it)
        own = next((e for _path, name, e in gpu_entries(given.get("gpu_info")) if same_gpu(name, gpu)),
                   new_gpu_entry(gpu, tp))
        gpu_info[gpu] = {**{k: own[k] for k in _ENTRY_KEYS if k in own}, "tputs": [[1.0] * cols] * rows}
    deployment = dict(given.get("deployment") or {})
    deployment["model"] = request.model
    data: dict[str, Any] = {
        "name": profile_fleet_name(request.name), "gpu_info": gpu_info,
        "workload_distribution": [[1.0] * cols] * rows, "total_request_rate": 1.0,
        "input_buckets": list(request.input_edges), "output_buckets": list(request.output_edges),
        "deployment": deployment}
    if given.get("clouds") is not None:
        data["clouds"] = given["clouds"]
    return parse_config(data, source=request.source, price=catalog_pricer())


def _plan(config: Config) -> Plan:
    """One replica of each GPU type, on the offer the catalog binds it to (no solve: the counts are given)."""
    bound = bind_offers(config)
    deployment = deployment_from_config(bound.config)
    allocations = [GpuAllocation(name=g.name, count=1, price=g.cost, load=0.0, utilisation=0.0,
                                 cloud=g.cloud, region=g.region, market=g.market or "on_demand")
                   for g in bound.config.gpus]
    result = SolveResult(name=config.name, source=config.source, formulation=Formulation.SLICES, slice_factor=1,
                         headroom=1.0, total_request_rate=0.0, solver="profile --launch",
                         status=SolveStatus.OPTIMAL, solve_seconds=0.0, gpus=allocations, routing=[], baselines=[])
    return make_plan(bound.config, result, deployment, offers={n: o.to_dict() for n, o in bound.offers.items()})


def _speed(backend: Backend, config: Config) -> float:
    """How many times faster than real the launcher runs the replicas: the local launcher's speed, else 1."""
    if backend.name != "local":
        return 1.0
    env_speed = launch_speed(None)  # $MELANGE_SKY_LOCAL_SPEED, else 1
    if env_speed != 1.0:
        return env_speed
    local = config.deployment.get("local")
    speed = local.get("speed") if isinstance(local, Mapping) else None
    return float(speed) if isinstance(speed, int | float) and not isinstance(speed, bool) and speed > 0 else 1.0


def _at_speed(settings: ProfileSettings, speed: float) -> ProfileSettings:
    """The settings to profile a replica `speed` times faster than real with: every SLO / speed, every rate x speed
    (the settings are the real GPU's)."""
    if speed == 1.0:
        return settings
    return dataclasses.replace(
        settings, start_rate=settings.start_rate * speed, max_rate=settings.max_rate * speed,
        min_rate=settings.min_rate * speed,
        tpot_slo_ms=None if settings.tpot_slo_ms is None else settings.tpot_slo_ms / speed,
        ttft_slo_ms=None if settings.ttft_slo_ms is None else settings.ttft_slo_ms / speed,
        latency_slo_ms=None if settings.latency_slo_ms is None else settings.latency_slo_ms / speed)


def real_time(result: ProfileResult, settings: ProfileSettings, speed: float) -> ProfileResult:
    """A profile of a replica `speed` times faster than real, as the real GPU's: each bucket's tput / speed, the
    SLOs the real ones (`settings`). Its steps stay as measured (rates x speed, times / speed)."""
    if speed == 1.0:
        return result
    buckets = tuple(dataclasses.replace(b, tput=b.tput / speed) for b in result.buckets)
    return dataclasses.replace(result, buckets=buckets, settings=settings, tpot_slo_ms=settings.tpot_slo_ms)


def launched_record(result: ProfileResult, settings: ProfileSettings, speed: float, gpu: str, *,
                    emulated: bool) -> ProfileResult:
    """A launched replica's profile as its record: in real time (`real_time`), saying what it measured — the GPU
    type, and whether the replica was the local launcher's emulator and at what speed — for `estimate --calibrate`
    (and `--calibrate` here) to refuse fitting the engine model to an emulator, or to another GPU type."""
    return dataclasses.replace(real_time(result, settings, speed), gpu=gpu, emulated=emulated,
                               speed=speed if emulated else None)


# ---- waiting and profiling -----------------------------------------------------------------------------------------
class _Stopped(Exception):
    """Raised from a profile's progress callback once the command stops: ends that profile at its next event."""


def _wait_ready(url: str, path: str, timeout: float, stop: threading.Event) -> float:
    """Poll `url + path` until it answers 200; seconds waited. Raises ProfileError after `timeout`."""
    started = time.monotonic()
    last = "no answer yet"
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url.rstrip("/") + path, timeout=_READY_REQUEST_S) as answer:  # noqa: S310
                if answer.status == 200:
                    return time.monotonic() - started
                last = f"HTTP {answer.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() - started > timeout:
            raise ProfileError(f"{url}{path} did not answer 200 within {timeout:g} s ({last})")
        stop.wait(READY_POLL_S)
    raise _Stopped


@dataclass
class _Job:
    gpu: str
    url: str
    result: ProfileResult | None = None
    error: str | None = None


def profile_launched(request: LaunchProfileRequest, backend: Backend, ledger: Ledger,
                     environ: Mapping[str, str], *, calibrate_fits: bool = False, force_fits: bool = False,
                     on_replica: Callable[[ReplicaEvent], None] | None = None,
                     on_profile: Callable[[str, ProfileEvent], None] | None = None,
                     on_note: Callable[[str], None] | None = None) -> LaunchProfileReport:
    """Launch one replica per GPU type of `request`, profile each as soon as it answers (all at once), tear them all
    down, and return what was measured and what it cost. The teardown happens on success, on a failure (a launch,
    a profile) and on Ctrl-C (the report says `interrupted`); a replica it could not remove is in `report.left`.
    `environ` holds the replicas' secrets (`deployment.secrets`; one the launcher needs and is missing is an error
    before anything launches: the local launcher's emulators need no HF_TOKEN).
    Progress: `on_replica` (launches, teardown), `on_profile` (per GPU
    type, the profile's events), `on_note` (readiness). `calibrate_fits`: refit each GPU type's engine model on its
    profile (`force_fits`: save what `estimate --calibrate` would refuse, an emulated replica's or a poor fit)."""
    note = on_note or (lambda message: None)
    config = _profiling_config(request)
    deployment = deployment_from_config(config)
    secrets = {**{name: environ[name] for name in deployment.secrets if environ.get(name)},
               **secrets_from_env(deployment.needed_secrets(needs_model_secrets(backend)), environ)}
    fleet_name = config.name
    if ledger.get_fleet(fleet_name) is not None:
        raise ProfileError(f"fleet {fleet_name!r} is in the ledger already (a profile in progress, or one left "
                           f"over): `melange-sky status {fleet_name}`, and `melange-sky down {fleet_name}` to "
                           f"remove it")
    plan = _plan(config)
    speed = _speed(backend, config)
    settings = _at_speed(request.settings, speed)
    if deployment.api_key_secret and secrets.get(deployment.api_key_secret) and settings.api_key is None:
        settings = dataclasses.replace(settings, api_key=secrets[deployment.api_key_secret])
    report = LaunchProfileReport(fleet=fleet_name, speed=speed, launcher=backend.name)
    fleet = Fleet(backend, ledger, on_replica)
    stop = threading.Event()
    jobs: dict[str, _Job] = {}
    threads: list[threading.Thread] = []
    started = time.monotonic()
    try:
        up = fleet.up(fleet_name, lambda _request: plan, secrets, config_digest(config, PlanSettings()),
                      UpOptions(parallel=max(1, len(plan.replicas)), max_rounds=1, shrink=False),
                      record=fleet_record(config, PlanSettings()))
        report.interrupted = up.interrupted
        rows = {r.cluster: r for r in up.replicas}
        for replica in plan.replicas:
            row = rows.get(replica.cluster)
            if row is None or row.state is not ReplicaState.UP or row.url is None:
                why = (row.last_error if row is not None else None) or (
                    f"{row.state.value}" if row is not None else "not launched")
                report.gpus.append(GpuProfile(gpu=replica.entry, cluster=replica.cluster, price=replica.price,
                                              seconds=0.0, error=f"launch failed: {why}"))
                continue
            job = jobs[replica.cluster] = _Job(replica.entry, row.url)
            if report.interrupted:
                continue
            start = _estimated_start(request, replica.accelerators, deployment.engine) \
                if request.start_at_estimate else None
            if start is not None:
                note(f"{replica.entry}: starting at {start:.3g} req/s, {ESTIMATE_START_SHARE:g}x the engine model's "
                     f"estimate")
            own = settings if start is None else _at_speed(dataclasses.replace(
                request.settings, start_rate=start, min_rate=min(request.settings.min_rate, start),
                growth=min(request.settings.growth, ESTIMATE_GROWTH)), speed)
            if own.api_key is None and settings.api_key is not None:
                own = dataclasses.replace(own, api_key=settings.api_key)
            thread = threading.Thread(target=_run_job, name=f"melange-profile-{replica.entry}", daemon=True,
                                      args=(job, request, own, deployment.readiness_path, stop, on_profile, note))
            thread.start()
            threads.append(thread)
        if threads:
            with signals_held() as held:  # a Ctrl-C is seen here, between polls: then the teardown below
                while not held and (alive := [t for t in threads if t.is_alive()]):
                    alive[0].join(_JOIN_POLL_S)
            if held:
                report.interrupted = True
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        stop.set()
        with signals_held() as held:  # the teardown is never cut short; a second Ctrl-C only waits for it
            report.teardown = fleet.down(fleet_name)
        report.interrupted = report.interrupted or bool(held)
        ended = time.monotonic()
        for thread in threads:
            thread.join(_THREAD_JOIN_S)
    for replica in plan.replicas:
        if (done := jobs.get(replica.cluster)) is None:
            continue
        result = None if done.result is None else launched_record(
            done.result, request.settings, speed, replica.accelerators.partition(":")[0] or replica.entry,
            emulated=backend.name == "local")
        error = done.error or (None if result is not None else "interrupted before its profile ended")
        report.gpus.append(GpuProfile(gpu=replica.entry, cluster=replica.cluster, price=replica.price,
                                      seconds=ended - started, result=result, error=error,
                                      gpus=pinned_gpus(replica.accelerators) or 1))
    order = {r.entry: k for k, r in enumerate(plan.replicas)}
    report.gpus.sort(key=lambda g: order.get(g.gpu, 0))
    # a failed launch bills until it failed: only the replicas that came up count the whole time
    report.seconds = ended - started
    if calibrate_fits and not report.interrupted:
        report.gpus = [_calibrated(g, request, deployment.engine, force_fits) for g in report.gpus]
    return report


def _estimated_start(request: LaunchProfileRequest, accelerators: str, engine: EngineSettings) -> float | None:
    """The first rate to try on a GPU type (real req/s): just below the engine model's estimate of the slowest
    bucket measured; None when the engine model does not know the GPU or the model."""
    gpu = accelerators.partition(":")[0]
    try:
        # the replica's server runs gpus / TP engines (templates/vllm.j2): its rates are that many engines'
        tp = engine.tensor_parallel_size or 1
        engines = max(1, (pinned_gpus(accelerators) or 1) // tp)
        table = max_rates(load_model(request.model), [gpu], request.input_edges, request.output_edges,
                          request.settings.slo_spec, tp=tp, dtype=engine.dtype or "bf16", settings=engine,
                          size=request.settings.size)[gpu]
    except (MelangeError, ValueError):
        return None
    if table.tputs is None:
        return None
    cells = request.cells or [(i, j) for i in range(len(table.tputs)) for j in range(len(table.tputs[0]))]
    rates = [engines * table.tputs[i][j] for i, j in cells if table.tputs[i][j] > 0]
    return min(round(ESTIMATE_START_SHARE * min(rates), 4), request.settings.max_rate) if rates else None


def _run_job(job: _Job, request: LaunchProfileRequest, settings: ProfileSettings, readiness_path: str,
             stop: threading.Event, on_profile: Callable[[str, ProfileEvent], None] | None,
             note: Callable[[str], None]) -> None:
    """One replica: wait until it answers, then profile it. Never raises: the outcome is in `job`."""
    def progress(event: ProfileEvent) -> None:
        if stop.is_set():
            raise _Stopped
        if on_profile is not None:
            on_profile(job.gpu, event)

    try:
        note(f"{job.gpu}: waiting for {job.url}{readiness_path} to answer (at most {request.ready_timeout:g} s)")
        waited = _wait_ready(job.url, readiness_path, request.ready_timeout, stop)
        note(f"{job.gpu}: ready after {waited:.1f} s; profiling")
        job.result = profile_endpoint(job.url, request.model, input_edges=request.input_edges,
                                      output_edges=request.output_edges, cells=request.cells, settings=settings,
                                      on_progress=progress)
        job.result.check_usable()
    except _Stopped:
        job.result, job.error = None, "interrupted before its profile ended"
    except MelangeError as exc:
        job.result, job.error = None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one GPU's bug must not lose the others' profiles
        job.result, job.error = None, f"{type(exc).__name__}: {exc}"


def _calibrated(gpu: GpuProfile, request: LaunchProfileRequest, engine: EngineSettings,
                force: bool = False) -> GpuProfile:
    """`gpu` with the engine model's fit on its profile (`estimate --calibrate`), or why there is none (an emulated
    replica's record is refused unless `force`, as `estimate --calibrate` refuses it). The replica
    ran gpus / TP data-parallel engines behind its server (templates/vllm.j2): one engine is fitted to that share of
    its rates (`calibrate(..., data_parallel=)`), not to all of them."""
    if gpu.result is None:
        return gpu
    tp = engine.tensor_parallel_size or 1
    try:
        fit = calibrate(load_model(request.model), gpu.gpu, gpu.result.to_dict(), source=f"profile --launch {gpu.gpu}",
                        tp=tp, dtype=engine.dtype or "bf16", settings=engine, data_parallel=max(1, gpu.gpus // tp),
                        force=force)
    except (EngineError, MelangeError) as exc:
        return dataclasses.replace(gpu, calibration_note=f"{gpu.gpu}: not calibrated: {exc}")
    return dataclasses.replace(gpu, calibration=fit)


# ---- into the config -----------------------------------------------------------------------------------------------
def merge_profiles(config: dict[str, Any], report: LaunchProfileReport, source: str) -> MergeResult:
    """`config` with each profiled GPU type's tputs set (added with its replica's price when the config lacks it), per
    GPU: each replica's rates over its instance's GPUs."""
    data, warnings, valid = config, [], True
    for gpu in report.gpus:
        if gpu.result is None:
            continue
        merged = merge_profile(data, gpu.result, gpu.gpu, source=source, price=catalog_pricer(), gpus=gpu.gpus)
        data, valid = merged.data, merged.valid
        warnings += list(merged.warnings)
    return MergeResult(data=data, warnings=tuple(warnings), valid=valid)

