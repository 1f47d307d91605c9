"""Every runtime setting, read once: ``RuntimeSettings.from_args(args, environ)``.

This is the only module of the runtime that reads the environment. The rest (engine, server, dist,
heartbeat) receives the typed settings, or the pieces it needs, from here.

Where each setting comes from (names in ``tpi_contract.env``):

* each ``serve``/``generate`` configuration flag ``--some-flag``: the flag, else ``TPI_SOME_FLAG``,
  else its default (so a pod can be configured through env alone; the operator uses the flags);
* the process group: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``
  (torchrun's names; none set: a group of one); on CPU, ``TPI_NUM_THREADS`` or the machine's cores
  divided by ``LOCAL_WORLD_SIZE``; ``TPI_SHM_COLLECTIVES=0`` turns the shared-memory transport off;
* the heartbeat: ``TPI_LEASE_NAME`` (unset or empty: off), ``POD_NAME``, ``POD_NAMESPACE``,
  ``TPI_HEARTBEAT_INTERVAL_SECONDS``, ``TPI_HEARTBEAT_STALL_SECONDS``, ``KUBECONFIG``;
* fault injection for tests: ``TPI_FAKE_OOM_AT_BATCH``, ``TPI_FAKE_OOM_MID_FORWARD``;
* ``launch`` (``LauncherSettings``): ``--ranks-per-pod`` (``TPI_RANKS_PER_POD``), ``WORLD_SIZE``,
  ``TPI_POD_ORDINAL``, ``TPI_LEASE_NAME`` (the base of each local rank's Lease name),
  ``--termination-log`` (``TPI_TERMINATION_LOG``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tpi_contract import defaults, ranks, termination
from tpi_contract import env as names

from . import cgroup_oom

#: --max-num-batched-tokens' default per device. A CPU prefills ~1 token per ms per core, so a
#: 2048-token chunk would stall running streams for seconds: 64 keeps the longest gap between their
#: tokens under 3x the median gap (1.5x measured by bench/bench_serving.py's interference run, with
#: decode rows bucketed by length; README). A GPU takes thousands.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 2048, "cpu": 64}


def max_num_batched_tokens_for(device_type: str, configured: int | None) -> int:
    """The step's token budget: the flag when set, else the device's default."""
    if configured is not None:
        return configured
    return DEFAULT_MAX_NUM_BATCHED_TOKENS["cuda" if device_type == "cuda" else "cpu"]


#: --gpu-memory-utilization's default: the share of the GPU's total memory this process may use
#: (weights, activations and KV cache together), as vLLM's.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_IUNITS = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes (SI and binary suffixes, optional 'B')."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtKMGT]i?)?[bB]?\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 2GiB, 512MiB, 1.5G, 1000000)")
    unit = (m.group(2) or "").lower()
    scale = _IUNITS[unit] if unit.endswith("i") else _UNITS[unit]
    return int(float(m.group(1)) * scale)


log = logging.getLogger("tpi_runtime.settings")

DEFAULT_DRAIN_SECONDS = 10.0


class SettingsError(ValueError):
    """A setting is missing or malformed (the runtime exits ``BAD_CONFIG``)."""


# ------------------------------------------------------------------------------ the flags
def size(text: str) -> int:
    """A byte count with an optional suffix (argparse names the function in its error)."""
    return parse_bytes(text)


@dataclass(frozen=True)
class _Flag:
    name: str  # "--max-batch-size"
    conv: Callable[[str], Any]
    default: Any
    choices: tuple[str, ...] | None = None
    help: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


# The configuration flags: each falls back to TPI_<FLAG> (tpi_contract.env.for_flag).
_COMMON = (
    _Flag(
        "--model",
        str,
        None,
        help="directory with config.json, *.safetensors and optionally tokenizer.json; "
        "or a .gguf file (or a directory holding exactly one)",
    ),
    _Flag(
        "--dtype",
        str,
        "auto",
        ("auto", "float32", "bfloat16", "float16"),
        "auto: the checkpoint's dtype on GPU, float32 on CPU",
    ),
    _Flag("--max-batch-size", int, 8),
    _Flag(
        "--effective-batch-size",
        int,
        None,
        help="sequences per step to start with (<= max-batch-size; halves on OOM)",
    ),
    _Flag(
        "--max-model-len",
        int,
        None,
        help="prompt + generated tokens per sequence (default: min(model max, 4096))",
    ),
    _Flag("--backend", str, "auto", ("auto", "nccl", "gloo")),
    _Flag(
        "--dist-timeout-seconds",
        float,
        120.0,
        help="a collective slower than this fails and the rank exits 3; it starts once every rank "
        "joined (waiting for missing ranks has no deadline)",
    ),
    _Flag("--served-model-name", str, None),
    _Flag("--device", str, "auto", ("auto", "cpu", "cuda")),
    _Flag(
        "--cuda-graphs",
        str,
        "auto",
        ("auto", "on", "off"),
        "decode through captured CUDA graphs (auto: on for CUDA at TP=1; on with CPU: the static path, eager)",
    ),
    _Flag(
        "--kv-cache-memory",
        size,
        None,
        help="KV cache bytes per rank, e.g. 2GiB, 512MiB, 1.5G (default: on CUDA, --gpu-memory-utilization; "
        "on CPU, max-batch-size x max-model-len tokens)",
    ),
    _Flag(
        "--gpu-memory-utilization",
        float,
        DEFAULT_GPU_MEMORY_UTILIZATION,
        help="CUDA without --kv-cache-memory: share of the GPU's memory this rank may use (weights, "
        "activations, KV cache); the KV cache gets what is left",
    ),
    _Flag(
        "--max-num-batched-tokens",
        int,
        None,
        help="tokens per step (decodes + prompt chunks); a longer prompt is prefilled in chunks between "
        "decodes (default: 2048 on CUDA, 64 on CPU)",
    ),
    _Flag(
        "--prefix-caching",
        str,
        "on",
        ("on", "off"),
        "keep the KV blocks of prompts (and generated text) and share them with requests that start "
        "the same way: n > 1 choices, a common system prompt (not with a sliding window)",
    ),
    _Flag("--log-level", str, "INFO"),
)
_SERVE = (
    _Flag("--port", int, defaults.HTTP_PORT),
    _Flag("--host", str, "0.0.0.0"),
    _Flag(
        "--drain-seconds",
        float,
        DEFAULT_DRAIN_SECONDS,
        help="after SIGTERM, finish in-flight requests for up to this long (match the pod's grace period)",
    ),
    _Flag("--max-queue", int, 256, help="requests waiting for a batch slot; past it a request gets 429"),
    _Flag(
        "--request-timeout-seconds",
        float,
        600.0,
        help="server-side deadline per request; past it the request ends with 504 and frees its slot",
    ),
)


#: ``launch``'s own flags (before the runtime command): see ``LauncherSettings``.
DEFAULT_STOP_GRACE_SECONDS = 5.0
_LAUNCH = (
    _Flag("--ranks-per-pod", int, 1, help="local ranks to start, one process each (must divide WORLD_SIZE)"),
    _Flag(
        "--termination-log",
        str,
        termination.DEFAULT_PATH,
        help="where to write why the pod stopped (the container's terminationMessagePath); empty: nowhere",
    ),
    _Flag(
        "--stop-grace-seconds",
        float,
        DEFAULT_STOP_GRACE_SECONDS,
        help="after a local rank ends, how long the others get after SIGTERM before SIGKILL",
    ),
    _Flag("--cgroup-root", str, cgroup_oom.DEFAULT_ROOT, help="where the cgroup filesystem is mounted"),
)
LAUNCHABLE = ("serve", "generate")


def _add(p: argparse.ArgumentParser, flags: tuple[_Flag, ...]) -> None:
    for f in flags:
        # No default here: from_args tells "not given" (None) from a value, then tries the env.
        p.add_argument(
            f.name,
            type=f.conv,
            default=None,
            choices=f.choices,
            help=f"{f.help + '; ' if f.help else ''}env {names.for_flag(f.name)}, default {f.default}",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``serve``/``generate`` command line; it reads no environment (``from_args`` does)."""
    ap = argparse.ArgumentParser(prog="tpi-runtime", description="TPI tensor-parallel Llama runtime")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve HTTP (rank 0: OpenAI-style completions) on every rank")
    _add(s, _COMMON + _SERVE)
    g = sub.add_parser("generate", help="one-shot generation; prints text and token ids (rank 0)")
    _add(g, _COMMON)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    src.add_argument("--prompt", help="text (needs tokenizer.json in --model, or a GGUF file)")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    la = sub.add_parser(
        "launch",
        help="run --ranks-per-pod ranks in this pod or host, one process each; they stop together",
        description="Starts one `serve`/`generate` process per local rank (RANK = TPI_POD_ORDINAL x "
        "ranks-per-pod + local rank) and stops them together; docs/contracts.md, 'Several ranks per pod'.",
    )
    _add(la, _LAUNCH)
    la.add_argument("runtime_command", choices=LAUNCHABLE, help="what each local rank runs")
    la.add_argument("runtime_args", nargs=argparse.REMAINDER, help="its flags, as for that command")
    return ap


