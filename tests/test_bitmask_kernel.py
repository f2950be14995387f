"""slimkit's bitmask sparse kernel (kernels/bitmask_matmul.cpp) checked against the textbook
x @ W.T, and the sparse formats that hold its layout: storage round trips, the CSR fallback."""

import pytest
import torch

import slimkit.formats.sparse as sparse
from slimkit.formats import format_class
from slimkit.formats.bitmask import BitmaskRows
from slimkit.kernels import bitmask_kernel, kernel_status
from slimkit.pruning.magnitude import nm_mask

needs_kernel = pytest.mark.skipif(bitmask_kernel() is None, reason=f"kernel unavailable: {kernel_status()}")


def _sparse_weight(rows, cols, sparsity, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(rows, cols)
    mask = torch.rand(rows, cols) >= sparsity
    mask[3] = False  # an empty row
    mask[5, :8] = True  # a full byte
    return w * mask, mask


def _kernel_or_not(monkeypatch, kernel: bool) -> None:
    """With the kernel (skipped where it is not built), or as a machine without a compiler."""
    if kernel and bitmask_kernel() is None:
        pytest.skip(f"kernel unavailable: {kernel_status()}")
    if not kernel:
        monkeypatch.setattr(sparse, "bitmask_kernel", lambda: None)


@needs_kernel
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 8, 19])  # 19: two full chunks of 8 rows and a partial one
def test_kernel_is_x_times_w_transposed(sparsity, batch):
    w, mask = _sparse_weight(72, 136, sparsity)
    bits = BitmaskRows.from_mask(mask, w[mask])
    x = torch.randn(batch, 136)
    torch.testing.assert_close(bits.matmul(x), x @ w.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(bits.dense_rows(0, 72), w) and torch.equal(bits.bool_mask(), mask)
    assert torch.equal(bits.dense_rows(8, 40), w[8:40])


@needs_kernel
def test_kernel_refuses_mismatched_shapes():
    w, mask = _sparse_weight(16, 64, 0.5)
    bits = BitmaskRows.from_mask(mask, w[mask])
    with pytest.raises(RuntimeError, match="the mask covers 64"):
        bits.matmul(torch.randn(2, 72))
    with pytest.raises(RuntimeError, match="padding"):
        bitmask_kernel().bitmask_matmul(torch.randn(2, 64), bits.mask, bits.kept_values().clone(), bits.row_start)


@pytest.mark.parametrize("kernel", [True, False])
def test_sparse_format_runs_kernel_or_csr_and_stores_the_same(monkeypatch, kernel):
    _kernel_or_not(monkeypatch, kernel)
    w, mask = _sparse_weight(64, 128, 0.5)
    layer = format_class("sparse").from_dense(w, mask=mask)
    assert (layer.bits is not None) == kernel
    assert layer.path_for(1) == (sparse.BITMASK_PATH if kernel else "torch CSR (MKL, int32 indices)")
    x = torch.randn(4, 128)
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-5, atol=1e-5)
    for layout in ("bitmask", "csr"):
        layer.layout = layout
        again = format_class("sparse").from_stored(layer.stored(), {"shape": [64, 128], "layout": layout}, None)
        assert torch.equal(again.dequantize(), w)
    if kernel:  # 50%: about 1/8 + 2 bytes a weight (CSR: 4 + 4 per kept weight)
        assert layer.ram_bytes() < w.numel() * 4 * 0.6


def test_high_sparsity_stays_csr():
    w, mask = _sparse_weight(64, 128, 0.95)
    assert format_class("sparse").from_dense(w, mask=mask).bits is None


@pytest.mark.parametrize("kernel", [True, False])
def test_two_four_runs_the_kernel_and_stores_its_positions(monkeypatch, kernel):
    _kernel_or_not(monkeypatch, kernel)
    torch.manual_seed(1)
    w = torch.randn(48, 64)
    mask = nm_mask(w, 2, 4)
    w[0, torch.nonzero(mask[0])[0]] = 0.0  # a kept weight that is exactly zero keeps its position
    layer = format_class("2:4").from_dense(w, mask=mask)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ (w * mask).T, rtol=1e-5, atol=1e-5)
    again = format_class("2:4").from_stored(layer.stored(), dict(layer.meta), None)
    assert torch.equal(again.dequantize(), w * mask)
    assert torch.equal(again.stored()["index_bits"], layer.stored()["index_bits"])
    assert ("bitmask kernel" in layer.path_for(1)) == kernel
