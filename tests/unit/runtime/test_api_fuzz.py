"""Fuzz the API with hypothesis against a real 2-rank group: every response is JSON 2xx/4xx (never
5xx), and after every request the same two rank processes are still alive and serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.runtime.test_server import MAX_MODEL_LEN, Server, error_of, start_group, stop_group

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-3, max_value=300), max_size=6),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
# Values the API accepts (bounds included); the test then corrupts one field half of the time.
SAMPLING = {
    "max_tokens": st.integers(min_value=1, max_value=6),
    "temperature": st.one_of(st.floats(min_value=0, max_value=1e300), st.sampled_from([0.0, 1e-300, 1e-8, 1e30])),
    "top_p": st.one_of(st.floats(min_value=1e-300, max_value=1), st.just(1e-12)),
    "top_k": st.integers(min_value=-1, max_value=1000),
    "min_p": st.floats(min_value=0, max_value=1),
    "seed": st.integers(min_value=-(2**80), max_value=2**80),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "stop_token_ids": st.lists(st.integers(min_value=0, max_value=400), max_size=3),
    "n": st.integers(min_value=1, max_value=3),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "repetition_penalty": st.floats(min_value=1e-6, max_value=2),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "logit_bias": st.dictionaries(st.integers(min_value=0, max_value=256).map(str), st.floats(-100, 100), max_size=3),
    "response_format": st.just({"type": "text"}),
    "prompt_logprobs": st.integers(min_value=0, max_value=20),  # vLLM's; a 400 with stream
    "some_unknown_field": ANY,
}
COMPLETION = st.fixed_dictionaries(
    {
        "prompt": st.one_of(
            st.just("the cat sees"),
            st.lists(st.integers(min_value=0, max_value=256), min_size=1, max_size=8),
            st.lists(st.sampled_from(["the cat sees", "a dog"]), min_size=1, max_size=3),  # a batch
        )
    },
    optional={
        **SAMPLING,
        "max_tokens": st.integers(min_value=0, max_value=6),  # 0: the echoed prompt only
        "logprobs": st.integers(min_value=0, max_value=20),
        "echo": st.booleans(),
    },
)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=12)})
CHAT = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=3)},
    optional={
        **SAMPLING,
        "logprobs": st.just(True),
        "top_logprobs": st.integers(min_value=0, max_value=20),
        "max_completion_tokens": st.integers(min_value=1, max_value=6),
    },
)
FIELDS = sorted({
    *SAMPLING, "prompt", "messages", "logprobs", "echo", "top_logprobs", "stream_options",
    "suffix", "tools", "tool_choice", "functions", "function_call",
})  # fmt: skip


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    from tpi_runtime.testing import make_tiny_checkpoint

    from tests.unit.runtime.test_openai_api import write_chat_template

    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fuzz")
    write_chat_template(ckpt)
    ranks = start_group(ckpt, tmp_path_factory.mktemp("fuzz-group"))
    try:
        yield ranks
    finally:
        codes = stop_group(ranks)
    assert codes == [0, 0], "\n".join(s.logs() for s in ranks)


SEEN: dict[int, int] = {}  # status -> count, so the last test can check the fuzz reached the engine


def check_response(srv: Server, path: str, body: Any) -> None:
    r = srv.client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    SEEN[r.status_code // 100] = SEEN.get(r.status_code // 100, 0) + 1
    assert r.status_code < 500, f"{r.status_code} for {body!r}: {r.text[:500]}"
    if r.status_code >= 400:
        error_of(r, r.status_code)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = r.text.split("\n\n")
        assert events[-2] == "data: [DONE]"
        for ev in events[:-2]:
            assert "error" not in json.loads(ev[len("data: ") :]), f"{body!r}: {ev}"
    else:
        assert r.json()["usage"]["total_tokens"] <= MAX_MODEL_LEN * max(1, len(r.json()["choices"]))


# derandomize: the same 60 examples every run. Random runs sometimes drew only 4 requests the
# validator rejects (test_fuzz_reached_the_engine_and_the_validator wants 5): CI must not flake.
@settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), data=st.data())
def test_fuzz_requests_never_hurt_the_group(group: list[Server], path: str, data: st.DataObject) -> None:
    pids = [srv.proc.pid for srv in group]
    body = data.draw(COMPLETION if path == "/v1/completions" else CHAT)
    if data.draw(st.booleans(), "corrupt"):
        body[data.draw(st.sampled_from(FIELDS), "field")] = data.draw(ANY, "value")
    check_response(group[0], path, body)
    assert [srv.proc.pid for srv in group] == pids
    assert all(srv.proc.poll() is None for srv in group), "\n".join(s.logs() for s in group)
    assert group[1].client.get("/readyz").status_code == 200


def test_fuzz_reached_the_engine_and_the_validator(group: list[Server]) -> None:
    assert SEEN.get(2, 0) >= 5 and SEEN.get(4, 0) >= 5, SEEN


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}",
        b'{"prompt": "a", "max_tokens": 1e999}',
        b'{"prompt": "a", "temperature": NaN}',
        b'{"prompt": "a", "max_tokens": 99999999999999999999999999}',
        b"\xff\xfe{}",
        b"",
        b"null",
        b'{"prompt": "' + b"the " * 300 + b'"}',
    ],
    ids=["deep-list", "deep-prompt", "huge-float", "nan", "huge-int", "bad-utf8", "empty", "null", "too-long"],
)
def test_malformed_bodies_are_4xx(group: list[Server], raw: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = group[0].client.post(path, content=raw, headers={"content-type": "application/json"})
        err = error_of(r, 400)
        assert err["type"] == "invalid_request_error"
    assert group[0].client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 1}).status_code == 200
