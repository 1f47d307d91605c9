"""``POST /v1/completions``: validated body -> engine parameters -> OpenAI text_completion objects."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import endpoint
from .endpoint import Prepared
from .errors import ApiError, bad_request, unsupported
from .generation import Event, Generation
from .logprobs import completion_logprobs
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from .state import ServerState


def _prompt_ids(req: CompletionRequest, tokenizer: object) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one: ["text"] or [[ids]]
    if isinstance(prompt, str):
        if tokenizer is None:
            raise bad_request(
                "this checkpoint has no tokenizer; send the prompt as token ids", "prompt", "tokenizer_missing"
            )
        return list(tokenizer.encode(prompt).ids)  # type: ignore[attr-defined]
    if prompt and not all(isinstance(x, int) for x in prompt):
        raise bad_request("only one prompt per request is supported", "prompt")
    return [int(x) for x in prompt]  # type: ignore[arg-type]


def prepare(req: CompletionRequest, state: ServerState) -> Prepared:
    engine = state.require_engine()
    if req.model is not None and req.model != state.model_name:
        raise ApiError(404, f"The model `{req.model}` does not exist.", "model", "model_not_found")
    if req.suffix:  # insertion needs a model trained for it and its template; never silently dropped
        raise unsupported("'suffix' is not supported by this server", "suffix")
    stop = req.stop_list()
    if stop and engine.tokenizer is None:
        raise bad_request("stop strings need a tokenizer; this checkpoint has none", "stop", "tokenizer_missing")
    ids = _prompt_ids(req, engine.tokenizer)
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    params = endpoint.sampling_params(req, req.max_tokens, engine.config.vocab_size, logprobs=req.logprobs)
    endpoint.check_context(len(ids), params.max_tokens, engine.max_model_len)
    echo = ""
    if req.echo:
        echo = (
            req.prompt
            if isinstance(req.prompt, str)
            else (engine.tokenizer.decode(ids) if engine.tokenizer is not None else "")
        )
    return Prepared(
        prompt_ids=ids,
        params=params,
        n=req.n or 1,
        stop=stop,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        echo_text=echo,
        meta=endpoint.new_meta("cmpl", state.model_name),
    )


class CompletionFormatter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def first_chunks(self, prep: Prepared) -> list[bytes]:
        if not prep.echo_text:
            return []
        return [
            endpoint.chunk(
                prep,
                "text_completion",
                [
                    {"index": i, "text": prep.echo_text, "token_ids": [], "finish_reason": None, "logprobs": None}
                    for i in range(prep.n)
                ],
            )
        ]

    def chunk(self, prep: Prepared, ev: Event) -> bytes:
        choice = {
            "index": ev.index,
            "text": ev.text,
            "token_ids": ev.token_ids,
            "finish_reason": ev.finish_reason,
            "logprobs": completion_logprobs(self.tokenizer, ev.logprobs) if ev.logprobs else None,
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
                logprobs=completion_logprobs(self.tokenizer, c.logprobs, len(prep.echo_text))
                if prep.params.logprobs is not None
                else None,
            )
            for c in gen.choices
        ]
        body = CompletionResponse.model_validate({**prep.meta, "choices": choices, "usage": usage})
        return body.model_dump_json().encode()


async def handle(request: web.Request, req: CompletionRequest, state: ServerState) -> web.StreamResponse:
    return await endpoint.run(
        request, state, prepare(req, state), CompletionFormatter(state.engine.tokenizer if state.engine else None)
    )
