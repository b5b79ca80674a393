"""`profile --launch` (issue 19, item 3) on the real `local` launcher: each GPU type gets a replica (an emulator in its
own process), is profiled beside the others, and every replica is torn down — after the profiles, after a launch
failure, after Ctrl-C.

The agreement test is issue 19's judge: the tputs `profile --launch A10G,A100-80GB --backend local` writes match
`estimate` for the same model within 10%. It is issue 17's (item 9) too: its replicas are `melange-sky emulate`
processes, so it is `profile` against `emulate` finding the rate `estimate` predicts within 10%, for two GPU types
(tests/test_emulate_agreement.py proved the same on one, and went).

A TPOT SLO binding below saturation on the A10G (the A100-80GB reaches it near its capacity, at ~0.94 of its saturated
throughput: the steep end, where a short step reads it hardest), the emulators at speed 4 (the profile runs with the SLO
/ 4 and divides the rates found by 4, so the tputs written are the real GPU's and compare with `estimate` as printed),
one estimate per GPU type (deterministic to ~1%). The search starts at 0.8x the engine model's estimate and grows x1.3
(what `profile --launch` does without --start-rate), then bisects twice, steps of at most 5 s: ~24 s. Measured on the
loaded 2-core machine, 4 runs: A10G 0.966-0.980 and A100-80GB 0.941-0.980 of the estimate (with one bisection instead of
two the A100-80GB's bracket stayed 13% wide and its fit, clamped to the highest pass, read 0.86-0.92). The two profiles
are threads of one process: they use ~20% of a core between them, so the GIL does not distort their timing; what does is
a step too short near the limit.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from melange_sky.core.slo import Slos
from melange_sky.engine import load_model
from melange_sky.engine.estimate import max_rates
from melange_sky.errors import LaunchError
from melange_sky.fleet.backends import LaunchRequest
from melange_sky.fleet.ledger import Ledger
from melange_sky.fleet.local import LocalBackend, accelerator

MODEL, GPUS = "llama-2-7b", ("A10G", "A100-80GB")
INPUT_EDGES, OUTPUT_EDGES = [500, 1000], [50, 100]  # profiled at 750 prompt / 75 output tokens
TPOT_SLO_MS = 60.0
SPEED = 4
TOLERANCE = 0.10
FLEET = "bench-profile"


def expected_tputs() -> dict[str, float]:
    """`estimate`'s tput of the bucket per GPU type (real time): one estimate, as `melange-sky estimate` prints it."""
    tables = max_rates(load_model(MODEL), list(GPUS), INPUT_EDGES, OUTPUT_EDGES, Slos(tpot_ms=TPOT_SLO_MS))
    return {gpu: tables[gpu].tputs[0][0] for gpu in GPUS}


