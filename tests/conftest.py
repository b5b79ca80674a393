"""Shared fixtures: the original Mélange example, a config writer and a CLI runner with separate stderr.

The whole test session runs with a temporary HOME and MELANGE_SKY_HOME (set here, before any test can import
`sky`, which resolves `~/.sky` at import time), so tests never read or write a user's ~/.sky or ~/.melange-sky,
and with SkyPilot's usage collection off, so no test sends anything off this machine.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import settings

# With PYTHONDONTWRITEBYTECODE=1 (set on some machines, CI's among them) every CLI, router and emulator process a test
# starts would compile melange_sky's modules anew (~0.1 CPU-s each; installed packages are compiled at install):
# the session caches their bytecode instead, as a plain shell would.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# Property tests draw the same cases on every run (a suite that passes passes again), from a fixed seed; the long
# random search is `bench/property_search.py`, or HYPOTHESIS_PROFILE=random here.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("random", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parent.parent
# The original Mélange example: examples/example.json without the bucket edges melange-sky's copy adds (the tests
# built on it are about a config without edges; add them where a test needs a router).
EXAMPLE = {key: value for key, value in json.loads((REPO / "examples" / "example.json").read_text()).items()
           if key not in ("input_buckets", "output_buckets")}

_SESSION_HOME: str | None = None
_SAVED_ENV: dict[str, str | None] = {}


def free_port() -> int:
    """A loopback port free at the moment of asking (for a server a test starts on a port it must name)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pytest_configure(config) -> None:
    """Point HOME (and so SkyPilot's ~/.sky) and MELANGE_SKY_HOME at a fresh temporary directory for the session."""
    global _SESSION_HOME
    _SESSION_HOME = tempfile.mkdtemp(prefix="melange-sky-test-home-")
    for key in ("HOME", "MELANGE_SKY_HOME", "SKY_RUNTIME_DIR", "SKYPILOT_DISABLE_USAGE_COLLECTION"):
        _SAVED_ENV[key] = os.environ.get(key)
    os.environ["HOME"] = _SESSION_HOME
    os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"  # no telemetry calls out of the test machine
    os.environ["MELANGE_SKY_HOME"] = os.path.join(_SESSION_HOME, ".melange-sky")
    os.environ.pop("SKY_RUNTIME_DIR", None)
    # A suite started as a background job (`pytest &`, CI runners, nohup) inherits SIGINT ignored, and so would every
    # CLI it starts: the tests that press Ctrl-C on them would wait for nothing. A Python handler here makes children
    # start with the default disposition, as a terminal's foreground command does.
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config) -> None:
    for key, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if _SESSION_HOME:
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _whole_tracebacks():
    """Each test starts with whole tracebacks: SkyPilot's `print_exception_no_traceback` sets `sys.tracebacklimit = 0`
    and leaves it so when the error it hides escapes, and several tests call SkyPilot directly with tasks it refuses
    (the adapter puts the limit back after its own calls: melange_sky/fleet/skypilot.py `_sky_call`)."""
    yield
    if hasattr(sys, "tracebacklimit"):
        del sys.tracebacklimit


@pytest.fixture(scope="session")
def session_home() -> Path:
    """The session's temporary HOME (SkyPilot keeps its state and catalogs under HOME/.sky)."""
    assert _SESSION_HOME is not None
    return Path(_SESSION_HOME)


@pytest.fixture
def example() -> dict:
    """A fresh copy of the original example config to mutate."""
    return copy.deepcopy(EXAMPLE)


@pytest.fixture
def write_config(tmp_path):
    """Write a config (a dict, or raw text) to tmp_path/config.json and return its path as a string."""

    def write(data, name: str = "config.json") -> str:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return str(path)

    return write


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run `melange-sky ARGS...` in tmp_path; the result has .exit_code, .stdout and .stderr."""
    from melange_sky.cli import main

    monkeypatch.chdir(tmp_path)
    try:  # Click < 8.2 mixes stderr into stdout unless told not to; 8.2 removed the argument
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()

    def invoke(*args: str, **kwargs):
        return runner.invoke(main, list(args), **kwargs)

    return invoke


@pytest.fixture(scope="session")
def sky_catalog_home(session_home) -> Path:
    """The session HOME with melange-sky's bundled price snapshot seeded where SkyPilot reads its catalogs
    (HOME/.sky/catalogs/<schema version>/<cloud>/vms.csv and common/accelerators.csv), so the real `sky` validates
    cloud + instance_type offline. No .meta md5 files (SkyPilot then never re-downloads) and no az_mappings."""
    from melange_sky.deploy.catalog import BUNDLED_DIR, skypilot_catalog_dir

    target = skypilot_catalog_dir()
    assert target.is_relative_to(session_home), f"{target} is outside the test HOME"
    for source in sorted(BUNDLED_DIR.glob("*/*.csv")):
        destination = target / source.parent.name / source.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if not destination.exists():
            shutil.copyfile(source, destination)
    return session_home
