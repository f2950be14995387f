"""`prune_structured(model, config, batches)`: importance -> plan -> a smaller standard model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from slimkit.errors import ShapeError
from slimkit.models.adapters import ArchitectureAdapter, adapter_for
from slimkit.pruning.structured.config import StructuredPruneConfig
from slimkit.pruning.structured.experts import EXPERT_COUNT_FIELDS, keep_experts, routing_frequency
from slimkit.pruning.structured.importance import block_influence, compute_importance
from slimkit.pruning.structured.select import (
    evenly_spaced,
    keep_count,
    lowest_influence,
    select_heads,
    top_sorted,
)
from slimkit.pruning.structured.support import check_structured_support
from slimkit.pruning.structured.surgery import StructuredPlan, apply_plan, parameter_count

Batches = Callable[[], Iterable[dict]]


@dataclass
class StructuredResult:
    model: nn.Module
    plan: StructuredPlan
    parameters_before: int
    parameters_after: int
    config_changes: dict = field(default_factory=dict)
    block_influence: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    def hidden_projection(self, width_before: int) -> torch.Tensor | None:
        """[before, after] matrix placing the kept hidden channels back where they were."""
        keep = self.plan.keep_hidden
        if keep is None:
            return None
        proj = torch.zeros(width_before, len(keep))
        proj[keep, torch.arange(len(keep))] = 1.0
        return proj

    def to_dict(self) -> dict:
        return {
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "config_changes": self.config_changes,
            "dropped_layers": list(self.plan.drop_layers),
            "block_influence": self.block_influence,
            "notes": self.notes,
        }


_WATCHED = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "hidden_size",
            "num_hidden_layers", *EXPERT_COUNT_FIELDS)


def build_plan(model: nn.Module, adapter: ArchitectureAdapter, config: StructuredPruneConfig,
               batches: Batches) -> tuple[StructuredPlan, list[float] | None, list[str]]:
    cfg = model.config
    layout = adapter.heads(model)
    n_layers = len(adapter.get_blocks(model))
    notes: list[str] = []
    group = layout.num_heads // layout.num_kv_heads
    if config.heads is not None and config.head_grouping == "kv_groups":  # a fraction of the groups
        keep_heads = keep_count(layout.num_kv_heads, config.heads, None, "KV groups") * group
    elif config.heads is not None:  # a fraction of each group's query heads
        keep_heads = keep_count(group, config.heads, None, "query heads per group") * layout.num_kv_heads
    else:
        keep_heads = keep_count(layout.num_heads, None, config.num_heads, "query heads")
    keep_mlp = keep_count(getattr(cfg, "intermediate_size", 0), config.mlp, config.intermediate_size, "MLP channels")
    keep_hidden = keep_count(cfg.hidden_size, config.hidden, config.hidden_size, "hidden channels")
    if keep_heads is not None and not adapter.head_dim_is_free(cfg) and keep_hidden is None:
        keep_hidden = keep_heads * layout.head_dim
        notes.append(f"{adapter.name} ties the head size to hidden_size / heads, so keeping {keep_heads} heads of "
                     f"{layout.head_dim} also keeps {keep_hidden} of {cfg.hidden_size} hidden channels")
    imp = None
    if any(x is not None for x in (keep_heads, keep_mlp, keep_hidden)):
        imp = compute_importance(model, adapter, config.importance, batches)
    heads = kvs = None
    if keep_heads is not None and keep_heads < layout.num_heads:
        heads, kvs = select_heads(imp, layout, keep_heads, config.head_grouping)
    mlp = None
    if keep_mlp is not None and keep_mlp < cfg.intermediate_size:
        mlp = tuple(top_sorted(imp.mlp[i], keep_mlp) for i in range(n_layers))
    hidden = None
    if keep_hidden is not None and keep_hidden < cfg.hidden_size:
        hidden = top_sorted(imp.hidden, keep_hidden)
    influence = None
    drop: tuple[int, ...] = ()
    if config.drop_layers is not None:
        drop = tuple(sorted(set(config.drop_layers)))
    elif config.layers is not None:
        if config.layer_selection == "block_influence":
            bi = block_influence(model, adapter, batches())
            influence = [round(float(x), 6) for x in bi]
            drop = lowest_influence(bi, config.layers)
        elif config.layer_selection == "evenly_spaced":
            drop = evenly_spaced(n_layers, config.layers)
        else:
            if config.layers >= n_layers:
                raise ShapeError(f"cannot drop {config.layers} of {n_layers} layers")
            drop = tuple(range(n_layers - config.layers, n_layers))
    experts = _expert_plan(model, adapter, config, batches, notes)
    plan = StructuredPlan(heads, kvs, mlp, hidden, drop, experts, tuple(notes))
    return plan, influence, notes


def _expert_plan(model: nn.Module, adapter: ArchitectureAdapter, config: StructuredPruneConfig, batches: Batches,
                 notes: list[str]) -> tuple[torch.Tensor, ...] | None:
    """MoE: the most-routed experts of each block, as many as the config keeps."""
    if config.experts is None and config.num_experts is None:
        return None
    counts = routing_frequency(model, adapter, batches())
    keep = keep_count(counts.shape[1], config.experts, config.num_experts, "experts")
    kept = keep_experts(counts, keep, getattr(model.config, "num_experts_per_tok", None))
    for i, k in enumerate(kept):
        dropped = [e for e in range(counts.shape[1]) if e not in set(k.tolist())]
        notes.append(f"block {i}: tokens routed per expert {counts[i].tolist()}; removed experts {dropped}")
    return kept


def prune_structured(model: nn.Module, config: StructuredPruneConfig, batches: Batches,
                     adapter: ArchitectureAdapter | None = None) -> StructuredResult:
    """Return a smaller copy of `model` (same class, updated config); `model` is not modified."""
    adapter = adapter or adapter_for(model)
    check_structured_support(model, adapter, config)
    before = {k: getattr(model.config, k, None) for k in _WATCHED}
    plan, influence, notes = build_plan(model, adapter, config, batches)
    new = apply_plan(model, adapter, plan)
    after = {k: getattr(new.config, k, None) for k in _WATCHED}
    changes = {k: [before[k], after[k]] for k in _WATCHED if before[k] != after[k]}
    return StructuredResult(new, plan, parameter_count(model), parameter_count(new), changes, influence, notes)


def token_batches(windows: torch.Tensor, batch_size: int = 8) -> list[dict]:
    """Model-input dicts from a [n, seqlen] tensor of token windows."""
    return [{"input_ids": windows[i : i + batch_size]} for i in range(0, len(windows), batch_size)]
