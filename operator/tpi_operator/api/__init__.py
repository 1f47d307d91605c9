"""API types of the TPI operator (the ``tpi.dev`` group), kept apart from the controllers.

The pydantic models here are the single source of truth: the CRD's OpenAPI schema is generated
from them (``hack/gen_crds.py``) and the controllers parse objects with them.
"""

from tpi_operator.api.v1alpha1 import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    TPInferenceCluster,
    TPInferenceClusterSpec,
    TPInferenceClusterStatus,
)

__all__ = [
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "TPInferenceCluster",
    "TPInferenceClusterSpec",
    "TPInferenceClusterStatus",
]
