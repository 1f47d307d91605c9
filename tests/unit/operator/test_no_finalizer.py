"""The operator's kopf handlers keep no finalizer on a TPInferenceCluster (issue #10 item 8): a
cluster deleted while no operator runs must go away (the integration tier deletes one for real)."""

from __future__ import annotations

import kopf
from tpi_operator import handlers


def test_no_registered_handler_requires_a_finalizer() -> None:
    registry = kopf.get_default_registry()
    spawning = list(registry._spawning._handlers)
    assert any(h.fn is handlers.reconciler for h in spawning), "the reconciler daemon is registered"
    required = [h.id for h in [*spawning, *registry._changing._handlers] if h.requires_finalizer]
    assert required == []
    assert handlers.no_finalizer(registry) == 0  # idempotent: nothing left to rewrite
