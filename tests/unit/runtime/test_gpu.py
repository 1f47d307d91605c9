"""GPU tier (opt-in: `pytest -m gpu` on a machine with a CUDA GPU; CI has none, and the default
`-m 'not gpu'` deselects it). Every test skips, saying why, when CUDA is unavailable.

- our model on CUDA against transformers: float32 (1e-4), bf16 and fp16 (within half-precision
  tolerance, greedy tokens equal up to a near-tie),
- the CUDA-graph decode path against eager decode, token for token,
- the engine serving with graphs on (the default on CUDA), against transformers,
- a real out-of-memory: most of the GPU taken by a ballast, then a burst of long prompts; the
  runtime recovers (free, halve, retry), counted in the metrics,
- a world-size-1 NCCL group through `dist.Dist`, the model's all-reduces running through it,
- the pynvml series of /metrics.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from tpi_runtime.config import ModelConfig
from tpi_runtime.cuda_graphs import DecodeGraphRunner
from tpi_runtime.dist import Dist, DistEnv
from tpi_runtime.loader import load_weights
from tpi_runtime.model import BatchMeta, Transformer
from tpi_runtime.testing import load_hf_model, make_tiny_checkpoint
from tpikit.ports import free_port

from .test_families import PROMPT as FPROMPT
from .test_families import hf_greedy
from .test_parity import PROMPT, STEPS, TOL, hf_reference

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda:0")
# Half-precision logit tolerance floor on the tiny checkpoints (|logit| < 8): 4 ulps. Two correct
# half-precision computations differ by more than rounding once their kernels differ (ours fuses
# qkv and gate_up; transformers' own SDPA and eager attention differ by 4 bf16 / 7 fp16 ulps on CPU,
# and each is ~0.3 (bf16) / ~0.02 (fp16) from the float32 logits), so the tests also scale with
# transformers' own distance from float32.
HALF_TOL = {torch.bfloat16: 4 * 2**-5, torch.float16: 4 * 2**-8}


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("the gpu tier needs a CUDA GPU: torch.cuda.is_available() is False")


def cuda_model(
    model_dir: str, dtype: torch.dtype, slots: int = 1, max_len: int = 128, dist: Dist | None = None
) -> Transformer:
    cfg = ModelConfig.from_pretrained(model_dir)
    d = dist or Dist(DistEnv(0, 1, 0, "127.0.0.1", 0), device=CUDA)
    model = Transformer(cfg, d, dtype=dtype, device=CUDA)
    load_weights(model, model_dir, cfg, 0, 1)
    model.setup_cache(num_slots=slots, max_len=max_len)
    return model


def prefill_all(model: Transformer, prompt: list[int], slot: int = 0) -> torch.Tensor:
    """Logits for every prompt position (float32 [n, vocab])."""
    meta = BatchMeta.build([(slot, 0, len(prompt))], CUDA)
    meta.last_token_idx = torch.arange(len(prompt), device=CUDA)
    return model(torch.tensor(prompt, device=CUDA), meta)


def test_cuda_model_matches_transformers(ckpt_main: str) -> None:
    ref = hf_reference(ckpt_main)  # transformers on CPU, float32
    model = cuda_model(ckpt_main, torch.float32)
    assert model.layers[0].attn.qkv.weight.dim() == 2, "GPUs keep the [out, in] layout"
    prefill = prefill_all(model, PROMPT).cpu()
    assert (prefill - ref["prefill"]).abs().max().item() < TOL
    tokens = [int(prefill[-1].argmax())]
    for s in range(STEPS - 1):
        meta = BatchMeta.build([(0, len(PROMPT) + s, 1)], CUDA)
        tokens.append(int(model(torch.tensor([tokens[-1]], device=CUDA), meta)[0].argmax()))
    assert tokens == ref["tokens"]


def hf_cuda(model_dir: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype, attn_implementation="sdpa").to(CUDA).eval()


def first_real_divergence(ref_steps: list[torch.Tensor], ref: list[int], got: list[int], tol: float) -> int | None:
    """First step where the greedy tokens differ although the reference's logits for the two tokens
    are further apart than `tol` (a difference inside `tol` is a half-precision near-tie: after it
    the sequences legitimately part, so comparison stops there)."""
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        if a != b:
            gap = (ref_steps[i][a] - ref_steps[i][b]).item()
            return None if gap <= tol else i
    return None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_matches_transformers_on_cuda(ckpt_main: str, dtype: torch.dtype) -> None:
    """Ours in bf16/fp16 is as close to the float32 truth as transformers in the same dtype is, and
    greedy decoding agrees with transformers' up to a near-tie."""
    truth = hf_reference(ckpt_main)["prefill"]  # CPU float32
    hf = hf_cuda(ckpt_main, dtype)
    with torch.no_grad():
        hf_prefill = hf(torch.tensor([PROMPT], device=CUDA)).logits[0].float().cpu()
        ids, hf_tokens, hf_steps = list(PROMPT), [int(hf_prefill[-1].argmax())], [hf_prefill[-1]]
        for _ in range(STEPS - 1):
            ids.append(hf_tokens[-1])
            row = hf(torch.tensor([ids], device=CUDA)).logits[0, -1].float().cpu()
            hf_steps.append(row)
            hf_tokens.append(int(row.argmax()))
    del hf
    model = cuda_model(ckpt_main, dtype)
    prefill = prefill_all(model, PROMPT).cpu()
    ours_err = (prefill - truth).abs().max().item()
    hf_err = (hf_prefill - truth).abs().max().item()
    # As close to the float32 truth as transformers in the same dtype, and as close to transformers.
    assert ours_err <= 1.5 * hf_err + HALF_TOL[dtype] / 4, f"ours {ours_err} vs transformers {hf_err} from float32"
    tol = max(HALF_TOL[dtype], hf_err)
    assert (prefill - hf_prefill).abs().max().item() <= tol
    tokens = [int(prefill[-1].argmax())]
    for s in range(STEPS - 1):
        meta = BatchMeta.build([(0, len(PROMPT) + s, 1)], CUDA)
        tokens.append(int(model(torch.tensor([tokens[-1]], device=CUDA), meta)[0].argmax()))
    assert first_real_divergence(hf_steps, hf_tokens, tokens, tol) is None, (tokens, hf_tokens)


