"""`melange-sky sweep`: every rate's row is what a direct solve at that rate gives; table, JSON, file and figure."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from melange_sky.core.config import with_overrides
from melange_sky.core.config import load_config
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.solver.model import SharedCap
from melange_sky.solver.result import solve
from melange_sky.solver.sweep import default_range, rate_range, sweep

EXAMPLE_PATH = str(REPO / "examples" / "example.json")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _json(cli, *args: str) -> dict:
    result = cli("sweep", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _row(stdout: str, rate: str) -> list[str]:
    """The table row of one rate, as cells split on runs of two or more spaces."""
    for line in stdout.splitlines():
        cells = [c for c in line.strip().split("  ") if c]
        if cells and cells[0] == rate:
            return [c.strip() for c in cells]
    raise AssertionError(f"no row for {rate} in:\n{stdout}")


def test_each_rate_matches_a_direct_solve_of_the_mix_split_and_single_types(cli):
    record = _json(cli, EXAMPLE_PATH, "--rates", "3,30,45,60")
    config = load_config(EXAMPLE_PATH, price=catalog_pricer())
    assert [p["rate"] for p in record["points"]] == [3, 30, 45, 60]
    for point in record["points"]:
        at_rate = with_overrides(config, rate=point["rate"])
        mix, split = solve(at_rate, "slices", compare=False), solve(at_rate, "split", compare=False)
        assert point["mix"]["cost"] == pytest.approx(mix.cost)
        assert point["mix"]["counts"] == {g: n for g, n in mix.counts.items() if n}
        assert point["split"]["cost"] == pytest.approx(split.cost)
        assert point["split"]["counts"] == {g: n for g, n in split.counts.items() if n}
        assert {b["gpu"]: (b["count"], b["cost"]) for b in point["baselines"]} == {
            b.gpu: (b.count, pytest.approx(b.cost)) for b in mix.baselines}
        assert point["saving"] == pytest.approx(mix.saving)


def test_table_row_at_the_examples_rate_shows_the_known_costs(cli):
    result = cli("sweep", EXAMPLE_PATH, "--rates", "3,30")
    assert result.exit_code == 0, result.stderr
    header = _row(result.stdout, "req/s")
    assert header == ["req/s", "slices $/h", "split $/h", "A10G $/h", "A100-80GB $/h", "saving", "fleet (slices)"]
    assert _row(result.stdout, "30") == ["30", "6.70", "4.68", "12.12", "7.34", "0.64 (8.7%)", "3 A10G + 1 A100-80GB"]
    assert _row(result.stdout, "3") == ["3", "2.02", "2.02", "2.02", "3.67", "0.00 (0.0%)", "2 A10G"]


def test_table_columns_stay_aligned_for_short_and_long_numbers(cli):
    lines = cli("sweep", EXAMPLE_PATH, "--rates", "1,30,2000").stdout.splitlines()
    table = [line for line in lines if line.startswith("  ")]
    assert len(table) == 4  # header + 3 rates
    # cells are separated by 2+ spaces; number columns (all but the fleet) are right-aligned: one end on every line
    ends = [[m.end() for m in re.finditer(r"\S+(?: \S+)*", line)][:6] for line in table]
    assert all(e == ends[0] for e in ends), "\n".join(table)
    assert _row("\n".join(table), "2,000")[1] == "275.25"  # 75 x A100-80GB


def test_infeasible_rates_are_rows_with_their_reason_not_errors(cli, example, write_config):
    example["gpu_info"]["A100-80GB"]["max_count"] = 2
    example["gpu_info"]["A10G"]["max_count"] = 10
    path = write_config(example)
    result = cli("sweep", path, "--rates", "30,100")
    assert result.exit_code == 0, result.stderr
    assert _row(result.stdout, "30")[3] == "infeasible"  # A10G alone needs 12 > 10
    assert _row(result.stdout, "100")[:5] == ["100", "infeasible", "infeasible", "infeasible", "infeasible"]
    assert "A10G alone: infeasible at 2 of 2 rate(s), first at 30 req/s: needs 12, above its max_count 10" \
        in result.stdout
    point = _json(cli, path, "--rates", "100")["points"][0]
    assert point["mix"]["cost"] is None and point["mix"]["status"] == "infeasible"
    assert "max_count" in point["mix"]["reason"] and point["saving"] is None


def test_split_formulation_is_solved_once_per_rate(cli):
    record = _json(cli, EXAMPLE_PATH, "--rates", "30", "--formulation", "split")
    point = record["points"][0]
    assert point["mix"] == point["split"] and point["mix"]["cost"] == pytest.approx(4.68)
    header = _row(cli("sweep", EXAMPLE_PATH, "--rates", "30", "--formulation", "split").stdout, "req/s")
    assert header[:3] == ["req/s", "split $/h", "A10G $/h"]


def test_solve_options_are_honoured(cli):
    config = with_overrides(load_config(EXAMPLE_PATH, price=catalog_pricer()), rate=30, headroom=0.5)
    point = _json(cli, EXAMPLE_PATH, "--rates", "30", "--headroom", "0.5", "--solver", "cbc")["points"][0]
    assert point["mix"]["cost"] == pytest.approx(solve(config, compare=False).cost)
    assert point["mix"]["cost"] > 6.7


def test_output_file_holds_the_json_whatever_stdout_shows(cli, tmp_path):
    out = tmp_path / "sweep.json"
    result = cli("sweep", EXAMPLE_PATH, "--rates", "10,20", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert "req/s" in result.stdout and f"Wrote {out}" in result.stderr
    written = json.loads(out.read_text())
    assert [p["rate"] for p in written["points"]] == [10, 20]
    assert written["formulation"] == "slices" and written["gpus"] == ["A10G", "A100-80GB"]


def test_json_alone_writes_no_file(cli, tmp_path):
    _json(cli, EXAMPLE_PATH, "--rates", "10")
    assert list(tmp_path.iterdir()) == []


def test_default_range_runs_up_to_twice_the_configs_rate(cli):
    assert [p["rate"] for p in _json(cli, EXAMPLE_PATH)["points"]] == [3 * k for k in range(1, 21)]
    assert [p["rate"] for p in _json(cli, EXAMPLE_PATH, "--rate", "5", "--steps", "5")["points"]] == [2, 4, 6, 8, 10]


def test_from_to_steps_spaces_rates_evenly_or_geometrically(cli):
    assert [p["rate"] for p in _json(cli, EXAMPLE_PATH, "--from", "1", "--to", "2", "--steps", "5")["points"]] \
        == [1, 1.25, 1.5, 1.75, 2]
    assert [p["rate"] for p in _json(cli, EXAMPLE_PATH, "--from", "1", "--to", "100", "--steps", "3",
                                     "--log")["points"]] == [1, 10, 100]
    assert rate_range(2, 60, 50)[-1] == 60 and len(rate_range(2, 60, 50)) == 50
    config = load_config(EXAMPLE_PATH, price=catalog_pricer())
    assert default_range(config, stop=50, steps=5) == [10, 20, 30, 40, 50]
    assert default_range(config, start=100, steps=2) == [100, 200]


def test_rates_are_sorted_and_deduplicated(cli):
    assert [p["rate"] for p in _json(cli, EXAMPLE_PATH, "--rates", "20, 5,20,1")["points"]] == [1, 5, 20]


@pytest.mark.parametrize("args, message", [
    (["--from", "10", "--to", "5"], "--to: must be above --from (10 req/s), got 5"),
    (["--from", "0", "--to", "5"], "--from: must be a positive number of req/s, got 0"),
    (["--steps", "1"], "--steps: must be at least 2"),
    (["--steps", "5000"], "--steps: at most 1000 rates"),
    (["--rates", "1,x,3"], "--rates: 'x' is not a number"),
    (["--rates", "1,-2"], "--rates: rates must be positive req/s, got -2"),
    (["--rates", "1,nan"], "--rates: rates must be positive req/s, got nan"),
    (["--rates", ","], "--rates: no rates given"),
    (["--rates", "1,2", "--steps", "4"], "--rates: give either --rates or --steps, not both"),
    (["--steps", "many"], "Invalid value for '--steps'"),
])
def test_bad_ranges_are_one_line_errors(cli, tmp_path, args, message):
    result = cli("sweep", EXAMPLE_PATH, *args, "--plot", str(tmp_path / "s.png"))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s.png").exists()


def test_plot_writes_a_png_figure(cli, tmp_path):
    png = tmp_path / "sweep.png"
    result = cli("sweep", EXAMPLE_PATH, "--from", "2", "--to", "100", "--steps", "12", "--plot", str(png))
    assert result.exit_code == 0, result.stderr
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 30_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 900)
    assert f"Wrote {png}" in result.stderr


def test_plot_draws_infeasible_rates_and_a_log_axis(cli, example, write_config, tmp_path):
    example["gpu_info"]["A100-80GB"]["max_count"] = 2
    png = tmp_path / "capped.png"
    result = cli("sweep", write_config(example), "--rates", "1,2,5,10,20,50,100,200", "--plot", str(png))
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_without_matplotlib_says_which_extra_to_install(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = cli("sweep", EXAMPLE_PATH, "--plot", str(tmp_path / "s.png"))
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: --plot needs matplotlib, which is not installed: "
                                     "pip install 'melange-sky[plot]'")
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_library_sweep_returns_records_in_rate_order():
    result = sweep(load_config(EXAMPLE_PATH, price=catalog_pricer()), [30, 3])
    assert result.rates == [3, 30]
    assert result.points[1].mix.cost == pytest.approx(6.7) and result.points[1].split.cost == pytest.approx(4.68)
    assert result.points[1].best_baseline is not None and result.points[1].best_baseline.gpu == "A100-80GB"
    assert result.baseline_names == ["A10G", "A100-80GB"]


def test_sweep_help_imports_neither_the_solver_nor_matplotlib():
    code = ("import sys; from melange_sky.cli import main\n"
            "try:\n    main(['sweep', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('pulp', 'highspy', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--plot FILE.png" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_library_sweep_applies_shared_caps_as_solve_does():
    config = load_config(EXAMPLE_PATH, price=catalog_pricer())
    caps = [SharedCap("quota", (("A100-80GB", 1),), 1)]  # at most one A100-80GB GPU
    result = sweep(config, [30, 60], caps=caps)
    for point in result.points:
        direct = solve(with_overrides(config, rate=point.rate), compare=False, caps=caps)
        assert point.mix.cost == pytest.approx(direct.cost) and point.mix.counts["A100-80GB"] <= 1
        assert [(b.gpu, b.cost) for b in point.baselines] == [(b.gpu, b.cost) for b in direct.baselines]
    assert result.points[1].mix.cost > sweep(config, [60]).points[0].mix.cost  # the cap binds at 60 req/s


def test_a_rate_above_max_replicas_is_an_infeasible_row_not_a_crash(cli):
    result = cli("sweep", EXAMPLE_PATH, "--rates", "30,1e6")
    assert result.exit_code == 0, result.stderr
    assert _row(result.stdout, "1,000,000")[1:3] == ["infeasible", "infeasible"]
    assert "37,500 replicas" in result.stdout and "--max-replicas 500" in result.stdout
    point = _json(cli, EXAMPLE_PATH, "--rates", "1e6", "--max-replicas", "40000")["points"][0]
    assert point["mix"]["counts"] == {"A100-80GB": 37500}


def test_single_gpu_fleets_above_max_replicas_are_infeasible_too(cli):
    result = cli("sweep", EXAMPLE_PATH, "--rates", "30,1e6")  # QA 21: 404,000,000 $/h was printed at 1e9
    assert result.exit_code == 0, result.stderr
    assert _row(result.stdout, "1,000,000")[3:5] == ["infeasible", "infeasible"]
    assert "A10G alone: infeasible at 1 of 2 rate(s), first at 1,000,000 req/s: needs 400,000 replicas, above " \
           "--max-replicas 500" in result.stdout
    assert _row(result.stdout, "30")[3:5] == ["12.12", "7.34"]  # below the cap: as before
    point = _json(cli, EXAMPLE_PATH, "--rates", "1e6", "--max-replicas", "40000")["points"][0]
    costs = {b["gpu"]: b["cost"] for b in point["baselines"]}
    assert costs["A10G"] is None and costs["A100-80GB"] == pytest.approx(37500 * 3.67)


def test_per_offer_sweep_gives_what_solve_per_offer_gives(cli):
    multicloud = str(REPO / "examples" / "multicloud.json")
    point = _json(cli, multicloud, "--per-offer", "--rates", "50")["points"][0]
    solved = cli("solve", multicloud, "--per-offer", "--rate", "50", "--json")
    assert solved.exit_code == 0, solved.stderr
    record = json.loads(solved.stdout)
    assert point["mix"]["cost"] == pytest.approx(record["cost"])
    assert point["mix"]["counts"] == {g: n for g, n in record["counts"].items() if n}
    assert [(b["gpu"], b["cost"]) for b in point["baselines"]] == [(b["gpu"], b["cost"]) for b in record["baselines"]]


def test_counts_of_multi_gpu_instances_say_so(cli, example, write_config):
    example["gpu_info"]["A100-80GB"] = {"tputs": example["gpu_info"]["A100-80GB"]["tputs"], "cloud": "aws",
                                        "instance_type": "p4de.24xlarge"}
    result = cli("sweep", write_config(example), "--rates", "300")
    assert result.exit_code == 0, result.stderr
    assert _row(result.stdout, "300")[-1] == "2 A100-80GB (8-GPU instances)"
