"""Llama-family decoder (Llama, Mistral, Qwen2/2.5, Qwen3) with tensor-parallel layers and a
slot-based KV cache. The families differ in three switches of ModelConfig: q/k/v biases (Qwen2),
per-head q/k RMSNorm (Qwen3) and a sliding attention window (Mistral).

The forward pass works on a flat, packed batch: N tokens from B sequences (prefills of any length
and single-token decodes mixed), each token carrying its position and its sequence's cache slot.
Linear layers see one [N, hidden] matrix; only attention looks at sequence boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dist import Dist
from .tp import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding, local_heads


@dataclass
class BatchMeta:
    """Where each token of a packed batch goes.

    seq_slots[i], seq_starts[i], seq_lens[i]: sequence i owns tokens [start, start+len) of the
    batch and cache slot `slot`; its last token is at position ctx_lens[i] - 1.
    """

    positions: torch.Tensor  # [N] long
    token_slots: torch.Tensor  # [N] long
    seq_slots: list[int]
    seq_starts: list[int]
    seq_lens: list[int]
    ctx_lens: list[int]
    last_token_idx: torch.Tensor  # [B] long: which tokens produce logits
    decode_only: bool
    # Decode fast path only: [B] slots and [B, 1, 1, max_ctx] attention mask (None when B == 1).
    slots_t: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None
    # decode_mask restricted to each sequence's last `window` keys (set by Transformer.forward).
    window_mask: torch.Tensor | None = None

    @classmethod
    def build(cls, seqs: list[tuple[int, int, int]], device: torch.device) -> BatchMeta:
        """seqs: (slot, first position, number of new tokens) per sequence, in batch order."""
        positions: list[int] = []
        token_slots: list[int] = []
        starts: list[int] = []
        lens: list[int] = []
        ctx: list[int] = []
        n = 0
        for slot, pos0, k in seqs:
            positions.extend(range(pos0, pos0 + k))
            token_slots.extend([slot] * k)
            starts.append(n)
            lens.append(k)
            ctx.append(pos0 + k)
            n += k
        decode_only = all(k == 1 for k in lens)
        meta = cls(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            token_slots=torch.tensor(token_slots, dtype=torch.long, device=device),
            seq_slots=[s for s, _, _ in seqs],
            seq_starts=starts,
            seq_lens=lens,
            ctx_lens=ctx,
            last_token_idx=torch.tensor(
                [s + k - 1 for s, k in zip(starts, lens, strict=True)], dtype=torch.long, device=device
            ),
            decode_only=decode_only,
        )
        if decode_only and len(seqs) > 1:
            meta.slots_t = torch.tensor(meta.seq_slots, dtype=torch.long, device=device)
            ctx_t = torch.tensor(ctx, dtype=torch.long, device=device)
            meta.decode_mask = (torch.arange(max(ctx), device=device)[None, :] < ctx_t[:, None])[
                :, None, None, :
            ]
        return meta


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, matching transformers' rope_type default / linear / llama3."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling or {}
    if cfg.rope_type == "linear":
        inv = inv / float(rs["factor"])
    elif cfg.rope_type == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.shape = (dim,)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        # Like transformers: normalise in float32, then scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)


def rotate_half_matrix(d: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """P with x @ P == cat(-x[d/2:], x[:d/2]) (transformers' rotate_half), exactly: each output
    is one input times +-1. One matmul instead of chunk / neg / cat, which matters in decode,
    where every small op costs more than its arithmetic."""
    h = d // 2
    p = torch.zeros(d, d, dtype=dtype, device=device)
    p[torch.arange(h), torch.arange(h) + h] = 1
    p[torch.arange(h) + h, torch.arange(h)] = -1
    return p


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, for x [N, heads, d] and cos/sin [N, 1, d]."""
    if x.dtype == torch.float32:
        return torch.addcmul(x * cos, x @ rot, sin)
    # bf16/fp16: round both products to the model dtype before the sum, as transformers does;
    # addcmul would keep rotate_half(x) * sin unrounded and drift from it by up to an ulp.
    return x * cos + (x @ rot) * sin


class Attention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, dist: Dist, layer: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.hq, self.hkv, _ = local_heads(cfg, dist.rank, dist.world_size)
        self.d = cfg.head_dim
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, dtype=dtype, device=device
        )
        self.o_proj = RowParallelLinear(
            self.hq * self.d, cfg.hidden_size, dist, f"o_proj.{layer}", dtype=dtype, device=device
        )
        n_qkv = (self.hq + 2 * self.hkv) * self.d
        self.qkv_bias = (
            nn.Parameter(torch.empty(n_qkv, dtype=dtype, device=device), requires_grad=False)
            if cfg.qkv_bias
            else None
        )
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps, dtype=dtype, device=device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps, dtype=dtype, device=device) if cfg.qk_norm else None
        self.window = cfg.sliding_window
        self.k_cache: torch.Tensor | None = None  # [slots, hkv, max_len, d]
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor, meta: BatchMeta
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        n_qk = (self.hq + self.hkv) * self.d
        qk = qkv[:, :n_qk].view(n, self.hq + self.hkv, self.d)
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.hq]), self.k_norm(qk[:, self.hq :])), dim=1)
        # RoPE on the q and k heads at once: they are adjacent in the fused qkv output.
        qk = apply_rope(qk, cos, sin, rot)
        q, k = qk[:, : self.hq], qk[:, self.hq :]
        v = qkv[:, n_qk:].view(n, self.hkv, self.d)
        kc, vc = self.k_cache, self.v_cache
        assert kc is not None and vc is not None, "KV cache not allocated (Transformer.setup_cache)"
        gqa = self.hq != self.hkv
        if n == 1:
            # One sequence decoding one token: plain indexing and views only. Decode is a handful
            # of small ops per layer, each costing more than its arithmetic, so they are few.
            slot, ctx = meta.seq_slots[0], meta.ctx_lens[0]
            kc[slot, :, ctx - 1] = k[0]
            vc[slot, :, ctx - 1] = v[0]
            lo = self._first_key(ctx - 1)
            o = F.scaled_dot_product_attention(
                q.view(1, self.hq, 1, self.d),
                kc[slot : slot + 1, :, lo:ctx],
                vc[slot : slot + 1, :, lo:ctx],
                enable_gqa=gqa,
            )
            out: torch.Tensor = self.o_proj(o.view(1, self.hq * self.d))
            return out
        kc[meta.token_slots, :, meta.positions] = k
        vc[meta.token_slots, :, meta.positions] = v
        if meta.decode_only and meta.slots_t is not None:
            # Batched decode: one query per sequence against its slot's cache, padded to max ctx.
            L = max(meta.ctx_lens)
            keys, vals = kc[meta.slots_t, :, :L], vc[meta.slots_t, :, :L]
            o = F.scaled_dot_product_attention(
                q.unsqueeze(2),
                keys,
                vals,
                attn_mask=meta.window_mask if self.window else meta.decode_mask,
                enable_gqa=gqa,
            )
            o = o.reshape(n, self.hq * self.d)
        else:
            outs = []
            for slot, s, t, ctx in zip(
                meta.seq_slots, meta.seq_starts, meta.seq_lens, meta.ctx_lens, strict=True
            ):
                qi = q[s : s + t].transpose(0, 1).unsqueeze(0)  # [1, hq, t, d]
                lo = self._first_key(ctx - t)  # keys before lo are outside every query's window
                keys, vals = kc[slot, :, lo:ctx].unsqueeze(0), vc[slot, :, lo:ctx].unsqueeze(0)  # views
                if t == 1:
                    oi = F.scaled_dot_product_attention(qi, keys, vals, enable_gqa=gqa)
                elif t == ctx and (self.window is None or ctx <= self.window):
                    oi = F.scaled_dot_product_attention(qi, keys, vals, is_causal=True, enable_gqa=gqa)
                else:  # query i sees keys up to its position (and, windowed, its last `window`)
                    pos = meta.positions[s : s + t]
                    key_pos = torch.arange(lo, ctx, device=x.device)[None, :]
                    mask = key_pos <= pos[:, None]
                    if self.window is not None:
                        mask &= key_pos > pos[:, None] - self.window
                    oi = F.scaled_dot_product_attention(qi, keys, vals, attn_mask=mask, enable_gqa=gqa)
                outs.append(oi[0].transpose(0, 1).reshape(t, self.hq * self.d))
            o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        out = self.o_proj(o)
        return out

    def _first_key(self, pos: int) -> int:
        """The first cached position a query at `pos` attends to (0 without a sliding window)."""
        return 0 if self.window is None else max(0, pos - self.window + 1)


