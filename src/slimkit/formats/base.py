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

from slimkit.models.layouts import StoredLinear

_FORMATS: dict[str, type["PackedLinear"]] = {}

# Rows (tokens) up to which a weight-only int8/int4 kernel (bf16 activations) runs when no
# measurement says otherwise; beyond, dequantize (tile by tile) + fp32 GEMM. `kernel_rows.py`
# measures the crossover per shape on the machine and sets each layer's own limit.
KERNEL_MAX_ROWS = 1 << 16
DEQUANTIZE_TILE_ELEMENTS = 1 << 21  # fp32 weights dequantized per GEMM tile: 8 MB, never a full copy


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


class PackedLinear(StoredLinear):
    format: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, meta: dict):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.meta = dict(meta)
        self.kernel_max_rows = KERNEL_MAX_ROWS  # set from this machine's measurement (kernel_rows.py)
        self.gemm_dtype = torch.float32  # of the dequantize + GEMM path: bf16 where it measured faster
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

    # --- formats with a weight-only kernel and a dequantize path, chosen by rows ------------
    def has_row_choice(self) -> bool:
        """Whether this layer runs a kernel for few rows and dequantize + GEMM for many."""
        return False

    def shape_tag(self) -> str:
        """What besides the shape decides the crossover (a sparse layer's density)."""
        return ""

    def kernel_rows(self) -> int:
        """Rows up to which the kernel runs (measured per shape on this machine, kernel_rows.py)."""
        return self.kernel_max_rows

    def kernel_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the dense fp32 weight."""
        return self.dequantize()[start:stop]

    # --- formats whose rows an embedding can gather (a tied embedding reads the head's rows) ---
    gathers_rows: ClassVar[bool] = False

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dense fp32 rows `ids` (1-D) of the weight, without dequantizing the others."""
        raise NotImplementedError

    def dequantize_tile_rows(self) -> int:
        """Rows per dequantized tile: about DEQUANTIZE_TILE_ELEMENTS, whole 64-row tiles."""
        rows = max(64, DEQUANTIZE_TILE_ELEMENTS // max(self.in_features, 1) // 64 * 64)
        return self.out_features if rows >= self.out_features else rows

    def dequantized_matmul(self, x2d: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x2d @ W.T with W dequantized a tile of output rows at a time (a few MB, not a full copy),
        the GEMM in `dtype` (the layer's measured `gemm_dtype` unless given); the result in fp32."""
        dtype = dtype or self.gemm_dtype
        x = x2d if x2d.dtype == dtype else x2d.to(dtype)
        step = self.dequantize_tile_rows()
        if step >= self.out_features:
            return (x @ self.dequantize_rows(0, self.out_features).to(dtype).T).to(x2d.dtype)
        out = x2d.new_empty(x2d.shape[0], self.out_features)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            out[:, start:stop] = x @ self.dequantize_rows(start, stop).to(dtype).T
        return out

    def dequantized_path(self) -> str:
        return f"dequantize (tiles) + {'bf16' if self.gemm_dtype == torch.bfloat16 else 'fp32'} matmul"

    def chosen_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.shape[0] <= self.kernel_rows():
            return self.kernel_matmul(x2d)
        return self.dequantized_matmul(x2d)

    # --- shared ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no reshape or cast when there is nothing to do: at batch 1 each costs about a microsecond,
        # against a few tens for the kernel itself
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if not x2d.is_contiguous():  # the kernels ask for it (Mamba's mixer hands them a transposed view)
            x2d = x2d.contiguous()
        y = self.matmul(x2d if x2d.dtype == torch.float32 else x2d.float())
        if self.bias is not None:
            y = y + self.bias
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

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


def pack_bits(v: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] values 0..2^bits-1 (K % 8 == 0) -> [N, K * bits / 8] uint8: each run of 8 values is
    one little-endian integer of `bits` bytes, value i at bits [bits*i, bits*(i+1))."""
    rows, cols = v.shape
    runs = v.to(torch.int64).view(rows, cols // 8, 8)
    word = (runs << (bits * torch.arange(8))).sum(-1)
    return torch.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], -1).to(torch.uint8).view(rows, -1)


def unpack_bits(p: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_bits`: [N, K * bits / 8] uint8 -> [N, K] uint8."""
    rows = p.shape[0]
    octets = p.to(torch.int64).view(rows, -1, bits)
    word = (octets << (8 * torch.arange(bits))).sum(-1)
    values = (word[..., None] >> (bits * torch.arange(8))) & ((1 << bits) - 1)
    return values.to(torch.uint8).view(rows, -1)


def group_expand(t: torch.Tensor, k: int) -> torch.Tensor:
    """[N, K/g] per-group values -> [N, K]."""
    return t.repeat_interleave(k // t.shape[1], dim=1)
