"""`estimate --calibrate PROFILE`: refit one GPU type's step-time coefficients on a real profile of it.

A profile record (`profile -o`, melange_sky/inputs/profile_result.py `ProfileResult.to_dict`) holds, per bucket, the
lengths it ran and the max rate the server sustained under its SLOs. The fit scales three groups of coefficients —
memory-side efficiencies (weight and KV reads), compute-side efficiencies (GEMM and attention MFU) and overheads
(per step, per layer, per request) — so that the engine model's max rates for those buckets match the measured ones
(least squares on log rates, coordinate search). Three scales, not every coefficient: one profile cannot tell more
apart, and the roofline shape keeps its physics for other models and lengths. The fit is saved where every later
Engine of that GPU type finds it (engine/calibration.py) — unless it still misses the profile's own rates by more
than MAX_FIT_ERROR (median): then the profile and the model disagree about what was measured, and the fit is refused
(`PoorFit`) unless forced; a forced one is flagged in every estimate that uses it.

Before fitting, the record is checked against what it calibrates (`check_record`): a profile measured on another GPU
type or with another model would move that GPU's model the wrong way for every later estimate, and one measured on
the local launcher's emulator is the engine model itself (plus HTTP overhead its speed-up does not scale), so it
fits nothing real. Those are refused (`ProfileMismatch`) unless forced, as a poor fit is. An older record, or one of
`profile --endpoint` without --gpu, does not say what it measured: a warning that it could not be checked.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Any

from melange_sky.core.slo import Slos
from melange_sky.engine.calibration import MAX_FIT_ERROR, fit_path, save_fit
from melange_sky.engine.engine import Engine
from melange_sky.engine.errors import EngineError
from melange_sky.engine.estimate import max_rate
from melange_sky.engine.hardware import gpu_spec
from melange_sky.engine.models import ModelSpec, _key, load_model
from melange_sky.engine.settings import EngineSettings
from melange_sky.engine.step_time import Coefficients

#: Buckets used for the fit, at most (spread over the measured ones): each costs a rate search per trial.
MAX_FIT_BUCKETS = 12
#: Rate precision and requests measured per rate during the fit: as `estimate` computes rates (a lighter search
#: was hardly faster, and its noise misled the fit).
FIT_PRECISION, FIT_MEASURED = 0.02, 200
#: ... and how well each trial's rates are measured (estimate's default is 0.02: twice as loose costs the fit half the
#: time and moved no scale in its test).
FIT_ACCURACY = 0.04
#: Weight of the prior pulling each log scale to 0 (a scale of 2 costs as much as a 12% error on every bucket).
PRIOR_WEIGHT = 0.03


class PoorFit(EngineError):
    """The best fit still misses the profile's own max rates by more than MAX_FIT_ERROR (median): not saved."""


class ProfileMismatch(EngineError):
    """The profile was measured on another GPU type, with another model, or on an emulator: not fitted (unless
    forced)."""


@dataclass(frozen=True)
class RecordCheck:
    """What a profile record says it measured, against the GPU type and model it is to calibrate."""

    problems: tuple[str, ...] = ()  # why it is not a profile of them: "measured on A10G, not L4"
    unchecked: str | None = None  # a warning: what it does not say (an older record), so could not be checked


def same_model(spec: ModelSpec, reported: str) -> bool:
    """Whether a server's model name is `spec`: compared as the engine resolves names (org, case and chat/instruct
    suffixes aside; a bundled model's Hugging Face id is that model)."""
    if _key(reported) == _key(spec.name):
        return True
    try:
        return load_model(reported).name == spec.name
    except EngineError:
        return False


def _gpu_name(name: str) -> str:
    try:
        return gpu_spec(name).name
    except EngineError:  # a GPU type the engine model lacks: compared as written
        return name.strip()


