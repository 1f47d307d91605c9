"""Static-shape decode and its CUDA-graph capture/replay (gpt-fast / vLLM style).

Batch-1 decode of a 7B model in eager mode is launch-bound: ~1,000 small kernels per token, each
costing more host time than GPU time. A CUDA graph replays the whole step with one launch, but it
needs every shape, pointer and index fixed at capture time. So this path is *slot-major*:

- Row i of a step is KV-cache slot i, for slots [0, S), where S is the smallest batch bucket
  (1, 2, 4, 8, ..., max slots) above the highest slot in the batch. Rows whose slot is not in the
  batch are padding: token 0 at position max_len - 1, a cache position no live sequence uses (the
  engine finishes a sequence once it holds max_model_len tokens, so the last position it caches
  is max_model_len - 2), so their K/V writes land in scratch space. Their logits are dropped.
- Attention reads keys [0, L) of slots [0, S) as a plain view of the cache (no per-step gather
  of the running slots, unlike the eager batched decode), where L is a context bucket (128, 256,
  ..., max_len) above the longest context, with a mask built on the device from the positions.
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
def static_decode(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One decode step for slots [0, S): ids/positions [S] (row i = slot i), keys = arange(L) on the
    device. Writes each row's K/V at its position and returns float32 logits [S, vocab].

    Same arithmetic as `Transformer.forward` (same modules, norms, RoPE and projections); only the
    attention call differs (cache view + mask instead of a gather), so eager and static agree to
    rounding. No host syncs and no data-dependent shapes: safe to capture in a CUDA graph.
    """
    assert model.cos is not None and model.sin is not None, "call setup_cache first"
    s = ids.shape[0]
    rows = torch.arange(s, device=ids.device)
    cos = model.cos[positions].unsqueeze(1)
    sin = model.sin[positions].unsqueeze(1)
    # [S, 1, 1, L] additive mask: row i sees keys 0..positions[i] (padding rows see all L; their
    # outputs are dropped). Built once per step in the model dtype, so SDPA does not convert a
    # boolean mask again in every layer (two more kernels per layer in a launch-bound step).
    L = keys.shape[0]
    allowed = keys[None, :] <= positions[:, None]
    mask = torch.full((s, L), float("-inf"), dtype=model.dtype, device=ids.device)
    mask = mask.masked_fill_(allowed, 0.0)[:, None, None, :]
    x = model.embed(ids)
    for blk in model.layers:
        a = blk.attn
        hq, hkv, d = a.hq, a.hkv, a.d
        qkv = a.qkv(blk.input_norm(x))
        n_qk = (hq + hkv) * d
        qk = apply_rope(qkv[:, :n_qk].view(s, hq + hkv, d), cos, sin, model.rot)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, n_qk:].view(s, hkv, d)
        kc, vc = a.k_cache, a.v_cache
        assert kc is not None and vc is not None
        kc[rows, :, positions] = k
        vc[rows, :, positions] = v
        # Query head h uses KV head h // g (transformers' repeat_kv order): view the g heads of a
        # group as g query rows of one head, so no K/V is repeated and SDPA needs no GQA support.
        o = F.scaled_dot_product_attention(
            q.reshape(s, hkv, hq // hkv, d), kc[:s, :, :L], vc[:s, :, :L], attn_mask=mask
        )
        x = x + a.o_proj(o.reshape(s, hq * d))
        x = x + blk.mlp(blk.post_attn_norm(x))
    return model.lm_head(model.norm(x)).float()


class DecodeGraphRunner:
    """Runs decode-only steps through `static_decode`: replayed from CUDA graphs when `capture`
    (CUDA only), eagerly otherwise (CPU tests, or a bucket whose capture failed).

    Call with the engine's step: token ids and (slot, pos0, 1) per sequence; returns float32
    logits [B, vocab] in batch order.
    """

    def __init__(self, model: Transformer, *, capture: bool) -> None:
        if capture and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.capture = capture
        self.max_slots, self.max_len = model.num_slots, model.max_len
        assert self.max_slots > 0, "call setup_cache first"
        dev = model.device
        # Static inputs: every graph reads a prefix of these, so replay only refills them.
        self.ids = torch.zeros(self.max_slots, dtype=torch.long, device=dev)
        self.positions = torch.full((self.max_slots,), self.max_len - 1, dtype=torch.long, device=dev)
        self.keys = torch.arange(self.max_len, device=dev)
        self.buckets = batch_buckets(self.max_slots)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: set[tuple[int, int]] = set()  # buckets that run eagerly (capture failed)
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # one pool for all graphs
        # One warm-up stream for every capture: the caching allocator keeps freed blocks per stream,
        # so a fresh stream per capture would strand a step's activations each time.
        self.side = torch.cuda.Stream(model.device) if capture else None
        self.replays = 0

    def bucket(self, seqs: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
        top_slot = max(slot for slot, _, _ in seqs)
        s = next(b for b in self.buckets if b > top_slot)
        return s, ctx_bucket(max(pos0 for _, pos0, _ in seqs) + 1, self.max_len)

    def __call__(self, ids: Sequence[int], seqs: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        assert all(n == 1 for _, _, n in seqs), "decode-only steps"
        s, L = self.bucket(seqs)
        host_ids = [0] * s
        host_pos = [self.max_len - 1] * s  # padding rows: the scratch position
        for t, (slot, pos0, _) in zip(ids, seqs, strict=True):
            host_ids[slot], host_pos[slot] = t, pos0
        self.ids[:s].copy_(torch.tensor(host_ids, dtype=torch.long), non_blocking=True)
        self.positions[:s].copy_(torch.tensor(host_pos, dtype=torch.long), non_blocking=True)
        rows = torch.tensor([slot for slot, _, _ in seqs], dtype=torch.long, device=self.model.device)
        out = self._run(s, L)
        return out.index_select(0, rows)  # a fresh tensor: the next replay overwrites `out`

    def _run(self, s: int, L: int) -> torch.Tensor:
        key = (s, L)
        if not self.capture or key in self.failed:
            return static_decode(self.model, self.ids[:s], self.positions[:s], self.keys[:L])
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(s, L)
            if entry is None:
                return static_decode(self.model, self.ids[:s], self.positions[:s], self.keys[:L])
        graph, out = entry
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, s: int, L: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        args = (self.model, self.ids[:s], self.positions[:s], self.keys[:L])
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
            log.exception("CUDA graph capture failed for batch bucket %d, context %d: running it eagerly", s, L)
            self.failed.add((s, L))
            return None
        self.graphs[(s, L)] = (graph, out)
        log.info("captured decode CUDA graph: batch bucket %d, context bucket %d (%d graphs)", s, L, len(self.graphs))
        return graph, out


def make_decode_runner(model: Transformer, mode: str, world_size: int) -> DecodeGraphRunner | None:
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
    return DecodeGraphRunner(model, capture=cuda)
