"""Checks that run before any model loads: paths, data, sequence lengths and recipe shapes.

A model's outline (its config, and the model built on the meta device, which allocates nothing)
answers every shape question in about a second, so a group size that does not tile a layer or
a `--seqlen` past the model's positions is refused before minutes of loading and evaluating.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from torch import nn

from slimkit.errors import DataError, ShapeError, SlimkitError
from slimkit.models.adapters import ArchitectureAdapter, adapter_for
from slimkit.models.checks import (
    NO_CODE,
    check_files,
    check_gguf,
    load_config,
    meta_model,
    read_config,
    usable_positions,
)
from slimkit.models.config_bounds import GGUF_BITS_FLOOR, check_config_bounds
from slimkit.models.loading import gguf_cache_dir, model_kind, resolve
from slimkit.protocol import EvalSettings
from slimkit.recipes.schema import Recipe


@dataclass
class ModelOutline:
    """What a model is, from its config alone: no weights are read."""

    name: str
    path: Path
    kind: str
    config: object

    @property
    def max_positions(self) -> int | None:
        return usable_positions(self.config)

    @cached_property
    def skeleton(self) -> nn.Module:
        """The model on the meta device: every shape, no memory (built on first use, ~1-2 s)."""
        return meta_model(self.config, self.kind)

    @cached_property
    def adapter(self) -> ArchitectureAdapter:
        return adapter_for(self.skeleton)


def _gguf_config(path: Path):
    cache = gguf_cache_dir(path)
    if (cache / "config.json").is_file():
        return load_config(cache)
    from transformers import AutoConfig

    check_gguf(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, **NO_CODE)
    except Exception as exc:  # the gguf reader raises many types for a damaged file
        raise SlimkitError(f"could not read GGUF file {path} (corrupt, truncated or header only): "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    check_config_bounds(config.to_dict(), path.stat().st_size, GGUF_BITS_FLOOR)
    return config


def outline(model: str) -> ModelOutline:
    """Resolve `model` and read its config; for an HF dir, also compare config.json with the
    safetensors headers (missing tensors, absurd sizes, integer weights)."""
    path, _ = resolve(model)
    if path.suffix == ".gguf":
        return ModelOutline(model, path, "causal-lm", _gguf_config(path))
    from slimkit.formats.pack import PACKED_FILE

    shape = ModelOutline(model, path, model_kind(read_config(path)), load_config(path))
    if not (path / PACKED_FILE).is_file():
        check_files(path, shape.config, shape.skeleton)  # the skeleton is reused for recipe shapes
    return shape


def sequence_length(outline_: ModelOutline, asked: int | None, default: int, option: str = "--seqlen") -> int:
    """The length to use: what was asked, which must fit the model's positions, or the default
    cut to them (a model with 256 positions evaluates windows of 256)."""
    limit = outline_.max_positions if outline_.kind == "causal-lm" else None
    if asked is None:
        return min(default, limit) if limit else default
    if limit is not None and asked > limit:
        raise ShapeError(f"{option} {asked} is longer than the model's {limit} positions "
                         f"(max_position_embeddings); use {option} {min(limit, default)} or less")
    return asked


def fit_settings(outline_: ModelOutline, settings: EvalSettings, explicit: frozenset[str]) -> EvalSettings:
    """`settings` with sequence lengths that fit the model: a length the user set must fit (else a
    clear error); a protocol default is cut to the model's positions."""
    fitted = {}
    for field in ("seqlen", "calibration_seqlen"):
        value = getattr(settings, field)
        option = "--" + field.replace("_", "-")
        fitted[field] = sequence_length(outline_, value if field in explicit else None, value, option)
    return settings.model_copy(update=fitted)


def check_recipe_shapes(outline_: ModelOutline, recipe: Recipe) -> None:
    """Every N:M pattern and group size of `recipe` tiles every layer it targets (up to the
    first step that changes the architecture: shapes after it are not known yet)."""
    from slimkit.numerics.magnitude import check_nm_shape
    from slimkit.numerics.rtn import check_groups
    from slimkit.quantization.config import QuantFields
    from slimkit.recipes.targets import select_targets

    for step in recipe.steps:
        if step.changes_shapes or step.needs_teacher:
            return
        nm = step.nm()
        quant = step if isinstance(step, QuantFields) else getattr(step, "quantize", None)
        for name, module in select_targets(outline_.skeleton, outline_.adapter, step, {}).items():
            if nm:
                check_nm_shape(tuple(module.weight.shape), nm[1], f"recipe {recipe.name}: {name}")
            if quant is not None:
                check_groups(module.weight, quant.spec(), f"recipe {recipe.name}: {name}")


def check_data(data: str | os.PathLike | None) -> None:
    """Read and split the user's text now (cached for the run), so a bad file fails first."""
    if data is None:
        return
    from slimkit.data import load_split

    path = Path(data)
    if path.is_dir():
        raise DataError(f"--data {path} is a directory; give a .txt or .jsonl file")
    load_split(str(path))


def check_work_dir(directory: str | os.PathLike | None, option: str) -> None:
    """A directory slimkit writes scratch files into: created when missing, must be writable."""
    if directory is None:
        return
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise DataError(f"{option} {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"{option} {path} is not writable")
