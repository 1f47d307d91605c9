"""bench/bench_gpu.py's CPU dry run (--tiny --device cpu): every section runs and its rows appear
(the GPU run itself needs a device; see bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_bench_gpu_tiny_cpu_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--device", "cpu", "--workdir", str(tmp_path), "--json", str(out)]
    p = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gpu.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # 2 shared cores
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index("section ") :]
    for row in (
        "write time s",
        "copy bandwidth GB/s",
        "load time s",
        "prefill tok/s 1x256",
        "decode tok/s b=1 eager",
        "decode tok/s b=4 static",
        "b=1 eager fraction",
        "peak RSS GiB",
        "FAKE: engine.FakeOOM(2)",
        "tpi_oom_recoveries_total delta",
        "pynvml series present",
        "skipped: no CUDA",
        "ours == transformers (3x32 greedy)",
        "decode b=1 ours static/hf",
        "prefill ours/hf",
    ):
        assert row in table, f"{row!r} missing from the table:\n{table}"
    data = json.loads(out.read_text())
    assert data["check.oom"] is True
    assert data["oom.recoveries"] >= 1
    assert data["parity.static_vs_eager"] is True
    assert data["parity.hf"] is True  # float32 on CPU: exact agreement expected
    assert data["nccl.status"] == "skipped: no CUDA"
    assert data["ours.prefill_tps"] > 0 and data["ratio.decode.eager.b1"] > 0
