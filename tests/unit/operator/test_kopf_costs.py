"""kopf's per-event costs the operator cuts (``kopf_costs``): the cluster's diff essence is kopf's
own, other kinds get none (no handler of theirs reads it), and only the watch handlers' success
lines are dropped from the log."""

from __future__ import annotations

import copy
import logging

import kopf
import pytest
from tpi_operator import handlers
from tpi_operator.api import GROUP, KIND, PLURAL
from tpi_operator.kopf_costs import ClusterEssenceStorage, QuietWatchHandlers

PREFIX, KEY = "kopf.tpi.dev", "last-handled-configuration"


def _cluster() -> dict:
    return {
        "apiVersion": "tpi.dev/v1alpha1",
        "kind": KIND,
        "metadata": {
            "name": "c",
            "namespace": "ns",
            "uid": "u1",
            "resourceVersion": "42",
            "generation": 3,
            "labels": {"team": "a"},
            "annotations": {
                "tpi.dev/restartedAt": "2026-12-01T00:00:00Z",
                f"{PREFIX}/{KEY}": '{"spec": {"replicas": 1}}',
                f"{PREFIX}/reconciler": '{"started": "x"}',
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
            },
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"replicas": 2, "tensorParallelSize": 4, "runtime": {"maxBatchSize": 8}},
        "status": {"phase": "Running", "groups": [{"group": 0, "incarnation": 5}]},
    }


@pytest.mark.parametrize("mutate", [
    lambda b: None,
    lambda b: b["metadata"].pop("annotations"),
    lambda b: b["metadata"].pop("labels"),
    lambda b: b.pop("status"),
    lambda b: b.update(extra={"field": 1}),  # a top-level field beside spec is part of it too
])  # fmt: skip
def test_a_clusters_essence_is_kopfs_own(mutate) -> None:
    body = _cluster()
    mutate(body)
    stock = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key=KEY)
    ours = ClusterEssenceStorage(prefix=PREFIX, key=KEY)
    before = copy.deepcopy(body)
    assert ours.build(body=kopf.Body(body)) == stock.build(body=kopf.Body(body))
    assert body == before  # the body is not changed
    assert ours.fetch(body=kopf.Body(body)) == stock.fetch(body=kopf.Body(body))


def test_extra_fields_are_built_kopfs_way() -> None:
    body = kopf.Body(_cluster())
    fields = [("status", "phase")]
    stock = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key=KEY).build(body=body, extra_fields=fields)
    assert ClusterEssenceStorage(prefix=PREFIX, key=KEY).build(body=body, extra_fields=fields) == stock
    assert stock["status"] == {"phase": "Running"}


def test_a_changed_spec_still_changes_the_essence() -> None:
    ours = ClusterEssenceStorage(prefix=PREFIX, key=KEY)
    body = _cluster()
    edited = copy.deepcopy(body)
    edited["spec"]["runtime"]["maxBatchSize"] = 4
    status_only = copy.deepcopy(body)
    status_only["status"]["phase"] = "Recovering"
    assert ours.build(body=kopf.Body(edited)) != ours.build(body=kopf.Body(body))
    assert ours.build(body=kopf.Body(status_only)) == ours.build(body=kopf.Body(body))


@pytest.mark.parametrize("kind", ["Pod", "StatefulSet", "Lease", "Node"])
def test_other_kinds_get_an_empty_essence(kind) -> None:
    body = {"kind": kind, "metadata": {"name": "p", "annotations": {"a": "b"}}, "spec": {"nodeName": "n"}}
    assert ClusterEssenceStorage(prefix=PREFIX, key=KEY).build(body=kopf.Body(body)) == {}


def test_a_body_without_a_kind_is_built_kopfs_way() -> None:
    body = _cluster()
    del body["kind"]
    stock = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key=KEY).build(body=kopf.Body(body))
    assert ClusterEssenceStorage(prefix=PREFIX, key=KEY).build(body=kopf.Body(body)) == stock
    assert stock["spec"]["replicas"] == 2


def test_only_the_clusters_have_handlers_that_read_an_essence() -> None:
    """The empty essence of other kinds is safe only while no on.create/update/resume/delete
    handler or daemon watches them."""
    registry = kopf.get_default_registry()
    readers = [*registry._changing._handlers, *registry._spawning._handlers]
    assert readers, "the cluster handlers are registered"
    assert {(h.selector.group, h.selector.plural or h.selector.any_name) for h in readers} == {(GROUP, PLURAL)}


def test_only_the_watch_handlers_success_lines_are_dropped() -> None:
    quiet = QuietWatchHandlers(handlers.WATCH_HANDLERS)

    def record(msg: str, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)

    assert set(handlers.WATCH_HANDLERS) == {"node_changed", "pod_changed", "statefulset_changed", "cluster_event"}
    for name in handlers.WATCH_HANDLERS:
        assert not quiet.filter(record(f"Handler {name!r} succeeded."))
        assert quiet.filter(record(f"Handler {name!r} failed with an exception. Will retry.", logging.ERROR))
    assert quiet.filter(record("Handler 'cluster_changed' succeeded."))
    assert quiet.filter(record("Daemon 'reconciler' succeeded."))


def test_the_operators_settings_use_both() -> None:
    settings = kopf.OperatorSettings()
    memo = kopf.Memo()
    handlers.configure(settings=settings, memo=memo)
    handlers.configure(settings=settings, memo=memo)  # a second start adds no second filter
    assert isinstance(settings.persistence.diffbase_storage, ClusterEssenceStorage)
    filters = [f for f in logging.getLogger("kopf.objects").filters if isinstance(f, QuietWatchHandlers)]
    assert len(filters) == 1
