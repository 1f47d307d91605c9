"""bench/serving_stats.py, the statistics bench_serving.py prints: percentiles, TPOT, ratios, gaps."""

from __future__ import annotations

import math

import pytest

from bench.serving_stats import RequestResult, interference, percentile, ratio, summarize


def test_percentiles_interpolate_like_numpy() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 99) == pytest.approx(4.96)  # numpy.percentile(xs, 99)
    assert percentile([1.0, 2.0], 25) == pytest.approx(1.25)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_summary_counts_tokens_per_second_and_tpot_like_vllm() -> None:
    ok = RequestResult(ok=True, output_tokens=11, ttft_s=0.5, latency_s=1.5, chunk_times=[0.0, 0.1, 0.3])
    one = RequestResult(ok=True, output_tokens=1, ttft_s=0.2, latency_s=0.2, chunk_times=[0.2])
    failed = RequestResult(error="HTTP 500")
    s = summarize(4, [ok, one, failed], duration_s=2.0)
    assert (s.completed, s.failed) == (2, 1)
    assert s.request_throughput == 1.0 and s.output_throughput == 6.0  # 12 tokens / 2 s
    assert s.tpot_p50_ms == pytest.approx(100.0)  # (1.5 - 0.5) / 10; the 1-token request has none
    assert s.ttft_p50_ms == pytest.approx(350.0)
    assert s.itl_p50_ms == pytest.approx(150.0)


def test_ratios_and_missing_values() -> None:
    assert ratio(30.0, 10.0) == 3.0
    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(math.nan, 1.0))


def test_interference_takes_the_worst_gap_in_the_window_against_the_median() -> None:
    a = [0.0, 0.1, 0.2, 1.2, 1.3, 1.4]  # a 1 s stall spanning the window's start
    b = [0.05 + 0.1 * i for i in range(15)] + [3.45]  # a longer gap after the window (from 1.45 s)
    worst, median = interference([a, b], start=0.5, end=1.3)
    assert worst == pytest.approx(1.0)
    assert median == pytest.approx(0.1)
    # A gap that spans the whole window is a stall in it.
    assert interference([[0.0, 0.1, 0.2, 2.0]], start=0.5, end=1.3)[0] == pytest.approx(1.8)
