"""`melange-sky profile` against a local server with a known latency law (tests/openai_test_server.py).

The law gives each bucket's true maximum rate under the TPOT SLO in closed form (`true_max_rate`); the profiler must
land within 15% of it. Timing parameters are small (a 15 ms SLO, a few tokens, 30 requests per step) so each test
takes seconds.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from melange_sky.core.config import load_config
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.errors import EndpointUnreachable, ProfileError
from melange_sky.inputs.http import parse_endpoint
from melange_sky.core.slo import representative_tokens
from melange_sky.inputs.profile import parse_cells, profile_endpoint
from melange_sky.inputs.profile_result import (BucketProfile, ProfileEvent, ProfileResult, ProfileSettings,
                                               merge_profile)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_test_server import start_server, true_max_rate  # noqa: E402

LAW = {"base_ms": 10.0, "k_ms": 0.5, "prefill_ms_per_token": 0.1}
SLO_MS = 15.0
# two input buckets (prompts of 20 and 200 tokens) x two output buckets (6 and 11 tokens)
IN_EDGES, OUT_EDGES = (10, 30, 370), (4, 8, 14)


def _start_law(*args: str) -> tuple[subprocess.Popen, str]:
    return start_server([f"--{k.replace('_', '-')}={v}" for k, v in LAW.items()] + list(args))


@pytest.fixture(scope="module")
def plain_law_server():
    """One law server without failure options for the module's tests that need nothing else (it keeps no state
    between profiles but the requests in it, which a finished profile has cancelled)."""
    proc, url = _start_law()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def law_server(request):
    """The law server (a subprocess on 127.0.0.1, ephemeral port): the module's plain one, or one started with the
    options given and stopped after the test."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> str:
        if not args:
            return request.getfixturevalue("plain_law_server")
        proc, url = _start_law(*args)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def fast(**changes) -> ProfileSettings:
    base = dict(tpot_slo_ms=SLO_MS, requests_per_step=30, start_rate=40.0, min_rate=20.0, max_rate=1000.0,
                bisect_steps=4, request_timeout=5.0, connect_timeout=2.0)
    return ProfileSettings(**{**base, **changes})



def test_measured_tputs_are_within_15_percent_of_the_true_max_rate(law_server):
    url = law_server()
    events: list[ProfileEvent] = []
    # 3 bisections, so the last bracket is narrower than the 15% asked. From 80 req/s (160 fails bucket (0, 0), 40
    # passes (1, 1): the brackets a start at 40 gives, a step fewer), (0, 0) ends (mostly) in [110, 120] or [120, 130]
    # (its truth 116.9; 8.6% wide) and (1, 1) in [50, 55] or [55, 60] (52.9; 9.5%), and the fitted crossing is clamped
    # into it. After 2 the bracket of (0, 0) was [120, 140], 17% of its truth, so the fit alone decided: one step's
    # mean TPOT moves ~0.35 ms (sd, 2 s steps; 8 single steps at 130 req/s read 14.8-15.8 ms), ~6 req/s at this law's
    # 0.06 ms per req/s, and a lucky step put it at +10% at load 5 (one run in 20), past 15% at load ~7. Now a result
    # past 15% needs a verdict 7% above the server's real limit (~121 and ~55 req/s: the law's formula is 3-4% low) to
    # go wrong and the fit to land past the bound too. ~11-13 s.
    result = profile_endpoint(url, "test-model", input_edges=IN_EDGES, output_edges=OUT_EDGES,
                              cells=[(0, 0), (1, 1)],
                              settings=fast(start_rate=80.0, bisect_steps=3, max_step_seconds=2.0),
                              on_progress=events.append)
    report = []
    for b in result.buckets:
        if b.cell not in ((0, 0), (1, 1)):
            assert b.status == "not_measured" and b.tput == 0
            continue
        truth = true_max_rate(SLO_MS, LAW["base_ms"], LAW["k_ms"], LAW["prefill_ms_per_token"], b.prompt_tokens,
                              b.output_tokens)
        report.append(f"{b.cell}: {b.prompt_tokens} in/{b.output_tokens} out: measured {b.tput:.1f} req/s, "
                      f"true {truth:.1f} ({100 * (b.tput / truth - 1):+.1f}%)")
        assert b.status == "ok"
        assert b.tput == pytest.approx(truth, rel=0.15), report
        assert b.best is not None and b.best.mean_tpot_ms <= SLO_MS
        assert b.best.server_prompt_tokens == b.prompt_tokens  # one word per token, counted by the server
        assert b.best.p50_ttft_ms <= b.best.p99_ttft_ms and b.best.p50_latency_ms <= b.best.p99_latency_ms
    print("\n".join(report))
    assert result.tputs[0][1] == result.tputs[1][0] == 0.0
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["estimate", "bucket_start"] and kinds[-1] == "bucket_done" and kinds.count("bucket_done") == 2
    assert events[0].seconds > 0 and events[0].total == 2
    assert all(e.step is not None for e in events if e.kind == "step")


