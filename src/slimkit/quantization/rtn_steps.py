"""Recipe step handlers for quantization: fake-quantize weights and keep their parameters."""

from __future__ import annotations

import torch

from slimkit.numerics.rtn import check_groups, rtn_quantize
from slimkit.quantization.config import RTNQuantizeConfig
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step
from slimkit.recipes.targets import select_targets


@register_step(RTNQuantizeConfig)
@torch.no_grad()
def apply_rtn(config: RTNQuantizeConfig, ctx: StepContext) -> None:
    spec = config.spec()
    targets = select_targets(ctx.state.model, ctx.state.adapter, config, ctx.state.records, loaded_only=True)
    for name, module in targets.items():  # shapes are checked before any weight changes
        check_groups(module.weight, spec, name)
    for name, module in ctx.run.progress.track(list(targets.items()), config.summary()):
        w = module.weight
        w_hat, params = rtn_quantize(w, spec, name)
        record = ctx.state.records[name]
        if record.mask is not None:  # zero stays exactly representable; keep the mask explicit
            w_hat = w_hat * record.mask
        w.copy_(w_hat.to(w.dtype))
        record.quant = params
        record.methods.append(config.summary())
