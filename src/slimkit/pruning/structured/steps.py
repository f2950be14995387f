"""Recipe step handler: `prune_structured` swaps the context's model for a smaller one."""

from __future__ import annotations

from slimkit.pruning.structured.config import StructuredPruneConfig
from slimkit.pruning.structured.prune import prune_structured, token_batches
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step


@register_step(StructuredPruneConfig)
def apply_structured(config: StructuredPruneConfig, ctx: StepContext) -> None:
    def batches():
        windows = ctx.run.calibration()
        if config.calibration_windows:
            windows = windows[: config.calibration_windows]
        return ctx.run.progress.track(token_batches(windows, 4), "importance")

    width = ctx.state.model.config.hidden_size
    result = prune_structured(ctx.state.model, config, batches, ctx.state.adapter)
    ctx.state.model = result.model
    proj = result.hidden_projection(width)
    if proj is not None:
        ctx.state.hidden_projection = proj if ctx.state.hidden_projection is None else ctx.state.hidden_projection @ proj
    ctx.state.details.append({"step": config.summary(), **result.to_dict()})
