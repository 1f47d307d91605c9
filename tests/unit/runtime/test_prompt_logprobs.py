"""Which rows of a step give prompt logprobs (``engine.wanted_prompt_rows``, a pure function of the
plan), and what their logits add to a step's memory estimate. The values themselves are checked
against transformers in test_engine.py (TP 1 and 2) and through the API in test_openai_api.py."""

from __future__ import annotations

import pytest
import torch
from tpi_runtime.config import ModelConfig
from tpi_runtime.engine import PROMPT_LOGPROBS_ROWS, Request, SamplingParams, TokenLogprobs, wanted_prompt_rows
from tpi_runtime.scheduler import Scheduled
from tpi_runtime.step_memory import step_bytes
from tpi_runtime.testing import TINY_CONFIG

PROMPT = list(range(1, 46))  # 45 tokens: logprobs wanted for tokens 1..44, from positions 0..43


def request(done: int, k: int | None = 2, prompt: list[int] = PROMPT) -> Request:
    """A request with ``done`` prompt-logprob entries already (earlier chunks, or before a preemption)."""
    r = Request("r", prompt, SamplingParams(prompt_logprobs=k))
    r._prompt_lps = [TokenLogprobs(t, -1.0, ()) for t in prompt[1 : done + 1]]
    return r


@pytest.mark.parametrize(
    ("case", "done", "pos0", "n", "rows"),
    [
        ("the whole prompt in one chunk: every position but the last", 0, 0, 45, (0, 44)),
        ("a first chunk: all of its rows", 0, 0, 16, (0, 16)),
        ("a middle chunk", 16, 16, 16, (0, 16)),
        ("the final chunk: its last row samples the first new token instead", 32, 32, 13, (0, 12)),
        ("a final chunk of one token", 44, 44, 1, None),
        ("a decode after the prompt", 44, 45, 1, None),
        ("preempted after the prompt: the re-prefill of prompt + 5 generated wants none", 44, 0, 50, None),
        ("preempted mid-prompt: a re-prefilled chunk already scored", 20, 0, 16, None),
        ("preempted mid-prompt: the chunk that crosses what was scored", 20, 16, 16, (4, 12)),
    ],
)
def test_wanted_prompt_rows(case: str, done: int, pos0: int, n: int, rows: tuple[int, int] | None) -> None:
    plain = Scheduled(Request("p", PROMPT, SamplingParams()), 0, 8)  # no prompt logprobs: never wanted
    plan = [plain, Scheduled(request(done), pos0, n)]
    assert wanted_prompt_rows(plan) == ([] if rows is None else [(1, *rows)]), case


def test_a_one_token_prompt_has_no_rows_and_k0_still_scores() -> None:
    assert wanted_prompt_rows([Scheduled(request(0, prompt=[7]), 0, 1)]) == []
    assert wanted_prompt_rows([Scheduled(request(0, k=0), 0, 45)]) == [(0, 0, 44)]


def test_prompt_rows_are_counted_in_the_step_memory_one_slice_of_logits_at_a_time() -> None:
    cfg = ModelConfig.from_dict(TINY_CONFIG)

    def est(prompt_rows: int) -> int:
        return step_bytes(
            cfg, 0, 1, torch.float32, n_seqs=1, n_tokens=512, max_ctx=512, batched_decode=False,
            prompt_rows=prompt_rows, prompt_rows_at_once=PROMPT_LOGPROBS_ROWS,
        )  # fmt: skip

    per_slice = 4 * PROMPT_LOGPROBS_ROWS * cfg.vocab_size * 4
    assert est(512) - est(0) == 512 * cfg.hidden_size * 4 + per_slice  # kept rows + one slice, not 512 rows
    assert est(1) - est(0) == cfg.hidden_size * 4 + 4 * cfg.vocab_size * 4
