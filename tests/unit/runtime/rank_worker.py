"""One rank of a multi-process runtime test (launched by conftest.run_ranks with torchrun-style env).

Modes (rank 0 prints one JSON line with the results; safetensors files for tensors):
  parity OUT_DIR STEPS PROMPT_IDS MODEL...   model-level prefill logits + greedy decode per model
  load MODEL                                 shard-on-load byte accounting and peak RSS (HF dir or GGUF)
  engine MODEL SCENARIO                      Engine scenarios driven from a thread on rank 0 (env:
                                             T_MAX_BATCH, T_CUDA_GRAPHS, T_KV_BLOCKS, T_MAX_TOKENS)
  stream MODEL                               endless requests on rank 0 (peer-failure tests)
  join                                       Dist.form (the rendezvous) + one all_reduce of the ranks
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from safetensors.torch import save_file
from tpi_runtime.checkpoint import Checkpoint
from tpi_runtime.config import check_tp
from tpi_runtime.dist import Dist
from tpi_runtime.engine import Engine, RequestError, SamplingParams
from tpi_runtime.kv_cache import BLOCK_SIZE, bytes_per_token
from tpi_runtime.model import BatchMeta, Transformer
from tpi_runtime.settings import ProcessSettings
from tpi_runtime.tp import weight_bytes

CPU = torch.device("cpu")
#: What the runtime would read from this rank's environment (conftest.rank_env).
PROCESS = ProcessSettings.from_env(os.environ)


def emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def parity(out_dir: str, steps: int, prompt: list[int], models: list[str]) -> None:
    env = PROCESS.dist
    dist = Dist(env, backend="gloo", timeout_s=60, shm=PROCESS.shm_collectives)
    result = {}
    for i, model_dir in enumerate(models):
        ckpt = Checkpoint.open(model_dir)  # a HF directory or a GGUF file
        cfg = ckpt.config
        check_tp(cfg, env.world_size)
        model = Transformer(cfg, dist, dtype=torch.float32, device=CPU)
        report = ckpt.load_weights(model, env.rank, env.world_size)
        model.setup_cache(num_slots=3, max_len=128)
        slot = 2  # not slot 0: slot indexing must be right too
        meta = BatchMeta.build([(slot, 0, len(prompt))], CPU)
        meta.last_token_idx = torch.arange(len(prompt))  # logits for every prompt position
        prefill = model(torch.tensor(prompt), meta)
        tokens = [int(prefill[-1].argmax())]
        decode = []
        for s in range(steps - 1):
            meta = BatchMeta.build([(slot, len(prompt) + s, 1)], CPU)
            logits = model(torch.tensor([tokens[-1]]), meta)[0]
            decode.append(logits)
            tokens.append(int(logits.argmax()))
        if env.rank == 0:
            save_file(
                {"prefill": prefill.contiguous(), "decode": torch.stack(decode)},
                os.path.join(out_dir, f"{i}.safetensors"),
            )
        batched = _batched_greedy(model, prompt, steps) if os.environ.get("T_PARITY_BATCHED") else None
        result[model_dir] = {
            "tokens": tokens,
            "batched": batched,
            "bytes_read": report.bytes_read,
            "collectives": dist.collectives,
            "shm": dist.shm is not None,
            "weight_blocks": model.layers[0].attn.qkv.weight.shape[0],  # CPU layout: one per thread
        }
    dist.close()
    emit(result)


def _batched_greedy(model: Transformer, prompt: list[int], steps: int) -> list[list[int]]:
    """Greedy tokens for `prompt` (slot 0) and `prompt[5:]` (slot 1) run together through the
    batched paths: a mixed prefill, a prefill continuing a cached prefix, batched decodes of
    sequences of different lengths."""
    a, b, cut = prompt, prompt[5:], min(17, len(prompt) - 2)
    meta = BatchMeta.build([(0, 0, cut), (1, 0, len(b))], CPU)
    first_b = int(model(torch.tensor(a[:cut] + b), meta)[1].argmax())
    meta = BatchMeta.build([(0, cut, len(a) - cut)], CPU)
    out = [[int(model(torch.tensor(a[cut:]), meta)[0].argmax())], [first_b]]
    for s in range(steps - 1):
        meta = BatchMeta.build([(0, len(a) + s, 1), (1, len(b) + s, 1)], CPU)
        logits = model(torch.tensor([out[0][-1], out[1][-1]]), meta)
        for i in range(2):
            out[i].append(int(logits[i].argmax()))
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def load(model_dir: str) -> None:
    env = PROCESS.dist
    dist = Dist(env, backend="gloo", timeout_s=60, shm=PROCESS.shm_collectives)
    ckpt = Checkpoint.open(model_dir)  # a HF directory (safetensors) or a GGUF file
    cfg = ckpt.config
    model = Transformer(cfg, dist, dtype=torch.float32, device=CPU)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: measure the peak of the load alone, not of the imports
    before = _status_kib("VmRSS")
    report = ckpt.load_weights(model, env.rank, env.world_size)
    peak = _status_kib("VmHWM")
    local = weight_bytes(model)
    emit(
        {
            "rank": env.rank,
            "bytes_read": report.bytes_read,
            "bytes_total": report.bytes_total,
            "param_bytes": local,
            "rss_before_kib": before,
            "peak_rss_kib": peak,
            "rss_after_kib": _status_kib("VmRSS"),
            "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
    )
    dist.barrier()
    dist.close()


def _collect(req: Any) -> dict[str, Any]:
    try:
        return {"tokens": list(req), "finish": req.finish_reason}
    except RequestError as e:
        return {"error": str(e), "finish": req.finish_reason}


PROMPTS = [
    [1, 5, 9, 13, 17],
    [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50],
    [1, 7],
    [1, 100, 101, 102],
    [1, 60, 61, 62, 63, 64, 65],
    [1, 3, 3, 3],
]


def scenario_batching(engine: Engine) -> dict[str, Any]:
    greedy = [SamplingParams(max_tokens=12 + 3 * i, temperature=0.0) for i in range(len(PROMPTS))]
    seq = [_collect(engine.submit(p, sp)) for p, sp in zip(PROMPTS, greedy, strict=True)]
    max_running = 0
    reqs = [engine.submit(p, sp) for p, sp in zip(PROMPTS, greedy, strict=True)]
    with ThreadPoolExecutor(len(reqs)) as ex:
        futs = [ex.submit(_collect, r) for r in reqs]
        while not all(f.done() for f in futs):
            max_running = max(max_running, engine.stats().running)
            time.sleep(0.001)
        conc = [f.result() for f in futs]
    # Staggered arrival: requests join a batch that is already decoding.
    stag_reqs = []
    for p, sp in zip(PROMPTS, greedy, strict=True):
        stag_reqs.append(engine.submit(p, sp))
        time.sleep(0.01)
    stag = [_collect(r) for r in stag_reqs]
    return {"sequential": seq, "concurrent": conc, "staggered": stag, "max_running": max_running}


def scenario_sampling(engine: Engine) -> dict[str, Any]:
    p = PROMPTS[1]
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = _collect(engine.submit(p, seeded))
    # The same seed while other sampled requests run alongside must give the same tokens.
    others = [engine.submit(q, SamplingParams(max_tokens=20, temperature=1.3, seed=i)) for i, q in enumerate(PROMPTS)]
    b = _collect(engine.submit(p, seeded))
    for o in others:
        _collect(o)
    c = _collect(engine.submit(p, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=99)))
    top1 = _collect(engine.submit(p, SamplingParams(max_tokens=20, temperature=0.8, top_k=1, seed=5)))
    greedy = _collect(engine.submit(p, SamplingParams(max_tokens=20, temperature=0.0)))
    hot = _collect(engine.submit(p, SamplingParams(max_tokens=20, temperature=5.0, seed=7)))
    return {"seeded_a": a, "seeded_b": b, "other_seed": c, "top_k1": top1, "greedy": greedy, "hot": hot}


def scenario_controls(engine: Engine) -> dict[str, Any]:
    out: dict[str, Any] = {}
    errors = {}
    for name, ids, sp in [
        ("empty", [], SamplingParams()),
        ("out_of_range", [1, engine.config.vocab_size], SamplingParams()),
        ("too_long", [1] * 10, SamplingParams(max_tokens=engine.max_model_len)),
        ("bad_top_p", [1, 2], SamplingParams(top_p=0.0)),
        ("bad_logit_bias", [1, 2], SamplingParams(logit_bias=((engine.config.vocab_size, 1.0),))),
    ]:
        try:
            engine.submit(ids, sp)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    # Cancel mid-stream: iteration ends with the requested reason, the slot is freed.
    r = engine.submit(PROMPTS[0], SamplingParams(max_tokens=100, temperature=0.0))
    got = []
    for t in r:
        got.append(t)
        if len(got) == 3:
            r.cancel()
    out["cancel"] = {"n": len(got), "finish": r.finish_reason}
    r2 = engine.submit(PROMPTS[0], SamplingParams(max_tokens=100, temperature=0.0))
    for n2, _ in enumerate(r2, 1):
        if n2 == 2:
            r2.cancel("stop")
    out["cancel_stop"] = {"finish": r2.finish_reason}
    # A stop token taken from a greedy run ends the request before that token is emitted.
    ref = _collect(engine.submit(PROMPTS[2], SamplingParams(max_tokens=10, temperature=0.0)))
    out["ref"] = ref
    if len(ref["tokens"]) >= 5:
        stop_tok = ref["tokens"][4]
        out["stopped"] = _collect(
            engine.submit(PROMPTS[2], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_tok,)))
        )
        out["stop_tok"] = stop_tok
    # Idle: the step counter must still advance (idle broadcasts every 0.5 s). Waited for, not
    # slept for, so that a loaded machine that delays the engine thread cannot fail the test.
    idle_from, deadline = engine.stats().step, time.monotonic() + 10
    while engine.stats().step < idle_from + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    out["stats"] = engine.stats().__dict__
    return out


def scenario_oom(engine: Engine) -> dict[str, Any]:
    greedy = [SamplingParams(max_tokens=12, temperature=0.0) for _ in PROMPTS]
    reqs = [engine.submit(p, sp) for p, sp in zip(PROMPTS, greedy, strict=True)]
    with ThreadPoolExecutor(len(reqs)) as ex:
        conc = list(ex.map(_collect, reqs))
    after = engine.stats().__dict__
    seq = [_collect(engine.submit(p, sp)) for p, sp in zip(PROMPTS, greedy, strict=True)]
    return {"concurrent": conc, "sequential": seq, "stats": after}


def scenario_nonfinite(engine: Engine) -> dict[str, Any]:
    """One request's logits turn NaN after two tokens: only it fails; its batch-mates finish and the
    group keeps serving (at TP=2 the follower keeps following)."""
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [_collect(engine.submit(p, greedy)) for p in PROMPTS[:2]]
    orig = engine._execute
    victim: list[Any] = []

    def poisoned(ids: list[int], seqs: list[Any], prompt_rows: Any = ()) -> Any:
        out = orig(ids, seqs, prompt_rows)
        if out is not None and victim:
            logits = out[0].clone()  # an inference tensor: edit a copy
            for i, r in enumerate(engine._running):
                if r is victim[0] and len(r.output_ids) >= 2:
                    logits[i] = float("nan")
            out = (logits, out[1])
        return out

    engine._execute = poisoned  # type: ignore[method-assign]
    victim.append(engine.submit(PROMPTS[2], SamplingParams(max_tokens=12, temperature=0.7, seed=1)))
    mates = [engine.submit(p, greedy) for p in PROMPTS[:2]]
    bad = _collect(victim[0])
    together = [_collect(r) for r in mates]
    after = _collect(engine.submit(PROMPTS[0], greedy))
    return {"alone": alone, "together": together, "victim": bad, "after": after}


def scenario_paged(engine: Engine) -> dict[str, Any]:
    """Mixed prompt lengths, all at once, into a pool too small for them together: admission waits
    for blocks, decodes preempt the newest request; each must still get its tokens from alone."""
    lens, outs = [5, 12, 40, 70, 3, 25], [30, 20, 40, 30, 50, 20]
    prompts = [[1, *((7 + 11 * i + 5 * j) % 250 + 3 for j in range(k - 1))] for i, k in enumerate(lens)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in outs]
    alone = [_collect(engine.submit(p, sp)) for p, sp in zip(prompts, params, strict=True)]
    before = engine.stats().preemptions
    reqs = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    max_running = max_used = 0
    with ThreadPoolExecutor(len(reqs)) as ex:
        futs = [ex.submit(_collect, r) for r in reqs]
        while not all(f.done() for f in futs):
            st = engine.stats()
            max_running, max_used = max(max_running, st.running), max(max_used, st.kv_blocks_used)
            time.sleep(0.001)
        together = [f.result() for f in futs]
    st = engine.stats()
    return {
        "prompts": prompts,
        "alone": alone,
        "together": together,
        "preemptions": st.preemptions - before,
        "max_running": max_running,
        "max_blocks_used": max_used,
        "stats": st.__dict__,
    }


def scenario_chunked(engine: Engine) -> dict[str, Any]:
    """Three streams decoding, then a long prompt: it is prefilled in budget-sized chunks while the
    streams keep getting a token every step."""
    greedy = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    streams = [engine.submit(p, greedy) for p in PROMPTS[:3]]
    deadline = time.monotonic() + 60
    while not all(len(r.output_ids) >= 2 for r in streams) and time.monotonic() < deadline:
        time.sleep(0.001)
    long_prompt = [1, *((13 + 3 * j) % 250 + 3 for j in range(99))]
    long_params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    long_req = engine.submit(long_prompt, long_params)
    together = [_collect(r) for r in [*streams, long_req]]
    alone = _collect(engine.submit(long_prompt, long_params))
    return {
        "long_id": long_req.id,
        "stream_ids": [r.id for r in streams],
        "long_prompt": long_prompt,
        "together": together,
        "alone": alone,
        "streams_alone": [_collect(engine.submit(p, greedy)) for p in PROMPTS[:3]],
        "stats": engine.stats().__dict__,
    }


def scenario_prompt_logprobs(engine: Engine) -> dict[str, Any]:
    """Prompt logprobs (echo's): a long prompt alone with nothing generated (max_tokens=0), then
    beside other requests that generate, one of them with prompt logprobs too."""
    long_prompt = [1, *((13 + 7 * j) % 250 + 3 for j in range(44))]

    def entries(req: Any) -> list[Any]:
        lps = req.prompt_logprobs
        return [] if lps is None else [[e.token, e.logprob, [list(t) for t in e.top]] for e in lps.entries]

    def run(prompt: list[int], sp: SamplingParams) -> dict[str, Any]:
        req = engine.submit(prompt, sp)
        out = _collect(req)
        return {**out, "prompt_logprobs": entries(req)}

    alone = run(long_prompt, SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=3))
    reqs = [
        engine.submit(PROMPTS[1], SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=0)),
        engine.submit(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0)),
        engine.submit(long_prompt, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2)),
    ]
    together = [{**_collect(r), "prompt_logprobs": entries(r)} for r in reqs]
    one_token = run([1], SamplingParams(max_tokens=0, prompt_logprobs=1))
    return {"long_prompt": long_prompt, "alone": alone, "together": together, "one_token": one_token}


def scenario_prompt_logprobs_failure(engine: Engine) -> dict[str, Any]:
    """Rank 0's prompt-logprob reduction raises on the first of two 64-row slices: only that request
    fails, the follower still gets both slices' all-gathers, and the group serves on."""
    orig = engine._row_logits

    def broken(hidden: Any) -> Any:
        for logits in orig(hidden):
            yield logits[:, :0]  # no vocabulary: the reduction's gather raises

    long_prompt = [1, *((13 + 7 * j) % 250 + 3 for j in range(99))]
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    engine._row_logits = broken  # type: ignore[method-assign]
    failed = _collect(engine.submit(long_prompt, SamplingParams(max_tokens=4, prompt_logprobs=1)))
    engine._row_logits = orig  # type: ignore[method-assign]
    after = engine.submit(long_prompt, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1))
    out = _collect(after)
    return {
        "failed": failed,
        "after": {**out, "n_prompt_logprobs": len(after.prompt_logprobs.entries) if after.prompt_logprobs else 0},
        "plain": _collect(engine.submit(long_prompt, greedy)),
    }