def check_record(model: ModelSpec, gpu: str, record: dict[str, Any], source: str = "<profile>") -> RecordCheck:
    """Check a profile record (`profile -o`) against the `gpu` and `model` a fit from it would calibrate: its `gpu`,
    `model` and `emulated` fields, where it has them."""
    name = _gpu_name(gpu)
    problems: list[str] = []
    missing: list[str] = []
    measured_gpu, measured_model = record.get("gpu"), record.get("model")
    if isinstance(measured_gpu, str) and measured_gpu.strip():
        if _gpu_name(measured_gpu).lower() != name.lower():
            problems.append(f"measured on {measured_gpu}, not {name}")
    else:
        missing.append("GPU type")
    if isinstance(measured_model, str) and measured_model.strip():
        if not same_model(model, measured_model):
            problems.append(f"measured with {measured_model}, not {model.name}")
    else:
        missing.append("model")
    if record.get("emulated") is True:
        speed = record.get("speed")
        at = f" at {speed:g}x real time" if isinstance(speed, int | float) and not isinstance(speed, bool) else ""
        problems.append(f"measured on melange-sky's emulator{at}, not a real {name} (the emulator runs this "
                        f"engine model: a fit to it fits the model to itself and to HTTP overhead its speed-up does "
                        f"not scale)")
    unchecked = None
    if missing:
        unchecked = (f"{source}: the profile does not say which {' or '.join(missing)} it was measured on (an older "
                     f"record, or `profile --endpoint` without --gpu): cannot check that it measured {model.name} "
                     f"on a real {name}")
    return RecordCheck(tuple(problems), unchecked)


@dataclass(frozen=True)
class Target:
    """One measured bucket: its lengths and the max rate the real server sustained."""

    cell: tuple[int, int]
    prompt_tokens: int
    output_tokens: int
    tput: float


