"""What completions and chat share: turning validated fields into engine parameters, running the
generation (streamed as SSE or collected), the server-side deadline, disconnects and metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from tpi_runtime.engine import RequestError, SamplingParams

from .errors import ApiError, bad_request, unsupported
from .generation import Choice, Event, Generation
from .logprobs import vllm_prompt_logprobs
from .protocol import SamplingFields, Usage

if TYPE_CHECKING:
    from .state import ServerState

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Prepared:
    """One API request, ready for the engine: ``n`` choices of each prompt (completions take a
    batch of prompts; chat has one), choice ``i`` of prompt ``i // n`` (OpenAI's order)."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    # echo: per prompt, the prompt (completions) or the assistant's last message (chat) leads its choices
    echo_texts: list[str] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)  # id, created, model: shared by every object sent
    vllm_prompt_logprobs: int | None = None  # the request's prompt_logprobs: vLLM's field in the response

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        """Each prompt counted once, whatever ``n`` (as OpenAI's usage does)."""
        return sum(len(p) for p in self.prompts)

    def echo_for(self, choice: int) -> str:
        return self.echo_texts[choice // self.n] if self.echo_texts else ""


def prompt_logprobs(tokenizer: Any, prep: Prepared, c: Choice) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs`` of choice ``c``'s prompt, when the request asked for them."""
    k = prep.vllm_prompt_logprobs
    if k is None or c.prompt_logprobs is None:
        return None
    return vllm_prompt_logprobs(tokenizer, c.prompt_logprobs, k)


def chunk(prep: Prepared, object_name: str, choices: list[dict[str, object]], usage: object = None) -> bytes:
    """One streamed SSE payload of either endpoint (``object_name``: its OpenAI object type)."""
    body: dict[str, object] = {**prep.meta, "object": object_name, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


class Formatter(Protocol):
    def first_chunks(self, prep: Prepared) -> list[bytes]: ...
    def chunk(self, prep: Prepared, ev: Event) -> bytes: ...
    def usage_chunk(self, prep: Prepared, usage: Usage) -> bytes: ...
    def response(self, prep: Prepared, gen: Generation, texts: list[str], usage: Usage) -> bytes: ...


def sampling_params(
    req: SamplingFields,
    max_tokens: int | None,
    vocab_size: int,
    extra_stop_ids: tuple[int, ...] = (),
    logprobs: int | None = None,
) -> SamplingParams:
    """The engine's parameters for what both endpoints accept; a 400 for what they cannot honour."""
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        raise unsupported(
            f"'response_format' of type {fmt.type[:40]!r} is not supported by this server (it has no "
            'constrained decoding); omit it or send {"type": "text"}',
            "response_format",
            "unsupported_value",
        )
    if req.prompt_logprobs is not None and req.stream:
        raise unsupported(
            "'prompt_logprobs' is not available with 'stream': true (as in vLLM); completions stream "
            "the prompt's logprobs with 'echo' and 'logprobs'",
            "prompt_logprobs",
            "unsupported_value",
        )
    return SamplingParams(
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        seed=req.seed,
        stop_token_ids=tuple(req.stop_token_ids or ()) + extra_stop_ids,
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logprobs=logprobs,
        logit_bias=logit_bias(req, vocab_size),
        prompt_logprobs=req.prompt_logprobs,
    )


def logit_bias(req: SamplingFields, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` as (token id, bias) pairs; a 400 naming the first key that is not a
    token id of this model (a decimal string below the vocabulary size)."""
    pairs = []
    for key, bias in (req.logit_bias or {}).items():
        # Length first: int() refuses strings of over 4300 digits with a ValueError of its own.
        if not (key.isascii() and key.isdigit() and len(key) <= 12 and int(key) < vocab_size):
            raise bad_request(
                f"'logit_bias' key {key[:24]!r} is not a token id of this model (a decimal integer in "
                f"[0, {vocab_size}))",
                "logit_bias",
            )
        pairs.append((int(key), bias))
    return tuple(pairs)


def check_context(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    total = prompt_len + max_tokens
    if total > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {total} "
            f"tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            "Please reduce the prompt or the completion length.",
            "prompt" if prompt_len >= max_model_len else "max_tokens",
            "context_length_exceeded",
        )


def new_meta(prefix: str, model: str) -> dict[str, object]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def _sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def _deadline_error(state: ServerState) -> ApiError:
    return ApiError(
        HTTPStatus.GATEWAY_TIMEOUT,
        f"the request ran past the server's {state.request_timeout_s:g}s deadline",
        code="deadline_exceeded",
        type_="timeout_error",
    )


async def run(request: web.Request, state: ServerState, prep: Prepared, fmt: Formatter) -> web.StreamResponse:
    engine = state.require_engine()
    if prep.include_usage and not prep.stream:
        raise bad_request("'stream_options' is only allowed with stream=true", "stream_options")
    gen = Generation(engine, prep.prompts, prep.params, prep.n, prep.stop)
    state.metrics.prompt_tokens.inc(prep.prompt_tokens)
    deadline = asyncio.get_running_loop().time() + state.request_timeout_s
    status, reason = 499, "abort"
    try:
        if prep.stream:
            resp, failed = await _stream(request, prep, fmt, gen, state, deadline)
        else:
            async with asyncio.timeout_at(deadline):
                resp, failed = await _collect(prep, fmt, gen), None
        status, reason = (200, gen.choices[0].finish_reason or "length") if failed is None else (failed, "error")
        return resp
    except TimeoutError:
        status, reason = 504, "timeout"
        err = _deadline_error(state)
        err.counted = True
        raise err from None
    except RequestError as e:
        err = state.generation_error(e)
        err.counted = True
        status, reason = err.status, "error"
        raise err from None
    except (asyncio.CancelledError, ConnectionResetError):
        state.metrics.disconnects.inc()
        raise
    finally:
        gen.abort()  # frees the slots of whatever has not finished (deadline, disconnect, error)
        _record(state, gen, status, reason)


async def _collect(prep: Prepared, fmt: Formatter, gen: Generation) -> web.Response:
    texts = [prep.echo_for(i) for i in range(prep.num_choices)]
    async for ev in gen.events():
        texts[ev.index] += ev.text
    usage = Usage(
        prompt_tokens=prep.prompt_tokens,
        completion_tokens=gen.completion_tokens,
        total_tokens=prep.prompt_tokens + gen.completion_tokens,
    )
    return web.Response(body=fmt.response(prep, gen, texts, usage), content_type="application/json")


async def _stream(
    request: web.Request, prep: Prepared, fmt: Formatter, gen: Generation, state: ServerState, deadline: float
) -> tuple[web.StreamResponse, int | None]:
    """The SSE response, and the error status if the request failed after the headers went out
    (then the error is the last event before [DONE])."""
    events = gen.events()
    # Headers go out with the first event, so a failure before any token is still a JSON error response.
    async with asyncio.timeout_at(deadline):
        first = await anext(events, None)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for data in fmt.first_chunks(prep):
        await resp.write(_sse(data))
    err: ApiError | None = None
    try:
        async with asyncio.timeout_at(deadline):
            if first is not None:
                await resp.write(_sse(fmt.chunk(prep, first)))
            async for ev in events:
                await resp.write(_sse(fmt.chunk(prep, ev)))
    except RequestError as e:
        err = state.generation_error(e)
    except TimeoutError:
        err = _deadline_error(state)
    if err is not None:
        await resp.write(_sse(err.body()))
    elif prep.include_usage:
        n_gen = gen.completion_tokens
        usage = Usage(
            prompt_tokens=prep.prompt_tokens, completion_tokens=n_gen, total_tokens=prep.prompt_tokens + n_gen
        )
        await resp.write(_sse(fmt.usage_chunk(prep, usage)))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp, (err.status if err is not None else None)


def _record(state: ServerState, gen: Generation, status: int, reason: str) -> None:
    m = state.metrics
    now = time.monotonic()
    m.observe_request(status, reason if status in (200, 499) else None)
    m.request_latency.observe(now - gen.t0)
    n = gen.completion_tokens
    m.completion_tokens.inc(n)
    if gen.t_first is not None:
        m.time_to_first_token.observe(gen.t_first - gen.t0)
        if n > 1:
            m.time_per_output_token.observe((now - gen.t_first) / (n - 1))
