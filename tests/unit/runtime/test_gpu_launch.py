"""GPU tier (opt-in, ``pytest -m gpu``): two local ranks of one pod talk NCCL without sockets.

``python -m tpi_runtime launch --ranks-per-pod 2`` gives both processes all the GPUs, each on
``cuda:LOCAL_RANK``; NCCL must then connect them through P2P (NVLink/PCIe) or shared memory,
never its socket transport (``NCCL_DEBUG=INFO`` names each channel's transport). Skipped, saying
so, where fewer than 2 GPUs exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from openai import OpenAI
from tpi_runtime.testing import make_tiny_checkpoint

from tests.unit.runtime.test_launch_runtime import MAX_TOKENS, PROMPT, Pod

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(autouse=True)
def _two_gpus() -> None:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        pytest.skip(f"needs 2 GPUs for two local ranks; this machine has {n}")


def test_two_local_ranks_use_p2p_or_shm_not_sockets(ckpt: str, tmp_path: Path) -> None:
    pod = Pod(ckpt, tmp_path, "--device", "cuda", "--backend", "nccl", env={"NCCL_DEBUG": "INFO"})
    try:
        pod.wait_ready(pod.port)
        pod.wait_ready(pod.port + 1)
        client = OpenAI(base_url=f"http://127.0.0.1:{pod.port}/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert out.choices[0].model_extra["token_ids"]  # type: ignore[index]
    finally:
        if pod.proc.poll() is None:
            pod.proc.terminate()
        code = pod.wait()
    log = pod.log.read_text(errors="replace")
    assert code == 0, pod.logs()
    channels = re.findall(r"Channel \d+/\d+ : \d+\[\d+\] -> \d+\[\d+\] via (\S+)", log)
    assert channels, f"NCCL_DEBUG=INFO printed no channel:\n{pod.logs()}"
    assert not [c for c in channels if c.startswith("NET/")], f"NCCL used its network transport: {channels}"
    assert all(c.startswith(("P2P", "SHM")) for c in channels), channels
