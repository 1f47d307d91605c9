"""Tensor-parallel layers and the per-rank sharding plan (Megatron / vLLM layout).

- Column-parallel (q/k/v, gate/up): each rank owns a block of output rows; no communication.
- Row-parallel (o_proj, down_proj): each rank owns a block of input columns; exactly one
  all-reduce sums the partial outputs.
- Vocab-parallel embedding: each rank owns ceil(V / tp) rows (the last shard zero-padded); tokens
  outside the shard are masked to zero and one all-reduce assembles the embeddings.
- Vocab-parallel LM head: the same row shards; one all-gather assembles the logits, and the
  padding columns are dropped.
- KV heads: sharded when tp <= num_kv_heads, otherwise replicated like vLLM: rank r holds KV head
  r * num_kv_heads // tp (requires tp % num_kv_heads == 0, checked by config.check_tp).

`shard_plan` tells the loader which slice of which checkpoint tensor fills which local parameter,
so every rank reads only its own slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dist import Dist


def _empty_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: the loader overwrites every element, so random init would be wasted time.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


SPLIT_INPUTS = "tpi_split_inputs"  # the attribute that marks a weight in the split-inputs layout


def linear_weight(
    out_features: int,
    in_features: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    split_inputs: bool = False,
) -> nn.Parameter:
    """The weight W [out, in] of y = x @ W^T, stored the way this device multiplies fastest.

    GPUs: the usual [out, in]. CPU: W^T cut into one block per torch thread, so that a batched
    matmul streams each core's own contiguous block. Decode multiplies M = batch-size rows by
    every weight byte, and MKL runs such a small-M sgemm on one core, ~1.3x slower in F.linear's
    [out, in] layout. Two cuts:
    - by output columns, [blocks, in, out / blocks] (the column-parallel q/k/v and gate/up);
    - with `split_inputs`, by input rows, [blocks, in / blocks, out], the partial products summed
      (the row-parallel o_proj and down_proj: the same cut as across ranks). Their outputs are
      narrow (hidden_size), and at M = 1 MKL reads a [K, out / 2] block ~1.3x slower than a
      [K / 2, out] one (o_proj 0.78x, down_proj 0.77x the time here; M = 16-512 within +-5%).
      float32 only: in half precision each partial product would be rounded before the sum,
      where transformers rounds once.
    `weight_rows` maps the checkpoint's rows onto any of these layouts for the loader.
    """
    blocks = torch.get_num_threads() if device.type == "cpu" else 0
    if blocks == 0:
        return _empty_param(out_features, in_features, dtype=dtype, device=device)
    if split_inputs and dtype == torch.float32 and blocks > 1 and in_features % blocks == 0:
        weight = _empty_param(blocks, in_features // blocks, out_features, dtype=dtype, device=device)
        setattr(weight, SPLIT_INPUTS, True)
        return weight
    if out_features % blocks:
        blocks = 1
    return _empty_param(blocks, in_features, out_features // blocks, dtype=dtype, device=device)


def splits_inputs(weight: torch.Tensor) -> bool:
    return bool(getattr(weight, SPLIT_INPUTS, False))


def logical_rows(weight: torch.Tensor) -> int:
    """Rows of the [out, in] (or [n]) tensor a parameter holds, whatever its storage layout."""
    if weight.dim() <= 2:
        return weight.shape[0]
    return weight.shape[2] if splits_inputs(weight) else weight.shape[0] * weight.shape[2]


def weight_rows(weight: torch.Tensor, start: int, stop: int) -> list[tuple[int, int, torch.Tensor]]:
    """Rows [start, stop) of the logical [out, in] weight as (first, last, [last - first, in] view)
    pieces, for a weight in any `linear_weight` layout (or a plain [rows, cols] tensor)."""
    if weight.dim() <= 2:
        return [(start, stop, weight[start:stop])]
    if splits_inputs(weight):  # the blocks are W^T [in, out] cut by rows: one strided view
        return [(start, stop, weight.view(-1, weight.shape[2])[:, start:stop].t())]
    per_block = weight.shape[2]
    pieces = []
    for b in range(start // per_block, -(-stop // per_block)):
        a, e = max(start, b * per_block), min(stop, (b + 1) * per_block)
        pieces.append((a, e, weight[b, :, a - b * per_block : e - b * per_block].t()))
    return pieces


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ W^T for x [M, in] and a weight in any `linear_weight` layout, or packed by
    `pack_for_batches`."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [None], "")  # type: ignore[no-any-return]
    if weight.dim() == 2:
        return F.linear(x, weight)
    blocks, rows, cols = weight.shape
    if blocks == 1:
        return x @ weight[0]
    if splits_inputs(weight):  # rows: in / blocks; each block's partial product, then their sum
        partial = torch.bmm(x.reshape(x.shape[0], blocks, rows).transpose(0, 1), weight)  # [blocks, M, out]
        return partial.sum(0)
    y = torch.bmm(x.expand(blocks, *x.shape), weight)  # [blocks, M, cols]
    if x.shape[0] == 1:
        return y.view(1, blocks * cols)
    return y.transpose(0, 1).reshape(x.shape[0], blocks * cols)


def onednn_packing_available() -> bool:
    """Whether this torch build has oneDNN's packed-weight linear (x86 builds do; checked on a
    2 x 2 product, so a build whose ops exist but fail falls back to the layouts above)."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    try:
        y = linear(torch.ones(1, 2), packed_weight(torch.eye(2), 1))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(y, torch.ones(1, 2)))


