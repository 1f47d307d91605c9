"""Continuous-batching generation engine over the tensor-parallel model.

Rank 0 owns the scheduler: it admits requests into free KV-cache slots between steps, builds one
packed batch (new prompts' prefills and running sequences' single-token decodes together),
broadcasts it, runs its share of the forward pass, samples from the all-gathered logits and
streams tokens to the requests. Ranks > 0 only follow the broadcasts. When there is no work,
rank 0 still broadcasts an idle step every `idle_interval_s`, so every rank's step counter (which
the heartbeat reports) advances only while the whole group is alive.

Step message: header int64[8] = [kind, n_tokens, n_seqs, step, effective_batch, oom_count, 0, 0],
then (work steps) payload int64[n_tokens + 3 * n_seqs] = token ids, then (slot, pos0, n) per sequence.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tpi_contract import env as env_names
from tpi_contract import exitcodes

from .checkpoint import Checkpoint
from .config import check_tp
from .cuda_graphs import make_decode_runner
from .dist import Dist, die
from .loader import LoadReport
from .model import BatchMeta, Transformer
from .sampling import RowHistory, RowParams, sample
from .settings import FaultInjection, ProcessSettings, RuntimeSettings

log = logging.getLogger("tpi_runtime.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STEP_IDLE, STEP_WORK, STEP_SHUTDOWN = 0, 1, 2
_HEADER = 8
# Out of GPU memory in the middle of a forward pass at TP > 1 (tpi_contract.exitcodes explains why).
EXIT_OUT_OF_MEMORY = exitcodes.OUT_OF_MEMORY
_M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # the engine adds the checkpoint's eos ids (unless ignore_eos)
    min_p: float = 0.0
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # k: each token is pushed as TokenLogprobs (top k alternatives)


@dataclass(frozen=True)
class TokenLogprobs:
    """What a request with ``logprobs`` set receives instead of a bare token id."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class RequestError(Exception):
    """Raised to the consumer of a request the engine could not complete."""


class QueueFullError(RequestError):
    """The admission queue is at its bound (``Engine.max_waiting``): retry later."""


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
END = _END  # what a request listener receives after the last token (or after a RequestError)


class Request:
    """One generation request; iterate it to receive generated token ids as they are produced.

    The token that triggered a stop (eos or a stop_token_id) is not yielded.
    """

    def __init__(
        self,
        req_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
        wake: Callable[[], None] | None = None,
        listener: Callable[[Any], None] | None = None,
    ) -> None:
        """``listener``: called on the engine thread with each token id, then a RequestError or END
        (instead of queueing them for iteration); it must not block (e.g. loop.call_soon_threadsafe)."""
        self.id = req_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.finish_reason: str | None = None
        self.output_ids: list[int] = []
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self._q: collections.deque[Any] = collections.deque()
        self._ready = threading.Condition()
        self._cancel: str | None = None
        self._wake = wake
        self._listener = listener
        # Engine-side state (rank 0 scheduler only).
        self._stop_ids = stop_ids
        self._tokens = list(prompt_ids)  # prompt + generated so far
        self._num_cached = 0  # tokens whose K/V are in the cache slot
        self._slot: int | None = None
        self._generator = torch.Generator().manual_seed(
            params.seed & (2**64 - 1) if params.seed is not None else secrets.randbits(63)
        )  # any int seed: manual_seed takes [0, 2^64)

    def __iter__(self) -> Iterator[int]:
        while True:
            with self._ready:
                while not self._q:
                    self._ready.wait()
                item = self._q.popleft()
            if item is _END:
                return
            if isinstance(item, RequestError):
                raise item
            yield item.token if isinstance(item, TokenLogprobs) else item

    def cancel(self, reason: str = "abort") -> None:
        """Stop generating; iteration ends with finish_reason `reason` ("abort" or "stop")."""
        if self._cancel is None:
            self._cancel = reason
        if self._wake is not None:
            self._wake()

    @property
    def finished(self) -> bool:
        return self.finish_time is not None

    # --- engine side ---
    def _push(self, item: Any) -> None:
        if self._listener is not None:
            try:
                self._listener(item)
            except Exception:  # a consumer's bug must not stop the engine loop (and the group)
                log.exception("listener of %s failed", self.id)
            return
        with self._ready:
            self._q.append(item)
            self._ready.notify_all()

    def _finish(self, reason: str | None, error: RequestError | None = None) -> None:
        if self.finish_time is not None:
            return
        self.finish_reason = reason
        self.finish_time = time.monotonic()
        if error is not None:
            self._push(error)
        self._push(_END)


