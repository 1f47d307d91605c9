"""HTTP serving for one runtime rank (stdlib ``ThreadingHTTPServer``, no web framework).

Every rank serves ``/healthz``, ``/readyz`` and ``/metrics``; rank 0 also serves the
OpenAI-compatible ``POST /v1/completions`` and ``GET /v1/models``. Handler threads only talk to
the engine through ``engine.submit`` (thread-safe) and by iterating the returned request; the
engine's main loop owns the main thread (``serve_main``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from tpi_contract import keys

from tpi_runtime.metrics import CONTENT_TYPE_LATEST, RuntimeMetrics

if TYPE_CHECKING:
    from tpi_runtime.engine import Engine
    from tpi_runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024  # a 128k-token prompt as JSON ids is ~1 MiB; anything bigger is abuse
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16
_DISCONNECT_POLL_S = 0.25  # how often a non-streaming handler checks for a vanished client

# Parameters we accept. The OpenAI ones we do not implement are accepted only at their neutral
# value so that stock clients (which send e.g. "logprobs": null) keep working.
_NEUTRAL_PARAMS: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v is None or (type(v) is int and v == 1),
    "echo": lambda v: v is None or v is False,
    "logprobs": lambda v: v is None,
    "suffix": lambda v: v is None or v == "",
    "presence_penalty": lambda v: v is None or (type(v) in (int, float) and v == 0),
    "frequency_penalty": lambda v: v is None or (type(v) in (int, float) and v == 0),
    "logit_bias": lambda v: v is None or v == {},
    "user": lambda v: v is None or isinstance(v, str),
}
_PARAMS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "n",
    "stream_options",
    *_NEUTRAL_PARAMS,
}


class ApiError(Exception):
    """An error returned to the client in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------
# Request parsing and validation
# ---------------------------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    prompt_ids: list[int]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass; JSON true must not pass as 1


