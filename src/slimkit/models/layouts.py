"""Every weight as an `nn.Linear` while slimkit works, and back to the checkpoint's layout to save.

Two layouts in transformers hold projections that are not `nn.Linear`:
- MoE experts as 3-D parameters (`experts.py` splits them into one linear per expert projection);
- GPT-2-style `Conv1D` (weight stored transposed, [in, out]), swapped here for a `TransposedLinear`:
  an `nn.Linear` with the transposed weight, marked so that saving restores the `Conv1D`.
Loading calls `as_linears`; every Hugging Face save runs inside `checkpoint_layout`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from slimkit.errors import PackedWeightReadError
from slimkit.models.experts import fused_experts, unfuse_experts


class StoredLinear(nn.Module):
    """A linear layer whose weight is held in another form (each packed format subclasses it):
    architecture discovery cannot trace into one, so it runs on the plain class instead."""

    def __getattr__(self, name: str):
        if name == "weight":  # models read `lm_head.weight.dtype` (Mamba): shape, dtype and device only
            return PackedWeightView(self)
        return super().__getattr__(name)


class PackedWeightView:
    """What a packed layer shows as its `.weight`: the dense weight's shape, the dtype it computes in and
    its device. Anything else (RWKV rescales its layers' weights in place) is refused by name."""

    def __init__(self, layer: nn.Module, shape: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32,
                 holder: nn.Module | None = None):
        self._layer = layer
        self.shape = torch.Size(shape or (layer.out_features, layer.in_features))
        self.dtype = dtype
        self.device = next(iter((holder or layer).buffers()), torch.empty(0)).device

    def dim(self) -> int:
        return 2

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getattr__(self, name: str):
        raise PackedWeightReadError(
            f"code outside slimkit used the dense weight of a packed {type(self._layer).__name__} layer "
            f"(`.weight.{name}`; the model's own code works on `.weight` directly, as RWKV's layer rescaling "
            "does): a packed model of this architecture cannot run; evaluate the compressed model, or export it")


def stored_linears(model: nn.Module) -> dict[str, StoredLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, StoredLinear)}


class TransposedLinear(nn.Linear):
    """An `nn.Linear` that was a transformers `Conv1D` in the checkpoint."""


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def _as_linear(conv: nn.Module) -> TransposedLinear:
    inputs, outputs = conv.weight.shape
    linear = TransposedLinear(inputs, outputs, bias=conv.bias is not None, device=conv.weight.device,
                              dtype=conv.weight.dtype)
    linear.weight = nn.Parameter(conv.weight.detach().T.contiguous(), requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


@torch.no_grad()
def conv1d_as_linears(model: nn.Module) -> int:
    names = [n for n, m in model.named_modules() if is_conv1d(m)]
    for name in names:
        model.set_submodule(name, _as_linear(model.get_submodule(name)))
    return len(names)


def as_linears(model: nn.Module) -> nn.Module:
    """Split stacked MoE experts and swap Conv1D projections, in place; returns `model`."""
    unfuse_experts(model)
    conv1d_as_linears(model)
    return model


def transposed_in_checkpoint(module: nn.Module) -> set[str]:
    """Names (relative to `module`) of the weights its checkpoint stores transposed: the Conv1D ones."""
    return {f"{n}.weight" if n else "weight" for n, m in module.named_modules() if isinstance(m, TransposedLinear)}


def to_checkpoint(tensors: dict[str, torch.Tensor], transposed: set[str]) -> dict[str, torch.Tensor]:
    """`tensors` as the checkpoint stores them (also its inverse: a transpose is its own)."""
    return {n: t.T.contiguous() if n in transposed else t for n, t in tensors.items()}


@contextmanager
def _conv1d_restored(model: nn.Module) -> Iterator[None]:
    from transformers.pytorch_utils import Conv1D

    swapped = {n: m for n, m in model.named_modules() if isinstance(m, TransposedLinear)}
    for name, linear in swapped.items():
        with torch.device("meta"):  # no random init only to be replaced
            conv = Conv1D(linear.out_features, linear.in_features)
        conv.weight = nn.Parameter(linear.weight.detach().T.contiguous(), requires_grad=False)
        if linear.bias is not None:
            conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        model.set_submodule(name, conv)
    try:
        yield
    finally:
        for name, linear in swapped.items():
            model.set_submodule(name, linear)


@contextmanager
def checkpoint_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` holds transformers' own modules (3-D experts, Conv1D), so that
    `save_pretrained` writes the layout transformers reads."""
    with fused_experts(model), _conv1d_restored(model):
        yield model


def checkpoint_conv1d(model: nn.Module) -> list[str]:
    """The modules this model's checkpoints store as Conv1D (from a skeleton of its class on `meta`:
    a packed model no longer holds them)."""
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    return [n for n, m in skeleton.named_modules() if is_conv1d(m)]
