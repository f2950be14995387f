"""Typed configs for pruning recipe steps."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimkit.numerics.magnitude import parse_nm
from slimkit.quantization.config import QuantFields
from slimkit.recipes.base import BlockTraining, StepConfig


class SparsityFields(StepConfig):
    """A sparsity level, or an N:M pattern (N kept in every M consecutive inputs)."""

    sparsity: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of weights removed")
    pattern: str | None = Field(None, description="N:M pattern such as '2:4' (N kept in every M)")

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
        return self

    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern) if self.pattern else None

    def target_text(self) -> str:
        return self.pattern if self.pattern else f"{self.sparsity:.0%}"


class MagnitudePruneConfig(SparsityFields):
    """Remove the smallest-magnitude weights: a sparsity level, or an N:M pattern."""

    method: Literal["magnitude_prune"] = "magnitude_prune"
    scope: Literal["layer", "global"] = Field("layer", description="one threshold per layer, or one for all")

    @model_validator(mode="after")
    def _scope(self):
        if self.pattern is not None and self.scope != "layer":
            raise ValueError("an N:M pattern is per group of M weights; scope must be 'layer'")
        return self

    def summary(self) -> str:
        return f"magnitude {self.target_text()}" + (" global" if self.scope == "global" else "")

    def needs_every_block(self) -> str | None:
        return "with scope global needs every weight at once; use scope: layer" if self.scope == "global" else None


class OutlierWeighting(BaseModel):
    """OWL: per-block sparsity from the block's share of outlier Wanda scores, average kept exact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(5.0, gt=1.0, description="a score is an outlier above threshold x the block's mean")
    shift: float = Field(0.08, gt=0.0, lt=0.5, description="largest change of a block's sparsity (OWL's lambda)")


class BlockReconstruction(BlockTraining):
    """After a block is pruned, train its kept weights (mask fixed) so that it reproduces the dense
    block's output: Adam, `iters` steps of `batch` windows, learning rate decaying to 0."""


class OutlierFields(SparsityFields):
    """Calibrated pruning that may spread its sparsity over the blocks by their outliers (OWL), and
    may then train each pruned block's kept weights to the dense block's output (`reconstruct`)."""

    outlier_weighted: OutlierWeighting | None = Field(
        None, description="OWL: blocks with more outliers pruned less, the same average (unstructured only)")
    reconstruct: BlockReconstruction | None = Field(
        None, description="train each pruned block's kept weights to the dense block's output (EBFT-like)")

    @model_validator(mode="after")
    def _owl_unstructured(self):
        if self.outlier_weighted is not None and self.pattern is not None:
            raise ValueError("outlier_weighted sets a sparsity per block; an N:M pattern has one fixed density")
        return self

    def needs_every_block(self) -> str | None:
        return "with outlier_weighted measures every block before pruning any" if self.outlier_weighted else None

    def one_process_only(self) -> str | None:
        if self.reconstruct is None:
            return None
        return (f"{self.method} with reconstruct runs in one process: its steps follow one gradient "
                "through the block; run it without torchrun")

    def target_text(self) -> str:
        return (super().target_text() + (" OWL" if self.outlier_weighted else "")
                + (f" +reconstruct {self.reconstruct.iters}" if self.reconstruct else ""))


class WandaConfig(OutlierFields):
    """Wanda: prune by |W| x input-activation norm, per output row. Needs calibration data.
    With `swaps`, the mask is then refined (DSnoT-like): pruned and kept weights of a row trade
    places while the row's reconstruction error on the calibration inputs drops."""

    method: Literal["wanda"] = "wanda"
    needs_calibration: ClassVar[bool] = True
    swaps: int = Field(0, ge=0, description="mask refinement: at most this many swaps per row (0 = off)")

    def summary(self) -> str:
        return f"Wanda {self.target_text()}" + (f" +swaps {self.swaps}" if self.swaps else "")


class SparseGPTConfig(OutlierFields):
    """SparseGPT: one-shot OBS pruning with weight updates; optionally quantizes kept weights."""

    method: Literal["sparsegpt"] = "sparsegpt"
    needs_calibration: ClassVar[bool] = True
    blocksize: int = Field(128, gt=0, description="columns per lazy-update block (a multiple of M)")
    percdamp: float = Field(0.01, gt=0.0, description="damping, as a fraction of mean(diag H)")
    quantize: QuantFields | None = Field(None, description="also quantize the kept weights (joint mode)")

    @model_validator(mode="after")
    def _block_multiple(self):
        nm = self.nm()
        if nm and self.blocksize % nm[1]:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M={nm[1]}")
        if self.quantize is not None and self.reconstruct is not None:
            raise ValueError("reconstruct trains the kept weights in floating point, which would move them off the "
                             "joint mode's quantization grid: quantize in a later step (gptq keeps the mask)")
        return self

    def summary(self) -> str:
        joint = f" + {self.quantize.describe()}" if self.quantize else ""
        return f"SparseGPT {self.target_text()}{joint}"
