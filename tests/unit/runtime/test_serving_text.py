"""In-process tests of the text side: incremental detokenization on real byte-fallback
(SentencePiece / Llama 2 style) and byte-level BPE tokenizers, and chat template loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tpi_runtime.serving.chat_template import ChatTemplate, TemplateError
from tpi_runtime.serving.detokenizer import IncrementalDetokenizer

TEXT = "hello 日本語 world 👋🏽 ok, 中文 é"


def byte_fallback_tokenizer() -> Any:
    """Llama 2 style: Metaspace pieces, unknown characters as <0xXX> byte tokens, a
    Replace/ByteFallback/Fuse/Strip decoder. Only ASCII letters are in the vocabulary, so every CJK
    character and emoji is split into 3-4 byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz,.:":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def byte_level_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["hello world, the world says hello"] * 10, trainer)
    return tok


@pytest.mark.parametrize("make", [byte_fallback_tokenizer, byte_level_tokenizer], ids=["byte-fallback", "byte-level"])
def test_stream_equals_full_decode_without_replacement_chars(make: Any) -> None:
    tok = make()
    prompt = tok.encode("say:").ids
    ids = tok.encode(TEXT * 20).ids
    assert len(ids) > 2 * len(TEXT * 20) // 3, "the test needs characters split across tokens"
    det = IncrementalDetokenizer(tok, prompt, [])
    deltas = []
    for t in ids:
        deltas.append(det.add(t))
        assert len(det._window) <= 12, "the decode window must stay bounded (O(1) per token)"
    deltas.append(det.finish())
    full = tok.decode(prompt + ids)
    expected = full[len(tok.decode(prompt)) :]
    assert "".join(deltas) == expected
    assert "日本語" in expected and "👋🏽" in expected
    assert not any("\ufffd" in d for d in deltas), [d for d in deltas if "\ufffd" in d]


def test_stop_string_inside_multibyte_text_is_cut_exactly() -> None:
    tok = byte_fallback_tokenizer()
    det = IncrementalDetokenizer(tok, tok.encode("say:").ids, ["語 wor"])
    out = []
    for t in tok.encode(TEXT).ids:
        out.append(det.add(t))
        if det.stopped:
            break
    assert det.stopped and "".join(out) == " hello 日本"


def write(d: Path, name: str, obj: Any) -> None:
    (d / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))


def test_template_sources_and_semantics(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"chat_template\.jinja.*tokenizer_config\.json"):
        ChatTemplate.load(str(tmp_path))
    write(
        tmp_path,
        "tokenizer_config.json",
        {
            "chat_template": [
                {"name": "tool_use", "template": "T"},
                {"name": "default", "template": "{{ bos_token }}D"},
            ],
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
        },
    )
    assert ChatTemplate.load(str(tmp_path)).render([]) == "<s>D"
    src = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
        "{% if add_generation_prompt %}>{{ eos_token }}{% endif %}"
    )
    write(tmp_path, "chat_template.jinja", src)  # takes precedence over tokenizer_config.json
    t = ChatTemplate.load(str(tmp_path))
    msgs = [{"role": "user", "content": "日本"}, {"role": "user", "content": "x"}]
    assert t.render(msgs, add_generation_prompt=True) == '{"role": "user", "content": "日本"}></s>'
    assert t.render(msgs, add_generation_prompt=False) == '{"role": "user", "content": "日本"}'
    write(tmp_path, "chat_template.jinja", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        ChatTemplate.load(str(tmp_path)).render(msgs)
    write(tmp_path, "chat_template.jinja", "{{ ''.__class__.__mro__ }}")  # the sandbox blocks this
    with pytest.raises(TemplateError):
        ChatTemplate.load(str(tmp_path)).render(msgs)


def test_end_of_turn_tokens_stop_a_reply() -> None:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "</s>": 1, "<|im_end|>": 2, "hi": 3}, unk_token="<unk>"))
    assert ChatTemplate("x", eos_token="</s>").stop_token_ids(tok) == (1, 2)
