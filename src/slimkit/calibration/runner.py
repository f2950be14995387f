"""Glue between recipe steps and the sequential engine: targets, checks, calibration data."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from slimkit.calibration import distributed
from slimkit.calibration.engine import BlockWork, EngineReport, Walk, sequential_compress
from slimkit.calibration.obs import ObsProblem, ObsResult, obs_solve_batch
from slimkit.calibration.stats import StatsRequest
from slimkit.errors import RecipeError
from slimkit.numerics.rtn import QuantParams, QuantSpec, quantize
from slimkit.recipes.base import StepConfig
from slimkit.recipes.context import LayerRecord, StepContext
from slimkit.recipes.targets import select_targets


def _walk(ctx: StepContext, description: str) -> Walk:
    """The engine's walk for a step: the run's progress, offload dir, device and block access."""
    run = ctx.run
    access = {"access": run.blocks} if run.blocks is not None else {}
    return Walk(run.progress, description, offload_dir=run.offload_dir, device=run.device, **access)


def run_calibrated(
    config: StepConfig,
    ctx: StepContext,
    request: StatsRequest,
    compress_block: Callable[[BlockWork, dict[str, nn.Module]], None],
    check: Callable[[str, nn.Module], None] | None = None,
) -> EngineReport:
    """Validate every target, draw the calibration windows, run the engine block by block."""
    if distributed.world()[1] > 1 and (why := config.one_process_only()):
        raise RecipeError(why)
    if config.include_lm_head or config.include_embeddings:
        raise RecipeError(
            f"{config.method}: calibrated methods compress the linears inside the blocks; "
            "include_lm_head / include_embeddings are not supported. Add an rtn_quantize or "
            "magnitude_prune step for those tensors."
        )
    targets = select_targets(ctx.state.model, ctx.state.adapter, config, ctx.state.records)
    if check is not None:
        for name, module in targets.items():  # every shape is checked before any work starts
            check(name, module)
    windows = ctx.run.calibration()

    def per_block(work: BlockWork) -> None:
        selected = {n: m for n, m in work.linears.items() if n in targets}
        if selected:
            compress_block(work, selected)
            for name in selected:  # the block goes back to the CPU, and so do its records
                ctx.state.records[name].to("cpu")
                if name in work.data_free:
                    ctx.state.records[name].notes.append(
                        f"expert routed {work.data_free[name]} calibration tokens: data-free fallback "
                        "(identity statistics)")

    report = sequential_compress(ctx.state.model, ctx.state.adapter, windows, request, per_block,
                                 _walk(ctx, config.summary()))
    ctx.state.engine_reports.append(report)
    return report


def write_result(module: nn.Module, record: LayerRecord, result: ObsResult, spec: QuantSpec | None,
                 summary: str, percdamp: float) -> None:
    """Store an OBS result in the module and its record (mask combined, quant params kept)."""
    w = module.weight
    w.data.copy_(result.weight.to(w.dtype))
    if result.keep is not None:
        record.mask = result.keep if record.mask is None else (result.keep & record.mask)
    if spec is not None and result.scale is not None:
        record.quant = QuantParams(spec, quantize(result.weight, result.scale, result.zero, spec),
                                   result.scale, result.zero)
    if result.damping > percdamp:
        record.notes.append(f"{summary}: damping raised to {result.damping:.3g}")
    record.methods.append(summary)


def take_hessians(work: BlockWork, selected: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Each selected linear's input Hessian, taken out of the block's statistics (so that
    `solve_linears` can free each one as soon as its factor exists)."""
    taken: dict[int, torch.Tensor] = {}
    for name in selected:
        stats = work.stats[name]
        if id(stats) not in taken:
            taken[id(stats)] = stats.take_hessian()
    return {name: taken[id(work.stats[name])] for name in selected}


def solve_linears(work: BlockWork, selected: dict[str, nn.Module], hessians: dict[str, torch.Tensor],
                  keep_masks: dict[str, torch.Tensor | None], progress,
                  on_solved: Callable[[str, ObsResult], None] | None = None, **solver) -> dict[str, ObsResult]:
    """OBS for a block's selected linears: one stacked problem per shared input, one batched
    solve per input width (q/k/v + o + gate/up together, then down). Over several processes,
    each batch is solved by its owner rank and broadcast. With `on_solved`, each result is handed
    over as soon as its batch is done and not kept (one process: a big block's results never
    coexist), and the returned dict is empty; the Hessians are then consumed (`hessians` is
    emptied, each freed once its factor exists: use `take_hessians`)."""
    problems = []
    for group in work.groups:
        names = [n for n in group if n in selected]
        if names:
            problems.append(ObsProblem(hessians[names[0]], [selected[n].weight for n in names], names,
                                       [keep_masks.get(n) for n in names], release_hessian=on_solved is not None))
    if on_solved is not None:
        hessians.clear()
    rank, size = distributed.world()
    batches = _batches(problems)  # as one process batches them, so each solve is bit for bit the same
    costs = [sum(p.rows * p.hessian.shape[0] ** 2 for p in batch) for batch in batches]
    owner = distributed.owners(costs) if size > 1 else [0] * len(batches)
    streamed = on_solved if size == 1 else None
    results = _solve(work.index, [b for b, o in zip(batches, owner) if o == rank], progress, solver, streamed)
    if size > 1:
        for batch, src in zip(batches, owner):
            for problem in batch:
                results.update(_shared_results(problem, results, src))
    if on_solved is not None and streamed is None:
        for name, result in results.items():
            on_solved(name, result)
        return {}
    return results


BATCH_BYTES = 1 << 28  # a batched solve pads every problem to the most rows; above this, solve apart


def _batches(problems: list[ObsProblem]) -> list[list[ObsProblem]]:
    """Problems of one input width solved together, unless padding them to the most rows would
    take more than BATCH_BYTES (big models: a 4096-wide q/k/v beside a 28672-row gate/up)."""
    by_width: dict[int, list[list[ObsProblem]]] = {}
    for problem in problems:
        batches = by_width.setdefault(problem.hessian.shape[0], [[]])
        last = batches[-1]
        rows = max([p.rows for p in last] + [problem.rows])
        if last and (len(last) + 1) * rows * problem.hessian.shape[0] * 4 > BATCH_BYTES:
            batches.append([problem])
        else:
            last.append(problem)
    return [b for batches in by_width.values() for b in batches]


def _solve(index: int, batches: list[list[ObsProblem]], progress, solver: dict,
           on_solved: Callable[[str, ObsResult], None] | None = None) -> dict[str, ObsResult]:
    results: dict[str, ObsResult] = {}
    labels = [" + ".join(n.rsplit(".", 1)[-1] for p in b for n in p.names) for b in batches]
    for batch, _ in progress.track(list(zip(batches, labels)), f"block {index}: linears"):
        for problem, solved in zip(batch, obs_solve_batch(batch, **solver)):
            for name, result in zip(problem.names, solved):
                if on_solved is not None:
                    on_solved(name, result)
                else:
                    results[name] = result
    return results


def _shared_results(problem: ObsProblem, results: dict[str, ObsResult], src: int) -> dict[str, ObsResult]:
    """The owner's results for `problem`, on every rank."""
    shared = {}
    for name in problem.names:
        r = results.get(name)
        fields = [r.weight, r.keep, r.scale, r.zero, torch.tensor([r.damping], dtype=torch.float64)] if r else [None] * 5
        weight, keep, scale, zero, damping = distributed.broadcast_tensors(fields, src)
        shared[name] = ObsResult(weight, keep, scale, zero, float(damping))
    return shared
