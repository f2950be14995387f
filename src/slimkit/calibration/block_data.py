"""A block's calibration data for the methods that run the block themselves (learned rounding,
block reconstruction): its inputs batch by batch, its target outputs, and random draws of windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from slimkit.calibration.engine import BlockInputs, BlockWork, block_output, call_block


@dataclass
class BlockData:
    """A block's calibration inputs and the dense block's outputs on them, batch by batch.
    `inputs(i)` gives batch i as (hidden, args, kwargs) on the block's device."""

    inputs: Callable[[int], tuple[torch.Tensor, tuple, dict]]
    outputs: list[torch.Tensor]

    def sample(self, generator: torch.Generator, rows: int) -> tuple[torch.Tensor, tuple, dict, torch.Tensor]:
        """`rows` windows drawn at random from all batches (as AutoRound draws its batches from every
        calibration sample), with their target outputs."""
        sizes = [int(out.shape[0]) for out in self.outputs]
        picked = torch.randperm(sum(sizes), generator=generator)[:rows].sort().values
        starts = torch.tensor([0, *sizes]).cumsum(0)
        parts = []
        for i, size in enumerate(sizes):
            local = picked[(picked >= starts[i]) & (picked < starts[i + 1])] - starts[i]
            if len(local):
                hidden, args, kwargs = self.inputs(i)
                parts.append(((hidden, args, kwargs, self.outputs[i].to(hidden.device)), local.to(hidden.device), size))
        values, picks, batch_sizes = zip(*parts)
        return _gather(list(values), list(picks), list(batch_sizes))


def _gather(values: list, picks: list[torch.Tensor], sizes: list[int]):
    """Rows `picks[k]` of batch k's value, joined over the batches, for every per-window tensor (2-D
    or more, first dimension the batch's); values shared by all windows are taken from the first."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        per_window = first.dim() >= 2 and all(v.shape[0] == n for v, n in zip(values, sizes))
        if not per_window:
            return first
        if len(values) == 1 and len(picks[0]) == sizes[0]:
            return first
        return torch.cat([v[p] for v, p in zip(values, picks)])
    if isinstance(first, (tuple, list)):
        return type(first)(_gather([v[j] for v in values], picks, sizes) for j in range(len(first)))
    if isinstance(first, dict):
        return {k: _gather([v[k] for v in values], picks, sizes) for k in first}
    return first


def run_block(block: nn.Module, weights: dict[str, torch.Tensor], hidden, args, kwargs) -> torch.Tensor:
    """The block's first output (its hidden states), in fp32, with `weights` in place of its own."""
    out = functional_call(block, weights, (hidden, *args), kwargs, strict=False)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs on each calibration batch, before any of its weights change (on the CPU)."""
    outputs = []
    for i in range(len(inputs)):
        hidden, args, kwargs = inputs.batch(i)
        outputs.append(block_output(call_block(block, hidden, args, kwargs)).cpu())
    return outputs


def target_outputs(kind: str, work: BlockWork) -> list[torch.Tensor]:
    """What a compressed block is trained to output, taken before any of its weights change:
    "dense-model" is the uncompressed model's activations at this depth (the step must ask the
    engine for dense targets), "compressed-path" the dense block on the compressed path's inputs."""
    if kind == "dense-model":
        if work.dense_outputs is None:
            raise ValueError("dense-model targets need StatsRequest(dense_targets=True) from the step")
        return work.dense_outputs
    return block_outputs(work.block, work.inputs)
