"""The OpenAI surface with the official ``openai`` client against a real 2-rank group (gloo).

The checkpoint carries a chat template in tokenizer_config.json; the rendered prompt is checked
against transformers' own ``apply_chat_template``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from tpi_runtime.testing import make_tiny_checkpoint

from tests.unit.runtime.test_server import MAX_MODEL_LEN, Server, error_of, metric_samples, start_group, stop_group

PROMPT = "the cat sees a dog and the bird"
TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('no system messages here') }}{% endif %}"
    "{% if m['role'] == 'user' %}he asks {% else %}she tells {% endif %}{{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}she tells{% endif %}"
)
MESSAGES = [{"role": "user", "content": "the cat sees a dog"}]


def write_chat_template(model_dir: str) -> None:
    cfg = {
        "chat_template": TEMPLATE,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-chat")
    write_chat_template(d)
    return d


@pytest.fixture(scope="module")
def group(chat_ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    ranks = start_group(chat_ckpt, tmp_path_factory.mktemp("api-group"))
    try:
        yield ranks
    finally:
        codes = stop_group(ranks)
    assert codes == [0, 0], "\n".join(s.logs() for s in ranks)


@pytest.fixture(scope="module")
def client(group: list[Server]) -> OpenAI:
    return OpenAI(base_url=group[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completions_stream_equals_nonstream(client: OpenAI) -> None:
    kw: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.usage is not None
    choice = full.choices[0]
    ids = choice.model_extra["token_ids"]  # type: ignore[index]
    assert full.usage.completion_tokens == len(ids) > 0
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage == full.usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_chat_uses_the_checkpoint_template_like_transformers(client: OpenAI, chat_ckpt: str) -> None:
    from transformers import AutoTokenizer

    hf_ids = AutoTokenizer.from_pretrained(chat_ckpt).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True
    )
    if not isinstance(hf_ids, list):  # newer transformers return a BatchEncoding
        hf_ids = hf_ids["input_ids"]
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert full.object == "chat.completion"
    assert full.usage is not None and full.usage.prompt_tokens == len(hf_ids)
    msg = full.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    # The same ids as a raw completion of the rendered prompt.
    raw = client.completions.create(model="tiny", prompt=list(hf_ids), max_tokens=8, temperature=0)
    assert full.choices[0].model_extra["token_ids"] == raw.choices[0].model_extra["token_ids"]  # type: ignore[index]

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage == full.usage


def test_chat_template_errors_are_400(client: OpenAI) -> None:
    with pytest.raises(BadRequestError, match="no system messages here"):
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "system", "content": "x"}],
            max_tokens=2,  # type: ignore[list-item]
        )


def test_n_logprobs_echo(client: OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, n=2, logprobs=3, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text and r.choices[0].text.startswith(PROMPT)
    assert r.usage is not None and r.usage.completion_tokens == sum(
        len(c.model_extra["token_ids"])
        for c in r.choices  # type: ignore[index]
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    generated = len(r.choices[0].model_extra["token_ids"])  # type: ignore[index]
    assert r.usage is not None and len(lp.token_logprobs) == r.usage.prompt_tokens + generated  # echo: the prompt's too
    for chosen, top in zip(lp.token_logprobs[-generated:], lp.top_logprobs[-generated:], strict=True):
        assert len(top) <= 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely

    seeded = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.5, n=3, seed=5)
    again = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.5, n=3, seed=5)
    assert [c.text for c in seeded.choices] == [c.text for c in again.choices]

    chat = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,  # type: ignore[arg-type]
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_n_choices_compute_their_prompt_once(group: list[Server], client: OpenAI) -> None:
    """n = 4 choices of one prompt: the 3 after the first take its full blocks from the prefix
    cache (the metric counts the prompt tokens taken), and greedy choices are still identical."""
    hits = ("tpi_prefix_cache_hit_tokens_total", (("rank", "0"),))
    before = metric_samples(group[0])[hits]
    prompt = [1, *range(150, 189)]  # 40 token ids no other test sends: 2 full blocks of 16 and 8 more
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, n=4)
    assert len({c.text for c in r.choices}) == 1 and r.usage is not None and r.usage.prompt_tokens == 40
    assert metric_samples(group[0])[hits] - before == 3 * 32


def reference_logprobs(model_dir: str, text: str | list[int]) -> tuple[list[int], Any]:
    """The prompt's token ids (as the server encodes it) and transformers' log-softmax rows for it."""
    import torch
    from tokenizers import Tokenizer
    from tpi_runtime.testing import load_hf_model

    ids = (
        text
        if isinstance(text, list)
        else Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")).encode(text).ids
    )
    with torch.no_grad():
        return ids, load_hf_model(model_dir)(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_logprobs_score_the_prompt_like_transformers(client: OpenAI, chat_ckpt: str) -> None:
    """lm-evaluation-harness's loglikelihood request: echo, logprobs and max_tokens 0 or 1. Every
    prompt token but the first gets its logprob given the tokens before it (transformers' own)."""
    ids, ref = reference_logprobs(chat_ckpt, PROMPT)

    def check(lp: Any, k: int) -> None:
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes it
        assert len(lp.tokens) == len(lp.text_offset) == len(lp.token_logprobs) >= len(ids)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        for j, tok in enumerate(ids[1:]):
            assert lp.token_logprobs[j + 1] == pytest.approx(float(ref[j, tok]), abs=1e-4)
            want = ref[j].topk(k).values.tolist()
            assert sorted(lp.top_logprobs[j + 1].values(), reverse=True) == pytest.approx(want, abs=1e-4)

    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    (c,) = r.choices
    assert (c.text, c.finish_reason) == (PROMPT, "length") and r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    assert c.logprobs is not None and len(c.logprobs.tokens or []) == len(ids)
    check(c.logprobs, 2)

    # Generating too, a batch of two prompts with n=2: each choice scores its own prompt first.
    r = client.completions.create(
        model="tiny", prompt=[ids, ids[:4]], max_tokens=1, echo=True, logprobs=1, n=2, temperature=0
    )
    assert len(r.choices) == 4
    for ch in r.choices[:2]:
        assert ch.logprobs is not None and len(ch.logprobs.token_logprobs or []) == len(ids) + 1
        check(ch.logprobs, 1)
    for ch in r.choices[2:]:
        assert ch.logprobs is not None and ch.logprobs.token_logprobs is not None
        assert len(ch.logprobs.token_logprobs) == 5
        assert ch.logprobs.token_logprobs[1:4] == pytest.approx([float(ref[j, ids[j + 1]]) for j in range(3)], abs=1e-4)

    # Streamed: each choice's echo arrives with its prompt's logprobs, then the generated tokens;
    # put together, the chunks' logprobs are the unstreamed ones (text offsets included).
    kw: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 2}
    chunks = list(client.completions.create(**kw, temperature=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == PROMPT and first.logprobs is not None
    assert len(first.logprobs.token_logprobs or []) == len(ids)
    check(first.logprobs, 2)
    whole = client.completions.create(**kw, temperature=0).choices[0].logprobs
    assert whole is not None
    streamed = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for lp in streamed for x in getattr(lp, name)] == getattr(whole, name), name

    with pytest.raises(BadRequestError, match="only allowed with 'echo'"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)


def test_vllm_prompt_logprobs_on_both_endpoints(client: OpenAI, chat_ckpt: str) -> None:
    """vLLM's ``prompt_logprobs``: per prompt token (None for the first) the token's own logprob and
    rank, and the k most likely, keyed by token id."""
    ids, ref = reference_logprobs(chat_ckpt, PROMPT)

    def check(rows: list[Any], ids: list[int], ref: Any, k: int) -> None:
        assert rows[0] is None and len(rows) == len(ids)
        for j, tok in enumerate(ids[1:]):
            row, want = rows[j + 1], float(ref[j, tok])
            assert row[str(tok)]["logprob"] == pytest.approx(want, abs=1e-4)
            assert (
                1 + int((ref[j] > want + 1e-4).sum()) <= row[str(tok)]["rank"] <= 1 + int((ref[j] > want - 1e-4).sum())
            )
            top = ref[j].topk(k) if k else None
            for rank, (i, lp) in enumerate(
                zip(top.indices.tolist(), top.values.tolist(), strict=True) if top else [], 1
            ):
                assert row[str(i)]["logprob"] == pytest.approx(lp, abs=1e-4)
                assert row[str(i)]["rank"] == rank or i == tok
            assert len(row) in (k, k + 1) if k else len(row) == 1
            assert all(isinstance(e["decoded_token"], str) for e in row.values())

    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    (c,) = r.choices
    assert c.logprobs is None and c.text and not c.text.startswith(PROMPT)  # neither asked for
    check(c.model_extra["prompt_logprobs"], ids, ref, 2)  # type: ignore[index]
    # With echo and logprobs too, the legacy list keeps its own k; vLLM's has its own.
    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, extra_body={"prompt_logprobs": 3}
    )
    (c,) = r.choices
    assert c.logprobs is not None and all(len(t) == 1 for t in (c.logprobs.top_logprobs or [])[1:])
    check(c.model_extra["prompt_logprobs"], ids, ref, 3)  # type: ignore[index]

    chat = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=2,
        n=2,
        extra_body={"prompt_logprobs": 0},  # type: ignore[arg-type]
    )
    assert chat.usage is not None
    rows = chat.model_extra["prompt_logprobs"]  # type: ignore[index]
    assert len(rows) == chat.usage.prompt_tokens and all(len(row) == 1 for row in rows[1:])
    chat_ids = [int(next(iter(row))) for row in rows[1:]]
    check(rows, [0, *chat_ids], reference_logprobs(chat_ckpt, [1, *chat_ids])[1], 0)  # the template starts with bos

    with pytest.raises(BadRequestError, match="prompt_logprobs"):
        client.completions.create(model="tiny", prompt=PROMPT, stream=True, extra_body={"prompt_logprobs": 1})


