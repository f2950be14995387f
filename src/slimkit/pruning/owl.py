"""OWL (outlier-weighted layerwise sparsity, Yin et al. 2024), as plain functions.

A block's outlier ratio is the fraction of its Wanda scores |W_ij| * ||X_j|| above M times their
mean. Blocks with more outliers lose fewer weights: the ratios are mapped linearly onto
[sparsity - shift, sparsity + shift] (most outliers -> least sparsity) and moved so that the
average over all blocks, weighted by each block's number of weights, is exactly the target.
"""

from __future__ import annotations

import torch

from slimkit.pruning.wanda import wanda_scores


def outlier_ratio(weights_and_norms: list[tuple[torch.Tensor, torch.Tensor]], threshold: float) -> float:
    """Fraction of the Wanda scores of all the given linears (one block) above `threshold` x their mean."""
    scores = torch.cat([wanda_scores(w, norm).flatten() for w, norm in weights_and_norms])
    return float((scores > threshold * scores.mean()).float().mean())


def block_sparsities(ratios: list[float], sizes: list[int], sparsity: float, shift: float) -> list[float]:
    """Per-block sparsity from the blocks' outlier ratios: within `shift` of `sparsity` before the
    correction that makes the size-weighted average exactly `sparsity`; clamped to [0, 1)."""
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError(f"need one outlier ratio per block, got {len(ratios)} ratios for {len(sizes)} blocks")
    r = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    spread = r.max() - r.min()
    unit = (r - r.min()) / spread if spread > 0 else torch.zeros_like(r)
    raw = sparsity + shift - 2 * shift * unit  # most outliers -> sparsity - shift
    out = raw - (raw * n).sum() / n.sum() + sparsity
    if out.min() < 0 or out.max() >= 1:
        raise ValueError(f"shift {shift} around sparsity {sparsity} leaves [0, 1): {out.min():.3f}..{out.max():.3f}")
    return out.tolist()
