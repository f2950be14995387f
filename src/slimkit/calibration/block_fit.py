"""Fitting a block's continuous parameters to target outputs with Adam: the loop shared by block
reconstruction after pruning (the kept weights) and scale tuning after quantization (the group
scales, codes fixed). The caller says how its parameters become the block's weights.

Adam, learning rate decaying linearly to 0, a random draw of windows per step. The parameters of
the lowest step loss are kept (measured before the step that follows it), and the starting values
come back when the fitted ones do worse on the first calibration batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from slimkit.calibration.block_data import BlockData, run_block

Parameters = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FitSettings:
    iters: int = 200
    lr: float = 1e-4
    batch: int = 8  # calibration windows per step
    seed: int = 0


@dataclass
class FitResult:
    values: Parameters  # the fitted parameters, or the starting ones when fitting did not pay
    error_before: float  # the block's output MSE on the first calibration batch, at the start
    error_after: float  # the same with the fitted parameters
    kept: bool  # False: fitting did worse on that batch, and `values` are the starting ones


@torch.no_grad()
def _first_batch_error(block: nn.Module, weights: dict[str, torch.Tensor], data: BlockData) -> float:
    hidden, args, kwargs = data.inputs(0)
    out = run_block(block, weights, hidden, args, kwargs)
    return float(torch.nn.functional.mse_loss(out, data.outputs[0].to(hidden.device).float()))


def fit_block(block: nn.Module, start: Parameters, weights_of: Callable[[Parameters], dict[str, torch.Tensor]],
              data: BlockData, settings: FitSettings, steps: Iterable[int] | None = None) -> FitResult:
    """Train `start` (fp32 tensors, not changed) so that the block run with `weights_of(values)` in
    place of its own parameters outputs `data.outputs`. The block's own parameters do not change.
    `steps` (default range(settings.iters)) may be a progress bar."""
    values = {n: t.detach().float().clone().requires_grad_() for n, t in start.items()}
    optimizer = torch.optim.Adam(list(values.values()), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / settings.iters)
    generator = torch.Generator().manual_seed(settings.seed)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        before = _first_batch_error(block, weights_of(start), data)
        best, best_loss = start, float("inf")
        for _ in range(settings.iters) if steps is None else steps:
            hidden, args, kwargs, target = data.sample(generator, settings.batch)
            with torch.enable_grad():
                loss = torch.nn.functional.mse_loss(run_block(block, weights_of(values), hidden, args, kwargs),
                                                    target.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            value = float(loss.detach())
            if value < best_loss:  # the values this loss was measured with, before the step
                best, best_loss = {n: v.detach().clone() for n, v in values.items()}, value
            optimizer.step()
            schedule.step()
        after = _first_batch_error(block, weights_of(best), data)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    kept = after <= before
    return FitResult(best if kept else start, before, after, kept)
