"""`melange-sky workload`: traces in every accepted shape give the exact histogram, rate, warnings and errors."""
from __future__ import annotations

import csv
import gzip
import json
import random
import subprocess
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from melange_sky.core.buckets import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES, parse_edges
from melange_sky.core.config import load_config
from melange_sky.errors import BucketEdgesError, TraceError
from melange_sky.inputs.trace import read_trace
from melange_sky.inputs.workload import merge_workload
from melange_sky.inputs.trace_formats import ColumnChoice

IN_EDGES = DEFAULT_INPUT_EDGES
OUT_EDGES = DEFAULT_OUTPUT_EDGES


def expected_counts(pairs, in_edges=IN_EDGES, out_edges=OUT_EDGES):
    """The histogram by the definition, written independently of the code under test: [lo, hi), last closed."""
    def index(value, edges):
        for k in range(len(edges) - 2, -1, -1):
            if value >= edges[k]:
                return k
        return 0
    counts = [[0] * (len(out_edges) - 1) for _ in range(len(in_edges) - 1)]
    for i, o in pairs:
        counts[index(i, in_edges)][index(o, out_edges)] += 1
    return counts


def random_pairs(n=3000, seed=7):
    rng = random.Random(seed)
    # every edge and its neighbours, plus a spread of random lengths within the edges
    edge_values = [v + d for v in IN_EDGES for d in (-1, 0, 1) if 1 <= v + d <= IN_EDGES[-1]]
    out_values = [v + d for v in OUT_EDGES for d in (-1, 0, 1) if 1 <= v + d <= OUT_EDGES[-1]]
    pairs = [(rng.choice(edge_values), rng.choice(out_values)) for _ in range(n // 3)]
    pairs += [(rng.randint(1, IN_EDGES[-1]), rng.randint(1, OUT_EDGES[-1])) for _ in range(n - len(pairs))]
    return pairs


JSON_ROWS = {
    "input_len": lambda i, o: {"input_len": i, "output_len": o},
    "prompt_tokens": lambda i, o: {"prompt_tokens": i, "completion_tokens": o, "id": "x"},
    "input_tokens": lambda i, o: {"input_tokens": i, "output_tokens": o},
    "usage": lambda i, o: {"id": "cmpl-1", "usage": {"prompt_tokens": i, "completion_tokens": o,
                                                     "total_tokens": i + o}},
    "usage_responses_api": lambda i, o: {"usage": {"input_tokens": i, "output_tokens": o}},
}


@pytest.mark.parametrize("naming", sorted(JSON_ROWS))
def test_jsonl_trace_gives_the_exact_histogram_for_each_column_naming(tmp_path, naming):
    pairs = random_pairs()
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(JSON_ROWS[naming](i, o)) + "\n" for i, o in pairs))
    result = read_trace(path, rate=10)
    assert [list(r) for r in result.counts] == expected_counts(pairs)
    assert result.rows == len(pairs) and result.skipped == 0
    assert sum(map(sum, result.distribution)) == pytest.approx(1.0)
    assert result.input_overflow == result.output_overflow == 0


CSV_COLUMNS = {
    "input_len": (["input_len", "output_len"], lambda i, o: [i, o]),
    "prompt_tokens": (["id", "prompt_tokens", "completion_tokens"], lambda i, o: ["r", i, o]),
    "flattened_usage": (["usage.prompt_tokens", "usage.completion_tokens"], lambda i, o: [i, o]),
    "usage_json_column": (["id", "usage"], lambda i, o: ["r", json.dumps({"prompt_tokens": i,
                                                                          "completion_tokens": o})]),
}


@pytest.mark.parametrize("naming", sorted(CSV_COLUMNS))
def test_csv_trace_gives_the_exact_histogram_for_each_column_naming(tmp_path, naming):
    header, row = CSV_COLUMNS[naming]
    pairs = random_pairs()
    path = tmp_path / "trace.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(row(i, o) for i, o in pairs)
    result = read_trace(path, rate=10)
    assert [list(r) for r in result.counts] == expected_counts(pairs)
    assert result.rows == len(pairs)


def test_custom_edges_and_gzip_and_sniffed_format(tmp_path):
    pairs = random_pairs(500)
    path = tmp_path / "trace.log.gz"  # no telling extension: the format is sniffed from the first character
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps({"input_len": i, "output_len": o}) + "\n" for i, o in pairs))
    edges_in, edges_out = (1, 300, 3000, 8000), (1, 50, 2000)
    result = read_trace(path, input_edges=edges_in, output_edges=edges_out, rate=1)
    assert result.format == "jsonl"
    assert [list(r) for r in result.counts] == expected_counts(pairs, edges_in, edges_out)


