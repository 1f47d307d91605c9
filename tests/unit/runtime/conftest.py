"""Shared fixtures for runtime tests: tiny checkpoints (built once per session) and a launcher
that runs real rank processes (torchrun-style env, gloo over loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tpi_runtime.testing import make_tiny_checkpoint
from tpikit.ports import free_port

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("rank_worker.py")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small on purpose: test prompts (~40 positions) cross all three llama3 frequency bands.
    "original_max_position_embeddings": 32,
}


@pytest.fixture(scope="session")
def ckpt_main(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Untied, 4 q heads / 2 kv heads (tp=4 replicates KV), vocab 257 (not divisible by 2 or 4),
    llama3 rope scaling, saved as several safetensors shards + index."""
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "main", rope_scaling=LLAMA3_ROPE)
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) >= 3
    return d


@pytest.fixture(scope="session")
def ckpt_tied(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tied embeddings, 4 kv heads (sharded, never replicated), vocab 250, one model.safetensors."""
    d = make_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tied",
        seed=1,
        tie_word_embeddings=True,
        num_key_value_heads=4,
        vocab_size=250,
        max_shard_size="100MB",
    )
    assert os.path.exists(os.path.join(d, "model.safetensors"))
    return d


@pytest.fixture(scope="session")
def ckpt_families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tiny checkpoint per non-Llama family (testing.FAMILY_CONFIGS): Mistral with a sliding
    window of 7 (shorter than the test prompts), Qwen2 with q/k/v biases, Qwen3 with q/k norms and
    head_dim 24 != 64 / 4; 4 q heads / 2 kv heads, vocab 257."""
    root = tmp_path_factory.mktemp("families")
    return {
        f: make_tiny_checkpoint(root / f, family=f, seed=3, max_shard_size="100MB")
        for f in ("mistral", "qwen2", "qwen3")
    }


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The last stdout line that is a JSON document (what rank_worker prints)."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError(f"rank {self.rank} printed no JSON result:\n{self.stdout}\n{self.stderr[-3000:]}")


def rank_env(rank: int, world: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONPATH=os.pathsep.join([str(REPO / "runtime"), str(REPO / "contract"), str(REPO)]),
        OMP_NUM_THREADS="1",  # 2 shared cores: oversubscription would only make tests slow
    )
    env.update(extra or {})
    return env


def spawn_ranks(world: int, argv: list[str], extra_env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, *argv],
            env=rank_env(r, world, port, extra_env),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]


def run_ranks(
    world: int, argv: list[str], extra_env: dict[str, str] | None = None, timeout: float = 240
) -> list[RankResult]:
    """Run `python argv...` as `world` ranks and wait for all; kills every rank on timeout."""
    procs = spawn_ranks(world, argv, extra_env)
    deadline = time.monotonic() + timeout
    results = []
    try:
        for r, p in enumerate(procs):
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(RankResult(r, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join(f"--- rank {r}:\n{p.communicate()[1][-3000:]}" for r, p in enumerate(procs))
        raise AssertionError(f"ranks did not finish within {timeout}s\n{logs}") from None
    return results


def worker_argv(mode: str, *args: str) -> list[str]:
    return [str(WORKER), mode, *args]


def assert_all_ok(results: list[RankResult]) -> None:
    """Every rank exited 0; else the failure names every rank that did not, with its output (the
    first rank's error is often only "connection closed by peer": the cause is in a peer's)."""
    failed = [r for r in results if r.returncode != 0]
    assert not failed, "\n".join(
        f"rank {r.rank} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}" for r in failed
    )
