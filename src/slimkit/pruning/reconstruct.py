"""Block reconstruction after pruning: the kept weights of a block are trained, the mask fixed, so
that the pruned block reproduces the dense block's output on the calibration windows (the idea of
block-wise sparse fine-tuning, EBFT; AutoRound's loop with weights instead of roundings).

SparseGPT and Wanda fit each linear alone, to its own inputs. Here the whole block is fitted at
once, so a layer may correct its neighbours' errors, and the targets may be the dense model's own
activations at this depth (what the pruned blocks before it drifted from). Adam on the kept
weights, learning rate decaying linearly to 0, a random draw of windows per step; pruned weights
stay exactly zero. The weights of the lowest step loss are kept, and nothing changes when the
result does worse than the pruned weights on the first calibration batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from slimkit.calibration.block_data import BlockData, run_block


@dataclass(frozen=True)
class ReconstructSettings:
    iters: int = 200
    lr: float = 1e-4
    batch: int = 8  # calibration windows per step
    seed: int = 0


@dataclass
class ReconstructResult:
    error_before: float  # the block's output MSE on the first calibration batch, as pruned
    error_after: float  # the same with the reconstructed weights
    kept: bool  # False: reconstruction did worse on that batch, and the pruned weights stay


def _weights(linears: dict[str, nn.Linear], values: dict[str, torch.Tensor],
             masks: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """`values` as the block's weights (masked, in each linear's dtype), for `run_block`."""
    out = {}
    for name, module in linears.items():
        w, mask = values[name], masks.get(name)
        out[f"{name}.weight"] = (w if mask is None else w * mask).to(module.weight.dtype)
    return out


@torch.no_grad()
def _first_batch_error(block, linears, values, masks, data: BlockData) -> float:
    hidden, args, kwargs = data.inputs(0)
    out = run_block(block, _weights(linears, values, masks), hidden, args, kwargs)
    return float(torch.nn.functional.mse_loss(out, data.outputs[0].to(hidden.device).float()))


def reconstruct_block(block: nn.Module, linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor | None],
                      data: BlockData, settings: ReconstructSettings,
                      steps: Iterable[int] | None = None) -> ReconstructResult:
    """Train the kept weights of `linears` (names relative to `block`; `masks` True = kept) so that
    the block's output matches `data.outputs`; the result is written into the linears. The block's
    other parameters do not change. `steps` (default range(settings.iters)) may be a progress bar."""
    start = {n: m.weight.detach().float().clone() for n, m in linears.items()}
    values = {n: w.clone().requires_grad_() for n, w in start.items()}
    optimizer = torch.optim.Adam(list(values.values()), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / settings.iters)
    generator = torch.Generator().manual_seed(settings.seed)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        before = _first_batch_error(block, linears, start, masks, data)
        best, best_loss = start, float("inf")
        for _ in range(settings.iters) if steps is None else steps:
            hidden, args, kwargs, target = data.sample(generator, settings.batch)
            with torch.enable_grad():
                out = run_block(block, _weights(linears, values, masks), hidden, args, kwargs)
                loss = torch.nn.functional.mse_loss(out, target.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            value = float(loss.detach())
            if value < best_loss:  # the weights this loss was measured with, before the step
                best, best_loss = {n: v.detach().clone() for n, v in values.items()}, value
            optimizer.step()
            schedule.step()
        after = _first_batch_error(block, linears, best, masks, data)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    kept = after <= before
    with torch.no_grad():
        for name, module in linears.items():
            w, mask = (best if kept else start)[name], masks.get(name)
            module.weight.copy_((w if mask is None else w * mask).to(module.weight.dtype))
    return ReconstructResult(before, after, kept)
