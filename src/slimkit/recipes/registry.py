"""Registry: each step config type maps to the handler that applies it to a model.

In the spirit of torchao's `quantize_(model, Config)`: a config is plain validated data, and
`register_step(ConfigType)` attaches the code that executes it. New methods register here and
become usable in YAML recipes by their `method` name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from slimkit.models.adapters import ArchitectureAdapter
from slimkit.progress import NoProgress, Progress
from slimkit.quantization.rtn import QuantParams
from slimkit.recipes.base import StepConfig


@dataclass
class LayerRecord:
    """What compression did to one tensor; later steps (packing, export) read it."""

    name: str
    kind: str  # attention, mlp, lm_head, embedding
    shape: tuple[int, ...]
    element_size: int = 4  # bytes per element of the dense tensor
    mask: torch.Tensor | None = None  # bool, True = kept
    quant: QuantParams | None = None
    methods: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. a damping that had to be raised


@dataclass
class StepContext:
    model: nn.Module
    adapter: ArchitectureAdapter
    records: dict[str, LayerRecord]
    progress: Progress = field(default_factory=NoProgress)
    calibration: Callable[[], torch.Tensor] | None = None  # lazily drawn windows
    offload_dir: str | None = None  # keep calibration activations on disk
    engine_reports: list = field(default_factory=list)  # one per calibrated pass
    # Structural steps and distillation: the model before the recipe (the teacher), the text
    # split and tokenizer for training data, where runs keep checkpoints, and what each step did.
    teacher: nn.Module | None = None
    tokenizer: object | None = None
    split: object | None = None
    runs_dir: str | None = None
    hidden_projection: torch.Tensor | None = None  # [teacher width, student width] when they differ
    details: list[dict] = field(default_factory=list)
    restart_training: bool = False  # discard interrupted training runs instead of resuming them


Handler = Callable[[StepConfig, StepContext], None]
_CONFIGS: dict[str, type[StepConfig]] = {}
_HANDLERS: dict[type[StepConfig], Handler] = {}


def register_step(config_type: type[StepConfig]) -> Callable[[Handler], Handler]:
    method = config_type.model_fields["method"].default

    def decorator(handler: Handler) -> Handler:
        _CONFIGS[method] = config_type
        _HANDLERS[config_type] = handler
        return handler

    return decorator


def _load_builtin_steps() -> None:
    # Importing the step modules registers their handlers.
    import slimkit.distillation.steps  # noqa: F401
    import slimkit.pruning.calibrated_steps  # noqa: F401
    import slimkit.pruning.steps  # noqa: F401
    import slimkit.pruning.structured.steps  # noqa: F401
    import slimkit.quantization.calibrated_steps  # noqa: F401
    import slimkit.quantization.steps  # noqa: F401


def config_types() -> dict[str, type[StepConfig]]:
    _load_builtin_steps()
    return dict(_CONFIGS)


def handler_for(config: StepConfig) -> Handler:
    _load_builtin_steps()
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise KeyError(f"no handler registered for {type(config).__name__}") from None