def test_server_errors_and_timeouts_are_reported_per_bucket(law_server):
    # prompts over 150 words hang (the client must time out); over 400 get HTTP 500
    url = law_server("--hang-above-prompt=150", "--error-above-prompt=400")
    result = profile_endpoint(url, "test-model", input_edges=(10, 30, 370, 1000), output_edges=(4, 8),
                              settings=fast(request_timeout=0.4, bisect_steps=0, start_rate=20.0, max_rate=40.0,
                                            requests_per_step=10))
    by_cell = {b.cell: b for b in result.buckets}
    assert by_cell[(0, 0)].status in ("ok", "capped") and by_cell[(0, 0)].tput >= 20
    assert by_cell[(1, 0)].status == "failed" and by_cell[(1, 0)].message.startswith("timeouts: ")
    assert f"timed out after {by_cell[(1, 0)].timeout:g} s" in by_cell[(1, 0)].message
    assert by_cell[(2, 0)].status == "failed" and "HTTP 500: simulated server error" in by_cell[(2, 0)].message
    assert result.tputs[1] == [0.0] and result.tputs[2] == [0.0]


def test_unreachable_endpoint_is_a_one_line_error_with_exit_2(cli):
    url = f"http://127.0.0.1:{free_port()}"
    run = cli("profile", "--endpoint", url, "--model", "m")
    assert run.exit_code == 2
    assert run.stderr.startswith(f"Error: cannot reach {url} (connection refused)")
    assert run.stderr.count("\n") == 1
    with pytest.raises(EndpointUnreachable):
        profile_endpoint(url, "m", settings=fast())


def test_unknown_model_is_rejected_before_measuring(law_server, cli):
    url = law_server()
    run = cli("profile", "--endpoint", url + "/v1/", "--model", "nope")
    assert run.exit_code == 2
    assert "does not serve model 'nope'; it serves: test-model" in run.stderr and run.stderr.count("\n") == 1


def test_bucket_shape_mismatch_with_into_config_fails_before_contacting_anything(cli, write_config, example):
    path = write_config(example)  # 2x2 workload, no edges: the default 8x6 buckets do not fit
    run = cli("profile", "--endpoint", f"http://127.0.0.1:{free_port()}", "--model", "m", "--into", path,
              "--gpu", "A10G")
    assert run.exit_code == 2
    assert ("workload_distribution is 2x2 but it gives no bucket edges, and Mélange's defaults (only for its 8x6 "
            "grid) make 8x6 buckets; pass --input-buckets and --output-buckets with 3 and 3 edges") in run.stderr


def _profile_args(url: str, *extra: str) -> list[str]:
    return ["profile", "--endpoint", url, "--model", "test-model", "--tpot-slo-ms", str(SLO_MS),
            "--input-buckets", ",".join(map(str, IN_EDGES)), "--output-buckets", ",".join(map(str, OUT_EDGES)),
            "--buckets", "0:0", "--requests-per-step", "10", "--start-rate", "160", "--bisect-steps", "0",
            "--max-rate", "300", "--timeout", "5", *extra]


