"""The matrix products' ceiling for bench_serving's c=16 load (CPU, float32, TP=1): the output
tokens/s that this machine's matrix products alone allow, to set against what the c=16 target asks
for (2x transformers CB's output tokens/s, measured in the same bench_serving run).

    ~/.cache/tpi/venv/bin/python bench/bench_ceiling.py [--step-tokens 64] [--logit-rows 16]
        [--input-len 128] [--output-len 64] [--json out.json]

Each token of a request goes through the decoder's matrix products (q/k/v, o, gate/up and down of
every layer), and each output token through the LM head's as well. Nothing else a server does
(attention, norms, sampling, scheduling, HTTP) is counted, so no server of this model reaches
the ceiling on this machine. The products use the runtime's own layouts and kernels
(`tp.linear_weight`, `tp.packed_weight`, `tp.linear`: oneDNN's packed weights, as the engine packs
them for a batching server, where this torch build has them) at the shape of the engine's step
under the c=16 load:
- `--step-tokens` tokens, which is its default CPU token budget, decodes included;
- `--logit-rows` of them produce logits.
Timing: best of 5 rounds of 10 steps, with a separate weight per layer, as in the model, so the
weights do not stay in the caches. A request of `--input-len` + `--output-len` tokens sends
input-len + output-len - 1 tokens through the layers and output-len rows through the LM head.
bench_serving.py runs this in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))
sys.path.insert(0, str(REPO / "contract"))
sys.path.insert(0, str(REPO / "bench"))

from bench_runtime import CONFIG  # noqa: E402
from tpi_runtime.settings import DEFAULT_MAX_NUM_BATCHED_TOKENS  # noqa: E402


def layer_shapes(cfg: dict[str, Any]) -> list[tuple[int, int, bool]]:
    """(out, in, row-parallel) of one decoder layer's matrix products, fused as the runtime fuses
    them; the row-parallel ones (o_proj, down_proj) are stored with their inputs split."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
    return [(qkv, hidden, False), (hidden, hidden, True), (2 * inter, hidden, False), (hidden, inter, True)]


def best_seconds(fn: Any, rounds: int = 5, steps: int = 10) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def measure(cfg: dict[str, Any], step_tokens: int, logit_rows: int, input_len: int, output_len: int) -> dict[str, Any]:
    import torch
    from tpi_runtime.settings import ProcessSettings
    from tpi_runtime.tp import linear, linear_weight, onednn_packing_available, packed_weight, plain_weight

    if threads := ProcessSettings.from_env(os.environ).num_threads:  # as the engine sets them
        torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    shapes = layer_shapes(cfg)
    xs = {i: torch.randn(step_tokens, i) for _, i, _ in shapes}
    packed = onednn_packing_available()  # as the engine decides for max_batch_size > 1

    def weight(out: int, inputs: int, row_parallel: bool = False) -> torch.Tensor:
        w = linear_weight(out, inputs, dtype=torch.float32, device=cpu, split_inputs=row_parallel).normal_()
        return packed_weight(plain_weight(w), step_tokens) if packed else w

    # (input, weight) per product, layer after layer
    products = [(xs[i], weight(o, i, split)) for _ in range(cfg["num_hidden_layers"]) for o, i, split in shapes]
    head = weight(cfg["vocab_size"], cfg["hidden_size"])
    rows = torch.randn(logit_rows, cfg["hidden_size"])

    def decoder_products() -> None:
        for x, w in products:
            linear(x, w)

    layers_s = best_seconds(decoder_products)
    head_s = best_seconds(lambda: linear(rows, head))
    per_token_flops = 2 * cfg["num_hidden_layers"] * sum(o * i for o, i, _ in shapes)
    per_row_flops = 2 * cfg["vocab_size"] * cfg["hidden_size"]
    tokens = input_len + output_len - 1
    request_s = tokens * layers_s / step_tokens + output_len * head_s / logit_rows
    return {
        "threads": torch.get_num_threads(),
        "onednn_packed": packed,
        "step_tokens": step_tokens,
        "logit_rows": logit_rows,
        "decoder_products_ms_per_step": layers_s * 1e3,
        "lm_head_ms_per_step": head_s * 1e3,
        "decoder_gflops": per_token_flops * step_tokens / layers_s / 1e9,
        "lm_head_gflops": per_row_flops * logit_rows / head_s / 1e9,
        "ceiling_output_tok_s": output_len / request_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS["cpu"],
                    help="the step's tokens, decodes included (default: the engine's CPU budget)")  # fmt: skip
    ap.add_argument("--logit-rows", type=int, default=16, help="sequences per step: c=16")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    r = measure(CONFIG, args.step_tokens, args.logit_rows, args.input_len, args.output_len)
    print(
        f"matrix products at the c=16 step ({r['step_tokens']} tokens, {r['logit_rows']} logit rows, "
        f"{r['threads']} threads{', oneDNN packed weights' if r['onednn_packed'] else ''}): "
        f"decoder {r['decoder_products_ms_per_step']:.1f} ms "
        f"({r['decoder_gflops']:.0f} GFLOP/s), LM head {r['lm_head_ms_per_step']:.1f} ms "
        f"({r['lm_head_gflops']:.0f} GFLOP/s) -> at most {r['ceiling_output_tok_s']:.0f} output tok/s "
        f"for {args.input_len}-token prompts and {args.output_len} new tokens",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