def pack_for_batches(model: nn.Module, batch_tokens: int) -> int:
    """Replace each CPU float32 linear weight in a `linear_weight` layout by oneDNN's packed copy
    (`torch.ops.mkldnn`, the blocked format inductor's CPU backend freezes weights into), for
    `batch_tokens` rows per product. Returns the bytes packed.

    For a server that batches: at 16 and 64 rows oneDNN multiplies this model's products in
    0.43-0.75x the time MKL takes on the blocked W^T (bench_ceiling.py), but at one row it is
    1.04-1.8x slower, since the blocked layout streams the weights as the memory allows. The engine
    packs when max_batch_size > 1. Not packed: GPU weights, half precision (rounding as
    transformers does is only checked for the layouts above) and an LM head tied to the embedding
    (the embedding lookup needs the plain rows). The logical [out, in] weight is rebuilt from the
    layout one weight at a time, so the peak is one extra copy of the largest weight."""
    packed = 0
    for module in model.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            continue
        if module.weight.dim() != 3 or module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
            continue
        plain = plain_weight(module.weight)
        del module.weight  # its storage's last reference: freed before the packed copy is made
        module.weight = packed_weight(plain, batch_tokens)  # oneDNN's opaque layout, not a Parameter
        packed += plain.numel() * plain.element_size()
        del plain
    return packed


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds: its parameters and the oneDNN-packed linear weights
    `pack_for_batches` put in their place (plain tensors, so ``parameters()`` no longer lists them)."""
    weights = [getattr(m, "weight", None) for m in model.modules()]
    packed = sum(w.numel() * w.element_size() for w in weights if isinstance(w, torch.Tensor) and w.is_mkldnn)
    return packed + sum(p.numel() * p.element_size() for p in model.parameters())


def plain_weight(weight: torch.Tensor) -> torch.Tensor:
    """A contiguous [out, in] copy of a weight in any `linear_weight` layout."""
    return torch.cat([v for _, _, v in weight_rows(weight, 0, logical_rows(weight))])


def packed_weight(plain: torch.Tensor, batch_tokens: int) -> torch.Tensor:
    """oneDNN's packed copy of an [out, in] float32 weight, for `batch_tokens` rows per product."""
    return torch.ops.mkldnn._reorder_linear_weight(plain, batch_tokens)  # type: ignore[no-any-return]


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W_local^T, W_local = rows of W (possibly several tensors fused along rows)."""

    def __init__(self, in_features: int, out_local: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight: torch.Tensor = linear_weight(out_local, in_features, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = sum_ranks x_local @ W_local^T: one all-reduce per call."""

    def __init__(
        self,
        in_local: int,
        out_features: int,
        dist: Dist,
        name: str,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.weight: torch.Tensor = linear_weight(out_features, in_local, dtype=dtype, device=device, split_inputs=True)
        self.dist = dist
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce(linear(x, self.weight), name=self.name)


def vocab_shard(vocab_size: int, rank: int, tp: int) -> tuple[int, int, int]:
    """(start, stop, padded_rows) of this rank's vocab shard; stop - start may be < padded_rows."""
    per = -(-vocab_size // tp)
    start = min(rank * per, vocab_size)
    return start, min(start + per, vocab_size), per


class VocabParallelEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, dist: Dist, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.start, self.stop, rows = vocab_shard(cfg.vocab_size, dist.rank, dist.world_size)
        self.weight = _empty_param(rows, cfg.hidden_size, dtype=dtype, device=device)
        self.dist = dist

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.stop)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.dist.all_reduce(out, name="embed_tokens")


class ParallelLMHead(nn.Module):
    """Logits for the full vocabulary on every rank (all-gather of the vocab shards)."""

    def __init__(
        self,
        cfg: ModelConfig,
        dist: Dist,
        *,
        dtype: torch.dtype,
        device: torch.device,
        tied: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.dist = dist
        self.weight: torch.Tensor
        if tied is not None:
            self.weight = tied.weight  # same shard layout as the embedding, so sharing is exact
        else:
            _, _, rows = vocab_shard(cfg.vocab_size, dist.rank, dist.world_size)
            self.weight = linear_weight(rows, cfg.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, self.weight)
        if self.dist.world_size > 1:
            logits = self.dist.all_gather(logits, name="lm_head")
        return logits[..., : self.vocab_size]


# --- sharding plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSlice:
    """Rows/columns [start, stop) of checkpoint tensor `name` along `dim` (None: whole tensor)."""

    name: str
    shape: tuple[int, ...]  # the full shape expected in the checkpoint
    dim: int | None = None
    start: int = 0
    stop: int = 0

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        s = list(self.shape)
        s[self.dim] = self.stop - self.start
        return tuple(s)


@dataclass(frozen=True)
class ParamPlan:
    """A local parameter filled by concatenating `slices` along dim 0 (then zero padding rows)."""

    param: str
    slices: tuple[TensorSlice, ...]


def local_heads(cfg: ModelConfig, rank: int, tp: int) -> tuple[int, int, int]:
    """(num local q heads, num local kv heads, first kv head index) for this rank."""
    hq = cfg.num_attention_heads // tp
    kv = cfg.num_key_value_heads
    if tp <= kv:
        hkv = kv // tp
        return hq, hkv, rank * hkv
    return hq, 1, rank * kv // tp  # replicated KV head (vLLM)


def shard_plan(cfg: ModelConfig, rank: int, tp: int) -> list[ParamPlan]:
    H, D, inter, V = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    hq, hkv, kv0 = local_heads(cfg, rank, tp)
    il = inter // tp
    q_rows = cfg.num_attention_heads * D
    kv_rows = cfg.num_key_value_heads * D
    v0, v1, _ = vocab_shard(V, rank, tp)

    def rows(name: str, shape: tuple[int, ...], a: int, b: int) -> TensorSlice:
        return TensorSlice(name, shape, 0, a, b)

    def cols(name: str, shape: tuple[int, ...], a: int, b: int) -> TensorSlice:
        return TensorSlice(name, shape, 1, a, b)

    plan = [ParamPlan("embed.weight", (rows("model.embed_tokens.weight", (V, H), v0, v1),))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q0 = rank * hq * D
        plan += [
            ParamPlan(
                f"layers.{i}.attn.qkv.weight",
                (
                    rows(p + "self_attn.q_proj.weight", (q_rows, H), q0, q0 + hq * D),
                    rows(p + "self_attn.k_proj.weight", (kv_rows, H), kv0 * D, (kv0 + hkv) * D),
                    rows(p + "self_attn.v_proj.weight", (kv_rows, H), kv0 * D, (kv0 + hkv) * D),
                ),
            ),
        ]
        if cfg.qkv_bias:  # biases are cut exactly like their weights' rows
            plan.append(
                ParamPlan(
                    f"layers.{i}.attn.qkv_bias",
                    (
                        rows(p + "self_attn.q_proj.bias", (q_rows,), q0, q0 + hq * D),
                        rows(p + "self_attn.k_proj.bias", (kv_rows,), kv0 * D, (kv0 + hkv) * D),
                        rows(p + "self_attn.v_proj.bias", (kv_rows,), kv0 * D, (kv0 + hkv) * D),
                    ),
                )
            )
        if cfg.qk_norm:  # per-head norms: one [head_dim] weight shared by every head, replicated
            plan += [
                ParamPlan(f"layers.{i}.attn.q_norm.weight", (TensorSlice(p + "self_attn.q_norm.weight", (D,)),)),
                ParamPlan(f"layers.{i}.attn.k_norm.weight", (TensorSlice(p + "self_attn.k_norm.weight", (D,)),)),
            ]
        plan += [
            ParamPlan(
                f"layers.{i}.attn.o_proj.weight",
                (cols(p + "self_attn.o_proj.weight", (H, q_rows), q0, q0 + hq * D),),
            ),
            ParamPlan(
                f"layers.{i}.mlp.gate_up.weight",
                (
                    rows(p + "mlp.gate_proj.weight", (inter, H), rank * il, (rank + 1) * il),
                    rows(p + "mlp.up_proj.weight", (inter, H), rank * il, (rank + 1) * il),
                ),
            ),
            ParamPlan(
                f"layers.{i}.mlp.down.weight",
                (cols(p + "mlp.down_proj.weight", (H, inter), rank * il, (rank + 1) * il),),
            ),
            ParamPlan(f"layers.{i}.input_norm.weight", (TensorSlice(p + "input_layernorm.weight", (H,)),)),
            ParamPlan(
                f"layers.{i}.post_attn_norm.weight",
                (TensorSlice(p + "post_attention_layernorm.weight", (H,)),),
            ),
        ]
    plan.append(ParamPlan("norm.weight", (TensorSlice("model.norm.weight", (H,)),)))
    if not cfg.tie_word_embeddings:
        plan.append(ParamPlan("lm_head.weight", (rows("lm_head.weight", (V, H), v0, v1),)))
    return plan
