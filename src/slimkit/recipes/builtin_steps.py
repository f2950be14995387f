"""The built-in recipe methods. Importing a step module registers its configs and handlers, so
adding a method is its config, its handler, and one line here."""

from __future__ import annotations

import importlib

from slimkit.recipes.base import StepConfig
from slimkit.recipes.registry import Handler, registered_configs, registered_handler

STEP_MODULES = [
    "slimkit.pruning.steps",  # magnitude_prune
    "slimkit.pruning.calibrated_steps",  # sparsegpt, wanda
    "slimkit.pruning.structured.steps",  # prune_structured
    "slimkit.quantization.rtn_steps",  # rtn_quantize
    "slimkit.quantization.calibrated_steps",  # gptq, awq
    "slimkit.quantization.rotation_steps",  # rotate
    "slimkit.quantization.autoround_steps",  # autoround
    "slimkit.quantization.gguf_steps",  # gguf_quantize
    "slimkit.quantization.allocate_steps",  # gguf_allocate
    "slimkit.quantization.outer_steps",  # quantize_outer
    "slimkit.distillation.steps",  # distill
]


def _load() -> None:
    for module in STEP_MODULES:
        importlib.import_module(module)


def config_types() -> dict[str, type[StepConfig]]:
    """Every known step config by its `method` name."""
    _load()
    return registered_configs()


def handler_for(config: StepConfig) -> Handler:
    _load()
    return registered_handler(config)
