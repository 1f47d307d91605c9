"""`python -m tpi_runtime serve|generate ...` (also the `tpi-runtime` console script).

Every flag defaults from `TPI_<FLAG>` (e.g. TPI_MAX_BATCH_SIZE), so the operator can configure
rank pods through env alone (docs/contracts.md). Process-group settings come from torchrun-style
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK; without them this is a group of one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

EXIT_BAD_CONFIG = 2


def _env(flag: str, default: Any, conv: Callable[[str], Any] = str) -> Any:
    raw = os.environ.get("TPI_" + flag.upper().replace("-", "_"))
    return default if raw in (None, "") else conv(raw)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=_env("model", None),
        required=_env("model", None) is None,
        help="directory with config.json, *.safetensors and optionally tokenizer.json",
    )
    p.add_argument(
        "--dtype",
        default=_env("dtype", "auto"),
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: the checkpoint's dtype on GPU, float32 on CPU",
    )
    p.add_argument("--max-batch-size", type=int, default=_env("max_batch_size", 8, int))
    p.add_argument(
        "--effective-batch-size",
        type=int,
        default=_env("effective_batch_size", None, int),
        help="sequences per step to start with (<= max-batch-size; halves on OOM)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=_env("max_model_len", None, int),
        help="prompt + generated tokens per sequence (default: min(model max, 4096))",
    )
    p.add_argument("--backend", default=_env("backend", "auto"), choices=["auto", "nccl", "gloo"])
    p.add_argument(
        "--dist-timeout-seconds",
        type=float,
        default=_env("dist_timeout_seconds", 120.0, float),
        help="a collective (or the rendezvous) slower than this fails and the rank exits 3",
    )
    p.add_argument("--served-model-name", default=_env("served_model_name", None))
    p.add_argument("--device", default=_env("device", "auto"), choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--cuda-graphs",
        default=_env("cuda_graphs", "auto"),
        choices=["auto", "on", "off"],
        help="decode through captured CUDA graphs (auto: on for CUDA at TP=1; on with CPU: static path, eager)",
    )
    p.add_argument("--log-level", default=_env("log_level", "INFO"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tpi-runtime", description="TPI tensor-parallel Llama runtime")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve HTTP (rank 0: OpenAI-style completions) on every rank")
    _common(s)
    s.add_argument("--port", type=int, default=_env("port", 8000, int))
    s.add_argument("--host", default=_env("host", "0.0.0.0"))
    g = sub.add_parser("generate", help="one-shot generation; prints text and token ids (rank 0)")
    _common(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    src.add_argument("--prompt", help="text (needs tokenizer.json in --model)")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    return ap


def _generate(args: argparse.Namespace) -> int:
    from .engine import Engine, SamplingParams

    engine = Engine.from_args(args)
    if engine.rank != 0:
        engine.run_forever(threading.Event())  # follow rank 0 until it broadcasts shutdown
        return 0
    if args.prompt_ids is not None:
        ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    else:
        if engine.tokenizer is None:
            raise SystemExit(f"--prompt needs {args.model}/tokenizer.json; use --prompt-ids instead")
        ids = engine.tokenizer.encode(args.prompt).ids
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    req = engine.submit(ids, params)
    stop = threading.Event()
    out: list[int] = []
    err: list[BaseException] = []

    def consume() -> None:
        try:
            out.extend(req)
        except Exception as e:
            err.append(e)
        finally:
            stop.set()

    threading.Thread(target=consume, daemon=True).start()
    engine.run_forever(stop)
    if err:
        print(f"error: {err[0]}", file=sys.stderr)
        return 1
    if engine.tokenizer is not None:
        print(f"text: {engine.tokenizer.decode(out)}")
    print(f"token_ids: {','.join(map(str, out))}")
    print(f"finish_reason: {req.finish_reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    if args.effective_batch_size is not None and args.effective_batch_size > args.max_batch_size:
        print("error: --effective-batch-size must be <= --max-batch-size", file=sys.stderr)
        return EXIT_BAD_CONFIG
    from .loader import CheckpointError

    try:
        if args.command == "generate":
            return _generate(args)
        from .server import serve_main  # the HTTP layer; imported lazily so `generate` needs none of it

        return int(serve_main(args) or 0)
    except (ValueError, CheckpointError) as e:  # bad tp, dtype, lengths, checkpoint: config, not a crash
        logging.getLogger("tpi_runtime").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main())
