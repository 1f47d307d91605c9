"""Prefix caching: n choices of a prompt, computed once (CPU, float32, TP=1, in-process engine).

    ~/.cache/tpi/venv/bin/python bench/bench_prefix_cache.py [--model DIR] [--prompts 4] [--n 4]
        [--prompt-len 512] [--new-tokens 32] [--rounds 2]

What an OpenAI request with ``n`` > 1 gives the engine: ``n`` requests of the same prompt, submitted
together (seeded sampling, seed + i per choice). Each round runs ``--prompts`` such groups at once,
first with the engine's default (``--prefix-caching on``), then with ``off`` (the reference: every
choice prefills its prompt), each in a child process of its own so neither inherits the other's
allocator or thread state. It reports the prompt tokens the engine computed, the wall time until
every choice finished, time to first token (p50 over the choices) and output tokens/s; the best
round of each, and ours / reference. The checkpoint is bench_serving.py's ~125M float32 Llama.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))
sys.path.insert(0, str(REPO / "contract"))


def run_once(model: Path, caching: bool, prompts: int, n: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """One engine, one round of ``prompts`` x ``n`` choices submitted together, after a warm-up."""
    from tpi_runtime.engine import END, Engine, SamplingParams, StepInfo

    engine = Engine(
        str(model),
        dtype="float32",
        max_batch_size=prompts * n,
        max_model_len=prompt_len + new_tokens + 8,
        backend="gloo",
        device="cpu",
        prefix_caching=caching,
    )
    steps: list[StepInfo] = []
    engine.on_step = steps.append
    vocab = engine.config.vocab_size
    stop = threading.Event()
    out: dict[str, Any] = {}

    def prompt(i: int) -> list[int]:  # distinct prompts, never seen before by this engine
        return [1 + (i * 7919 + j * 104729) % (vocab - 1) for j in range(prompt_len)]

    def drive() -> None:
        try:
            list(engine.submit(prompt(10_000), SamplingParams(max_tokens=4)))  # warm-up
            mark = len(steps)
            firsts: dict[int, float] = {}
            left = [prompts * n]
            done = threading.Event()

            def listener(i: int) -> Any:  # on the engine thread: record, never block
                def on(item: Any) -> None:
                    if item is END:
                        left[0] -= 1
                        if not left[0]:
                            done.set()
                    elif i not in firsts:
                        firsts[i] = time.perf_counter() - t0

                return on

            t0 = time.perf_counter()
            for p in range(prompts):
                for c in range(n):
                    sp = SamplingParams(max_tokens=new_tokens, temperature=0.8, seed=c, ignore_eos=True)
                    engine.submit(prompt(p), sp, listener=listener(p * n + c))
            done.wait()
            wall = time.perf_counter() - t0
            out.update(
                prefill_tokens=sum(s.num_prefill_tokens for s in steps[mark:]),
                wall_s=wall,
                ttft_p50_s=statistics.median(firsts.values()),
                out_tok_s=prompts * n * new_tokens / wall,
                hit_tokens=engine.stats().prefix_cache_hit_tokens,
            )
        finally:
            stop.set()

    threading.Thread(target=drive, daemon=True).start()
    engine.run_forever(stop)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="default: bench_serving.py's checkpoint")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", choices=("on", "off"), help=argparse.SUPPRESS)  # a child's one run
    args = ap.parse_args()
    if args.model is None:
        sys.path.insert(0, str(REPO / "bench"))
        from bench_serving import ensure_checkpoint

        args.model = ensure_checkpoint()
    shape = (args.prompts, args.n, args.prompt_len, args.new_tokens)
    if args.only:
        print(json.dumps(run_once(args.model, args.only == "on", *shape)))
        return
    best: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):
        for mode in ("on", "off"):
            argv = [sys.executable, __file__, "--model", str(args.model), "--only", mode]
            argv += ["--prompts", str(args.prompts), "--n", str(args.n)]
            argv += ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
            res = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(
                f"  round {r} prefix caching {mode:3}: {res['prefill_tokens']:6d} prompt tokens computed, "
                f"wall {res['wall_s']:6.2f} s, TTFT p50 {res['ttft_p50_s']:6.2f} s, {res['out_tok_s']:6.1f} out tok/s"
            )
            if mode not in best or res["wall_s"] < best[mode]["wall_s"]:
                best[mode] = res
    on, off = best["on"], best["off"]
    print(
        f"{args.prompts} prompts x n={args.n}, {args.prompt_len}-token prompts, {args.new_tokens} new tokens "
        f"(best of {args.rounds} rounds); prefix caching on / off (lower is better, but out tok/s):"
    )
    print(
        f"  prompt tokens computed {on['prefill_tokens'] / off['prefill_tokens']:.2f}x   "
        f"wall {on['wall_s'] / off['wall_s']:.2f}x   TTFT p50 {on['ttft_p50_s'] / off['ttft_p50_s']:.2f}x   "
        f"out tok/s {on['out_tok_s'] / off['out_tok_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