def test_rate_is_measured_from_epoch_timestamps(tmp_path):
    path = tmp_path / "t.jsonl"
    # 101 requests over 50 s: 100 gaps of 0.5 s, in shuffled order
    rows = [{"timestamp": 1_700_000_000 + k * 0.5, "input_len": 10, "output_len": 10} for k in range(101)]
    random.Random(1).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = read_trace(path)
    assert result.rate_source == "timestamps"
    assert result.rate == pytest.approx(2.0)
    assert result.duration == pytest.approx(50.0)


def test_rate_is_measured_from_iso_timestamps_with_and_without_zone(tmp_path):
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    stamps = [(start + timedelta(seconds=4 * k)) for k in range(11)]  # 10 gaps over 40 s
    texts = [s.isoformat().replace("+00:00", "Z") if k % 3 == 0 else
             s.astimezone(timezone(timedelta(hours=2))).isoformat() if k % 3 == 1 else
             s.replace(tzinfo=None).isoformat() for k, s in enumerate(stamps)]  # naive means UTC
    path = tmp_path / "t.csv"
    path.write_text("timestamp,prompt_tokens,completion_tokens\n" + "".join(f"{t},5,5\n" for t in texts))
    result = read_trace(path)
    assert result.rate == pytest.approx(10 / 40)


def test_given_rate_wins_and_missing_timestamps_warn(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input_len": 5, "output_len": 5, "timestamp": 0}\n{"input_len": 5, "output_len": 5, '
                    '"timestamp": 1}\n')
    assert read_trace(path, rate=7.5).rate == 7.5
    no_ts = tmp_path / "n.jsonl"
    no_ts.write_text('{"input_len": 5, "output_len": 5}\n')
    result = read_trace(no_ts)
    assert result.rate is None and "total_request_rate" not in result.config_fragment()
    assert any("pass --rate" in w for w in result.warnings)


def test_lengths_beyond_the_edges_go_to_the_end_buckets_and_are_counted(tmp_path):
    rows = ([(8000, 2000)] * 3  # exactly the last edges: inside, no warning
            + [(8001, 10)] * 4 + [(50_000, 5000)] * 2 + [(10, 2001)] * 5  # beyond
            + [(0, 0)] * 6)  # below the first edge (1)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"input_len": i, "output_len": o}) + "\n" for i, o in rows))
    result = read_trace(path, rate=1)
    assert (result.input_overflow, result.output_overflow) == (6, 7)
    assert (result.input_underflow, result.output_underflow) == (6, 6)
    assert result.counts[-1][-1] == 3 + 2
    assert result.counts[-1][0] == 4
    assert result.counts[1][-1] == 0 and result.counts[0][-1] == 5  # 10 input tokens: bucket 1-25
    assert result.counts[0][0] == 6
    assert any(w.startswith("6 request(s)") and "input" in w and "8000" in w for w in result.warnings)
    assert any(w.startswith("7 request(s)") and "output" in w for w in result.warnings)


@pytest.mark.parametrize("bad_line, reason", [
    ('{"input_len": 5, "output_len": ', "not valid JSON"),
    ('{"input_len": -3, "output_len": 5}', "input_len is negative"),
    ('{"input_len": 5}', "output_len is missing"),
    ('{"input_len": 5.5, "output_len": 5}', "whole number"),
    ('{"foo": 1}', "no token counts"),
    ('[1, 2]', "expected a JSON object"),
    ('{"input_len": 5, "output_len": 5, "timestamp": "yesterday"}', "ISO-8601"),
])
def test_a_broken_jsonl_row_is_an_error_naming_its_line(tmp_path, bad_line, reason):
    path = tmp_path / "t.jsonl"
    good = '{"input_len": 5, "output_len": 5}'
    path.write_text(f"{good}\n\n{good}\n{bad_line}\n{good}\n")  # the blank line 2 is skipped, not an error
    with pytest.raises(TraceError) as info:
        read_trace(path, rate=1)
    assert f"{path}: line 4: " in str(info.value) and reason in str(info.value)
    assert "--skip-bad" in str(info.value)


def test_a_broken_csv_row_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("input_len,output_len\n5,5\n6,6\n7,x\n8,8\n")
    with pytest.raises(TraceError, match=r"line 4: output_len must be a whole number"):
        read_trace(path, rate=1)


