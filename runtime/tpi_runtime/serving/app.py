"""HTTP routes on aiohttp.

Why aiohttp: it is asyncio-native, already in this project (kopf depends on it), needs no separate
ASGI server, and its ``handler_cancellation`` cancels a handler when its client disconnects, which
is how a vanished client frees its batch slot. Every error, including routing (404/405), oversized
(413) and malformed bodies, leaves in OpenAI's error shape; only a bug is a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from tpi_runtime.metrics import CONTENT_TYPE_LATEST

from . import chat, completions, tokenize
from .errors import ApiError, from_validation
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .state import ServerState

log = logging.getLogger("tpi_runtime.serving")

BODY_READ_TIMEOUT_S = 30.0  # a client trickling its body cannot hold a request open longer
_STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)
M = TypeVar("M", bound=BaseModel)
_API_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
_TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")  # vLLM's (serving/tokenize.py)


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(obj).encode(), content_type="application/json", headers=headers)


def _error_response(e: ApiError) -> web.Response:
    return web.Response(status=e.status, body=e.body(), content_type="application/json", headers=e.headers)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    state = request.app[_STATE]
    try:
        return await handler(request)
    except ApiError as e:
        if request.path in _API_PATHS and not e.counted:  # refused before generation started
            if e.status in (429, 503):
                state.metrics.rejections.labels(rank=state.metrics.rank, reason=e.code or "other").inc()
            state.metrics.observe_request(e.status, None)
        return _error_response(e)
    except web.HTTPException as e:  # routing and body-size errors from aiohttp itself
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        return _error_response(
            ApiError(e.status, f"{e.reason}: {request.method} {request.path}", code=code, headers=headers)
        )


async def _read_model(request: web.Request, model: type[M]) -> M:
    try:
        raw = await asyncio.wait_for(request.read(), BODY_READ_TIMEOUT_S)
    except TimeoutError:
        raise ApiError(
            HTTPStatus.REQUEST_TIMEOUT, "the request body did not arrive in time", code="request_timeout"
        ) from None
    try:
        json.loads(raw)  # the stdlib parser first: it bounds nesting (RecursionError) and checks UTF-8
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    try:
        req = model.model_validate_json(raw)
    except ValidationError as e:
        raise from_validation(e) from None
    warn = getattr(req, "warn_unknown", None)
    if warn is not None:
        warn()
    return req


async def healthz(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    alive = st.alive_fn()
    return _json(200 if alive else 503, {"status": "ok" if alive else "dead", "rank": st.rank})


async def readyz(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    body: dict[str, Any] = {"status": st.phase, "rank": st.rank}
    if body["status"] == "waiting":
        body["waiting_for"] = st.waiting_for
    return _json(200 if st.ready else 503, body)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[_STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _model_card(st: ServerState) -> dict[str, Any]:
    card: dict[str, Any] = {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "tpi"}
    if st.engine is not None:
        card["max_model_len"] = st.engine.max_model_len
    return card


async def models(request: web.Request) -> web.Response:
    return _json(200, {"object": "list", "data": [_model_card(request.app[_STATE])]})


async def model(request: web.Request) -> web.Response:
    """OpenAI's ``GET /v1/models/{model}`` (the client's ``models.retrieve``)."""
    st = request.app[_STATE]
    st.check_model(request.match_info["model"])
    return _json(200, _model_card(st))


async def v1_completions(request: web.Request) -> web.StreamResponse:
    st = request.app[_STATE]
    st.require_engine()
    return await completions.handle(request, await _read_model(request, CompletionRequest), st)


async def v1_chat(request: web.Request) -> web.StreamResponse:
    st = request.app[_STATE]
    st.require_engine()
    return await chat.handle(request, await _read_model(request, ChatCompletionRequest), st)


async def post_tokenize(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    return _json(200, tokenize.tokenize(await _read_model(request, TokenizeRequest), st))


async def post_detokenize(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    return _json(200, tokenize.detokenize(await _read_model(request, DetokenizeRequest), st))


async def get_tokenizer_info(request: web.Request) -> web.Response:
    return _json(200, tokenize.tokenizer_info(request.app[_STATE]))


async def rank0_only(request: web.Request) -> web.Response:
    raise ApiError(404, f"no route {request.method} {request.path} (the API is served by rank 0)", code="not_found")


def build_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=state.max_body_bytes, middlewares=[_errors])
    app[_STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics, allow_head=False)
    if state.rank == 0:
        app.router.add_get("/v1/models", models, allow_head=False)
        app.router.add_get("/v1/models/{model:.+}", model, allow_head=False)  # ids may contain '/'
        app.router.add_post("/v1/completions", v1_completions)
        app.router.add_post("/v1/chat/completions", v1_chat)
        app.router.add_post("/tokenize", post_tokenize)
        app.router.add_post("/detokenize", post_detokenize)
        app.router.add_get("/tokenizer_info", get_tokenizer_info, allow_head=False)
    else:
        for path in (*_API_PATHS, "/v1/models/{model:.+}", *_TOKENIZER_PATHS):
            app.router.add_route("*", path, rank0_only)
    return app
