"""The static-shape decode path (what CUDA graphs capture) against the normal eager path, on CPU
in float32: same greedy tokens, token for token, at batch 1 and at a partial bucket with padding
rows; and through the engine with `cuda_graphs="on"` (static path, eager on CPU)."""

from __future__ import annotations

import pytest
import torch
from tpi_runtime.config import ModelConfig
from tpi_runtime.cuda_graphs import DecodeGraphRunner, batch_buckets, ctx_bucket, make_decode_runner
from tpi_runtime.dist import Dist, DistEnv
from tpi_runtime.loader import load_weights
from tpi_runtime.model import BatchMeta, Transformer, decode_buckets
from tpi_runtime.testing import load_hf_model

from .rank_worker import PROMPTS
from .test_engine import hf_greedy, run_scenario

STEPS = 24
MAX_LEN = 160  # > 128: decode crosses from the 128 context bucket into max_len


def build(model_dir: str, slots: int) -> Transformer:
    cfg = ModelConfig.from_pretrained(model_dir)
    cpu = torch.device("cpu")
    model = Transformer(cfg, Dist(DistEnv(0, 1, 0, "127.0.0.1", 0)), dtype=torch.float32, device=cpu)
    load_weights(model, model_dir, cfg, 0, 1)
    model.setup_cache(num_slots=slots, max_len=MAX_LEN)
    return model


def prompts(n: int) -> list[list[int]]:
    # Different lengths, so rows sit at different positions; the first crosses 128 while decoding.
    lens = [110, 7, 33, 20, 51][:n]
    return [[1, *((11 + 7 * i + 3 * j) % 250 for j in range(k - 1))] for i, k in enumerate(lens)]


def generate(model: Transformer, slots: list[int], runner: DecodeGraphRunner | None) -> list[list[int]]:
    """Prefill each prompt eagerly into its slot, then greedy batched decode (eager or static)."""
    ps = prompts(len(slots))
    toks: list[list[int]] = []
    for slot, p in zip(slots, ps, strict=True):
        logits = model(torch.tensor(p), BatchMeta.build([(slot, 0, len(p))], model.device))
        toks.append([int(logits[0].argmax())])
    for step in range(STEPS - 1):
        seqs = [(slot, len(p) + step, 1) for slot, p in zip(slots, ps, strict=True)]
        ids = [t[-1] for t in toks]
        eager = runner is None
        logits = model(torch.tensor(ids), BatchMeta.build(seqs, model.device)) if eager else runner(ids, seqs)
        for t, row in zip(toks, logits, strict=True):
            t.append(int(row.argmax()))
    return toks


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert ctx_bucket(1, 4096) == 128
    assert ctx_bucket(129, 4096) == 256
    assert ctx_bucket(300, 160) == 160


@pytest.mark.parametrize(
    "slots",
    [[0], [3], [0, 2, 5]],
    # [3]: batch 1 in bucket 4, rows 0-2 padding; [0, 2, 5]: 3 sequences in bucket 6 (of 6 slots).
    ids=["batch1", "batch1-slot3", "partial-bucket"],
)
def test_static_decode_matches_eager(ckpt_main: str, slots: list[int]) -> None:
    eager = generate(build(ckpt_main, 6), slots, None)
    model = build(ckpt_main, 6)
    runner = DecodeGraphRunner(model, capture=False)
    static = generate(model, slots, runner)
    assert static == eager


def test_static_decode_logits_close(ckpt_main: str) -> None:
    """Logits, not just argmax: padding rows must not leak into real rows."""
    a, b = build(ckpt_main, 4), build(ckpt_main, 4)
    runner = DecodeGraphRunner(b, capture=False)
    p = prompts(2)
    for m in (a, b):
        for slot, q in zip((1, 2), p, strict=True):
            m(torch.tensor(q), BatchMeta.build([(slot, 0, len(q))], m.device))
    seqs = [(1, len(p[0]), 1), (2, len(p[1]), 1)]
    ref = a(torch.tensor([5, 9]), BatchMeta.build(seqs, a.device))
    got = runner([5, 9], seqs)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


def test_runner_modes(ckpt_main: str) -> None:
    model = build(ckpt_main, 2)
    assert make_decode_runner(model, "auto", 1) is None  # CPU: eager stays the default
    assert make_decode_runner(model, "off", 1) is None
    assert make_decode_runner(model, "on", 2) is None  # TP > 1: never
    runner = make_decode_runner(model, "on", 1)
    assert runner is not None and not runner.capture
    with pytest.raises(ValueError):
        make_decode_runner(model, "sometimes", 1)
    with pytest.raises(ValueError):
        DecodeGraphRunner(model, capture=True)  # graphs need CUDA


def test_engine_static_decode_matches_transformers(ckpt_main: str) -> None:
    """The engine hook: every decode-only step goes through the runner (cuda_graphs="on" on CPU),
    concurrent and staggered requests included; tokens equal transformers' greedy ones."""
    res = run_scenario(ckpt_main, "batching", tp=1, env={"T_CUDA_GRAPHS": "on"})[0]
    assert res["static_decode"] and res["max_running"] >= 2
    hf = load_hf_model(ckpt_main)
    for i, prompt in enumerate(PROMPTS):
        ref, reason = hf_greedy(hf, prompt, 12 + 3 * i)
        for mode in ("sequential", "concurrent", "staggered"):
            assert res[mode][i]["tokens"] == ref, f"{mode} request {i}"
            assert res[mode][i]["finish"] == reason


