"""What the operator refuses to run even though the schema allows it.  Pure.

A ``hostPath`` model source mounts a node directory into rank pods: whoever may create a
TPInferenceCluster could otherwise read any path of any node.  It is refused unless the operator
was started with an allow-list of host path prefixes (chart value ``allowedHostPaths``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec


def _within(path: str, prefix: str) -> bool:
    prefix = posixpath.normpath(prefix)
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def host_path_refusal(spec: TPInferenceClusterSpec, allowed: Iterable[str]) -> str | None:
    """Why the spec's hostPath model source is refused (None: no hostPath, or an allowed one)."""
    source = spec.model.source.host_path
    if source is None:
        return None
    allowed = [a for a in allowed if a]
    path = posixpath.normpath(source.path)  # "/allowed/../etc" is "/etc"
    if any(_within(path, prefix) for prefix in allowed):
        return None
    if not allowed:
        return (
            f"model.source.hostPath {source.path!r} is refused: this operator allows no host paths "
            "(install it with allowedHostPaths, or use a pvc or image source)"
        )
    return f"model.source.hostPath {source.path!r} is not under an allowed host path ({', '.join(allowed)})"
