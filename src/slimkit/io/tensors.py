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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def copy_tensors_sliced(read_rows, tensors: dict[str, tuple[int, ...]], path: Path, dtype: torch.dtype,
                        slice_bytes: int = 1 << 26) -> None:
    """Write `tensors` (name -> shape) into one safetensors file at `path` in `dtype`, reading each
    a slice of rows at a time through `read_rows(name, start, stop)`: the process holds one slice,
    never a whole embedding. The safetensors library writes only whole in-memory dicts, so the
    (simple, documented) layout is written here: header length, JSON header, raw little-endian data.
    Atomic like `save_tensors_atomic`."""
    import json
    import math
    import struct

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            for name, shape in tensors.items():
                row = math.prod(shape[1:]) * dtype.itemsize if len(shape) > 1 else dtype.itemsize
                step = max(1, slice_bytes // max(row, 1)) if len(shape) > 1 else max(shape[0], 1)
                for start in range(0, shape[0] if shape else 1, step):
                    part = read_rows(name, start, min(start + step, shape[0])).to(dtype).contiguous()
                    fh.write(part.view(torch.uint8).numpy().tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