def test_csv_errors_name_columns_as_the_file_spells_them(tmp_path):
    """CSV headers are matched lower-cased, but a message quotes the header as written (ContextTokens, TIMESTAMP)."""
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,5,5\n2023-11-16 18:15:47,-3,5\n")
    with pytest.raises(TraceError, match=r"line 3: ContextTokens is negative \(-3\)"):
        read_trace(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nsoon,5,5\n")
    with pytest.raises(TraceError, match=r"line 2: TIMESTAMP 'soon' is neither a number nor an ISO-8601 time"):
        read_trace(path)
    path.write_text("When,Prompt,Completion\n1,5,5\n")
    with pytest.raises(TraceError, match=r"--input-column 'prompts' is not a column of the trace \(found When, "
                                         r"Prompt, Completion\)"):
        read_trace(path, columns=ColumnChoice(input="Prompts", output="Completion"))
    with pytest.raises(TraceError, match=r"the CSV header has no token columns \(found When, Prompt, Completion\)"):
        read_trace(path)


def test_skip_bad_skips_and_counts_broken_rows(tmp_path, cli):
    path = tmp_path / "t.jsonl"
    good = '{"input_len": 5, "output_len": 5}'
    path.write_text("\n".join([good, "{oops", good, '{"input_len": -1, "output_len": 1}', good, "[]"]) + "\n")
    result = read_trace(path, rate=1, skip_bad=True)
    assert (result.rows, result.skipped) == (3, 3)
    assert [e.split(":")[0] for e in result.skipped_examples] == ["line 2", "line 4", "line 6"]
    run = cli("workload", str(path), "--skip-bad", "--rate", "1", "--json")
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["skipped"] == 3
    assert "Warning: skipped 3 broken row(s) of 6" in run.stderr


@pytest.mark.parametrize("edges, message", [
    ("1,25,25,100", "edges must increase, but 25 follows 25"),
    ("1,100,50", "edges must increase"),
    ("25", "needs at least 2 edges"),
    ("1,abc", "'abc' is not a whole number"),
])
def test_bad_edges_are_a_one_line_error_with_exit_2(tmp_path, cli, edges, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input_len": 5, "output_len": 5}\n')
    run = cli("workload", str(path), "--input-buckets", edges)
    assert run.exit_code == 2
    assert run.stderr.startswith("Error: --input-buckets: ") and message in run.stderr
    assert run.stderr.count("\n") == 1
    with pytest.raises(BucketEdgesError):
        parse_edges(edges)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.jsonl", "no such file"),
    (lambda p: p, "is a directory"),
    (lambda p: (p / "empty.jsonl").write_text("") and None or p / "empty.jsonl", "no requests in the trace"),
    (lambda p: (p / "h.csv").write_text("a,b\n1,2\n") and None or p / "h.csv", "the CSV header has no token"),
])
def test_an_unreadable_trace_is_a_one_line_error_with_exit_2(tmp_path, cli, make, message):
    run = cli("workload", str(make(tmp_path)))
    assert run.exit_code == 2
    assert run.stderr.startswith("Error: ") and message in run.stderr and run.stderr.count("\n") == 1


def test_json_output_and_config_keys_file(tmp_path, cli):
    pairs = random_pairs(300)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"input_len": i, "output_len": o, "timestamp": k})
                            + "\n" for k, (i, o) in enumerate(pairs)))
    out = tmp_path / "w.json"
    run = cli("workload", str(path), "--json", "-o", str(out))
    assert run.exit_code == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["counts"] == expected_counts(pairs)
    assert data["rows"] == 300 and data["rate_source"] == "timestamps"
    assert data["total_request_rate"] == pytest.approx(1.0)
    assert data["written"] == str(out)
    keys = json.loads(out.read_text())
    assert set(keys) == {"workload_distribution", "total_request_rate", "input_buckets", "output_buckets"}
    human = cli("workload", str(path))
    assert "300 requests from" in human.stdout and '"workload_distribution": [' in human.stdout


