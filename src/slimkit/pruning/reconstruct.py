"""Block reconstruction after pruning: the kept weights of a block are trained, the mask fixed, so
that the pruned block reproduces the dense block's output on the calibration windows (the idea of
block-wise sparse fine-tuning, EBFT; AutoRound's loop with weights instead of roundings).

SparseGPT and Wanda fit each linear alone, to its own inputs. Here the whole block is fitted at
once, so a layer may correct its neighbours' errors, and the targets may be the dense model's own
activations at this depth (what the pruned blocks before it drifted from). The loop is
calibration/block_fit.py's (Adam, the best step kept, nothing changed when fitting does worse);
pruned weights stay exactly zero.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from slimkit.calibration.block_data import BlockData
from slimkit.calibration.block_fit import FitResult, FitSettings, fit_block


def _weights(linears: dict[str, nn.Linear], values: dict[str, torch.Tensor],
             masks: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """`values` as the block's weights (masked, in each linear's dtype), for `run_block`."""
    out = {}
    for name, module in linears.items():
        w, mask = values[name], masks.get(name)
        out[f"{name}.weight"] = (w if mask is None else w * mask).to(module.weight.dtype)
    return out


def reconstruct_block(block: nn.Module, linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor | None],
                      data: BlockData, settings: FitSettings, steps: Iterable[int] | None = None) -> FitResult:
    """Train the kept weights of `linears` (names relative to `block`; `masks` True = kept) so that
    the block's output matches `data.outputs`; the result is written into the linears. The block's
    other parameters do not change. `steps` (default range(settings.iters)) may be a progress bar."""
    start = {n: m.weight.detach().float() for n, m in linears.items()}
    result = fit_block(block, start, lambda values: _weights(linears, values, masks), data, settings, steps)
    with torch.no_grad():
        for name, weight in _weights(linears, result.values, masks).items():
            linears[name.removesuffix(".weight")].weight.copy_(weight)
    return result
