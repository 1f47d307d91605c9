"""Engine interface (stub; the implementation lands in the next commit).

The serve engineer codes against these names; they will not change.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # the engine always adds the checkpoint's eos ids


class RequestError(Exception):
    """Raised to the consumer of a request the engine could not complete."""


@dataclass
class EngineStats:
    step: int = 0
    queue_depth: int = 0
    running: int = 0
    effective_batch_size: int = 1
    max_batch_size: int = 1
    oom_count: int = 0
    last_error: str = ""
    tokens_generated: int = 0


@dataclass(frozen=True)
class StepInfo:
    step: int
    batch_size: int
    num_prefill_tokens: int
    num_decode_tokens: int
    duration_s: float


_END = object()


class Request:
    """One generation request; iterate it to receive token ids as they are produced."""

    def __init__(self, req_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.id = req_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.finish_reason: str | None = None
        self._q: queue.Queue[Any] = queue.Queue()
        self._cancel: str | None = None
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, RequestError):
                raise item
            yield item

    def cancel(self, reason: str = "abort") -> None:
        with self._lock:
            if self._cancel is None:
                self._cancel = reason


class Engine:
    rank: int
    world_size: int
    is_ready: bool
    model_name: str
    max_model_len: int
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    on_step: Callable[[StepInfo], None] | None

    @classmethod
    def from_args(cls, args: Any) -> Engine:
        raise NotImplementedError

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        raise NotImplementedError

    def run_forever(self, stop: threading.Event) -> None:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError
