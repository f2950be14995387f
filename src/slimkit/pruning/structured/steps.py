"""Recipe step handler: `prune_structured` swaps the context's model for a smaller one."""

from __future__ import annotations

from slimkit.errors import RecipeError
from slimkit.pruning.structured.config import StructuredPruneConfig
from slimkit.pruning.structured.prune import prune_structured, token_batches
from slimkit.recipes.registry import StepContext, register_step


@register_step(StructuredPruneConfig)
def apply_structured(config: StructuredPruneConfig, ctx: StepContext) -> None:
    if ctx.records:
        raise RecipeError("prune_structured changes tensor shapes: put it before masking or quantization steps")
    if ctx.calibration is None and (config.importance != "magnitude" or config.layer_selection == "block_influence"):
        raise RecipeError(f"{config.summary()} needs calibration text; this model has no tokenizer")

    def batches():
        windows = ctx.calibration()
        if config.calibration_windows:
            windows = windows[: config.calibration_windows]
        return ctx.progress.track(token_batches(windows, 4), "importance")

    width = ctx.model.config.hidden_size
    result = prune_structured(ctx.model, config, batches, ctx.adapter)
    ctx.model = result.model
    proj = result.hidden_projection(width)
    if proj is not None:
        ctx.hidden_projection = proj if ctx.hidden_projection is None else ctx.hidden_projection @ proj
    ctx.details.append({"step": config.summary(), **result.to_dict()})
