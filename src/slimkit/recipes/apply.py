"""`compress(model, recipe)`: run a recipe's steps in order on a model, in place."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from slimkit.models.adapters import ArchitectureAdapter, adapter_for
from slimkit.progress import NoProgress, Progress
from slimkit.recipes.registry import LayerRecord, StepContext, handler_for
from slimkit.recipes.schema import Recipe


@dataclass
class CompressionResult:
    recipe: Recipe
    records: dict[str, LayerRecord]
    step_seconds: list[float] = field(default_factory=list)
    engine_reports: list = field(default_factory=list)  # timings of each calibrated pass

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)


def compress(
    model: nn.Module,
    recipe: Recipe,
    adapter: ArchitectureAdapter | None = None,
    progress: Progress = NoProgress(),
    calibration: Callable[[], torch.Tensor] | None = None,
    offload_dir: str | None = None,
) -> CompressionResult:
    """Apply every step of `recipe` to `model` in place; return what each tensor went through."""
    adapter = adapter or adapter_for(model)
    ctx = StepContext(model, adapter, {}, progress, calibration, offload_dir)
    result = CompressionResult(recipe, ctx.records, engine_reports=ctx.engine_reports)
    for step in recipe.steps:
        start = time.perf_counter()
        handler_for(step)(step, ctx)
        result.step_seconds.append(time.perf_counter() - start)
    return result
