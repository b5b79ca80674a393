"""How close the engine model's point mode lands to published measurements of vLLM.

    python bench/estimate_accuracy.py [--json] [--markdown FILE ...] [--check] [--data FILE] [--only ID ...]

Each point of bench/data/published_vllm.json is a benchmark someone ran on a real GPU and published (source, vLLM
version and setup in the file). The bench builds the same engine (`melange_sky.engine.Engine`: model, GPU, TP, weight
dtype, the vLLM flags the run set, the API server's costs for the endpoint its client used, none for vLLM's offline
`LLM` class; a model the engine does not bundle is a config.json under bench/data/models) and runs
`estimate.run_point` with the run's lengths and concurrency, then prints
measured against predicted output tokens/s, TPOT and TTFT (mean), the error of each, and the medians and worst. It
is a comparison, not a fitter: it never changes a coefficient, and the points are not the model's training data.

Issue 17's target: median absolute error <= 20% on output tokens/s and on TPOT, no point off by more than 2x
(`--check` exits 1 when it is missed). A variable-length dataset's point ("distribution" in the file) runs on
per-request lengths of that dataset's shape, from a published table (the file's `workloads`), drawn with a fixed seed
and scaled to the run's published means (`melange_sky.engine.workload_run`); one with no such table ("mean") runs at
its mean lengths. All are shown and counted, and the medians over fixed-length points alone are printed beside them.

The engine runs with its own coefficients: a calibration fit saved under $MELANGE_SKY_HOME (`estimate
--calibrate`) is hidden from it, so the table is the datasheet model's accuracy, whoever runs the bench.

`--markdown FILE` writes the table into FILE between the markers below, keeping the rest of the file (the analysis
in bench/results/estimate_accuracy.md, the prose of docs/estimate-accuracy.md); a file without the markers gets the
table appended. Run it after every change to the engine's step time so the committed table matches the model.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from melange_sky.engine import Coefficients, Engine, EngineSettings, load_model  # noqa: E402
from melange_sky.engine.estimate import run_point  # noqa: E402
from melange_sky.engine.workload_run import Request, run_requests, sample_requests  # noqa: E402

DATA = ROOT / "bench" / "data" / "published_vllm.json"
START = "<!-- estimate-accuracy:table:start (bench/estimate_accuracy.py writes between these markers) -->"
END = "<!-- estimate-accuracy:table:end -->"
TARGET_MEDIAN = 0.20  # issue 17: median absolute error on output tokens/s and on TPOT
MAX_RATIO = 2.0  # issue 17: no point off by more than 2x
METRICS = (("output_tokens_per_s", "output tok/s"), ("tpot_ms_mean", "TPOT"))


@dataclass(frozen=True)
class Point:
    """One published measurement and the setup it was taken with (a row of the data file)."""

    id: str
    source: str
    client: str  # "api-server" (OpenAI server, streamed) or "offline" (vLLM's LLM class in-process)
    endpoint: str | None  # the API server's endpoint the client used: "chat" or "completions" (None offline)
    gpu: str
    tp: int
    model: str
    dtype: str
    input_tokens: int
    output_tokens: int
    lengths: str
    concurrency: int | None
    rate: float | None
    requests: int
    deployment: dict[str, Any]
    measured: dict[str, float]
    derivation: str = ""
    workload: str | None = None  # lengths == "distribution": the per-request length table (data file's workloads)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Point:
        return cls(id=row["id"], source=row["source"], client=row["client"], endpoint=row.get("endpoint"),
                   gpu=row["gpu"], tp=row["tp"],
                   model=row["model"], dtype=row["dtype"], input_tokens=row["input_tokens"],
                   output_tokens=row["output_tokens"], lengths=row["lengths"], concurrency=row.get("concurrency"),
                   rate=row.get("rate"), requests=row["requests"], deployment=row.get("deployment") or {},
                   measured=row["measured"], derivation=row.get("derivation", ""), workload=row.get("workload"))

    @property
    def load(self) -> str:
        """The client's load as the setup column prints it."""
        if self.rate is not None:
            return f"Poisson {self.rate:g} req/s x {self.requests}"
        if self.concurrency == self.requests:
            return f"{'offline ' if self.client == 'offline' else ''}batch {self.requests}"
        return f"C={self.concurrency} x {self.requests}"

    @property
    def regime(self) -> str:
        """Which part of the step-time model the point mostly exercises (for the per-regime medians)."""
        tp = f"TP{self.tp} " if self.tp > 1 else ""
        in_flight = self.concurrency if self.concurrency is not None else 0
        if in_flight >= 100 and self.input_tokens >= 8 * self.output_tokens:
            kind = "prefill-bound burst"
        elif self.rate is None and in_flight <= 8:
            kind = "small-batch decode"
        else:
            kind = "large-batch decode"
        return tp + kind


