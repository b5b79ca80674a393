"""A Ctrl-C is exit code 130 wherever it lands (README: exit codes): never a traceback, never another error."""
from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

EXAMPLE_PATH = str(REPO / "examples" / "example.json")


def _interrupted_at(where: str, when: str, tmp_path) -> subprocess.CompletedProcess:
    """Run `melange-sky solve` in a fresh interpreter that delivers a real SIGINT to itself at one chosen moment:
    `where` is "import" (when module `when` is first looked for) or "call" (when function `when` is entered)."""
    code = f"""
import importlib, os, signal, sys
where, when = {where!r}, {when!r}
def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
class CtrlCAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == when:
            sys.meta_path.remove(self)
            ctrl_c()
        return None
if where == "import":
    sys.meta_path.insert(0, CtrlCAtImport())
sys.argv = ["melange-sky", "solve", {EXAMPLE_PATH!r}, "-o", os.devnull]
from melange_sky.__main__ import run
if where == "call":
    module, name = when.rsplit(".", 1)
    module = importlib.import_module(module)
    original = getattr(module, name)
    def interrupted(*args, **kwargs):
        ctrl_c()
        return original(*args, **kwargs)
    setattr(module, name, interrupted)
run()
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("where, when", [
    ("import", "click"),  # while the command line loads
    ("import", "melange_sky.cli.plan"),
    ("import", "pulp"),  # while the solver loads, on first use
    ("call", "melange_sky.solver.model.run_model"),  # while solving
    ("call", "melange_sky.cli.plan.write_json"),  # while writing the result
])
def test_ctrl_c_exits_130_with_one_line_wherever_it_lands(where, when, tmp_path):
    done = _interrupted_at(where, when, tmp_path)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "HiGHS" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "Interrupted."


def test_ctrl_c_while_pulp_probes_highs_is_an_interruption_not_a_missing_solver(tmp_path):
    # PuLP imports highspy inside a bare `except:`; a Ctrl-C arriving exactly then used to be swallowed and reported
    # as "highs failed: HiGHS: Not Available" (exit 2). The finder below delivers SIGINT at that very import.
    code = f"""
import os, signal, sys
class CtrlCAtHighspy:
    def find_spec(self, name, path=None, target=None):
        if name == "highspy":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlCAtHighspy())
sys.argv = ["melange-sky", "solve", {EXAMPLE_PATH!r}, "-o", os.devnull]
from melange_sky.__main__ import run
run()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 130, done.stderr
    assert "HiGHS" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "Interrupted."


def test_ctrl_c_at_the_confirmation_prompt_is_an_interruption_and_launches_nothing(tmp_path):
    env = {**os.environ, "MELANGE_SKY_HOME": str(tmp_path / "home"), "MELANGE_SKY_BACKEND": "fake_backend:FakeBackend",
           "MELANGE_SKY_FAKE_STATE": str(tmp_path / "fake.json"), "HF_TOKEN": "hf_test",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    master, slave = pty.openpty()  # a terminal, so `up` asks instead of refusing
    proc = subprocess.Popen([sys.executable, "-m", "melange_sky", "up", EXAMPLE_PATH], stdin=slave, stdout=slave,
                            stderr=slave, env=env, cwd=tmp_path)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while b"[y/N]" not in seen and time.monotonic() < deadline:
        try:
            seen += os.read(master, 4096)
        except OSError:
            break
    assert b"[y/N]" in seen, seen.decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    rest = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        rest += chunk
    os.close(master)
    assert b"Interrupted." in rest and b"Traceback" not in rest
    assert not (tmp_path / "fake.json").exists() or b'"launch"' not in (tmp_path / "fake.json").read_bytes()