def _row_params(p: SamplingParams) -> RowParams:
    return RowParams(
        p.temperature,
        p.top_p,
        p.top_k,
        p.min_p,
        p.presence_penalty,
        p.frequency_penalty,
        p.repetition_penalty,
        p.logprobs,
    )


def fake_oom_hooks(
    faults: FaultInjection,
) -> tuple[Callable[[int, int], None] | None, Callable[[int, int], None] | None]:
    """(before the step, after layer 0) fault injectors for ``faults``; None where none is asked."""
    if faults.fake_oom_at_batch is None:
        return None, None
    fake = FakeOOM(faults.fake_oom_at_batch)
    return (None, fake) if faults.fake_oom_mid_forward else (fake, None)


class FakeOOM:
    """Fake GPU condition for tests: raise a real torch.cuda.OutOfMemoryError whenever a step
    would run more than `max_batch` sequences (so the OOM path is testable on CPU)."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch

    def __call__(self, batch_size: int, num_tokens: int) -> None:
        if batch_size > self.max_batch:
            raise torch.cuda.OutOfMemoryError(
                f"FAKE GPU OOM ({env_names.FAKE_OOM_AT_BATCH}={self.max_batch}): step with {batch_size} sequences"
            )


def return_freed_memory_to_the_os() -> None:
    """Pin glibc's mmap threshold at 1 MiB. By default it rises after each large free (up to
    32 MiB), after which a prefill's big activations come from the heap and stay resident when
    freed, so peak RSS creeps up with every new prefill size (+20 MiB at TP=1 in the bench). A
    fixed threshold gives each large tensor its own mapping, unmapped on free; 1 MiB rather than
    less because every fresh mapping is paid again in page faults (256 KiB: prefill 30% slower).
    Decode's tensors are all below it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