def lockstep(model_dir: str, dtype: torch.dtype, slots: list[int], steps: int = 24) -> None:
    """Eager decode and the CUDA-graph runner on two copies of the model, fed the same tokens (the
    eager greedy ones), prompts of different lengths in the given cache slots (6 slots: padding rows
    in a partial bucket). float32: identical tokens; half precision: logits within tolerance and
    tokens equal except at near-ties."""
    prompts = [[1, *((11 + 7 * i + 3 * j) % 250 for j in range(n - 1))] for i, n in enumerate((100, 7, 33))]
    prompts = prompts[: len(slots)]
    eager, graphed = cuda_model(model_dir, dtype, 6, 160), cuda_model(model_dir, dtype, 6, 160)
    runner = DecodeGraphRunner(graphed, capture=True)
    last = []
    for slot, p in zip(slots, prompts, strict=True):
        prefill_all(graphed, p, slot)  # prefill is always eager: fill both caches the same way
        last.append(int(prefill_all(eager, p, slot)[-1].argmax()))
    # Half precision: the two paths use different attention kernels (see cuda_graphs.py) and GEMMs
    # of different row counts; a wrong mask or slot would be off by whole units, not ulps.
    tol = 1e-3 if dtype == torch.float32 else 4 * HALF_TOL[dtype]
    for step in range(steps):
        seqs = [(slot, len(p) + step, 1) for slot, p in zip(slots, prompts, strict=True)]
        ref = eager(torch.tensor(last, device=CUDA), BatchMeta.build(seqs, CUDA))
        got = runner(last, seqs)
        err = (got - ref).abs().max().item()
        assert err <= tol, f"step {step}: logits differ by {err}"
        ref_tok, got_tok = ref.argmax(-1).tolist(), got.argmax(-1).tolist()
        if dtype == torch.float32:
            assert got_tok == ref_tok, f"step {step}"
        else:
            for r, (a, b) in enumerate(zip(ref_tok, got_tok, strict=True)):
                assert a == b or (ref[r, a] - ref[r, b]).item() <= tol, f"step {step} row {r}"
        last = ref_tok
    assert runner.replays >= steps - 1 and runner.graphs and not runner.failed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("slots", [[0], [3], [0, 2, 5]], ids=["batch1", "batch1-slot3", "partial-bucket"])
def test_cuda_graph_decode_matches_eager(ckpt_main: str, dtype: torch.dtype, slots: list[int]) -> None:
    lockstep(ckpt_main, dtype, slots)


