"""The base of every recipe step config: which tensors a step touches."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StepConfig(BaseModel):
    """A frozen, validated step config. Subclasses add a `method` literal and their knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    include_lm_head: bool = Field(False, description="also compress the output projection")
    include_embeddings: bool = Field(False, description="also compress the token embeddings")
    ignore: tuple[str, ...] = Field((), description="fnmatch patterns of module names to leave alone")

    def summary(self) -> str:
        return getattr(self, "method", type(self).__name__)
