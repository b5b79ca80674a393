"""`plan -o DIR` as a directory melange-sky keeps: the files a plan writes there, and no stale ones from before.

A smaller plan writes fewer task files than the last one; the others would stay and could be launched by hand. Like
a build tool's output directory, melange-sky removes what *it* wrote there earlier and this plan did not write again,
and nothing else: a manifest (`.melange-sky-plan.json`) lists each file it wrote with the digest of what it wrote.
A file listed but changed since (edited by hand) is the user's now: kept, and forgotten by the manifest. Task files
it did not write (or wrote before there were manifests) are only named, for the caller to warn about.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from melange_sky._io import write_json
from melange_sky.deploy.plan import FORMATS, Plan, stale_task_files, write_plan
from melange_sky.errors import OutputError

__all__ = ["MANIFEST", "PlanFiles", "write_plan_files"]

MANIFEST = ".melange-sky-plan.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PlanFiles:
    """What `write_plan_files` did in the directory."""

    written: list[Path]
    removed: list[str]  # files an earlier plan wrote and this one did not: deleted (unchanged since)
    edited: list[str]  # files an earlier plan wrote, changed since: kept as the user's
    stale: list[str]  # task files left that this plan did not write: edited ones, and others melange-sky did not
    #                   write (or wrote before manifests); launching one by hand would start an unplanned replica


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(root: Path) -> dict[str, str]:
    """The files the last plan wrote in `root` and their digests ({} without a readable manifest: then nothing is
    removed, a damaged manifest never costs a file)."""
    try:
        doc = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        return {}
    # only plain names in the directory itself: a manifest never reaches outside it
    return {str(name): str(digest) for name, digest in files.items()
            if isinstance(name, str) and name and Path(name).name == name and name not in (".", "..", MANIFEST)}


def write_plan_files(plan: Plan, out_dir: str | Path, formats: tuple[str, ...] = FORMATS) -> PlanFiles:
    """`deploy.plan.write_plan` into `out_dir`, then delete the files the previous plan written there wrote and this
    one did not (unless changed since), and record this plan's files in the manifest."""
    root = Path(out_dir)
    earlier = _manifest(root) if root.is_dir() else {}
    written = write_plan(plan, root, formats)
    names = {path.name for path in written}
    removed, edited = [], []
    for name, digest in sorted(earlier.items()):
        path = root / name
        if name in names or path.is_symlink() or not path.is_file():
            continue
        if _digest(path) != digest:
            edited.append(name)
            continue
        try:
            path.unlink()
        except OSError as exc:
            raise OutputError(f"cannot remove {path}, left by an earlier plan: {exc.strerror}") from None
        removed.append(name)
    write_json(root / MANIFEST, {"version": MANIFEST_VERSION, "about": "files `melange-sky plan` wrote here; the "
                                 "next plan removes those it does not write again (unless edited)",
                                 "files": {path.name: _digest(path) for path in written}})
    return PlanFiles(written=written, removed=removed, edited=edited,
                     stale=stale_task_files(plan, root))