def test_engine_with_cuda_graphs_matches_transformers(ckpt_main: str) -> None:
    from tpi_runtime.engine import Engine, SamplingParams
    from tpi_runtime.testing import load_hf_model

    from .rank_worker import PROMPTS
    from .test_engine import hf_greedy

    engine = Engine(ckpt_main, dtype="float32", max_batch_size=8, max_model_len=128, device="cuda")
    runner = engine.decode_runner
    assert runner is not None and runner.capture, "auto: graphs on for CUDA at TP=1"
    stop = threading.Event()
    loop = threading.Thread(target=engine.run_forever, args=(stop,), daemon=True)
    loop.start()
    try:
        params = [SamplingParams(max_tokens=12 + 3 * i, temperature=0.0) for i in range(len(PROMPTS))]
        reqs = [engine.submit(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
        got = [list(r) for r in reqs]
    finally:
        stop.set()
        loop.join(timeout=30)
    hf = load_hf_model(ckpt_main)
    for i, p in enumerate(PROMPTS):
        assert got[i] == hf_greedy(hf, p, 12 + 3 * i)[0], f"request {i}"
    assert runner.replays > 0 and len(runner.graphs) >= 1


def test_real_oom_recovers_and_is_counted(tmp_path: Path) -> None:
    """Fill the GPU with a ballast leaving ~24 MiB, then 15 prompts of 500 tokens queued at once. The
    first step (a full 2048-token budget: 4 prompts and a chunk of the 5th, ~40 MB by the preflight's
    estimate, which counts activations, not attention scores) cannot fit; halved (the token budget
    with the batch), it does. Every
    request must be answered (tokens, or an error for one that cannot run even alone), none may
    hang, and the recovery shows in the metrics."""
    from tpi_runtime.engine import Engine, RequestError, SamplingParams
    from tpi_runtime.metrics import RuntimeMetrics

    ckpt = make_tiny_checkpoint(
        tmp_path / "mid",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        max_shard_size="50MB",
        tokenizer=False,
        init_std=512**-0.5,
        eos_token_id=None,
    )
    # A fixed 1 GiB KV pool (not 90% of the GPU): the ballast below then decides what is left for a
    # step, whatever an earlier test's engine still holds.
    engine = Engine(
        ckpt, dtype="bfloat16", max_batch_size=16, max_model_len=1024, device="cuda", kv_cache_memory=1 << 30
    )
    metrics = RuntimeMetrics(0, engine_fn=lambda: engine)
    # A pause point at the end of a step, so the whole burst is queued before the scheduler sees it.
    go, held = threading.Event(), threading.Event()
    go.set()

    def on_step(_info: Any) -> None:
        if not go.is_set():
            held.set()
            go.wait()

    engine.on_step = on_step
    stop = threading.Event()
    loop = threading.Thread(target=engine.run_forever, args=(stop,), daemon=True)
    loop.start()
    ballast = None
    answered: list[Any] = []
    try:
        # Warm-up at the same shapes first: kernels, cuBLAS workspaces and the small decode graphs
        # are loaded while memory is plentiful (a lazily loaded kernel needs device memory too).
        warm = [engine.submit([1, *range(3, 502)], SamplingParams(max_tokens=8, temperature=0.0)) for _ in range(2)]
        for r in warm:
            assert len(list(r)) == 8
        go.clear()
        sp = SamplingParams(max_tokens=8, temperature=0.0)
        reqs = [engine.submit([1, 5, 6], sp)]  # parks the engine after its first step
        assert held.wait(60)
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(CUDA)
        ballast = torch.empty(free - (24 << 20), dtype=torch.uint8, device=CUDA)
        reqs += [engine.submit([1, *((7 * i + j) % 31000 + 3 for j in range(499))], sp) for i in range(15)]
        go.set()
        done = threading.Event()

        def collect() -> None:
            for r in reqs:
                try:
                    answered.append(list(r))
                except RequestError as e:
                    answered.append(e)
            done.set()

        threading.Thread(target=collect, daemon=True).start()
        assert done.wait(300), f"requests hung: {len(answered)}/16 answered"
        stats = engine.stats()
        text = metrics.render().decode()
    finally:
        go.set()
        del ballast
        stop.set()
        loop.join(timeout=30)
        torch.cuda.empty_cache()
    completed = [a for a in answered if isinstance(a, list) and len(a) == 8]
    errors = [a for a in answered if isinstance(a, RequestError)]
    assert len(completed) + len(errors) == 16
    assert stats.oom_count >= 1 and stats.effective_batch_size < 16, stats
    assert completed, f"no request completed: {errors[:3]}"
    line = next(x for x in text.splitlines() if x.startswith("tpi_oom_recoveries_total{"))
    assert float(line.rsplit(" ", 1)[1]) == stats.oom_count


def test_nccl_world_size_one_through_dist(ckpt_main: str) -> None:
    import torch.distributed as tdist

    def greedy(d: Dist) -> list[int]:
        model = cuda_model(ckpt_main, torch.float32, dist=d)
        tokens = [int(prefill_all(model, PROMPT)[-1].argmax())]
        for s in range(7):
            meta = BatchMeta.build([(0, len(PROMPT) + s, 1)], CUDA)
            tokens.append(int(model(torch.tensor([tokens[-1]], device=CUDA), meta)[0].argmax()))
        return tokens

    env = DistEnv(0, 1, 0, "127.0.0.1", free_port())
    ref = greedy(Dist(env, device=CUDA))
    d = Dist(env, backend="nccl", device=CUDA, force_group=True)
    try:
        assert tdist.is_initialized() and tdist.get_backend() == "nccl" and tdist.get_world_size() == 1
        assert greedy(d) == ref
        layers = ModelConfig.from_pretrained(ckpt_main).num_hidden_layers
        assert d.collectives >= 8 * 2 * layers  # o_proj + down_proj all-reduces, every forward
        d.barrier("gpu_tier")
    finally:
        d.close()


def test_pynvml_series_in_metrics() -> None:
    from tpi_runtime.metrics import RuntimeMetrics

    m = RuntimeMetrics(0)
    assert m.gpu_collector is not None and m.gpu_collector.available, "NVML found no GPU"
    text = m.render().decode()
    for name in (
        "tpi_gpu_memory_used_bytes",
        "tpi_gpu_memory_total_bytes",
        "tpi_gpu_utilization_ratio",
        "tpi_gpu_temperature_celsius",
        "tpi_gpu_power_watts",
    ):
        assert f"{name}{{" in text, f"{name} missing from /metrics"


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
