"""Builders shared by the operator's unit tests (imported as a plain module: no package here)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec, TPInferenceClusterStatus
from tpi_operator.core import render
from tpi_operator.core.observe import Observation, PodObs, StsObs

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
IDENT = render.Identity(name="demo", namespace="ns", uid="uid-1")


def make_spec(**overrides: Any) -> TPInferenceClusterSpec:
    base: dict[str, Any] = {
        "image": "tpi-runtime:test",
        "model": {"source": {"pvc": {"claimName": "models", "path": "tiny"}}},
        "tensorParallelSize": 4,
        "replicas": 1,
        "failurePolicy": {"backoffSeconds": 5, "maxGroupRestarts": 3, "minTensorParallelSize": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return TPInferenceClusterSpec.model_validate(base)


def hash_for(tp: int, batch: int) -> str:
    return f"h{tp}-{batch}"


def healthy_pods(group: int = 0, tp: int = 4, batch: int = 8, incarnation: int = 0, **kw: Any) -> list[PodObs]:
    return [
        PodObs(
            name=f"demo-g{group}-{r}",
            group=group,
            rank=r,
            uid=f"u{group}-{r}-{incarnation}",
            incarnation=incarnation,
            template_hash=hash_for(tp, batch),
            phase="Running",
            ready=True,
            node=f"node-{r}",
            started_at=NOW - dt.timedelta(minutes=5),
            **kw,
        )
        for r in range(tp)
    ]


def make_obs(
    spec: TPInferenceClusterSpec,
    *,
    pods: list[PodObs] | None = None,
    status: TPInferenceClusterStatus | None = None,
    tp: int | None = None,
    batch: int = 8,
    sts_tp: dict[int, int] | None = None,
    now: dt.datetime = NOW,
    **kw: Any,
) -> Observation:
    """An observation of ``spec``'s groups, all StatefulSets at (tp, batch) unless told otherwise."""
    tp = tp or int(spec.tensor_parallel_size)
    sts_tp = sts_tp if sts_tp is not None else {g: tp for g in range(spec.replicas)}
    sts = {g: StsObs(group=g, replicas=n, template_hash=hash_for(n, batch)) for g, n in sts_tp.items()}
    if pods is None:
        pods = [p for g, n in sts_tp.items() for p in healthy_pods(g, n, batch)]
    return Observation(
        now=now,
        generation=kw.pop("generation", 1),
        desired_tp=kw.pop("desired_tp", int(spec.tensor_parallel_size)),
        valid_sizes=kw.pop("valid_sizes", [1, 2, 4, 8]),
        status=status or TPInferenceClusterStatus(),
        pods=pods,
        statefulsets=sts,
        hash_for=hash_for,
        **kw,
    )