def test_json_output_and_profile_file(law_server, cli, tmp_path):
    url = law_server()
    out = tmp_path / "p.json"
    run = cli(*_profile_args(url, "--json", "-o", str(out)))
    assert run.exit_code == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["tputs"][0][0] > 0 and data["tputs"][0][1] == data["tputs"][1][0] == data["tputs"][1][1] == 0
    assert [b["status"] for b in data["buckets"]] == ["ok", "not_measured", "not_measured", "not_measured"]
    assert data["buckets"][0]["best"]["p99_ttft_ms"] is not None and "api_key" not in data["settings"]
    assert json.loads(out.read_text())["tputs"] == data["tputs"]
    assert "[1/1] bucket 0:0 (20 in / 6 out tokens)" in run.stderr  # progress lines
    human = cli(*_profile_args(url, "-q"))
    assert '"tputs": [' in human.stdout and "Not measured (0 in tputs): 0:1, 1:0, 1:1" in human.stdout
    assert human.stderr == ""


@pytest.mark.parametrize("gpu_form", ["dict", "list"])
def test_into_config_sets_the_gpu_tputs_in_both_gpu_info_forms(law_server, cli, write_config, example, gpu_form):
    url = law_server()
    example.update(input_buckets=list(IN_EDGES), output_buckets=list(OUT_EDGES))
    if gpu_form == "list":
        example["gpu_info"] = [{"name": n, **e} for n, e in example["gpu_info"].items()]
    path = write_config(example)
    run = cli(*_profile_args(url, "-q", "--into", path, "--gpu", "A10G"))
    assert run.exit_code == 0, run.stderr
    assert "3 bucket(s) were not measured and kept their previous values: 0:1, 1:0, 1:1" in run.stderr
    merged = json.loads(Path(path).read_text())
    a10g = (merged["gpu_info"]["A10G"] if gpu_form == "dict" else merged["gpu_info"][0])["tputs"]
    assert a10g[0][0] >= 40 and a10g[0][1:] == [1] and a10g[1] == [5, 2]
    # a GPU not yet in the config is added, with its cost
    run = cli(*_profile_args(url, "-q", "--into", path, "--gpu", "L4", "--cost", "0.8"))
    assert run.exit_code == 0, run.stderr
    config = load_config(path)
    assert config.gpu("L4").cost == 0.8 and config.gpu("L4").tputs[0][0] >= 40
    assert config.gpu("L4").tputs[1] == (0.0, 0.0)


def test_endpoint_buckets_and_sizes_parse_as_documented():
    ep = parse_endpoint("https://host.example:8443/prefix/v1/")
    assert (ep.scheme, ep.host, ep.port, ep.path("/v1/completions")) == ("https", "host.example", 8443,
                                                                         "/prefix/v1/completions")
    assert parse_endpoint("http://10.0.0.5").port == 80
    with pytest.raises(ProfileError, match="not an http"):
        parse_endpoint("10.0.0.5:8000")
    assert parse_cells("0:1, 2:*", (3, 2)) == [(0, 1), (2, 0), (2, 1)]
    with pytest.raises(ProfileError, match="outside the 3x2 buckets"):
        parse_cells("3:0", (3, 2))
    assert representative_tokens(1, 25) == 13 and representative_tokens(1, 25, "upper") == 24
    with pytest.raises(ProfileError):
        ProfileSettings(start_rate=0.01, min_rate=0.05)


@pytest.mark.parametrize("edges, message", [("1,100,50", "edges must increase"), ("8", "needs at least 2 edges")])
def test_bad_edges_are_a_one_line_error_with_exit_2_before_contacting_anything(cli, edges, message):
    run = cli("profile", "--endpoint", f"http://127.0.0.1:{free_port()}", "--model", "m", "--output-buckets", edges)
    assert run.exit_code == 2
    assert run.stderr.startswith("Error: --output-buckets: ") and message in run.stderr
    assert run.stderr.count("\n") == 1


