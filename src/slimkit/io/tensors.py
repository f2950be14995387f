"""Tensors that share storage (tied weights) written once."""

from __future__ import annotations

from typing import Iterable

import torch


def storage_key(t: torch.Tensor) -> tuple:
    """Two names with the same key are one tensor (the same memory, offset and shape)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def unique_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the first name of each distinct tensor -> tensor, every other name -> that first name)."""
    first: dict[tuple, str] = {}
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in named:
        key = storage_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            kept[name] = t
    return kept, aliases
