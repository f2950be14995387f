"""Registry: each step config type maps to the handler that applies it to a model.

In the spirit of torchao's `quantize_(model, Config)`: a config is plain validated data, and
`register_step(ConfigType)` attaches the code that executes it. This module is a leaf: it
imports only the base config type. The built-in step modules are listed in `builtin_steps.py`.
"""

from __future__ import annotations

from typing import Any, Callable

from slimkit.recipes.base import StepConfig

Handler = Callable[[StepConfig, Any], None]  # (config, StepContext)
_CONFIGS: dict[str, type[StepConfig]] = {}
_HANDLERS: dict[type[StepConfig], Handler] = {}


def register_step(config_type: type[StepConfig]) -> Callable[[Handler], Handler]:
    method = config_type.model_fields["method"].default

    def decorator(handler: Handler) -> Handler:
        _CONFIGS[method] = config_type
        _HANDLERS[config_type] = handler
        return handler

    return decorator


def registered_configs() -> dict[str, type[StepConfig]]:
    return dict(_CONFIGS)


def registered_handler(config: StepConfig) -> Handler:
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise KeyError(f"no handler registered for {type(config).__name__}") from None
