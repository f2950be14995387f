"""Classic classifier distillation on labelled data that ships in packages.

Datasets: `digits` and Fashion-MNIST (`data/classification.py`). A wide MLP
teacher is trained first; students of the same small shape are then trained with and without
knowledge distillation at equal steps. Run `python -m slimkit.distillation.classifier --help`
(it also runs under `torchrun`).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.data.classification import Dataset, accuracy, load_dataset
from slimkit.distillation.losses import soft_label_loss
from slimkit.training.trainer import EpochSampler, TrainConfig, train


def mlp(features: int, hidden: tuple[int, ...], classes: int, dropout: float = 0.0, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class ClassifierTask:
    """Train `student` on (x, y); with a teacher, the loss is alpha*CE + (1-alpha)*T^2*KL."""

    loss_terms = ("loss", "ce", "kd")
    eval_terms = ("accuracy",)

    def __init__(self, student: nn.Module, data: Dataset, teacher: nn.Module | None = None,
                 alpha: float = 0.5, temperature: float = 4.0, seed: int = 0, batch_size: int = 64):
        self.student, self.teacher, self.data = student, teacher, data
        self.alpha = alpha if teacher is not None else 1.0
        self.temperature, self.seed = temperature, seed
        self.sampler = EpochSampler(len(data.x_train), seed)
        self.accum_batch = batch_size
        if teacher is not None:
            teacher.eval()
            with torch.no_grad():
                self.teacher_logits = teacher(data.x_train)

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def batch(self, step: int, micro: int, size: int, rank: int, world: int) -> torch.Tensor:
        return self.sampler.for_step(step, micro, size, self.accum_batch, rank, world)

    def losses(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.student(self.data.x_train[idx])
        labels = self.data.y_train[idx]
        if self.teacher is None:
            ce = F.cross_entropy(logits, labels)
            return {"loss": ce, "ce": ce.detach(), "kd": ce.new_zeros(())}
        return soft_label_loss(logits, self.teacher_logits[idx], labels, self.temperature, self.alpha)

    def evaluate(self) -> dict[str, float]:
        return {"accuracy": accuracy(self.student, self.data.x_test, self.data.y_test)}

    def describe(self) -> dict:
        return {"task": "classifier", "dataset": self.data.name, "kd": self.teacher is not None,
                "alpha": self.alpha, "temperature": self.temperature, "seed": self.seed,
                "student": repr(self.student)}


TEACHER_HIDDEN = (512, 512)
STUDENT_HIDDEN = (64,)


def train_teacher(data: Dataset, run_dir: Path, steps: int, seed: int = 0, dropout: float = 0.2) -> nn.Module:
    teacher = mlp(data.features, TEACHER_HIDDEN, data.classes, dropout=dropout, seed=seed)
    config = TrainConfig(steps=steps, batch_size=128, lr=1e-3, warmup_steps=steps // 20, eval_every=0,
                         checkpoint_every=max(steps // 4, 1), seed=seed, weight_decay=1e-4)
    train(ClassifierTask(teacher, data, seed=seed, batch_size=128), config, run_dir)
    return teacher


@dataclass(frozen=True)
class StudentTraining:
    """How a small student is trained: steps and seed, the KD mix (alpha*CE + (1-alpha)*T^2*KL), the optimiser."""

    steps: int
    seed: int = 0
    alpha: float = 0.1
    temperature: float = 4.0
    batch_size: int = 64
    lr: float = 1e-2
    grad_accum: int = 1


def train_student(data: Dataset, teacher: nn.Module | None, run_dir: Path, how: StudentTraining):
    student = mlp(data.features, STUDENT_HIDDEN, data.classes, dropout=0.0, seed=how.seed)
    every = max(how.steps // 4, 1)
    config = TrainConfig(steps=how.steps, batch_size=how.batch_size, grad_accum=how.grad_accum, lr=how.lr,
                         warmup_steps=how.steps // 20, checkpoint_every=every, seed=how.seed, weight_decay=1e-4,
                         eval_every=every)
    task = ClassifierTask(student, data, teacher, how.alpha, how.temperature, how.seed, how.batch_size)
    return student, train(task, config, run_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one small classifier student (with or without KD); "
                                     "works under torchrun (gloo).")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--no-kd", action="store_true")
    parser.add_argument("--teacher-dropout", type=float, default=0.0,
                        help="dropout masks depend on how a batch is split over processes; 0 keeps runs "
                             "with different process counts comparable")
    args = parser.parse_args(argv)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        torch.distributed.init_process_group("gloo")  # this demo keeps its tensors on the CPU
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    data = load_dataset(args.dataset)
    teacher = None
    if not args.no_kd:
        teacher = train_teacher(data, args.run_dir / "teacher", args.teacher_steps, seed=args.seed,
                                dropout=args.teacher_dropout)
    how = StudentTraining(args.steps, args.seed, batch_size=args.batch_size, grad_accum=args.grad_accum)
    _, result = train_student(data, teacher, args.run_dir / "student", how)
    if rank == 0:
        print(json.dumps({"steps": result.steps_done, "final": result.final_eval}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # leave together: a rank that tears gloo down early can abort its peer
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