def scenario_shared_prefix(engine: Engine) -> dict[str, Any]:
    """n = 4 choices of each of two 40-token prompts (seeded sampling, and greedy), all submitted
    at once, then a request whose first 33 tokens are the first prompt's: the choices after the
    first share its cached blocks (scheduler.py), in the step that fills them or a later one."""
    prompts = [[1, *((7 + 13 * i + 5 * j) % 250 + 3 for j in range(39))] for i in range(2)]
    seeded = [SamplingParams(max_tokens=12, temperature=0.8, seed=100 + c, ignore_eos=True) for c in range(4)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reqs = [engine.submit(prompts[0], sp) for sp in seeded] + [engine.submit(prompts[1], greedy) for _ in range(4)]
    choices = [_collect(r) for r in reqs]
    extended = [*prompts[0][:33], 200, 201, 202]
    later = _collect(engine.submit(extended, greedy))
    stats = engine.stats().__dict__
    return {"prompts": prompts, "extended": extended, "choices": choices, "later": later, "stats": stats}


def scenario_oom_on_shared_prefix(engine: Engine) -> dict[str, Any]:
    """A request admitted on another's cached blocks runs out of memory alone (a one-shot fake OOM
    on its 8-token chunk): it fails, once, and the engine then serves the same prompt from the
    same cached blocks."""
    prompt = [1, *((11 + 3 * j) % 250 + 3 for j in range(39))]  # 40 tokens: 2 full blocks
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    first = _collect(engine.submit(prompt, greedy))
    generated = engine.stats().tokens_generated
    fired: list[tuple[int, int]] = []

    def one_shot(batch_size: int, num_tokens: int) -> None:
        if not fired and (batch_size, num_tokens) == (1, 8):
            fired.append((batch_size, num_tokens))
            raise torch.cuda.OutOfMemoryError("FAKE GPU OOM: the shared-prefix request's chunk")

    engine.fault_injector = one_shot
    failed = _collect(engine.submit(prompt, greedy))
    again = _collect(engine.submit(prompt, greedy))
    st = engine.stats().__dict__
    return {
        "first": first,
        "failed": failed,
        "again": again,
        "fired": fired,
        "generated": st["tokens_generated"] - generated,
        "stats": st,
    }


SCENARIOS = {
    "oom_on_shared_prefix": scenario_oom_on_shared_prefix,
    "shared_prefix": scenario_shared_prefix,
    "prompt_logprobs": scenario_prompt_logprobs,
    "prompt_logprobs_failure": scenario_prompt_logprobs_failure,
    "paged": scenario_paged,
    "chunked": scenario_chunked,
    "nonfinite": scenario_nonfinite,
    "batching": scenario_batching,
    "sampling": scenario_sampling,
    "controls": scenario_controls,
    "oom": scenario_oom,
}


def engine_mode(model_dir: str, scenario: str) -> None:
    kv_blocks = os.environ.get("T_KV_BLOCKS")  # a pool of this many usable blocks
    kv_bytes = None
    if kv_blocks:
        cfg = Checkpoint.open(model_dir).config
        per_token = bytes_per_token(cfg, PROCESS.dist.rank, PROCESS.dist.world_size, torch.float32)
        kv_bytes = (int(kv_blocks) + 1) * BLOCK_SIZE * per_token  # + the scratch block
    engine = Engine(
        model_dir,
        dtype="float32",
        max_batch_size=int(os.environ.get("T_MAX_BATCH", "8")),
        max_model_len=128,
        backend="gloo",
        dist_timeout_s=60,
        device="cpu",
        process=PROCESS,
        cuda_graphs=os.environ.get("T_CUDA_GRAPHS", "auto"),  # "on": the static decode path, eager on CPU
        kv_cache_memory=kv_bytes,
        max_num_batched_tokens=int(os.environ.get("T_MAX_TOKENS", "2048")),
        prefix_caching=os.environ.get("T_PREFIX_CACHING", "on") == "on",
    )
    stop = threading.Event()
    result: dict[str, Any] = {}
    steps: list[Any] = []
    engine.on_step = steps.append

    def drive() -> None:
        try:
            result.update(SCENARIOS[scenario](engine))
        except BaseException as e:
            result["exception"] = repr(e)
        finally:
            stop.set()

    if engine.rank == 0:
        threading.Thread(target=drive, daemon=True).start()
    engine.run_forever(stop)
    if engine.rank == 0:
        result["steps"] = [s.__dict__ for s in steps]
        result["static_decode"] = engine.decode_runner is not None
        emit(result)
    else:
        emit({"rank": engine.rank, "stats": engine.stats().__dict__})


def stream_mode(model_dir: str) -> None:
    timeout = float(os.environ.get("T_DIST_TIMEOUT", "10"))
    engine = Engine(
        model_dir,
        dtype="float32",
        max_batch_size=2,
        max_model_len=256,
        backend="gloo",
        dist_timeout_s=timeout,
        device="cpu",
        process=PROCESS,
    )
    stop = threading.Event()

    def load_gen() -> None:
        while True:
            for t in engine.submit([1, 2, 3], SamplingParams(max_tokens=200, temperature=1.0, seed=0)):
                print(f"TOKEN {t}", flush=True)

    if engine.rank == 0:
        threading.Thread(target=load_gen, daemon=True).start()
    else:
        print("READY", flush=True)
    engine.run_forever(stop)


def join_mode() -> None:
    """Form the group the runtime's way, then sum the ranks: every rank prints the same total."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.monotonic()
    dist = Dist(PROCESS.dist, backend="gloo", timeout_s=60, shm=PROCESS.shm_collectives)
    total = dist.all_reduce(torch.tensor([float(PROCESS.dist.rank)]), name="sum").item()
    emit({"rank": PROCESS.dist.rank, "sum": total, "waited_s": time.monotonic() - t0})
    dist.close()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # rank_env: 1 unless a test asks
    if mode == "parity":
        parity(args[0], int(args[1]), [int(x) for x in args[2].split(",")], args[3:])
    elif mode == "load":
        load(args[0])
    elif mode == "engine":
        engine_mode(args[0], args[1])
    elif mode == "stream":
        stream_mode(args[0])
    elif mode == "join":
        join_mode()
    else:
        raise SystemExit(f"unknown mode {mode}")
