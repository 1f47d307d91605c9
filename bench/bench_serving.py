"""Serving benchmark in the style of vLLM's benchmark_serving: our server (TP=1 and TP=2) against
Hugging Face's `transformers serve --continuous-batching` on the same checkpoint, one run, one machine.

    ~/.cache/tpi/venv/bin/python bench/bench_serving.py [--concurrency 1,4,16,64] [--input-len 128]
        [--output-len 64] [--json out.json]

1. **Load sweep.** Random prompts of `--input-len` tokens (random words of the checkpoint's
   word-level vocabulary: exactly one token each, for both servers), `--output-len` new tokens,
   greedy, streamed from `/v1/completions` by an asyncio aiohttp client that keeps `c` requests in
   flight (c in `--concurrency`; `max(8, 2c)` requests each, after 2 warm-up requests). Per
   system and c: request throughput, output tokens/s, TTFT p50/p99, TPOT p50/p99, failed requests;
   then ours / theirs per c. Target: at c=16, output tokens/s >= 2x theirs with p99 TPOT no worse.
2. **Roofline** (bench/bench_roofline.py, in its own process): the machine's memory read bandwidth
   (the best of torch sum / self-dot / matrix-vector over a 1 GiB float32 buffer) against our
   batch-1 decode (TP=1, the engine in-process): fraction = tokens/s x bytes read per token (every
   weight but the embedding table, plus the K/V of the mean context) / bandwidth. Target >= 0.85.
3. **The matrix products' ceiling** (bench/bench_ceiling.py, in its own process): the output
   tokens/s that the model's matrix products alone allow at the c=16 step on this machine, and
   what share of it the c=16 target (2x theirs, this run) and ours are.
4. **Long-prompt interference.** 8 streams decode; once each has streamed 16 tokens a
   `--long-len`-token prompt arrives. The longest gap between two tokens of any stream from its
   arrival until its first token (+ 8 more stream tokens), against the median gap of the same
   streams over the whole run. Target < 3x. Ours (TP=1) and theirs.

Servers are started exactly as a user would (`python -m tpi_runtime serve`, `torchrun
--nproc-per-node 2 -m tpi_runtime serve`, `transformers serve <dir> --continuous-batching`), each
alone on the machine's cores with its own defaults for threads; the client runs in this process.
The checkpoint (a random ~125M-parameter float32 Llama, word-level tokenizer) is written once to
~/.cache/tpi/bench-serving-ckpt. Not a test: a shared 2-core VM is noisy; the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))
sys.path.insert(0, str(REPO / "contract"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "hack"))

from bench_runtime import CONFIG as RUNTIME_BENCH_CONFIG  # noqa: E402
from serving_stats import RequestResult, RunSummary, interference, ratio, summarize  # noqa: E402
from tpikit.ports import free_port  # noqa: E402

CACHE = Path(os.environ.get("TPI_CACHE", Path.home() / ".cache" / "tpi"))
CKPT = CACHE / "bench-serving-ckpt"
# bench_runtime.py's ~125M float32 Llama (random weights never stop early, so both servers decode
# the same count), with room for the 4k-token prompt.
CONFIG = {**RUNTIME_BENCH_CONFIG, "max_position_embeddings": 8192}
BIN = Path(sys.executable).parent
HF_PAGE = 32  # transformers CB page size (tokens)
HF_BATCH_TOKENS = 256  # transformers CB tokens per step


def ensure_checkpoint() -> Path:
    if not (CKPT / "config.json").exists():
        from tpi_runtime.testing import make_tiny_checkpoint

        make_tiny_checkpoint(CKPT, seed=0, max_shard_size="200MB", init_std=768**-0.5, **CONFIG)
    return CKPT


def random_prompts(n: int, length: int, seed: int) -> list[str]:
    """n prompts of exactly `length` tokens: random non-special words of the word-level vocabulary."""
    from tpi_runtime.testing import SPECIAL_TOKENS, tiny_vocab

    words = tiny_vocab(int(CONFIG["vocab_size"]))[len(SPECIAL_TOKENS) :]  # type: ignore[call-overload]
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=length)) for _ in range(n)]


# --- servers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class System:
    name: str
    kind: str  # "ours" | "hf"
    tp: int = 1


def server_argv(system: System, model: Path, port: int, max_batch: int, max_len: int) -> list[str]:
    if system.kind == "hf":
        return [
            str(BIN / "transformers"),
            "serve",
            str(model),
            "--continuous-batching",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            # Its defaults size the paged cache from 90% of the host's free RAM (~20 GB here) and
            # batch up to 8192 tokens, and on CPU each step's attention mask spans max-batch-tokens x
            # every cached token: ~1 s per token. Its best CPU setting measured: a cache of exactly
            # the tokens the run needs (a server per concurrency) and 256 tokens per step.
            "--cb-block-size",
            str(HF_PAGE),
            "--cb-num-blocks",
            str(max_batch * math.ceil(max_len / HF_PAGE) + 2),
            "--cb-max-batch-tokens",
            str(HF_BATCH_TOKENS),
        ]
    ours = ["-m", "tpi_runtime", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    ours += ["--max-batch-size", str(max_batch), "--max-model-len", str(max_len), "--log-level", "WARNING"]
    if system.tp == 1:
        return [sys.executable, *ours]
    return [str(BIN / "torchrun"), "--nproc-per-node", str(system.tp), *ours]


@contextlib.contextmanager
def serving(system: System, model: Path, max_batch: int, max_len: int, log_dir: Path) -> Iterator[str]:
    """Start the server, wait until it answers, yield its /v1/completions URL, stop it (SIGTERM)."""
    port = free_port(span=system.tp)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPI_", "OMP_", "PET_"))}
    env["PYTHONPATH"] = f"{REPO / 'runtime'}:{REPO / 'contract'}"
    env["PET_MASTER_PORT"] = str(free_port())  # torchrun's --master-port through its env fallback
    log = log_dir / f"{system.name.replace(' ', '_').replace('=', '')}-{port}.log"
    with open(log, "wb") as out:
        argv = server_argv(system, model, port, max_batch, max_len)
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, system, proc, log)
        yield base + "/v1/completions"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # our own child's group (torchrun and its ranks)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_ready(base: str, system: System, proc: subprocess.Popen[bytes], log: Path) -> None:
    import urllib.error
    import urllib.request

    path = "/health" if system.kind == "hf" else "/readyz"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{system.name} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + path, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{system.name} not ready in 300 s:\n{log.read_text()[-3000:]}")


def request_body(system: System, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if system.kind == "ours":  # transformers serve answers 422 to fields it does not know
        body["stream_options"] = {"include_usage": True}
        body["ignore_eos"] = True
    return body


# --- the load generator ----------------------------------------------------------------------------
async def stream_request(session: Any, url: str, body: dict[str, Any], res: RequestResult) -> None:
    """One streamed completion into `res` (chunk times as they arrive, so a caller may watch them)."""
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    res.error = str(ev["error"])[:200]
                    return
                if ev.get("usage"):
                    res.output_tokens = int(ev["usage"]["completion_tokens"])
                    res.prompt_tokens = int(ev["usage"]["prompt_tokens"])
                ch = ev.get("choices") or []
                has_tokens = bool(ch) and (bool(ch[0].get("token_ids")) or bool(ch[0].get("text")))
                if has_tokens:
                    now = time.perf_counter()
                    if not res.chunk_times:
                        res.ttft_s = now - t0
                    res.chunk_times.append(now)
        res.latency_s = time.perf_counter() - t0
        res.ok = bool(res.chunk_times) and res.output_tokens > 0
        if not res.ok:
            res.error = "stream ended without tokens or usage"
    except Exception as e:  # a dropped connection is a failed request, not a crashed bench
        res.error = f"{type(e).__name__}: {e}"[:200]


async def run_load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[list[RequestResult], float]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    results = [RequestResult() for _ in bodies]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=1800)) as session:

        async def one(i: int) -> None:
            async with sem:
                await stream_request(session, url, bodies[i], results[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(bodies))))
        return results, time.perf_counter() - t0


def sweep(system: System, url: str, args: argparse.Namespace, concurrency: list[int]) -> list[RunSummary]:
    warm = random_prompts(2, args.input_len, seed=99)
    # One at a time: a transformers server sized for c=1 has cache blocks for one sequence only.
    asyncio.run(run_load(url, [request_body(system, p, 8) for p in warm], 1))
    out = []
    for c in concurrency:
        n = max(8, 2 * c)
        prompts = random_prompts(n, args.input_len, seed=c)  # the same prompts for every system
        results, duration = asyncio.run(run_load(url, [request_body(system, p, args.output_len) for p in prompts], c))
        s = summarize(c, results, duration)
        errors = sorted({r.error for r in results if not r.ok})
        print(
            f"  {system.name:<16} c={c:<3} {s.output_throughput:7.1f} tok/s  TTFT p50 {s.ttft_p50_ms:7.0f} ms  "
            f"TPOT p50/p99 {s.tpot_p50_ms:6.1f}/{s.tpot_p99_ms:6.1f} ms  failed {s.failed}  ({duration:.0f} s)"
            + (f"  errors: {errors[:2]}" if errors else ""),
            flush=True,
        )
        out.append(s)
    return out


# --- long-prompt interference ------------------------------------------------------------------------
async def _interference(system: System, url: str, args: argparse.Namespace) -> dict[str, float]:
    import aiohttp

    streams = [RequestResult() for _ in range(8)]
    long_res = RequestResult()
    stream_max = args.long_len + 8 - args.input_len - 1  # they are cut off once measured
    prompts = random_prompts(8, args.input_len, seed=1000)
    long_prompt = random_prompts(1, args.long_len, seed=1001)[0]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=1800)) as session:
        tasks = [
            asyncio.create_task(stream_request(session, url, request_body(system, p, stream_max), r))
            for p, r in zip(prompts, streams, strict=True)
        ]

        async def until(cond: Any, what: str, timeout: float = 600) -> None:
            deadline = time.perf_counter() + timeout
            while not cond():
                if time.perf_counter() > deadline or all(t.done() for t in tasks):
                    raise SystemExit(f"interference ({system.name}): {what} did not happen; {streams[0].error}")
                await asyncio.sleep(0.01)

        await until(lambda: all(len(r.chunk_times) >= 16 for r in streams), "16 tokens on every stream")
        start = time.perf_counter()
        long_task = asyncio.create_task(stream_request(session, url, request_body(system, long_prompt, 2), long_res))
        await until(lambda: bool(long_res.chunk_times) or long_task.done(), "the long prompt's first token")
        if not long_res.chunk_times:
            raise SystemExit(f"interference ({system.name}): long prompt failed: {long_res.error}")
        first = long_res.chunk_times[0]
        await until(lambda: all(sum(t > first for t in r.chunk_times) >= 8 for r in streams), "8 tokens after it")
        end = max(min(t for t in r.chunk_times if t > first) for r in streams)
        for t in tasks:
            t.cancel()  # disconnect: both servers free the slots
        await asyncio.gather(*tasks, long_task, return_exceptions=True)
    worst, median = interference([r.chunk_times for r in streams], start, end)
    return {
        "max_gap_ms": worst * 1e3,
        "median_gap_ms": median * 1e3,
        "ratio": ratio(worst, median),
        "long_prompt_ttft_s": first - start,
    }


# --- report ------------------------------------------------------------------------------------------
def print_table(rows: dict[str, list[RunSummary]]) -> None:
    print()
    print(
        f"{'system':<18}{'c':>4}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'TPOT p50':>10}{'TPOT p99':>10}{'failed':>8}"
    )
    for name, sums in rows.items():
        for s in sums:
            print(
                f"{name:<18}{s.concurrency:>4}{s.request_throughput:>8.2f}{s.output_throughput:>11.1f}"
                f"{s.ttft_p50_ms:>10.0f}{s.ttft_p99_ms:>10.0f}{s.tpot_p50_ms:>10.1f}{s.tpot_p99_ms:>10.1f}{s.failed:>8}"
            )
    print("(TTFT and TPOT in ms)")


def print_ratios(rows: dict[str, list[RunSummary]], theirs: str) -> dict[str, Any]:
    print(f"\nours / {theirs}, per concurrency: output tok/s (higher is better), TPOT p99 (lower is better)")
    out: dict[str, Any] = {}
    for name, sums in rows.items():
        if name == theirs:
            continue
        for s, t in zip(sums, rows[theirs], strict=True):
            tput, tpot = ratio(s.output_throughput, t.output_throughput), ratio(s.tpot_p99_ms, t.tpot_p99_ms)
            out[f"{name} c={s.concurrency}"] = {"output_throughput": tput, "tpot_p99": tpot}
            print(f"  {name:<16} c={s.concurrency:<3} output tok/s {tput:5.2f}x   TPOT p99 {tpot:5.2f}x")
    return out


def run_sub_bench(script: str, log_dir: Path, *args: str) -> dict[str, Any]:
    """bench/<script> in a process of its own, with the runtime's defaults (no TPI_* settings of
    this shell); returns what it wrote with --json."""
    out = log_dir / Path(script).with_suffix(".json").name
    cmd = [sys.executable, str(REPO / "bench" / script), *args, "--json", str(out)]
    subprocess.run(cmd, check=True, env={k: v for k, v in os.environ.items() if not k.startswith("TPI_")})
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def ceiling(args: argparse.Namespace, rows: dict[str, list[RunSummary]], theirs: str, ours: str) -> dict[str, Any]:
    """bench/bench_ceiling.py in its own process: the output tokens/s the matrix products alone
    allow at c=16, against what the c=16 target asks for (2x theirs, measured in this run)."""
    print("\nthe c=16 target against the matrix products' ceiling (bench/bench_ceiling.py):", flush=True)
    result = run_sub_bench(
        "bench_ceiling.py", args.log_dir,
        "--logit-rows", "16", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
    )  # fmt: skip
    top = result["ceiling_output_tok_s"]
    i = args.concurrency.index(16)
    needed = 2 * rows[theirs][i].output_throughput
    print(f"  the target, 2 x {theirs}'s {rows[theirs][i].output_throughput:.1f} = {needed:.1f} output tok/s: "
          f"{needed / top:.2f} of the ceiling")  # fmt: skip
    if ours in rows:
        got = rows[ours][i].output_throughput
        print(f"  {ours}: {got:.1f} output tok/s: {got / top:.2f} of it")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--long-len", type=int, default=4096, help="the interfering prompt's tokens")
    ap.add_argument("--systems", default="ours-tp1,ours-tp2,hf", help="comma-separated subset")
    ap.add_argument("--skip-interference", action="store_true")
    ap.add_argument("--skip-roofline", action="store_true")
    ap.add_argument("--skip-ceiling", action="store_true", help="skip bench_ceiling.py (with c=16 and theirs)")
    ap.add_argument("--json", type=Path, help="write every number here too")
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp/tpi-bench-serving"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: every `serving` block stops its server
    args.log_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    cores = os.cpu_count() or 1
    model = ensure_checkpoint()
    print(
        f"bench_serving: {model} (~125M float32 Llama), {cores} cores, prompts {args.input_len} tokens, "
        f"{args.output_len} new tokens, greedy, streamed; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    systems = {
        "ours-tp1": System("tpi_runtime TP=1", "ours", 1),
        "ours-tp2": System("tpi_runtime TP=2", "ours", 2),
        "hf": System("transformers CB", "hf"),
    }
    chosen = [systems[s] for s in args.systems.split(",")]
    max_len = args.input_len + args.output_len + 8
    rows: dict[str, list[RunSummary]] = {}
    inter: dict[str, dict[str, float]] = {}
    for system in chosen:
        # transformers CB's step cost grows with its cache size: a server sized for each concurrency.
        runs = [[c] for c in args.concurrency] if system.kind == "hf" else [args.concurrency]
        for cs in runs:
            t0 = time.monotonic()
            with serving(system, model, max(cs), max_len, args.log_dir) as url:
                print(f"{system.name}: ready in {time.monotonic() - t0:.1f} s", flush=True)
                rows.setdefault(system.name, []).extend(sweep(system, url, args, cs))
        if system.tp == 1 and not args.skip_interference:
            # Its own server: room for the 8 streams and the long prompt, each as long as the long prompt.
            with serving(system, model, 9, args.long_len + 8, args.log_dir) as url:
                inter[system.name] = asyncio.run(_interference(system, url, args))
    print_table(rows)
    result: dict[str, Any] = {"sweep": {k: [asdict(s) for s in v] for k, v in rows.items()}}
    theirs = systems["hf"].name
    if theirs in rows:
        result["ratios"] = print_ratios(rows, theirs)
        ours1 = rows.get(systems["ours-tp1"].name)
        if ours1 and 16 in args.concurrency:
            i = args.concurrency.index(16)
            s, t = ours1[i], rows[theirs][i]
            ok = s.output_throughput >= 2 * t.output_throughput and s.tpot_p99_ms <= t.tpot_p99_ms
            print(
                f"target at c=16 (TP=1): output tok/s {ratio(s.output_throughput, t.output_throughput):.2f}x "
                f"(>= 2x), TPOT p99 {ratio(s.tpot_p99_ms, t.tpot_p99_ms):.2f}x (<= 1x): {'MET' if ok else 'MISSED'}"
            )

    if not args.skip_roofline:
        # Its own process (the engine in-process, no HTTP), alone on the machine like each server.
        print("\nbatch-1 decode against the roofline (bench/bench_roofline.py):", flush=True)
        result["roofline"] = run_sub_bench(
            "bench_roofline.py", args.log_dir,
            "--model", str(model), "--prompt-len", str(args.input_len), "--new-tokens", str(args.output_len),
        )  # fmt: skip
    if theirs in rows and 16 in args.concurrency and not args.skip_ceiling:
        result["ceiling"] = ceiling(args, rows, theirs, systems["ours-tp1"].name)
    if inter:
        print(f"\nlong-prompt interference: 8 streams, a {args.long_len}-token prompt arrives")
        for name, r in inter.items():
            print(
                f"  {name:<16} longest gap {r['max_gap_ms']:7.0f} ms, median gap {r['median_gap_ms']:6.1f} ms: "
                f"{r['ratio']:5.1f}x (target < 3x); the long prompt's TTFT {r['long_prompt_ttft_s']:.1f} s"
            )
        result["interference"] = inter
    print(f"\ntotal {time.monotonic() - t_start:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
