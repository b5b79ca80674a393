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


class _Terminal:
    """`melange-sky up` on a pseudo-terminal (so it asks before launching), with the fake backend."""

    def __init__(self, tmp_path, command: list[str] | None = None):
        env = {**os.environ, "MELANGE_SKY_HOME": str(tmp_path / "home"),
               "MELANGE_SKY_BACKEND": "fake_backend:FakeBackend", "MELANGE_SKY_FAKE_STATE": str(tmp_path / "fake.json"),
               "HF_TOKEN": "hf_test", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
        self.state = tmp_path / "fake.json"
        self.master, slave = pty.openpty()
        command = command or [sys.executable, "-m", "melange_sky", "up", EXAMPLE_PATH]
        self.proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=tmp_path)
        os.close(slave)

    def read_until(self, marker: bytes) -> bytes:
        seen = b""
        deadline = time.monotonic() + 120  # a hang guard only
        while marker not in seen and time.monotonic() < deadline:
            try:
                seen += os.read(self.master, 4096)
            except OSError:
                break
        return seen

    def finish(self) -> tuple[int, bytes]:
        code = self.proc.wait(60)
        rest = self.read_until(b"\0never")
        os.close(self.master)
        return code, rest

    def launched(self) -> bool:
        return self.state.exists() and b'"launch"' in self.state.read_bytes()


def test_ctrl_c_at_the_confirmation_prompt_is_an_interruption_and_launches_nothing(tmp_path):
    term = _Terminal(tmp_path)
    assert b"[y/N]" in term.read_until(b"[y/N]")
    term.proc.send_signal(signal.SIGINT)  # at once: it may land while the prompt is still being shown
    code, rest = term.finish()
    assert code == 130 and b"Interrupted." in rest and b"Traceback" not in rest
    assert not term.launched()


@pytest.mark.parametrize("answer, code", [(b"n\n", 1), (b"\n", 1), (b"\x04", 1), (b"y\n", 0)],
                         ids=["no", "default-no", "ctrl-d", "yes"])
def test_the_confirmation_prompt_launches_only_on_yes(tmp_path, answer, code):
    term = _Terminal(tmp_path)
    assert b"[y/N]" in term.read_until(b"[y/N]")
    os.write(term.master, answer)
    got, rest = term.finish()
    assert got == code, rest.decode(errors="replace")
    assert term.launched() == (code == 0)
    if code == 1:
        assert b"Aborted." in rest


def test_a_ctrl_c_taken_by_another_thread_still_interrupts_the_prompt(tmp_path):
    # The kernel may hand a process's SIGINT to any thread (numpy/HiGHS start some); Python then only flags it, and a
    # main thread blocked in a plain read() would sleep on until Enter. Here a helper thread takes the signal itself
    # once the prompt is up.
    code = f"""
import signal, sys, threading, time
import melange_sky.cli.fleet as fleet_cli
shown = threading.Event()
real_echo = fleet_cli.click.echo
def echo(message=None, *args, **kwargs):
    real_echo(message, *args, **kwargs)
    if message and "[y/N]" in str(message):
        shown.set()
fleet_cli.click.echo = echo
def ctrl_c_on_this_thread():
    shown.wait()
    time.sleep(0.3)  # let the main thread settle into waiting for an answer
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
threading.Thread(target=ctrl_c_on_this_thread, daemon=True).start()
sys.argv = ["melange-sky", "up", {EXAMPLE_PATH!r}]
from melange_sky.__main__ import run
run()
"""
    term = _Terminal(tmp_path, [sys.executable, "-c", code])
    code_, rest = term.finish()
    assert code_ == 130 and b"Interrupted." in rest, rest.decode(errors="replace")
    assert not term.launched()
