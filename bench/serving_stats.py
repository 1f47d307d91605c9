"""Statistics of bench_serving.py, as vLLM's benchmark_serving computes them (pure functions).

Per request: TTFT = first token time - send time; TPOT = (latency - TTFT) / (output tokens - 1),
for requests with more than one output token; ITL = the gaps between streamed chunks. Per run:
request throughput = completed / duration, output throughput = output tokens / duration.
Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of each chunk with tokens

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]


@dataclass(frozen=True)
class RunSummary:
    concurrency: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: float


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; NaN for no data."""
    if not xs:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(concurrency: int, results: list[RequestResult], duration_s: float) -> RunSummary:
    done = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1e3 for r in done]
    tpot = [t * 1e3 for r in done if (t := r.tpot_s) is not None]
    itl = [g * 1e3 for r in done for g in r.itl_s]
    out = sum(r.output_tokens for r in done)
    return RunSummary(
        concurrency=concurrency,
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=duration_s,
        request_throughput=len(done) / duration_s if duration_s > 0 else math.nan,
        output_throughput=out / duration_s if duration_s > 0 else math.nan,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p99_ms=percentile(ttft, 99),
        tpot_p50_ms=percentile(tpot, 50),
        tpot_p99_ms=percentile(tpot, 99),
        itl_p50_ms=percentile(itl, 50),
    )


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; NaN when either is missing (NaN) or theirs is 0."""
    if math.isnan(ours) or math.isnan(theirs) or theirs == 0:
        return math.nan
    return ours / theirs


def gaps_in_window(chunk_times: list[float], start: float, end: float) -> list[float]:
    """The inter-chunk gaps that overlap [start, end] (a gap spanning `start` counts: the stall
    a new prompt's prefill causes begins before its first token)."""
    return [b - a for a, b in itertools.pairwise(chunk_times) if b >= start and a <= end]


def interference(streams: list[list[float]], start: float, end: float) -> tuple[float, float]:
    """(longest gap of any stream within [start, end], median gap of all streams overall), in s."""
    window = [g for t in streams for g in gaps_in_window(t, start, end)]
    every = [b - a for t in streams for a, b in itertools.pairwise(t)]
    if not window or not every:
        return math.nan, math.nan
    return max(window), statistics.median(every)
