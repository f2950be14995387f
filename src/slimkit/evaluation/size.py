"""Model size accounting: bytes as stored, per tensor kind (tied tensors counted once)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from torch import nn

from slimkit.models.adapters import ArchitectureAdapter


def bytes_by_kind(model: nn.Module, adapter: ArchitectureAdapter) -> dict[str, int]:
    """In-memory bytes of the model's tensors by kind (embedding, attention, mlp, norm, ...)."""
    seen: set[int] = set()
    sizes: dict[str, int] = defaultdict(int)
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        sizes[adapter.tensor_kind(name)] += tensor.numel() * tensor.element_size()
    return dict(sizes)


def files_bytes(directory: str | Path, pattern: str = "*.safetensors") -> int:
    """Bytes on disk of the weight files in a model directory."""
    return sum(p.stat().st_size for p in Path(directory).glob(pattern))


def packed_bytes(record) -> int:
    """Bytes one compressed tensor takes in its packed format, by the format's arithmetic.

    Quantized: codes + scales (+ zero points). Pruned only: the smaller of dense and a bitmask
    plus the kept values. Otherwise dense.
    """
    from slimkit.quantization.rtn import bytes_per_weight

    numel = math.prod(record.shape)
    dense = numel * record.element_size
    if record.quant is not None:
        return round(numel * bytes_per_weight(record.quant.spec, record.shape[-1]))
    if record.mask is not None:
        kept = int(record.mask.sum())
        return min(dense, -(-numel // 8) + kept * record.element_size)
    return dense