class MLP(nn.Module):
    def __init__(
        self, cfg: ModelConfig, dist: Dist, layer: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.il = cfg.intermediate_size // dist.world_size
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * self.il, dtype=dtype, device=device)
        self.down = RowParallelLinear(
            self.il, cfg.hidden_size, dist, f"down_proj.{layer}", dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.il, dim=-1)
        # In place: two fewer [tokens, intermediate] temporaries per layer in a long prefill.
        out: torch.Tensor = self.down(F.silu(gate, inplace=True).mul_(up))
        return out


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, dist: Dist, layer: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, dist, layer, **kw)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, dist, layer, **kw)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor, meta: BatchMeta
    ) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, rot, meta)
        out: torch.Tensor = x + self.mlp(self.post_attn_norm(x))
        return out


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, dist: Dist, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.cfg = cfg
        self.dist = dist
        self.dtype = dtype
        self.device = device
        self.embed = VocabParallelEmbedding(cfg, dist, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            Block(cfg, dist, i, dtype=dtype, device=device) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = ParallelLMHead(
            cfg, dist, dtype=dtype, device=device, tied=self.embed if cfg.tie_word_embeddings else None
        )
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.register_buffer(
            "rot", rotate_half_matrix(cfg.head_dim, dtype=dtype, device=device), persistent=False
        )
        self.num_slots = 0
        self.max_len = 0

    def setup_cache(self, num_slots: int, max_len: int) -> int:
        """Preallocate the KV cache and RoPE tables; returns the cache size in bytes."""
        self.num_slots, self.max_len = num_slots, max_len
        nbytes = 0
        for blk in self.layers:
            assert isinstance(blk, Block)
            a = blk.attn
            shape = (num_slots, a.hkv, max_len, a.d)
            a.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            a.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            nbytes += 2 * a.k_cache.numel() * a.k_cache.element_size()
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(self.cfg))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.dtype).to(self.device)
        self.sin = emb.sin().to(self.dtype).to(self.device)
        return nbytes

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """input_ids: [N] packed tokens. Returns float32 logits [B, vocab] for each sequence's last token."""
        assert self.cos is not None and self.sin is not None, "call setup_cache first"
        window = self.cfg.sliding_window
        if window is not None and meta.decode_mask is not None and meta.window_mask is None:
            # Batched decode: the query at ctx - 1 sees keys ctx - window .. ctx - 1 only.
            ctx = torch.tensor(meta.ctx_lens, device=self.device)
            recent = torch.arange(meta.decode_mask.shape[-1], device=self.device)[None, :] >= (ctx - window)[:, None]
            meta.window_mask = meta.decode_mask & recent[:, None, None, :]
        cos = self.cos[meta.positions].unsqueeze(1)  # [N, 1, d], broadcast over heads
        sin = self.sin[meta.positions].unsqueeze(1)
        x = self.embed(input_ids)
        for blk in self.layers:
            x = blk(x, cos, sin, self.rot, meta)
        if x.shape[0] != len(meta.seq_lens):  # some sequence brought several tokens (prefill)
            x = x[meta.last_token_idx]
        x = self.norm(x)
        logits: torch.Tensor = self.lm_head(x)
        return logits.float()
