"""Recipe step handlers for calibrated pruning: SparseGPT and Wanda."""

from __future__ import annotations

import torch

from slimkit.calibration.block_data import BlockData, target_outputs
from slimkit.calibration.block_fit import FitSettings
from slimkit.calibration.engine import BlockWork, Walk, sequential_compress
from slimkit.calibration.obs import ObsSettings, PruneTarget
from slimkit.calibration.runner import run_calibrated, solve_linears, take_hessians, write_result
from slimkit.calibration.stats import StatsRequest
from slimkit.numerics.magnitude import check_nm_shape
from slimkit.numerics.rtn import check_groups
from slimkit.pruning.config import OutlierFields, SparseGPTConfig, WandaConfig
from slimkit.pruning.owl import block_sparsities, outlier_ratio
from slimkit.pruning.reconstruct import reconstruct_block
from slimkit.pruning.swap_refine import refine_mask
from slimkit.pruning.wanda import wanda_mask
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step
from slimkit.recipes.targets import select_targets


def _shape_check(config, quant_spec=None):
    nm = config.nm()

    def check(name, module):
        if nm:
            check_nm_shape(tuple(module.weight.shape), nm[1], name)
        if quant_spec is not None:
            check_groups(module.weight, quant_spec, name)

    return check


def block_targets(config: OutlierFields, ctx: StepContext) -> dict[int, float]:
    """Each block's sparsity: the config's, or OWL's from a first engine pass over the dense model
    (the blocks' Wanda scores on the calibration windows; no weight changes)."""
    blocks = len(ctx.state.adapter.get_blocks(ctx.state.model))
    owl = config.outlier_weighted
    if owl is None:
        return dict.fromkeys(range(blocks), config.sparsity)
    targets = select_targets(ctx.state.model, ctx.state.adapter, config, ctx.state.records)
    ratios, sizes = {}, {}

    def measure(work: BlockWork) -> None:
        chosen = [(m.weight, work.stats[n].col_norm) for n, m in work.linears.items() if n in targets]
        if chosen:
            ratios[work.index] = outlier_ratio(chosen, owl.threshold)
            sizes[work.index] = sum(w.numel() for w, _ in chosen)

    sequential_compress(ctx.state.model, ctx.state.adapter, ctx.run.calibration(), StatsRequest(col_sq=True),
                        measure, Walk(ctx.run.progress, "OWL outlier ratios", offload_dir=ctx.run.offload_dir,
                                      device=ctx.run.device))
    order = sorted(ratios)
    per_block = block_sparsities([ratios[i] for i in order], [sizes[i] for i in order], config.sparsity, owl.shift)
    return dict(zip(order, per_block))


def _note_block_sparsity(config: OutlierFields, record, sparsity: float) -> None:
    if config.outlier_weighted is not None:
        record.notes.append(f"OWL: this block pruned to {sparsity:.1%} (recipe average {config.sparsity:.0%})")


def _reconstruction_targets(config: OutlierFields, work: BlockWork) -> list[torch.Tensor] | None:
    """What the block will be trained to output after pruning (taken before any weight changes)."""
    return None if config.reconstruct is None else target_outputs(config.reconstruct.targets, work)


def _reconstruct(config: OutlierFields, ctx: StepContext, work: BlockWork, selected: dict, targets) -> None:
    """Train the pruned block's kept weights to `targets` (see pruning/reconstruct.py)."""
    if targets is None:
        return
    local = {id(m): n for n, m in work.block.named_modules()}
    linears = {local[id(m)]: m for m in selected.values()}
    masks = {local[id(m)]: ctx.state.records[n].mask for n, m in selected.items()}
    r = config.reconstruct
    steps = ctx.run.progress.track(range(r.iters), f"block {work.index}: reconstruction")
    result = reconstruct_block(work.block, linears, masks, BlockData(work.inputs.batch, targets),
                               FitSettings(r.iters, r.lr, r.batch, r.seed), steps)
    ratio = result.error_after / max(result.error_before, 1e-30)
    note = (f"reconstruction: block output error x{ratio:.3f}" if result.kept else
            f"reconstruction did worse (x{ratio:.3f}): pruned weights kept")
    for name in selected:
        ctx.state.records[name].notes.append(note)


def _stats(config: OutlierFields, **wanted) -> StatsRequest:
    dense = config.reconstruct is not None and config.reconstruct.targets == "dense-model"
    return StatsRequest(dense_targets=dense, **wanted)


@register_step(SparseGPTConfig)
def apply_sparsegpt(config: SparseGPTConfig, ctx: StepContext) -> None:
    nm = config.nm()
    spec = config.quantize.spec() if config.quantize else None
    per_block = block_targets(config, ctx)

    def block(work, selected):
        target = PruneTarget(per_block[work.index], *(nm or (None, None)))
        goal = _reconstruction_targets(config, work)
        hessians = take_hessians(work, selected)  # each freed once its factor exists

        def store(name, result):  # written as soon as solved: a big block's results never coexist
            write_result(selected[name], ctx.state.records[name], result, spec, config.summary(), config.percdamp)
            _note_block_sparsity(config, ctx.state.records[name], per_block[work.index])

        solve_linears(work, selected, hessians, {}, ctx.run.progress, on_solved=store, prune=target, quant=spec,
                      settings=ObsSettings(config.blocksize, config.percdamp))
        _reconstruct(config, ctx, work, selected, goal)

    run_calibrated(config, ctx, _stats(config, hessian=True), block, _shape_check(config, spec))


@register_step(WandaConfig)
@torch.no_grad()
def apply_wanda(config: WandaConfig, ctx: StepContext) -> None:
    nm = config.nm()
    per_block = block_targets(config, ctx)

    def block(work, selected):
        goal = _reconstruction_targets(config, work)
        for name, module in selected.items():
            mask = wanda_mask(module.weight, work.stats[name].col_norm, per_block[work.index], *(nm or (None, None)))
            record = ctx.state.records[name]
            if config.swaps:
                mask, swapped = refine_mask(module.weight, mask, work.stats[name].hessian, config.swaps,
                                            nm[1] if nm else None, revivable=record.mask)
                record.notes.append(f"swaps: {swapped.swaps / mask.shape[0]:.1f} per row, reconstruction error "
                                    f"x{swapped.error_after / max(swapped.error_before, 1e-30):.3f}")
            _note_block_sparsity(config, record, per_block[work.index])
            record.mask = mask if record.mask is None else (mask & record.mask)
            module.weight.mul_(record.mask.to(module.weight.dtype))
            record.methods.append(config.summary())
        _reconstruct(config, ctx, work, selected, goal)

    run_calibrated(config, ctx, _stats(config, col_sq=True, hessian=config.swaps > 0), block, _shape_check(config))
