"""GPU names: one spelling per accelerator (SkyPilot's), so "a100_80gb", "NVIDIA A100 80GB" and "A100-80GB" are one
GPU type wherever a user writes them (configs, `profile --gpu`, catalogs).

The vocabulary is data, not a catalog: it lives in `core` so the catalog (`deploy`) and the config editors
(`inputs`) share it without one depending on the other.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from melange_sky.errors import CatalogError

#: Canonical accelerator names (SkyPilot's spelling) that may appear without being in any loaded catalog.
CANONICAL_GPUS = ("T4", "L4", "A10", "A10G", "L40S", "L40", "A100", "A100-80GB", "H100", "H200", "V100",
                  "V100-32GB", "A6000", "B200", "GH200")
#: Extra spellings, keyed by their normalised form (upper case, letters and digits only).
_ALIASES = {
    "A10040GB": "A100", "A10040G": "A100", "A10040": "A100",
    "A10080": "A100-80GB", "A10080G": "A100-80GB",
    "H10080GB": "H100", "H10080G": "H100", "H10080": "H100", "H100SXM": "H100", "H100PCIE": "H100",
    "L40S48GB": "L40S", "A10G24GB": "A10G",
}


def gpu_key(name: str) -> str:
    """`name` reduced to what tells GPUs apart: upper case letters and digits, without a vendor prefix."""
    key = re.sub(r"[^A-Z0-9]", "", name.upper())
    for prefix in ("NVIDIA", "TESLA"):
        if key.startswith(prefix) and len(key) > len(prefix):
            key = key[len(prefix):]
    return key


_BASE_TABLE = {**_ALIASES, **{gpu_key(n): n for n in CANONICAL_GPUS}}


def canonical_gpu(name: str, known: Iterable[str] = ()) -> str:
    """The canonical accelerator name for `name` ("a100_80gb" -> "A100-80GB"); CatalogError if it is unknown.

    `known` adds names found in the catalogs (e.g. a new GPU in SkyPilot's downloaded catalog).
    """
    key = gpu_key(name)
    found = _BASE_TABLE.get(key)
    if found is not None:
        return found
    extra = {gpu_key(n): n for n in known}
    if key in extra:
        return extra[key]
    raise CatalogError(f"unknown GPU {name!r}{did_you_mean(name, list(dict.fromkeys([*CANONICAL_GPUS, *known])))}")


def did_you_mean(name: str, names: list[str]) -> str:
    """A hint to append to an unknown-GPU message: the closest of `names`, or all of them when none is close."""
    by_key = {gpu_key(n): n for n in names}
    close = difflib.get_close_matches(gpu_key(name), list(by_key), n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(repr(by_key[c]) for c in close) + "?"
    return f"; known GPUs: {', '.join(sorted(names))}"


def same_gpu(a: str, b: str) -> bool:
    """Whether two GPU names mean the same type: equal ignoring case, or the same canonical name ("a100_80gb"), so
    a config edit finds the user's entry however it is spelled instead of adding a second one."""
    if a.lower() == b.lower():
        return True
    try:
        return canonical_gpu(a) == canonical_gpu(b)
    except CatalogError:
        return False
