"""OpenAI request and response models (pydantic), for ``/v1/completions`` and ``/v1/chat/completions``.

Field names and defaults follow OpenAI, plus vLLM's extensions (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos) and ``token_ids`` in completion choices. Bounds are Field constraints,
so an out-of-range or wrongly typed value is a 400 before anything reaches the engine. Validation is
strict (JSON true is not 1, "5" is not 5). Unknown fields are accepted and logged, as vLLM does.
OpenAI fields this server cannot honour (``response_format`` other than text, tool calling,
``suffix``) are declared here so that the endpoints refuse them with a 400 (``unsupported``)
instead of ignoring them: a client asking for JSON or a tool call must not get plain text back as
if it had.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("tpi_runtime.serving")

MAX_STOP = 16
MAX_N = 16
MAX_PROMPTS = 256  # prompts in one completions request (a batch)
TokenId = Annotated[int, Field(ge=0)]
Prob = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
MAX_LOGIT_BIAS = 1024  # entries per request: each is one scattered add on the device
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]  # OpenAI's range


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def warn_unknown(self) -> None:
        if self.model_extra:
            log.warning("ignoring unknown request fields: %s", ", ".join(sorted(self.model_extra)))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str  # only "text" is served; the endpoints refuse the others


class SamplingFields(_Request):
    """What both endpoints accept."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1: off
    min_p: Prob | None = None
    seed: int | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=256)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    ignore_eos: bool = False
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0, allow_inf_nan=False)] | None = 1.0
    #: OpenAI's: token id (a decimal string) -> a bias added to its logit before sampling.
    logit_bias: Annotated[dict[str, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    #: vLLM's: each prompt token's logprob, rank and the top k alternatives (not streamed).
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            if not self.stop:
                return []
            return [self.stop]
        return list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | list[TokenId]
        | Annotated[list[str], Field(max_length=MAX_PROMPTS)]
        | Annotated[list[list[TokenId]], Field(max_length=MAX_PROMPTS)]
    )
    #: 0 only with echo: the prompt (and with logprobs its tokens' logprobs), nothing generated.
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[TextPart] | None = None

    def as_template_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=False)
        if isinstance(self.content, list):
            d["content"] = "".join(p.text for p in self.content)
        return d


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True
    # Tool calling is not served: declared so that a request relying on it is refused (chat.py).
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None  # the deprecated form of tools
    function_call: str | dict[str, Any] | None = None
    #: vLLM's: when the last message is the assistant's (a reply to continue), it leads the reply.
    echo: bool | None = False


MAX_TOKENIZE_IDS = 1 << 20  # /detokenize: a 4 MiB body holds fewer ids than this anyway


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize``: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (vLLM's)
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_TOKENIZE_IDS)]


# ------------------------------------------------------------------------------ responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    token_ids: list[int]  # extension: the generated ids (the e2e tier reads them)
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's (the request's prompt_logprobs)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None
    token_ids: list[int]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's (the request's prompt_logprobs)


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None
    token_ids: list[int]


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody
