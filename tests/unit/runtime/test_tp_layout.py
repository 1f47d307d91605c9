"""The CPU weight layouts of tensor-parallel linears: W^T cut into one block per thread, by output
columns or (row-parallel layers) by input rows.

The loader writes checkpoint rows through `weight_rows`, the model multiplies with `linear`; both
must agree with a plain [out, in] weight whatever the block count (thread count at build time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from tpi_runtime.tp import (
    ColumnParallelLinear,
    linear,
    linear_weight,
    logical_rows,
    onednn_packing_available,
    pack_for_batches,
    splits_inputs,
    weight_bytes,
    weight_rows,
)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("threads", "out_features", "expected_shape"),
    [
        (1, 12, (1, 5, 12)),
        (2, 12, (2, 5, 6)),
        (3, 12, (3, 5, 4)),
        (2, 13, (1, 5, 13)),  # not divisible: one block rather than ragged ones
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_blocked_layout_matches_plain_linear(
    threads: int, out_features: int, expected_shape: tuple[int, ...], batch: int
) -> None:
    torch.manual_seed(0)
    reference = torch.randn(out_features, 5)
    with torch_threads(threads):
        w = linear_weight(out_features, 5, dtype=torch.float32, device=torch.device("cpu"))
    assert tuple(w.shape) == expected_shape
    # Fill it the way the loader does: uneven row chunks that straddle block boundaries.
    for start, stop in [(0, 5), (5, 7), (7, out_features)]:
        for a, b, view in weight_rows(w, start, stop):
            assert start <= a <= b <= stop
            view.copy_(reference[a:b])
    rebuilt = torch.cat([v for _, _, v in weight_rows(w, 0, out_features)])
    assert torch.equal(rebuilt, reference)
    x = torch.randn(batch, 5)
    torch.testing.assert_close(linear(x, w), F.linear(x, reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("threads", "in_features", "expected_shape", "split"),
    [
        (1, 12, (1, 12, 7), False),  # one thread: both cuts are the same [1, in, out]
        (2, 12, (2, 6, 7), True),
        (3, 12, (3, 4, 7), True),
        (2, 13, (1, 13, 7), False),  # not divisible by the threads; 7 outputs are not either
    ],
)
@pytest.mark.parametrize("batch", [1, 4])
def test_split_inputs_layout_matches_plain_linear(
    threads: int, in_features: int, expected_shape: tuple[int, ...], split: bool, batch: int
) -> None:
    torch.manual_seed(0)
    reference = torch.randn(7, in_features)
    with torch_threads(threads):
        w = linear_weight(7, in_features, dtype=torch.float32, device=torch.device("cpu"), split_inputs=True)
    assert (tuple(w.shape), splits_inputs(w), logical_rows(w)) == (expected_shape, split, 7)
    for start, stop in [(0, 3), (3, 4), (4, 7)]:  # the loader's row chunks
        for a, b, view in weight_rows(w, start, stop):
            assert tuple(view.shape) == (b - a, in_features)
            view.copy_(reference[a:b])
    assert torch.equal(torch.cat([v for _, _, v in weight_rows(w, 0, 7)]), reference)
    x = torch.randn(batch, in_features)
    torch.testing.assert_close(linear(x, w), F.linear(x, reference), rtol=1e-5, atol=1e-5)
    # A non-contiguous input, as the MLP's gate half of the fused gate/up output is.
    wide = torch.randn(batch, 2 * in_features)
    torch.testing.assert_close(
        linear(wide[:, :in_features], w), F.linear(wide[:, :in_features], reference), rtol=1e-5, atol=1e-5
    )


def test_gpu_layout_is_the_usual_out_in() -> None:
    w = linear_weight(12, 5, dtype=torch.float32, device=torch.device("meta"))
    assert tuple(w.shape) == (12, 5)
    assert [(a, b, tuple(v.shape)) for a, b, v in weight_rows(w, 3, 9)] == [(3, 9, (6, 5))]


def test_empty_row_range_yields_nothing_to_write() -> None:
    with torch_threads(2):
        w = linear_weight(12, 5, dtype=torch.float32, device=torch.device("cpu"))
    assert sum(v.numel() for _, _, v in weight_rows(w, 12, 12)) == 0
    assert sum(v.numel() for _, _, v in weight_rows(w, 6, 6)) == 0


def test_packed_weights_match_plain_linear_at_every_batch_size() -> None:
    """`pack_for_batches` (oneDNN's packed format, what a batching CPU server multiplies with)
    keeps each product, for every layout it replaces; half precision and a tied head stay as
    they are."""
    assert onednn_packing_available(), "this x86 torch build ships oneDNN: packing must work here"
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    with torch_threads(2):
        model = torch.nn.ModuleList(
            [
                ColumnParallelLinear(12, 8, dtype=torch.float32, device=cpu),  # blocks of outputs
                ColumnParallelLinear(12, 7, dtype=torch.float32, device=cpu),  # one block
                ColumnParallelLinear(12, 8, dtype=torch.bfloat16, device=cpu),
            ]
        )
        split = linear_weight(8, 12, dtype=torch.float32, device=cpu, split_inputs=True)
    assert splits_inputs(split)
    model[1].weight = split  # the row-parallel layout, as RowParallelLinear holds it
    references = []
    for layer in model:
        out = logical_rows(layer.weight)
        reference = torch.randn(out, 12).to(layer.weight.dtype)
        for a, b, view in weight_rows(layer.weight, 0, out):
            view.copy_(reference[a:b])
        references.append(reference)
    unpacked = weight_bytes(model)
    assert unpacked == 2 * 8 * 12 * 4 + 8 * 12 * 2
    assert pack_for_batches(model, 64) == 2 * 8 * 12 * 4
    assert [layer.weight.is_mkldnn for layer in model] == [True, True, False]
    assert weight_bytes(model) == unpacked  # packed weights are no parameters, and still count
    for layer, reference in zip(model[:2], references[:2], strict=True):
        for rows in (1, 3, 64):
            x = torch.randn(rows, 24)[:, :12]  # not contiguous, as the MLP's gate half is
            torch.testing.assert_close(linear(x, layer.weight), F.linear(x, reference), rtol=1e-5, atol=1e-5)
