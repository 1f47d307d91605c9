"""Engine behaviour in real rank processes (TP=2 over gloo unless noted): continuous batching,
sampling, cancellation/validation, idle steps and fake-OOM recovery."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tpi_runtime.dist import EXIT_COLLECTIVE_FAILED
from tpi_runtime.engine import EXIT_OUT_OF_MEMORY
from tpi_runtime.testing import load_hf_model

from .conftest import assert_all_ok, run_ranks, worker_argv

EOS = 2


def run_scenario(model: str, scenario: str, tp: int = 2, env: dict[str, str] | None = None) -> list[Any]:
    results = run_ranks(tp, worker_argv("engine", model, scenario), extra_env=env)
    assert_all_ok(results)
    outs = [r.json() for r in results]
    assert "exception" not in outs[0], outs[0]["exception"]
    return outs


def hf_greedy(model: Any, prompt: list[int], max_tokens: int) -> tuple[list[int], str]:
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if t == EOS:
                return out, "stop"
            out.append(t)
            ids.append(t)
    return out, "length"


@pytest.mark.parametrize("tp", [1, 2])
def test_concurrent_requests_match_sequential_and_transformers(tp: int, ckpt_main: str) -> None:
    from .rank_worker import PROMPTS

    outs = run_scenario(ckpt_main, "batching", tp)
    res = outs[0]
    assert res["max_running"] >= 2, "requests were never batched together"
    assert any(
        s["batch_size"] > 1 and s["num_prefill_tokens"] > 0 and s["num_decode_tokens"] > 0 for s in res["steps"]
    ), "no step mixed a new prefill with running decodes"
    hf = load_hf_model(ckpt_main)
    for i, prompt in enumerate(PROMPTS):
        ref, reason = hf_greedy(hf, prompt, 12 + 3 * i)
        for mode in ("sequential", "concurrent", "staggered"):
            got = res[mode][i]
            assert got["tokens"] == ref, f"{mode} request {i}"
            assert got["finish"] == reason, f"{mode} request {i}"
    if tp > 1:  # followers advanced in lockstep with rank 0 (heartbeat step counter)
        assert outs[1]["stats"]["step"] >= len(res["steps"])


def _check_prompt_logprobs(got: list[Any], ref: torch.Tensor, prompt: list[int], k: int) -> None:
    """got: [token, logprob, top [[id, logprob]...]] for prompt tokens 1..; ref: HF log-softmax rows."""
    assert [e[0] for e in got] == prompt[1:]
    for j, (tok, lp, top) in enumerate(got):
        assert lp == pytest.approx(float(ref[j, tok]), abs=1e-4), f"prompt token {j + 1}"
        want = ref[j].topk(k) if k else None
        assert [t[0] for t in top] == ([] if want is None else want.indices.tolist()), f"prompt token {j + 1}"
        if want is not None:
            assert [t[1] for t in top] == pytest.approx(want.values.tolist(), abs=1e-4)


@pytest.mark.parametrize(("tp", "budget"), [(1, None), (2, "16")])
def test_prompt_logprobs_match_transformers(tp: int, budget: str | None, ckpt_main: str) -> None:
    """Each prompt token's logprob given the tokens before it (echo's logprobs), alone and batched,
    with the default step budget (one chunk) and with 16 tokens a step (a 45-token prompt in
    chunks, beside decodes)."""
    from .rank_worker import PROMPTS

    res = run_scenario(ckpt_main, "prompt_logprobs", tp, {"T_MAX_TOKENS": budget} if budget else None)[0]
    if budget:
        assert any(0 < s["num_prefill_tokens"] <= int(budget) < 45 for s in res["steps"])
    hf = load_hf_model(ckpt_main)

    def ref(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)

    long_prompt = res["long_prompt"]
    alone = res["alone"]
    assert alone["tokens"] == [] and alone["finish"] == "length"  # max_tokens=0: the prompt only
    _check_prompt_logprobs(alone["prompt_logprobs"], ref(long_prompt), long_prompt, 3)
    cases = [(PROMPTS[1], 0, 6), (PROMPTS[0], None, 6), (long_prompt, 2, 4)]  # (prompt, k, max_tokens)
    for got, (prompt, k, n) in zip(res["together"], cases, strict=True):
        if k is None:
            assert got["prompt_logprobs"] == []
        else:
            _check_prompt_logprobs(got["prompt_logprobs"], ref(prompt), prompt, k)
        assert (got["tokens"], got["finish"]) == hf_greedy(hf, prompt, n)
    one = res["one_token"]
    assert (one["tokens"], one["finish"], one["prompt_logprobs"]) == ([], "length", [])


def test_a_failing_prompt_logprob_reduction_fails_only_its_request(ckpt_main: str) -> None:
    outs = run_scenario(ckpt_main, "prompt_logprobs_failure")
    res = outs[0]
    assert "prompt logprobs failed" in res["failed"]["error"]
    assert res["after"]["n_prompt_logprobs"] == 99 and res["after"]["tokens"] == res["plain"]["tokens"]
    assert outs[1]["stats"]["step"] >= len(res["steps"])  # the follower kept following


def test_sampling_is_seeded_and_top_k1_is_greedy(ckpt_main: str) -> None:
    res = run_scenario(ckpt_main, "sampling")[0]
    assert res["seeded_a"]["tokens"] == res["seeded_b"]["tokens"]
    assert len(res["seeded_a"]["tokens"]) > 5
    assert res["other_seed"]["tokens"] != res["seeded_a"]["tokens"]
    assert res["top_k1"]["tokens"] == res["greedy"]["tokens"]
    assert res["hot"]["tokens"][: len(res["greedy"]["tokens"])] != res["greedy"]["tokens"]


def test_validation_cancel_stop_tokens_and_idle_steps(ckpt_main: str) -> None:
    outs = run_scenario(ckpt_main, "controls")
    res = outs[0]
    errs = res["errors"]
    assert "empty" in errs["empty"]
    assert "out of range" in errs["out_of_range"]
    assert "max_model_len" in errs["too_long"]
    assert "top_p" in errs["bad_top_p"]
    assert "logit_bias" in errs["bad_logit_bias"]
    # Tokens the engine made before it saw the cancel are dropped, however slow the reader.
    assert res["cancel"]["finish"] == "abort" and res["cancel"]["n"] == 3
    assert res["cancel_stop"]["finish"] == "stop"
    ref = res["ref"]["tokens"]
    assert len(ref) >= 5, "reference too short to pick a stop token"
    stop_tok = res["stop_tok"]
    assert res["stopped"]["tokens"] == ref[: ref.index(stop_tok)]
    assert res["stopped"]["finish"] == "stop"
    st = res["stats"]
    assert st["running"] == 0 and st["queue_depth"] == 0
    # The scenario waits (up to 10 s) for 2 idle steps beyond the work steps.
    assert st["step"] >= len(res["steps"]) + 2
    assert outs[1]["stats"]["step"] >= len(res["steps"]) + 2


def test_fake_oom_halves_batch_and_completes_everything(ckpt_main: str) -> None:
    outs = run_scenario(ckpt_main, "oom", env={"TPI_FAKE_OOM_AT_BATCH": "2", "T_MAX_BATCH": "8"})
    res = outs[0]
    st = res["stats"]
    assert st["oom_count"] >= 1
    assert st["effective_batch_size"] <= 2  # 8 -> halved until the fake limit fits
    assert "out of memory" in st["last_error"]
    for conc, seq in zip(res["concurrent"], res["sequential"], strict=True):
        assert "error" not in conc, conc
        assert conc["tokens"] == seq["tokens"] and conc["finish"] == seq["finish"]
    assert max(s["batch_size"] for s in res["steps"]) <= 2
    # The follower mirrored the decision (it reports the same counters in its heartbeat).
    assert outs[1]["stats"]["oom_count"] == st["oom_count"]
    assert outs[1]["stats"]["effective_batch_size"] == st["effective_batch_size"]


def test_mid_forward_oom_alone_halves_batch_and_completes_everything(ckpt_main: str) -> None:
    env = {"TPI_FAKE_OOM_AT_BATCH": "2", "TPI_FAKE_OOM_MID_FORWARD": "1", "T_MAX_BATCH": "8"}
    res = run_scenario(ckpt_main, "oom", tp=1, env=env)[0]
    assert res["stats"]["oom_count"] >= 1
    assert res["stats"]["effective_batch_size"] <= 2
    for conc, seq in zip(res["concurrent"], res["sequential"], strict=True):
        assert "error" not in conc, conc
        assert conc["tokens"] == seq["tokens"] and conc["finish"] == seq["finish"]


def test_mid_forward_oom_in_a_group_exits_with_the_oom_code(ckpt_main: str) -> None:
    """Peers are inside the pass's collectives: the rank exits 4 (the operator halves the batch and
    recreates the group) and nobody hangs."""
    env = {"TPI_FAKE_OOM_AT_BATCH": "2", "TPI_FAKE_OOM_MID_FORWARD": "1", "T_MAX_BATCH": "8"}
    results = run_ranks(2, worker_argv("engine", ckpt_main, "oom"), extra_env=env, timeout=120)
    codes = [r.returncode for r in results]
    assert EXIT_OUT_OF_MEMORY in codes, codes
    assert all(c in (EXIT_OUT_OF_MEMORY, EXIT_COLLECTIVE_FAILED) for c in codes), codes
    oom_rank = results[codes.index(EXIT_OUT_OF_MEMORY)]
    assert "out of memory in the middle of a forward pass" in oom_rank.stderr
    assert "FAKE GPU OOM" in oom_rank.stderr


def test_oom_at_batch_one_fails_the_request_instead_of_looping(ckpt_main: str) -> None:
    outs = run_scenario(ckpt_main, "oom", tp=1, env={"TPI_FAKE_OOM_AT_BATCH": "0", "T_MAX_BATCH": "4"})
    res = outs[0]
    for r in res["concurrent"] + res["sequential"]:
        assert "out of memory" in r["error"]
    assert res["stats"]["effective_batch_size"] == 1
    assert res["stats"]["oom_count"] >= 6


def test_non_finite_logits_fail_only_their_request(ckpt_main: str) -> None:
    res = run_scenario(ckpt_main, "nonfinite")[0]
    assert "non-finite" in res["victim"]["error"] and len(res["victim"].get("tokens", [])) == 0
    # Its batch-mates finish exactly as they do alone, and the group serves the next request.
    assert res["together"] == res["alone"]
    assert res["after"] == res["alone"][0]
