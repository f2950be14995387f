"""Recipe step handlers for calibrated quantization: GPTQ and AWQ."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.calibration.block_data import target_outputs
from slimkit.calibration.obs import ObsResult, ObsSettings
from slimkit.calibration.runner import run_calibrated, solve_linears, take_hessians, write_result
from slimkit.calibration.stats import StatsRequest
from slimkit.models.fold_check import scale_consumer, scale_producer
from slimkit.numerics.rtn import check_groups, compute_qparams, dequantize, quantize
from slimkit.quantization import awq
from slimkit.quantization.block_scales import tune_block_scales
from slimkit.quantization.config import AWQConfig, GPTQConfig
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step


def _group_check(spec):
    return lambda name, module: check_groups(module.weight, spec, name)


@register_step(GPTQConfig)
def apply_gptq(config: GPTQConfig, ctx: StepContext) -> None:
    spec = config.spec()
    tuning = config.tune_scales

    def block(work, selected):
        if tuning is not None:  # taken before any weight of the block changes
            goal = target_outputs(tuning.targets, work)
        hessians = take_hessians(work, selected)  # each freed once its factor exists
        masks = {n: ctx.state.records[n].mask for n in selected}

        def store(name, result):  # written as soon as solved: a big block's results never coexist
            write_result(selected[name], ctx.state.records[name], result, spec, config.summary(), config.percdamp)

        solve_linears(work, selected, hessians, masks, ctx.run.progress, on_solved=store, quant=spec,
                      settings=ObsSettings(config.blocksize, config.percdamp, config.act_order))
        if tuning is not None:
            tune_block_scales(tuning, ctx, work, selected, goal, "GPTQ")

    dense = tuning is not None and tuning.targets == "dense-model"
    run_calibrated(config, ctx, StatsRequest(hessian=True, dense_targets=dense), block, _group_check(spec))


def _foldable(producer: nn.Module | None, width: int) -> bool:
    if producer is None or getattr(producer, "weight", None) is None:
        return False
    if isinstance(producer, nn.Linear):
        return producer.out_features == width
    return producer.weight.dim() == 1 and producer.weight.numel() == width


NOT_FOLDED = ("AWQ scales skipped: no op before this input takes them exactly (a norm feeding the residual too, "
              "Gemma's (1 + w) norm, an activation, or GQA heads); clipping only")


@register_step(AWQConfig)
def apply_awq(config: AWQConfig, ctx: StepContext) -> None:
    spec = config.spec()

    @torch.no_grad()
    def block(work, selected):
        hessians = {}
        # 1. scales for every input group, on the dense weights, folded into the producer
        for group, producer in zip(work.groups, work.producers):
            stats = work.stats[group[0]]
            H = stats.hessian
            if any(n in selected for n in group) and _foldable(producer, H.shape[0]):
                weights = [work.linears[n].weight for n in group]
                s, alpha, ratio = awq.search_scales(weights, H, stats.abs_mean, spec, config.grid)
                for n in group:  # scale every linear that reads this input, selected or not
                    scale_consumer(work.linears[n], s)
                scale_producer(producer, s)
                H = H / torch.outer(s, s)
                for n in group:
                    if n in selected:
                        ctx.state.records[n].notes.append(f"AWQ alpha {alpha:.2f} (error x{ratio:.3f} vs no scaling)")
            else:
                for n in set(group) & set(selected):
                    ctx.state.records[n].notes.append(NOT_FOLDED)
            for n in group:
                hessians[n] = H
        # 2. quantize each selected linear: clip search + RTN, or GPTQ on the scaled inputs
        if config.quantizer == "gptq":
            masks = {n: ctx.state.records[n].mask for n in selected}
            results = solve_linears(work, selected, hessians, masks, ctx.run.progress, quant=spec,
                                    settings=ObsSettings(percdamp=config.percdamp))
            for name, module in selected.items():
                write_result(module, ctx.state.records[name], results[name], spec, config.summary(), config.percdamp)
            return
        for name, module in ctx.run.progress.track(list(selected.items()), f"block {work.index}: linears"):
            w = module.weight.float()
            clip = awq.search_clip(w, hessians[name], spec, config.grid) if config.clip else None
            scale, zero = compute_qparams(w, spec, name, clip=clip)
            w_hat = dequantize(quantize(w, scale, zero, spec), scale, zero, spec)
            mask = ctx.state.records[name].mask  # a mask from an earlier pruning step stays
            result = ObsResult(w_hat if mask is None else w_hat * mask, mask, scale, zero, config.percdamp)
            write_result(module, ctx.state.records[name], result, spec, config.summary(), config.percdamp)

    run_calibrated(config, ctx, StatsRequest(hessian=True, abs_mean=True), block, _group_check(spec))
