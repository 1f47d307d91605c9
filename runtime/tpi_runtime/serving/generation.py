"""One API request's engine requests, seen from asyncio.

The engine runs on the main thread; each engine request gets a listener that hands tokens to the
event loop with ``call_soon_threadsafe`` (never blocking the engine), into one queue per API request
that the handler drains. ``n`` choices of each prompt are ``n`` engine requests sharing that queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any

from tpi_runtime.engine import (
    END,
    Engine,
    PromptLogprobs,
    QueueFullError,
    Request,
    RequestError,
    SamplingParams,
    TokenLogprobs,
)

from .detokenizer import IncrementalDetokenizer
from .errors import ApiError, bad_request, unavailable

RETRY_AFTER_S = 1


@dataclass
class Choice:
    index: int
    detok: IncrementalDetokenizer
    request: Request | None = None
    finish_reason: str | None = None
    done: bool = False
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None  # prompt tokens 1.., before any token


@dataclass
class Event:
    """A delta for one choice; ``finish_reason`` is set on the choice's last event."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None  # set on the choice's first event only


class Generation:
    def __init__(
        self, engine: Engine, prompts: list[list[int]], params: SamplingParams, n: int, stop: list[str]
    ) -> None:
        """``n`` choices of each prompt, choice i of prompt i // n; all submitted, or none."""
        self.t0 = time.monotonic()
        self.t_first: float | None = None
        self._q: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.choices = [
            Choice(i, IncrementalDetokenizer(engine.tokenizer, prompts[i // n], stop)) for i in range(len(prompts) * n)
        ]
        try:
            for c in self.choices:
                # Seeded n > 1: each choice of a prompt its own (reproducible) stream.
                p = params if params.seed is None else replace(params, seed=params.seed + c.index % n)
                c.request = engine.submit(prompts[c.index // n], p, listener=self._listener(loop, c.index))
        except BaseException as e:
            self.abort()
            raise _submit_error(e) from None

    def _listener(self, loop: asyncio.AbstractEventLoop, index: int) -> Any:
        def push(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(self._q.put_nowait, (index, item))

        return push

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.detok.ids) for c in self.choices)

    async def events(self) -> AsyncIterator[Event]:
        """Deltas until every choice has finished; raises RequestError if the engine fails one."""
        pending = len(self.choices)
        while pending:
            index, item = await self._q.get()
            c = self.choices[index]
            if c.done:
                continue  # a stop string already ended it; late tokens from the engine
            if item is END:
                c.done, pending = True, pending - 1
                c.finish_reason = (c.request.finish_reason if c.request else None) or "length"
                yield Event(index, c.detok.finish(), [], c.finish_reason)
                continue
            if isinstance(item, BaseException):
                self.abort()
                raise item
            if isinstance(item, PromptLogprobs):  # comes before the choice's first token
                c.prompt_logprobs = item.entries
                yield Event(index, "", prompt_logprobs=item.entries)
                continue
            if self.t_first is None:
                self.t_first = time.monotonic()
            lps = []
            if isinstance(item, TokenLogprobs):
                lps = [item]
                c.logprobs.append(item)
                item = item.token
            delta = c.detok.add(int(item))
            if c.detok.stopped:
                if c.request is not None:
                    c.request.cancel("stop")
                c.done, pending, c.finish_reason = True, pending - 1, "stop"
                yield Event(index, delta, [int(item)], None, lps)
                yield Event(index, "", [], "stop")
                continue
            yield Event(index, delta, [int(item)], None, lps)

    def abort(self) -> None:
        """Free every slot (the engine applies cancellations before its next step)."""
        for c in self.choices:
            if c.request is not None and not c.done:
                c.request.cancel("abort")


def _submit_error(e: BaseException) -> BaseException:
    if isinstance(e, QueueFullError):
        return ApiError(
            HTTPStatus.TOO_MANY_REQUESTS,
            f"the server is overloaded ({e}); retry later",
            code="queue_full",
            type_="rate_limit_error",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(e, ValueError):  # the engine's own validation (e.g. a token outside the vocabulary)
        return bad_request(str(e), "prompt")
    if isinstance(e, RequestError | RuntimeError):  # RuntimeError: the engine has stopped
        return unavailable(f"the engine rejected the request: {e}", "engine_unavailable")
    return e
