"""Structured pruning: remove whole heads, MLP channels, hidden channels and blocks.

The output is a smaller *dense* model of the same transformers class with an updated config,
so its speed-up needs no special kernels. Recover quality with `slimkit.distillation`.
"""

from slimkit.pruning.structured.config import StructuredPruneConfig
from slimkit.pruning.structured.importance import (
    Importance,
    activation_importance,
    block_influence,
    compute_importance,
    magnitude_importance,
    taylor_importance,
)
from slimkit.pruning.structured.prune import StructuredResult, prune_structured, token_batches
from slimkit.pruning.structured.surgery import StructuredPlan, apply_plan, parameter_count

__all__ = [
    "Importance", "StructuredPlan", "StructuredPruneConfig", "StructuredResult", "activation_importance",
    "apply_plan", "block_influence", "compute_importance", "magnitude_importance", "parameter_count",
    "prune_structured", "taylor_importance", "token_batches",
]
