"""Model size accounting: bytes as stored, per tensor kind (tied tensors counted once)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from torch import nn

from slimkit.models.adapters import ArchitectureAdapter


def bytes_by_kind(model: nn.Module, adapter: ArchitectureAdapter, float_size: int | None = None) -> dict[str, int]:
    """Bytes of the model's tensors by kind (embedding, attention, mlp, norm, ...); `float_size`:
    bytes per floating-point element as stored (the checkpoint's dtype), when compute uses another."""
    seen: set[int] = set()
    sizes: dict[str, int] = defaultdict(int)
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        size = float_size if float_size and tensor.is_floating_point() else tensor.element_size()
        sizes[adapter.tensor_kind(name)] += tensor.numel() * size
    return dict(sizes)


def files_bytes(directory: str | Path, pattern: str = "*.safetensors") -> int:
    """Bytes on disk of the weight files in a model directory."""
    return sum(p.stat().st_size for p in Path(directory).glob(pattern))


def packed_bytes(record) -> int:
    """Bytes one compressed tensor takes in its packed format, by the format's arithmetic.

    Quantized: codes + scales (+ zero points); llama.cpp blocks: their bytes. Pruned only: the
    smaller of dense and a bitmask plus the kept values. Otherwise dense.
    """
    from slimkit.numerics.rtn import bytes_per_weight

    numel = math.prod(record.shape)
    dense = numel * record.element_size
    if record.ggml is not None:
        return record.ggml.blocks.numel()
    if record.quant is not None:
        return round(numel * bytes_per_weight(record.quant.spec, record.shape[-1]))
    if record.mask is not None:
        kept = int(record.mask.sum())
        return min(dense, -(-numel // 8) + kept * record.element_size)
    return dense
