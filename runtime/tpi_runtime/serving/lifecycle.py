"""``python -m tpi_runtime serve``: ports, the HTTP thread, signals, drain and exit codes.

The engine's loop keeps the main thread. The HTTP server runs its own asyncio loop in a daemon
thread and reaches the engine only through thread-safe calls (submit, cancel, stats).

Ports: global rank 0 serves the API on ``--port``; every other rank serves /healthz, /readyz and
/metrics on ``--port + LOCAL_RANK`` (in a pod LOCAL_RANK is 0, so every pod uses ``--port``; under
``torchrun --nproc-per-node N`` on one host the local ranks get distinct ports).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from tpi_contract import defaults, keys

from tpi_runtime.metrics import RuntimeMetrics

from .app import build_app
from .chat_template import ChatTemplate, TemplateError
from .state import ServerState

if TYPE_CHECKING:
    from tpi_runtime.engine import Engine
    from tpi_runtime.settings import RuntimeSettings

log = logging.getLogger("tpi_runtime.serving")

KEEPALIVE_TIMEOUT_S = 15.0  # idle keep-alive connections are closed after this


def serving_port(base: int, rank: int, local_rank: int) -> int:
    """Rank 0: the API port; other ranks: base + LOCAL_RANK (cannot clash on one host)."""
    return base if rank == 0 else base + local_rank


class HttpServer:
    """An aiohttp server on its own event loop in a daemon thread."""

    def __init__(self, state: ServerState, host: str, port: int) -> None:
        self.state = state
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(host, port), name="http", daemon=True)

    def start(self) -> HttpServer:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        log.info("rank %d serving HTTP on port %d", self.state.rank, self.port)
        return self

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = web.AppRunner(
                build_app(self.state),
                handler_cancellation=True,
                keepalive_timeout=KEEPALIVE_TIMEOUT_S,
                access_log=None,
            )
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, host, port, backlog=1024, reuse_address=True)
            self._loop.run_until_complete(site.start())
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                self.port = int(server.sockets[0].getsockname()[1])
        except BaseException as e:
            self._error = e
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def stop(self, timeout: float = 5.0) -> None:
        if self._runner is None or not self._thread.is_alive():
            return

        async def _cleanup() -> None:
            assert self._runner is not None
            await self._runner.cleanup()
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(_cleanup(), self._loop)
        self._thread.join(timeout)


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
    extra = 0.0 if state.rank == 0 else defaults.FOLLOWER_EXTRA_SECONDS
    deadline = time.monotonic() + drain_s + extra
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


def _load_chat_template(state: ServerState, model: str, engine: Engine) -> None:
    try:
        if engine.checkpoint.gguf_path is None:
            state.chat_template = ChatTemplate.load(model)
        elif engine.chat_template is None:
            raise TemplateError(
                f"{engine.checkpoint.gguf_path} has no tokenizer.chat_template in its metadata; "
                "use /v1/completions instead"
            )
        else:  # a GGUF file: the template and its special tokens come from the file's metadata
            tok = engine.tokenizer

            def text(token_id: int | None) -> str | None:
                return tok.id_to_token(token_id) if tok is not None and token_id is not None else None

            eos = engine.eos_token_ids[0] if engine.eos_token_ids else None
            state.chat_template = ChatTemplate(engine.chat_template, text(engine.config.bos_token_id), text(eos))
    except (TemplateError, OSError, ValueError) as e:  # chat answers 400 with this; completions work
        state.chat_template_error = str(e)
        log.info("chat completions disabled: %s", e)


def serve_main(settings: RuntimeSettings) -> int:
    """Returns 0 after a graceful stop (SIGTERM/SIGINT: drain for up to ``settings.drain_seconds``).
    Errors building the engine propagate (``__main__`` maps config errors to exit 2). If the main
    loop raises, the process exits 1 at once (collective failures already exit 3 in ``dist``)."""
    from tpi_runtime.engine import Engine
    from tpi_runtime.heartbeat import heartbeat_from_settings
    from tpi_runtime.rendezvous import Aborted

    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank = settings.rank
    drain_s = settings.drain_seconds
    model_name = settings.served_model_name or os.path.basename(os.path.normpath(settings.model))
    stop = threading.Event()
    main_thread = threading.current_thread()
    metrics = RuntimeMetrics(rank, engine_fn=lambda: state.engine)  # read at scrape time
    state = ServerState(
        rank, model_name, metrics, alive_fn=main_thread.is_alive, request_timeout_s=settings.request_timeout_seconds
    )

    def on_signal(signum: int, _frame: Any) -> None:
        if state.stopping:  # second signal: do not wait for the drain
            log.warning("signal %d again; exiting now", signum)
            os._exit(128 + signum)
        log.info("signal %d: draining for up to %.0fs, then stopping", signum, drain_s)
        state.stopping = True
        threading.Thread(target=_drain_then_stop, args=(state, stop, drain_s), name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Probes answer while weights load: /healthz 200, /readyz 503.
    port = serving_port(settings.port, rank, settings.process.dist.local_rank)
    httpd = HttpServer(state, settings.host, port).start()
    heartbeat = None
    try:
        # Until every rank is there the engine waits without a deadline (/readyz: "waiting");
        # SIGTERM ends that wait (stop is set at once when there is nothing to drain).
        engine = Engine.from_settings(settings, stop=stop, on_wait=state.set_waiting_for)
    except Aborted as e:
        log.info("rank %d: %s; exiting", rank, e)
        httpd.stop()
        return 0
    except BaseException:
        httpd.stop()
        raise
    if settings.served_model_name is None and getattr(engine, "model_name", None):
        state.model_name = engine.model_name
    if getattr(engine, "on_step", None) is None:
        engine.on_step = state.metrics.on_step
    engine.max_waiting = settings.max_queue
    if rank == 0:
        _load_chat_template(state, settings.model, engine)
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
        httpd.stop()
    if code:
        # Do not let interpreter shutdown hang on a broken process group (NCCL/gloo threads).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
