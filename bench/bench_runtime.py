"""Runtime benchmark (CPU, float32, greedy): our runtime at TP=1 and TP=2 (gloo, one process per
rank) against Hugging Face transformers `generate` on the same random ~125M-parameter Llama.

    ~/.cache/tpi/venv/bin/python bench/bench_runtime.py [--prompt-len 128] [--new-tokens 128] [--cores N]

Every system gets the same cores (default: all of them): HF and TP=1 run N torch threads, each of
the TP=2 ranks N/2, as the runtime itself splits a machine between its local ranks.

The checkpoint is created once in ~/.cache/tpi/bench-ckpt. Prints decode tokens/s, TPOT p50/p99,
prefill tokens/s, load time, per-rank peak RSS and ratios vs HF. Not a test: timings on a shared
2-core machine are noisy, so every number is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
sys.path.insert(0, str(REPO / "hack"))

from tpikit.ports import free_port  # noqa: E402

CKPT = Path(os.environ.get("TPI_CACHE", Path.home() / ".cache" / "tpi")) / "bench-ckpt"
CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    "eos_token_id": None,  # random weights: never stop early, so every run decodes the same count
}


def ensure_checkpoint() -> Path:
    if not (CKPT / "config.json").exists():
        from tpi_runtime.testing import make_tiny_checkpoint

        t0 = time.monotonic()
        # std 1/sqrt(hidden): activations stay O(1) through 12 layers, like a trained model.
        make_tiny_checkpoint(CKPT, seed=0, max_shard_size="200MB", init_std=768**-0.5, **CONFIG)
        print(f"created {CKPT} in {time.monotonic() - t0:.1f}s", flush=True)
    return CKPT


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


# --- our runtime: one process per rank --------------------------------------------------------
def bench_prompt(n: int) -> list[int]:
    return [1 + (i * 7919) % 31999 for i in range(n)]  # never 0: HF would treat 0 as padding


def worker(args: argparse.Namespace) -> None:
    import torch
    from tpi_runtime.engine import Engine, SamplingParams
    from tpi_runtime.settings import ProcessSettings
    from tpi_runtime.tp import weight_bytes

    baseline_kib = _status_kib("VmRSS")  # after imports, before the process group and weights

    t0 = time.monotonic()
    engine = Engine(
        str(args.model),
        dtype="float32",
        max_batch_size=max(1, args.batch),
        max_model_len=args.prompt_len + args.new_tokens + 8,
        backend="gloo",
        dist_timeout_s=300,
        device="cpu",
        process=ProcessSettings.from_env(os.environ),  # the group, and TPI_NUM_THREADS for the layout
    )
    load_s = time.monotonic() - t0
    torch.set_num_threads(args.threads)
    stop = threading.Event()
    runs: list[dict[str, Any]] = []
    batched: dict[str, float] = {}

    def drive() -> None:
        try:
            prompt = bench_prompt(args.prompt_len)
            engine.submit(prompt[:8], SamplingParams(max_tokens=4, temperature=0.0)).__iter__().__next__()
            for _ in range(args.repeats):
                t_sub = time.perf_counter()
                stamps, toks = [], []
                for t in engine.submit(prompt, SamplingParams(max_tokens=args.new_tokens, temperature=0.0)):
                    stamps.append(time.perf_counter())
                    toks.append(t)
                runs.append(
                    {
                        "ttft": stamps[0] - t_sub,
                        "tpot": [b - a for a, b in itertools.pairwise(stamps)],
                        "tokens": toks,
                    }
                )
            if args.batch > 1:
                # Continuous batching: `batch` concurrent requests share every decode step.
                sp = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
                reqs = [engine.submit(prompt, sp) for _ in range(args.batch)]
                firsts: list[float] = []

                def consume(r: Any) -> None:
                    it = iter(r)
                    next(it)
                    firsts.append(time.perf_counter())
                    for _ in it:
                        pass

                ts = [threading.Thread(target=consume, args=(r,)) for r in reqs]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                elapsed = time.perf_counter() - max(firsts)
                batched["decode_tps"] = args.batch * (args.new_tokens - 1) / elapsed
        finally:
            stop.set()

    if engine.rank == 0:
        threading.Thread(target=drive, daemon=True).start()
    engine.run_forever(stop)
    local = weight_bytes(engine.model)  # with the weights a batching engine packed for oneDNN
    replicated = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "norm" in n)
    kv = sum(2 * b.attn.k_cache.numel() * 4 for b in engine.model.layers)
    print(
        json.dumps(
            {
                "rank": engine.rank,
                "load_s": load_s,
                "runs": runs,
                "threads": torch.get_num_threads(),
                "peak_rss_kib": _status_kib("VmHWM"),
                "baseline_kib": baseline_kib,
                "param_bytes": local,
                "replicated_bytes": replicated,
                "kv_bytes": kv,
                "bytes_read": engine.load_report.bytes_read,
                "batched": batched,
            }
        ),
        flush=True,
    )


def run_ours(tp: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    port = free_port()
    procs = []
    for r in range(tp):
        env = dict(
            os.environ,
            RANK=str(r),
            WORLD_SIZE=str(tp),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE=str(tp),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env.pop("OMP_NUM_THREADS", None)
        env["TPI_NUM_THREADS"] = str(max(1, args.cores // tp))  # before the model: weight layout follows it
        argv = [
            sys.executable,
            __file__,
            "--worker",
            "--model",
            str(args.model),
            "--prompt-len",
            str(args.prompt_len),
            "--new-tokens",
            str(args.new_tokens),
            "--repeats",
            str(args.repeats),
            "--threads",
            str(max(1, args.cores // tp)),
            "--batch",
            str(args.batch if tp == 1 else 1),
        ]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"rank exited {p.returncode}:\n{err[-3000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


# --- transformers -------------------------------------------------------------------------------
def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(args.cores)
    baseline_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: this process also ran the orchestration

    class Clock(LogitsProcessor):  # called once per generated token, right after its forward
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.stamps.append(time.perf_counter())
            return scores

    t0 = time.monotonic()
    model = LlamaForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    load_s = time.monotonic() - t0
    prompt = torch.tensor([bench_prompt(args.prompt_len)])
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        model.generate(prompt[:, :8], attention_mask=torch.ones_like(prompt[:, :8]), max_new_tokens=4, **kw)
    runs = []
    for _ in range(args.repeats):
        clock = Clock()
        with torch.inference_mode():
            t_sub = time.perf_counter()
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                logits_processor=LogitsProcessorList([clock]),
                **kw,
            )
        s = clock.stamps
        runs.append(
            {
                "ttft": s[0] - t_sub,
                "tpot": [b - a for a, b in itertools.pairwise(s)],
                "tokens": out[0, args.prompt_len :].tolist(),
            }
        )
    return {
        "load_s": load_s,
        "runs": runs,
        "threads": torch.get_num_threads(),
        "peak_rss_kib": _status_kib("VmHWM"),
        "baseline_kib": baseline_kib,
    }


def summarise(name: str, res: dict[str, Any], prompt_len: int) -> dict[str, float]:
    best = min(res["runs"], key=lambda r: sum(r["tpot"]))
    tpot = best["tpot"]
    return {
        "name": name,
        "decode_tps": len(tpot) / sum(tpot),
        "tpot_p50_ms": 1e3 * statistics.median(tpot),
        "tpot_p99_ms": 1e3 * pct(tpot, 0.99),
        "prefill_tps": prompt_len / min(r["ttft"] for r in res["runs"]),
        "load_s": res["load_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores each system may use")
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # per worker process
    ap.add_argument("--batch", type=int, default=4, help="concurrent requests for the TP=1 batching row")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    args.model = args.model or ensure_checkpoint()
    import torch

    print(
        f"checkpoint {args.model}; torch {torch.__version__}; {os.cpu_count()} CPUs; each system on "
        f"{args.cores} core(s) (TP=2: {max(1, args.cores // 2)} thread(s) per rank); float32; greedy; "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.repeats}",
        flush=True,
    )
    ours = {tp: run_ours(tp, args) for tp in (1, 2)}
    hf = run_hf(args)
    rows = [summarise("HF transformers generate", hf, args.prompt_len)]
    rows += [summarise(f"tpi_runtime TP={tp}", ours[tp][0], args.prompt_len) for tp in (1, 2)]
    cols = f"{'decode tok/s':>13}{'TPOT p50 ms':>13}{'TPOT p99 ms':>13}{'prefill tok/s':>15}{'load s':>8}"
    print(f"\n{'':28}{cols}")
    for r in rows:
        print(
            f"{r['name']:28}{r['decode_tps']:13.1f}{r['tpot_p50_ms']:13.2f}{r['tpot_p99_ms']:13.2f}"
            f"{r['prefill_tps']:15.1f}{r['load_s']:8.2f}"
        )
    hf_row, tp1, tp2 = rows
    print(f"\nTP=1 decode vs HF: {tp1['decode_tps'] / hf_row['decode_tps']:.2f}x (target >= 1.5x)")
    print(f"TP=2 decode vs TP=1: {tp2['decode_tps'] / tp1['decode_tps']:.2f}x (target >= 0.9x)")
    print(f"TP=1 prefill vs HF: {tp1['prefill_tps'] / hf_row['prefill_tps']:.2f}x")
    same = all(o["runs"][0]["tokens"] == hf["runs"][0]["tokens"] for o in (ours[1][0], ours[2][0]))
    print(f"greedy tokens identical to HF at TP=1 and TP=2: {same}")
    if ours[1][0]["batched"]:
        agg = ours[1][0]["batched"]["decode_tps"]
        print(
            f"TP=1 with {args.batch} concurrent requests (continuous batching): {agg:.1f} aggregate "
            f"decode tok/s = {agg / hf_row['decode_tps']:.2f}x HF single-stream"
        )
    print(
        "\nper-rank memory, MiB (baseline = RSS after imports; growth = peak RSS - baseline - KV cache;"
        "\n  target = 1.2 x (weights/TP + replicated norms))"
    )
    print(f"{'':16}{'peak RSS':>10}{'baseline':>10}{'KV cache':>10}{'growth':>10}{'target':>10}")
    hf_growth = (hf["peak_rss_kib"] - hf["baseline_kib"]) / 1024
    print(f"{'  HF':16}{hf['peak_rss_kib'] / 1024:10.0f}{hf['baseline_kib'] / 1024:10.0f}{'-':>10}{hf_growth:10.0f}")
    for tp in (1, 2):
        for o in ours[tp]:
            target = 1.2 * o["param_bytes"] / 2**20
            kv = o["kv_bytes"] / 2**20
            growth = (o["peak_rss_kib"] - o["baseline_kib"]) / 1024 - kv
            print(
                f"{'  TP=' + str(tp) + ' rank ' + str(o['rank']):16}"
                f"{o['peak_rss_kib'] / 1024:10.0f}{o['baseline_kib'] / 1024:10.0f}{kv:10.0f}{growth:10.0f}"
                f"{target:10.0f}  {'ok' if growth <= target else 'OVER'}"
            )


if __name__ == "__main__":
    main()
