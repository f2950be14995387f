"""The `prune_structured` recipe step: a target shape for heads, MLP, hidden width and depth."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from slimkit.recipes.base import StepConfig


class StructuredPruneConfig(StepConfig):
    """Remove whole heads, MLP channels, hidden channels and/or blocks: a smaller dense model.

    Each target is a fraction removed (`heads`, `mlp`, `hidden`) or an exact size kept
    (`num_heads`, `intermediate_size`, `hidden_size`); depth is a number of blocks (`layers`) or
    their indices (`drop_layers`). Pruned models want recovery: follow with a `distill` step.
    """

    method: Literal["prune_structured"] = "prune_structured"
    changes_shapes: ClassVar[bool] = True

    @property
    def needs_calibration(self) -> bool:  # activation / Taylor importance and Block Influence read data
        return (self.importance != "magnitude" or self.layer_selection == "block_influence"
                or self.experts is not None or self.num_experts is not None)
    importance: Literal["activation", "magnitude", "taylor"] = Field(
        "activation", description="how heads/channels are ranked (activation = Minitron)")
    heads: float | None = Field(None, gt=0, lt=1, description="fraction removed: of the KV groups (kv_groups), or of each group's query heads (per_group)")
    num_heads: int | None = Field(None, ge=1, description="query heads kept per layer")
    head_grouping: Literal["kv_groups", "per_group"] = Field(
        "kv_groups", description="remove whole KV groups, or the same number of query heads per group")
    mlp: float | None = Field(None, gt=0, lt=1, description="fraction of MLP channels removed")
    intermediate_size: int | None = Field(None, ge=1, description="MLP channels kept per layer")
    hidden: float | None = Field(None, gt=0, lt=1, description="fraction of hidden (embedding) channels removed")
    hidden_size: int | None = Field(None, ge=1, description="hidden channels kept")
    experts: float | None = Field(None, gt=0, lt=1, description="MoE: fraction of each block's experts removed, "
                                  "the least routed on the calibration data")
    num_experts: int | None = Field(None, ge=1, description="MoE: experts kept per block")
    layers: int | None = Field(None, ge=1, description="number of blocks removed")
    layer_selection: Literal["block_influence", "evenly_spaced", "last"] = Field(
        "block_influence", description="which blocks `layers` removes")
    drop_layers: tuple[int, ...] | None = Field(None, description="explicit block indices removed")
    calibration_windows: int | None = Field(
        None, ge=1, description="windows used for importance (default: the run's calibration windows)")

    @model_validator(mode="after")
    def _targets(self):
        pairs = (("heads", "num_heads"), ("mlp", "intermediate_size"), ("hidden", "hidden_size"),
                 ("layers", "drop_layers"), ("experts", "num_experts"))
        for a, b in pairs:
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give '{a}' or '{b}', not both")
        if all(getattr(self, a) is None and getattr(self, b) is None for a, b in pairs):
            raise ValueError("give at least one target: heads/num_heads, mlp/intermediate_size, "
                             "hidden/hidden_size, layers/drop_layers, experts/num_experts")
        return self

    def summary(self) -> str:
        parts = []
        if self.heads or self.num_heads:
            parts.append(f"heads -{self.heads:.0%}" if self.heads else f"heads={self.num_heads}")
        if self.mlp or self.intermediate_size:
            parts.append(f"mlp -{self.mlp:.0%}" if self.mlp else f"mlp={self.intermediate_size}")
        if self.hidden or self.hidden_size:
            parts.append(f"hidden -{self.hidden:.0%}" if self.hidden else f"hidden={self.hidden_size}")
        if self.experts or self.num_experts:
            parts.append(f"experts -{self.experts:.0%}" if self.experts else f"experts={self.num_experts}")
        if self.layers or self.drop_layers:
            parts.append(f"-{self.layers} layers ({self.layer_selection})" if self.layers
                         else f"drop layers {list(self.drop_layers)}")
        return f"structured {', '.join(parts)} [{self.importance}]"