@dataclass(frozen=True)
class Comparison:
    """What the engine model predicts for one point, next to what was measured."""

    point: Point
    predicted: dict[str, float] = field(default_factory=dict)
    kv_cache_use: float | None = None
    preempted: int | None = None
    error: str | None = None  # the engine refused the setup (a DoesNotFit, a bad setting): a miss of every metric
    seconds: float = 0.0

    def relative_error(self, metric: str) -> float | None:
        """(predicted - measured) / measured, None when the source did not measure it."""
        measured = self.point.measured.get(metric)
        if measured is None:
            return None
        if self.error is not None or metric not in self.predicted:
            return math.inf
        return (self.predicted[metric] - measured) / measured

    def ratio(self, metric: str) -> float | None:
        """How many times off the prediction is (>= 1, either way)."""
        measured = self.point.measured.get(metric)
        if measured is None:
            return None
        predicted = self.predicted.get(metric)
        if self.error is not None or predicted is None or predicted <= 0:
            return math.inf
        return max(predicted / measured, measured / predicted)


def load_data(path: Path = DATA) -> tuple[dict[str, dict[str, str]], list[Point]]:
    """The data file's sources (by key) and points."""
    data = json.loads(path.read_text())
    return data["sources"], [Point.from_json(row) for row in data["points"]]


def load_workloads(path: Path = DATA) -> dict[str, dict[str, Any]]:
    """The data file's per-request length tables of variable-length datasets (by name)."""
    return json.loads(path.read_text()).get("workloads", {})


def point_requests(point: Point, workloads: dict[str, dict[str, Any]]) -> list[Request]:
    """A distribution point's requests: its dataset's published per-request lengths (shape), drawn with a fixed
    seed and scaled to the run's published means, within the benchmark's length filter."""
    table = workloads[point.workload or ""]
    limits = table.get("filter", {})
    return sample_requests([tuple(pair) for pair in table["pairs"]], point.requests,
                           prompt_mean=point.input_tokens, output_mean=point.output_tokens,
                           max_prompt=limits.get("max_prompt"), max_total=limits.get("max_total"),
                           min_tokens=min(limits.get("min_prompt", 1), limits.get("min_output", 1)), seed=0)


def model_path(model: str) -> str:
    """A bundled model's name, or a config.json folder under bench/data/models (models only the bench needs)."""
    local = ROOT / model
    return str(local) if "/" in model and local.exists() else model


def compare(point: Point, workloads: dict[str, dict[str, Any]] | None = None) -> Comparison:
    """Run the engine model's point mode on one published setup (a 'distribution' point: on its dataset's
    per-request lengths, `workload_run.run_requests`)."""
    started = time.perf_counter()
    try:
        settings = EngineSettings.from_deployment(point.deployment, source=point.id)
        # the engine's own coefficients; each request charged the API server's cost (and passed through it as
        # requests to) the endpoint the client used
        engine = Engine(load_model(model_path(point.model)), point.gpu, tp=point.tp, dtype=point.dtype,
                        settings=settings, coefficients=Coefficients())
        if point.client == "offline":  # vLLM's LLM class in-process: no API server in front of the engine
            engine = engine.without_frontend()
        if point.lengths == "distribution":
            result = run_requests(engine, point_requests(point, workloads if workloads is not None else
                                                         load_workloads()),
                                  concurrency=point.concurrency, rate=point.rate, seed=0, endpoint=point.endpoint)
        else:
            result = run_point(engine, input_tokens=point.input_tokens, output_tokens=point.output_tokens,
                               concurrency=point.concurrency, rate=point.rate, requests=point.requests, seed=0,
                               endpoint=point.endpoint)
    except Exception as exc:  # a refused setup is a result of the bench, shown in the table
        return Comparison(point, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - started)
    predicted = {"output_tokens_per_s": result.output_tokens_per_s, "tpot_ms_mean": result.tpot_ms.mean,
                 "ttft_ms_mean": result.ttft_ms.mean}
    return Comparison(point, predicted, result.kv_cache_use, result.preempted, seconds=time.perf_counter() - started)


def _median_abs(values: list[float]) -> float | None:
    return statistics.median(abs(v) for v in values) if values else None


