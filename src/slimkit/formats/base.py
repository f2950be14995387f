"""The packed-linear interface every format implements, and bit-packing helpers.

A packed linear replaces `nn.Linear`: it holds the format's tensors (what goes to disk),
builds its kernel's layout when loaded (what sits in RAM), and picks a compute path per batch
size. `path_for(m)` names the path so that reports say what actually ran, including the
honest fallback "dequantize + fp32 matmul" where no faster kernel exists on this device.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

_FORMATS: dict[str, type["PackedLinear"]] = {}

# Rows (tokens) up to which the weight-only int8/int4 kernels (bf16 activations) run; beyond,
# dequantize + fp32 GEMM. Measured on SmolLM2's shapes (1536x576, 576x1536, 2 threads): the
# kernels beat dense fp32 at M = 1, 8, 32 and 128 (1.9x, 1.8x, 1.4x, 1.0-1.4x) while
# dequantizing per call costs 3-50x, so the kernels run for any batch a CPU sees.
KERNEL_MAX_ROWS = 1 << 16


def register_format(cls: type["PackedLinear"]) -> type["PackedLinear"]:
    _FORMATS[cls.format] = cls
    return cls


def format_class(name: str) -> type["PackedLinear"]:
    if name not in _FORMATS:
        from slimkit.errors import SlimkitError

        raise SlimkitError(f"unknown packed format '{name}'; known: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def format_names() -> list[str]:
    return sorted(_FORMATS)


class PackedLinear(nn.Module):
    format: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, meta: dict):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.meta = dict(meta)
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None

    # --- what subclasses provide -------------------------------------------------------
    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors written to disk (names relative to the module)."""
        raise NotImplementedError

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], meta: dict, bias: torch.Tensor | None) -> "PackedLinear":
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 weight this format represents."""
        raise NotImplementedError

    def ram_tensors(self) -> list[torch.Tensor]:
        """The tensors held for compute (the kernel's layout), for RAM accounting."""
        return list(self.stored().values())

    def path_for(self, m: int) -> str:
        return "dequantize + fp32 matmul"

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return x2d @ self.dequantize().T

    # --- shared ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).float())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def disk_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored().values()) + self._bias_bytes()

    def ram_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.ram_tensors()) + self._bias_bytes()

    def _bias_bytes(self) -> int:
        return self.bias.numel() * 4 if self.bias is not None else 0

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.format}, m=1: {self.path_for(1)}"


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] uint8: column 2j in the low nibble, 2j+1 in the high."""
    u = u.to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    out = torch.empty(p.shape[0], p.shape[1] * 2, dtype=torch.uint8)
    out[:, 0::2] = p & 0x0F
    out[:, 1::2] = p >> 4
    return out


def pack_2bit(v: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..3 (K % 4 == 0) -> [N, K/4] uint8, element i at bits 2*(i % 4)."""
    v = v.to(torch.uint8)
    return v[:, 0::4] | (v[:, 1::4] << 2) | (v[:, 2::4] << 4) | (v[:, 3::4] << 6)


def unpack_2bit(p: torch.Tensor) -> torch.Tensor:
    out = torch.empty(p.shape[0], p.shape[1] * 4, dtype=torch.uint8)
    for k in range(4):
        out[:, k::4] = (p >> (2 * k)) & 0x03
    return out


def group_expand(t: torch.Tensor, k: int) -> torch.Tensor:
    """[N, K/g] per-group values -> [N, K]."""
    return t.repeat_interleave(k // t.shape[1], dim=1)
