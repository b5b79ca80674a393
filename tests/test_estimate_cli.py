"""`melange-sky estimate`: point mode, table mode, --json, --into, calibration, and its one-line errors."""
from __future__ import annotations

import json

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
    buckets = [{"cell": [0, k], "prompt_tokens": 300, "output_tokens": out, "status": "ok",
                "tput": max_rate(lambda: Engine(llama, "L4", coefficients=truth), 300, out, Slos(tpot_ms=150)).tput}
               for k, out in enumerate((40, 120))]
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "tpot_slo_ms": 150,
                                   "settings": {"tpot_slo_ms": 150}, "buckets": buckets}))
    result = cli("estimate", "--model", "llama-3.1-8b", "--gpu", "L4", "--calibrate", str(profile))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Calibrated L4 on 2 measured bucket(s) of llama-3.1-8b: median error")
    assert (tmp_path / "home" / "engine" / "fits" / "L4.json").is_file()
    later = cli("estimate", "--model", "llama-3.1-8b", "--gpu", "L4", "--input-tokens", "100", "--output-tokens",
                "10", "--concurrency", "1", "--requests", "1")
    assert "calibrated (" in later.stdout.splitlines()[0]
