"""Whether scales can be folded into a producer exactly, checked on a random copy of one block.

AWQ (and any method that moves scales between ops) divides the producer's output channels by s and
multiplies the consumers' input channels by s. That keeps the function only for some producers: a
plain norm, v_proj before attention, up_proj before a gated product; not Gemma's `(1 + w)` norm, a
norm placed after the projection, or gate_proj before its activation. Rather than a list of rules per
architecture, `FoldCheck` folds random scales into a float64 copy of the block and compares outputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

RELATIVE_TOLERANCE = 1e-6


def is_projection(module: nn.Module) -> bool:
    """A weight-bearing projection: nn.Linear or transformers' Conv1D (weight stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def out_width(module: nn.Module) -> int:
    """A projection's number of outputs (Conv1D stores its weight as [in, out])."""
    return module.weight.shape[1] if type(module).__name__ == "Conv1D" else module.weight.shape[0]


def scale_producer(module: nn.Module, scales: torch.Tensor) -> None:
    """Divide the module's output channels by s (norms: weight and bias; projections: rows)."""
    weight = module.weight.data
    scales = scales.to(weight.dtype)
    if type(module).__name__ == "Conv1D":
        weight.div_(scales.unsqueeze(0))
    elif weight.dim() == 2:
        weight.div_(scales.unsqueeze(1))
    else:
        weight.div_(scales)
    if getattr(module, "bias", None) is not None:
        module.bias.data.div_(scales.to(module.bias.dtype))


def scale_consumer(module: nn.Module, scales: torch.Tensor) -> None:
    """Multiply the projection's input channels by s."""
    scales = scales.to(module.weight.dtype)
    if type(module).__name__ == "Conv1D":
        module.weight.data.mul_(scales.unsqueeze(1))
    else:
        module.weight.data.mul_(scales.unsqueeze(0))


def _as_float64(value):
    """The block's call arguments on the CPU, floating tensors in float64."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64 if value.is_floating_point() else value.dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_as_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_float64(v) for k, v in value.items()}
    return value


def _first_tensor(output) -> torch.Tensor:
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


class FoldCheck:
    """A random float64 copy of one block and its call, to test folds on."""

    def __init__(self, block: nn.Module, args: tuple, kwargs: dict, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.block = copy.deepcopy(block).to("cpu", torch.float64).eval()
        for p in self.block.parameters():  # random weights: a real block's values could hide a bad fold
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.data.copy_(noise * p.shape[-1] ** -0.5 if p.dim() > 1 else 1 + 0.3 * noise)
        self.args, self.kwargs = _as_float64(args), _as_float64(kwargs)
        self.generator = generator
        self.state = {k: v.clone() for k, v in self.block.state_dict().items()}
        try:
            self.reference: torch.Tensor | None = self._output()
        except RuntimeError:  # a block that cannot run in float64 (XGLM's mask fill): no fold is checked,
            self.reference = None  # so none is assumed

    def _output(self) -> torch.Tensor:
        with torch.no_grad():
            return _first_tensor(self.block(*self.args, **self.kwargs)).clone()

    def keeps_function(self, producer: str, consumers: list[str]) -> bool:
        """Fold random scales from `producer` into `consumers`: is the block's output unchanged?"""
        if self.reference is None:
            return False
        p = self.block.get_submodule(producer)
        width = out_width(p) if is_projection(p) else p.weight.numel()
        scales = torch.rand(width, generator=self.generator, dtype=torch.float64) * 1.5 + 0.5
        try:
            with torch.no_grad():
                scale_producer(p, scales)
                for c in consumers:
                    scale_consumer(self.block.get_submodule(c), scales)
            out = self._output()
        finally:
            self.block.load_state_dict(self.state)
        error = (out - self.reference).norm() / self.reference.norm().clamp_min(1e-30)
        return bool(torch.isfinite(error)) and float(error) < RELATIVE_TOLERANCE
