"""`compress(model, recipe)`: run a recipe's steps in order on a model, in place."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.errors import RecipeError
from slimkit.models.adapters import ArchitectureAdapter, adapter_for
from slimkit.recipes.builtin_steps import handler_for
from slimkit.recipes.context import LayerRecord, ModelState, RunResources, StepContext
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


def check_prerequisites(recipe: Recipe, run: RunResources) -> None:
    """What each step declares it needs, checked once before any step runs."""
    for i, step in enumerate(recipe.steps):
        where = f"steps[{i}] ({step.method})"
        if step.needs_calibration and run.calibration is None:
            raise RecipeError(f"{where} needs calibration text, and this model has no tokenizer")
        if step.needs_teacher and (run.tokenizer is None or run.split is None):
            raise RecipeError(f"{where} trains on text: it needs a tokenizer and a text split")
        if step.changes_shapes and any(not (s.changes_shapes or s.needs_teacher) for s in recipe.steps[:i]):
            raise RecipeError(f"{where} changes tensor shapes: put it before masking or quantization steps")
        if step.rewrites_weights and any(not (s.changes_shapes or s.needs_teacher or s.rewrites_weights)
                                         for s in recipe.steps[:i]):
            raise RecipeError(f"{where} rewrites every weight: put it before masking or quantization steps")


def compress(model: nn.Module, recipe: Recipe, adapter: ArchitectureAdapter | None = None,
             run: RunResources | None = None) -> CompressionResult:
    """Apply every step of `recipe` to `model`; return what each tensor went through.

    Masking and quantization steps work in place. Structural steps (`prune_structured`) build a
    smaller model: use `result.model`, which is always the compressed one. A `distill` step trains
    it against a copy of `model` taken before the first step.
    """
    run = run or RunResources()
    check_prerequisites(recipe, run)
    state = ModelState(model, adapter or adapter_for(model))
    if any(step.needs_teacher for step in recipe.steps):
        state.teacher = copy.deepcopy(model).eval()
    ctx = StepContext(state, run)
    result = CompressionResult(recipe, state.records, engine_reports=state.engine_reports, details=state.details)
    for step in recipe.steps:
        start = time.perf_counter()
        handler_for(step)(step, ctx)
        result.step_seconds.append(time.perf_counter() - start)
    result.model = state.model
    result.hidden_projection = state.hidden_projection
    return result
