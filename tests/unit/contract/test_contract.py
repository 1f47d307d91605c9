"""tpi_contract: the facts both sides import, and the guard that they have no twins left."""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import pytest
from tpi_contract import defaults, env, exitcodes, keys, tp_rule
from tpi_contract.safetensors_header import HeaderError, read_header

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ((32, 8, 14336), [1, 2, 4, 8, 16, 32]),  # 16, 32 > 8 KV heads: replicated
        ((12, 12, 3072), [1, 2, 3, 4, 6, 12]),
        ((6, 2, 100), [1, 2]),  # 3: 3 % 2 KV heads; 6: 100 % 6
        ((8, None, None), [1, 2, 4, 8]),  # KV heads default to heads; unknown sizes constrain nothing
        ((None, None, None), [1, 2, 4, 8, 16, 32, 64, 128, 256]),  # unknown: powers of two
    ],
)
def test_tp_rule(counts: tuple[int | None, int | None, int | None], expected: list[int]) -> None:
    assert tp_rule.valid_tp_sizes(*counts) == expected


def test_tp_rule_says_why() -> None:
    assert tp_rule.tp_problems(4, 4, 64, 3) == ["num_attention_heads=4 is not divisible by 3",
                                                "num_key_value_heads=4 is not divisible by 3",
                                                "intermediate_size=64 is not divisible by 3"]  # fmt: skip
    assert tp_rule.tp_problems(8, 2, 24, 4) == []
    assert "KV head replication" in tp_rule.tp_problems(6, 2, 24, 3)[-1]
    assert tp_rule.tp_problems(8, 2, 8, 0) == ["tensor-parallel size must be >= 1"]


def _write(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_safetensors_header(tmp_path: Path) -> None:
    h = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"format": "pt"}}
    got = read_header(_write(tmp_path / "ok.safetensors", h, b"\0" * 8))
    assert got.tensors == {"w": h["w"]} and got.metadata == {"format": "pt"} and got.data_bytes == 8
    with pytest.raises(HeaderError, match="does not fit"):
        read_header(_write(tmp_path / "long.safetensors", h, length=10**6))
    with pytest.raises(HeaderError, match="not a JSON object"):
        read_header(_write(tmp_path / "list.safetensors", [1]))
    (tmp_path / "short.safetensors").write_bytes(b"\1\2")
    with pytest.raises(HeaderError, match="only 2 bytes"):
        read_header(tmp_path / "short.safetensors")
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "missing.safetensors")


def test_exit_codes_keys_env_defaults() -> None:
    assert (exitcodes.BAD_CONFIG, exitcodes.COLLECTIVE_FAILED, exitcodes.OUT_OF_MEMORY) == (2, 3, 4)
    assert exitcodes.is_out_of_memory(4) and not exitcodes.is_out_of_memory(None)
    assert "GPU memory" in exitcodes.describe(4) and exitcodes.describe(99) == "exit code 99"
    assert keys.LEASE_LIVE_BATCH_SIZE != keys.ASSIGNED_BATCH_FLAG  # assigned and live have distinct names
    assert all(k.startswith("tpi.dev/") for k in (keys.CLUSTER, keys.OBJECT_HASH, keys.LEASE_LIVE_BATCH_SIZE))
    assert env.for_flag("--max-batch-size") == env.for_flag("max_batch_size") == "TPI_MAX_BATCH_SIZE"
    assert defaults.heartbeat_stall_seconds() == 3 * defaults.HEARTBEAT_INTERVAL_SECONDS


def _reads_environ(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
            return True
    return False


def test_only_settings_reads_the_runtime_environment() -> None:
    readers = sorted(p.name for p in (REPO / "runtime" / "tpi_runtime").glob("*.py") if _reads_environ(p))
    # __main__ hands os.environ to RuntimeSettings.from_args; settings.py is the one reader.
    assert readers == ["__main__.py"], readers