class Engine:
    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "auto",
        max_batch_size: int = 8,
        effective_batch_size: int | None = None,
        max_model_len: int | None = None,
        backend: str = "auto",
        dist_timeout_s: float = 120.0,
        served_model_name: str | None = None,
        device: str = "auto",
        idle_interval_s: float = 0.5,
        fault_injector: Callable[[int, int], None] | None = None,
        process: ProcessSettings | None = None,
        cuda_graphs: str = "auto",
        stop: threading.Event | None = None,
        on_wait: Callable[[list[int]], None] | None = None,
    ) -> None:
        """``process``: this rank's group, cores and test faults (``ProcessSettings.from_env``);
        None: a group of one with torch's defaults. ``stop`` ends the wait for missing ranks
        (``rendezvous.Aborted``); ``on_wait`` hears which ranks are still missing."""
        self.is_ready = False
        process = process or ProcessSettings()
        env = process.dist
        self.rank, self.world_size = env.rank, env.world_size
        self.checkpoint = ckpt = Checkpoint.open(model_dir)  # a HF directory or a GGUF file
        self.config = cfg = ckpt.config
        check_tp(cfg, self.world_size)  # fail before joining the group: every rank raises the same
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.effective_batch_size = min(max_batch_size, effective_batch_size or max_batch_size)
        if self.effective_batch_size < 1:
            raise ValueError("effective_batch_size must be >= 1")
        self.max_model_len = max_model_len or min(cfg.max_position_embeddings, 4096)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        self.model_name = served_model_name or ckpt.name
        self.idle_interval_s = idle_interval_s
        mid_forward_fault: Callable[[int, int], None] | None = None
        if fault_injector is None:
            fault_injector, mid_forward_fault = fake_oom_hooks(process.faults)
        self.fault_injector = fault_injector
        self.on_step: Callable[[StepInfo], None] | None = None

        return_freed_memory_to_the_os()  # before the weights: they are the first big allocations
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{env.local_rank}") if device == "cuda" else torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif process.num_threads:
            torch.set_num_threads(process.num_threads)
        if dtype == "auto":
            dtype = (
                cfg.torch_dtype if self.device.type == "cuda" and cfg.torch_dtype in _DTYPES else "float32"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r} ({', '.join(_DTYPES)})")
        self.dtype = _DTYPES[dtype]

        # The group forms after the weights load (below): a rank never waits on a collective
        # deadline for a peer that is Pending, pulling its image or still loading.
        self.dist = Dist(
            env,
            backend=backend,
            timeout_s=dist_timeout_s,
            device=self.device,
            shm=process.shm_collectives,
            form=False,
        )
        self.comm_device = self.device if self.dist.backend == "nccl" else torch.device("cpu")
        self.model = Transformer(cfg, self.dist, dtype=self.dtype, device=self.device)
        self.load_report: LoadReport = ckpt.load_weights(self.model, self.rank, self.world_size)
        if mid_forward_fault is not None:
            fault = mid_forward_fault  # after layer 0 ran: at TP > 1 its all-reduces are done
            self.model.layers[0].register_forward_hook(
                lambda _mod, args, _out: fault(len(args[-1].seq_lens), args[0].shape[0])
            )
        cache_bytes = self.model.setup_cache(max_batch_size, self.max_model_len)
        log.info(
            "rank %d: KV cache %d slots x %d tokens = %.1f MiB",
            self.rank,
            max_batch_size,
            self.max_model_len,
            cache_bytes / 2**20,
        )
        # Decode-only steps through static shapes (CUDA graphs on CUDA at TP=1); None: plain eager.
        self.decode_runner = make_decode_runner(self.model, cuda_graphs, self.world_size)

        self.tokenizer = ckpt.tokenizer()
        self.chat_template: str | None = ckpt.chat_template()  # Jinja, for /v1/chat/completions
        ckpt.gguf = None  # drop the file's mapping: the weights are copied out
        eos = list(cfg.eos_token_ids) + ckpt.extra_eos_ids()
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(e) for e in eos))

        # Scheduler state (rank 0); `_cv` guards it against submit()/cancel() from other threads.
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self._ids = itertools.count()
        self._stopped = False
        self._step = 0
        self._oom_count = 0
        self._last_error = ""
        self._tokens_generated = 0
        self.max_prefill_tokens = max(2048, self.max_model_len)
        self.max_waiting: int | None = None  # admission queue bound (None: unbounded); see submit()

        # No deadline until every rank is there; then the collective timeout applies.
        self.dist.form(stop=stop, on_wait=on_wait)
        self.dist.barrier("ready")  # every rank has its weights: the group can serve
        self.is_ready = True
        log.info(
            "rank %d/%d ready: model %s, %s, device %s, max_batch_size %d, max_model_len %d",
            self.rank,
            self.world_size,
            self.model_name,
            dtype,
            self.device,
            max_batch_size,
            self.max_model_len,
        )

    @classmethod
    def from_settings(
        cls,
        settings: RuntimeSettings,
        stop: threading.Event | None = None,
        on_wait: Callable[[list[int]], None] | None = None,
    ) -> Engine:
        """Build from the runtime's settings (``RuntimeSettings.from_args``); ``stop``/``on_wait``:
        see ``__init__``."""
        return cls(
            settings.model,
            dtype=settings.dtype,
            max_batch_size=settings.max_batch_size,
            effective_batch_size=settings.effective_batch_size,
            max_model_len=settings.max_model_len,
            backend=settings.backend,
            dist_timeout_s=settings.dist_timeout_seconds,
            served_model_name=settings.served_model_name,
            device=settings.device,
            process=settings.process,
            cuda_graphs=settings.cuda_graphs,
            stop=stop,
            on_wait=on_wait,
        )

    # --- public API -------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        listener: Callable[[Any], None] | None = None,
    ) -> Request:
        """Queue a request (thread-safe). Raises ValueError on invalid input, QueueFullError when
        ``max_waiting`` requests already wait, RuntimeError once the engine has stopped."""
        if self.rank != 0:
            raise RuntimeError("submit() is only valid on rank 0")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range [0, {self.config.vocab_size})")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len {self.max_model_len}"
            )
        if (
            not params.temperature >= 0
            or not 0 < params.top_p <= 1
            or params.top_k < 0
            or not 0 <= params.min_p <= 1
        ):
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, 0 <= min_p <= 1")
        eos = frozenset() if params.ignore_eos else frozenset(self.eos_token_ids)
        req = Request(
            f"req-{next(self._ids)}", prompt_ids, params, frozenset(params.stop_token_ids) | eos, self._wake, listener
        )
        with self._cv:
            if self._stopped:
                raise RuntimeError("engine is stopped")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(
                step=self._step,
                queue_depth=len(self._waiting),
                running=len(self._running),
                effective_batch_size=self.effective_batch_size,
                max_batch_size=self.max_batch_size,
                oom_count=self._oom_count,
                last_error=self._last_error,
                tokens_generated=self._tokens_generated,
            )

    def run_forever(self, stop: threading.Event) -> None:
        """Rank 0: schedule until `stop`, then tell the followers to exit. Others: follow."""
        try:
            if self.rank == 0:
                self._lead(stop)
            else:
                self._follow(stop)
        finally:
            with self._cv:
                self._stopped = True
                pending = list(self._running) + list(self._waiting)
                self._running.clear()
                self._waiting.clear()
            for r in pending:
                r._finish(None, RequestError("engine stopped"))
            self.dist.close()

    # --- rank 0 -----------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _lead(self, stop: threading.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            batch = self._schedule()
            if batch:
                self._work_step(batch)
                last = time.monotonic()
                continue
            with self._cv:
                if not self._waiting:
                    self._cv.wait(timeout=max(0.0, self.idle_interval_s - (time.monotonic() - last)))
            if time.monotonic() - last >= self.idle_interval_s:
                self._send_header(STEP_IDLE)
                with self._cv:
                    self._step += 1
                last = time.monotonic()
        self._send_header(STEP_SHUTDOWN)

    def _send_header(self, kind: int, n_tokens: int = 0, n_seqs: int = 0) -> None:
        if self.world_size == 1:
            return
        h = torch.tensor(
            [kind, n_tokens, n_seqs, self._step, self.effective_batch_size, self._oom_count, 0, 0],
            dtype=torch.long,
            device=self.comm_device,
        )
        self.dist.broadcast(h, name="step_header")

    def _schedule(self) -> list[Request]:
        """Apply cancellations, shrink to the effective batch size, admit waiting requests."""
        with self._cv:
            for r in [r for r in self._running if r._cancel]:
                self._release(r)
                r._finish(r._cancel)
            for r in [r for r in self._waiting if r._cancel]:
                self._waiting.remove(r)
                r._finish(r._cancel)
            while len(self._running) > self.effective_batch_size:
                # Preempt the newest: its K/V is dropped and recomputed when it is readmitted.
                r = self._running.pop()
                self._release(r)
                self._waiting.appendleft(r)
            budget = self.max_prefill_tokens
            while self._waiting and len(self._running) < self.effective_batch_size and self._free_slots:
                r = self._waiting[0]
                n = len(r._tokens) - r._num_cached
                if n > budget and budget < self.max_prefill_tokens:
                    break  # too much prefill for this step; keeps decode latency bounded
                self._waiting.popleft()
                r._slot = self._free_slots.pop()
                self._running.append(r)
                budget -= n
            return list(self._running)

    def _release(self, r: Request) -> None:
        if r in self._running:
            self._running.remove(r)
        if r._slot is not None:
            self._free_slots.append(r._slot)
            # Lowest free slot first (pop() takes the end): running slots stay packed at the bottom,
            # so the slot-major decode graphs (cuda_graphs.py) use the smallest bucket that fits.
            self._free_slots.sort(reverse=True)
            r._slot = None
        r._num_cached = 0

    def _work_step(self, batch: list[Request]) -> None:
        t0 = time.monotonic()
        seqs = [(r._slot, r._num_cached, len(r._tokens) - r._num_cached) for r in batch]
        ids = [t for r in batch for t in r._tokens[r._num_cached :]]
        self._send_header(STEP_WORK, len(ids), len(seqs))
        if self.world_size > 1:
            payload = torch.tensor(
                ids + [x for s in seqs for x in s], dtype=torch.long, device=self.comm_device
            )
            self.dist.broadcast(payload, name="step_payload")
        logits = self._execute(ids, seqs)  # type: ignore[arg-type]
        if logits is None:
            self._handle_oom(batch)
            return
        params = [_row_params(r.params) for r in batch]
        history = None
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
            history = [RowHistory(r.output_ids, r._tokens) for r in batch]
        try:
            sampled = sample(logits, params, [r._generator for r in batch], history)
        except Exception as e:  # never let one request's sampling take the group down
            log.exception("sampling failed; failing this step's requests")
            sampled = []
            self._last_error = f"sampling failed: {type(e).__name__}: {e}"
        new = [s.token for s in sampled] or [-1] * len(batch)
        n_prefill = sum(n for _, _, n in seqs if n > 1)
        now = time.monotonic()
        with self._cv:
            self._step += 1
            for i, (r, t) in enumerate(zip(batch, new, strict=True)):
                r._num_cached = len(r._tokens)
                if t < 0:  # non-finite logits (or a sampler failure): only this request fails
                    self._release(r)
                    why = "the model produced non-finite logits" if sampled else self._last_error
                    r._finish(None, RequestError(f"{why} for this request"))
                    continue
                if t in r._stop_ids:
                    self._release(r)
                    r._finish("stop")
                    continue
                r._tokens.append(t)
                r.output_ids.append(t)
                if r.first_token_time is None:
                    r.first_token_time = now
                self._tokens_generated += 1
                s = sampled[i] if sampled else None
                if s is not None and s.logprob is not None:
                    r._push(TokenLogprobs(t, s.logprob, s.top))
                else:
                    r._push(t)
                if len(r.output_ids) >= r.params.max_tokens or len(r._tokens) >= self.max_model_len:
                    self._release(r)
                    r._finish("length")
        if self.on_step is not None:
            info = StepInfo(
                step=self._step,
                batch_size=len(batch),
                num_prefill_tokens=n_prefill,
                num_decode_tokens=len(ids) - n_prefill,
                duration_s=now - t0,
            )
            try:
                self.on_step(info)
            except Exception:
                log.exception("on_step hook failed")

    def _handle_oom(self, batch: list[Request]) -> None:
        with self._cv:
            self._oom_count += 1
            self._step += 1
            old = self.effective_batch_size
            if len(batch) == 1:
                # Nothing left to shrink: this request cannot run on this GPU at all.
                r = batch[0]
                self._release(r)
                self._last_error = f"out of memory running {r.id} alone ({len(r._tokens)} tokens)"
                r._finish(None, RequestError(self._last_error))
            else:
                self.effective_batch_size = max(1, min(old, len(batch)) // 2)
                self._last_error = (
                    f"out of memory at batch {len(batch)}; effective batch size {old} -> "
                    f"{self.effective_batch_size}"
                )
            # Every request of the failed step is kept (requeued by the next _schedule). Their
            # cached token counts did not advance, so whatever K/V the step wrote is rewritten.
        log.warning("%s (oom_count=%d)", self._last_error, self._oom_count)

    # --- ranks > 0 ----------------------------------------------------------------------------
    def _follow(self, stop: threading.Event) -> None:
        while not stop.is_set():
            h = torch.empty(_HEADER, dtype=torch.long, device=self.comm_device)
            kind, n_tokens, n_seqs, step, eff, ooms, _, _ = self.dist.broadcast(
                h, name="step_header"
            ).tolist()
            with self._cv:  # mirror rank 0's counters for this rank's heartbeat / metrics
                self._step, self.effective_batch_size, self._oom_count = step + 1, eff, ooms
            if kind == STEP_SHUTDOWN:
                log.info("rank %d: shutdown step from rank 0", self.rank)
                return
            if kind == STEP_IDLE:
                continue
            payload = torch.empty(n_tokens + 3 * n_seqs, dtype=torch.long, device=self.comm_device)
            vals = self.dist.broadcast(payload, name="step_payload").tolist()
            ids, flat = vals[:n_tokens], vals[n_tokens:]
            self._execute(ids, [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)])  # type: ignore[misc]

    # --- every rank -----------------------------------------------------------------------------
    def _execute(self, ids: list[int], seqs: list[tuple[int, int, int]]) -> torch.Tensor | None:
        """Run one forward step on this rank; None when any rank is out of memory."""
        oom = 0
        try:
            self._preflight(len(seqs), len(ids))
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            log.warning("rank %d: %s", self.rank, e)
            oom = 1
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.world_size > 1:
            # Agree on the outcome before the first weight collective, so every rank skips together.
            flag = torch.tensor([oom], dtype=torch.long, device=self.comm_device)
            oom = int(self.dist.all_reduce(flag, name="oom_flag").item())  # > 0: some rank is out
        if oom:
            return None
        try:
            if self.decode_runner is not None and all(n == 1 for _, _, n in seqs):
                return self.decode_runner(ids, seqs)
            meta = BatchMeta.build(seqs, self.device)
            return self.model(torch.tensor(ids, dtype=torch.long, device=self.device), meta)
        except torch.cuda.OutOfMemoryError as e:
            # The preflight reserves a step's activations, so this is rare (fragmentation, a
            # neighbour process). Alone, retry smaller; in a group, the peers are mid-collective.
            if self.world_size > 1:
                die(
                    f"rank {self.rank}: out of memory in the middle of a forward pass "
                    f"({len(seqs)} sequences, {len(ids)} tokens): the group cannot resume in-process; "
                    f"exiting {EXIT_OUT_OF_MEMORY} so the operator halves the batch and restarts the group "
                    f"({e})",
                    EXIT_OUT_OF_MEMORY,
                )
            log.warning("rank %d: out of memory in a forward pass: %s", self.rank, e)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def _preflight(self, n_seqs: int, n_tokens: int) -> None:
        """Reserve this step's activation memory up front: an OOM then happens here, on every rank
        before any collective, instead of mid-forward where the ranks would desynchronise."""
        if self.fault_injector is not None:
            self.fault_injector(n_seqs, n_tokens)
        if self.device.type != "cuda":
            return
        cfg, tp = self.config, self.world_size
        per_token = (
            4 * cfg.hidden_size
            + 3 * cfg.num_attention_heads * cfg.head_dim // tp
            + 3 * cfg.intermediate_size // tp
        )
        attn = cfg.num_attention_heads // tp * n_tokens * min(n_tokens, self.max_model_len)  # prefill scores
        logits = 3 * n_seqs * cfg.vocab_size
        nbytes = (n_tokens * per_token + attn + logits) * 4
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        del buf  # stays in the caching allocator for the forward to reuse
