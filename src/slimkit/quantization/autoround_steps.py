"""Recipe step handler for learned rounding (AutoRound): the sequential engine hands each block and
its calibration inputs (through the blocks compressed before it); the targets are the dense
block's outputs on them, or (`targets: dense-model`, AutoRound's own choice) the dense model's
activations at this depth, from a second stream the engine carries."""

from __future__ import annotations

from torch import nn

from slimkit.calibration.block_data import BlockData, target_outputs
from slimkit.calibration.engine import BlockWork
from slimkit.calibration.runner import run_calibrated
from slimkit.calibration.stats import StatsRequest
from slimkit.numerics.rtn import check_groups
from slimkit.quantization import autoround
from slimkit.quantization.block_scales import tune_block_scales
from slimkit.quantization.config import AutoRoundConfig
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step


def _settings(config: AutoRoundConfig) -> autoround.TuneSettings:
    return autoround.TuneSettings(config.iters, config.lr, config.batch, config.tune_range, config.seed)


@register_step(AutoRoundConfig)
def apply_autoround(config: AutoRoundConfig, ctx: StepContext) -> None:
    spec = config.spec()

    def block(work: BlockWork, selected: dict[str, nn.Module]) -> None:
        local = {id(m): n for n, m in work.block.named_modules()}
        linears = {local[id(m)]: m for m in selected.values()}
        masks = {local[id(m)]: ctx.state.records[n].mask for n, m in selected.items()}
        targets = target_outputs(config.targets, work)
        tuning = config.tune_scales
        if tuning is not None:  # taken before any weight of the block changes
            goal = targets if tuning.targets == config.targets else target_outputs(tuning.targets, work)
        data = BlockData(work.inputs.batch, targets)
        steps = ctx.run.progress.track(range(config.iters), f"block {work.index}: rounding")
        result = autoround.tune_block(work.block, linears, spec, masks, data, _settings(config), steps)
        ratio = result.error_tuned / max(result.error_rtn, 1e-30)
        for name, module in selected.items():
            rounding = result.rounding[local[id(module)]]
            w_hat, params = autoround.final_codes(module.weight, rounding, spec)
            record = ctx.state.records[name]
            module.weight.data.copy_((w_hat if record.mask is None else w_hat * record.mask).to(module.weight.dtype))
            record.quant = params
            record.methods.append(config.summary())
            record.notes.append(f"block output error x{ratio:.3f} of RTN's" if result.kept else
                                f"tuned rounding did worse than RTN (x{ratio:.3f}): RTN codes kept")
        if tuning is not None:
            tune_block_scales(tuning, ctx, work, selected, goal, "AutoRound")

    dense = "dense-model" in (config.targets, config.tune_scales and config.tune_scales.targets)
    run_calibrated(config, ctx, StatsRequest(dense_targets=dense), block, lambda name, module: check_groups(module.weight, spec, name))