@dataclass(frozen=True)
class CalibrationResult:
    """What `--calibrate` did: the fit's scales and coefficients, the errors before and after, where it is saved."""

    gpu: str
    model: str
    scales: dict[str, float]
    coefficients: Coefficients
    error_before: float  # median absolute relative error of the buckets' max rates, default coefficients
    error_after: float
    buckets: int
    path: str
    saved: bool = True
    forced: tuple[str, ...] = ()  # the record's mismatches a fit was saved despite (--force): `RecordCheck.problems`
    unchecked: str | None = None  # `RecordCheck.unchecked`

    @property
    def poor(self) -> bool:
        """Whether the fit leaves more than MAX_FIT_ERROR of median error (saved only when forced)."""
        return self.error_after > MAX_FIT_ERROR

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the user must hear besides the result: a poor fit, or one from a mismatched profile, saved anyway;
        a profile that could not be checked."""
        found: list[str] = []
        later = (f"every later estimate, emulation and simulation on {self.gpu} uses it and says so; delete "
                 f"{self.path} to return to the datasheet model")
        if self.saved and self.poor:
            found.append(f"{self.gpu}: the fit leaves {100 * self.error_after:.0f}% median error (more than "
                         f"{100 * MAX_FIT_ERROR:.0f}%) and was saved because of --force: {later}")
        if self.saved and self.forced:
            found.append(f"{self.gpu}: the fit was saved because of --force from a profile {'; '.join(self.forced)}: "
                         f"{later}")
        if self.unchecked:
            found.append(self.unchecked)
        return tuple(found)

    def to_json(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "model": self.model, "scales": self.scales,
                "coefficients": self.coefficients.to_dict(), "error_before": round(self.error_before, 4),
                "error_after": round(self.error_after, 4), "buckets": self.buckets, "path": self.path,
                "saved": self.saved, "forced": list(self.forced), "warnings": list(self.warnings)}

    def text(self) -> str:
        scales = ", ".join(f"{k} x{v:.3g}" for k, v in self.scales.items())
        head = (f"Calibrated {self.gpu} on {self.buckets} measured bucket(s) of {self.model}: median error of the "
                f"max rates {100 * self.error_before:.0f}% before, {100 * self.error_after:.0f}% after ({scales}).")
        if not self.saved:
            return head + "\nNot saved."
        return (head + f"\nSaved {self.path}: later estimates and emulations on {self.gpu} use it (delete the file to "
                       f"return to the datasheet model).")


def scaled(base: Coefficients, memory: float, compute: float, overhead: float) -> Coefficients:
    """`base` with its memory-side and compute-side efficiencies and its overheads scaled."""
    return replace(base, weight_bw_eff=base.weight_bw_eff * memory, kv_bw_eff=base.kv_bw_eff * memory,
                   gemm_mfu=base.gemm_mfu * compute, attn_mfu=base.attn_mfu * compute,
                   layer_us=base.layer_us * overhead, request_us=base.request_us * overhead,
                   step_us=base.step_us * overhead)


def targets_from_profile(record: dict[str, Any], source: str = "<profile>") -> tuple[list[Target], Slos]:
    """The measured buckets (status ok, a rate above 0) and the SLOs of a profile record."""
    try:
        settings = record.get("settings") or {}
        slos = Slos(tpot_ms=settings.get("tpot_slo_ms", record.get("tpot_slo_ms")),
                    ttft_ms=settings.get("ttft_slo_ms"), ttft_percentile=settings.get("ttft_percentile", 90.0),
                    latency_ms=settings.get("latency_slo_ms"),
                    latency_percentile=settings.get("latency_percentile", 90.0))
        targets = [Target((int(b["cell"][0]), int(b["cell"][1])), int(b["prompt_tokens"]), int(b["output_tokens"]),
                          float(b["tput"]))
                   for b in record["buckets"] if b.get("status") == "ok" and float(b.get("tput") or 0) > 0]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise EngineError(f"{source}: not a profile record (write one with `melange-sky profile -o FILE`): "
                          f"{exc}") from exc
    if not slos.limits:
        raise EngineError(f"{source}: the profile has no SLO to calibrate against")
    if not targets:
        raise EngineError(f"{source}: no bucket was measured (status ok) in this profile: nothing to fit")
    return targets, slos


def predicted_rates(model: ModelSpec, gpu: str, targets: list[Target], slos: Slos, coefficients: Coefficients, *,
                    tp: int = 1, dtype: str = "bf16", settings: EngineSettings = EngineSettings(),
                    precision: float = 0.02, min_measured: int | None = None,
                    accuracy: float | None = None) -> list[float]:
    """The engine model's max rate for each target bucket with `coefficients`."""
    def make() -> Engine:
        return Engine(model, gpu, tp=tp, dtype=dtype, settings=settings, coefficients=coefficients)

    extra: dict[str, Any] = {} if min_measured is None else {"min_measured": min_measured}
    if accuracy is not None:
        extra["accuracy"] = accuracy
    return [max_rate(make, t.prompt_tokens, t.output_tokens, slos, cell=t.cell, precision=precision, **extra).tput
            for t in targets]


def median_error(predicted: list[float], targets: list[Target]) -> float:
    """Median absolute relative error of predicted against measured rates."""
    return statistics.median(abs(p - t.tput) / t.tput for p, t in zip(predicted, targets))


def _loss(predicted: list[float], targets: list[Target]) -> float:
    return statistics.fmean(math.log(max(p, 1e-6) / t.tput) ** 2 for p, t in zip(predicted, targets))


