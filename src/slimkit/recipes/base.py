"""The base of every recipe step config: which tensors a step touches."""

from __future__ import annotations

from typing import ClassVar, Literal

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

    def nm(self) -> tuple[int, int] | None:
        """The N:M pattern this step's masks follow, or None."""
        return None

    def needs_every_block(self) -> str | None:
        """Why this step must see every block before it changes any (so it cannot stream), or None."""
        return None


class BlockTraining(BaseModel):
    """Training a compressed block's continuous parameters so that it reproduces the dense output
    at its depth: Adam, `iters` steps of `batch` windows, learning rate decaying linearly to 0
    (calibration/block_fit.py). Subclasses say what is trained and may change the defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    iters: int = Field(200, ge=1, description="Adam steps per block (each a forward and backward of the block)")
    lr: float = Field(1e-4, gt=0.0, description="first step's learning rate (decays linearly to 0)")
    batch: int = Field(8, ge=1, description="calibration windows per step")
    targets: Literal["compressed-path", "dense-model"] = Field(
        "dense-model", description="the dense block on the compressed path's inputs, or the dense model's own "
        "activations at this depth")
    seed: int = Field(0, ge=0, description="seed of the window draws")
