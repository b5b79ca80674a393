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


@dataclass(frozen=True)
class Fit:
    """A saved calibration: the GPU, the coefficients, the model it was measured on, the fit error."""

    gpu: str
    coefficients: Coefficients
    model: str
    path: str
    error_before: float | None = None  # median relative error of the rates before the fit
    error_after: float | None = None


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
                   path=str(path), error_before=data.get("error_before"), error_after=data.get("error_after"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"{path}: unreadable calibration fit ({exc}); delete it or re-run estimate "
                          f"--calibrate") from exc


def save_fit(fit_data: dict[str, Any], gpu: str) -> Path:
    """Write a fit for `gpu`; its path."""
    path = fit_path(gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(fit_data, indent=2) + "\n")
    return path