def _is_number(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


def _bad(message: str, param: str | None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, param=param, code=code)


def _token_ids(v: list[Any], param: str = "prompt") -> list[int]:
    if not all(_is_int(t) for t in v):
        raise _bad("prompt token ids must be integers", param, "invalid_type")
    if any(t < 0 for t in v):
        raise _bad("prompt token ids must be non-negative", param)
    return list(v)


def parse_completion_request(
    body: Any, tokenizer: Any, max_model_len: int, model_name: str
) -> CompletionRequest:
    """Validate an OpenAI ``/v1/completions`` body; raises ``ApiError`` (4xx) on anything invalid."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", None, "invalid_type")
    for key in body:
        if key not in _PARAMS:
            raise _bad(f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")
    for key, ok in _NEUTRAL_PARAMS.items():
        if key in body and not ok(body[key]):
            raise _bad(
                f"'{key}' is not supported by this server (only its default value is)", key, "unsupported"
            )

    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _bad("'model' must be a string", "model", "invalid_type")
        if model != model_name:
            raise ApiError(
                HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist.", "model", "model_not_found"
            )

    req = CompletionRequest(prompt_ids=[])

    n = body.get("n")
    if n is not None and not (_is_int(n) and n == 1):
        raise _bad("only n=1 is supported", "n")

    mt = body.get("max_tokens")
    if mt is not None:
        if not _is_int(mt):
            raise _bad("'max_tokens' must be an integer", "max_tokens", "invalid_type")
        if mt < 1:
            raise _bad("'max_tokens' must be at least 1", "max_tokens")
        req.max_tokens = mt

    t = body.get("temperature")
    if t is not None:
        if not _is_number(t):
            raise _bad("'temperature' must be a number", "temperature", "invalid_type")
        if t < 0:
            raise _bad("'temperature' must be >= 0", "temperature")
        req.temperature = float(t)

    p = body.get("top_p")
    if p is not None:
        if not _is_number(p):
            raise _bad("'top_p' must be a number", "top_p", "invalid_type")
        if not 0 < p <= 1:
            raise _bad("'top_p' must be in (0, 1]", "top_p")
        req.top_p = float(p)

    k = body.get("top_k")
    if k is not None:
        if not _is_int(k):
            raise _bad("'top_k' must be an integer", "top_k", "invalid_type")
        if k < -1:
            raise _bad("'top_k' must be >= 0 (0 or -1 disables it)", "top_k")
        req.top_k = max(k, 0)

    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise _bad("'seed' must be an integer", "seed", "invalid_type")
        if not 0 <= seed < 2**63:
            raise _bad("'seed' must be in [0, 2^63)", "seed")
        req.seed = seed

    stream = body.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise _bad("'stream' must be a boolean", "stream", "invalid_type")
        req.stream = stream
    so = body.get("stream_options")
    if so is not None:
        if (
            not isinstance(so, dict)
            or set(so) - {"include_usage"}
            or not isinstance(so.get("include_usage", False), bool)
        ):
            raise _bad("'stream_options' must be {\"include_usage\": bool}", "stream_options", "invalid_type")
        if not req.stream:
            raise _bad("'stream_options' is only allowed with stream=true", "stream_options")
        req.include_usage = bool(so.get("include_usage", False))

    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
        if len(stops) > MAX_STOP_STRINGS:
            raise _bad(f"at most {MAX_STOP_STRINGS} stop strings are supported", "stop")
        if any(s == "" for s in stops):
            raise _bad("stop strings must be non-empty", "stop")
        if stops and tokenizer is None:
            raise _bad("stop strings need a tokenizer; this checkpoint has none", "stop", "tokenizer_missing")
        req.stop = stops

    if "prompt" not in body:
        raise _bad("'prompt' is required", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one: ["text"] or [[ids]]
    if isinstance(prompt, str):
        if tokenizer is None:
            raise _bad(
                "this checkpoint has no tokenizer; send the prompt as token ids",
                "prompt",
                "tokenizer_missing",
            )
        req.prompt_ids = list(tokenizer.encode(prompt).ids)
    elif isinstance(prompt, list):
        if prompt and all(isinstance(x, str | list) for x in prompt):
            raise _bad("only one prompt per request is supported", "prompt")
        req.prompt_ids = _token_ids(prompt)
    else:
        raise _bad(
            "'prompt' must be a string, a list of token ids, or a list with one of those",
            "prompt",
            "invalid_type",
        )
    if not req.prompt_ids:
        raise _bad("the prompt is empty", "prompt")

    total = len(req.prompt_ids) + req.max_tokens
    if total > max_model_len:
        raise _bad(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {total} "
            f"tokens ({len(req.prompt_ids)} in the prompt, {req.max_tokens} for the completion). "
            "Please reduce the prompt or the completion length.",
            "prompt" if len(req.prompt_ids) >= max_model_len else "max_tokens",
            "context_length_exceeded",
        )
    return req


# ---------------------------------------------------------------------------------------------
# Incremental detokenisation with stop strings
# ---------------------------------------------------------------------------------------------
class TextAssembler:
    """Turns generated token ids into text deltas, holding back what a stop string could still claim.

    Text is decoded with a few prompt tokens in front, so tokenizers that drop a word's leading
    space at the start of a decode (SentencePiece) produce " world", not "world". A delta never
    contains an incomplete UTF-8 character (U+FFFD at the tail) or a possible stop-string prefix;
    both are released by ``finish``. Streaming and non-streaming requests both concatenate the
    deltas, so their texts are identical by construction.
    """

    _CONTEXT_TOKENS = 4

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of self.text already handed out
        self.text = ""
        self.stopped = False
        self._ctx = list(prompt_ids[-self._CONTEXT_TOKENS :]) if tokenizer is not None else []
        self._ctx_text = self._decode(self._ctx) if self._ctx else ""
        self._hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _full_text(self) -> str:
        if self.tokenizer is None:
            return ""
        full = self._decode(self._ctx + self.ids)
        if self._ctx_text and full.startswith(self._ctx_text):
            return full[len(self._ctx_text) :]
        return self._decode(self.ids)

    def add(self, token_id: int) -> str:
        """Add one token; returns the text that may be released now. Sets ``stopped`` on a stop match."""
        self.ids.append(token_id)
        self.text = self._full_text()
        if self.stop:
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                self.text = self.text[:cut]
                return self._release(len(self.text))
        safe = len(self.text)
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1  # an incomplete multi-byte character; the next token completes it
        if self._hold:
            for k in range(min(self._hold, safe - self.emitted), 0, -1):
                tail = self.text[safe - k : safe]
                if any(s.startswith(tail) for s in self.stop):
                    safe -= k
                    break
        return self._release(safe)

    def finish(self) -> str:
        """Release everything still held back (generation ended without a stop string)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out


# ---------------------------------------------------------------------------------------------
# Server state and HTTP handler
# ---------------------------------------------------------------------------------------------
class ServerState:
    """What handler threads share: the engine (None while loading), metrics, lifecycle flags."""

    def __init__(
        self,
        rank: int,
        model_name: str,
        metrics: RuntimeMetrics,
        engine: Engine | None = None,
        alive_fn: Callable[[], bool] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.rank = rank
        self.model_name = model_name
        self.metrics = metrics
        self.engine = engine
        self.alive_fn = alive_fn or (lambda: True)
        self.max_body_bytes = max_body_bytes
        self.stopping = False  # set on SIGTERM so /readyz drops the rank from Service endpoints
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        e = self.engine
        return e is not None and bool(getattr(e, "is_ready", False)) and not self.stopping


_ROUTES: dict[str, tuple[str, ...]] = {
    "/healthz": ("GET", "HEAD"),
    "/readyz": ("GET", "HEAD"),
    "/metrics": ("GET",),
    "/v1/models": ("GET",),
    "/v1/completions": ("POST",),
}
_RANK0_ONLY = ("/v1/models", "/v1/completions")


class _ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that pool connections
    server_version = "tpi-runtime"
    timeout = 300  # idle keep-alive connections do not pin a thread forever
    server: TPIHTTPServer

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def state(self) -> ServerState:
        return self.server.state

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send_bytes(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(obj).encode(), "application/json", headers)

    def _send_error(self, err: ApiError, headers: dict[str, str] | None = None) -> None:
        # Close after errors: the request body may be unread, and a fresh connection is cheap.
        self.close_connection = True
        self._send_json(err.status, err.body(), headers)

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            methods = _ROUTES.get(path)
            if methods is None or (path in _RANK0_ONLY and self.state.rank != 0):
                where = " (completions are served by rank 0)" if path in _RANK0_ONLY else ""
                raise ApiError(
                    HTTPStatus.NOT_FOUND, f"no route {self.command} {path}{where}", code="not_found"
                )
            if self.command not in methods:
                raise ApiError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"method {self.command} not allowed on {path}",
                    code="method_not_allowed",
                )
            getattr(self, "_route_" + path.strip("/").replace("/", "_"))()
        except ApiError as e:
            headers = (
                {"Allow": ", ".join(_ROUTES[path])} if e.status == HTTPStatus.METHOD_NOT_ALLOWED else None
            )
            self._send_error(e, headers)
        except (ConnectionError, TimeoutError, _ClientGone):  # the client left or stalled
            self.close_connection = True
        except Exception:
            log.exception("unhandled error serving %s %s", self.command, path)
            with contextlib.suppress(OSError):
                self._send_error(
                    ApiError(
                        HTTPStatus.INTERNAL_SERVER_ERROR,
                        "internal server error",
                        type_="internal_error",
                        code="internal_error",
                    )
                )

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    # -- probes and metrics --------------------------------------------------------------------
    def _route_healthz(self) -> None:
        alive = self.state.alive_fn()
        self._send_json(200 if alive else 503, {"status": "ok" if alive else "dead", "rank": self.state.rank})

    def _route_readyz(self) -> None:
        st = self.state
        ready = st.ready
        status = "ready" if ready else ("stopping" if st.stopping else "loading")
        self._send_json(200 if ready else 503, {"status": status, "rank": st.rank})

    def _route_metrics(self) -> None:
        self._send_bytes(200, self.state.metrics.render(), CONTENT_TYPE_LATEST)

    def _route_v1_models(self) -> None:
        st = self.state
        card: dict[str, Any] = {
            "id": st.model_name,
            "object": "model",
            "created": st.created,
            "owned_by": "tpi",
        }
        if st.engine is not None:
            card["max_model_len"] = st.engine.max_model_len
        self._send_json(200, {"object": "list", "data": [card]})

    # -- completions ---------------------------------------------------------------------------
    def _read_json(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(
                HTTPStatus.LENGTH_REQUIRED,
                "chunked request bodies are not supported; send Content-Length",
                code="length_required",
            )
        raw_len = self.headers.get("Content-Length")
        if raw_len is None:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required", code="length_required")
        try:
            length = int(raw_len)
            if length < 0:
                raise ValueError
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "invalid Content-Length", code="invalid_header") from None
        if length > self.state.max_body_bytes:
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {length} bytes exceeds the {self.state.max_body_bytes}-byte limit",
                code="request_too_large",
            )
        data = self.rfile.read(length)
        if len(data) != length:
            raise _ClientGone()
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {e}", code="invalid_json"
            ) from None

    def _route_v1_completions(self) -> None:
        st = self.state
        t0 = time.monotonic()
        try:
            body = self._read_json()
            engine = st.engine
            if engine is None or not st.ready:
                raise ApiError(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "the server is shutting down" if st.stopping else "the model is not ready yet",
                    type_="service_unavailable",
                    code="not_ready",
                )
            creq = parse_completion_request(body, engine.tokenizer, engine.max_model_len, st.model_name)
            request = self._submit(engine, creq)
        except ApiError as e:
            st.metrics.observe_request(e.status, None)
            raise
        st.metrics.prompt_tokens.inc(len(creq.prompt_ids))
        asm = TextAssembler(engine.tokenizer, creq.prompt_ids, creq.stop)
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": st.model_name,
        }
        gen = _Generation(self, request, asm, t0)
        if creq.stream:
            self._stream(gen, creq, meta)
        else:
            self._complete(gen, creq, meta)

    def _submit(self, engine: Engine, creq: CompletionRequest) -> Any:
        from tpi_runtime.engine import RequestError, SamplingParams

        params = SamplingParams(
            max_tokens=creq.max_tokens,
            temperature=creq.temperature,
            top_p=creq.top_p,
            top_k=creq.top_k,
            seed=creq.seed,  # the engine adds the checkpoint's eos ids itself
        )
        try:
            return engine.submit(creq.prompt_ids, params)
        except ValueError as e:  # the engine's own validation (e.g. a token id outside the vocabulary)
            raise _bad(str(e), "prompt") from None
        except (RequestError, RuntimeError) as e:  # RuntimeError: the engine has stopped
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the engine rejected the request: {e}",
                type_="service_unavailable",
                code="engine_unavailable",
            ) from None

    def _generation_error(self, e: Exception) -> ApiError:
        if self.state.stopping:  # the engine ended in-flight requests because the rank is stopping
            return ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"generation interrupted: {e}",
                type_="service_unavailable",
                code="shutting_down",
            )
        return ApiError(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            f"generation failed: {e}",
            type_="internal_error",
            code="generation_failed",
        )

    def _usage(self, creq: CompletionRequest, n_gen: int) -> dict[str, int]:
        return {
            "prompt_tokens": len(creq.prompt_ids),
            "completion_tokens": n_gen,
            "total_tokens": len(creq.prompt_ids) + n_gen,
        }

    def _complete(self, gen: _Generation, creq: CompletionRequest, meta: dict[str, Any]) -> None:
        from tpi_runtime.engine import RequestError

        text: list[str] = []
        try:
            for delta, _tok in gen.tokens(poll_disconnect=True):
                text.append(delta)
        except RequestError as e:
            err = self._generation_error(e)
            gen.record(err.status)
            raise err from None
        text.append(gen.asm.finish() if not gen.asm.stopped else "")
        gen.record(200)
        choice = {
            "index": 0,
            "text": "".join(text),
            "token_ids": gen.asm.ids,
            "finish_reason": gen.finish_reason,
            "logprobs": None,
        }
        self._send_json(200, {**meta, "choices": [choice], "usage": self._usage(creq, len(gen.asm.ids))})

    def _stream(self, gen: _Generation, creq: CompletionRequest, meta: dict[str, Any]) -> None:
        from tpi_runtime.engine import RequestError

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(text: str, token_ids: list[int], finish_reason: str | None) -> dict[str, Any]:
            return {
                **meta,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "token_ids": token_ids,
                        "finish_reason": finish_reason,
                        "logprobs": None,
                    }
                ],
            }

        try:
            try:
                for delta, tok in gen.tokens(poll_disconnect=False):
                    self._sse(chunk(delta, [tok], None))
            except RequestError as e:
                err = self._generation_error(e)
                gen.record(err.status)
                self._sse(err.body())
                self._sse_raw(b"data: [DONE]\n\n")
                self._end_chunks()
                return
            self._sse(chunk("" if gen.asm.stopped else gen.asm.finish(), [], gen.finish_reason))
            if creq.include_usage:
                self._sse({**meta, "choices": [], "usage": self._usage(creq, len(gen.asm.ids))})
            self._sse_raw(b"data: [DONE]\n\n")
            self._end_chunks()
            gen.record(200)
        except OSError:  # client went away mid-stream: free the batch slot
            gen.abort()
            raise _ClientGone() from None

    def _sse(self, obj: Any) -> None:
        self._sse_raw(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _sse_raw(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def client_gone(self) -> bool:
        """True when the peer closed the connection (readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class _Generation:
    """Iterates one engine request, applying stop strings, and records per-request metrics."""

    def __init__(self, handler: Handler, request: Any, asm: TextAssembler, t0: float) -> None:
        self.handler = handler
        self.request = request
        self.asm = asm
        self.t0 = t0
        self.t_first: float | None = None
        self.finish_reason: str | None = None
        self._recorded = False

    def tokens(self, poll_disconnect: bool) -> Iterator[tuple[str, int]]:
        last_poll = time.monotonic()
        for tok in self.request:
            now = time.monotonic()
            if self.t_first is None:
                self.t_first = now
            delta = self.asm.add(int(tok))
            yield delta, int(tok)
            if self.asm.stopped:
                self.request.cancel("stop")
                self.finish_reason = "stop"
                return
            if poll_disconnect and now - last_poll > _DISCONNECT_POLL_S:
                last_poll = now
                if self.handler.client_gone():
                    self.abort()
                    raise _ClientGone()
        self.finish_reason = getattr(self.request, "finish_reason", None) or "length"

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.request.cancel("abort")
        self.finish_reason = "abort"
        self.record(499)  # nginx's "client closed request"

    def record(self, status: int) -> None:
        if self._recorded:
            return
        self._recorded = True
        m = self.handler.state.metrics
        now = time.monotonic()
        m.observe_request(int(status), self.finish_reason if status == 200 or status == 499 else None)
        m.request_latency.observe(now - self.t0)
        n = len(self.asm.ids)
        m.completion_tokens.inc(n)
        if self.t_first is not None:
            m.time_to_first_token.observe(self.t_first - self.t0)
            if n > 1:
                m.time_per_output_token.observe((now - self.t_first) / (n - 1))


class TPIHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must never keep the process alive
    allow_reuse_address = True
    # socketserver's default listen backlog of 5 resets bursts of concurrent clients.
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], state: ServerState) -> None:
        self.state = state
        super().__init__(addr, Handler)


def start_http_server(state: ServerState, host: str, port: int) -> TPIHTTPServer:
    """Bind and serve in a daemon thread; returns the server (``.server_address`` has the real port)."""
    httpd = TPIHTTPServer((host, port), state)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    log.info("rank %d serving HTTP on %s:%d", state.rank, *httpd.server_address[:2])
    return httpd


# ---------------------------------------------------------------------------------------------
# Process entry point
# ---------------------------------------------------------------------------------------------
def _engine_annotations(engine: Engine) -> dict[str, str]:
    s = engine.stats()
    return {
        keys.LEASE_RANK: str(engine.rank),
        keys.LEASE_STEP: str(getattr(s, "step", "")),
        keys.LEASE_LAST_ERROR: str(getattr(s, "last_error", "") or ""),
        keys.LEASE_OOM_COUNT: str(getattr(s, "oom_count", "")),
        keys.LEASE_LIVE_BATCH_SIZE: str(getattr(s, "effective_batch_size", "")),
    }


def _drain_then_stop(state: ServerState, stop: threading.Event, drain_s: float) -> None:
    """After SIGTERM: let rank 0 finish in-flight requests (new ones get 503), then stop the loop.

    Followers wait longer than rank 0's drain, so they normally leave on rank 0's shutdown step
    instead of abandoning a group that is still running collectives.
    """
    deadline = time.monotonic() + (drain_s if state.rank == 0 else drain_s + 5.0)
    while time.monotonic() < deadline and not stop.is_set():
        engine = state.engine
        if state.rank == 0 and engine is not None:
            s = engine.stats()
            if s.running == 0 and s.queue_depth == 0:
                break
        elif engine is None:
            break  # still loading: nothing to drain
        time.sleep(0.05)
    stop.set()


def serve_main(settings: RuntimeSettings) -> int:
    """``python -m tpi_runtime serve``: HTTP + heartbeat threads, engine main loop in this thread.

    Returns 0 after a graceful stop (SIGTERM/SIGINT: drain for up to ``settings.drain_seconds``,
    $TPI_DRAIN_SECONDS). Errors building the engine propagate (``__main__`` maps config errors to
    exit 2). If the main loop raises, the process exits 1 at once (collective failures already exit 3
    in ``dist``).
    """
    from tpi_runtime.engine import Engine
    from tpi_runtime.heartbeat import heartbeat_from_settings

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    rank = settings.rank
    drain_s = settings.drain_seconds
    model_name = settings.served_model_name or os.path.basename(os.path.normpath(settings.model))
    stop = threading.Event()
    main_thread = threading.current_thread()
    # The collector reads state.engine at scrape time (None while loading).
    metrics = RuntimeMetrics(rank, engine_fn=lambda: state.engine)
    state = ServerState(rank, model_name, metrics, alive_fn=main_thread.is_alive)

    def on_signal(signum: int, _frame: Any) -> None:
        if state.stopping:  # second signal: do not wait for the drain
            log.warning("signal %d again; exiting now", signum)
            os._exit(128 + signum)
        log.info("signal %d: draining for up to %.0fs, then stopping", signum, drain_s)
        state.stopping = True
        threading.Thread(
            target=_drain_then_stop, args=(state, stop, drain_s), name="drain", daemon=True
        ).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Probes answer while weights load: /healthz 200, /readyz 503.
    httpd = start_http_server(state, settings.host, settings.port)
    heartbeat = None
    try:
        engine = Engine.from_settings(settings)
    except BaseException:
        httpd.shutdown()
        httpd.server_close()
        raise
    if settings.served_model_name is None and getattr(engine, "model_name", None):
        state.model_name = engine.model_name
    if getattr(engine, "on_step", None) is None:
        engine.on_step = state.metrics.on_step
    state.engine = engine
    try:
        heartbeat = heartbeat_from_settings(
            settings.heartbeat,
            progress=lambda: int(engine.stats().step),
            annotations_fn=lambda: _engine_annotations(engine),
        )
        if heartbeat is not None:
            heartbeat.start()
    except Exception as e:  # a broken kubeconfig must not take the rank down
        log.warning("Lease heartbeat disabled: %s: %s", type(e).__name__, e)

    code = 0
    log.info("rank %d ready; entering main loop", rank)
    try:
        engine.run_forever(stop)
        log.info("main loop stopped")
    except BaseException:
        log.exception("rank %d: main loop failed", rank)
        code = 1
    finally:
        state.stopping = True
        if heartbeat is not None:
            heartbeat.stop(timeout=1.0)
        httpd.shutdown()
        httpd.server_close()
    if code:
        # Do not let interpreter shutdown hang on a broken process group (NCCL/gloo threads).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
