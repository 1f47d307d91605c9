"""GPU tier (opt-in: `pytest -m gpu` on a machine with a CUDA GPU; CI has none).

Our model on CUDA (the [out, in] weight layout, cuBLAS) against transformers on the same
checkpoint. NCCL needs two GPUs and is not covered here.
"""

from __future__ import annotations

import pytest
import torch
from tpi_runtime.config import ModelConfig
from tpi_runtime.dist import Dist, DistEnv
from tpi_runtime.loader import load_weights
from tpi_runtime.model import BatchMeta, Transformer
from tpi_runtime.testing import load_hf_model

from .test_families import PROMPT as FPROMPT
from .test_families import hf_greedy
from .test_parity import PROMPT, STEPS, TOL, hf_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    assert torch.cuda.is_available(), "the gpu tier needs a CUDA GPU"


def test_cuda_model_matches_transformers(ckpt_main: str) -> None:
    ref = hf_reference(ckpt_main)  # transformers on CPU, float32
    cuda = torch.device("cuda:0")
    cfg = ModelConfig.from_pretrained(ckpt_main)
    model = Transformer(cfg, Dist(DistEnv(0, 1, 0, "127.0.0.1", 0)), dtype=torch.float32, device=cuda)
    load_weights(model, ckpt_main, cfg, 0, 1)
    assert model.layers[0].attn.qkv.weight.dim() == 2, "GPUs keep the [out, in] layout"
    model.setup_cache(num_slots=1, max_len=128)
    meta = BatchMeta.build([(0, 0, len(PROMPT))], cuda)
    meta.last_token_idx = torch.arange(len(PROMPT), device=cuda)
    prefill = model(torch.tensor(PROMPT, device=cuda), meta).cpu()
    assert (prefill - ref["prefill"]).abs().max().item() < TOL
    tokens = [int(prefill[-1].argmax())]
    for s in range(STEPS - 1):
        meta = BatchMeta.build([(0, len(PROMPT) + s, 1)], cuda)
        tokens.append(int(model(torch.tensor([tokens[-1]], device=cuda), meta)[0].argmax()))
    assert tokens == ref["tokens"]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_cuda_families_match_transformers(family: str, ckpt_families: dict[str, str]) -> None:
    model_dir = ckpt_families[family]
    ref = hf_greedy(load_hf_model(model_dir), FPROMPT)
    cuda = torch.device("cuda:0")
    cfg = ModelConfig.from_pretrained(model_dir)
    model = Transformer(cfg, Dist(DistEnv(0, 1, 0, "127.0.0.1", 0)), dtype=torch.float32, device=cuda)
    load_weights(model, model_dir, cfg, 0, 1)
    model.setup_cache(num_slots=1, max_len=128)
    meta = BatchMeta.build([(0, 0, len(FPROMPT))], cuda)
    meta.last_token_idx = torch.arange(len(FPROMPT), device=cuda)
    prefill = model(torch.tensor(FPROMPT, device=cuda), meta).cpu()
    assert (prefill - ref["prefill"]).abs().max().item() < TOL, family
    tokens = [int(prefill[-1].argmax())]
    for s in range(len(ref["tokens"]) - 1):
        meta = BatchMeta.build([(0, len(FPROMPT) + s, 1)], cuda)
        tokens.append(int(model(torch.tensor([tokens[-1]], device=cuda), meta)[0].argmax()))
    assert tokens == ref["tokens"], family
