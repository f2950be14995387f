"""A toy recipe method, written the way a new method is added: its config and its handler."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from slimkit.recipes.base import StepConfig
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step
from slimkit.recipes.targets import select_targets


class ScaleWeightsConfig(StepConfig):
    """Multiply every targeted weight by a constant (a toy: it teaches nothing but the plumbing)."""

    method: Literal["scale_weights"] = "scale_weights"
    factor: float = Field(0.5, gt=0)


@register_step(ScaleWeightsConfig)
@torch.no_grad()
def apply_scale(config: ScaleWeightsConfig, ctx: StepContext) -> None:
    for name, module in select_targets(ctx.state.model, ctx.state.adapter, config, ctx.state.records).items():
        module.weight.mul_(config.factor)
        ctx.state.records[name].methods.append(f"scaled x{config.factor}")
