"""DistilBERT-style student initialisation: a shallower copy made of the teacher's own blocks."""

from __future__ import annotations

from torch import nn

from slimkit.models.adapters import adapter_for
from slimkit.pruning.structured.surgery import StructuredPlan, apply_plan


def student_from_teacher(teacher: nn.Module, keep_layers: list[int] | None = None, every: int = 2) -> nn.Module:
    """A student with the teacher's blocks `keep_layers` (default: every `every`-th, starting at 0,
    as DistilBERT takes one block of each pair), embeddings and heads; the teacher is unchanged."""
    adapter = adapter_for(teacher)
    n = len(adapter.get_blocks(teacher))
    keep = sorted(set(keep_layers if keep_layers is not None else range(0, n, every)))
    return apply_plan(teacher, adapter, StructuredPlan(drop_layers=tuple(i for i in range(n) if i not in keep)))
