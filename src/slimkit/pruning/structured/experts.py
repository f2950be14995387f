"""Expert pruning for MoE: the experts the router sends the fewest calibration tokens are removed.

Frequency is counted per block over the calibration batches (a token counts once for each expert in
its top-k). Every MoE block keeps the same number of experts, so the pruned model is again a standard
model of its class with a smaller `num_experts` (or `num_local_experts`) in its config: the surgery
keeps the router's rows of the kept experts and renumbers the experts' tensors.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from slimkit.errors import ShapeError
from slimkit.models.adapters import ArchitectureAdapter
from slimkit.models.experts import ExpertLinears

EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def expert_paths(adapter: ArchitectureAdapter) -> tuple[str, ...]:
    """The experts modules of a block (e.g. `mlp.experts`), from the adapter's expert linears."""
    return tuple(dict.fromkeys(p.rsplit(".", 2)[0] for p in adapter.experts))


@torch.no_grad()
def routing_frequency(model: nn.Module, adapter: ArchitectureAdapter, batches: Iterable[dict]) -> torch.Tensor:
    """[blocks, experts] tokens routed to each expert over `batches` (dicts of model inputs)."""
    blocks = adapter.get_blocks(model)
    (path,) = expert_paths(adapter) or (None,)
    if path is None:
        raise ShapeError(f"{adapter.name} has no MoE experts to prune")
    if blocks[0].get_submodule(path).layout.pre_routed:
        raise ShapeError(f"{adapter.name}: every expert receives every token, weighted by the router (Llama 4's "
                         "pre-routed experts), so counting an expert's inputs does not count its tokens; expert "
                         "pruning does not support this layout yet")
    counts = torch.zeros(len(blocks), len(blocks[0].get_submodule(path)), dtype=torch.long)
    hooks = []
    for i, block in enumerate(blocks):
        experts: ExpertLinears = block.get_submodule(path)
        for e, expert in enumerate(experts):
            def count(_m, args, i=i, e=e):
                counts[i, e] += args[0].shape[0]
            hooks.append(expert.register_forward_pre_hook(count))
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return counts


def keep_experts(counts: torch.Tensor, keep: int, top_k: int | None) -> tuple[torch.Tensor, ...]:
    """Per block, the indices (sorted) of the `keep` most-routed experts."""
    if top_k is not None and keep < top_k:
        raise ShapeError(f"keeping {keep} experts is fewer than the {top_k} each token is routed to "
                         "(num_experts_per_tok); keep at least that many")
    order = torch.argsort(counts, dim=1, descending=True, stable=True)
    return tuple(order[i, :keep].sort().values for i in range(counts.shape[0]))


def expert_count_field(config) -> str:
    name = next((f for f in EXPERT_COUNT_FIELDS if isinstance(getattr(config, f, None), int)), None)
    if name is None:
        raise ShapeError(f"{type(config).__name__} names its number of experts none of {EXPERT_COUNT_FIELDS}")
    return name


def cut_experts(sd: dict[str, torch.Tensor], blocks: str, adapter: ArchitectureAdapter,
                keep: tuple[torch.Tensor, ...], config) -> None:
    """Keep experts `keep[i]` of block i in state dict `sd` (renumbered 0..n-1), and the routers' rows."""
    field = expert_count_field(config)
    total = getattr(config, field)
    (path,) = expert_paths(adapter)
    for i, kept in enumerate(keep):
        new_index = {int(old): new for new, old in enumerate(kept)}
        prefix = f"{blocks}.{i}.{path}."
        for key in [k for k in sd if k.startswith(prefix)]:
            index, rest = key[len(prefix):].split(".", 1)
            tensor = sd.pop(key)
            if int(index) in new_index:
                sd[f"{prefix}{new_index[int(index)]}.{rest}"] = tensor
        for router in adapter.routers:
            for key in [k for k in sd if k.startswith(f"{blocks}.{i}.{router}.")]:
                if sd[key].shape[0] == total:  # the router's rows; a shared-expert gate has one
                    sd[key] = sd[key].index_select(0, kept).contiguous()
    setattr(config, field, len(keep[0]))