def _trace_for_2x2(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [(10, 10)] * 1 + [(10, 200)] * 3 + [(500, 10)] * 4 + [(500, 200)] * 2
    path.write_text("".join(json.dumps({"prompt_tokens": i, "completion_tokens": o, "timestamp": k * 0.25}) + "\n"
                            for k, (i, o) in enumerate(rows)))
    return path


@pytest.mark.parametrize("gpu_form", ["dict", "list"])
def test_merge_into_config_updates_the_workload_and_keeps_everything_else(tmp_path, cli, example, gpu_form):
    config = dict(example, name="fleet", deployment={"model": "m"}, input_buckets=[1, 100, 1000],
                  output_buckets=[1, 100, 1000])
    if gpu_form == "list":
        config["gpu_info"] = [{"name": n, **e} for n, e in example["gpu_info"].items()]
    target = tmp_path / "config.json"
    target.write_text(json.dumps(config))
    run = cli("workload", str(_trace_for_2x2(tmp_path)), "--into", str(target))
    assert run.exit_code == 0, run.stderr
    assert "Warning" not in run.stderr  # the config's own 2x2 edges were used, so its tputs still fit
    merged = json.loads(target.read_text())
    assert merged["workload_distribution"] == [[0.1, 0.3], [0.4, 0.2]]
    assert merged["total_request_rate"] == pytest.approx(9 / 2.25)
    for key in ("gpu_info", "name", "deployment", "slice_factor", "input_buckets", "output_buckets"):
        assert merged[key] == config[key]
    loaded = load_config(target)
    assert loaded.shape == (2, 2)


@pytest.mark.parametrize("gpu_form", ["dict", "list"])
def test_merge_with_a_new_shape_warns_which_gpu_to_reprofile(tmp_path, cli, example, gpu_form):
    if gpu_form == "list":
        example["gpu_info"] = [{"name": n, **e} for n, e in example["gpu_info"].items()]
    target = tmp_path / "config.json"
    target.write_text(json.dumps(example))
    out = tmp_path / "merged.json"
    run = cli("workload", str(_trace_for_2x2(tmp_path)), "--into", str(target), "-o", str(out))
    assert run.exit_code == 0, run.stderr
    assert json.loads(target.read_text()) == example  # -o: the original is untouched
    merged = json.loads(out.read_text())
    assert len(merged["workload_distribution"]) == 8 and merged["gpu_info"] == example["gpu_info"]
    for gpu in ("A10G", "A100-80GB"):
        # the hint names the file written (-o), the one to re-profile into, not the untouched original
        hint = next(line for line in run.stderr.splitlines() if line.endswith(f" --gpu {gpu}"))
        assert hint.startswith(f"Warning: {out}: gpu_info")
        assert hint.endswith(f".tputs is 2x2 but the new workload_distribution is 8x6: the config is invalid until "
                             f"it is re-profiled for these buckets: melange-sky profile --endpoint URL --model MODEL "
                             f"--into {out} --gpu {gpu}")
    assert f"--into {target} " not in run.stderr
    assert merge_workload(example, read_trace(_trace_for_2x2(tmp_path)), "c").valid is False


def test_merge_keeps_the_old_rate_when_the_trace_has_none(tmp_path, example):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input_len": 5, "output_len": 5}\n')
    result = read_trace(path, input_edges=(1, 100, 1000), output_edges=(1, 100, 1000))
    merged = merge_workload(example, result, "c.json")
    assert merged.data["total_request_rate"] == example["total_request_rate"]
    assert merged.valid and any("kept total_request_rate 30" in w for w in merged.warnings)


def test_workload_command_does_not_import_skypilot(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input_len": 5, "output_len": 5}\n')
    code = ("import sys; from melange_sky.cli import main\n"
            f"try:\n    main(['workload', {str(path)!r}, '--rate', '1', '--json'])\n"
            "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "assert 'sky' not in sys.modules, 'sky was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def read_trace_traced(path):
    """read_trace(path) and the peak bytes Python allocated while it ran."""
    tracemalloc.start()
    try:
        result = read_trace(path)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_however_many_rows(tmp_path):
    path = tmp_path / "t.jsonl"
    rng = random.Random(3)
    with open(path, "w") as f:
        f.write("".join(f'{{"input_len": {rng.randint(1, 9000)}, "output_len": {rng.randint(1, 2500)}, '
                        f'"timestamp": {k * 0.01:.2f}}}\n' for k in range(50_000)))
    result, peak = read_trace_traced(path)
    assert result.rows == 50_000
    assert peak < 2 * 2**20  # keeping the rows would take tens of MB; counts take kilobytes


def test_merge_in_place_that_would_make_the_config_invalid_is_refused_with_exit_2(tmp_path, cli, example):
    target = tmp_path / "config.json"  # a 2x2 config without edges: the default 8x6 buckets would not fit its tputs
    target.write_text(json.dumps(example))
    run = cli("workload", str(_trace_for_2x2(tmp_path)), "--into", str(target))
    assert run.exit_code == 2
    assert run.stderr.startswith("Error: ") and run.stderr.count("\n") == 1
    assert "--input-buckets and --output-buckets with 3 and 3 edges" in run.stderr and "-o" in run.stderr
    assert json.loads(target.read_text()) == example  # untouched
    fixed = cli("workload", str(_trace_for_2x2(tmp_path)), "--into", str(target), "--input-buckets", "1,100,1000",
                "--output-buckets", "1,100,1000")
    assert fixed.exit_code == 0, fixed.stderr
    assert load_config(target).shape == (2, 2)


@pytest.mark.parametrize("scale, unit", [(1000, "milliseconds"), (1_000_000, "microseconds")])
def test_epoch_timestamps_in_milliseconds_or_microseconds_give_the_rate_in_req_per_s(tmp_path, scale, unit):
    path = tmp_path / "t.jsonl"
    # 101 requests over 50 s, the timestamps in ms (or µs), as integers
    rows = [{"timestamp": (1_700_000_000 + k // 2) * scale + (k % 2) * scale // 2, "input_len": 10,
             "output_len": 10} for k in range(101)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = read_trace(path)
    assert result.rate == pytest.approx(2.0)
    assert result.duration == pytest.approx(50.0) and result.first_timestamp == pytest.approx(1.7e9)
    assert any(unit in w for w in result.warnings)
    seconds = tmp_path / "s.csv"
    seconds.write_text("timestamp,input_len,output_len\n1700000000,1,1\n1700000004,1,1\n")
    assert read_trace(seconds).rate == pytest.approx(0.25) and not read_trace(seconds).warnings


def test_a_corrupt_gzip_trace_is_a_one_line_error_with_exit_2(tmp_path, cli):
    good = gzip.compress(b'{"input_len": 5, "output_len": 5}\n' * 2000)
    for name, data in (("crc.jsonl.gz", good[:-8] + b"\0" * 8), ("cut.jsonl.gz", good[: len(good) // 2]),
                       ("notgz.jsonl.gz", b"plain text, not gzip\n"),
                       ("flipped.jsonl.gz", good[:40] + bytes([good[40] ^ 0xFF]) + good[41:])):
        path = tmp_path / name
        path.write_bytes(data)
        run = cli("workload", str(path))
        assert run.exit_code == 2, (name, run.stderr)
        assert run.stderr.startswith(f"Error: {path}: ") and run.stderr.count("\n") == 1, run.stderr
        assert "internal error" not in run.stderr


def test_a_utf8_bom_does_not_break_the_csv_header_or_the_first_jsonl_row(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_bytes("\ufeffinput_len,output_len\n10,10\n300,30\n".encode())
    jsonl_path = tmp_path / "t.log"  # no telling extension: sniffed past the BOM
    jsonl_path.write_bytes("\ufeff".encode() + b'{"input_len": 10, "output_len": 10}\n{"input_len": 300, '
                                                b'"output_len": 30}\n')
    for path in (csv_path, jsonl_path):
        result = read_trace(path, rate=1)
        assert result.rows == 2 and result.counts[0][0] == 1 and result.counts[3][1] == 1


# ---- peak rates: per-minute percentiles --------------------------------------------------------------------------
def bursty_trace(path, minutes=20, low=5.0, high=50.0, seed=5, t0=1_700_000_000.0):
    """Poisson arrivals whose rate alternates low / high req/s minute by minute, starting with a request at t0.
    Returns the rows written."""
    rng = random.Random(seed)
    rows, t = [t0], t0
    for m in range(minutes):
        rate, end = (low if m % 2 == 0 else high), t0 + 60 * (m + 1)
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                t = end  # memoryless: restart the next minute's clock at its start
                break
            rows.append(t)
    with open(path, "w") as f:
        f.writelines(f'{{"timestamp": {ts:.4f}, "input_len": 100, "output_len": 50}}\n' for ts in rows)
    return rows


def test_a_bursty_trace_reports_the_mean_and_the_p95_of_its_generator(tmp_path):
    path = tmp_path / "bursty.jsonl"
    bursty_trace(path)  # 10 minutes at 5 req/s, 10 at 50: mean 27.5, p95 50
    result = read_trace(path)
    assert result.rate_source == "timestamps" and result.rate_percentile is None
    assert result.rate == pytest.approx(27.5, rel=0.03) and result.mean_rate == result.rate
    pct = result.rate_percentiles
    assert pct.minutes == 19  # the 20th minute ends after the last arrival: partial, left out
    assert pct.p95 == pytest.approx(50, rel=0.05)
    assert pct.max == pytest.approx(50, rel=0.08)
    assert pct.p50 == pytest.approx(5, rel=0.2)
    assert result.burst_ratio == pytest.approx(50 / 27.5, rel=0.06)
    peak = read_trace(path, rate_percentile=95)
    assert peak.rate == pct.p95 and peak.rate_percentile == 95 and peak.mean_rate == result.mean_rate
    assert peak.config_fragment()["total_request_rate"] == pytest.approx(pct.p95, rel=1e-5)


def test_rate_percentile_goes_into_the_config_keys_and_the_report_says_which_rate(tmp_path, cli):
    path = tmp_path / "bursty.jsonl"
    bursty_trace(path)
    out = tmp_path / "w.json"
    run = cli("workload", str(path), "--rate-percentile", "p95", "-o", str(out), "--json")
    assert run.exit_code == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["rate_percentile"] == 95
    assert record["total_request_rate"] == pytest.approx(50, rel=0.05)
    assert record["mean_request_rate"] == pytest.approx(27.5, rel=0.03)
    assert set(record["rate_percentiles"]) == {"p50", "p95", "p99", "max", "minutes"}
    assert record["rate_percentiles"]["p95"] == pytest.approx(record["total_request_rate"], rel=1e-5)
    assert json.loads(out.read_text())["total_request_rate"] == pytest.approx(record["total_request_rate"], rel=1e-5)
    text = cli("workload", str(path), "--rate-percentile", "95").stdout
    assert "(the p95 of the per-minute rate over 19 minutes; mean 27" in text
    mean = cli("workload", str(path)).stdout
    assert "mean over 1,200 s of timestamps" in mean or "mean over 1,199 s of timestamps" in mean
    assert "Per-minute rate over 19 complete minute(s): p50 " in mean
    assert "a fleet sized on the mean saturates in every such burst; plan for it with --rate-percentile 95" in mean


def test_per_minute_rates_count_idle_minutes_and_leave_out_the_partial_last_one(tmp_path):
    # minute 0: 120 arrivals, minute 1: none, minute 2: 6, minute 3: 60, then 30 s of minute 4 (partial) at 10 req/s
    stamps = ([k * 0.5 for k in range(120)] + [120 + k * 10 for k in range(6)] + [180 + k for k in range(60)]
              + [240 + k * 0.1 for k in range(300)])
    path = tmp_path / "t.csv"
    rows = list(enumerate(stamps))
    random.Random(2).shuffle(rows[1:])  # unsorted after the first row: the minutes start at the first row's time
    path.write_text("timestamp,input_len,output_len\n" + "".join(f"{t},5,5\n" for _, t in rows))
    pct = read_trace(path).rate_percentiles
    assert pct.minutes == 4
    assert (pct.p50, pct.max) == (pytest.approx(6 / 60), pytest.approx(2.0))  # sorted 0, 6, 60, 120 per minute
    assert read_trace(path, rate_percentile=25).rate == 0.0  # the idle minute
    assert read_trace(path, rate_percentile=75).rate == pytest.approx(1.0)


def test_rate_percentile_needs_a_complete_minute_and_a_valid_percentile(tmp_path, cli):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(f'{{"timestamp": {k}, "input_len": 5, "output_len": 5}}\n' for k in range(50)))
    result = read_trace(short)
    assert result.rate == pytest.approx(1.0) and result.rate_percentiles is None
    assert "Per-minute rate: unknown (the timestamps span less than one complete minute)" in \
        cli("workload", str(short)).stdout
    for args, message in ((("--rate-percentile", "95"), "needs at least one complete minute of timestamps"),
                          (("--rate-percentile", "0"), "--rate-percentile must be a percentile in (0, 100]"),
                          (("--rate-percentile", "p101"), "must be a percentile"),
                          (("--rate-percentile", "high"), "must be a percentile"),
                          (("--rate-percentile", "95", "--rate", "3"), "--rate or --rate-percentile, not both")):
        run = cli("workload", str(short), *args)
        assert run.exit_code == 2, (args, run.stderr)
        assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert read_trace(short, rate=2).rate == 2.0


# ---- public traces, unmodified -------------------------------------------------------------------------------------
TRACES = Path(__file__).parent / "data" / "traces"


def _csv_pairs(path, in_col, out_col, skip=lambda row: False):
    with open(path, newline="") as f:
        return [(int(r[in_col]), int(r[out_col])) for r in csv.DictReader(f) if not skip(r)]


def test_the_azure_llm_inference_trace_reads_as_it_comes(cli):
    path = TRACES / "azure_llm_inference_2023_conv.csv"  # TIMESTAMP like 2023-11-16 18:15:46.6805900
    result = read_trace(path)
    assert result.trace_format == "azure" and result.rows == 31 and not result.warnings
    assert [list(r) for r in result.counts] == expected_counts(_csv_pairs(path, "ContextTokens", "GeneratedTokens"))
    assert result.first_timestamp == pytest.approx(datetime(2023, 11, 16, 18, 15, 46, 680590, UTC).timestamp())
    assert result.duration == pytest.approx(120.0) and result.rate == pytest.approx(30 / 120)
    pct = result.rate_percentiles  # 20 arrivals in the first minute, 10 in the second
    assert pct.minutes == 2 and (pct.p50, pct.max) == (pytest.approx(10 / 60), pytest.approx(20 / 60))
    run = cli("workload", str(path))
    assert run.exit_code == 0, run.stderr
    assert run.stdout.startswith(f"31 requests from {path} (csv, Azure LLM inference trace columns)")


def test_burstgpt_reads_as_it_comes_and_its_failed_requests_are_skipped_and_counted(cli):
    path = TRACES / "burstgpt_sample.csv"  # Timestamp in s from the start; 3 rows with 0 response tokens
    result = read_trace(path)
    answered = _csv_pairs(path, "Request tokens", "Response tokens", lambda r: r["Response tokens"] == "0")
    assert result.trace_format == "burstgpt" and result.failed == 3 and result.rows == len(answered) == 37
    assert [list(r) for r in result.counts] == expected_counts(answered)
    with open(path, newline="") as f:
        times = [float(r["Timestamp"]) for r in csv.DictReader(f) if r["Response tokens"] != "0"]
    assert result.rate == pytest.approx((len(times) - 1) / (max(times) - min(times)))
    assert ("skipped 3 failed request(s) (BurstGPT logs a failure as 0 response tokens), of 40: the histogram and "
            "the rate count the 37 answered") in result.warnings
    run = cli("workload", str(path), "--json")
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["failed"] == 3 and json.loads(run.stdout)["trace_format"] == "burstgpt"
    assert "Warning: skipped 3 failed request(s)" in run.stderr
    assert "37 requests from" in cli("workload", str(path)).stdout


def test_a_mooncake_trace_reads_as_it_comes_with_times_in_milliseconds():
    path = TRACES / "mooncake_sample.jsonl"  # timestamp: ms from the trace's start
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    result = read_trace(path)
    assert result.trace_format == "mooncake" and result.rows == 30
    assert [list(r) for r in result.counts] == expected_counts(
        [(min(r["input_length"], IN_EDGES[-1]), r["output_length"]) for r in rows])
    assert result.duration == pytest.approx(rows[-1]["timestamp"] / 1000)
    assert result.rate == pytest.approx(29 / (rows[-1]["timestamp"] / 1000))
    assert result.rate_percentiles is not None and result.rate_percentiles.minutes == 2
    assert not any("milliseconds" in w for w in result.warnings)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_columns_named_on_the_command_line(tmp_path, cli, fmt):
    pairs = random_pairs(200)
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        path.write_text("Arrival,Prompt Len,gen\n" + "".join(f"{k * 500},{i},{o}\n" for k, (i, o) in enumerate(pairs)))
    else:
        path.write_text("".join(json.dumps({"Arrival": k * 500, "req": {"Prompt Len": i}, "gen": o}) + "\n"
                                for k, (i, o) in enumerate(pairs)))
    in_col = "Prompt Len" if fmt == "csv" else "req.Prompt Len"
    run = cli("workload", str(path), "--input-column", in_col, "--output-column", "gen", "--time-column", "Arrival",
              "--time-unit", "ms", "--json")
    assert run.exit_code == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["counts"] == expected_counts(pairs)
    assert record["total_request_rate"] == pytest.approx(2.0) and record["duration_s"] == pytest.approx(99.5)
    missing = cli("workload", str(path), "--input-column", "nope", "--output-column", "gen")
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "--input-column 'nope' is not a column of the trace" in missing.stderr


def test_an_unknown_header_names_the_recognised_formats_and_the_column_options(tmp_path, cli):
    path = tmp_path / "t.csv"
    path.write_text("when,in,out\n1,2,3\n")
    run = cli("workload", str(path))
    assert run.exit_code == 2 and len(run.stderr.strip().splitlines()) == 1
    for part in ("the CSV header has no token columns (found when, in, out)", "Azure LLM inference trace",
                 "BurstGPT", "Mooncake", "--input-column"):
        assert part in run.stderr
    assert cli("workload", str(path), "--input-column", "in", "--output-column", "out", "--time-column",
               "when").exit_code == 0


def test_a_column_option_overrides_one_side_of_a_recognised_format(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens,Cached\n2024-05-10 00:00:00.0023000,900,0,30\n"
                    "2024-05-10 00:00:02.0023000,10,5,8\n")
    result = read_trace(path, columns=ColumnChoice(input="cached"))
    assert result.trace_format is None and result.failed == 0  # the user's own reading: 0 output tokens is kept
    assert result.counts[1][0] == 1 and result.counts[0][0] == 1 and result.rate == pytest.approx(0.5)


def test_memory_stays_flat_over_a_long_span_of_minutes(tmp_path):
    path = tmp_path / "t.csv"
    with open(path, "w") as f:  # 30,000 rows over about a month: a counter per busy minute, not per row
        f.write("timestamp,input_len,output_len\n")
        f.writelines(f"{1_700_000_000 + k * 86.4},{k % 900},{k % 300}\n" for k in range(30_000))
    result, peak = read_trace_traced(path)
    assert result.rate_percentiles.minutes == 43_198
    assert peak < 6 * 2**20


def test_iso_times_in_every_spelling_read_the_same_instant_across_minute_and_day_boundaries(tmp_path):
    base = datetime(2023, 12, 31, 23, 58, 1, 250000, UTC)
    instants = [base + timedelta(seconds=37.125 * k) for k in range(12)]  # crosses minutes, the day and the year
    spellings = [
        lambda t: t.replace(tzinfo=None).isoformat(" ") + "0",  # Azure: 7 fractional digits, naive (UTC)
        lambda t: t.isoformat().replace("+00:00", "Z"),
        lambda t: t.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat(),
        lambda t: t.replace(tzinfo=None).isoformat("T", "milliseconds"),
    ]
    rows = [(spellings[k % 4](t), t) for k, t in enumerate(instants)]
    random.Random(4).shuffle(rows)
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{s},10,10\n" for s, _ in rows))
    result = read_trace(path)
    assert result.first_timestamp == pytest.approx(instants[0].timestamp(), abs=1e-6)
    assert result.last_timestamp == pytest.approx(instants[-1].timestamp(), abs=1e-6)
    assert result.rate == pytest.approx(11 / (37.125 * 11))


# ---- a router's rate (workload --from): over the time it has seen traffic, not its whole life ----------------------
def _router_up_7_s_then_8_s_of_traffic():
    """A router's GET /workload after 7 idle seconds and then 37 requests in 8 s (4.625 req/s)."""
    from melange_sky.serve.observed import ObservedWorkload

    now = [0.0]
    observed = ObservedWorkload((1, 100, 1000), (1, 100, 1000), window_s=3600, clock=lambda: now[0])
    for k in range(37):
        now[0] = 7.0 + 8.0 * k / 37
        observed.arrival()
        observed.record(50, 50, reported=True)
    now[0] = 15.0
    return observed.to_dict()


def test_a_routers_rate_is_its_requests_over_the_time_since_its_first_not_since_it_started():
    doc = _router_up_7_s_then_8_s_of_traffic()
    assert doc["total_request_rate"] == pytest.approx(37 / 8)  # not 37 / 15: the idle start is no load
    assert (doc["span_s"], doc["up_s"], doc["arrivals"]) == (pytest.approx(8.0), pytest.approx(15.0), 37)


def test_a_short_router_sample_written_into_a_config_is_warned_about_loudly(tmp_path, cli, example, monkeypatch):
    doc = _router_up_7_s_then_8_s_of_traffic()
    monkeypatch.setattr("melange_sky.cli.workload.fetch_observed", lambda url, *a, **k: (url + "/workload", doc))
    target = tmp_path / "config.json"
    target.write_text(json.dumps(dict(example, input_buckets=[1, 100, 1000], output_buckets=[1, 100, 1000])))
    run = cli("workload", "--from", "http://127.0.0.1:9", "--into", str(target))
    assert run.exit_code == 0, run.stderr
    assert "Rate: 4.625 req/s (arrivals the router counted over the 8.0 s since its first request)" in run.stdout
    assert json.loads(target.read_text())["total_request_rate"] == pytest.approx(4.625)
    assert run.stderr.splitlines()[-1] == (
        f"Warning: {target} now has total_request_rate 4.625 req/s: the router's 37 requests in only 8.0 s of "
        f"traffic (3600 s window); check it before planning on it, or write your own with --rate")
