"""Tensors that share storage (tied weights) written once, and tensor files written atomically."""

from __future__ import annotations

import os
from pathlib import Path
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


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file that is either complete or absent: written beside `path`, synced, renamed.
    A failed write (full disk, Ctrl-C) removes its temp file."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
