"""`compress(model, recipe)`: run a recipe's steps in order on a model, in place."""

from __future__ import annotations

import copy
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
    model: nn.Module | None = None  # the compressed model (structural steps replace the object)
    details: list[dict] = field(default_factory=list)  # what structural / training steps did
    hidden_projection: torch.Tensor | None = None  # student -> teacher hidden map, when widths differ

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
    tokenizer=None,
    split=None,
    runs_dir: str | None = None,
    restart_training: bool = False,
) -> CompressionResult:
    """Apply every step of `recipe` to `model`; return what each tensor went through.

    Masking and quantization steps work in place. Structural steps (`prune_structured`) build a
    smaller model: use `result.model`, which is always the compressed one. A `distill` step trains
    it against a copy of `model` taken before the first step.
    """
    adapter = adapter or adapter_for(model)
    ctx = StepContext(model, adapter, {}, progress, calibration, offload_dir, tokenizer=tokenizer, split=split,
                      runs_dir=runs_dir, restart_training=restart_training)
    if any(getattr(step, "needs_teacher", False) for step in recipe.steps):
        ctx.teacher = copy.deepcopy(model).eval()
    result = CompressionResult(recipe, ctx.records, engine_reports=ctx.engine_reports, details=ctx.details)
    for step in recipe.steps:
        start = time.perf_counter()
        handler_for(step)(step, ctx)
        result.step_seconds.append(time.perf_counter() - start)
    result.model = ctx.model
    result.hidden_projection = ctx.hidden_projection
    return result