def calibrate(model: ModelSpec, gpu: str, record: dict[str, Any], *, source: str = "<profile>", tp: int = 1,
              dtype: str = "bf16", settings: EngineSettings = EngineSettings(), save: bool = True,
              force: bool = False, data_parallel: int = 1) -> CalibrationResult:
    """Fit `gpu`'s coefficient scales to a profile record measured with `model`; save the fit (unless `save` is
    False) where later engines of that GPU type find it. PoorFit, and nothing saved, when the fit still misses the
    measured rates by more than MAX_FIT_ERROR (median), unless `force`; ProfileMismatch, before fitting, when the
    record says it measured another GPU type or model or an emulator (`check_record`), unless `force`.

    `data_parallel` N: the profiled server ran N engines of `tp` GPUs (`vllm serve --data-parallel-size N`), so each
    measured rate is N engines' and one engine is fitted to rate / N. vLLM's balancer keeps the engines evenly
    loaded, so that is an engine's share; pooling makes N engines' SLO-bound rate slightly more than N times one's
    (a request waits for the least loaded of N), so the fit comes out a little fast, not N times."""
    if data_parallel < 1:
        raise EngineError(f"data_parallel must be at least 1, got {data_parallel}")
    name = gpu_spec(gpu).name
    targets, slos = targets_from_profile(record, source)
    checked = check_record(model, name, record, source)
    if save and checked.problems and not force:
        raise ProfileMismatch(f"{source}: {'; '.join(checked.problems)}: a fit must come from a real server of the "
                              f"GPU type and model it calibrates; not saved (--force saves it anyway)")
    if data_parallel > 1:
        targets = [replace(t, tput=t.tput / data_parallel) for t in targets]
    if len(targets) > MAX_FIT_BUCKETS:
        stride = len(targets) / MAX_FIT_BUCKETS
        targets = [targets[int(k * stride)] for k in range(MAX_FIT_BUCKETS)]
    base = Coefficients()
    kwargs: dict[str, Any] = {"tp": tp, "dtype": dtype, "settings": settings}

    def loss(scales: tuple[float, float, float]) -> float:
        # a weak prior at the datasheet model keeps the scales a profile cannot tell apart (memory against
        # overheads, on decode-bound buckets) where the physics put them
        prior = PRIOR_WEIGHT * sum(math.log(x) ** 2 for x in scales)
        return prior + _loss(predicted_rates(model, name, targets, slos, scaled(base, *scales),
                                             precision=FIT_PRECISION, min_measured=FIT_MEASURED, accuracy=FIT_ACCURACY,
                                             **kwargs), targets)

    before = predicted_rates(model, name, targets, slos, base, **kwargs)
    best = (1.0, 1.0, 1.0)
    best_loss = loss(best)
    step = math.log(1.6)
    while step > math.log(1.04):  # coordinate search in log space: take the first move that helps, else halve
        improved = False
        for axis in range(3):
            for direction in (1, -1):
                trial = list(best)
                trial[axis] = best[axis] * math.exp(direction * step)
                if not 0.2 <= trial[axis] <= 5:
                    continue
                if axis < 2 and trial[axis] * max(base.weight_bw_eff, base.gemm_mfu) > 1.0:
                    continue  # no efficiency above the datasheet peak
                value = loss((trial[0], trial[1], trial[2]))
                if value < best_loss - 1e-9:
                    best, best_loss, improved = (trial[0], trial[1], trial[2]), value, True
                    break
        if not improved:
            step /= 2
    fitted = scaled(base, *best)
    after = predicted_rates(model, name, targets, slos, fitted, **kwargs)
    scales = {"memory": round(best[0], 4), "compute": round(best[1], 4), "overhead": round(best[2], 4)}
    result = CalibrationResult(name, model.name, scales, fitted, median_error(before, targets),
                               median_error(after, targets), len(targets), str(fit_path(name)), saved=save,
                               forced=checked.problems if save else (), unchecked=checked.unchecked)
    if save and result.poor and not force:
        raise PoorFit(f"{source}: the best fit of {name} still misses the profile's max rates by "
                      f"{100 * result.error_after:.0f}% (median; {100 * result.error_before:.0f}% before), more than "
                      f"the {100 * MAX_FIT_ERROR:.0f}% a saved fit may leave: not saved. Was the profile measured "
                      f"with {model.name} on {name} at TP {tp}"
                      + (f" x {data_parallel} data-parallel engines" if data_parallel > 1 else "")
                      + " with these engine settings? (--force saves it anyway)")
    if save:
        data = result.to_json()
        data["profile"] = source
        data.pop("path")
        data.pop("warnings")
        save_fit(data, name)
    return result


__all__ = ["CalibrationResult", "PoorFit", "ProfileMismatch", "RecordCheck", "Target", "calibrate", "check_record",
           "median_error", "predicted_rates", "same_model", "scaled", "targets_from_profile"]
