"""Magnitude pruning as pure functions over weight tensors. Masks are bool, True = keep.

The "input" dimension is the last one (columns of an nn.Linear weight [out, in]); N:M groups run
along it, which is what sparse kernels (2:4 semi-structured) require.
"""

from __future__ import annotations

import torch

from slimkit.errors import ShapeError


def parse_nm(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ShapeError(f"N:M pattern must look like '2:4', got '{pattern}'") from None
    if not 0 < n < m:
        raise ShapeError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    return n, m


def check_nm_shape(shape: tuple[int, ...], m: int, name: str = "weight") -> None:
    if shape[-1] % m:
        raise ShapeError(
            f"{name}: input dimension {shape[-1]} is not divisible by M={m}; N:M groups of {m} "
            "columns cannot tile it. Exclude this layer (ignore:) or choose another M."
        )


def _keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask keeping exactly `keep` highest scores (ties broken by position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if keep > 0:
        idx = torch.topk(scores.flatten(), keep, sorted=False).indices
        mask[idx] = True
    return mask.view_as(scores)


def unstructured_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the `round(sparsity * numel)` smallest-|w| entries of one tensor."""
    if not 0.0 <= sparsity < 1.0:
        raise ShapeError(f"sparsity must be in [0, 1), got {sparsity}")
    keep = weight.numel() - round(sparsity * weight.numel())
    return _keep_largest(weight.detach().abs().float(), keep)


def global_threshold(weights: list[torch.Tensor], sparsity: float) -> float:
    """The |w| below which `sparsity` of all the given weights fall (one threshold for all)."""
    if not 0.0 <= sparsity < 1.0:
        raise ShapeError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = torch.cat([w.detach().abs().float().flatten() for w in weights])
    k = round(sparsity * flat.numel())
    if k == 0:
        return -1.0
    return float(torch.kthvalue(flat, k).values)


def threshold_mask(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    return weight.detach().abs().float() > threshold


def nm_mask_from_scores(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive inputs (exactly N per group)."""
    check_nm_shape(tuple(scores.shape), m)
    groups = scores.float().reshape(-1, m)
    idx = torch.topk(groups, n, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True)
    return mask.view(scores.shape)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return nm_mask_from_scores(weight.detach().abs(), n, m)


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()