@pytest.fixture
def launch_env(tmp_path, monkeypatch):
    """A fresh MELANGE_SKY_HOME and a config (named "bench": the fleet is bench-profile) with one bucket, the
    emulators at speed 4, no secrets; kills whatever a failed test left."""
    home = tmp_path / "home"
    monkeypatch.setenv("MELANGE_SKY_HOME", str(home))
    for name in ("MELANGE_SKY_API_KEY", "MELANGE_SKY_LOCAL_SPEED", "MELANGE_SKY_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "bench.json"
    config.write_text(json.dumps({
        "name": "bench", "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[0.5]]}},
        "workload_distribution": [[1.0]], "total_request_rate": 1,
        "input_buckets": INPUT_EDGES, "output_buckets": OUTPUT_EDGES,
        "deployment": {"secrets": [], "local": {"speed": SPEED}}}))
    yield config, home
    for pid in _processes_of(home):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _processes_of(home: Path) -> list[int]:
    """Live processes started for this test's fleet: their command line names its home (an emulator's engine file
    is under it). Zombies are not running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(home) in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _assert_nothing_left(home: Path, pids: list[int] = ()) -> None:
    """No fleet in the ledger, no cluster the launcher knows, no process of ours (those recorded, and any other)."""
    with Ledger(home) as ledger:
        assert ledger.fleets() == []
    assert LocalBackend(home / "local").records() == {}
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"), pid
    assert _processes_of(home) == []


@pytest.mark.timing  # measured on the clock: runs alone, after the rest (setup.cfg: markers)
def test_launched_profiles_write_the_tputs_estimate_predicts_and_leave_nothing_running(cli, launch_env):
    config, home = launch_env
    expected = expected_tputs()
    done = cli("profile", "--launch", ",".join(GPUS), "--backend", "local", "--model", MODEL, "--config",
               str(config), "--into", str(config), "--tpot-slo-ms", f"{TPOT_SLO_MS:g}", "--bisect-steps", "2",
               "--max-step-seconds", "5")
    assert done.exit_code == 0, done.stderr + done.stdout
    written = json.loads(config.read_text())["gpu_info"]
    for gpu in GPUS:
        measured = written[gpu]["tputs"][0][0]
        print(f"{gpu}: profile --launch {measured:.3g} req/s, estimate {expected[gpu]:.3g}: "
              f"{measured / expected[gpu]:.3f}")
        assert abs(measured / expected[gpu] - 1) <= TOLERANCE, (gpu, measured, expected[gpu], done.stderr)
    assert written["A10G"]["cost"] == 1.01  # the config's own entry keeps its price; the new one is priced
    assert "A100-80GB" in done.stderr and "catalog" in done.stderr
    assert "Profiling cost: A10G $1.01/h x " in done.stdout and "A100-80GB $" in done.stdout
    _assert_nothing_left(home)


class OneGpuFails(LocalBackend):
    """The local launcher, but no A100-80GB can be launched: a provisioning error, as a cloud would raise one."""

    def launch(self, request: LaunchRequest):
        found = accelerator(request.task)
        if found is not None and found[0] == "A100-80GB":
            raise LaunchError(request.cluster, "no A100-80GB in this zone (injected)")
        return super().launch(request)


def test_a_launch_failure_is_one_line_and_the_other_gpu_is_still_profiled_and_torn_down(cli, launch_env):
    config, home = launch_env
    done = cli("profile", "--launch", ",".join(GPUS), "--backend", f"{__name__}:OneGpuFails", "--model", MODEL,
               "--config", str(config), "--into", str(config), "--start-rate", "1", "--max-rate", "1",
               "--requests-per-step", "5", "--max-step-seconds", "4", "--calibrate")
    assert done.exit_code == 1, done.stderr + done.stdout
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("A100-80GB: ")]
    assert line.startswith("A100-80GB: not profiled: launch failed: ") and "no A100-80GB in this zone" in line
    written = json.loads(config.read_text())
    assert written["gpu_info"]["A10G"]["tputs"] == [[1.0]]  # measured (capped at --max-rate 1), was 0.5
    assert "A100-80GB" not in written["gpu_info"]
    # --calibrate fits only on buckets whose limit was found (status ok): a capped one is said, not fitted
    assert "A10G: not calibrated: " in done.stdout and "no bucket was measured (status ok)" in done.stdout
    _assert_nothing_left(home)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_once_the_replicas_are_up_tears_them_all_down(launch_env, sig):
    config, home = launch_env
    command = [sys.executable, "-m", "melange_sky", "profile", "--launch", ",".join(GPUS), "--backend", "local",
               "--model", MODEL, "--config", str(config), "--into", str(config), "--start-rate", "0.5"]
    before = config.read_text()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MELANGE_SKY_HOME": str(home)})
    assert proc.stderr is not None
    profiling, lines = set(), []
    deadline = time.monotonic() + 120
    while len(profiling) < len(GPUS) and time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
        profiling |= {gpu for gpu in GPUS if line.strip().startswith(f"{gpu}: ready after")}
    pids = [int(r["pid"]) for r in LocalBackend(home / "local").records().values()]
    assert len(pids) == len(GPUS), "".join(lines)
    with Ledger(home) as ledger:  # a fleet like any other while it runs: `status` shows it, `down --all` finds it
        assert [f.name for f in ledger.fleets()] == [FLEET]
        assert sorted(r.state.value for r in ledger.replicas(FLEET)) == ["up", "up"]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + err
    assert "Interrupted" in err and "Torn down: " in out
    assert config.read_text() == before  # nothing written
    _assert_nothing_left(home, pids)
