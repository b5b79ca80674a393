"""The local launcher's state file stays small: launches whose processes are all gone are forgotten (they can leave
nothing behind), while a known cluster's launch and any launch with a process still running (a leftover `down` must
find) are kept. Real processes, no emulator: the state is written as the launcher writes it."""
from __future__ import annotations

import json
import os
import signal
import subprocess

from melange_sky.fleet.local import LocalBackend, process_id


def _session(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(list(argv), start_new_session=True)


def test_launches_whose_processes_are_gone_are_pruned_and_the_rest_kept(tmp_path):
    backend = LocalBackend(tmp_path / "local")
    known, leftover, finished = _session("sleep", "60"), _session("sleep", "60"), _session("true")
    try:
        known_id, leftover_id = process_id(known.pid), process_id(leftover.pid)
        finished.wait()
        me = process_id(os.getpid())
        spawned = [{"cluster": "c-known", "pid": known_id.pid, "started": known_id.started},
                   {"cluster": "c-leftover", "pid": leftover_id.pid, "started": leftover_id.started},
                   {"cluster": "c-finished", "pid": finished.pid, "started": 1},
                   {"cluster": "c-recycled", "pid": me.pid, "started": me.started + 1},  # its pid is now another's
                   *({"cluster": f"old-{i}", "pid": 4_000_000 + i, "started": i} for i in range(150))]
        with backend._state() as state:
            state["spawned"] = spawned
            state["clusters"]["c-known"] = {"status": "up", "kind": "replica", "pid": known_id.pid,
                                            "started": known_id.started, "port": 1, "log": "x", "offset": 0}
        assert backend.down("c-gone-already") is False  # any teardown prunes, even of nothing
        kept = json.loads((tmp_path / "local" / "state.json").read_text())["spawned"]
        assert [e["cluster"] for e in kept] == ["c-known", "c-leftover"]
        assert backend.leftovers() == {"c-leftover": [leftover.pid]}  # still found, until it is gone too

        os.killpg(leftover.pid, signal.SIGKILL)
        leftover.wait()
        assert backend.down("c-known") is True
        known.wait()
        assert json.loads((tmp_path / "local" / "state.json").read_text())["spawned"] == []
        assert backend.leftovers() == {} and backend.records() == {}
    finally:
        for proc in (known, leftover):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
