"""Continuous-batching generation engine over the tensor-parallel model.

Rank 0 owns the scheduler (scheduler.py): between steps it admits requests while KV blocks are
free (paged cache, kv_cache.py), builds one packed batch (prompt chunks and running sequences'
single-token decodes together, under a token budget), broadcasts it with the block tables, runs its
share of the forward pass, samples from the all-gathered logits of the sequences whose chunk
reached their last token and streams tokens to the requests. Ranks > 0 only follow the broadcasts.
When there is no work, rank 0 still broadcasts an idle step every `idle_interval_s`, so every
rank's step counter (which the heartbeat reports) advances only while the whole group is alive.

Step message: header int64[8] = [kind, n_tokens, n_seqs, step, effective_batch, oom_count, n_blocks,
n_prompt_rows], then (work steps) payload int64[n_tokens + 3 * n_seqs + n_blocks + 3 * n_prompt_rows]
= token ids, then (pos0, n, table length) per sequence, then the block tables (each up to its last
new token's block), then (sequence, first row, count) per chunk whose rows' logits are wanted for
prompt logprobs (every rank takes part in their lm_head all-gathers).
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tpi_contract import env as env_names
from tpi_contract import exitcodes

from .checkpoint import Checkpoint
from .config import check_tp
from .cuda_graphs import make_decode_runner
from .dist import Dist, die
from .kv_cache import (
    BLOCK_SIZE,
    BlockAllocator,
    blocks_for,
    bytes_per_token,
    check_fits,
    gather_cap_tokens,
    num_blocks_for_budget,
)
from .loader import LoadReport
from .model import BatchMeta, Transformer
from .sampling import RowHistory, RowParams, sample
from .scheduler import Scheduled, Scheduler
from .settings import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    FaultInjection,
    ProcessSettings,
    RuntimeSettings,
    max_num_batched_tokens_for,
)
from .step_memory import step_bytes
from .tp import onednn_packing_available, pack_for_batches

log = logging.getLogger("tpi_runtime.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STEP_IDLE, STEP_WORK, STEP_SHUTDOWN = 0, 1, 2
_HEADER = 8
#: One step's sequences on the wire and in _execute: (block table, first position, new tokens).
Seq = tuple[list[int], int, int]
# Out of GPU memory in the middle of a forward pass at TP > 1 (tpi_contract.exitcodes explains why).
EXIT_OUT_OF_MEMORY = exitcodes.OUT_OF_MEMORY
_M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # 0: the request ends after its prompt's prefill ("length"), generating nothing
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
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # k: the prompt's tokens' logprobs (top k) are pushed as PromptLogprobs before the first token.
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """What a request with ``logprobs`` set receives instead of a bare token id."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    rank: int | None = None  # prompt tokens: 1 + how many tokens were more likely (vLLM's)


@dataclass(frozen=True)
class PromptLogprobs:
    """What a request with ``prompt_logprobs`` set receives before its first token: for each prompt
    token after the first, its logprob given the tokens before it, from the model's own
    distribution (no temperature, penalty or bias: they shape the sampling of new tokens only)."""

    entries: tuple[TokenLogprobs, ...]


#: Rows of prompt logprobs projected through lm_head at a time: bounds their logits' memory.
PROMPT_LOGPROBS_ROWS = 64
#: A prompt-logprobs share of a step: (sequence in the batch, first row of its chunk, row count).
PromptRows = tuple[int, int, int]


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
    preemptions: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_freed_by_window: int = 0
    kv_blocks_cached: int = 0
    prefix_cache_hit_tokens: int = 0


@dataclass(frozen=True)
class StepInfo:
    step: int
    batch_size: int
    num_prefill_tokens: int
    num_decode_tokens: int
    duration_s: float
    num_prefill_seqs: int = 0  # sequences bringing (a chunk of) a prompt, or a preempted one's tokens
    num_decode_seqs: int = 0
    request_ids: tuple[str, ...] = ()  # in batch order


