"""Recipe step handlers for pruning: apply the pure mask functions to a model's tensors."""

from __future__ import annotations

import torch

from slimkit.numerics import magnitude
from slimkit.pruning.config import MagnitudePruneConfig
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step
from slimkit.recipes.targets import select_targets


@register_step(MagnitudePruneConfig)
@torch.no_grad()
def apply_magnitude(config: MagnitudePruneConfig, ctx: StepContext) -> None:
    targets = select_targets(ctx.state.model, ctx.state.adapter, config, ctx.state.records, loaded_only=True)
    if config.pattern:
        n, m = magnitude.parse_nm(config.pattern)
        for name, module in targets.items():  # every shape is checked before any weight changes
            magnitude.check_nm_shape(tuple(module.weight.shape), m, name)
    threshold = None
    if config.scope == "global":
        threshold = magnitude.global_threshold([mod.weight for mod in targets.values()], config.sparsity)
    for name, module in ctx.run.progress.track(list(targets.items()), f"{config.summary()}"):
        w = module.weight
        if config.pattern:
            mask = magnitude.nm_mask(w, n, m)
        elif threshold is not None:
            mask = magnitude.threshold_mask(w, threshold)
        else:
            mask = magnitude.unstructured_mask(w, config.sparsity)
        record = ctx.state.records[name]
        record.mask = mask if record.mask is None else (mask & record.mask)
        w.mul_(record.mask.to(w.dtype))
        record.methods.append(config.summary())
