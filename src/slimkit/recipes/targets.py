"""Which tensors a step compresses: the block linears, optionally lm_head and embeddings."""

from __future__ import annotations

from fnmatch import fnmatch

from torch import nn

from slimkit.models.adapters import ArchitectureAdapter
from slimkit.recipes.base import StepConfig
from slimkit.recipes.context import LayerRecord


def select_targets(
    model: nn.Module, adapter: ArchitectureAdapter, config: StepConfig, records: dict[str, LayerRecord],
    loaded_only: bool = False,
) -> dict[str, nn.Module]:
    """Modules whose `.weight` the step rewrites, by full name; a tied weight appears once.
    `loaded_only`: leave out weights still on the meta device (the blocks a streamed run has not
    read), for steps that work on values one tensor at a time."""
    modules: dict[str, nn.Module] = dict(adapter.linears(model, include_lm_head=config.include_lm_head))
    if config.include_embeddings:
        modules.update(adapter.embedding_modules(model))
    seen: set[int] = set()
    out: dict[str, nn.Module] = {}
    for name, module in modules.items():
        if any(fnmatch(name, pattern) for pattern in config.ignore) or id(module.weight) in seen:
            continue
        if loaded_only and module.weight.is_meta:
            continue
        seen.add(id(module.weight))
        group = narrower_than_a_group(config, module.weight.shape[-1])
        if name not in records:
            w = module.weight
            records[name] = LayerRecord(name, adapter.tensor_kind(name + ".weight"), tuple(w.shape), w.element_size())
        if group:  # a few-input mixing matrix (Gemma-3n's AltUp coefficients): nothing to group, left dense
            note = f"left dense: {module.weight.shape[-1]} inputs, fewer than one group of {group}"
            records[name].notes += [note] if note not in records[name].notes else []
            continue
        out[name] = module
    return out


def narrower_than_a_group(config: StepConfig, inputs: int) -> int | None:
    """The step's quantization group size when a weight of `inputs` columns is narrower than one group."""
    quant = config if hasattr(config, "group_size") else getattr(config, "quantize", None)
    group = getattr(quant, "group_size", None)
    return group if group and inputs < group else None