def _flag_value(f: _Flag, args: argparse.Namespace, environ: Mapping[str, str]) -> Any:
    given = getattr(args, f.dest, None)
    if given is not None:
        return given
    var = names.for_flag(f.name)
    raw = environ.get(var, "")
    if raw == "":
        return f.default
    try:
        value = f.conv(raw)
    except ValueError:
        raise SettingsError(f"{var}={raw!r} is not a valid {f.name}") from None
    if f.choices is not None and value not in f.choices:
        raise SettingsError(f"{var}={raw!r}: {f.name} must be one of {', '.join(f.choices)}")
    return value


def _number(environ: Mapping[str, str], var: str, conv: Callable[[str], Any], default: Any) -> Any:
    raw = environ.get(var, "").strip()
    if raw == "":
        return default
    try:
        return conv(raw)
    except ValueError:
        raise SettingsError(f"{var}={raw!r} is not a number") from None


# ------------------------------------------------------------------------------ the pieces
@dataclass(frozen=True)
class DistEnv:
    """Where this rank sits in its tensor-parallel group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = defaults.RENDEZVOUS_PORT

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DistEnv:
        """torchrun / operator environment; a bare single process is a group of one."""
        world = _number(environ, names.WORLD_SIZE, int, 1)
        rank = _number(environ, names.RANK, int, 0)
        if not 0 <= rank < world:
            raise SettingsError(f"{names.RANK}={rank} is outside {names.WORLD_SIZE}={world}")
        return cls(
            rank=rank,
            world_size=world,
            local_rank=_number(environ, names.LOCAL_RANK, int, 0),
            master_addr=environ.get(names.MASTER_ADDR) or "127.0.0.1",
            master_port=_number(environ, names.MASTER_PORT, int, defaults.RENDEZVOUS_PORT),
        )


@dataclass(frozen=True)
class FaultInjection:
    """Named fakes for tests (never set by the operator)."""

    #: A step with more sequences than this raises a real torch.cuda.OutOfMemoryError.
    fake_oom_at_batch: int | None = None
    #: The fake OOM strikes after layer 0 of the forward pass instead of before it.
    fake_oom_mid_forward: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultInjection:
        return cls(
            fake_oom_at_batch=_number(environ, names.FAKE_OOM_AT_BATCH, int, None),
            fake_oom_mid_forward=environ.get(names.FAKE_OOM_MID_FORWARD) == "1",
        )


@dataclass(frozen=True)
class ProcessSettings:
    """What the engine needs to know about its process: its group, its cores, test faults."""

    dist: DistEnv = field(default_factory=DistEnv)
    #: Small collectives between ranks of one host go through shared memory (gloo on CPU only).
    shm_collectives: bool = True
    #: torch threads for a CPU rank; None: torch's default.
    num_threads: int | None = None
    faults: FaultInjection = field(default_factory=FaultInjection)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProcessSettings:
        threads = _number(environ, names.NUM_THREADS, int, None)
        sharing = _number(environ, names.LOCAL_WORLD_SIZE, int, None)
        if threads is None and sharing:  # ranks sharing one machine share its cores
            threads = max(1, (os.cpu_count() or 1) // sharing)
        return cls(
            dist=DistEnv.from_env(environ),
            shm_collectives=environ.get(names.SHM_COLLECTIVES, "1") != "0",
            num_threads=threads,
            faults=FaultInjection.from_env(environ),
        )


@dataclass(frozen=True)
class HeartbeatSettings:
    """This rank's Lease heartbeat (``tpi_runtime.heartbeat``)."""

    lease_name: str
    namespace: str
    pod_name: str
    interval: float = defaults.HEARTBEAT_INTERVAL_SECONDS
    #: How long the step counter may stand still before renewals stop; None: the contract's default.
    stall_seconds: float | None = None
    #: None: the in-cluster service account.
    kubeconfig: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> HeartbeatSettings | None:
        """None (heartbeat off) outside Kubernetes: ``TPI_LEASE_NAME`` unset or empty.
        ``POD_NAMESPACE``/``POD_NAME`` are required when it is set."""
        name = environ.get(names.LEASE_NAME, "").strip()
        if not name:
            log.debug("%s unset: Lease heartbeat off", names.LEASE_NAME)
            return None
        namespace = environ.get(names.POD_NAMESPACE, "").strip()
        pod = environ.get(names.POD_NAME, "").strip()
        if not namespace or not pod:
            log.warning(
                "%s=%s but %s/%s unset: Lease heartbeat off",
                *(names.LEASE_NAME, name, names.POD_NAMESPACE, names.POD_NAME),
            )
            return None
        return cls(
            lease_name=name,
            namespace=namespace,
            pod_name=pod,
            interval=_number(environ, names.HEARTBEAT_INTERVAL_SECONDS, float, defaults.HEARTBEAT_INTERVAL_SECONDS),
            stall_seconds=_number(environ, names.HEARTBEAT_STALL_SECONDS, float, None),
            kubeconfig=environ.get(names.KUBECONFIG) or None,
        )


