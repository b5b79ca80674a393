"""`melange-sky estimate`: point mode, table mode, --json, --into, calibration, and its one-line errors."""
from __future__ import annotations

import json

import pytest
import yaml

from melange_sky.core.slo import Slos
from melange_sky.engine import Engine, load_model
from melange_sky.engine.calibrate import scaled
from melange_sky.engine.estimate import max_rate
from melange_sky.engine.step_time import Coefficients

POINT = ("estimate", "--model", "llama-3.1-8b", "--gpu", "A10G", "--input-tokens", "500", "--output-tokens", "100")


def test_point_mode_prints_throughput_latencies_kv_and_preemptions(cli) -> None:
    result = cli(*POINT, "--concurrency", "8", "--requests", "16")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert out.startswith("llama-3.1-8b on A10G, bf16: 2323 KV blocks of 16 tokens")
    for label in ("output tokens/s", "requests/s", "TTFT ms", "TPOT ms", "KV cache", "preempted"):
        assert label in out
    assert "16 requests of 500 in / 100 out tokens, closed loop, 8 in flight:" in out


def test_point_mode_json_has_the_issues_keys(cli) -> None:
    result = cli(*POINT, "--rate", "1.5", "--requests", "30", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"output_tokens_per_s", "requests_per_s", "ttft_ms", "tpot_ms", "kv_cache_use", "preempted"}
    assert set(data["tpot_ms"]) == {"mean", "p50", "p90"} and data["preempted"] == 0


def test_errors_are_one_line_with_exit_code_2(cli) -> None:
    for args, words in [
        (("estimate", "--model", "llama-3.1-70b", "--gpu", "A10G", "--input-tokens", "10", "--output-tokens", "10",
          "--rate", "1"), "Error: does not fit: 141 GB of weights on 24 GB"),
        (("estimate", "--model", "gpt-9", "--gpu", "A10G", "--input-tokens", "10", "--output-tokens", "10",
          "--rate", "1"), "Error: unknown model 'gpt-9': bundled models are "),
        ((*POINT,), "Error: give exactly one of --concurrency and --rate"),
        (("estimate", "--gpu", "A10G"), "Error: point mode needs --model, --gpu, --input-tokens"),
    ]:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.startswith(words) and result.stderr.count("\n") == 1, result.stderr


def test_table_mode_writes_tputs_and_catalog_costs_into_a_config_without_gpu_info(cli, tmp_path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({
        "workload_distribution": [[0.5, 0.2], [0.2, 0.1]], "total_request_rate": 4,
        "input_buckets": [1, 400, 1600], "output_buckets": [1, 100, 400],
        "deployment": {"model": "meta-llama/Llama-3.1-8B-Instruct", "max_num_seqs": 64}}))
    result = cli("estimate", "--gpus", "A10G,T4", "--config", str(config), "--into", str(config), "--json")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)["gpus"]
    assert shown["T4"] == {"tputs": None, "note": "does not fit: 16 GB of weights on 16 GB"}
    assert "max_num_seqs 64" in shown["A10G"]["engine"]  # the deployment's engine settings are the engine's
    written = json.loads(config.read_text())
    assert written["gpu_info"]["A10G"]["tputs"] == shown["A10G"]["tputs"]
    assert written["gpu_info"]["A10G"]["cost"] > 0 and "T4" not in written["gpu_info"]
    assert "A10G: 4 buckets in" in result.stderr and "T4: does not fit" in result.stderr
    solved = cli("solve", str(config))
    assert solved.exit_code == 0, solved.stderr


