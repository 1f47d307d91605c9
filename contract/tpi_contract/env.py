"""Environment variable names of a rank pod: set by the operator (or a test), read by the runtime.

The runtime reads every one of them in one place, ``tpi_runtime.settings``.
"""

from __future__ import annotations

# -- process group (torchrun names) ------------------------------------------------------------
RANK = "RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_RANK = "LOCAL_RANK"
#: Ranks sharing this machine (torchrun; tests). On CPU they split its cores between them.
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"

# -- several ranks per pod (tpi_contract.ranks; read by ``python -m tpi_runtime launch``) ----------
#: Local ranks this pod runs (the launcher's ``--ranks-per-pod``); each child gets LOCAL_WORLD_SIZE.
RANKS_PER_POD = "TPI_RANKS_PER_POD"
#: This pod's StatefulSet ordinal (downward API: the label ``apps.kubernetes.io/pod-index``); the
#: launcher gives local rank l RANK = ordinal x ranks per pod + l. Unset: 0, fine for one-pod groups.
POD_ORDINAL = "TPI_POD_ORDINAL"
#: Where the launcher writes why it stopped (Kubernetes' terminationMessagePath, by default).
TERMINATION_LOG = "TPI_TERMINATION_LOG"

# -- downward API and heartbeat ------------------------------------------------------------------
POD_NAME = "POD_NAME"
POD_NAMESPACE = "POD_NAMESPACE"
#: This rank's Lease (the operator sets it to the pod name; the launcher gives each local rank its
#: own, ``tpi_contract.ranks.lease_name``); unset or empty: heartbeat off.
LEASE_NAME = "TPI_LEASE_NAME"
HEARTBEAT_INTERVAL_SECONDS = "TPI_HEARTBEAT_INTERVAL_SECONDS"
#: Optional override of how long the step counter may stand still before renewals stop.
HEARTBEAT_STALL_SECONDS = "TPI_HEARTBEAT_STALL_SECONDS"
KUBECONFIG = "KUBECONFIG"

# -- runtime process -------------------------------------------------------------------------------
#: Seconds rank 0 drains in-flight requests after SIGTERM.
DRAIN_SECONDS = "TPI_DRAIN_SECONDS"
#: "0": gloo only, no shared-memory transport for small collectives between ranks of one host.
SHM_COLLECTIVES = "TPI_SHM_COLLECTIVES"
#: CPU ranks: torch threads per rank (default: the machine's cores / LOCAL_WORLD_SIZE).
NUM_THREADS = "TPI_NUM_THREADS"

# -- fault injection (named fakes for tests; never set by the operator) ---------------------------
#: A step with more sequences than this raises a real torch.cuda.OutOfMemoryError.
FAKE_OOM_AT_BATCH = "TPI_FAKE_OOM_AT_BATCH"
#: "1": that fake OOM strikes after layer 0 of the forward pass, not before it.
FAKE_OOM_MID_FORWARD = "TPI_FAKE_OOM_MID_FORWARD"

#: Every ``serve``/``generate`` flag ``--some-flag`` falls back to ``TPI_SOME_FLAG``.
FLAG_PREFIX = "TPI_"


def for_flag(flag: str) -> str:
    """The variable a flag falls back to: ``--max-batch-size`` or ``max_batch_size`` -> ``TPI_MAX_BATCH_SIZE``."""
    return FLAG_PREFIX + flag.lstrip("-").upper().replace("-", "_")