# ------------------------------------------------------------------------------ the whole
@dataclass(frozen=True)
class RuntimeSettings:
    """Everything ``python -m tpi_runtime serve|generate`` runs with."""

    command: str
    model: str
    dtype: str = "auto"
    max_batch_size: int = 8
    effective_batch_size: int | None = None
    max_model_len: int | None = None
    backend: str = "auto"
    dist_timeout_seconds: float = 120.0
    served_model_name: str | None = None
    device: str = "auto"
    cuda_graphs: str = "auto"
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_num_batched_tokens: int | None = None  # None: DEFAULT_MAX_NUM_BATCHED_TOKENS of the device
    prefix_caching: str = "on"
    log_level: str = "INFO"
    # serve
    host: str = "0.0.0.0"
    port: int = defaults.HTTP_PORT
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    max_queue: int = 256
    request_timeout_seconds: float = 600.0
    heartbeat: HeartbeatSettings | None = None
    # generate
    prompt_ids: tuple[int, ...] | None = None
    prompt: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    process: ProcessSettings = field(default_factory=ProcessSettings)

    @property
    def rank(self) -> int:
        return self.process.dist.rank

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> RuntimeSettings:
        """Flags (``build_parser``) first, then ``TPI_<FLAG>``, then defaults; the rest from ``environ``.
        Raises SettingsError on a missing or malformed setting."""
        flags = _COMMON + (_SERVE if args.command == "serve" else ())
        values = {f.dest: _flag_value(f, args, environ) for f in flags}
        if values["model"] is None:
            raise SettingsError(f"--model (or {names.for_flag('model')}) is required")
        if values["kv_cache_memory"] is not None and values["kv_cache_memory"] < 1:
            raise SettingsError("--kv-cache-memory must be > 0")
        if not 0 < values["gpu_memory_utilization"] <= 1:
            raise SettingsError("--gpu-memory-utilization must be in (0, 1]")
        if values["max_num_batched_tokens"] is not None and values["max_num_batched_tokens"] < 1:
            raise SettingsError("--max-num-batched-tokens must be >= 1")
        eff = values["effective_batch_size"]
        if eff is not None and eff > values["max_batch_size"]:
            raise SettingsError("--effective-batch-size must be <= --max-batch-size")
        if args.command == "generate":
            prompt_ids = None
            if args.prompt_ids is not None:
                try:
                    prompt_ids = tuple(int(x) for x in args.prompt_ids.split(",") if x.strip())
                except ValueError:
                    raise SettingsError(f"--prompt-ids {args.prompt_ids!r}: comma-separated integers") from None
            values.update(
                prompt_ids=prompt_ids,
                prompt=args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
            )
        else:
            values.update(
                heartbeat=HeartbeatSettings.from_env(environ),
            )
        return cls(command=args.command, process=ProcessSettings.from_env(environ), **values)


