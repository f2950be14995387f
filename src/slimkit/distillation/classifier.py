"""Classic classifier distillation on labelled data that ships in packages.

Datasets: scikit-learn's bundled `digits` (8x8, 1,797 images: fast tests) and Fashion-MNIST from
Debian's `dataset-fashion-mnist` (28x28, 60k/10k; `make fashion-mnist` fetches it). A wide MLP
teacher is trained first; students of the same small shape are then trained with and without
knowledge distillation at equal steps. Run `python -m slimkit.distillation.classifier --help`
(it also runs under `torchrun`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.distillation.losses import soft_label_loss
from slimkit.distillation.trainer import EpochSampler, TrainConfig, train
from slimkit.errors import DataError

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def features(self) -> int:
        return self.x_train.shape[1]

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1


def load_digits_dataset(test_fraction: float = 0.25) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn (pip install scikit-learn)") from None
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_test = int(len(x) * test_fraction)
    test, tr = order[:n_test], order[n_test:]
    return Dataset("digits", x[tr], y[tr], x[test], y[test])


def _idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).view(*shape)


def fashion_mnist_dir() -> Path:
    unpacked = ".data/fashion-mnist/usr/share/datasets/fashion-mnist"  # where `make fashion-mnist` puts it
    candidates = [os.environ.get("SLIMKIT_FASHION_MNIST"), *FASHION_DIRS, str(Path.cwd() / unpacked),
                  str(Path(__file__).resolve().parents[3] / unpacked)]
    for c in candidates:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").exists():
            return Path(c)
    raise DataError("Fashion-MNIST not found: run `make fashion-mnist` (Debian package dataset-fashion-mnist) "
                    "or point SLIMKIT_FASHION_MNIST at a directory with its four .gz files")


def load_fashion_mnist() -> Dataset:
    root = fashion_mnist_dir()
    def images(name):
        return _idx(root / name).flatten(1).float() / 255.0
    return Dataset("fashion-mnist", images("train-images-idx3-ubyte.gz"), _idx(root / "train-labels-idx1-ubyte.gz").long(),
                   images("t10k-images-idx3-ubyte.gz"), _idx(root / "t10k-labels-idx1-ubyte.gz").long())


def load_dataset(name: str) -> Dataset:
    if name == "digits":
        return load_digits_dataset()
    if name in ("fashion-mnist", "fashion_mnist"):
        return load_fashion_mnist()
    raise DataError(f"unknown dataset '{name}'; known: digits, fashion-mnist")


def mlp(features: int, hidden: tuple[int, ...], classes: int, dropout: float = 0.0, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


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


def train_student(data: Dataset, teacher: nn.Module | None, run_dir: Path, steps: int, seed: int,
                  alpha: float = 0.1, temperature: float = 4.0, batch_size: int = 64, lr: float = 1e-2,
                  grad_accum: int = 1, checkpoint_every: int | None = None, on_step=None):
    student = mlp(data.features, STUDENT_HIDDEN, data.classes, dropout=0.0, seed=seed)
    config = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=steps // 20,
                         checkpoint_every=checkpoint_every or max(steps // 4, 1), seed=seed, weight_decay=1e-4,
                         eval_every=max(steps // 4, 1))
    task = ClassifierTask(student, data, teacher, alpha, temperature, seed, batch_size)
    return student, train(task, config, run_dir, on_step=on_step)


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
    _, result = train_student(data, teacher, args.run_dir / "student", args.steps, args.seed,
                              batch_size=args.batch_size, grad_accum=args.grad_accum)
    if rank == 0:
        print(json.dumps({"steps": result.steps_done, "final": result.final_eval}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # leave together: a rank that tears gloo down early can abort its peer
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