def test_calibrate_fits_a_profile_then_estimates_say_they_use_it(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MELANGE_SKY_HOME", str(tmp_path / "home"))
    truth = scaled(Coefficients(), 0.75, 1.0, 1.0)
    llama = load_model("llama-3.1-8b")
    # one bucket: the command's behaviour (fit, save, later estimates say so) needs no more; a fit costs a rate search
    # per bucket per trial (two buckets, 300/40 and 300/120: 4.8 CPU-s; this one 1.4)
    buckets = [{"cell": [0, 0], "prompt_tokens": 300, "output_tokens": 120, "status": "ok",
                "tput": max_rate(lambda: Engine(llama, "L4", coefficients=truth), 300, 120, Slos(tpot_ms=150)).tput}]
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "tpot_slo_ms": 150,
                                   "settings": {"tpot_slo_ms": 150}, "buckets": buckets}))
    result = cli("estimate", "--model", "llama-3.1-8b", "--gpu", "L4", "--calibrate", str(profile))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Calibrated L4 on 1 measured bucket(s) of llama-3.1-8b: median error")
    assert (tmp_path / "home" / "engine" / "fits" / "L4.json").is_file()
    later = cli("estimate", "--model", "llama-3.1-8b", "--gpu", "L4", "--input-tokens", "100", "--output-tokens",
                "10", "--concurrency", "1", "--requests", "1")
    assert "calibrated (" in later.stdout.splitlines()[0]


def test_a_fit_that_misses_its_profile_is_refused_unless_forced_and_then_flagged_in_every_estimate(
        cli, tmp_path, monkeypatch) -> None:
    """QA 20: a fit leaving 87% median error was saved silently and applied to every later estimate."""
    monkeypatch.setenv("MELANGE_SKY_HOME", str(tmp_path / "home"))
    profile = tmp_path / "p.json"  # 5000 req/s of a tiny bucket: no L4 serves that, whatever its coefficients
    profile.write_text(json.dumps({"settings": {"tpot_slo_ms": 150}, "buckets": [
        {"cell": [0, 0], "prompt_tokens": 20, "output_tokens": 4, "status": "ok", "tput": 5000}]}))
    fit = tmp_path / "home" / "engine" / "fits" / "L4.json"
    calibrate = ("estimate", "--model", "llama-3.1-8b", "--gpu", "L4", "--calibrate", str(profile))
    refused = cli(*calibrate)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"Error: {profile}: the best fit of L4 still misses the profile's max rates by ")
    assert "more than the 25% a saved fit may leave: not saved" in refused.stderr and not fit.exists()
    forced = cli(*calibrate, "--force")
    assert forced.exit_code == 0 and fit.is_file(), forced.stderr
    assert forced.stderr.startswith("Warning: L4: the fit leaves ") and f"delete {fit}" in forced.stderr
    later = cli(*POINT[:4], "L4", *POINT[5:], "--concurrency", "1", "--requests", "1", "--json")
    assert later.exit_code == 0, later.stderr
    assert json.loads(later.stdout)["calibration"] == str(fit)
    assert later.stderr.startswith(f"Warning: L4: the calibration fit {fit} left ")
    assert "saved with --force" in later.stderr


@pytest.mark.parametrize(("args", "says"), [
    ((*POINT, "--rate", "1", "--tpot-slo-ms", "100"), "--tpot-slo-ms does not apply here: point mode"),
    ((*POINT, "--rate", "1", "--size", "upper"), "--size does not apply here: point mode"),
    (("estimate", "--gpus", "A10G", "--config", "c.json", "--input-tokens", "5"),
     "--input-tokens does not apply here: table mode"),
    (("estimate", "--gpus", "A10G", "--config", "c.json", "--rate", "5"), "--rate does not apply here: table mode"),
    (("estimate", "--gpu", "A10G", "--gpus", "L4"), "give --gpu (point mode: one GPU type, one workload) or --gpus"),
    (("estimate", "--gpu", "A10G", "--config", "c.json"), "--gpu is point mode's one GPU type: table mode"),
    ((*POINT, "--rate", "1", "--force"), "--force goes with --calibrate PROFILE"),
    (("estimate", "--gpu", "L4", "--model", "qwen3-8b", "--calibrate", "c.json", "--rate", "1"),
     "--rate does not apply here: --calibrate fits"),
])
def test_an_option_the_mode_would_ignore_is_a_one_line_error(cli, tmp_path, args, says) -> None:
    """QA 11, 12: they were silently ignored, and --gpu with --gpus asked for --config."""
    (tmp_path / "c.json").write_text("{}")
    result = cli(*args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"Error: {says}"), result.stderr


