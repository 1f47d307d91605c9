"""Prometheus metrics of the operator."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("tpi_operator_reconciles_total", "Reconciles of TPInferenceClusters", ["result"])
RECONCILE_SECONDS = Histogram(
    "tpi_operator_reconcile_seconds",
    "Duration of one reconcile",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ACTIONS = Counter("tpi_operator_actions_total", "Recovery and rollout actions taken", ["action", "reason"])
RECOVERY_SECONDS = Histogram(
    "tpi_operator_recovery_seconds",
    "Seconds from a detected group failure to the group being Ready again",
    ["reason"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
API_REQUESTS = Counter(
    "tpi_operator_api_requests_total",
    "API requests made by the reconciler (kopf's own watches and event posts excluded)",
    ["method", "resource"],
)
CLUSTERS = Gauge("tpi_operator_clusters", "TPInferenceClusters by phase", ["phase"])


def serve(port: int) -> None:
    """Expose /metrics on ``port`` (0: disabled)."""
    if port:
        start_http_server(port)