def test_engine_static_decode_fake_oom_recovers(ckpt_main: str) -> None:
    env = {"TPI_FAKE_OOM_AT_BATCH": "2", "T_MAX_BATCH": "8", "T_CUDA_GRAPHS": "on"}
    res = run_scenario(ckpt_main, "oom", tp=1, env=env)[0]
    assert res["static_decode"]
    assert res["stats"]["oom_count"] >= 1 and res["stats"]["effective_batch_size"] <= 2
    for c, s in zip(res["concurrent"], res["sequential"], strict=True):
        assert c == s and len(c["tokens"]) > 0


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_static_decode_matches_eager_for_every_family(ckpt_families: dict[str, str], family: str) -> None:
    """The static path applies what sets each family apart, as the eager one does: Mistral's window
    (7, far shorter than these contexts), Qwen2's q/k/v biases, Qwen3's per-head q/k norms."""
    d = ckpt_families[family]
    slots = [0, 2, 5]
    eager = generate(build(d, 6), slots, None)
    model = build(d, 6)
    assert generate(model, slots, DecodeGraphRunner(model, capture=False)) == eager


def test_decode_rows_are_bucketed_by_context_length() -> None:
    # blocks of 16: 1, 256, 3, 19, 2 -> no row padded to more than twice its own blocks
    assert decode_buckets([5, 4096, 40, 300, 17]) == [[0, 4], [2], [3], [1]]
    assert decode_buckets([100, 90, 120]) == [[1, 0, 2]]  # similar lengths: one batched call
    assert decode_buckets([3]) == [[0]]


def test_bucketed_batched_decode_matches_each_sequence_alone(ckpt_main: str) -> None:
    """A long sequence among short ones (the 4k-token prompt that made every decode step of the
    batch gather 4k keys per row): the rows attended in separate buckets give each row's logits
    from alone."""
    model = build(ckpt_main, slots=3)
    ps = prompts(3)  # 110, 7 and 33 tokens: 7, 1 and 3 blocks, three buckets
    nxt = []
    for slot, p in enumerate(ps):
        logits = model(torch.tensor(p), BatchMeta.build([(slot, 0, len(p))], model.device))
        nxt.append(int(logits[0].argmax()))
    seqs = [(slot, len(p), 1) for slot, p in enumerate(ps)]
    meta = BatchMeta.build(seqs, model.device)
    together = model(torch.tensor(nxt), meta)
    assert len(meta.decode_buckets) == 3
    for slot, (seq, tok) in enumerate(zip(seqs, nxt, strict=True)):
        alone = model(torch.tensor([tok]), BatchMeta.build([seq], model.device))
        torch.testing.assert_close(together[slot], alone[0], atol=1e-5, rtol=1e-5)


def test_decodes_beside_a_prefill_chunk_are_batched_and_match_each_sequence_alone(ckpt_main: str) -> None:
    """A step that carries a prefill chunk and three decodes (the engine's mixed steps under load):
    the decodes are attended in buckets, the chunk on its own, each row at its place in the packed
    batch, and every sequence gets the logits it gets alone."""
    model = build(ckpt_main, slots=4)
    ps = prompts(4)  # 110, 7, 33 and 20 tokens
    nxt = []
    for slot, p in enumerate(ps[:3]):
        logits = model(torch.tensor(p), BatchMeta.build([(slot, 0, len(p))], model.device))
        nxt.append(int(logits[0].argmax()))
    chunked = ps[3]
    model(torch.tensor(chunked[:12]), BatchMeta.build([(3, 0, 12)], model.device))
    # The chunk between the decodes: its 8 rows sit at batch rows 1..8.
    seqs = [(0, len(ps[0]), 1), (3, 12, 8), (1, len(ps[1]), 1), (2, len(ps[2]), 1)]
    ids = [nxt[0], *chunked[12:], nxt[1], nxt[2]]
    meta = BatchMeta.build(seqs, model.device)
    together = model(torch.tensor(ids), meta)
    assert [skv.seq for skv in meta.seq_kv] == [1]  # the chunk alone
    assert len(meta.decode_buckets) == 3  # 7, 1 and 3 blocks: one bucket each
    assert sorted(int(r) for b in meta.decode_buckets for r in b.rows) == [0, 9, 10]  # type: ignore[union-attr]
    alone = [
        model(torch.tensor([nxt[0]]), BatchMeta.build([seqs[0]], model.device))[0],
        model(torch.tensor(chunked[12:]), BatchMeta.build([seqs[1]], model.device))[0],
        model(torch.tensor([nxt[1]]), BatchMeta.build([seqs[2]], model.device))[0],
        model(torch.tensor([nxt[2]]), BatchMeta.build([seqs[3]], model.device))[0],
    ]
    for row, expected in zip(together, alone, strict=True):
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)
