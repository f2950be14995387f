"""Typed configs for pruning recipe steps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from slimkit.pruning.magnitude import parse_nm
from slimkit.recipes.base import StepConfig


class MagnitudePruneConfig(StepConfig):
    """Remove the smallest-magnitude weights: a sparsity level, or an N:M pattern."""

    method: Literal["magnitude_prune"] = "magnitude_prune"
    sparsity: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of weights removed")
    pattern: str | None = Field(None, description="N:M pattern such as '2:4' (N kept in every M)")
    scope: Literal["layer", "global"] = Field("layer", description="one threshold per layer, or one for all")

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                parse_nm(pattern)
            except Exception as exc:  # ShapeError -> a pydantic error on this field
                raise ValueError(str(exc)) from None
        return pattern

    @model_validator(mode="after")
    def _one_target(self):
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of 'sparsity' or 'pattern'")
        if self.pattern is not None:
            if self.scope != "layer":
                raise ValueError("an N:M pattern is per group of M weights; scope must be 'layer'")
        return self

    def summary(self) -> str:
        what = self.pattern if self.pattern else f"{self.sparsity:.0%}"
        return f"magnitude {what}" + (" global" if self.scope == "global" else "")
