"""Wanda: prune by |W_ij| * ||X_j||_2, compared within each output row; no weight update."""

from __future__ import annotations

import torch

from slimkit.numerics.magnitude import nm_mask_from_scores


def wanda_scores(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float() * col_norm.float().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, col_norm: torch.Tensor, sparsity: float | None = None, n: int | None = None, m: int | None = None
) -> torch.Tensor:
    """Bool keep-mask: per row, drop the lowest-scoring `sparsity` fraction, or keep N of every M."""
    scores = wanda_scores(weight, col_norm)
    if m is not None:
        return nm_mask_from_scores(scores, n, m)
    k = int(weight.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
    return mask
