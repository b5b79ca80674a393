"""`simulate --plot`: the per-minute arrival rate and attainment over the run, above the latency distribution of
each GPU type (matplotlib, an optional extra, imported only here and only when asked)."""
from __future__ import annotations

import io
import os
from typing import Any

from melange_sky._io import write_bytes
from melange_sky.core.attainment import per_request_text
from melange_sky.errors import OutputError
from melange_sky.sim.simulate import SimResult

PLOT_EXTRA = "pip install 'melange-sky[plot]'"

__all__ = ["check_plotting", "plot_result"]


def _figure() -> Any:
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 - optional heavy extra, only for --plot
    except ImportError:
        raise OutputError(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}") from None
    return Figure


def check_plotting() -> None:
    """The one-line `OutputError` before a long simulation when `--plot` cannot draw."""
    _figure()


def plot_result(result: SimResult, path: str | os.PathLike[str]) -> None:
    """Draw the run (rate and attainment per minute; latency CDF per GPU type, with the latency SLO if any) as a
    PNG, written atomically."""
    Figure = _figure()
    report = result.report
    fig = Figure(figsize=(10, 8), dpi=110, layout="constrained")
    rate_ax, cdf_ax = fig.subplots(2, 1, height_ratios=[1, 1])
    minutes = [m.index for m in report.per_minute]
    rate_ax.bar(minutes, [m.rate for m in report.per_minute], width=0.9, color="#9ecae1", label="arrival rate")
    rate_ax.set_xlabel("Minute of the run")
    rate_ax.set_ylabel("Arrivals (req/s)")
    share_ax = rate_ax.twinx()
    share_ax.plot(minutes, [None if m.attainment is None else 100 * m.attainment for m in report.per_minute],
                  color="#d62728", marker="o", markersize=3, linewidth=1.5, label="attainment")
    share_ax.axhline(100 * report.target, color="#d62728", linestyle="--", linewidth=1, alpha=0.6,
                     label=f"target {100 * report.target:g}%")
    share_ax.set_ylabel("Requests meeting every SLO (%)")
    share_ax.set_ylim(min([100 * (m.attainment or 0) for m in report.per_minute] + [90]) - 2, 101)
    lines = rate_ax.get_legend_handles_labels()
    more = share_ax.get_legend_handles_labels()
    rate_ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left", fontsize=9)
    given = per_request_text(report.slos)
    rate_ax.set_title(f"{result.plan.describe()}: {100 * report.attainment:.2f}% of {report.requests:,} requests "
                      f"met every SLO ({given or 'no SLO'}, per request)", fontsize=10)
    by_gpu: dict[str, list[float]] = {}
    for record in result.records:
        if record.ok and record.gpu is not None and record.latency_s is not None:
            by_gpu.setdefault(record.gpu, []).append(record.latency_s)
    for gpu, values in sorted(by_gpu.items()):
        values.sort()
        n = len(values)
        cdf_ax.plot(values, [(k + 1) / n for k in range(n)], linewidth=1.5, label=f"{gpu} ({n:,} requests)")
    if report.slos.latency_ms is not None:
        cdf_ax.axvline(report.slos.latency_ms / 1000, color="black", linestyle="--", linewidth=1,
                       label=f"latency SLO {report.slos.latency_ms:g} ms")
    cdf_ax.set_xscale("log")
    cdf_ax.set_xlabel("End-to-end latency (s, log scale)")
    cdf_ax.set_ylabel("Share of requests at or below")
    cdf_ax.grid(True, alpha=0.3)
    cdf_ax.legend(loc="lower right", fontsize=9, title="GPU type", title_fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())
