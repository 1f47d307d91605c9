"""What the HTTP handlers share: the engine (None while loading), metrics and lifecycle flags."""

from __future__ import annotations

import time
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

from .errors import ApiError, unavailable

if TYPE_CHECKING:
    from tpi_runtime.engine import Engine
    from tpi_runtime.metrics import RuntimeMetrics

    from .chat_template import ChatTemplate

MAX_BODY_BYTES = 4 * 1024 * 1024  # a 128k-token prompt as JSON ids is ~1 MiB; anything bigger is abuse
DEFAULT_REQUEST_TIMEOUT_S = 600.0


class ServerState:
    def __init__(
        self,
        rank: int,
        model_name: str,
        metrics: RuntimeMetrics,
        engine: Engine | None = None,
        alive_fn: Callable[[], bool] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        model_dir: str | None = None,
    ) -> None:
        self.rank = rank
        self.model_name = model_name
        self.metrics = metrics
        self.engine = engine
        self.alive_fn = alive_fn or (lambda: True)
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.model_dir = model_dir
        self.chat_template: ChatTemplate | None = None
        self.chat_template_error = "no chat template loaded"
        self.stopping = False  # set on SIGTERM: /readyz drops the rank, new requests get 503
        #: Ranks this one waits for before the group can form (None: not waiting).
        self.waiting_for: list[int] | None = None
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        e = self.engine
        return e is not None and bool(getattr(e, "is_ready", False)) and not self.stopping

    def set_waiting_for(self, missing: list[int]) -> None:
        """The rendezvous' report (from the main thread; /readyz reads it)."""
        self.waiting_for = list(missing) or None

    @property
    def phase(self) -> str:
        """What /readyz says: ready, stopping, waiting (for missing ranks) or loading."""
        if self.ready:
            return "ready"
        if self.stopping:
            return "stopping"
        return "waiting" if self.waiting_for else "loading"

    def check_model(self, name: str | None) -> None:
        """OpenAI's 404 for a model other than the one served; no name means the served one."""
        if name is not None and name != self.model_name:
            raise ApiError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def require_engine(self) -> Engine:
        engine = self.engine
        if engine is None or not self.ready:
            if self.stopping:
                why = "the server is shutting down"
            elif self.waiting_for:
                why = f"the tensor-parallel group is not formed yet: waiting for ranks {self.waiting_for}"
            else:
                why = "the model is not ready yet"
            raise unavailable(why, "not_ready")
        return engine

    def generation_error(self, e: Exception) -> ApiError:
        if self.stopping:  # the engine ended in-flight requests because the rank is stopping
            return unavailable(f"generation interrupted: {e}", "shutting_down")
        return ApiError(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            f"generation failed: {e}",
            type_="internal_error",
            code="generation_failed",
        )
