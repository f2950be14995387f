"""Labelled classification data that ships in packages, and accuracy on it.

scikit-learn's bundled `digits` (8x8, 1,797 images: fast tests) and Fashion-MNIST from Debian's
`dataset-fashion-mnist` (28x28, 60k/10k; `make fashion-mnist` fetches it). Used by classifier
distillation and by lottery tickets.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())