def test_a_few_transient_errors_do_not_fail_a_bucket(law_server):
    url = law_server("--error-every=17")  # ~6% of requests get an immediate HTTP 500
    result = profile_endpoint(url, "test-model", input_edges=IN_EDGES, output_edges=OUT_EDGES, cells=[(0, 0)],
                              settings=fast(bisect_steps=2, max_step_seconds=3.0))
    b = result.buckets[0]
    truth = true_max_rate(SLO_MS, LAW["base_ms"], LAW["k_ms"], LAW["prefill_ms_per_token"], b.prompt_tokens,
                          b.output_tokens)
    assert b.status == "ok", b.message
    assert b.tput == pytest.approx(truth, rel=0.2)
    assert any(s.errors and s.passed for s in b.steps)  # an error among the measured ones was tolerated, counted


def test_a_bucket_whose_first_requests_fail_is_not_called_all_failed(law_server):
    url = law_server("--error-first=3")  # the endpoint check's probe and the first requests fail, then all is well
    result = profile_endpoint(url, "test-model", input_edges=IN_EDGES, output_edges=OUT_EDGES, cells=[(0, 0)],
                              settings=fast(bisect_steps=0, max_rate=80.0))
    b = result.buckets[0]
    assert b.status in ("ok", "capped") and "every request failed" not in b.message and b.tput >= 40
    assert b.steps[0].warmup >= 2  # a warm-up request that failed fast does not end the warm-up


def test_an_endpoint_pointing_at_v1_completions_is_rejected_naming_the_base_url(cli):
    run = cli("profile", "--endpoint", f"http://127.0.0.1:{free_port()}/v1/completions", "--model", "m")
    assert run.exit_code == 2 and run.stderr.count("\n") == 1
    assert "give the server's base URL" in run.stderr and "e.g. http://127.0.0.1:" in run.stderr
    with pytest.raises(ProfileError, match="base URL"):
        parse_endpoint("http://host:8000/v1/chat/completions")
    assert parse_endpoint("http://host:8000/v1").path("/v1/completions") == "/v1/completions"


def test_a_4xx_from_completions_aborts_with_the_url_called_and_exit_2(law_server, cli, write_config, example):
    url = law_server()
    example.update(input_buckets=list(IN_EDGES), output_buckets=list(OUT_EDGES))
    path = write_config(example)
    run = cli(*_profile_args(url + "/wrong-prefix", "--into", path, "--gpu", "A10G"))
    assert run.exit_code == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"POST {url}/wrong-prefix/v1/completions" in run.stderr and "HTTP 404" in run.stderr
    assert "base URL" in run.stderr
    assert json.loads(Path(path).read_text()) == example


def test_when_every_bucket_fails_the_profile_exits_nonzero_and_leaves_the_config_alone(law_server, cli,
                                                                                       write_config, example):
    url = law_server("--error-above-prompt=1")  # every profiling request gets HTTP 500
    example.update(input_buckets=list(IN_EDGES), output_buckets=list(OUT_EDGES))
    path = write_config(example)
    run = cli(*_profile_args(url, "-q", "--into", path, "--gpu", "A10G"))
    assert run.exit_code != 0
    assert "no bucket was measured" in run.stderr and "not changed" in run.stderr
    assert json.loads(Path(path).read_text()) == example


def _bucket(cell, status, tput):
    return BucketProfile(cell=cell, input_range=(IN_EDGES[cell[0]], IN_EDGES[cell[0] + 1]),
                         output_range=(OUT_EDGES[cell[1]], OUT_EDGES[cell[1] + 1]), prompt_tokens=20,
                         output_tokens=6, status=status, tput=tput)


def _result(*buckets):
    return ProfileResult(endpoint="http://127.0.0.1:1", model="m", tpot_slo_ms=SLO_MS, input_edges=IN_EDGES,
                         output_edges=OUT_EDGES, buckets=tuple(buckets), settings=fast(), seconds=1.0)


