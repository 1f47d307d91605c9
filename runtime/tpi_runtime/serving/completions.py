"""``POST /v1/completions``: validated body -> engine parameters -> OpenAI text_completion objects."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aiohttp import web

from tpi_runtime.engine import TokenLogprobs

from . import endpoint
from .endpoint import Prepared
from .errors import bad_request, unsupported
from .generation import Choice, Event, Generation
from .logprobs import completion_logprobs
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from .state import ServerState


def _prompts(req: CompletionRequest, tokenizer: Any) -> list[tuple[str | None, list[int]]]:
    """The request's prompts, each as (its text, or None for token ids; its token ids): a string or
    token ids is one prompt; a list of strings or of token-id lists is a batch (OpenAI's), each
    prompt getting ``n`` choices of its own."""
    prompt = req.prompt
    single = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
    batch: list[str] | list[list[int]] = [prompt] if single else prompt  # type: ignore[assignment]
    if not batch:
        raise bad_request("the prompt is empty", "prompt")
    if isinstance(batch[0], str) and tokenizer is None:
        raise bad_request(
            "this checkpoint has no tokenizer; send the prompt as token ids", "prompt", "tokenizer_missing"
        )
    out: list[tuple[str | None, list[int]]] = [
        (p, list(tokenizer.encode(p).ids)) if isinstance(p, str) else (None, list(p)) for p in batch
    ]
    for i, (_, ids) in enumerate(out):
        if not ids:
            raise bad_request("the prompt is empty" if len(out) == 1 else f"prompt {i} of the batch is empty", "prompt")
    return out


def prepare(req: CompletionRequest, state: ServerState) -> Prepared:
    engine = state.require_engine()
    state.check_model(req.model)
    if req.suffix:  # insertion needs a model trained for it and its template; never silently dropped
        raise unsupported("'suffix' is not supported by this server", "suffix")
    stop = req.stop_list()
    if stop and engine.tokenizer is None:
        raise bad_request("stop strings need a tokenizer; this checkpoint has none", "stop", "tokenizer_missing")
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("'max_tokens': 0 generates nothing; it is only allowed with 'echo': true", "max_tokens")
    prompts = _prompts(req, engine.tokenizer)
    params = endpoint.sampling_params(req, req.max_tokens, engine.config.vocab_size, logprobs=req.logprobs)
    if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get their logprobs too
        params = replace(params, prompt_logprobs=max(req.logprobs, req.prompt_logprobs or 0))
    for _, ids in prompts:
        endpoint.check_context(len(ids), params.max_tokens, engine.max_model_len)
    echo: list[str] = []
    if req.echo:  # the prompt as sent, or its token ids decoded
        tok = engine.tokenizer
        echo = [text if text is not None else (tok.decode(ids) if tok is not None else "") for text, ids in prompts]
    prep = Prepared(
        prompts=[ids for _, ids in prompts],
        vllm_prompt_logprobs=req.prompt_logprobs,
        params=params,
        n=req.n or 1,
        stop=stop,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        echo_texts=echo,
        meta=endpoint.new_meta("cmpl", state.model_name),
    )
    if engine.max_waiting is not None and prep.num_choices > engine.max_waiting:  # a 429 would never clear
        raise bad_request(
            f"{len(prompts)} prompts x n={prep.n} are {prep.num_choices} sequences; this server queues at most "
            f"{engine.max_waiting} (--max-queue)",
            "prompt",
        )
    return prep


class CompletionFormatter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._offsets: dict[int, int] = {}  # streamed: per choice, the text_offset its next token gets

    def _streamed_logprobs(self, index: int, lps: list[TokenLogprobs], leading: int | None = None) -> dict[str, Any]:
        """One chunk's logprobs, its offsets continuing the choice's earlier chunks (as unstreamed)."""
        out = completion_logprobs(self.tokenizer, lps, leading, self._offsets.get(index, 0))
        if out["tokens"]:
            self._offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def first_chunks(self, prep: Prepared) -> list[bytes]:
        if not prep.echo_texts or prep.params.prompt_logprobs is not None:
            return []  # with prompt logprobs, each choice's echo goes out with them (chunk)
        return [
            endpoint.chunk(
                prep,
                "text_completion",
                [
                    {"index": i, "text": prep.echo_for(i), "token_ids": [], "finish_reason": None, "logprobs": None}
                    for i in range(prep.num_choices)
                ],
            )
        ]

    def chunk(self, prep: Prepared, ev: Event) -> bytes:
        if ev.prompt_logprobs is not None:
            first = prep.prompts[ev.index // prep.n][0]
            echo = {
                "index": ev.index,
                "text": prep.echo_for(ev.index),
                "token_ids": [],
                "finish_reason": None,
                "logprobs": self._streamed_logprobs(ev.index, list(ev.prompt_logprobs), leading=first),
            }
            return endpoint.chunk(prep, "text_completion", [echo])
        choice = {
            "index": ev.index,
            "text": ev.text,
            "token_ids": ev.token_ids,
            "finish_reason": ev.finish_reason,
            "logprobs": self._streamed_logprobs(ev.index, ev.logprobs) if ev.logprobs else None,
        }
        return endpoint.chunk(prep, "text_completion", [choice])

    def usage_chunk(self, prep: Prepared, usage: Usage) -> bytes:
        return endpoint.chunk(prep, "text_completion", [], usage.model_dump())

    def response(self, prep: Prepared, gen: Generation, texts: list[str], usage: Usage) -> bytes:
        choices = [
            CompletionChoice(
                index=c.index,
                text=texts[c.index],
                token_ids=c.detok.ids,
                finish_reason=c.finish_reason,
                logprobs=self._logprobs(prep, c) if prep.params.logprobs is not None else None,
                prompt_logprobs=endpoint.prompt_logprobs(self.tokenizer, prep, c),
            )
            for c in gen.choices
        ]
        body = CompletionResponse.model_validate({**prep.meta, "choices": choices, "usage": usage})
        return body.model_dump_json().encode()

    def _logprobs(self, prep: Prepared, c: Choice) -> dict[str, Any]:
        if c.prompt_logprobs is None or not prep.echo_texts:
            return completion_logprobs(self.tokenizer, c.logprobs)
        first = prep.prompts[c.index // prep.n][0]
        k = prep.params.logprobs or 0  # the top alternatives asked for here (prompt_logprobs may ask more)
        lps = [replace(e, top=e.top[:k]) for e in c.prompt_logprobs]
        return completion_logprobs(self.tokenizer, [*lps, *c.logprobs], leading=first)


async def handle(request: web.Request, req: CompletionRequest, state: ServerState) -> web.StreamResponse:
    return await endpoint.run(
        request, state, prepare(req, state), CompletionFormatter(state.engine.tokenizer if state.engine else None)
    )
