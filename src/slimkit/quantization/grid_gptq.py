"""GPTQ whose quantizer is a fixed per-block grid (a GGML type's, fitted before the solve).

The grid (scales, offsets, integer sub-scales) is fitted once on the original weights, so every
column is rounded onto the very grid that will be written: the codes llama.cpp reads are the
ones the solver decided. Column order: natural, or by decreasing diag(H) (act order) -- with a
fixed grid the order changes nothing at inference. The loop is the GPTQ paper's, with lazy
block updates: each column's rounding error (w - q) / U[i, i] is spread over the later columns
through U, the upper Cholesky factor of H^-1 (calibration/obs.inverse_hessian_factor, which also
handles damping and singular Hessians).
"""

from __future__ import annotations

import torch

from slimkit.calibration.obs import inverse_hessian_factor
from slimkit.numerics.ggml_grids import BlockGrid, column_values, round_codes


@torch.no_grad()
def gptq_on_grid(weight: torch.Tensor, hessian: torch.Tensor, grid: BlockGrid, percdamp: float = 0.01,
                 blocksize: int = 128, act_order: bool = True, name: str = "weight") -> tuple[torch.Tensor, float]:
    """(codes int16 [rows, cols] on `grid`, the damping used)."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    cols = W.shape[1]
    order = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, order], H[order][:, order]
    U, damp = inverse_hessian_factor(H, percdamp, name=name)
    block_of = (order // grid.qtype.block).tolist()
    scale_cols = grid.scale.T.contiguous()  # [blocks, rows]: one contiguous row per column's block
    offset_cols = grid.offset.T.contiguous() if grid.offset is not None else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, err = W[:, i1:i2], torch.empty(W.shape[0], i2 - i1, device=W.device)
        for i in range(i2 - i1):
            b = block_of[i1 + i]
            w = W1[:, i].clone()
            q = column_values(w, scale_cols[b], offset_cols[b] if offset_cols is not None else None, grid.qtype)
            W1[:, i] = q
            e = (w - q) / U[i1 + i, i1 + i]
            W1[:, i + 1 :] -= e.unsqueeze(1) * U[i1 + i, i1 + i + 1 : i2].unsqueeze(0)
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    values = torch.empty_like(W)
    values[:, order] = W
    return round_codes(values, grid), damp