def summarise(comparisons: list[Comparison]) -> dict[str, Any]:
    """Medians of the absolute errors (all points, fixed-length points, per regime, per GPU), the worst point and
    whether issue 17's target holds."""
    def medians(rows: list[Comparison]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for metric, _ in METRICS:
            errors = [e for c in rows if (e := c.relative_error(metric)) is not None]
            out[metric] = _median_abs(errors)
            out[f"{metric}_points"] = len(errors)
        return out

    worst_ratio, worst = 1.0, None
    for c in comparisons:
        for metric, _ in METRICS:
            r = c.ratio(metric)
            if r is not None and r > worst_ratio:
                worst_ratio, worst = r, (c.point.id, metric)
    overall = medians(comparisons)
    met = all(overall[m] is not None and overall[m] <= TARGET_MEDIAN for m, _ in METRICS) and worst_ratio <= MAX_RATIO
    groups: dict[str, dict[str, list[Comparison]]] = {"regime": {}, "gpu": {}}
    for c in comparisons:
        groups["regime"].setdefault(c.point.regime, []).append(c)
        groups["gpu"].setdefault(c.point.gpu, []).append(c)
    return {
        "points": len(comparisons),
        "gpus": sorted({c.point.gpu for c in comparisons}),
        "median_abs_error": overall,
        "median_abs_error_fixed_lengths": medians([c for c in comparisons if c.point.lengths == "fixed"]),
        "by_regime": {k: medians(v) for k, v in sorted(groups["regime"].items())},
        "by_gpu": {k: medians(v) for k, v in sorted(groups["gpu"].items())},
        "worst_ratio": worst_ratio,
        "worst": {"point": worst[0], "metric": worst[1]} if worst else None,
        "within_20pct": {m: sum(1 for c in comparisons if (e := c.relative_error(m)) is not None and abs(e) <= 0.2)
                         for m, _ in METRICS},
        "target_met": met,
    }


def engine_revision() -> str:
    """The commit of melange_sky/engine the table was computed with (and whether the tree had changes to it)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    rev = git("log", "-1", "--format=%h", "--", "melange_sky/engine") or "unknown"
    dirty = git("status", "--porcelain", "--", "melange_sky/engine")
    return f"{rev} + uncommitted changes" if dirty else rev


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "**fail**"
    flag = " **!**" if abs(value) > 1.0 or value < -0.5 else ""  # off by more than 2x either way
    return f"{value * 100:+.0f}%{flag}"


def _median_text(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def markdown(comparisons: list[Comparison], summary: dict[str, Any], sources: dict[str, dict[str, str]],
             revision: str) -> str:
    """The table, the medians and worst, and the points' sources, as markdown."""
    lines = [
        f"Engine model at commit `{revision}`; {summary['points']} points over {len(summary['gpus'])} GPU types "
        f"({', '.join(summary['gpus'])}). Errors are (predicted - measured) / measured; **!** marks a point off by "
        "more than 2x. TTFT is shown, not judged. `distribution` lengths: a variable-length dataset, its published "
        "means shown, run on per-request lengths of the dataset's shape (the data file's workloads); `mean`: run at "
        "its mean lengths.",
        "",
        "| point | GPU | model | setup | tok/s measured | tok/s predicted | error | TPOT ms measured | TPOT predicted "
        "| error | TTFT ms measured / predicted | engine notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        p = c.point
        notes = c.error or (f"KV {c.kv_cache_use:.0%}" + (f", {c.preempted} preempted" if c.preempted else ""))
        setup = f"{p.input_tokens}/{p.output_tokens} ({p.lengths}), {p.load}"
        setup += f", {p.endpoint}" if p.endpoint else ""
        ttft = p.measured.get("ttft_ms_mean")
        ttft_text = "-" if ttft is None else f"{_num(ttft, 0)} / {_num(c.predicted.get('ttft_ms_mean'), 0)}"
        lines.append(
            f"| {p.id} | {p.gpu} | {Path(p.model).name} ({p.dtype}{f', TP{p.tp}' if p.tp > 1 else ''}) | {setup} "
            f"| {_num(p.measured.get('output_tokens_per_s'))} "
            f"| {_num(c.predicted.get('output_tokens_per_s')) if 'output_tokens_per_s' in p.measured else '-'} "
            f"| {_pct(c.relative_error('output_tokens_per_s'))} "
            f"| {_num(p.measured.get('tpot_ms_mean'), 2)} "
            f"| {_num(c.predicted.get('tpot_ms_mean'), 2) if 'tpot_ms_mean' in p.measured else '-'} "
            f"| {_pct(c.relative_error('tpot_ms_mean'))} | {ttft_text} | {notes} |")
    overall, fixed = summary["median_abs_error"], summary["median_abs_error_fixed_lengths"]
    worst = summary["worst"]
    lines += [
        "",
        f"- **Median absolute error**: output tokens/s {_median_text(overall['output_tokens_per_s'])} "
        f"({overall['output_tokens_per_s_points']} points), TPOT {_median_text(overall['tpot_ms_mean'])} "
        f"({overall['tpot_ms_mean_points']} points); fixed-length points only: "
        f"{_median_text(fixed['output_tokens_per_s'])} and {_median_text(fixed['tpot_ms_mean'])}.",
        f"- **Worst**: {_num(summary['worst_ratio'], 2)}x off"
        + (f" ({worst['point']}, {dict(METRICS)[worst['metric']]})" if worst else "") + "; within 20%: "
        f"{summary['within_20pct']['output_tokens_per_s']} tok/s and {summary['within_20pct']['tpot_ms_mean']} TPOT "
        "figures.",
        f"- **Issue 17's target** (median <= {TARGET_MEDIAN:.0%} on both, none off by more than {MAX_RATIO:g}x): "
        + ("met." if summary["target_met"] else "**not met**."),
        "",
        "| regime | median abs error, tok/s (points) | median abs error, TPOT (points) |",
        "|---|---|---|",
    ]
    for name, row in summary["by_regime"].items():
        lines.append(f"| {name} | {_median_text(row['output_tokens_per_s'])} ({row['output_tokens_per_s_points']}) "
                     f"| {_median_text(row['tpot_ms_mean'])} ({row['tpot_ms_mean_points']}) |")
    lines += ["", "| GPU | median abs error, tok/s (points) | median abs error, TPOT (points) |", "|---|---|---|"]
    for name, row in summary["by_gpu"].items():
        lines.append(f"| {name} | {_median_text(row['output_tokens_per_s'])} ({row['output_tokens_per_s_points']}) "
                     f"| {_median_text(row['tpot_ms_mean'])} ({row['tpot_ms_mean_points']}) |")
    used = sorted({c.point.source for c in comparisons})
    lines += ["", "Sources (vLLM version; setup as the source states it):", ""]
    for key in used:
        s = sources[key]
        lines.append(f"- `{key}`: [{s['title']}]({s['url']}), {s['date']}; vLLM {s['vllm_version']}. {s['setup']}")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, table: str) -> None:
    """Put the table between the markers in `path`, keeping the text around them (create the file if needed)."""
    block = f"{START}\n\n{table}\n{END}\n"  # blank lines: Markdown would read a comment's paragraph as raw HTML
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block)
        return
    text = path.read_text()
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        path.write_text(before + block + ("\n" + after if after else ""))
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + block)


