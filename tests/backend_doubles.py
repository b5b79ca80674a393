"""What the test launchers (`fake_backend`, `chaos_backend`) share: a JSON state file every process read-modify-writes
under one flock, and the per-object registry of in-flight launches that `cancel` sets. (Real processes run on the
local launcher, melange_sky/fleet/local.py, not a double.)"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def locked_json(path: Path, indent: int | None = None) -> Iterator[dict[str, Any]]:
    """Read-modify-write the JSON file `path` under an exclusive flock on `<path>.lock` (threads and processes alike).
    Written back even when the body raises: a double records a fault (or a process it started) before raising."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else ""
        state = json.loads(text) if text.strip() else {}
        try:
            yield state
        finally:
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(state, indent=indent, sort_keys=True))
            os.replace(tmp, path)


class CancellableLaunches:
    """`Backend.cancel` for a double: each launch runs inside `_cancellable(cluster)`, whose event `cancel` sets.
    The subclass creates `self._lock` (a threading.Lock) and `self._cancel_events = {}` in its `__init__`."""

    _lock: threading.Lock
    _cancel_events: dict[str, threading.Event]

    @contextlib.contextmanager
    def _cancellable(self, cluster: str) -> Iterator[threading.Event]:
        cancel = threading.Event()
        with self._lock:
            self._cancel_events[cluster] = cancel
        try:
            yield cancel
        finally:
            with self._lock:
                if self._cancel_events.get(cluster) is cancel:  # not a later launch's of the same cluster
                    del self._cancel_events[cluster]

    def cancel(self, clusters: Sequence[str] | None = None) -> list[str]:
        with self._lock:
            targets = [c for c in (self._cancel_events if clusters is None else clusters) if c in self._cancel_events]
            for cluster in targets:
                self._cancel_events[cluster].set()
        return targets
