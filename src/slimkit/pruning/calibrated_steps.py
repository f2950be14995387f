"""Recipe step handlers for calibrated pruning: SparseGPT and Wanda."""

from __future__ import annotations

import torch

from slimkit.calibration.obs import PruneTarget
from slimkit.calibration.runner import run_calibrated, solve_linears, take_hessians, write_result
from slimkit.calibration.stats import StatsRequest
from slimkit.pruning.config import SparseGPTConfig, WandaConfig
from slimkit.pruning.magnitude import check_nm_shape
from slimkit.pruning.wanda import wanda_mask
from slimkit.quantization.rtn import check_groups
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step


def _shape_check(config, quant_spec=None):
    nm = config.nm()

    def check(name, module):
        if nm:
            check_nm_shape(tuple(module.weight.shape), nm[1], name)
        if quant_spec is not None:
            check_groups(module.weight, quant_spec, name)

    return check


@register_step(SparseGPTConfig)
def apply_sparsegpt(config: SparseGPTConfig, ctx: StepContext) -> None:
    nm = config.nm()
    target = PruneTarget(config.sparsity, *(nm or (None, None)))
    spec = config.quantize.spec() if config.quantize else None

    def block(work, selected):
        hessians = take_hessians(work, selected)  # each freed once its factor exists

        def store(name, result):  # written as soon as solved: a big block's results never coexist
            write_result(selected[name], ctx.state.records[name], result, spec, config.summary(), config.percdamp)

        solve_linears(work, selected, hessians, {}, ctx.run.progress, on_solved=store, prune=target, quant=spec,
                      blocksize=config.blocksize, percdamp=config.percdamp)

    run_calibrated(config, ctx, StatsRequest(hessian=True), block, _shape_check(config, spec))


@register_step(WandaConfig)
@torch.no_grad()
def apply_wanda(config: WandaConfig, ctx: StepContext) -> None:
    nm = config.nm()

    def block(work, selected):
        for name, module in selected.items():
            mask = wanda_mask(module.weight, work.stats[name].col_norm, config.sparsity, *(nm or (None, None)))
            record = ctx.state.records[name]
            record.mask = mask if record.mask is None else (mask & record.mask)
            module.weight.mul_(record.mask.to(module.weight.dtype))
            record.methods.append(config.summary())

    run_calibrated(config, ctx, StatsRequest(col_sq=True), block, _shape_check(config))
