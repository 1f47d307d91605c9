"""RuntimeMetrics: private registry, rank labels, request/step series, scrape-time collectors.

The engine-backed series (steps, generated tokens, queue depth...) are checked end to end against
a real serving process in test_server.py; here the parts that need no engine.
"""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from tpi_runtime.engine import StepInfo
from tpi_runtime.metrics import GpuCollector, RuntimeMetrics

GPU_SERIES = (
    "tpi_gpu_memory_used_bytes",
    "tpi_gpu_memory_total_bytes",
    "tpi_gpu_utilization_ratio",
    "tpi_gpu_temperature_celsius",
    "tpi_gpu_power_watts",
)


def samples(m: RuntimeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition text (what Prometheus sees) into {(sample name, labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: RuntimeMetrics, name: str, **labels: str) -> float:
    return samples(m)[(name, tuple(sorted(labels.items())))]


def test_private_registry_and_rank_label() -> None:
    m0, m1 = RuntimeMetrics(0, gpu=False), RuntimeMetrics(1, gpu=False)
    m0.prompt_tokens.inc(5)
    m1.prompt_tokens.inc(7)
    assert value(m0, "tpi_prompt_tokens_total", rank="0") == 5
    assert value(m1, "tpi_prompt_tokens_total", rank="1") == 7
    # Neither leaks into the process-global registry (two runtimes or tests in one process).
    assert REGISTRY.get_sample_value("tpi_prompt_tokens_total", {"rank": "0"}) is None
    for (name, labels), _ in samples(m0).items():
        assert ("rank", "0") in labels, f"{name}{labels} has no rank label"


def test_request_outcomes_latency_and_step_hook() -> None:
    m = RuntimeMetrics(0, gpu=False)
    m.observe_request(200, "stop")
    m.observe_request(200, "stop")
    m.observe_request(200, "length")
    m.observe_request(400, None)
    m.request_latency.observe(0.3)
    m.time_to_first_token.observe(0.05)
    m.time_per_output_token.observe(0.01)
    m.on_step(StepInfo(step=1, batch_size=3, num_prefill_tokens=12, num_decode_tokens=0, duration_s=0.02))
    m.on_step(StepInfo(step=2, batch_size=3, num_prefill_tokens=0, num_decode_tokens=3, duration_s=0.004))

    assert value(m, "tpi_requests_total", rank="0", status="200", finish_reason="stop") == 2
    assert value(m, "tpi_requests_total", rank="0", status="200", finish_reason="length") == 1
    assert value(m, "tpi_requests_total", rank="0", status="400", finish_reason="none") == 1
    assert value(m, "tpi_request_latency_seconds_count", rank="0") == 1
    assert value(m, "tpi_request_latency_seconds_sum", rank="0") == pytest.approx(0.3)
    assert value(m, "tpi_request_latency_seconds_bucket", rank="0", le="0.25") == 0
    assert value(m, "tpi_request_latency_seconds_bucket", rank="0", le="0.5") == 1
    assert value(m, "tpi_time_to_first_token_seconds_count", rank="0") == 1
    assert value(m, "tpi_time_per_output_token_seconds_count", rank="0") == 1
    assert value(m, "tpi_step_duration_seconds_count", rank="0") == 2
    assert value(m, "tpi_step_duration_seconds_sum", rank="0") == pytest.approx(0.024)
    assert value(m, "tpi_step_tokens_total", rank="0", phase="prefill") == 12
    assert value(m, "tpi_step_tokens_total", rank="0", phase="decode") == 3


def test_engine_series_absent_until_the_engine_exists() -> None:
    m = RuntimeMetrics(2, engine_fn=lambda: None, gpu=False)
    s = samples(m)
    assert s[("tpi_ready", (("rank", "2"),))] == 0
    assert not any(name.startswith(("tpi_engine_steps", "tpi_queue_depth")) for name, _ in s)


def test_gpu_metrics_follow_nvml_availability() -> None:
    """On CPU NVML init fails: the series are simply absent and a scrape still works."""
    m = RuntimeMetrics(0)
    names = {name for name, _ in samples(m)}
    assert m.gpu_collector is not None
    if torch.cuda.is_available():
        assert m.gpu_collector.available
        assert set(GPU_SERIES) <= names
    else:
        assert not m.gpu_collector.available
        assert not names & set(GPU_SERIES), "GPU series must be absent without a GPU"


@pytest.mark.gpu
def test_gpu_metrics_values_on_a_gpu() -> None:
    assert torch.cuda.is_available(), "the gpu tier needs a CUDA GPU"
    c = GpuCollector("0")
    assert c.available
    fams = {f.name: f for f in c.collect()}
    used = fams["tpi_gpu_memory_used_bytes"].samples
    total = fams["tpi_gpu_memory_total_bytes"].samples
    assert len(used) == len(total) >= 1
    for u, t in zip(used, total, strict=True):
        assert u.labels == {"rank": "0", "gpu": u.labels["gpu"]}
        assert 0 <= u.value <= t.value and t.value > 2**30
    for s in fams["tpi_gpu_utilization_ratio"].samples:
        assert 0.0 <= s.value <= 1.0
