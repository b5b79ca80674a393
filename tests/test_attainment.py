"""The shared attainment report (core.attainment): per-request SLO checks, percentiles, groups and minutes, on
record sets small enough to check by hand."""
from __future__ import annotations

import pytest

from melange_sky.core.attainment import AttainmentError, RequestRecord, request_tpot, summarise
from melange_sky.core.slo import Slos


def answered(arrival: float, ttft: float, latency: float, output: int = 11, gpu: str = "A10G",
             bucket: tuple[int, int] = (0, 0)) -> RequestRecord:
    return RequestRecord.answered(arrival, gpu, f"{gpu.lower()}-0", bucket, 100, output, ttft, latency)


def test_a_requests_own_tpot_is_the_gap_after_its_first_token():
    assert request_tpot(0.5, 1.5, 11) == pytest.approx(0.1)
    assert request_tpot(0.5, 0.5, 1) is None
    record = answered(0.0, 0.5, 1.5)
    assert record.tpot_s == pytest.approx(0.1)


def test_attainment_counts_requests_meeting_every_slo_and_says_which_missed():
    records = [
        answered(0.0, 0.2, 1.2),   # tpot 100 ms: meets (equal to the limit)
        answered(1.0, 0.2, 2.2),   # tpot 200 ms: misses TPOT
        answered(2.0, 0.9, 1.9),   # ttft 900 ms: misses TTFT
        answered(3.0, 0.1, 1.1),   # meets
        RequestRecord.failed(4.0, None, None, (0, 1), 100, 11),  # refused: misses
    ]
    report = summarise(records, Slos(tpot_ms=100, ttft_ms=500), target=0.5)
    assert report.requests == 5
    assert report.overall.met == 2
    assert report.attainment == pytest.approx(0.4)
    assert report.missed == {"ttft": 1, "tpot": 1, "latency": 0, "unanswered": 1}
    assert report.refused == 1
    assert not report.meets_target
    assert report.verdict == "misses the target: 40% of requests met every SLO (target 50%)"


def test_percentiles_interpolate_between_order_statistics():
    # TTFTs 0.1 .. 1.0 s: p50 = 0.55 s, p90 = 0.91 s, p99 = 0.991 s (linear between order statistics)
    records = [answered(float(k), 0.1 * (k + 1), 0.1 * (k + 1) + 1.0) for k in range(10)]
    report = summarise(records, Slos(tpot_ms=None))
    assert report.overall.ttft_ms.p50 == pytest.approx(550)
    assert report.overall.ttft_ms.p90 == pytest.approx(910)
    assert report.overall.ttft_ms.p99 == pytest.approx(991)
    assert report.attainment == 1.0  # no SLO given: every answered request meets "every SLO"


def test_groups_per_gpu_type_and_bucket():
    records = [answered(0.0, 0.1, 1.1, gpu="A10G", bucket=(0, 0)),
               answered(0.5, 0.1, 3.1, gpu="A10G", bucket=(1, 0)),
               answered(1.0, 0.1, 1.1, gpu="H100", bucket=(1, 0))]
    report = summarise(records, Slos(tpot_ms=100))
    assert set(report.per_gpu) == {"A10G", "H100"}
    assert report.per_gpu["A10G"].requests == 2 and report.per_gpu["A10G"].attainment == 0.5
    assert report.per_gpu["H100"].attainment == 1.0
    assert report.per_bucket[(1, 0)].requests == 2 and report.per_bucket[(1, 0)].met == 1


def test_a_mean_tpot_can_pass_while_requests_miss_it():
    # nine requests at 50 ms and one at 500 ms: the mean TPOT (95 ms) holds a 100 ms SLO, one request misses it
    records = [answered(float(k), 0.1, 0.1 + 10 * 0.05) for k in range(9)] + [answered(9.0, 0.1, 0.1 + 10 * 0.5)]
    report = summarise(records, Slos(tpot_ms=100))
    assert report.slo_statistics["mean TPOT"] == pytest.approx(95)
    assert report.attainment == pytest.approx(0.9)


def test_minutes_count_arrivals_and_their_attainment():
    # minute 0: 60 arrivals, all meet; minute 1: 30 arrivals over the last 30 s, all miss
    records = [answered(float(k), 0.1, 1.1) for k in range(60)]
    records += [answered(60.0 + k, 0.1, 5.1) for k in range(30)]
    report = summarise(records, Slos(tpot_ms=100), duration_s=90.0)
    assert [(m.index, m.requests) for m in report.per_minute] == [(0, 60), (1, 30)]
    assert report.per_minute[0].rate == pytest.approx(1.0)
    assert report.per_minute[1].rate == pytest.approx(1.0)  # 30 arrivals over its 30 s
    assert [m.attainment for m in report.per_minute] == [1.0, 0.0]
    assert report.minute_summary()["at_target"] == 0.5


def test_json_has_the_shared_keys():
    report = summarise([answered(0.0, 0.1, 1.1)], Slos(tpot_ms=100))
    doc = report.to_json()
    for key in ("attainment", "requests", "ttft_ms", "tpot_ms", "latency_ms", "per_gpu", "per_bucket",
                "per_minute"):
        assert key in doc
    assert set(doc["ttft_ms"]) == {"p50", "p90", "p99"}
    assert doc["per_bucket"]["0:0"]["requests"] == 1
    assert doc["per_minute"][0]["requests"] == 1


def test_bad_target_and_empty_runs_are_errors():
    with pytest.raises(AttainmentError, match="--target"):
        summarise([answered(0.0, 0.1, 1.1)], Slos(), target=1.5)
    with pytest.raises(AttainmentError, match="no requests"):
        summarise([], Slos())
