"""`profile` lands within 10% of the true maximum rate over a grid of loads (the law server's `true_max_rate`).

The grid spans the ends the steady state matters for: short outputs with about 100 requests in flight at the true
maximum (where a step that never fills the server overstates the rate most), 62-token outputs with about 80 in
flight (0.75 s requests at ~107 req/s: fixed-size steps of 20 requests never reached their concurrency), and about
1 request in flight (where the TPOT of single requests is noisiest, so the step must measure long enough).
bench/profile_bench.py runs a longer grid (outputs up to 500 tokens, the issue's table) through the CLI.

Timing on a busy 2-core machine: the law server runs in its own process, its token deadlines are absolute (a late
token does not delay the next), and every per-token interval is 8 ms or more, far above the event loop's lateness.
Each case starts at ~0.8x its truth (start_rate), grows x1.3 and caps its steps at 6 s; the two with a smooth law
fit their crossing from the steps either side of it (no bisection: test_profiler covers bisecting), so the file takes
~21 s; the search from 1 req/s is the bench's job. The cases are marked `timing`, so they run alone, one after the
other: two profiles side by side on 2 cores slow each other's law server (a 4-token case measured 33% low beside the
62-token one).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from melange_sky.inputs.profile import profile_endpoint
from melange_sky.inputs.profile_result import ProfileSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_test_server import start_server, true_max_rate  # noqa: E402

TOLERANCE = 0.10


@dataclass(frozen=True)
class Case:
    base_ms: float
    k_ms: float
    prefill_ms_per_token: float
    tpot_slo_ms: float
    input_edges: tuple[int, int]
    output_edges: tuple[int, int]
    start_rate: float
    growth: float = 2.0
    precision: float = 0.03
    bisect_steps: int = 3
    max_step_seconds: float | None = None
    smooth_ms: float = 0.0

    def args(self) -> list[str]:
        return [f"--base-ms={self.base_ms}", f"--k-ms={self.k_ms}",
                f"--prefill-ms-per-token={self.prefill_ms_per_token}", f"--smooth-ms={self.smooth_ms}"]

    def others_at_max(self) -> float:
        """Other requests in flight at the true maximum (the law's T = base + k x (1 + others))."""
        return (self.tpot_slo_ms - self.base_ms) / self.k_ms - 1


GRID = {
    # 4-token outputs, ~100 others in flight at ~150 req/s; TPOT rises only 22% from idle to the SLO, so the
    # statistic is needed within 1% (the elasticity-scaled precision does that by itself). At twice the rate (a 90 ms
    # base) the Python law server fell behind beside a busy loop and the rate read up to 16% low; at 180 ms, 1-2%.
    # From 0.8x the truth and x1.3, the second step (1.05x) fails and the fit through the two brackets the truth
    # with no bisection, steps capped at 6 s: ~6 s (measured 0.993-1.024 in 8 runs at load 3-6; with one bisection
    # ~9 s, 0.993).
    "4_tokens_100_in_flight": Case(180.0, 0.4, 0.2, 220.0, (10, 30), (3, 6), start_rate=120.0, growth=1.3,
                                   bisect_steps=0, max_step_seconds=6.0),
    # 4-token outputs, ~1 other in flight at ~16 req/s. With 1 in flight the law's own mean TPOT over a few hundred
    # requests varies by ~10% (simulated: 240 requests at 8 req/s of base 1 / k 4.5, SD 10%), and the rate by
    # 2.3x that here, so the instantaneous law would need minutes of steps for a 10% test; the server's A is the
    # time-mean over 600 ms instead (--smooth-ms: same mean, same true_max_rate, far less noise per request).
    # From 0.8x the truth, x1.3 and two bisections, steps capped at 6 s each (judged on what they have): ~8 s
    # (measured 1.03 twice; from 10 req/s by doubling with 8 s caps, 19 s and once 0.85). Token intervals of 8 ms or
    # more: a late token moves a 4-token request's TPOT by a third of its lateness (at 4 ms intervals a loaded
    # machine read 16% low; at 8 ms, 4-5%).
    "4_tokens_1_in_flight": Case(8.0, 6.0, 0.2, 20.0, (1, 10), (3, 6), start_rate=13.0, growth=1.3, precision=0.05,
                                 bisect_steps=2, max_step_seconds=6.0, smooth_ms=600.0),
    # 62-token outputs (0.75 s requests), ~80 others in flight at ~107 req/s: a step must keep arrivals going for
    # several request durations before the server holds the steady state's concurrency. From 0.84x the truth and
    # x1.3 (1.09x fails), the fit through the two steps, no bisection, steps capped at 6 s: ~7.5 s (measured
    # 0.962-1.009 in 8 runs at load 3-6; with one bisection ~10.5 s, 1.00-1.04; the search from 80 req/s by doubling
    # with two bisections and 30 s step caps took 45 s)
    "62_tokens_80_in_flight": Case(8.0, 0.05, 0.1, 12.0, (10, 30), (50, 75), start_rate=90.0, growth=1.3,
                                   bisect_steps=0, max_step_seconds=6.0),
}


@pytest.fixture
def law_server():
    procs: list[subprocess.Popen] = []

    def start(case: Case) -> str:
        proc, url = start_server(case.args())
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_grid_spans_1_to_100_requests_in_flight_at_the_true_maximum():
    in_flight = sorted(case.others_at_max() for case in GRID.values())
    assert in_flight[0] == pytest.approx(1) and in_flight[-1] >= 99


@pytest.mark.timing  # measured on the clock: runs alone, after the rest (setup.cfg: markers)
@pytest.mark.parametrize("name", list(GRID))
def test_profile_is_within_10_percent_of_the_true_max_rate(law_server, name):
    case = GRID[name]
    url = law_server(case)
    settings = ProfileSettings(tpot_slo_ms=case.tpot_slo_ms, start_rate=case.start_rate, min_rate=1.0,
                               max_rate=2000.0, growth=case.growth, bisect_steps=case.bisect_steps,
                               precision=case.precision,
                               max_step_seconds=case.max_step_seconds, request_timeout=5.0)
    result = profile_endpoint(url, "test-model", input_edges=case.input_edges, output_edges=case.output_edges,
                              settings=settings)
    b = result.buckets[0]
    truth = true_max_rate(case.tpot_slo_ms, case.base_ms, case.k_ms, case.prefill_ms_per_token, b.prompt_tokens,
                          b.output_tokens)
    steps = "; ".join(f"{s.rate:.4g}: {s.reason}" for s in b.steps)
    assert b.status == "ok" and b.limit == "tpot", b.message
    assert b.tput == pytest.approx(truth, rel=TOLERANCE), f"{name}: {b.tput:.1f} vs true {truth:.1f}; {steps}"
    # the steady state was measured: near the maximum, in flight matched Little's law for the measured latency
    assert b.best is not None and b.best.in_flight is not None and b.best.mean_latency_ms is not None
    little = b.best.rate * b.best.mean_latency_ms / 1000
    assert b.best.in_flight == pytest.approx(little, rel=0.25, abs=0.5)