_END = object()
END = _END  # what a request listener receives after the last token (or after a RequestError)


class Request:
    """One generation request; iterate it to receive generated token ids as they are produced.

    The token that triggered a stop (eos or a stop_token_id) is not yielded, nor is any token
    after the caller's cancel().
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
        self._num_cached = 0  # tokens whose K/V are in the cache
        self._blocks: list[int] = []  # block table (kv_cache.py); SCRATCH_BLOCK where freed
        self._entries: list[int] = []  # the prefix-cache entry each of its leading cached blocks ends
        self._decoding = False  # its prompt is cached: each step now brings one new token
        self._prompt_lps: list[TokenLogprobs] = []  # prompt_logprobs: entries for tokens 1..len so far
        self.prompt_logprobs: PromptLogprobs | None = None  # set (and pushed) once complete
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
            if self._cancel is not None or isinstance(item, PromptLogprobs):  # the latter: see .prompt_logprobs
                continue  # cancelled: drop what the engine made before it saw the cancel, wait for END
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
        p.logit_bias,
    )


def wanted_prompt_rows(plan: Sequence[Scheduled]) -> list[PromptRows]:
    """The rows of this step's chunks whose logits give prompt logprobs still missing: the logits at
    position p give the logprob of prompt token p + 1, wanted for p in [done, prompt length - 1),
    where ``done`` counts the entries a request has (a preempted request re-prefilling its prompt
    skips them)."""
    rows = []
    for i, s in enumerate(plan):
        r = s.req
        if r.params.prompt_logprobs is None:
            continue
        first, end = max(s.pos0, len(r._prompt_lps)), min(s.pos0 + s.n, len(r.prompt_ids) - 1)
        if end > first:
            rows.append((i, first - s.pos0, end - first))
    return rows


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
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        max_num_batched_tokens: int | None = None,
        prefix_caching: bool = True,
        stop: threading.Event | None = None,
        on_wait: Callable[[list[int]], None] | None = None,
    ) -> None:
        """``process``: this rank's group, cores and test faults (``ProcessSettings.from_env``);
        None: a group of one with torch's defaults. KV cache size per rank: ``kv_cache_memory``
        bytes; else on CUDA ``gpu_memory_utilization`` of the GPU's total memory minus what is in
        use after the weights and one full step's activations; else (CPU) max_batch_size x
        max_model_len tokens. ``max_num_batched_tokens``: the step's token budget (chunked prefill;
        None: the device's DEFAULT_MAX_NUM_BATCHED_TOKENS). ``prefix_caching``: share the KV
        blocks of a common prefix between requests (scheduler.py).
        ``stop`` ends the wait for missing ranks (``rendezvous.Aborted``); ``on_wait`` hears which
        ranks are still missing."""
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
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], not {gpu_memory_utilization}")
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
        if device == "cuda" and env.local_rank >= (visible := torch.cuda.device_count()):
            # Local ranks of one pod (tpi_runtime.launcher) each pick cuda:LOCAL_RANK of the pod's GPUs.
            raise ValueError(
                f"LOCAL_RANK={env.local_rank} runs on cuda:{env.local_rank}, but this process sees {visible} "
                "GPU(s): every local rank must see all of its pod's GPUs (one per local rank)"
            )
        self.device = torch.device(f"cuda:{env.local_rank}") if device == "cuda" else torch.device(device)
        self.max_num_batched_tokens = max_num_batched_tokens_for(self.device.type, max_num_batched_tokens)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif process.num_threads:
            torch.set_num_threads(process.num_threads)
        if dtype == "auto":
            dtype = cfg.torch_dtype if self.device.type == "cuda" and cfg.torch_dtype in _DTYPES else "float32"
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
        # Batched steps 1.3-2.3x faster; pack_for_batches takes the CPU float32 weights only.
        batching = max_batch_size > 1 and onednn_packing_available()
        if batching and (packed := pack_for_batches(self.model, self.max_num_batched_tokens)):
            log.info("rank %d: %.1f MiB of linear weights packed for oneDNN (batching)", self.rank, packed / 2**20)
        if mid_forward_fault is not None:
            fault = mid_forward_fault  # after layer 0 ran: at TP > 1 its all-reduces are done
            self.model.layers[0].register_forward_hook(
                lambda _mod, args, _out: fault(len(args[-1].seq_lens), args[0].shape[0])
            )
        # No deadline until every rank is there; then the collective timeout applies. Before the
        # KV cache is sized: the ranks agree on its size with a collective.
        self.dist.form(stop=stop, on_wait=on_wait)
        num_blocks = self._size_kv_cache(kv_cache_memory, gpu_memory_utilization)
        cache_bytes = self.model.setup_paged_cache(num_blocks, self.max_model_len)
        log.info(
            "rank %d: KV cache %d blocks x %d tokens (%d tokens) = %.1f MiB",
            self.rank,
            num_blocks,
            BLOCK_SIZE,
            num_blocks * BLOCK_SIZE,
            cache_bytes / 2**20,
        )
        # Decode-only steps through static shapes (CUDA graphs on CUDA at TP=1); None: plain eager.
        self.decode_runner = make_decode_runner(self.model, cuda_graphs, self.world_size, max_batch_size)

        self.tokenizer = ckpt.tokenizer()
        self.chat_template: str | None = ckpt.chat_template()  # Jinja, for /v1/chat/completions
        ckpt.gguf = None  # drop the file's mapping: the weights are copied out
        eos = list(cfg.eos_token_ids) + ckpt.extra_eos_ids()
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(e) for e in eos))

        # Scheduler state (rank 0); `_cv` guards it against submit()/cancel() from other threads.
        self._cv = threading.Condition()
        self.scheduler = Scheduler(
            BlockAllocator(num_blocks),
            max_batch_size=max_batch_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            window=cfg.sliding_window,
            prefix_caching=prefix_caching,
        )
        self._waiting = self.scheduler.waiting  # the same objects: submit() and stats() read them
        self._running = self.scheduler.running
        self._ids = itertools.count()
        self._stopped = False
        self._step = 0
        self._oom_count = 0
        self._last_error = ""
        self._tokens_generated = 0
        self.max_waiting: int | None = None  # admission queue bound (None: unbounded); see submit()

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
            kv_cache_memory=settings.kv_cache_memory,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            prefix_caching=settings.prefix_caching == "on",
            stop=stop,
            on_wait=on_wait,
        )

    def _size_kv_cache(self, kv_cache_memory: int | None, utilization: float) -> int:
        """Usable KV blocks per rank, agreed by every rank (the smallest), or KVCacheTooSmallError."""
        per_token = bytes_per_token(self.config, self.rank, self.world_size, self.dtype)
        if kv_cache_memory is not None:
            budget, source = kv_cache_memory, f"--kv-cache-memory={kv_cache_memory}"
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = self._largest_step_bytes()
            budget = int(free - (1 - utilization) * total - reserve)
            source = (
                f"--gpu-memory-utilization={utilization} ({free} bytes free of {total}, "
                f"{reserve} reserved for one step's activations)"
            )
        else:
            budget = (blocks_for(self.max_model_len) * self.max_batch_size + 1) * BLOCK_SIZE * per_token
            source = f"the CPU default (max_batch_size {self.max_batch_size} x max_model_len {self.max_model_len})"
        num_blocks = num_blocks_for_budget(budget, per_token)
        if self.world_size > 1:  # rank 0 hands out the blocks: every rank must hold them all
            t = torch.tensor([num_blocks], dtype=torch.long, device=self.comm_device)
            num_blocks = int(self.dist.all_reduce(t, name="kv_blocks", op=torch.distributed.ReduceOp.MIN).item())
        check_fits(num_blocks, per_token, budget, self.max_model_len, source)
        return num_blocks

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
        k = params.prompt_logprobs
        if k is not None and not 0 <= k <= self.config.vocab_size:
            raise ValueError(f"prompt_logprobs must be in [0, {self.config.vocab_size}]")
        if params.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len {self.max_model_len}"
            )
        if not params.temperature >= 0 or not 0 < params.top_p <= 1 or params.top_k < 0 or not 0 <= params.min_p <= 1:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, 0 <= min_p <= 1")
        if any(not 0 <= t < self.config.vocab_size or not math.isfinite(b) for t, b in params.logit_bias):
            raise ValueError(f"logit_bias needs token ids in [0, {self.config.vocab_size}) and finite biases")
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
                preemptions=self.scheduler.preemptions,
                kv_blocks_total=self.scheduler.alloc.num_blocks,
                kv_blocks_used=self.scheduler.alloc.used,
                kv_blocks_freed_by_window=self.scheduler.window_freed,
                kv_blocks_cached=self.scheduler.alloc.cached,
                prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens,
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

    def _send_header(
        self, kind: int, n_tokens: int = 0, n_seqs: int = 0, n_blocks: int = 0, n_prompt_rows: int = 0
    ) -> None:
        if self.world_size == 1:
            return
        h = torch.tensor(
            [kind, n_tokens, n_seqs, self._step, self.effective_batch_size, self._oom_count, n_blocks, n_prompt_rows],
            dtype=torch.long,
            device=self.comm_device,
        )
        self.dist.broadcast(h, name="step_header")

    def _schedule(self) -> list[Scheduled]:
        """Apply cancellations, then let the scheduler pick the step's work (scheduler.py)."""
        with self._cv:
            for r in [r for r in self._running if r._cancel]:
                self.scheduler.release(r)
                r._finish(r._cancel)
            for r in [r for r in self._waiting if r._cancel]:
                self._waiting.remove(r)
                r._finish(r._cancel)
            return self.scheduler.schedule(self.effective_batch_size)

    def _work_step(self, plan: list[Scheduled]) -> None:
        t0 = time.monotonic()
        batch = [s.req for s in plan]
        # Each table up to the block of its last new token: followers need no more.
        seqs: list[Seq] = [(s.req._blocks[: blocks_for(s.pos0 + s.n)], s.pos0, s.n) for s in plan]
        ids = [t for s in plan for t in s.req._tokens[s.pos0 : s.pos0 + s.n]]
        n_blocks = sum(len(t) for t, _, _ in seqs)
        prompt_rows = wanted_prompt_rows(plan)
        self._send_header(STEP_WORK, len(ids), len(seqs), n_blocks, len(prompt_rows))
        if self.world_size > 1:
            flat = [x for t, p, n in seqs for x in (p, n, len(t))] + [b for t, _, _ in seqs for b in t]
            flat += [x for row in prompt_rows for x in row]
            payload = torch.tensor(ids + flat, dtype=torch.long, device=self.comm_device)
            self.dist.broadcast(payload, name="step_payload")
        out = self._execute(ids, seqs, prompt_rows)
        if out is None:
            self._handle_oom(batch)
            return
        logits, kept = out
        prompt_lps = self._prompt_logprobs(plan, prompt_rows, kept) if kept is not None else {}
        # Only sequences whose chunk reached their last token sample; the others' logits are unused.
        rows = [i for i, s in enumerate(plan) if s.samples]
        done = [plan[i] for i in rows]
        sampled: list[Any] = []
        if rows:
            params = [_row_params(s.req.params) for s in done]
            history = None
            if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
                history = [RowHistory(s.req.output_ids, s.req._tokens) for s in done]
            sel = logits if len(rows) == len(plan) else logits[torch.tensor(rows, device=logits.device)]
            try:
                # The draw number is the count of tokens generated so far: a seeded request draws
                # the same noise whatever its batch, chunking or preemptions.
                positions = [len(s.req.output_ids) for s in done]
                sampled = sample(sel, params, [s.req._generator for s in done], history, positions)
            except Exception as e:  # never let one request's sampling take the group down
                log.exception("sampling failed; failing this step's requests")
                sampled = []
                self._last_error = f"sampling failed: {type(e).__name__}: {e}"
        new = [s.token for s in sampled] or [-1] * len(done)
        decoding = [s for s in plan if s.req._decoding]
        n_decode = sum(s.n for s in decoding)
        now = time.monotonic()
        with self._cv:
            self._step += 1
            for s in plan:
                self.scheduler.advance(s)
            for r, entries in prompt_lps.items():
                if isinstance(entries, str):  # only this request fails
                    self.scheduler.release(r)
                    r._finish(None, RequestError(f"{entries} for this request's prompt"))
                else:
                    r._prompt_lps.extend(entries)
            for i, (sc, t) in enumerate(zip(done, new, strict=True)):
                r = sc.req
                if r.finished:
                    continue
                if r.params.prompt_logprobs is not None and r.prompt_logprobs is None:
                    r.prompt_logprobs = PromptLogprobs(tuple(r._prompt_lps))
                    r._push(r.prompt_logprobs)
                if r.params.max_tokens == 0:  # the prompt (and its logprobs) was all it asked for
                    self.scheduler.release(r)
                    r._finish("length")
                    continue
                if t < 0:  # non-finite logits (or a sampler failure): only this request fails
                    self.scheduler.release(r)
                    why = "the model produced non-finite logits" if sampled else self._last_error
                    r._finish(None, RequestError(f"{why} for this request"))
                    continue
                r._decoding = True
                if t in r._stop_ids:
                    self.scheduler.release(r)
                    r._finish("stop")
                    continue
                r._tokens.append(t)
                r.output_ids.append(t)
                if r.first_token_time is None:
                    r.first_token_time = now
                self._tokens_generated += 1
                smp = sampled[i] if sampled else None
                if smp is not None and smp.logprob is not None:
                    r._push(TokenLogprobs(t, smp.logprob, smp.top))
                else:
                    r._push(t)
                if len(r.output_ids) >= r.params.max_tokens or len(r._tokens) >= self.max_model_len:
                    self.scheduler.release(r)
                    r._finish("length")
        if self.on_step is not None:
            info = StepInfo(
                step=self._step,
                batch_size=len(plan),
                num_prefill_tokens=len(ids) - n_decode,
                num_decode_tokens=n_decode,
                duration_s=now - t0,
                num_prefill_seqs=len(plan) - len(decoding),
                num_decode_seqs=len(decoding),
                request_ids=tuple(r.id for r in batch),
            )
            try:
                self.on_step(info)
            except Exception:
                log.exception("on_step hook failed")

    def _row_logits(self, hidden: torch.Tensor) -> Iterator[torch.Tensor]:
        """Full-vocabulary float32 logits of ``hidden``'s rows, PROMPT_LOGPROBS_ROWS at a time. At
        TP > 1 each slice is an all-gather: every rank iterates them all, in the same order."""
        with torch.inference_mode():
            for at in range(0, hidden.shape[0], PROMPT_LOGPROBS_ROWS):
                yield self.model.lm_head(hidden[at : at + PROMPT_LOGPROBS_ROWS]).float()

    def _prompt_logprobs(
        self, plan: list[Scheduled], prompt_rows: list[PromptRows], hidden: torch.Tensor
    ) -> dict[Request, list[TokenLogprobs] | str]:
        """Rank 0: each flagged request's new prompt-logprob entries, or why it has none."""
        owners: list[Request] = []
        targets: list[int] = []
        for i, first, count in prompt_rows:
            s = plan[i]
            p0 = s.pos0 + first
            owners += [s.req] * count
            targets += s.req.prompt_ids[p0 + 1 : p0 + 1 + count]
        k = max(plan[i].req.params.prompt_logprobs or 0 for i, _, _ in prompt_rows)
        target = torch.tensor(targets, device=hidden.device)[:, None]
        chosen, ranks, top_lp, top_ids = [], [], [], []
        slices = self._row_logits(hidden)
        try:
            at = 0
            for logits in slices:
                lp = torch.log_softmax(logits, dim=-1)
                mine = lp.gather(1, target[at : at + lp.shape[0]])
                chosen.append(mine[:, 0])
                ranks.append((lp > mine).sum(dim=-1) + 1)
                if k:
                    v, ix = lp.topk(k, dim=-1)
                    top_lp.append(v)
                    top_ids.append(ix)
                at += lp.shape[0]
            values, places = torch.cat(chosen).tolist(), torch.cat(ranks).tolist()
            tops = list(zip(torch.cat(top_ids).tolist(), torch.cat(top_lp).tolist(), strict=True)) if k else []
        except Exception as e:  # never let one request's logprobs take the group down
            log.exception("prompt logprobs failed; failing the requests that asked for them")
            for _ in slices:  # the all-gathers every other rank still takes part in
                pass
            return dict.fromkeys(owners, f"prompt logprobs failed: {type(e).__name__}: {e}")
        out: dict[Request, list[TokenLogprobs] | str] = {}
        for j, (r, t, v) in enumerate(zip(owners, targets, values, strict=True)):
            entries = out.setdefault(r, [])
            if isinstance(entries, str):
                continue
            if not math.isfinite(v):
                out[r] = "the model produced non-finite logits"
                continue
            kr = r.params.prompt_logprobs or 0
            top = tuple(zip(tops[j][0][:kr], tops[j][1][:kr], strict=True)) if kr else ()
            entries.append(TokenLogprobs(t, v, top, places[j]))
        return out

    def _handle_oom(self, batch: list[Request]) -> None:
        with self._cv:
            self._oom_count += 1
            self._step += 1
            old = self.effective_batch_size
            if len(batch) == 1:
                # Nothing left to shrink: this request cannot run on this GPU at all.
                r = batch[0]
                self.scheduler.release(r)
                self._last_error = f"out of memory running {r.id} alone ({len(r._tokens)} tokens)"
                r._finish(None, RequestError(self._last_error))
            else:
                self.effective_batch_size = max(1, min(old, len(batch)) // 2)
                self._last_error = (
                    f"out of memory at batch {len(batch)}; effective batch size {old} -> {self.effective_batch_size}"
                )
            # Every request of the failed step is kept (the scheduler preempts what no longer fits
            # the smaller limits). Their cached token counts did not advance, so whatever K/V the
            # step wrote is rewritten; what the step cached is not (after the release above: a
            # failed request's blocks are uncached too).
            self.scheduler.step_failed()
        log.warning("%s (oom_count=%d)", self._last_error, self._oom_count)

    # --- ranks > 0 ----------------------------------------------------------------------------
    def _follow(self, stop: threading.Event) -> None:
        while not stop.is_set():
            h = torch.empty(_HEADER, dtype=torch.long, device=self.comm_device)
            kind, n_tokens, n_seqs, step, eff, ooms, n_blocks, n_rows = self.dist.broadcast(
                h, name="step_header"
            ).tolist()
            with self._cv:  # mirror rank 0's counters for this rank's heartbeat / metrics
                self._step, self.effective_batch_size, self._oom_count = step + 1, eff, ooms
            if kind == STEP_SHUTDOWN:
                log.info("rank %d: shutdown step from rank 0", self.rank)
                return
            if kind == STEP_IDLE:
                continue
            size = n_tokens + 3 * n_seqs + n_blocks + 3 * n_rows
            payload = torch.empty(size, dtype=torch.long, device=self.comm_device)
            vals = self.dist.broadcast(payload, name="step_payload").tolist()
            ids, meta = vals[:n_tokens], vals[n_tokens : n_tokens + 3 * n_seqs]
            tables, rows = vals[n_tokens + 3 * n_seqs : size - 3 * n_rows], vals[size - 3 * n_rows :]
            seqs: list[Seq] = []
            at = 0
            for i in range(0, len(meta), 3):
                pos0, n, k = meta[i : i + 3]
                seqs.append((tables[at : at + k], pos0, n))
                at += k
            prompt_rows = [(rows[i], rows[i + 1], rows[i + 2]) for i in range(0, len(rows), 3)]
            out = self._execute(ids, seqs, prompt_rows)
            if out is not None and out[1] is not None:
                for _ in self._row_logits(out[1]):  # this rank's part of each slice's all-gather
                    pass

    # --- every rank -----------------------------------------------------------------------------
    def _execute(
        self, ids: list[int], seqs: list[Seq], prompt_rows: Sequence[PromptRows] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Run one forward step on this rank: the last tokens' logits, and the final hidden states of
        ``prompt_rows`` (None without); None when any rank is out of memory."""
        oom = 0
        n_prompt_rows = sum(c for _, _, c in prompt_rows)
        try:
            self._preflight(seqs, n_prompt_rows)
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
            if self.decode_runner is not None and not prompt_rows and all(n == 1 for _, _, n in seqs):
                return self.decode_runner(ids, [(-1, p, n) for _, p, n in seqs], [t for t, _, _ in seqs]), None
            meta = BatchMeta.paged(seqs, self.device)
            input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
            if not prompt_rows:
                return self.model(input_ids, meta), None
            # The chunk's rows in the packed batch: sequence i's tokens start at meta.seq_starts[i].
            packed = [meta.seq_starts[i] + first + j for i, first, count in prompt_rows for j in range(count)]
            return self.model.forward_keeping(input_ids, meta, torch.tensor(packed, device=self.device))
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

    def _step_bytes(self, **shape: Any) -> int:
        """``step_memory.step_bytes`` of this rank's shard of the model, in its dtype."""
        return step_bytes(
            self.config,
            self.rank,
            self.world_size,
            self.dtype,
            prompt_rows_at_once=PROMPT_LOGPROBS_ROWS,
            gather_cap=gather_cap_tokens(self.max_model_len),
            **shape,
        )

    def _largest_step_bytes(self) -> int:
        """What the KV cache's sizing on CUDA leaves free for one step: a full token budget beside
        max_batch_size decodes at max_model_len, attended batched (their gathers capped)."""
        return self._step_bytes(
            n_seqs=self.max_batch_size,
            n_tokens=max(self.max_num_batched_tokens, self.max_batch_size),
            max_ctx=self.max_model_len,
            batched_decode=self.max_batch_size >= 2,
        )

    def _preflight(self, seqs: list[Seq], n_prompt_rows: int = 0) -> None:
        """Reserve this step's activation memory up front: an OOM then happens here, on every rank
        before any collective, instead of mid-forward where the ranks would desynchronise."""
        n_tokens = sum(n for _, _, n in seqs)
        if self.fault_injector is not None:
            self.fault_injector(len(seqs), n_tokens)
        if self.device.type != "cuda":
            return
        max_ctx = max(p + n for _, p, n in seqs)
        masked = self.config.sliding_window is not None or any(p > 0 and n > 1 for _, p, n in seqs)
        batched = sum(n == 1 for _, _, n in seqs) >= 2  # decodes attended together (model.prepare)
        nbytes = self._step_bytes(
            n_seqs=len(seqs),
            n_tokens=n_tokens,
            max_ctx=max_ctx,
            batched_decode=batched,
            masked=masked,
            prompt_rows=n_prompt_rows,
        )
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        del buf  # stays in the caching allocator for the forward to reuse
