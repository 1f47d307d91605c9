"""``POST /v1/chat/completions``: messages rendered with the checkpoint's chat template, then the
same generation as completions, formatted as chat.completion / chat.completion.chunk objects."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import endpoint
from .chat_template import TemplateError
from .endpoint import Prepared
from .errors import bad_request, unsupported
from .generation import Event, Generation
from .logprobs import chat_logprobs
from .protocol import ChatChoice, ChatCompletionRequest, ChatMessage, ChatMessageOut, ChatResponse, Usage
from .state import ServerState


def render(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """The conversation as the checkpoint's chat template writes it; a 400 without a template or
    when the template refuses the messages (its raise_exception)."""
    if state.chat_template is None:
        raise bad_request(state.chat_template_error, "messages", "chat_template_missing")
    try:
        return state.chat_template.render([m.as_template_dict() for m in messages], add_generation_prompt)
    except TemplateError as e:
        raise bad_request(str(e), "messages", "chat_template_error") from None


def prepare(req: ChatCompletionRequest, state: ServerState) -> Prepared:
    engine = state.require_engine()
    state.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    refuse_tool_calls(req)
    if engine.tokenizer is None:
        raise bad_request(state.chat_template_error, "messages", "chat_template_missing")
    text = render(state, req.messages, req.add_generation_prompt)
    template = state.chat_template
    assert template is not None  # render() refused otherwise
    ids = list(engine.tokenizer.encode(text, add_special_tokens=False).ids)
    if not ids:
        raise bad_request("the rendered conversation is empty", "messages")
    max_tokens = req.max_completion_tokens or req.max_tokens or (engine.max_model_len - len(ids))
    if max_tokens < 1:
        endpoint.check_context(len(ids), 1, engine.max_model_len)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = endpoint.sampling_params(
        req, max_tokens, engine.config.vocab_size, template.stop_token_ids(engine.tokenizer), logprobs
    )
    endpoint.check_context(len(ids), params.max_tokens, engine.max_model_len)
    last = req.messages[-1]
    echo = last.as_template_dict()["content"] or "" if req.echo and last.role == "assistant" else ""
    return Prepared(
        prompts=[ids],
        params=params,
        n=req.n or 1,
        stop=req.stop_list(),
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        echo_texts=[echo],
        meta=endpoint.new_meta("chatcmpl", state.model_name),
        vllm_prompt_logprobs=req.prompt_logprobs,
    )


TOOL_CHOICES = ("none", "auto", "required")


def refuse_tool_calls(req: ChatCompletionRequest) -> None:
    """A 400 for a request that lets the model call a tool: this server has no parser that turns a
    reply into ``tool_calls``, so such a reply would come back as plain text. Tools offered with
    ``tool_choice: "none"`` (or functions with ``function_call: "none"``) are accepted: the reply is
    text either way, as asked."""
    for tools, choice, tools_name, choice_name in (
        (req.tools, req.tool_choice, "tools", "tool_choice"),
        (req.functions, req.function_call, "functions", "function_call"),
    ):
        if isinstance(choice, str) and choice not in TOOL_CHOICES:
            raise bad_request(f"'{choice_name}' must be one of {', '.join(TOOL_CHOICES)} or an object", choice_name)
        if isinstance(choice, dict) or choice == "required" or (tools and choice != "none"):
            raise unsupported(
                f"tool calling is not supported by this server; send '{choice_name}': 'none' with "
                f"'{tools_name}', or no '{tools_name}'",
                choice_name if choice is not None else tools_name,
            )


class ChatFormatter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def first_chunks(self, prep: Prepared) -> list[bytes]:
        return [
            endpoint.chunk(
                prep,
                "chat.completion.chunk",
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": prep.echo_for(i)},
                        "finish_reason": None,
                        "logprobs": None,
                    }
                    for i in range(prep.num_choices)
                ],
            )
        ]

    def chunk(self, prep: Prepared, ev: Event) -> bytes:
        delta = {"content": ev.text} if ev.text or ev.finish_reason is None else {}
        choice = {
            "index": ev.index,
            "delta": delta,
            "finish_reason": ev.finish_reason,
            "logprobs": chat_logprobs(self.tokenizer, ev.logprobs) if ev.logprobs else None,
            "token_ids": ev.token_ids,
        }
        return endpoint.chunk(prep, "chat.completion.chunk", [choice])

    def usage_chunk(self, prep: Prepared, usage: Usage) -> bytes:
        return endpoint.chunk(prep, "chat.completion.chunk", [], usage.model_dump())

    def response(self, prep: Prepared, gen: Generation, texts: list[str], usage: Usage) -> bytes:
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatMessageOut(content=texts[c.index]),
                finish_reason=c.finish_reason,
                token_ids=c.detok.ids,
                logprobs=chat_logprobs(self.tokenizer, c.logprobs) if prep.params.logprobs is not None else None,
            )
            for c in gen.choices
        ]
        prompt_lps = endpoint.prompt_logprobs(self.tokenizer, prep, gen.choices[0])  # one prompt for every choice
        body = ChatResponse.model_validate(
            {**prep.meta, "choices": choices, "usage": usage, "prompt_logprobs": prompt_lps}
        )
        return body.model_dump_json().encode()


async def handle(request: web.Request, req: ChatCompletionRequest, state: ServerState) -> web.StreamResponse:
    return await endpoint.run(
        request, state, prepare(req, state), ChatFormatter(state.engine.tokenizer if state.engine else None)
    )
