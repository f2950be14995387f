"""The base of every recipe step config: which tensors a step touches."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class StepConfig(BaseModel):
    """A frozen, validated step config. Subclasses add a `method` literal and their knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # What a step needs from the run, checked once before any step runs (recipes/apply.py)
    needs_calibration: ClassVar[bool] = False  # calibration windows (so a tokenizer)
    needs_teacher: ClassVar[bool] = False  # a copy of the model before the recipe, and training text
    changes_shapes: ClassVar[bool] = False  # builds a smaller model: must come before masks and codes
    rewrites_weights: ClassVar[bool] = False  # rewrites every weight (a rotation): must come before masks and codes
    quantizes_outer: ClassVar[bool] = False  # also rewrites the embedding / head on its own (gguf_quantize)

    include_lm_head: bool = Field(False, description="also compress the output projection")
    include_embeddings: bool = Field(False, description="also compress the token embeddings")
    ignore: tuple[str, ...] = Field((), description="fnmatch patterns of module names to leave alone")

    def summary(self) -> str:
        return getattr(self, "method", type(self).__name__)

    def one_process_only(self) -> str | None:
        """Why this step cannot be split over torchrun's processes, or None when it can."""
        return None