# ------------------------------------------------------------------------------ the launcher
@dataclass(frozen=True)
class LauncherSettings:
    """``python -m tpi_runtime launch``: the pod's local ranks (``tpi_contract.ranks``)."""

    ranks_per_pod: int
    #: The group's size (WORLD_SIZE; unset: this pod is the whole group).
    world_size: int
    pod_ordinal: int
    #: The Lease base name (TPI_LEASE_NAME: the pod's name); None: heartbeat off.
    lease_base: str | None
    #: Empty: write no termination message.
    termination_log: str
    stop_grace_seconds: float
    cgroup_root: str
    #: What each local rank runs: ["serve", "--model", ...].
    runtime_argv: tuple[str, ...]

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> LauncherSettings:
        values = {f.dest: _flag_value(f, args, environ) for f in _LAUNCH}
        rpp = values["ranks_per_pod"]
        world = _number(environ, names.WORLD_SIZE, int, rpp)
        if problems := ranks.ranks_per_pod_problems(world, rpp):
            raise SettingsError(f"{problems[0]} ({names.WORLD_SIZE}={world})")
        pods = ranks.pods_per_group(world, rpp)
        ordinal = _number(environ, names.POD_ORDINAL, int, None)
        if ordinal is None:
            if pods > 1:
                raise SettingsError(
                    f"{names.POD_ORDINAL} is required: the group of {world} ranks spans {pods} pods of {rpp}"
                )
            ordinal = 0
        if not 0 <= ordinal < pods:
            raise SettingsError(f"{names.POD_ORDINAL}={ordinal} is outside the group's {pods} pod(s)")
        if values["stop_grace_seconds"] < 0:
            raise SettingsError("--stop-grace-seconds must be >= 0")
        return cls(
            ranks_per_pod=rpp,
            world_size=world,
            pod_ordinal=ordinal,
            lease_base=environ.get(names.LEASE_NAME, "").strip() or None,
            termination_log=values["termination_log"],
            stop_grace_seconds=values["stop_grace_seconds"],
            cgroup_root=values["cgroup_root"],
            runtime_argv=(args.runtime_command, *args.runtime_args),
        )

    @staticmethod
    def termination_log_of(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
        """Where to say why the launcher stopped, even when other settings are bad."""
        given = getattr(args, "termination_log", None)
        return str(given if given is not None else environ.get(names.TERMINATION_LOG, termination.DEFAULT_PATH))

    def child_env(self, environ: Mapping[str, str], local_rank: int) -> dict[str, str]:
        """The environment of local rank ``local_rank``: the pod's, plus its place in the group."""
        out = dict(environ)
        out.update(
            {
                names.RANK: str(ranks.global_rank(self.pod_ordinal, self.ranks_per_pod, local_rank)),
                names.LOCAL_RANK: str(local_rank),
                names.LOCAL_WORLD_SIZE: str(self.ranks_per_pod),
                names.WORLD_SIZE: str(self.world_size),
            }
        )
        if self.lease_base is not None:
            out[names.LEASE_NAME] = ranks.lease_name(self.lease_base, local_rank, self.ranks_per_pod)
        return out
