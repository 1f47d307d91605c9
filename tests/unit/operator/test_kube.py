"""kube.Kube.delete: the uid precondition keeps a stale cache from deleting a replacement pod."""

from __future__ import annotations

import json

import pytest
from tpi_operator.kube import Kube, KubeError, _resource


class FakeKube(Kube):
    def __init__(self, status: int | None) -> None:
        super().__init__(api=None)  # type: ignore[arg-type]
        self.status, self.calls = status, []

    def request(self, method, path, *, body=None, query=None, content_type="application/json"):
        self.calls.append((method, path, body))
        if self.status is not None:
            raise KubeError(self.status, json.dumps({"message": "nope"}))
        return {}


@pytest.mark.parametrize(
    ("status", "uid", "result"),
    [(None, "u1", True), (404, "u1", False), (409, "u1", False), (None, None, True), (404, None, False)],
)
def test_delete_with_uid_precondition(status, uid, result) -> None:
    kube = FakeKube(status)
    assert kube.delete("Pod", "ns", "p-0", grace_seconds=5, uid=uid) is result
    method, path, body = kube.calls[0]
    assert (method, path) == ("DELETE", "/api/v1/namespaces/ns/pods/p-0")
    assert body["gracePeriodSeconds"] == 5
    assert body.get("preconditions") == ({"uid": uid} if uid else None)


def test_conflict_without_uid_is_an_error() -> None:
    with pytest.raises(KubeError):
        FakeKube(409).delete("Pod", "ns", "p-0")


@pytest.mark.parametrize(
    ("path", "resource"),
    [
        ("/api/v1/nodes", "nodes"),
        ("/api/v1/namespaces/x/pods/p", "pods"),
        ("/apis/tpi.dev/v1alpha1/namespaces/x/tpinferenceclusters/a/status", "tpinferenceclusters/status"),
        ("/apis/apps/v1/namespaces/x/statefulsets", "statefulsets"),
    ],
)
def test_request_metric_resource(path: str, resource: str) -> None:
    assert _resource(path) == resource
