"""Mask refinement by swaps: training-free, in the spirit of DSnoT, on the exact reconstruction error.

A row pruned by `keep` loses delta = w * (1 - keep); with H = 2 X^T X / N (the calibration
Hessian) its output error is proportional to delta^T H delta. Reviving a pruned weight j and
pruning a kept weight k of the same row (of the same N:M group) changes that error by

    revive j:  -2 w_j g_j + w_j^2 H_jj                      g  = H delta
    prune k:   +2 w_k g'_k + w_k^2 H_kk                     g' = g - w_j H[:, j]

Each cycle, every row takes its best revive and, after it, its best prune, and keeps the pair only
if the error drops; a row whose best pair does not pay is done. The sparsity (and an N:M pattern)
is unchanged, the kept weights keep their values (Wanda's setting: no weight update).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_INF = float("inf")


@dataclass
class SwapReport:
    error_before: float  # sum over rows of delta^T H delta
    error_after: float
    swaps: int  # accepted swaps, all rows together


def reconstruction_error(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """delta^T H delta for each row, delta = the pruned part of the row."""
    delta = weight.float() * (~keep)
    return ((delta @ hessian) * delta).sum(1)


def _best_pairs(w, keep, revivable, g, hessian, diag, group: int):
    """Per row: the best (revive j, prune k) pair within one group, its error change, and g after it."""
    rows, cols = w.shape
    groups = cols // group
    revive = torch.where(~keep & revivable, -2 * w * g + w * w * diag, _INF).view(rows, groups, group)
    gain, jm = revive.min(-1)  # [rows, groups]
    j = jm + torch.arange(groups, device=w.device) * group  # column of each group's revive
    w_j = w.gather(1, j)
    members = torch.arange(cols, device=w.device).view(1, groups, group)
    h_kj = hessian[members.expand(rows, -1, -1), j.unsqueeze(-1).expand(-1, -1, group)]  # H[k, j], k in the group
    g_after = g.view(rows, groups, group) - w_j.unsqueeze(-1) * h_kj
    wv = w.view(rows, groups, group)
    prune = torch.where(keep.view(rows, groups, group), 2 * wv * g_after + wv * wv * diag.view(1, groups, group), _INF)
    cost, km = prune.min(-1)
    change = gain + cost  # inf where a group has nothing to revive or keep
    best = change.argmin(1)
    pick = lambda t: t.gather(1, best.unsqueeze(1)).squeeze(1)  # noqa: E731
    return pick(j), pick(km + torch.arange(groups, device=w.device) * group), pick(change)


@torch.no_grad()
def refine_mask(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, cycles: int,
                group: int | None = None, revivable: torch.Tensor | None = None) -> tuple[torch.Tensor, SwapReport]:
    """Swap pruned and kept weights of each row while its reconstruction error drops, at most
    `cycles` swaps per row. `group`: M of an N:M pattern (swaps stay inside a group); None for
    unstructured. `revivable` (bool, like `weight`): where a pruned weight may come back (an
    earlier step's mask is final). Returns the new keep-mask (a copy) and what it did."""
    w = weight.detach().float()
    keep = keep.clone()
    revivable = torch.ones_like(keep) if revivable is None else revivable
    h = hessian.float()
    diag = torch.diagonal(h)
    g = (w * (~keep)) @ h
    before = reconstruction_error(w, keep, h)
    tolerance = 1e-6 * before  # a swap must lower the row's error by more than rounding noise
    active = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    swaps = 0
    for _ in range(cycles):
        j, k, change = _best_pairs(w, keep, revivable, g, h, diag, group or w.shape[1])
        accept = active & (change < -tolerance)
        if not accept.any():
            break
        rows = accept.nonzero().squeeze(1)
        keep[rows, j[rows]] = True
        keep[rows, k[rows]] = False
        g[rows] += w[rows, k[rows]].unsqueeze(1) * h[k[rows]] - w[rows, j[rows]].unsqueeze(1) * h[j[rows]]
        active = accept
        swaps += len(rows)
    after = reconstruction_error(w, keep, h)
    return keep, SwapReport(float(before.sum()), float(after.sum()), swaps)