def test_vllm_tokenizer_endpoints_as_lm_eval_reads_them(group: list[Server], chat_ckpt: str) -> None:
    """``/tokenizer_info``, ``/tokenize`` and ``/detokenize``: lm-evaluation-harness's remote
    tokenizer backend, which it picks when ``/tokenizer_info`` has an ``eos_token`` and ``/tokenize``
    answers ``tokens``. The ids are transformers' own for the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chat_ckpt)
    api = group[0].client
    info = api.get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["chat_template"]) == ("<s>", "</s>", TEMPLATE)
    assert info["model_max_length"] == MAX_MODEL_LEN

    r = api.post("/tokenize", json={"prompt": PROMPT}).json()
    assert r["tokens"] == hf(PROMPT)["input_ids"] and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_MODEL_LEN
    bare = api.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False, "model": "tiny"}).json()
    assert bare["tokens"] == hf(PROMPT, add_special_tokens=False)["input_ids"]
    # lm-eval's eos id: the eos text encoded without special tokens added
    eos = api.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"] == [hf.eos_token_id]
    chat_ids = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if not isinstance(chat_ids, list):  # newer transformers return a BatchEncoding
        chat_ids = chat_ids["input_ids"]
    assert api.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"] == chat_ids

    ids = r["tokens"]
    assert api.post("/detokenize", json={"tokens": ids}).json()["prompt"] == hf.decode(ids)
    assert api.post("/detokenize", json={"tokens": []}).json()["prompt"] == ""

    for path, body, param in [
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/detokenize", {"tokens": [hf.vocab_size + 100]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {}, "tokens"),
    ]:
        err = error_of(api.post(path, json=body), 400)
        assert err["param"] == param, (path, body, err)
    assert error_of(api.post("/tokenize", json={"prompt": "a", "model": "other"}), 404)["code"] == "model_not_found"
    for raw in (b"", b"null", b"\xff", b"[" * 100_000):
        assert api.post("/tokenize", content=raw, headers={"content-type": "application/json"}).status_code == 400
    assert error_of(group[1].client.post("/tokenize", json={"prompt": "a"}), 404)["code"] == "not_found"


def test_penalties_min_p_and_unknown_fields_are_accepted(client: OpenAI, group: list[Server]) -> None:
    base: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    plain = client.completions.create(**base).choices[0].model_extra["token_ids"]  # type: ignore[index]
    penalized = (
        client.completions.create(
            **base,
            presence_penalty=2.0,
            frequency_penalty=2.0,
            extra_body={"repetition_penalty": 2.0, "min_p": 0.5, "frobnicate": {"x": 1}},
        )
        .choices[0]
        .model_extra["token_ids"]
    )  # type: ignore[index]
    assert penalized
    if len(set(plain)) < len(plain):  # the plain output repeats a token: penalties must change it
        assert len(set(penalized)) / len(penalized) > len(set(plain)) / len(plain)
    warned = "ignoring unknown request fields: frobnicate"
    assert warned in group[0].logs() or warned in Path(group[0].log).read_text()


def test_chat_echo_continues_the_assistants_last_message(client: OpenAI) -> None:
    """vLLM's chat `echo`: an assistant message to continue leads the reply, streamed or not; with a
    user message last there is nothing to echo."""
    messages: Any = [*MESSAGES, {"role": "assistant", "content": "the bird"}]
    kw: dict[str, Any] = {"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 0}
    plain = client.chat.completions.create(**kw, extra_body={"add_generation_prompt": False})
    echoed = client.chat.completions.create(**kw, extra_body={"add_generation_prompt": False, "echo": True})
    assert echoed.choices[0].message.content == "the bird" + (plain.choices[0].message.content or "")
    streamed = client.chat.completions.create(
        **kw, stream=True, extra_body={"add_generation_prompt": False, "echo": True}
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == echoed.choices[0].message.content
    user_last = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, extra_body={"echo": True}
    )
    assert not (user_last.choices[0].message.content or "").startswith(MESSAGES[0]["content"])


def test_logit_bias_forces_and_bans_tokens(client: OpenAI) -> None:
    """OpenAI's logit_bias, greedy: -100 bans the token the model would pick, +100 forces one,
    streamed or not, on both endpoints."""
    base: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    plain = client.completions.create(**base).choices[0].model_extra["token_ids"]  # type: ignore[index]
    banned = client.completions.create(**base, logit_bias={str(plain[0]): -100})
    assert banned.choices[0].model_extra["token_ids"][0] != plain[0]  # type: ignore[index]
    forced = next(t for t in range(100, 200) if t not in plain)  # a word token, not a special one
    bias = {str(forced): 100}
    out = client.completions.create(**base, logit_bias=bias).choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert out == [forced] * 4
    streamed = client.completions.create(**base, logit_bias=bias, stream=True)
    assert [t for c in streamed if c.choices for t in c.choices[0].model_extra["token_ids"]] == out  # type: ignore[index]
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, logit_bias=bias)  # type: ignore[arg-type]
    assert chat.choices[0].model_extra["token_ids"] == [forced] * 3  # type: ignore[index]


TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    ("endpoint", "fields", "param", "code"),
    [
        ("chat", {"response_format": {"type": "json_object"}}, "response_format", "unsupported_value"),
        ("completions", {"extra_body": {"response_format": {"type": "json_schema"}}}, "response_format",
         "unsupported_value"),
        ("chat", {"tools": [TOOL]}, "tools", "unsupported_parameter"),  # tool_choice defaults to auto
        ("chat", {"tools": [TOOL], "tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
        ("chat", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "lookup"}}},
         "tool_choice", "unsupported_parameter"),
        ("chat", {"tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
        ("chat", {"extra_body": {"functions": [TOOL["function"]]}}, "functions", "unsupported_parameter"),
        ("completions", {"suffix": " the end"}, "suffix", "unsupported_parameter"),
        ("completions", {"logit_bias": {"cat": 1}}, "logit_bias", "invalid_value"),
        ("completions", {"logit_bias": {"257": 1}}, "logit_bias", "invalid_value"),  # the vocabulary is 257
        ("chat", {"logit_bias": {"5": 100.5}}, "logit_bias", "invalid_value"),
    ],
)  # fmt: skip
def test_what_the_server_cannot_honour_is_refused_not_ignored(
    client: OpenAI, endpoint: str, fields: dict[str, Any], param: str, code: str
) -> None:
    """A field this server cannot honour is a 400 naming it: a client asking for JSON or a tool call
    must not get plain text back as if it had."""
    with pytest.raises(BadRequestError) as err:
        if endpoint == "chat":
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **fields)  # type: ignore[arg-type]
        else:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, **fields)
    assert (err.value.param, err.value.code) == (param, code), err.value.message


def test_tools_declined_text_format_and_models_retrieve_are_served(client: OpenAI) -> None:
    """What can be honoured is: tools offered with tool_choice "none" (the reply is text, as
    asked), response_format text, and `models.retrieve` (GET /v1/models/{model})."""
    kw: dict[str, Any] = {"tools": [TOOL], "tool_choice": "none", "response_format": {"type": "text"}}
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **kw)  # type: ignore[arg-type]
    assert chat.choices[0].message.content and not chat.choices[0].message.tool_calls
    card = client.models.retrieve("tiny")
    assert (card.id, card.model_extra["max_model_len"]) == ("tiny", MAX_MODEL_LEN)  # type: ignore[index]
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-4")


def test_a_batch_of_prompts_gets_n_choices_each_in_openai_order(client: OpenAI) -> None:
    """OpenAI's batched completions: choice i answers prompt i // n, each as if sent alone (greedy),
    streamed or not; usage counts each prompt once; echo leads each choice with its own prompt."""
    prompts = [PROMPT, "the dog", "a bird sees the cat"]
    kw: dict[str, Any] = {"model": "tiny", "max_tokens": 5, "temperature": 0}
    alone = [client.completions.create(prompt=p, **kw) for p in prompts]
    batch = client.completions.create(prompt=prompts, n=2, **kw)
    assert [c.index for c in batch.choices] == list(range(6))
    for c in batch.choices:
        ref = alone[c.index // 2].choices[0]
        assert (c.text, c.model_extra["token_ids"]) == (ref.text, ref.model_extra["token_ids"])  # type: ignore[index]
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone if r.usage)
    assert batch.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in batch.choices)  # type: ignore[index]
    texts: dict[int, str] = {}
    for chunk in client.completions.create(prompt=prompts, n=2, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in batch.choices}
    ids = [[5, 6, 7], [8, 9]]
    echoed = client.completions.create(prompt=ids, echo=True, **kw)
    for c, prompt in zip(echoed.choices, ids, strict=True):  # each led by its own prompt
        assert c.text == client.completions.create(prompt=prompt, echo=True, **kw).choices[0].text
