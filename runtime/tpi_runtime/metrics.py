"""Prometheus metrics for one runtime rank.

Request-level series (latency, TTFT, TPOT, prompt tokens, requests by outcome) are observed by
the HTTP server on rank 0. Engine state (step, queue depth, batch sizes, OOM recoveries,
generated tokens) and GPU state are read at scrape time by custom collectors, so a scrape
always sees the current value and the engine needs no reference to this module.

Everything lives in its own ``CollectorRegistry`` so several runtimes (or tests) in one process
never collide in the global registry, and every series carries a ``rank`` label.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE_LATEST", "EngineCollector", "GpuCollector", "RuntimeMetrics"]

# Latency buckets cover a tiny CPU model (ms) up to long generations on big models (minutes).
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Read a field from a stats dataclass or a dict (the engine may expose either)."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


class EngineCollector(Collector):
    """Reads ``engine.stats()`` at scrape time. ``engine_fn`` returns None before the engine exists."""

    def __init__(self, engine_fn: Callable[[], Any], rank: str) -> None:
        self._engine_fn = engine_fn
        self._rank = rank

    def describe(self) -> Iterable[Metric]:
        # Returning nothing keeps registration from calling collect() (the engine may not exist yet).
        return []

    def collect(self) -> Iterator[Metric]:
        engine = self._engine_fn()
        ready = GaugeMetricFamily("tpi_ready", "1 when weights are loaded and the group is formed", labels=["rank"])
        ready.add_metric([self._rank], 1.0 if engine is not None and getattr(engine, "is_ready", False) else 0.0)
        yield ready
        if engine is None:
            return
        try:
            stats = engine.stats()
        except Exception:  # a scrape must never fail because the engine is mid-shutdown
            log.debug("engine.stats() failed during scrape", exc_info=True)
            return
        r = [self._rank]
        counters = (
            ("tpi_engine_steps", "Engine steps executed (main-loop progress)", "step"),
            ("tpi_generated_tokens", "Tokens generated; tokens/s is rate() of this", "tokens_generated"),
            (
                "tpi_oom_recoveries",
                "CUDA out-of-memory errors recovered from by shrinking the batch",
                "oom_count",
            ),
            ("tpi_kv_preemptions", "Requests preempted (KV blocks dropped, recomputed later)", "preemptions"),
            (
                "tpi_kv_blocks_freed_by_window",
                "KV blocks returned early because no query's sliding window reaches them",
                "kv_blocks_freed_by_window",
            ),
            (
                "tpi_prefix_cache_hit_tokens",
                "Prompt tokens whose KV blocks came from the prefix cache instead of a prefill",
                "prefix_cache_hit_tokens",
            ),
        )
        for name, doc, field in counters:
            value = _get(stats, field)
            if value is not None:
                c = CounterMetricFamily(name, doc, labels=["rank"])
                c.add_metric(r, float(value))
                yield c
        gauges = (
            ("tpi_running_batch_size", "Sequences in the running batch", "running"),
            ("tpi_queue_depth", "Requests waiting to be scheduled", "queue_depth"),
            (
                "tpi_effective_batch_size",
                "Current batch-size cap (lowered after an OOM)",
                "effective_batch_size",
            ),
            ("tpi_max_batch_size", "Configured maximum batch size", "max_batch_size"),
            ("tpi_kv_blocks_total", "KV-cache blocks in the pool (16 tokens each)", "kv_blocks_total"),
            ("tpi_kv_blocks_used", "KV-cache blocks held by running sequences", "kv_blocks_used"),
            (
                "tpi_kv_blocks_cached",
                "KV-cache blocks in the prefix cache (held or kept for reuse; evicted when the pool needs them)",
                "kv_blocks_cached",
            ),
        )
        for name, doc, field in gauges:
            value = _get(stats, field)
            if value is not None:
                g = GaugeMetricFamily(name, doc, labels=["rank"])
                g.add_metric(r, float(value))
                yield g
        last_error = _get(stats, "last_error")
        err = GaugeMetricFamily("tpi_last_error_present", "1 when the engine has recorded an error", labels=["rank"])
        err.add_metric(r, 1.0 if last_error else 0.0)
        yield err


class GpuCollector(Collector):
    """Per-GPU memory, utilisation, temperature and power via NVML, read at scrape time.

    On a machine without NVIDIA GPUs (or without the NVML library) the collector yields
    nothing; the reason is logged once at debug level, not on every scrape.
    """

    def __init__(self, rank: str) -> None:
        self._rank = rank
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._handles: list[tuple[str, Any]] = []
        self._init()

    def _init(self) -> None:
        try:
            import pynvml  # nvidia-ml-py; optional on CPU-only installs

            pynvml.nvmlInit()
            handles = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handles.append((str(i), pynvml.nvmlDeviceGetHandleByIndex(i)))
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            log.debug("NVML unavailable, GPU metrics disabled: %s", e)
            return
        self._nvml = pynvml
        self._handles = handles

    @property
    def available(self) -> bool:
        return self._nvml is not None and bool(self._handles)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if not self.available:
            return
        nv = self._nvml
        labels = ["rank", "gpu"]
        used = GaugeMetricFamily("tpi_gpu_memory_used_bytes", "GPU memory used", labels=labels)
        total = GaugeMetricFamily("tpi_gpu_memory_total_bytes", "GPU memory total", labels=labels)
        util = GaugeMetricFamily("tpi_gpu_utilization_ratio", "GPU compute utilisation (0-1)", labels=labels)
        temp = GaugeMetricFamily("tpi_gpu_temperature_celsius", "GPU temperature", labels=labels)
        power = GaugeMetricFamily("tpi_gpu_power_watts", "GPU power draw", labels=labels)
        with self._lock:  # NVML handles are shared; scrapes may overlap
            for idx, h in self._handles:
                lv = [self._rank, idx]
                # Each query is guarded alone: some boards lack power/temperature sensors.
                try:
                    mem = nv.nvmlDeviceGetMemoryInfo(h)
                    used.add_metric(lv, float(mem.used))
                    total.add_metric(lv, float(mem.total))
                except nv.NVMLError:
                    pass
                with contextlib.suppress(nv.NVMLError):
                    util.add_metric(lv, nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
                with contextlib.suppress(nv.NVMLError):
                    temp.add_metric(lv, float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
                with contextlib.suppress(nv.NVMLError):
                    power.add_metric(lv, nv.nvmlDeviceGetPowerUsage(h) / 1000.0)  # milliwatts
        yield from (m for m in (used, total, util, temp, power) if m.samples)


class RuntimeMetrics:
    """All metrics of one rank, in a private registry."""

    def __init__(self, rank: int, engine_fn: Callable[[], Any] | None = None, gpu: bool = True) -> None:
        self.rank = str(rank)
        self.registry = CollectorRegistry(auto_describe=False)
        lab = ["rank"]
        self.request_latency = Histogram(
            "tpi_request_latency_seconds",
            "End-to-end completion request latency",
            lab,
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        ).labels(rank=self.rank)
        self.time_to_first_token = Histogram(
            "tpi_time_to_first_token_seconds",
            "Time from request arrival to its first generated token",
            lab,
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        ).labels(rank=self.rank)
        self.time_per_output_token = Histogram(
            "tpi_time_per_output_token_seconds",
            "Mean inter-token time of a request after its first token",
            lab,
            registry=self.registry,
            buckets=_TOKEN_BUCKETS,
        ).labels(rank=self.rank)
        self.prompt_tokens = Counter(
            "tpi_prompt_tokens",
            "Prompt tokens of accepted completion requests",
            lab,
            registry=self.registry,
        ).labels(rank=self.rank)
        self.completion_tokens = Counter(
            "tpi_completion_tokens",
            "Tokens returned to clients by completion requests",
            lab,
            registry=self.registry,
        ).labels(rank=self.rank)
        self._requests = Counter(
            "tpi_requests",
            "Completion requests by HTTP status and finish_reason",
            ["rank", "status", "finish_reason"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "tpi_requests_rejected",
            "API requests refused before generation (queue full: 429; not ready or draining: 503)",
            ["rank", "reason"],
            registry=self.registry,
        )
        self.disconnects = Counter(
            "tpi_client_disconnects",
            "API requests whose client went away before the response ended (slot freed)",
            lab,
            registry=self.registry,
        ).labels(rank=self.rank)
        self.step_duration = Histogram(
            "tpi_step_duration_seconds",
            "Duration of one engine step (rank 0)",
            lab,
            registry=self.registry,
            buckets=_STEP_BUCKETS,
        ).labels(rank=self.rank)
        self._step_tokens = Counter(
            "tpi_step_tokens",
            "Tokens processed by engine steps, by phase",
            ["rank", "phase"],
            registry=self.registry,
        )
        self.engine_collector = EngineCollector(engine_fn or (lambda: None), self.rank)
        self.registry.register(self.engine_collector)
        self.gpu_collector: GpuCollector | None = None
        if gpu:
            self.gpu_collector = GpuCollector(self.rank)
            self.registry.register(self.gpu_collector)

    def observe_request(self, status: int, finish_reason: str | None) -> None:
        self._requests.labels(rank=self.rank, status=str(status), finish_reason=finish_reason or "none").inc()

    def on_step(self, info: Any) -> None:
        """Engine ``on_step`` hook (rank 0, after each step): step duration and tokens per phase."""
        duration = _get(info, "duration_s")
        if duration is not None:
            self.step_duration.observe(float(duration))
        for phase, field in (("prefill", "num_prefill_tokens"), ("decode", "num_decode_tokens")):
            n = _get(info, field)
            if n:
                self._step_tokens.labels(rank=self.rank, phase=phase).inc(float(n))

    def render(self) -> bytes:
        return generate_latest(self.registry)
