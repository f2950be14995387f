"""Sparse formats: unstructured (bitmask or CSR) and 2:4 (alone, or with int8/int4 values).

Unstructured: on disk, whichever of bitmask + values and CSR (int32 indices) is smaller for the
density. In RAM, when slimkit's kernels are built (kernels/): up to BITMASK_MAX_SPARSITY the
bitmask layout its AVX2 kernel reads (formats/bitmask.py), above it CSR with 16-bit columns
(formats/csr16.py), each with dequantize + GEMM for many rows as measured (kernel_rows.py);
without the kernels, torch CSR with int32 indices (MKL converts int64 on every call), computed as
W_csr @ x^T. `slimkit bench sparsity` measures where each wins.

2:4: the kept values [N, K/2] plus a 2-bit position per kept value (1 bit per weight).
torch has no CPU kernel for 2:4: fp32 values run slimkit's bitmask kernel (a 2:4 mask is a
bitmask); int8 (per channel) / int4 (groups) codes rebuild the dense weight for each matmul,
the honest fallback, labelled.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from slimkit.formats.base import (
    PackedLinear,
    pack_2bit,
    pack_nibbles,
    register_format,
    unpack_2bit,
    unpack_nibbles,
)
from slimkit.formats.bitmask import BitmaskRows, csr_mask
from slimkit.formats.csr16 import MAX_COLUMNS as CSR16_MAX_COLUMNS
from slimkit.formats.csr16 import Csr16Rows
from slimkit.kernels import bitmask_kernel

# Up to this sparsity the bitmask kernel runs (1 bit per weight + fp32 kept values, AVX2); above
# it, the CSR16 kernel (16-bit columns), whose loop visits the kept weights alone (measured:
# `slimkit bench sparsity`; at 2 threads the two cross near 60% at batch 1).
BITMASK_MAX_SPARSITY = 0.6
BITMASK_PATH = "slimkit bitmask kernel (AVX2, fp32 values)"
CSR16_PATH = "slimkit CSR16 kernel (AVX2, fp32 values, 16-bit columns)"
MKL_PATH = "torch CSR (MKL, int32 indices)"


def kernel_layout_for(csr: torch.Tensor) -> BitmaskRows | Csr16Rows | None:
    """The layout slimkit's kernels read for this weight: the bitmask up to BITMASK_MAX_SPARSITY,
    CSR16 above; None (torch's CSR) without the kernel, or for shapes the kernels do not take."""
    rows, cols = csr.shape
    if bitmask_kernel() is None:
        return None
    sparsity = 1 - csr._nnz() / max(rows * cols, 1)
    if cols % 8 == 0 and sparsity <= BITMASK_MAX_SPARSITY:
        return BitmaskRows.from_csr(csr)
    if cols <= CSR16_MAX_COLUMNS:
        return Csr16Rows.from_csr(csr)
    return None


def _csr(crow, col, values, shape) -> torch.Tensor:
    """A CSR tensor with its invariants checked (indices from disk must not crash MKL)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=True)


def bitmask_bytes(rows: int, cols: int, nnz: int, value_bytes: int = 4) -> int:
    return -(-rows * cols // 8) + nnz * value_bytes


def csr_bytes(rows: int, nnz: int, value_bytes: int = 4) -> int:
    return nnz * (value_bytes + 4) + (rows + 1) * 4


@register_format
class SparseUnstructured(PackedLinear):
    format = "sparse"

    def __init__(self, csr: torch.Tensor, bias=None, meta=None):
        super().__init__(csr.shape[1], csr.shape[0], bias, meta or {})
        self.layout = self.meta.get("layout") or self.smaller_layout(csr.shape[0], csr.shape[1], csr._nnz())
        self.meta["layout"] = self.layout
        self.csr, self.kernel_layout = csr, kernel_layout_for(csr)  # RAM holds the kernel's layout only
        if self.kernel_layout is not None:
            self.csr = None

    @staticmethod
    def smaller_layout(rows, cols, nnz) -> str:
        return "bitmask" if bitmask_bytes(rows, cols, nnz) <= csr_bytes(rows, nnz) else "csr"

    @classmethod
    def from_dense(cls, weight, bias=None, mask=None, **_):
        w = weight.detach().float()
        if mask is not None:
            w = w * mask
        with warnings.catch_warnings():  # "CSR support is in beta": it is what MKL runs
            warnings.simplefilter("ignore")
            csr = w.to_sparse_csr()
            csr = _csr(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), w.shape)
        return cls(csr, bias)

    def _mask(self) -> torch.Tensor:
        return self.kernel_layout.bool_mask() if self.kernel_layout is not None else csr_mask(self.csr)

    def _values(self) -> torch.Tensor:
        return self.kernel_layout.kept_values() if self.kernel_layout is not None else self.csr.values()

    def stored(self):
        if self.layout == "csr":
            mask = self._mask()
            crow = torch.cat([torch.zeros(1, dtype=torch.int32), mask.sum(1).cumsum(0).int()])
            return {"crow": crow, "col": torch.nonzero(mask)[:, 1].int(), "values": self._values()}
        return {"mask_bits": torch.from_numpy(np.packbits(self._mask().numpy().ravel())), "values": self._values()}

    @classmethod
    def from_stored(cls, t, meta, bias):
        shape = tuple(meta["shape"])
        if meta.get("layout") == "csr":
            csr = _csr(t["crow"].int(), t["col"].int(), t["values"].float(), shape)
        else:
            bits = np.unpackbits(t["mask_bits"].numpy())[: shape[0] * shape[1]]
            mask = torch.from_numpy(bits.astype(bool)).reshape(shape)
            if int(mask.sum()) != t["values"].numel():
                from slimkit.errors import SlimkitError

                raise SlimkitError("sparse layer: the bitmask and the number of stored values disagree (corrupt file?)")
            crow = torch.cat([torch.zeros(1, dtype=torch.int32), mask.sum(1).cumsum(0).int()])
            col = torch.nonzero(mask)[:, 1].int()
            csr = _csr(crow, col, t["values"].float(), shape)
        return cls(csr, bias, meta)

    def ram_tensors(self):
        if self.kernel_layout is not None:
            return self.kernel_layout.tensors()
        return [self.csr.crow_indices(), self.csr.col_indices(), self.csr.values()]

    def dequantize(self):
        return self.dequantize_rows(0, self.out_features)

    def dequantize_rows(self, start, stop):
        if self.kernel_layout is not None:
            return self.kernel_layout.dense_rows(start, stop)
        return self.csr.to_dense()[start:stop]

    def has_row_choice(self):
        return self.kernel_layout is not None

    def shape_tag(self):  # the kernel is part of the key: the crossover was measured with it
        kernel = "" if isinstance(self.kernel_layout, BitmaskRows) else " csr16"
        return f" {round(10 * (1 - self.kernel_layout.nnz / (self.out_features * self.in_features))) * 10}% sparse{kernel}"

    def path_for(self, m):
        if self.kernel_layout is None:
            return MKL_PATH
        if m > self.kernel_rows():
            return self.dequantized_path()
        return BITMASK_PATH if isinstance(self.kernel_layout, BitmaskRows) else CSR16_PATH

    def kernel_matmul(self, x2d):
        return self.kernel_layout.matmul(x2d)

    def matmul(self, x2d):
        if self.kernel_layout is not None:
            return self.chosen_matmul(x2d)
        return (self.csr @ x2d.T).T


@register_format
class Sparse24(PackedLinear):
    """2:4 semi-structured: values [N, K/2] (fp32, int8 or int4 codes) + 2-bit positions."""

    format = "2:4"

    def __init__(self, values, index_bits, scale=None, bias=None, meta=None):
        super().__init__(index_bits.shape[1] * 8, index_bits.shape[0], bias, meta or {})  # 4 positions a byte, 2 per 4 weights
        self.value_kind = self.meta.setdefault("values", "fp32")
        self.register_buffer("values", values.contiguous())
        self.register_buffer("index_bits", index_bits.contiguous())
        self.register_buffer("scale", scale.contiguous() if scale is not None else None)
        self.bits = None
        if self.value_kind == "fp32" and self.in_features % 8 == 0 and bitmask_kernel() is not None:
            # RAM holds the bitmask kernel's layout only (2 kept fp32 values + 4 mask bits per 4 weights)
            self.bits = BitmaskRows.from_mask(self._positions_mask(), self.values.float())
            self.values = self.index_bits = None

    @classmethod
    def from_dense(cls, weight, bias=None, mask=None, quant=None, **_):
        """mask: bool [N, K] with exactly 2 kept in every 4; quant: QuantParams to store codes."""
        w = weight.detach().float()
        rows, cols = w.shape
        if mask is None:
            from slimkit.numerics.magnitude import nm_mask

            mask = nm_mask(w, 2, 4)
        groups = mask.reshape(rows, cols // 4, 4)
        if not bool((groups.sum(-1) == 2).all()):
            from slimkit.errors import ShapeError

            raise ShapeError("2:4 format: the mask does not keep exactly 2 of every 4 weights")
        positions = torch.nonzero(groups.reshape(-1, 4))[:, 1].reshape(rows, cols // 2)  # sorted per group
        index_bits = pack_2bit(positions)
        kept = lambda t: t.reshape(rows, cols // 4, 4)[groups].reshape(rows, cols // 2)  # noqa: E731
        if quant is None:
            return cls(kept(w), index_bits, None, bias, {"values": "fp32"})
        spec = quant.spec
        if spec.bits == 8 and spec.symmetric and quant.scale.shape[1] == 1:
            return cls(kept(quant.q), index_bits, quant.scale.float(), bias, {"values": "int8"})
        if spec.bits <= 4 and spec.symmetric:
            codes = kept(quant.q).to(torch.int16) + 8
            return cls(pack_nibbles(codes), index_bits, quant.scale, bias, {"values": "int4", "bits": spec.bits})
        raise NotImplementedError("2:4 with these quantized values (asymmetric, or 5-7 bits) is not a packed format")

    def _positions_mask(self) -> torch.Tensor:
        rows, cols = self.out_features, self.in_features
        positions = unpack_2bit(self.index_bits).long().reshape(rows, cols // 4, 2)
        return torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, positions, True).reshape(rows, cols)

    def stored(self):
        if self.bits is not None:
            rows, cols = self.out_features, self.in_features
            positions = torch.nonzero(self.bits.bool_mask().reshape(-1, 4))[:, 1].reshape(rows, cols // 2)
            return {"values": self.bits.kept_values().reshape(rows, cols // 2), "index_bits": pack_2bit(positions)}
        t = {"values": self.values, "index_bits": self.index_bits}
        if self.scale is not None:
            t["scale"] = self.scale
        return t

    @classmethod
    def from_stored(cls, t, meta, bias):
        return cls(t["values"], t["index_bits"], t.get("scale"), bias, meta)

    def kept_values(self) -> torch.Tensor:
        if self.value_kind == "fp32":
            return self.values.float()
        if self.value_kind == "int8":
            return self.values.float() * self.scale.float()
        codes = unpack_nibbles(self.values).float() - 8  # [N, K/2]
        group = self.in_features // self.scale.shape[1]  # scale groups run along K: g/2 kept values each
        return codes * self.scale.float().repeat_interleave(group // 2, dim=1)

    def dense_nibbles(self) -> torch.Tensor:
        """int4 values only: the codes + 8 as a dense [N, K] grid of 0..15, a pruned weight's code 0
        (so 8): what a dense int4 layer with the same scales would store."""
        if self.value_kind != "int4":
            raise ValueError(f"2:4 layer with {self.value_kind} values has no int4 codes")
        rows, cols = self.out_features, self.in_features
        positions = unpack_2bit(self.index_bits).long().reshape(rows, cols // 4, 2)
        dense = torch.full((rows, cols // 4, 4), 8, dtype=torch.uint8)
        dense.scatter_(2, positions, unpack_nibbles(self.values).to(torch.uint8).reshape(rows, cols // 4, 2))
        return dense.reshape(rows, cols)

    def ram_tensors(self):
        return self.bits.tensors() if self.bits is not None else list(self.stored().values())

    def has_row_choice(self):
        return self.bits is not None

    def shape_tag(self):
        return " 2:4"

    def kernel_matmul(self, x2d):
        return self.bits.matmul(x2d)

    def matmul(self, x2d):
        if self.bits is not None:
            return self.chosen_matmul(x2d)
        return x2d @ self.dequantize().T

    def dequantize_rows(self, start, stop):
        if self.bits is not None:
            return self.bits.dense_rows(start, stop)
        return super().dequantize_rows(start, stop)

    def dequantize(self):
        if self.bits is not None:
            return self.bits.dense_rows(0, self.out_features)
        rows, cols = self.out_features, self.in_features
        positions = unpack_2bit(self.index_bits).long().reshape(rows, cols // 4, 2)
        dense = torch.zeros(rows, cols // 4, 4)
        dense.scatter_(2, positions, self.kept_values().reshape(rows, cols // 4, 2))
        return dense.reshape(rows, cols)

    def path_for(self, m):
        if self.bits is not None:
            return BITMASK_PATH if m <= self.kernel_rows() else self.dequantized_path()
        return "dense fallback: rebuilt per call (torch has no CPU 2:4 kernel for these values)"
