"""`Dist(force_group=True)` at world size 1: a real process group (gloo here; the GPU tier does the
same with NCCL), and the TP=1 model's row-parallel all-reduces really go through it, with the
same greedy tokens as without a group."""

from __future__ import annotations

import torch
import torch.distributed as tdist
from tpi_runtime.config import ModelConfig
from tpi_runtime.dist import Dist, DistEnv
from tpi_runtime.loader import load_weights
from tpi_runtime.model import BatchMeta, Transformer
from tpikit.ports import free_port

from .test_parity import PROMPT


def greedy(model_dir: str, dist: Dist, steps: int = 8) -> list[int]:
    cfg = ModelConfig.from_pretrained(model_dir)
    cpu = torch.device("cpu")
    model = Transformer(cfg, dist, dtype=torch.float32, device=cpu)
    load_weights(model, model_dir, cfg, 0, 1)
    model.setup_cache(num_slots=1, max_len=128)
    tokens = [int(model(torch.tensor(PROMPT), BatchMeta.build([(0, 0, len(PROMPT))], cpu))[0].argmax())]
    for s in range(steps - 1):
        meta = BatchMeta.build([(0, len(PROMPT) + s, 1)], cpu)
        tokens.append(int(model(torch.tensor([tokens[-1]]), meta)[0].argmax()))
    return tokens


def test_group_of_one_runs_the_model_through_real_collectives(ckpt_main: str) -> None:
    env = DistEnv(0, 1, 0, "127.0.0.1", free_port())
    plain = Dist(env)
    assert not plain.grouped
    ref = greedy(ckpt_main, plain)
    assert plain.collectives == 0
    d = Dist(env, backend="gloo", force_group=True)
    try:
        assert d.grouped and tdist.is_initialized() and tdist.get_world_size() == 1
        assert tdist.get_backend() == "gloo"
        assert greedy(ckpt_main, d) == ref
        cfg = ModelConfig.from_pretrained(ckpt_main)
        # o_proj and down_proj per layer per forward (8 forwards)
        assert d.collectives >= 8 * 2 * cfg.num_hidden_layers
    finally:
        d.close()
    assert not tdist.is_initialized()