def test_merging_keeps_failed_buckets_and_matches_gpu_names_case_insensitively(example):
    example.update(input_buckets=list(IN_EDGES), output_buckets=list(OUT_EDGES))
    result = _result(_bucket((0, 0), "ok", 50.0), _bucket((0, 1), "failed", 0.0), _bucket((1, 0), "slo_not_met", 0.0),
                     _bucket((1, 1), "not_measured", 0.0))
    merged = merge_profile(example, result, "a10g", source="c.json")
    assert list(merged.data["gpu_info"]) == ["A10G", "A100-80GB"]  # no second entry next to A10G
    assert merged.data["gpu_info"]["A10G"]["tputs"] == [[50.0, 1], [0.0, 2]]  # failed and not measured kept
    assert merged.valid and any("0:1" in w and "failed" in w for w in merged.warnings)
    listed = dict(example, gpu_info=[{"name": n, **e} for n, e in example["gpu_info"].items()])
    merged = merge_profile(listed, result, "a100_80gb", source="c.json")
    assert [e["name"] for e in merged.data["gpu_info"]] == ["A10G", "A100-80GB"]
    added = merge_profile(example, result, "L4", source="c.json",
                          price=catalog_pricer())  # no cost given: the catalog prices it
    assert added.valid and not any("without a cost" in w for w in added.warnings)
    assert any("L4" in w and "catalog" in w for w in added.warnings)


def test_long_output_buckets_get_a_timeout_that_fits_their_length(law_server):
    # 40 output tokens at >= 10 ms each take > 0.4 s: longer than --timeout 0.2, within 3x the SLO budget
    url = law_server()
    result = profile_endpoint(url, "test-model", input_edges=(10, 30), output_edges=(39, 41), cells=[(0, 0)],
                              settings=fast(request_timeout=0.2, start_rate=10.0, min_rate=10.0, max_rate=10.0,
                                            bisect_steps=0, requests_per_step=10))
    b = result.buckets[0]
    assert b.status in ("ok", "capped") and b.steps[0].timeouts == 0, b.message
    assert b.timeout == pytest.approx(3 * (40 * SLO_MS / 1000 + 20 * 0.0005))


def test_a_hanging_bucket_stops_after_two_rates_where_every_request_timed_out(law_server):
    url = law_server("--hang-above-prompt=150")
    result = profile_endpoint(url, "test-model", input_edges=(10, 30, 370), output_edges=(4, 8), cells=[(1, 0)],
                              settings=fast(request_timeout=0.2, start_rate=20.0, min_rate=0.05, bisect_steps=0,
                                            requests_per_step=10))
    b = result.buckets[1]
    assert b.status == "failed" and b.message.startswith("timeouts:") and "timed out after" in b.message
    assert len(b.steps) == 2 and all(s.timeouts == s.measured for s in b.steps)


def test_a_server_that_stops_early_despite_ignore_eos_is_warned_about(law_server):
    url = law_server("--max-output=3")  # the 6-token bucket gets 3 tokens: half the load asked for
    result = profile_endpoint(url, "test-model", input_edges=IN_EDGES, output_edges=OUT_EDGES, cells=[(0, 0)],
                              settings=fast(bisect_steps=0, max_rate=80.0))
    assert any("0:0" in w and "3 of the 6" in w and "ignore_eos" in w for w in result.warnings), result.warnings


def test_credentials_in_the_endpoint_url_are_never_shown_or_written(law_server, cli, tmp_path):
    url = law_server().replace("http://", "http://user:s3cret@")
    out = tmp_path / "p.json"
    run = cli(*_profile_args(url, "-o", str(out)))
    assert run.exit_code == 0, run.stderr
    assert "s3cret" not in run.stdout + run.stderr + out.read_text()
    assert "s3cret" not in parse_endpoint(url).url


