"""Where calibration fits live and how an engine finds one: `$MELANGE_SKY_HOME/engine/fits/<GPU>.json`.

A fit is written by `estimate --calibrate PROFILE` (engine/calibrate.py) from a profile measured on a real server of
one GPU type; every Engine built for that GPU type afterwards (estimate, emulate, simulate) uses its coefficients and
says so (`Engine.fit_source`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melange_sky._io import write_text
from melange_sky.engine.errors import EngineError
from melange_sky.engine.step_time import Coefficients

HOME_ENV_VAR = "MELANGE_SKY_HOME"  # the same variable the ledger reads (fleet/ledger.py)
#: The largest median error of a profile's max rates a fit may leave and still be saved (unless forced). The datasheet
#: model alone is within about 8-13% of published runs (docs/estimate-accuracy.md) and a fit only has to reproduce the
#: profile it was fitted on, so a fit that stays further off than this means the profile and the engine model disagree
#: about what was measured (another model, GPU type, TP or engine settings; a capped or noisy profile): applying it to
#: every later estimate would spread that mistake, silently.
MAX_FIT_ERROR = 0.25


@dataclass(frozen=True)
class Fit:
    """A saved calibration: the GPU, the coefficients, the model it was measured on, the fit error."""

    gpu: str
    coefficients: Coefficients
    model: str
    path: str
    error_before: float | None = None  # median relative error of the rates before the fit
    error_after: float | None = None
    forced: tuple[str, ...] = ()  # what its profile did not match, saved anyway (--force): "measured on A10G, not L4"


def fits_dir() -> Path:
    """`$MELANGE_SKY_HOME/engine/fits` (default ~/.melange-sky/engine/fits), read at call time."""
    home = os.environ.get(HOME_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".melange-sky")
    return Path(home) / "engine" / "fits"


def fit_path(gpu: str) -> Path:
    return fits_dir() / f"{gpu}.json"


def load_fit(gpu: str) -> Fit | None:
    """The fit saved for `gpu` (a catalog name), or None. EngineError if the file exists but is unreadable."""
    path = fit_path(gpu)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return Fit(gpu=gpu, coefficients=Coefficients.from_dict(data["coefficients"]), model=str(data.get("model")),
                   path=str(path), error_before=data.get("error_before"), error_after=data.get("error_after"),
                   forced=tuple(str(x) for x in data.get("forced") or ()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"{path}: unreadable calibration fit ({exc}); delete it or re-run estimate "
                          f"--calibrate") from exc


def poor_fit_warning(gpu: str) -> str | None:
    """A warning for every estimate that uses `gpu`'s saved fit when that fit was saved with more than MAX_FIT_ERROR
    of median error left, or from a profile of another GPU type or model or of an emulator (`estimate --calibrate
    --force`); None for a good fit or none."""
    fit = load_fit(gpu)
    if fit is None:
        return None
    reasons = []
    if isinstance(fit.error_after, (int, float)) and fit.error_after > MAX_FIT_ERROR:
        reasons.append(f"left {100 * fit.error_after:.0f}% median error on its own profile")
    if fit.forced:
        reasons.append(f"was fitted to a profile {'; '.join(fit.forced)}")
    if not reasons:
        return None
    return (f"{gpu}: the calibration fit {fit.path} {' and '.join(reasons)} (saved with --force); delete it to return "
            f"to the datasheet model")


def save_fit(fit_data: dict[str, Any], gpu: str) -> Path:
    """Write a fit for `gpu`; its path."""
    path = fit_path(gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(fit_data, indent=2) + "\n")
    return path
