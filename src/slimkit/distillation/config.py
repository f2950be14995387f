"""The `distill` recipe step: recover a compressed model by distilling from the original."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from slimkit.recipes.base import StepConfig
from slimkit.training.trainer import TrainFields


class DistillConfig(StepConfig, TrainFields):
    """Train the compressed model (student) against the model as it was before the recipe (teacher).

    Causal LMs learn the teacher's token distributions on calibration text (or on text the teacher
    writes: data: teacher); encoders learn its sentence embeddings and hidden states. Checkpoints
    go to a run directory named by the hash of everything that defines the run, so an interrupted
    `slimkit compress` resumes where it stopped. The training settings (steps, batch_size, lr,
    ...) are the trainer's own `TrainFields`.
    """

    method: Literal["distill"] = "distill"
    seqlen: int = Field(256, ge=8, description="tokens per training window (causal LMs)")
    windows: int = Field(512, ge=1, description="training windows (or texts, for encoders) in the pool")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the hard-label cross-entropy")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the hidden-state loss (encoders: default 1)")
    data: Literal["corpus", "teacher"] = Field("corpus", description="train on corpus text, or on teacher-written text")
    eval_windows: int = Field(8, ge=1, description="held-out evaluation windows (texts for encoders)")

    needs_teacher: ClassVar[bool] = True  # compress() keeps a copy of the model before the recipe

    def summary(self) -> str:
        return f"distill {self.steps} steps ({self.divergence}{', teacher text' if self.data == 'teacher' else ''})"