def test_every_slo_given_must_hold_and_the_report_names_the_one_that_set_the_limit(law_server):
    # 11-token outputs take 2 ms + 10 x TPOT (107 ms idle): a p90 latency of 140 ms needs TPOT <= 13.8 ms, tighter
    # than the 15 ms TPOT SLO, so the latency SLO binds well below the TPOT-only maximum (about 0.5 x). The 33 ms
    # between idle and the SLO absorb a busy machine's lateness (6-token outputs and 70 ms left 15 ms: the rate read
    # anywhere from 7.5 to 28 req/s beside a busy loop)
    url = law_server()
    result = profile_endpoint(url, "test-model", input_edges=IN_EDGES, output_edges=OUT_EDGES, cells=[(0, 1)],
                              settings=fast(latency_slo_ms=140.0, start_rate=20.0, min_rate=5.0, bisect_steps=1,
                                            max_step_seconds=3.0))
    b = result.buckets[1]
    tpot_only = true_max_rate(SLO_MS, LAW["base_ms"], LAW["k_ms"], LAW["prefill_ms_per_token"], b.prompt_tokens,
                              b.output_tokens)
    assert b.status == "ok" and b.limit == "latency", b.message
    assert 0 < b.tput < 0.9 * tpot_only
    checks = {c.slo: c for c in b.best.checks}
    assert set(checks) == {"tpot", "latency"} and checks["tpot"].passed and checks["latency"].passed
    assert result.to_dict()["slos"] == {"tpot": SLO_MS, "latency": 140.0}


def test_queueing_shows_in_ttft_and_a_ttft_slo_limits_the_rate(law_server):
    # at most 4 requests decode at once: TPOT stays <= 12 ms whatever the rate, the rest queue before prefill, so
    # only the TTFT SLO can stop the rate below the batch's capacity (4 / (20 ms prefill + 5 x 12 ms) = 50 req/s).
    # A 20 ms prefill and a 50 ms SLO leave 30 ms for the queue and for the scheduling lateness of a busy machine
    # (with 2 ms and 10 ms, an idle server's p90 TTFT broke the SLO at 8 req/s on an overloaded machine)
    url = law_server("--max-batch=4", "--prefill-ms-per-token=1.0")
    result = profile_endpoint(url, "test-model", input_edges=IN_EDGES, output_edges=OUT_EDGES, cells=[(0, 0)],
                              settings=fast(ttft_slo_ms=50.0, start_rate=16.0, min_rate=2.0, bisect_steps=1,
                                            max_step_seconds=3.0))
    b = result.buckets[0]
    assert b.status == "ok" and b.limit == "ttft", b.message
    assert 10 <= b.tput < 50
    assert all(c.passed for c in b.best.checks) and all(c.value_ms <= 12.5 for c in b.best.checks if c.slo == "tpot")
    assert any(c.slo == "ttft" and not c.passed for s in b.steps for c in s.checks)


def test_a_bucket_past_max_minutes_is_cut_short_and_keeps_its_best_rate(law_server):
    url = law_server()
    result = profile_endpoint(url, "test-model", input_edges=IN_EDGES, output_edges=OUT_EDGES, cells=[(0, 0)],
                              settings=fast(max_minutes=0.03, start_rate=20.0, bisect_steps=4))
    b = result.buckets[0]
    assert b.status == "cut_short" and "cut short by --max-minutes 0.03" in b.message
    passed = [s.rate for s in b.steps if s.passed]
    assert b.tput == (max(passed) if passed else 0.0) and result.tputs[0][0] == b.tput
    assert b.seconds < 0.03 * 60 + 5  # the last step ends at the bucket's cap, not at its own


def test_cli_shows_an_estimate_the_limiting_slo_and_keeps_the_record_fields(law_server, cli, tmp_path):
    url = law_server()
    out = tmp_path / "p.json"
    args = [a for a in _profile_args(url, "-o", str(out)) if a not in ("--tpot-slo-ms", str(SLO_MS))]
    run = cli(*args, "--latency-slo-ms", "200")  # another SLO given: no default TPOT SLO
    assert run.exit_code == 0, run.stderr
    assert run.stderr.startswith("Profiling 1 bucket(s): about ")
    assert "p90 latency <= 200 ms" in run.stdout
    data = json.loads(out.read_text())
    assert data["slos"] == {"latency": 200.0} and data["settings"]["tpot_slo_ms"] is None
    bucket = data["buckets"][0]
    assert {"cell", "prompt_tokens", "output_tokens", "tput", "status", "limit", "headroom"} <= set(bucket)
    assert bucket["cell"] == [0, 0] and bucket["status"] in ("ok", "capped") and bucket["tput"] > 0
