"""A sparse weight as the bitmask kernel reads it (kernels/bitmask_matmul.cpp): one bit per weight
(bit i of byte j = column 8j + i) and each row's kept fp32 values in column order.

About 1/8 byte + 4 bytes per kept weight: at 50% sparsity 2.1 bytes per weight against dense
fp32's 4, so a call bound by reading weights (batch 1-8) reads half as much. The sparse formats
hold this layout in RAM only when the kernel is built (its methods call the kernel), CSR otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimkit.kernels import bitmask_kernel

PAD = 8  # the kernel's last load of a row may read 8 floats past the row's end


@dataclass
class BitmaskRows:
    mask: torch.Tensor  # uint8 [N, K/8]
    values: torch.Tensor  # float32 [nnz + PAD]
    row_start: torch.Tensor  # int64 [N + 1]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, values: torch.Tensor) -> "BitmaskRows":
        """mask: bool [N, K] (K % 8 == 0); values: the kept values in row-major order."""
        bits = torch.from_numpy(np.packbits(mask.numpy(), axis=1, bitorder="little"))
        padded = torch.cat([values.detach().float().reshape(-1), torch.zeros(PAD)])
        row_start = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
        return cls(bits.contiguous(), padded.contiguous(), row_start)

    @classmethod
    def from_csr(cls, csr: torch.Tensor) -> "BitmaskRows":
        return cls.from_mask(csr_mask(csr), csr.values())

    @property
    def nnz(self) -> int:
        return int(self.row_start[-1])

    def bool_mask(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        bits = np.unpackbits(self.mask[start:stop].numpy(), axis=1, bitorder="little")
        return torch.from_numpy(bits.astype(bool))

    def kept_values(self) -> torch.Tensor:
        return self.values[: self.nnz]

    def dense_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a dense fp32 tensor, by the compiled kernel."""
        return bitmask_kernel().bitmask_densify(self.mask, self.values, self.row_start, start, stop)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d @ W.T by the compiled kernel."""
        return bitmask_kernel().bitmask_matmul(x2d.contiguous(), self.mask, self.values, self.row_start)

    def tensors(self) -> list[torch.Tensor]:
        return [self.mask, self.values, self.row_start]


def csr_mask(csr: torch.Tensor) -> torch.Tensor:
    """The bool [N, K] mask of a CSR tensor's stored entries."""
    rows, cols = csr.shape
    row_of = torch.repeat_interleave(torch.arange(rows), csr.crow_indices().diff().long())
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[row_of, csr.col_indices().long()] = True
    return mask
