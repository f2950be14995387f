"""A sparse weight as the CSR16 kernel reads it (kernels/bitmask_matmul.cpp, `csr16_matmul`): each
row's kept fp32 values in column order, each with its column as a 16-bit index.

6 bytes per kept weight and nothing per pruned one: at 90% sparsity 0.6 bytes per weight against
dense fp32's 4. Above ~60% sparsity most of the bitmask's bytes hold one kept weight or none, and
the bitmask kernel spends its time on them; this layout's loop only visits kept weights. Inputs up
to 65536 columns (the index is a uint16, held in an int16 tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.kernels import bitmask_kernel

MAX_COLUMNS = 2**16


@dataclass
class Csr16Rows:
    columns: torch.Tensor  # int16 [nnz], the uint16 column of each kept weight
    values: torch.Tensor  # float32 [nnz]
    row_start: torch.Tensor  # int64 [N + 1]
    in_features: int

    @classmethod
    def from_parts(cls, row_start: torch.Tensor, columns: torch.Tensor, values: torch.Tensor,
                   in_features: int) -> "Csr16Rows":
        """CSR pieces (row starts [N + 1], columns and values [nnz]) of a weight with <= 65536 columns."""
        if in_features > MAX_COLUMNS:
            raise ValueError(f"CSR16 holds at most {MAX_COLUMNS} columns, not {in_features}")
        columns = columns.to(torch.int32)
        wrapped = torch.where(columns >= 2**15, columns - 2**16, columns).to(torch.int16)  # same 16 bits
        return cls(wrapped.contiguous(), values.detach().float().reshape(-1).contiguous(), row_start.long(),
                   in_features)

    @classmethod
    def from_csr(cls, csr: torch.Tensor) -> "Csr16Rows":
        return cls.from_parts(csr.crow_indices(), csr.col_indices(), csr.values(), csr.shape[1])

    @classmethod
    def from_mask(cls, mask: torch.Tensor, values: torch.Tensor) -> "Csr16Rows":
        """mask: bool [N, K]; values: the kept values in row-major order."""
        row_start = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
        return cls.from_parts(row_start, torch.nonzero(mask)[:, 1], values, mask.shape[1])

    @property
    def nnz(self) -> int:
        return int(self.row_start[-1])

    def _columns(self, start: int, stop: int) -> torch.Tensor:
        """The int64 columns of the kept weights of rows [start, stop)."""
        return self.columns[self.row_start[start] : self.row_start[stop]].long() % MAX_COLUMNS

    def _rows_of(self, start: int, stop: int) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(stop - start), self.row_start[start : stop + 1].diff())

    def bool_mask(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = len(self.row_start) - 1 if stop is None else stop
        mask = torch.zeros(stop - start, self.in_features, dtype=torch.bool)
        mask[self._rows_of(start, stop), self._columns(start, stop)] = True
        return mask

    def kept_values(self) -> torch.Tensor:
        return self.values

    def dense_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a dense fp32 tensor, by the compiled kernel."""
        return bitmask_kernel().csr16_densify(self.columns, self.values, self.row_start, self.in_features, start, stop)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d @ W.T by the compiled kernel."""
        return bitmask_kernel().csr16_matmul(x2d.contiguous(), self.columns, self.values, self.row_start,
                                                  self.in_features)

    def tensors(self) -> list[torch.Tensor]:
        return [self.columns, self.values, self.row_start]