def to_json(comparisons: list[Comparison], summary: dict[str, Any], revision: str) -> dict[str, Any]:
    """The machine-readable result: each point's measured and predicted figures and errors, and the summary."""
    def finite(v: float | None) -> float | None:
        return None if v is None or math.isinf(v) else round(v, 4)

    return {
        "engine_revision": revision,
        "points": [{
            "id": c.point.id, "gpu": c.point.gpu, "model": c.point.model, "tp": c.point.tp, "dtype": c.point.dtype,
            "regime": c.point.regime, "lengths": c.point.lengths, "measured": c.point.measured,
            "predicted": {k: round(v, 4) for k, v in c.predicted.items()}, "error": c.error,
            "relative_error": {m: finite(c.relative_error(m)) for m, _ in METRICS},
            "kv_cache_use": c.kv_cache_use, "preempted": c.preempted, "seconds": round(c.seconds, 2),
        } for c in comparisons],
        "summary": {**summary, "worst_ratio": finite(summary["worst_ratio"])},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the published measurements (JSON)")
    parser.add_argument("--only", action="append", default=[], metavar="ID", help="run only these point ids")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    parser.add_argument("--markdown", action="append", type=Path, default=[], metavar="FILE",
                        help="write the table into FILE between the markers (repeatable)")
    parser.add_argument("--check", action="store_true", help="exit 1 when issue 17's target is missed")
    parser.add_argument("--engine-revision", metavar="TEXT",
                        help="label the table with this engine commit (default: git log of melange_sky/engine)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="estimate-accuracy-") as home:
        os.environ["MELANGE_SKY_HOME"] = home  # an empty home: no saved calibration fit reaches the engines
        return _run(args, parser)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    sources, points = load_data(args.data)
    workloads = load_workloads(args.data)
    if args.only:
        unknown = set(args.only) - {p.id for p in points}
        if unknown:
            parser.error(f"unknown point id(s): {', '.join(sorted(unknown))}")
        points = [p for p in points if p.id in args.only]
    started = time.perf_counter()
    comparisons = []
    for p in points:
        comparisons.append(compare(p, workloads))
        print(f"  {p.id}: {comparisons[-1].seconds:.1f} s", file=sys.stderr)
    summary = summarise(comparisons)
    revision = args.engine_revision or engine_revision()
    table = markdown(comparisons, summary, sources, revision)
    for path in args.markdown:
        write_markdown(path, table)
    print(json.dumps(to_json(comparisons, summary, revision), indent=2) if args.json else table, end="")
    print(f"({len(points)} points in {time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 1 if args.check and not summary["target_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
