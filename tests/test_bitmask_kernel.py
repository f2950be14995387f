"""slimkit's sparse kernels (kernels/bitmask_matmul.cpp: bitmask and CSR16) checked against the
textbook x @ W.T, and the sparse formats that hold their layouts: storage round trips, the choice
by sparsity, the CSR fallback."""

import pytest
import torch

import slimkit.formats.sparse as sparse
from slimkit.formats import format_class
from slimkit.formats.bitmask import BitmaskRows
from slimkit.formats.csr16 import Csr16Rows
from slimkit.kernels import bitmask_kernel, kernel_status
from slimkit.numerics.magnitude import nm_mask

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


@needs_kernel
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("batch", [1, 2, 8, 19])  # 1: one weight at a time; 2-8: x transposed; 19: 8 + 8 + 3
def test_csr16_kernel_is_x_times_w_transposed(sparsity, batch):
    w, mask = _sparse_weight(40, 137, sparsity)  # 137 columns: rows end mid-unroll, K not a multiple of 8
    rows = Csr16Rows.from_mask(mask, w[mask])
    x = torch.randn(batch, 137)
    torch.testing.assert_close(rows.matmul(x), x @ w.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.dense_rows(0, 40), w) and torch.equal(rows.bool_mask(), mask)
    assert torch.equal(rows.dense_rows(8, 30), w[8:30]) and torch.equal(rows.bool_mask(8, 30), mask[8:30])


@needs_kernel
def test_csr16_reaches_columns_past_32767():
    """The 16-bit column is unsigned: columns 32768-65535 (negative as int16) are read right."""
    mask = torch.zeros(3, 40000, dtype=torch.bool)
    mask[0, [0, 32767, 32768, 39999]] = True
    mask[2, 35000:35011] = True
    w = torch.randn(3, 40000) * mask
    rows = Csr16Rows.from_mask(mask, w[mask])
    x = torch.randn(2, 40000)
    torch.testing.assert_close(rows.matmul(x), x @ w.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.matmul(x[:1]), x[:1] @ w.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.dense_rows(0, 3), w)


@needs_kernel
def test_csr16_kernel_refuses_mismatched_shapes():
    w, mask = _sparse_weight(16, 64, 0.9)
    rows = Csr16Rows.from_mask(mask, w[mask])
    with pytest.raises(RuntimeError, match="the weight has 64"):
        rows.matmul(torch.randn(2, 72))
    with pytest.raises(RuntimeError, match="one per kept weight"):
        bitmask_kernel().csr16_matmul(torch.randn(2, 64), rows.columns[1:], rows.values, rows.row_start, 64)
    with pytest.raises(ValueError, match="65536 columns"):
        Csr16Rows.from_mask(torch.ones(1, 2**16 + 8, dtype=torch.bool), torch.ones(2**16 + 8))


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("sparsity, layout, path", [(0.5, BitmaskRows, sparse.BITMASK_PATH),
                                                    (0.9, Csr16Rows, sparse.CSR16_PATH)])
def test_sparse_format_runs_its_kernel_or_mkl_and_stores_the_same(monkeypatch, kernel, sparsity, layout, path):
    """Up to 60% sparsity the bitmask kernel, above it CSR16; MKL's CSR without the kernels."""
    _kernel_or_not(monkeypatch, kernel)
    w, mask = _sparse_weight(64, 128, sparsity)
    layer = format_class("sparse").from_dense(w, mask=mask)
    assert isinstance(layer.kernel_layout, layout) if kernel else layer.kernel_layout is None
    assert layer.path_for(1) == (path if kernel else sparse.MKL_PATH)
    x = torch.randn(4, 128)
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-5, atol=1e-5)
    for stored in ("bitmask", "csr"):
        layer.layout = stored
        again = format_class("sparse").from_stored(layer.stored(), {"shape": [64, 128], "layout": stored}, None)
        assert torch.equal(again.dequantize(), w)
    if kernel:  # bitmask: 1/8 byte a weight + 4 per kept one + 8 floats of padding; CSR16: 6 per kept one
        per_kept, fixed = (4, 64 * 128 // 8 + 32) if layout is BitmaskRows else (6, 0)  # + int64 row starts
        assert layer.ram_bytes() == per_kept * int(mask.sum()) + fixed + 8 * 65


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
