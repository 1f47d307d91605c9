"""CLI (`python -m tpi_runtime generate`), RuntimeSettings (flags, TPI_* env defaults, process env),
config parsing and the tp rule."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from tpi_runtime.__main__ import build_parser
from tpi_runtime.config import ModelConfig, check_tp, valid_tp_sizes
from tpi_runtime.settings import DistEnv, HeartbeatSettings, RuntimeSettings, SettingsError
from tpi_runtime.testing import TINY_CONFIG, load_hf_model
from tpikit.ports import free_port

from .conftest import assert_all_ok, rank_env, run_ranks

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def test_valid_tp_sizes() -> None:
    # tp 16 and 32 exceed the 8 KV heads but divide evenly: KV heads are replicated.
    assert valid_tp_sizes(LLAMA3_8B) == [1, 2, 4, 8, 16, 32]
    assert valid_tp_sizes(TINY_CONFIG) == [1, 2, 4]
    odd = {
        **TINY_CONFIG,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "hidden_size": 96,
        "intermediate_size": 100,
    }
    assert valid_tp_sizes(odd) == [1, 2]  # 3: 3 % 2 kv heads; 6: intermediate 100 % 6


def test_invalid_tp_message_lists_valid_sizes() -> None:
    cfg = ModelConfig.from_dict(TINY_CONFIG)
    with pytest.raises(ValueError, match=r"valid sizes: \[1, 2, 4\]") as e:
        check_tp(cfg, 3)
    assert "num_attention_heads=4 is not divisible by 3" in str(e.value)


def test_config_reads_both_rope_formats() -> None:
    old = ModelConfig.from_dict(LLAMA3_8B)
    assert old.rope_type == "llama3" and old.rope_theta == 500000.0 and old.head_dim == 128
    new_style = {k: v for k, v in LLAMA3_8B.items() if k not in ("rope_theta", "rope_scaling")}
    new_style["rope_parameters"] = {**LLAMA3_8B["rope_scaling"], "rope_theta": 500000.0}
    new = ModelConfig.from_dict(new_style)
    assert new.rope_type == "llama3" and new.rope_theta == 500000.0
    assert new.rope_scaling is not None and new.rope_scaling["factor"] == 8.0
    plain = ModelConfig.from_dict({**TINY_CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_type == "default" and plain.rope_scaling is None
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        ModelConfig.from_dict({**TINY_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def _settings(argv: list[str], env: dict[str, str]) -> RuntimeSettings:
    return RuntimeSettings.from_args(build_parser().parse_args(argv), env)


def test_flags_default_from_tpi_env() -> None:
    env = {
        "TPI_MAX_BATCH_SIZE": "5",
        "TPI_EFFECTIVE_BATCH_SIZE": "2",
        "TPI_DTYPE": "bfloat16",
        "TPI_DIST_TIMEOUT_SECONDS": "7.5",
        "TPI_MODEL": "/models/x",
    }
    s = _settings(["serve"], env)
    assert (s.max_batch_size, s.effective_batch_size, s.dtype) == (5, 2, "bfloat16")
    assert s.dist_timeout_seconds == 7.5 and s.model == "/models/x" and s.port == 8000
    s = _settings(["serve", "--max-batch-size", "3", "--port", "9000"], env)
    assert s.max_batch_size == 3 and s.port == 9000  # flags beat env
    assert _settings(["serve", "--model", "m"], {}).max_batch_size == 8  # neither: the default


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["serve"], {}, "--model"),
        (["serve", "--model", "m"], {"TPI_DTYPE": "fp8"}, "TPI_DTYPE='fp8'"),
        (["serve", "--model", "m"], {"TPI_MAX_BATCH_SIZE": "many"}, "TPI_MAX_BATCH_SIZE"),
        (["serve", "--model", "m", "--max-batch-size", "2", "--effective-batch-size", "4"], {}, "<="),
        (["serve", "--model", "m"], {"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
    ],
)
def test_bad_settings_are_refused(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        _settings(argv, env)


def test_process_and_heartbeat_settings_come_from_env() -> None:
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "r0",
        "MASTER_PORT": "1234",
        "TPI_NUM_THREADS": "3",
        "TPI_SHM_COLLECTIVES": "0",
        "TPI_FAKE_OOM_AT_BATCH": "2",
        "TPI_FAKE_OOM_MID_FORWARD": "1",
        "TPI_LEASE_NAME": "pod-1",
        "POD_NAME": "pod-1",
        "POD_NAMESPACE": "ns",
        "TPI_HEARTBEAT_INTERVAL_SECONDS": "0.5",
        "TPI_DRAIN_SECONDS": "3",
    }
    s = _settings(["serve", "--model", "m"], env)
    assert s.process.dist == DistEnv(rank=1, world_size=2, local_rank=0, master_addr="r0", master_port=1234)
    assert s.rank == 1 and s.process.num_threads == 3 and not s.process.shm_collectives
    assert s.process.faults.fake_oom_at_batch == 2 and s.process.faults.fake_oom_mid_forward
    assert s.heartbeat == HeartbeatSettings("pod-1", "ns", "pod-1", interval=0.5)
    assert s.drain_seconds == 3.0
    bare = _settings(["serve", "--model", "m"], {})
    assert bare.process.dist == DistEnv() and bare.heartbeat is None and bare.drain_seconds == 10.0
    assert bare.process.dist.master_port == 29500
    # The heartbeat is off without a Lease name, and without the pod's identity.
    assert HeartbeatSettings.from_env({"TPI_LEASE_NAME": ""}) is None
    assert HeartbeatSettings.from_env({"TPI_LEASE_NAME": "x"}) is None


def _generate(model: str, world: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tpi_runtime", "generate", "--model", model, *extra],
        env=rank_env(0, world, free_port()),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_invalid_tp_exits_with_listing(ckpt_main: str) -> None:
    p = _generate(ckpt_main, 3, "--prompt-ids", "1,2,3")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "tensor-parallel size 3 is invalid" in p.stderr and "valid sizes: [1, 2, 4]" in p.stderr


def _parse(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def test_generate_cli_text_prompt_matches_transformers(ckpt_main: str) -> None:
    p = _generate(ckpt_main, 1, "--prompt", "the cat sees a dog", "--max-tokens", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    out = _parse(p.stdout)
    ids = [int(x) for x in out["token_ids"].split(",")]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{ckpt_main}/tokenizer.json")
    prompt = tok.encode("the cat sees a dog").ids
    hf = load_hf_model(ckpt_main)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(len(ids)):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert ids == seq[len(prompt) :]
    assert out["text"] == tok.decode(ids)
    assert out["finish_reason"] in ("length", "stop")


def test_generate_cli_tp2_equals_tp1(ckpt_main: str) -> None:
    argv = [
        "-m",
        "tpi_runtime",
        "generate",
        "--model",
        ckpt_main,
        "--prompt-ids",
        "1,20,30,40",
        "--max-tokens",
        "12",
        "--temperature",
        "0.7",
        "--seed",
        "3",
    ]
    tp1 = run_ranks(1, argv)
    tp2 = run_ranks(2, argv)
    assert_all_ok(tp1 + tp2)
    assert _parse(tp1[0].stdout)["token_ids"] == _parse(tp2[0].stdout)["token_ids"]
    assert "token_ids" not in tp2[1].stdout  # only rank 0 prints
