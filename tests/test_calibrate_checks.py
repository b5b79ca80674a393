"""QA2 item 3: `estimate --calibrate PROFILE` checks what the profile record says it measured — its GPU type, its
model, whether it was the local launcher's emulator — against --gpu and --model, and refuses a mismatch (one line,
exit 2, nothing saved) unless --force, which saves with a loud warning that every later estimate repeats. A record
that does not say (an older one) is fitted with a warning that it could not be checked.

The refusals come before any fitting, so those cases cost no rate search; one forced fit on one small bucket."""
from __future__ import annotations

import json

import pytest

from melange_sky.engine import load_model
from melange_sky.engine.calibrate import check_record
from melange_sky.fleet.profile_launch import launched_record
from melange_sky.inputs.profile_result import BucketProfile, ProfileResult, ProfileSettings

CALIBRATE = ("estimate", "--model", "llama-3.1-8b", "--gpu", "L4", "--calibrate", "p.json")
#: A small bucket: the one forced fit on it costs ~0.4 CPU-s (100/20 at 30 req/s: 4.7)
BUCKET = {"cell": [0, 0], "prompt_tokens": 20, "output_tokens": 4, "status": "ok", "tput": 100.0}


def _record(**measured) -> dict:
    """A profile record as `profile -o` writes it (the fields `--calibrate` reads), with what it measured on."""
    return {"model": "meta-llama/Llama-3.1-8B-Instruct", **measured, "tpot_slo_ms": 150,
            "settings": {"tpot_slo_ms": 150}, "buckets": [BUCKET]}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MELANGE_SKY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _refused(cli, tmp_path, home, record: dict, *words: str) -> None:
    (tmp_path / "p.json").write_text(json.dumps(record))
    result = cli(*CALIBRATE)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("Error: p.json: measured ") and "not saved (--force saves it anyway)" in \
        result.stderr
    for word in words:
        assert word in result.stderr
    assert not (home / "engine" / "fits" / "L4.json").exists()


def test_a_profile_of_another_gpu_type_is_refused_in_one_line(cli, tmp_path, home) -> None:
    _refused(cli, tmp_path, home, _record(gpu="A10G"), "measured on A10G, not L4")


def test_a_profile_of_another_model_is_refused_in_one_line(cli, tmp_path, home) -> None:
    record = _record(gpu="L4", model="meta-llama/Llama-2-7b-chat-hf")
    _refused(cli, tmp_path, home, record, "measured with meta-llama/Llama-2-7b-chat-hf, not llama-3.1-8b")


def test_a_profile_of_the_local_launchers_emulator_is_refused(cli, tmp_path, home) -> None:
    """What `profile --launch --backend local` writes at deployment.local.speed 20: the emulator, not an L4."""
    bucket = BucketProfile(cell=(0, 0), input_range=(1, 40), output_range=(1, 8), prompt_tokens=20,
                           output_tokens=4, status="ok", tput=2000.0)
    at_speed = ProfileResult(endpoint="http://127.0.0.1:1", model="meta-llama/Llama-3.1-8B-Instruct",
                             tpot_slo_ms=7.5, input_edges=(1, 40), output_edges=(1, 8), buckets=(bucket,),
                             settings=ProfileSettings(tpot_slo_ms=7.5), seconds=1.0)
    record = launched_record(at_speed, ProfileSettings(tpot_slo_ms=150), 20.0, "L4", emulated=True).to_dict()
    assert (record["gpu"], record["emulated"], record["speed"]) == ("L4", True, 20.0)
    assert record["buckets"][0]["tput"] == 100.0  # in real time, as before
    _refused(cli, tmp_path, home, record, "measured on melange-sky's emulator at 20x real time, not a real L4")


@pytest.mark.parametrize(("gpu", "model"), [("L4", "meta-llama/Llama-3.1-8B-Instruct"), ("l4", "llama-3.1-8b"),
                                            ("L4", "/models/Meta-Llama-3.1-8B-Instruct/")])
def test_a_record_of_the_same_gpu_and_model_passes_the_checks(gpu, model) -> None:
    checked = check_record(load_model("llama-3.1-8b"), "L4", _record(gpu=gpu, model=model, emulated=False))
    assert checked.problems == () and checked.unchecked is None


def test_an_older_record_that_says_nothing_is_not_refused_but_warned_of() -> None:
    old = {k: v for k, v in _record().items() if k != "model"}
    checked = check_record(load_model("llama-3.1-8b"), "L4", old, "old.json")
    assert checked.problems == ()
    assert checked.unchecked is not None and checked.unchecked.startswith(
        "old.json: the profile does not say which GPU type or model it was measured on")
    assert "cannot check that it measured llama-3.1-8b on a real L4" in checked.unchecked


def test_force_saves_a_mismatched_fit_loudly_and_every_later_estimate_repeats_it(cli, tmp_path, home) -> None:
    """Also a record that says its GPU but not its model: fitted, with the could-not-check warning."""
    record = {k: v for k, v in _record(gpu="A10G", emulated=False).items() if k != "model"}
    (tmp_path / "p.json").write_text(json.dumps(record))
    fit = home / "engine" / "fits" / "L4.json"
    forced = cli(*CALIBRATE, "--force")
    assert forced.exit_code == 0 and fit.is_file(), forced.stderr
    lines = forced.stderr.splitlines()
    assert lines[0].startswith("Warning: L4: the fit was saved because of --force from a profile measured on A10G, "
                               "not L4: every later estimate") and f"delete {fit}" in lines[0]
    assert lines[1].startswith("Warning: p.json: the profile does not say which model it was measured on")
    assert forced.stdout.startswith("Calibrated L4 on 1 measured bucket(s) of llama-3.1-8b")
    later = cli("estimate", "--model", "llama-3.1-8b", "--gpu", "L4", "--input-tokens", "10", "--output-tokens", "2",
                "--concurrency", "1", "--requests", "1")
    assert later.exit_code == 0, later.stderr
    assert later.stderr.startswith(f"Warning: L4: the calibration fit {fit} was fitted to a profile measured on "
                                   f"A10G, not L4 (saved with --force)")
