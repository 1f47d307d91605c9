"""Llama-family decoder (Llama, Mistral, Qwen2/2.5, Qwen3) with tensor-parallel layers and a
paged KV cache. The families differ in three switches of ModelConfig: q/k/v biases (Qwen2),
per-head q/k RMSNorm (Qwen3) and a sliding attention window (Mistral).

The forward pass works on a flat, packed batch: N tokens from B sequences (prefill chunks of any
length and single-token decodes mixed), each token carrying its position, each sequence its block
table (kv_cache.py). Linear layers see one [N, hidden] matrix; only attention looks at sequence
boundaries. The cache of a layer is [num_blocks, BLOCK_SIZE, kv_heads, head_dim]: a token's K/V is
one row of its flattened view, and a sequence's keys are its blocks in table order (a view when
the blocks are contiguous, a gather otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dist import Dist
from .kv_cache import BLOCK_SIZE, SCRATCH_BLOCK, blocks_for, gather_cap_tokens
from .tp import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding, local_heads


@dataclass
class SeqKV:
    """Where one sequence's attended keys live: blocks [b0, b1) of its table, as a slice of the
    pool (contiguous blocks) or an index tensor (a gather). `seq`: its index in the batch."""

    seq: int
    b0: int
    index: slice | torch.Tensor


@dataclass
class DecodeBucket:
    """Decoding sequences attended together: their tokens' ``rows`` of the packed batch (None: all
    of it, in order), their [b, nb] block tables padded with the scratch block, and the
    [b, 1, 1, nb * BLOCK_SIZE] mask (causal, and windowed for sliding-window models)."""

    rows: torch.Tensor | None
    tables_t: torch.Tensor
    mask: torch.Tensor


def decode_buckets(ctx_lens: Sequence[int], max_tokens: int | None = None) -> list[list[int]]:
    """Batch rows grouped so that no row's keys are padded to more than twice its own blocks:
    one 4k-token sequence among short ones must not make every row gather and attend to 4k keys
    (that made each step of a batch of 9 take 4x as long). Rows by context length, in order.
    ``max_tokens``: no bucket gathers more keys (rows x its longest table's blocks x BLOCK_SIZE);
    a row alone may (kv_cache.gather_cap_tokens is never below one max_model_len sequence)."""
    order = sorted(range(len(ctx_lens)), key=lambda i: ctx_lens[i])
    buckets: list[list[int]] = []
    for i in order:
        nb = blocks_for(ctx_lens[i])  # the bucket's longest so far: rows come shortest first
        if (
            buckets
            and nb <= 2 * blocks_for(ctx_lens[buckets[-1][0]])
            and (max_tokens is None or (len(buckets[-1]) + 1) * nb * BLOCK_SIZE <= max_tokens)
        ):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


@dataclass
class BatchMeta:
    """Where each token of a packed batch goes.

    Sequence i owns tokens [seq_starts[i], +seq_lens[i]) of the batch; its last token is at
    position ctx_lens[i] - 1. Its cache blocks are block_tables[i], or (tests and tools on a
    slot-style cache, ``Transformer.setup_cache``) the blocks of slot seq_slots[i].
    """

    positions: torch.Tensor  # [N] long
    seq_slots: list[int]
    seq_starts: list[int]
    seq_lens: list[int]
    ctx_lens: list[int]
    last_token_idx: torch.Tensor  # [B] long: which tokens produce logits
    block_tables: list[Sequence[int]] | None = None
    # Filled by Transformer.prepare (once per step, shared by every layer):
    slot_mapping: torch.Tensor | None = None  # [N] rows of the flattened cache to write
    # Sequences attended one by one: prefill chunks, and a decode with no other decode beside it.
    seq_kv: list[SeqKV] = field(default_factory=list)
    # Two or more decoding sequences (a decode-only step, or the decodes beside prefill chunks),
    # attended batched, in buckets of similar context length (decode_buckets).
    decode_buckets: list[DecodeBucket] = field(default_factory=list)
    # Where every layer gathers the K and V blocks it attends to (`gather_blocks`), sized for the
    # step's largest gather; None when every sequence's blocks are a contiguous view.
    gather_scratch: tuple[torch.Tensor, torch.Tensor] | None = None
    prepared: bool = False

    @classmethod
    def build(cls, seqs: Sequence[tuple[int, int, int]], device: torch.device) -> BatchMeta:
        """seqs: (slot, first position, number of new tokens) per sequence, in batch order; for a
        cache set up by ``Transformer.setup_cache`` (one contiguous run of blocks per slot)."""
        return cls._make([(s, p, k) for s, p, k in seqs], None, device)

    @classmethod
    def paged(cls, seqs: Sequence[tuple[Sequence[int], int, int]], device: torch.device) -> BatchMeta:
        """seqs: (block table, first position, number of new tokens) per sequence, in batch order."""
        return cls._make([(-1, p, k) for _, p, k in seqs], [t for t, _, _ in seqs], device)

    @classmethod
    def _make(
        cls, seqs: list[tuple[int, int, int]], tables: list[Sequence[int]] | None, device: torch.device
    ) -> BatchMeta:
        positions: list[int] = []
        starts: list[int] = []
        lens: list[int] = []
        ctx: list[int] = []
        n = 0
        for _, pos0, k in seqs:
            positions.extend(range(pos0, pos0 + k))
            starts.append(n)
            lens.append(k)
            ctx.append(pos0 + k)
            n += k
        return cls(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            seq_slots=[s for s, _, _ in seqs],
            seq_starts=starts,
            seq_lens=lens,
            ctx_lens=ctx,
            last_token_idx=torch.tensor(
                [s + k - 1 for s, k in zip(starts, lens, strict=True)], dtype=torch.long, device=device
            ),
            block_tables=tables,
        )


def first_key(pos: int, window: int | None) -> int:
    """The first position a query at `pos` attends to (0 without a sliding window)."""
    return 0 if window is None else max(0, pos - window + 1)


def slot_mapping(tables: Sequence[Sequence[int]], seqs: Sequence[tuple[int, int]]) -> list[int]:
    """Cache rows (block * BLOCK_SIZE + offset) of each sequence's new tokens; seqs: (pos0, n)."""
    out: list[int] = []
    for table, (pos0, n) in zip(tables, seqs, strict=True):
        out.extend(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(pos0, pos0 + n))
    return out


def _contiguous(blocks: Sequence[int]) -> bool:
    return (
        len(blocks) > 0
        and blocks[-1] - blocks[0] == len(blocks) - 1
        and all(b == blocks[0] + i for i, b in enumerate(blocks))
    )


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
    def __init__(self, cfg: ModelConfig, dist: Dist, layer: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.hq, self.hkv, _ = local_heads(cfg, dist.rank, dist.world_size)
        self.d = cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(
            self.hq * self.d, cfg.hidden_size, dist, f"o_proj.{layer}", dtype=dtype, device=device
        )
        n_qkv = (self.hq + 2 * self.hkv) * self.d
        self.qkv_bias = (
            nn.Parameter(torch.empty(n_qkv, dtype=dtype, device=device), requires_grad=False) if cfg.qkv_bias else None
        )
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps, dtype=dtype, device=device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps, dtype=dtype, device=device) if cfg.qk_norm else None
        self.window = cfg.sliding_window
        self.k_cache: torch.Tensor | None = None  # [num_blocks, BLOCK_SIZE, hkv, d]
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
        assert kc is not None and vc is not None, "KV cache not allocated (Transformer.setup_paged_cache)"
        assert meta.slot_mapping is not None, "BatchMeta not prepared (Transformer.prepare)"
        kc.view(-1, self.hkv, self.d)[meta.slot_mapping] = k
        vc.view(-1, self.hkv, self.d)[meta.slot_mapping] = v
        gqa = self.hq != self.hkv
        # Every row of the batch in order: one bucket of them all is the output itself.
        whole = len(meta.decode_buckets) == 1 and meta.decode_buckets[0].rows is None
        o: torch.Tensor | None = None
        if not whole and not (len(meta.seq_kv) == 1 and not meta.decode_buckets):
            o = q.new_empty(n, self.hq, self.d)
        sk, sv = meta.gather_scratch or (None, None)  # where K/V blocks are gathered, if any are
        if meta.decode_buckets:
            # Batched decode: one query per sequence against its blocks, padded to the longest
            # table of its bucket; the mask hides padding, positions past each context and
            # outside the window.
            for bucket in meta.decode_buckets:
                b, nb = bucket.tables_t.shape
                assert sk is not None and sv is not None, "BatchMeta not prepared (Transformer.prepare)"
                keys = gather_blocks(kc, bucket.tables_t, sk).view(b, nb * BLOCK_SIZE, self.hkv, self.d).transpose(1, 2)
                vals = gather_blocks(vc, bucket.tables_t, sv).view(b, nb * BLOCK_SIZE, self.hkv, self.d).transpose(1, 2)
                qb = q if bucket.rows is None else q[bucket.rows]
                ob = F.scaled_dot_product_attention(qb.unsqueeze(2), keys, vals, attn_mask=bucket.mask, enable_gqa=gqa)
                if o is None:
                    o = ob
                else:
                    o[bucket.rows] = ob.squeeze(2)
        for skv in meta.seq_kv:
            s, t, ctx = meta.seq_starts[skv.seq], meta.seq_lens[skv.seq], meta.ctx_lens[skv.seq]
            qi = q[s : s + t].transpose(0, 1).unsqueeze(0)  # [1, hq, t, d]
            lo = first_key(ctx - t, self.window)  # keys before lo are outside every query's window
            keys, vals = _seq_keys(kc, skv, lo, ctx, sk), _seq_keys(vc, skv, lo, ctx, sv)
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
            if o is None:  # the step's one sequence
                o = oi[0].transpose(0, 1)
            else:
                o[s : s + t] = oi[0].transpose(0, 1)
        assert o is not None
        out: torch.Tensor = self.o_proj(o.reshape(n, self.hq * self.d))
        return out


def gather_blocks(pool: torch.Tensor, index: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """pool[index] for a tensor of block ids, as [index.numel(), BLOCK_SIZE, hkv, d], copied into
    the step's scratch. Not a fresh tensor per layer: the engine pins glibc's mmap threshold at
    1 MiB, so each gather above it (16 sequences of 200 tokens: 3.4 MB) was a new mapping whose
    pages faulted in again, ~1 ms a gather against ~0.05 ms into a buffer already touched; 24 of
    them made a quarter of a 16-sequence decode step on CPU."""
    out = scratch[: index.numel()]
    torch.index_select(pool, 0, index.view(-1), out=out)
    return out


def _seq_keys(pool: torch.Tensor, skv: SeqKV, lo: int, ctx: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """[1, hkv, ctx - lo, d]: positions [lo, ctx) of one sequence (a view for contiguous blocks)."""
    if isinstance(skv.index, slice):
        blocks = pool[skv.index]
    else:
        assert scratch is not None, "BatchMeta not prepared (Transformer.prepare)"
        blocks = gather_blocks(pool, skv.index, scratch)
    flat = blocks.view(-1, pool.shape[2], pool.shape[3])
    off = skv.b0 * BLOCK_SIZE
    return flat[lo - off : ctx - off].transpose(0, 1).unsqueeze(0)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dist: Dist, layer: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.il = cfg.intermediate_size // dist.world_size
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * self.il, dtype=dtype, device=device)
        self.down = RowParallelLinear(self.il, cfg.hidden_size, dist, f"down_proj.{layer}", dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.il, dim=-1)
        # In place: two fewer [tokens, intermediate] temporaries per layer in a long prefill.
        out: torch.Tensor = self.down(F.silu(gate, inplace=True).mul_(up))
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dist: Dist, layer: int, *, dtype: torch.dtype, device: torch.device) -> None:
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
        self.register_buffer("rot", rotate_half_matrix(cfg.head_dim, dtype=dtype, device=device), persistent=False)
        self.num_blocks = 0  # usable blocks (the scratch block not counted)
        self.max_len = 0
        self.gather_cap = 0  # keys one attention call gathers at most (kv_cache.gather_cap_tokens)
        self.slot_tables: list[list[int]] = []  # setup_cache only

    def setup_paged_cache(self, num_blocks: int, max_len: int) -> int:
        """Preallocate `num_blocks` usable blocks (+ the scratch block) per layer and the RoPE tables
        for positions < max_len; returns the cache size in bytes."""
        self.num_blocks, self.max_len = num_blocks, max_len
        self.gather_cap = gather_cap_tokens(max_len)
        nbytes = 0
        for blk in self.layers:
            assert isinstance(blk, Block)
            a = blk.attn
            a.k_cache = a.v_cache = None  # free the old pool before allocating the new one
            shape = (num_blocks + 1, BLOCK_SIZE, a.hkv, a.d)
            a.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            a.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            nbytes += 2 * a.k_cache.numel() * a.k_cache.element_size()
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(self.cfg))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.dtype).to(self.device)
        self.sin = emb.sin().to(self.dtype).to(self.device)
        return nbytes

    def setup_cache(self, num_slots: int, max_len: int) -> int:
        """A pool with one fixed, contiguous run of blocks per slot, for callers without a
        scheduler (tests, tools): ``BatchMeta.build`` then addresses sequences by slot."""
        per = blocks_for(max_len)
        nbytes = self.setup_paged_cache(num_slots * per, max_len)
        self.slot_tables = [list(range(1 + s * per, 1 + (s + 1) * per)) for s in range(num_slots)]
        return nbytes

    @property
    def num_slots(self) -> int:
        return len(self.slot_tables)

    def prepare(self, meta: BatchMeta) -> BatchMeta:
        """Compute the step's cache addressing once, for every layer: write rows, and per sequence
        its key blocks (or, for a batched decode, padded tables and a mask)."""
        if meta.prepared:
            return meta
        tables = meta.block_tables
        if tables is None:
            tables = meta.block_tables = [self.slot_tables[s] for s in meta.seq_slots]
        window = self.cfg.sliding_window
        pos0 = [c - k for c, k in zip(meta.ctx_lens, meta.seq_lens, strict=True)]
        dev = self.device
        rows = slot_mapping(tables, list(zip(pos0, meta.seq_lens, strict=True)))
        meta.slot_mapping = torch.tensor(rows, dtype=torch.long, device=dev)
        # Decodes are attended batched when there are two or more of them, also beside prefill
        # chunks: one call per bucket instead of one per sequence per layer.
        decoding = [i for i, k in enumerate(meta.seq_lens) if k == 1]
        if len(decoding) < 2:
            decoding = []
        ctx_of_decodes = [meta.ctx_lens[i] for i in decoding]
        groups = [[decoding[j] for j in g] for g in decode_buckets(ctx_of_decodes, self.gather_cap)]
        in_order = len(decoding) == len(tables)  # a decode-only step: a token per sequence, in order
        if in_order and len(groups) == 1:  # one batched call, rows in batch order
            groups = [decoding]
        for seqs in groups:
            ctx_lens = [meta.ctx_lens[i] for i in seqs]
            nb = max(blocks_for(c) for c in ctx_lens)
            padded = [[*t[:nb], *[SCRATCH_BLOCK] * (nb - len(t[:nb]))] for t in (tables[i] for i in seqs)]
            keys = torch.arange(nb * BLOCK_SIZE, device=dev)[None, :]
            ctx_t = torch.tensor(ctx_lens, dtype=torch.long, device=dev)[:, None]
            mask = keys < ctx_t
            if window is not None:  # the query at ctx - 1 sees keys ctx - window .. ctx - 1 only
                mask &= keys >= ctx_t - window
            token_rows = [meta.seq_starts[i] for i in seqs]
            meta.decode_buckets.append(DecodeBucket(
                rows=None if in_order and len(groups) == 1 else torch.tensor(token_rows, dtype=torch.long, device=dev),
                tables_t=torch.tensor(padded, dtype=torch.long, device=dev),
                mask=mask[:, None, None, :],
            ))  # fmt: skip
        batched = set(decoding)
        meta.seq_kv = []
        for i, (table, p0, ctx) in enumerate(zip(tables, pos0, meta.ctx_lens, strict=True)):
            if i in batched:
                continue
            b0 = first_key(p0, window) // BLOCK_SIZE
            blocks = list(table[b0 : blocks_for(ctx)])
            index: slice | torch.Tensor = (
                slice(blocks[0], blocks[-1] + 1)
                if _contiguous(blocks)
                else torch.tensor(blocks, dtype=torch.long, device=dev)
            )
            meta.seq_kv.append(SeqKV(i, b0, index))
        gathered = [b.tables_t.numel() for b in meta.decode_buckets]
        gathered += [s.index.numel() for s in meta.seq_kv if isinstance(s.index, torch.Tensor)]
        if gathered:
            attn = self.layers[0].attn
            assert isinstance(attn, Attention)
            shape = (max(gathered), BLOCK_SIZE, attn.hkv, attn.d)
            meta.gather_scratch = (
                torch.empty(shape, dtype=self.dtype, device=dev),
                torch.empty(shape, dtype=self.dtype, device=dev),
            )
        meta.prepared = True
        return meta

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """input_ids: [N] packed tokens. Returns float32 logits [B, vocab] for each sequence's last token."""
        return self.forward_keeping(input_ids, meta, None)[0]

    @torch.inference_mode()
    def forward_keeping(
        self, input_ids: torch.Tensor, meta: BatchMeta, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward``'s logits, and the final-normed hidden states of the packed tokens ``rows``
        (prompt logprobs: the caller projects them through ``lm_head`` a slice at a time, so their
        full-vocabulary logits never exist for a whole chunk at once)."""
        assert self.cos is not None and self.sin is not None, "call setup_paged_cache first"
        self.prepare(meta)
        cos = self.cos[meta.positions].unsqueeze(1)  # [N, 1, d], broadcast over heads
        sin = self.sin[meta.positions].unsqueeze(1)
        x = self.embed(input_ids)
        for blk in self.layers:
            x = blk(x, cos, sin, self.rot, meta)
        kept = self.norm(x[rows]) if rows is not None else None
        if x.shape[0] != len(meta.seq_lens):  # some sequence brought several tokens (prefill)
            x = x[meta.last_token_idx]
        x = self.norm(x)
        logits: torch.Tensor = self.lm_head(x)
        return logits.float(), kept
