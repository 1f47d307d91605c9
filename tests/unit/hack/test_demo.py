"""The demo's TPInferenceCluster, checked without the shared node: it is a valid object, and the
operator, reading the staged directory's GGUF header, accepts tensor-parallel size 3 for it. (The
runtime half, 3 ranks serving that directory and answering the demo's question, is
tests/unit/runtime/test_gguf.py::test_smollm2_generate_tp3_answers_the_question.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import demo
from tpi_operator import checkpoint
from tpi_operator.api.v1alpha1 import TPInferenceCluster
from tpi_operator.core import sizing
from tpikit.models import smollm2_gguf


def test_demo_cluster_is_served_at_tp3_by_the_operators_rules(tmp_path: Path) -> None:
    staged = tmp_path / "demo-smollm2"
    staged.mkdir()
    shutil.copy(smollm2_gguf(), staged)
    obj = TPInferenceCluster.model_validate(demo.demo_cluster(str(staged)))
    assert obj.spec.tensor_parallel_size == 3
    assert obj.spec.model.served_model_name == demo.MODEL
    info = checkpoint.read_model_info(staged, obj.spec.runtime.dtype)
    assert (info.num_attention_heads, info.num_key_value_heads, info.intermediate_size) == (9, 3, 1536)
    assert info.weight_bytes is not None and 500e6 < info.weight_bytes < 600e6  # 134.5M float32 params
    assert sizing.desired_tp(obj.spec, info) == 3
    assert sizing.valid_tp_sizes(info) == [1, 3]
