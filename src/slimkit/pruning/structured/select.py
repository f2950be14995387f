"""Turn importance scores and a target shape into a `StructuredPlan` (which units survive)."""

from __future__ import annotations

import torch

from slimkit.errors import ShapeError
from slimkit.models.adapters import HeadLayout
from slimkit.pruning.structured.importance import Importance
from slimkit.pruning.structured.surgery import head_units


def keep_count(total: int, ratio: float | None, exact: int | None, what: str) -> int | None:
    """How many of `total` units survive: `exact`, or `total` minus a `ratio` removed (rounded)."""
    if exact is not None:
        keep = exact
    elif ratio is not None:
        keep = round(total * (1 - ratio))
    else:
        return None
    if not 1 <= keep <= total:
        raise ShapeError(f"cannot keep {keep} of {total} {what}")
    return keep


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (ties: the lower index wins)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order.sort().values


def select_heads(imp: Importance, layout: HeadLayout, keep: int, grouping: str) -> tuple[tuple, tuple]:
    """Kept query heads and KV heads per layer.

    grouping 'kv_groups': remove whole KV groups (a group = one KV head and the query heads that
    share it), so `keep` must be a multiple of the group size. 'per_group': remove the same number
    of query heads inside every group; all KV heads stay.
    """
    group = layout.num_heads // layout.num_kv_heads
    heads, kvs = [], []
    for layer in range(imp.heads.shape[0]):
        if grouping == "kv_groups":
            if keep % group:
                raise ShapeError(f"keeping {keep} query heads in whole KV groups of {group} is impossible; "
                                 f"use a multiple of {group} or head_grouping: per_group")
            kv = top_sorted(imp.kv_groups(layout.num_kv_heads)[layer], keep // group)
            heads.append(head_units(kv, group))
            kvs.append(kv)
        else:
            if keep % layout.num_kv_heads:
                raise ShapeError(f"keeping {keep} query heads as an equal number in each of "
                                 f"{layout.num_kv_heads} KV groups is impossible")
            per = keep // layout.num_kv_heads
            scores = imp.heads[layer].view(layout.num_kv_heads, group)
            heads.append(torch.cat([g * group + top_sorted(scores[g], per) for g in range(layout.num_kv_heads)]))
            kvs.append(torch.arange(layout.num_kv_heads))
    return tuple(heads), tuple(kvs)


def evenly_spaced(n_layers: int, n_drop: int) -> tuple[int, ...]:
    """`n_drop` blocks spread evenly over the depth, never the first or the last."""
    if not 0 < n_drop < n_layers - 1:
        raise ShapeError(f"cannot drop {n_drop} of {n_layers} layers")
    picks = sorted({min(max(round((j + 0.5) * n_layers / n_drop), 1), n_layers - 2) for j in range(n_drop)})
    if len(picks) != n_drop:
        raise ShapeError(f"cannot spread {n_drop} dropped layers over {n_layers}")
    return tuple(picks)


def lowest_influence(influence: torch.Tensor, n_drop: int) -> tuple[int, ...]:
    if not 0 < n_drop < len(influence):
        raise ShapeError(f"cannot drop {n_drop} of {len(influence)} layers")
    return tuple(sorted(torch.sort(influence, stable=True).indices[:n_drop].tolist()))
