"""Static-shape decode and its CUDA-graph capture/replay (gpt-fast / vLLM style).

Batch-1 decode of a 7B model in eager mode is launch-bound: ~1,000 small kernels per token, each
costing more host time than GPU time. A CUDA graph replays the whole step with one launch, but it
needs every shape, pointer and index fixed at capture time. So this path works on static buffers:

- Row i of a step is the step's i-th sequence, for rows [0, S), where S is the smallest batch
  bucket (1, 2, 4, 8, ..., max batch) holding the batch. Rows past the batch are padding: token 0
  at position 0 with a block table of the scratch block only (kv_cache.SCRATCH_BLOCK), so their
  K/V writes land in scratch space. Their logits are dropped.
- Attention gathers blocks [0, L / BLOCK_SIZE) of each row's block table (a static [max batch,
  max blocks] buffer the engine refills), where L is a context bucket (128, 256, ..., max_len
  rounded up to a block) above the longest context, with a mask built on the device from the
  positions (causal, and windowed for sliding-window models). Table entries past a context, or
  freed outside a sliding window, point at the scratch block and are masked.
- Rows attend in calls of at most ``gather_cap // L`` rows (kv_cache.gather_cap_tokens), so a
  step's gathered K/V has the same bound as on the eager path, whatever the batch.
- GQA without copies: the g query heads sharing a KV head become g "query rows" of that head, so
  SDPA sees equal head counts and can pick the memory-efficient kernel, which takes a mask.

`static_decode` is device-agnostic and runs eagerly on CPU (the tests compare it with the normal
eager path there); `DecodeGraphRunner` captures one graph per (S, L) bucket on first use and
replays it. Graphs are only used at TP=1: a captured step must not contain host work, and our
gloo / shared-memory collectives are host-side (NCCL ones could be captured, but a multi-rank
graph path is untested, so it stays off at TP > 1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .kv_cache import BLOCK_SIZE, SCRATCH_BLOCK, blocks_for
from .model import Transformer, apply_rope

log = logging.getLogger("tpi_runtime.cuda_graphs")

MIN_CTX_BUCKET = 128
MODES = ("auto", "on", "off")


def batch_buckets(max_slots: int) -> list[int]:
    """1, 2, 4, ... below max_slots, then max_slots itself."""
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 2
    return [*out, max_slots]


def ctx_bucket(needed: int, max_len: int) -> int:
    """Smallest of 128, 256, ... (capped at max_len) holding `needed` keys."""
    b = MIN_CTX_BUCKET
    while b < needed:
        b *= 2
    return min(b, max_len)


@torch.inference_mode()
def static_decode(
    model: Transformer,
    ids: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    tables: torch.Tensor,
) -> torch.Tensor:
    """One decode step for S rows: ids/positions/rows [S] (rows: the flattened-cache row each token's
    K/V goes to), tables [S, nb] block tables. Returns float32 logits [S, vocab].

    Same arithmetic as `Transformer.forward` (same modules, norms, RoPE and projections); only the
    attention call differs (a static gather + mask), so eager and static agree to rounding. No host
    syncs and no data-dependent shapes: safe to capture in a CUDA graph.
    """
    assert model.cos is not None and model.sin is not None, "call setup_paged_cache first"
    s, nb = tables.shape
    L = nb * BLOCK_SIZE
    cos = model.cos[positions].unsqueeze(1)
    sin = model.sin[positions].unsqueeze(1)
    # [S, 1, 1, L] additive mask: row i sees keys 0..positions[i] (and, windowed, its last
    # `window`). Built once per step in the model dtype, so SDPA does not convert a boolean mask
    # again in every layer (two more kernels per layer in a launch-bound step).
    keys = torch.arange(L, device=ids.device)[None, :]
    allowed = keys <= positions[:, None]
    window = model.cfg.sliding_window
    if window is not None:
        allowed &= keys > positions[:, None] - window
    mask = torch.full((s, L), float("-inf"), dtype=model.dtype, device=ids.device)
    mask = mask.masked_fill_(allowed, 0.0)[:, None, None, :]
    rows_per_call = max(1, model.gather_cap // L)  # L <= max_len <= gather_cap: at least 1
    x = model.embed(ids)
    for blk in model.layers:
        a = blk.attn
        hq, hkv, d = a.hq, a.hkv, a.d
        qkv = a.qkv(blk.input_norm(x))
        if a.qkv_bias is not None:
            qkv = qkv + a.qkv_bias
        n_qk = (hq + hkv) * d
        qk = qkv[:, :n_qk].view(s, hq + hkv, d)
        if a.q_norm is not None and a.k_norm is not None:
            qk = torch.cat((a.q_norm(qk[:, :hq]), a.k_norm(qk[:, hq:])), dim=1)
        qk = apply_rope(qk, cos, sin, model.rot)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, n_qk:].view(s, hkv, d)
        kc, vc = a.k_cache, a.v_cache
        assert kc is not None and vc is not None
        kc.view(-1, hkv, d)[rows] = k
        vc.view(-1, hkv, d)[rows] = v
        # Query head h uses KV head h // g (transformers' repeat_kv order): view the g heads of a
        # group as g query rows of one head, so no K/V is repeated and SDPA needs no GQA support.
        # At most `rows_per_call` rows a call: no gather above the model's gather_cap.
        qg = q.reshape(s, hkv, hq // hkv, d)
        parts = [
            F.scaled_dot_product_attention(
                qg[r : r + rows_per_call],
                kc[tables[r : r + rows_per_call]].view(-1, L, hkv, d).transpose(1, 2),
                vc[tables[r : r + rows_per_call]].view(-1, L, hkv, d).transpose(1, 2),
                attn_mask=mask[r : r + rows_per_call],
            )
            for r in range(0, s, rows_per_call)
        ]
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        x = x + a.o_proj(o.reshape(s, hq * d))
        x = x + blk.mlp(blk.post_attn_norm(x))
    return model.lm_head(model.norm(x)).float()


class DecodeGraphRunner:
    """Runs decode-only steps through `static_decode`: replayed from CUDA graphs when `capture`
    (CUDA only), eagerly otherwise (CPU tests, or a bucket whose capture failed).

    Call with the step's token ids, (slot or -1, pos0, 1) per sequence and each sequence's block
    table (None: the model's slot tables, ``Transformer.setup_cache``); returns float32 logits
    [B, vocab] in batch order. `max_batch`: the most sequences a step holds (default: the slots).
    """

    def __init__(self, model: Transformer, *, capture: bool, max_batch: int | None = None) -> None:
        if capture and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.capture = capture
        self.max_rows = max_batch or model.num_slots
        self.max_len = model.max_len
        assert self.max_rows > 0 and self.max_len > 0, "call setup_paged_cache first"
        dev = model.device
        # Static inputs: every graph reads a prefix of these, so replay only refills them.
        self.max_blocks = blocks_for(self.max_len)
        self.ids = torch.zeros(self.max_rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.max_rows, dtype=torch.long, device=dev)
        self.rows = torch.zeros(self.max_rows, dtype=torch.long, device=dev)
        self.tables = torch.full((self.max_rows, self.max_blocks), SCRATCH_BLOCK, dtype=torch.long, device=dev)
        self.buckets = batch_buckets(self.max_rows)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: set[tuple[int, int]] = set()  # buckets that run eagerly (capture failed)
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # one pool for all graphs
        # One warm-up stream for every capture: the caching allocator keeps freed blocks per stream,
        # so a fresh stream per capture would strand a step's activations each time.
        self.side = torch.cuda.Stream(model.device) if capture else None
        self.replays = 0

    def bucket(self, seqs: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
        """(batch bucket, context bucket in blocks)."""
        s = next(b for b in self.buckets if b >= len(seqs))
        return s, blocks_for(ctx_bucket(max(pos0 for _, pos0, _ in seqs) + 1, self.max_len))

    def __call__(
        self,
        ids: Sequence[int],
        seqs: Sequence[tuple[int, int, int]],
        tables: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        assert all(n == 1 for _, _, n in seqs), "decode-only steps"
        if tables is None:
            tables = [self.model.slot_tables[slot] for slot, _, _ in seqs]
        s, nb = self.bucket(seqs)
        b = len(seqs)
        pad = s - b  # padding rows: token 0 at position 0, written to the scratch block's row 0
        host_pos = [pos0 for _, pos0, _ in seqs] + [0] * pad
        host_rows = [
            table[pos0 // BLOCK_SIZE] * BLOCK_SIZE + pos0 % BLOCK_SIZE
            for (_, pos0, _), table in zip(seqs, tables, strict=True)
        ] + [SCRATCH_BLOCK * BLOCK_SIZE] * pad
        # Real rows' tables only: entries past a context (and padding rows' tables) may be stale
        # from an earlier step, but they are valid block ids and masked, and nothing writes there.
        host_tables = [[*t[:nb], *[SCRATCH_BLOCK] * (nb - len(t[:nb]))] for t in tables]
        self.ids[:s].copy_(torch.tensor([*ids, *[0] * pad], dtype=torch.long), non_blocking=True)
        self.positions[:s].copy_(torch.tensor(host_pos, dtype=torch.long), non_blocking=True)
        self.rows[:s].copy_(torch.tensor(host_rows, dtype=torch.long), non_blocking=True)
        self.tables[:b, :nb].copy_(torch.tensor(host_tables, dtype=torch.long), non_blocking=True)
        out = self._run(s, nb)
        return out[:b].clone()  # a fresh tensor: the next replay overwrites `out`

    def _args(self, s: int, nb: int) -> tuple[Transformer, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.model, self.ids[:s], self.positions[:s], self.rows[:s], self.tables[:s, :nb])

    def _run(self, s: int, nb: int) -> torch.Tensor:
        key = (s, nb)
        if not self.capture or key in self.failed:
            return static_decode(*self._args(s, nb))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(s, nb)
            if entry is None:
                return static_decode(*self._args(s, nb))
        graph, out = entry
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, s: int, nb: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        args = self._args(s, nb)
        try:
            # Warm up on a side stream first (cuBLAS workspaces, SDPA kernel choice), as the
            # PyTorch docs require. The warm-up writes this step's K/V for real; the replay below
            # writes the same values to the same places, so running it twice is harmless.
            side = self.side
            assert side is not None
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    static_decode(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the server's other threads may call CUDA APIs while this one captures.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = static_decode(*args)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise  # the engine's OOM recovery (free, halve, retry) handles it; retried next time
        except Exception:
            log.exception("CUDA graph capture failed for batch bucket %d, %d context blocks: running it eagerly", s, nb)
            self.failed.add((s, nb))
            return None
        self.graphs[(s, nb)] = (graph, out)
        log.info("captured decode CUDA graph: batch bucket %d, %d context blocks (%d graphs)", s, nb, len(self.graphs))
        return graph, out


def make_decode_runner(
    model: Transformer, mode: str, world_size: int, max_batch: int | None = None
) -> DecodeGraphRunner | None:
    """The engine's decode runner for `--cuda-graphs auto|on|off`.

    auto: graphs on CUDA at TP=1, else plain eager (None). on: the same, except on CPU it runs the
    static-shape path eagerly (no graphs exist there; this exercises the path in CPU tests).
    off: None. TP > 1 is always None: see the module docstring.
    """
    if mode not in MODES:
        raise ValueError(f"cuda_graphs must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off" or world_size > 1:
        if mode == "on" and world_size > 1:
            log.warning("--cuda-graphs on ignored: decode graphs are TP=1 only (world size %d)", world_size)
        return None
    cuda = model.device.type == "cuda"
    if mode == "auto" and not cuda:
        return None
    return DecodeGraphRunner(model, capture=cuda, max_batch=max_batch)
