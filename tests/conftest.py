"""Shared fixtures: the original Mélange example, a config writer and a CLI runner with separate stderr."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = json.loads((REPO / "examples" / "example.json").read_text())


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
