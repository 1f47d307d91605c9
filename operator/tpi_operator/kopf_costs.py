"""Two of kopf's per-event costs that this operator does not need, cut where kopf allows it.

Measured with py-spy on the operator while a lost node's 42 groups recovered (bench_operator.py,
200 node ranks): of the samples where it ran Python, 15% were kopf building a diff "essence" for
every watch event, and 8% were kopf logging every ``on.event`` handler's success.  Those seconds
are the API server's too on a machine it shares, so they delay the very deletes being measured.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import kopf

from tpi_operator.api import KIND


class ClusterEssenceStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff-base, built without copying what it then throws away.

    kopf computes an essence (what its change-detecting handlers compare) for every event of every
    watched kind, and its stock ``build`` first deep-copies the whole body, status and
    managedFields included, to keep only the spec, labels and annotations.  Here:

    * a ``TPInferenceCluster`` (the one kind with on.create/update/resume handlers and a daemon)
      gets the same essence from a copy of only those fields;
    * every other kind gets an empty essence: their handlers are ``on.event`` and indexes, which
      never read it (kopf computes change and spawning causes only for kinds that have such
      handlers; a unit test checks that only the clusters do);
    * a body without a kind (kopf's lists and watch events always set it) is built kopf's way.
    """

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        kind = body.get("kind")
        if kind is not None and kind != KIND:
            return cast(kopf.BodyEssence, {})
        if extra_fields:  # a handler that reads a status field: kopf's own way
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata") or {}
        kept = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        kept["metadata"] = {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if k in meta}
        return super().build(body=kopf.Body(kept))


class QuietWatchHandlers(logging.Filter):
    """Drops kopf's "Handler 'X' succeeded." for the named ``on.event`` handlers: one log line per
    watch event of every rank pod and StatefulSet (8,681 lines in one bench run) says nothing a
    failure would not; their failures are still logged."""

    def __init__(self, handler_names: Iterable[str]) -> None:
        super().__init__()
        self.messages = frozenset(f"Handler {name!r} succeeded." for name in handler_names)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.messages
