"""`profile --launch` over the local launcher's emulator at speed N: the table shows the real GPU's scale (passed-at
rates / N, times x N), as its SLO heading and req/s column are, and says so (QA2 8)."""
from __future__ import annotations

from melange_sky.cli.profile import format_profile
from melange_sky.inputs.profile_result import BucketProfile, BucketStatus, ProfileResult, ProfileSettings, StepResult


def _result(speed: float | None) -> ProfileResult:
    fast = speed or 1.0  # the emulator measured rates x speed and times / speed
    step = StepResult(rate=67.0 * fast, sent=40, measured=20, ok=20, errors=0, timeouts=0, passed=True, reason="ok",
                      mean_tpot_ms=30.0 / fast, p50_ttft_ms=200.0 / fast, p99_ttft_ms=400.0 / fast,
                      p50_latency_ms=3000.0 / fast, p99_latency_ms=5000.0 / fast)
    bucket = BucketProfile(cell=(0, 0), input_range=(1, 100), output_range=(1, 100), prompt_tokens=50,
                           output_tokens=50, status=BucketStatus.OK, tput=67.0, best=step, seconds=12.0)
    return ProfileResult(endpoint="http://127.0.0.1:1/v1", model="m", tpot_slo_ms=120.0, input_edges=(1, 100),
                         output_edges=(1, 100), buckets=(bucket,), settings=ProfileSettings(), seconds=12.0,
                         emulated=speed is not None, speed=speed)


def _row(text: str) -> list[str]:
    return next(line for line in text.splitlines() if line.startswith("  0:0")).split()


def test_an_emulator_profile_at_speed_20_reads_at_the_real_gpus_scale_like_one_at_speed_1():
    real, emulated = format_profile(_result(None)), format_profile(_result(20.0))
    assert _row(emulated) == _row(real)  # passed at 67, TPOT 30.0, TTFT 200.0/400.0, latency 3000/5000
    assert _row(real)[4:9] == ["-", "67", "30.0", "200.0/400.0", "3000/5000"]
    assert "TPOT <= 120 ms" in emulated.splitlines()[0]
    assert "measured on an emulator 20x faster than real: passed at / 20 and TPOT/TTFT/latency x 20" in emulated
    assert "faster than real" not in real