def test_into_refuses_an_entry_that_could_not_validate_before_estimating_anything(cli, tmp_path) -> None:
    """QA 18: MI300X (no catalog price) was written without a cost and the config no longer validated."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"workload_distribution": [[1.0]], "total_request_rate": 1,
                                  "input_buckets": [1, 100], "output_buckets": [1, 50]}))
    before = config.read_text()
    result = cli("estimate", "--gpus", "H100-PCIE,MI300X", "--config", str(config), "--into", str(config))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"Error: {config}: gpu_info.MI300X.cost: missing, and the catalog has no price")
    assert "nothing was estimated or written" in result.stderr and config.read_text() == before
    assert cli("estimate", "--gpus", "B300", "--config", str(config)).stderr.startswith(
        "Error: no datasheet for GPU 'B300'")


def test_an_original_yaml_config_stays_yaml_and_gets_the_edges_and_default_model_it_was_estimated_with(
        cli, tmp_path) -> None:
    """QA 8 (JSON written into a YAML file, comments lost), 12 (the error named options estimate lacked) and 17 (no
    default model): Mélange's own 2x2 example carries no edges, so they are given on the command line."""
    config = tmp_path / "orig.yaml"
    config.write_text("# Mélange's example, no edges\nworkload_distribution: [[0.2, 0.1], [0.5, 0.2]]\n"
                      "total_request_rate: 3\ngpu_info:\n  A10G: {cost: 1.01, tputs: [[2, 1], [5, 2]]}  # profiled\n")
    table = ("estimate", "--gpus", "A10G", "--config", str(config), "--into", str(config), "-q")
    missing = cli(*table)
    assert missing.exit_code == 2 and "pass --input-buckets and --output-buckets with 3 and 3 edges" in missing.stderr
    result = cli(*table, "--input-buckets", "1,8,32", "--output-buckets", "1,4,8", "--json")
    assert result.exit_code == 0, result.stderr
    assert "has no deployment.model: estimating meta-llama/Llama-2-7b-chat-hf, the model plan and up deploy" in \
        result.stderr
    assert "llama-2-7b on A10G" in json.loads(result.stdout)["gpus"]["A10G"]["engine"]
    assert (tmp_path / "orig.yaml.bak").read_text().startswith("# Mélange's example")
    written = yaml.safe_load(config.read_text())
    assert written["input_buckets"] == [1, 8, 32] and written["gpu_info"]["A10G"]["cost"] == 1.01
    assert written["gpu_info"]["A10G"]["tputs"] == json.loads(result.stdout)["gpus"]["A10G"]["tputs"]
    assert cli("solve", str(config)).exit_code == 0


def test_into_under_tensor_parallelism_writes_per_gpu_tputs_on_instances_that_hold_a_replica(cli, tmp_path) -> None:
    """A config's tputs are per GPU and its instances must hold whole TP replicas (QA 7): a TP 2 replica's rate is
    written halved, and a new entry is pinned to 2-GPU instances."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"workload_distribution": [[1.0]], "total_request_rate": 20,
                                  "input_buckets": [1, 100], "output_buckets": [1, 20],
                                  "deployment": {"model": "llama-3.1-8b", "tensor_parallel_size": 2}}))
    wrong = cli("estimate", "--gpus", "A100-80GB", "--config", str(config), "--into", str(config), "--tp", "1")
    assert wrong.exit_code == 2 and "--tp 1 is not the deployment's tensor_parallel_size (2)" in wrong.stderr
    result = cli("estimate", "--gpus", "A100-80GB", "--config", str(config), "--into", str(config), "--json", "-q")
    assert result.exit_code == 0, result.stderr
    replica = json.loads(result.stdout)["gpus"]["A100-80GB"]["tputs"][0][0]
    entry = json.loads(config.read_text())["gpu_info"]["A100-80GB"]
    assert entry["accelerators"] == "A100-80GB:2" and entry["tputs"] == [[round(replica / 2, 4)]]
    assert "per GPU: each TP 2 replica's rate / 2" in result.stderr
    assert cli("solve", str(config)).exit_code == 0
