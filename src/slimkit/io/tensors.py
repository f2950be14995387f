"""Tensors that share storage (tied weights) written once, and tensor files written atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class RowSource:
    """A tensor to be written a slice of rows at a time: `read(start, stop)` gives rows
    [start, stop) in `dtype` (a 0-d tensor: read(0, 1) gives it whole)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[int, int], torch.Tensor]


def write_tensors_by_rows(sources: dict[str, RowSource], path: Path, metadata: dict[str, str] | None = None,
                          slice_bytes: int = 1 << 26) -> None:
    """One safetensors file at `path` from `sources`, reading each a slice of rows at a time: the
    process holds one slice, never a whole embedding. The safetensors library writes only whole
    in-memory dicts, so the (simple, documented) layout is written here: header length, JSON
    header, raw little-endian data. Atomic like `save_tensors_atomic`."""
    import json
    import math
    import struct

    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name, src in sources.items():
        size = math.prod(src.shape) * src.dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[src.dtype], "shape": list(src.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            for src in sources.values():
                rows = src.shape[0] if src.shape else 1
                row = math.prod(src.shape[1:]) * src.dtype.itemsize if len(src.shape) > 1 else src.dtype.itemsize
                step = max(1, slice_bytes // max(row, 1)) if len(src.shape) > 1 else max(rows, 1)
                for start in range(0, rows, step):
                    part = src.read(start, min(start + step, rows)).to(src.dtype).contiguous()
                    fh.write(part.reshape(-1).view(torch.uint8).numpy().tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_tensors_sliced(read_rows, tensors: dict[str, tuple[int, ...]], path: Path, dtype: torch.dtype,
                        slice_bytes: int = 1 << 26) -> None:
    """Write `tensors` (name -> shape) into one safetensors file at `path` in `dtype`, reading each
    a slice of rows at a time through `read_rows(name, start, stop)` (`write_tensors_by_rows`)."""
    sources = {name: RowSource(tuple(shape), dtype, lambda a, b, name=name: read_rows(name, a, b))
               for name, shape in tensors.items()}
    write_tensors_by_rows(sources, path, slice_bytes=slice_bytes)
