"""Round-to-nearest weight quantization as pure functions.

Symmetric: q in [-2^(b-1), 2^(b-1)-1] (the full signed range, as compressed-tensors stores it),
scale = absmax / (2^(b-1) - 0.5), no zero point, the stored scale never below the exact one: +absmax
rounds to qmax and -absmax to -qmax (error just under scale/2), so round-to-nearest leaves code qmin
to the methods that move weights (GPTQ's updates, learned offsets); the error stays within scale/2.
Full-range symmetric (`full_range`, llama.cpp's Q4_0 grid and AutoRound's): the same codes, scale =
the signed extreme / 2^(b-1), so the group's largest magnitude lands exactly on qmin = -2^(b-1) and the
scale is negative when that extreme is positive: the step is 2^(b-1) / (2^(b-1) - 0.5) finer (12.5%
at 3 bits), and the side the extreme is on gets the extra level.
Asymmetric: q in [0, 2^b - 1], scale = (max - min) / qmax with min <= 0 <= max, integer zero
point; zero stays exactly representable, so pruned weights stay pruned.
Groups run along the input (last) dimension; group_size None means one group per row
(per channel). Scales are rounded to `scale_dtype`, the dtype they are stored in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.errors import ShapeError


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    symmetric: bool = True
    group_size: int | None = None  # None: per output channel
    scale_dtype: torch.dtype = torch.float16
    full_range: bool = False  # symmetric only: scale = signed extreme / 2^(b-1), may be negative

    def __post_init__(self):
        if self.full_range and not self.symmetric:
            raise ValueError("full_range is a symmetric grid: an asymmetric one already spans [min, max]")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def half_range(self) -> float:
        """absmax / scale for symmetric codes: (qmax - qmin) / 2."""
        return (self.qmax - self.qmin) / 2

    def group_of(self, in_features: int) -> int:
        return self.group_size or in_features


@dataclass
class QuantParams:
    """What packing/export need: integer codes, scales and zero points per group."""

    spec: QuantSpec
    q: torch.Tensor  # int8 codes, same shape as the weight
    scale: torch.Tensor  # [out, in/group] in spec.scale_dtype
    zero: torch.Tensor | None  # [out, in/group] int (asymmetric only)


def _grouped(weight: torch.Tensor, spec: QuantSpec, name: str) -> torch.Tensor:
    if not 2 <= spec.bits <= 8:
        raise ShapeError(f"bits must be in 2..8, got {spec.bits}")
    rows, cols = weight.shape[0], weight.shape[-1]
    group = spec.group_of(cols)
    if cols % group:
        divisors = [g for g in (32, 64, 128, 256) if cols % g == 0]
        raise ShapeError(
            f"{name}: input dimension {cols} is not divisible by group_size {group}"
            + (f"; try group_size {' or '.join(map(str, divisors))}" if divisors else "")
        )
    return weight.detach().float().reshape(rows, cols // group, group)


def check_groups(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> None:
    """Raise a clear ShapeError if the weight's input dimension cannot be split into groups."""
    _grouped(weight[:1], spec, name)


def compute_qparams(
    weight: torch.Tensor, spec: QuantSpec, name: str = "weight", clip: torch.Tensor | None = None,
    clip_low: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) per [row, group]; `clip` [rows, groups] shrinks the range (and only
    its top when `clip_low` shrinks an asymmetric range's bottom on its own)."""
    g = _grouped(weight, spec, name)
    ratio = 1.0 if clip is None else clip.float()
    if spec.full_range:
        return _full_range_scale(g, spec, ratio, ratio if clip_low is None else clip_low.float()), None
    if spec.symmetric:
        scale = g.abs().amax(-1) * ratio / spec.half_range
        zero = None
    else:
        lo = g.amin(-1).clamp(max=0.0) * (ratio if clip_low is None else clip_low.float())
        hi = g.amax(-1).clamp(min=0.0) * ratio
        scale = (hi - lo) / spec.qmax
    exact = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = exact.to(spec.scale_dtype)
    if spec.symmetric:  # never round the stored scale below the exact one: +absmax must not clip
        low = scale.float() < exact
        scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    else:
        zero = torch.round(-lo / scale.float()).clamp(spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero


def signed_extreme(g: torch.Tensor, high, low) -> torch.Tensor:
    """Per group: the larger of max(w) * high and |min(w)| * low, negated when it is max(w)'s, so
    that dividing by it sends that extreme to -1 (the full-range grid; differentiable in high, low)."""
    top = g.amax(-1).clamp(min=0.0) * high
    bottom = -g.amin(-1).clamp(max=0.0) * low
    return torch.where(bottom > top, bottom, -top)


def _full_range_scale(g: torch.Tensor, spec: QuantSpec, high, low) -> torch.Tensor:
    exact = signed_extreme(g, high, low) / -spec.qmin
    exact = torch.where(exact != 0, exact, torch.ones_like(exact))
    return exact.to(spec.scale_dtype)  # fp16 moves the extreme by < 2^-11 of qmin: never to another code


def quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    g = _grouped(weight, spec, "weight")
    s = scale.float().unsqueeze(-1)
    q = torch.round(g / s)
    if zero is not None:
        q = q + zero.unsqueeze(-1)
    return q.clamp(spec.qmin, spec.qmax).to(torch.int8).reshape(weight.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    rows, cols = q.shape[0], q.shape[-1]
    group = spec.group_of(cols)
    g = q.float().reshape(rows, cols // group, group)
    if zero is not None:
        g = g - zero.unsqueeze(-1).float()
    return (g * scale.float().unsqueeze(-1)).reshape(q.shape)


ROW_SLICE_ELEMENTS = 1 << 22  # rows are quantized in slices of about this many weights


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> tuple[torch.Tensor, QuantParams]:
    """Quantize and dequantize: returns the fake-quantized weight (fp32) and its parameters.
    Rows are independent, so they go in slices: the temporaries stay a few MB on any weight."""
    check_groups(weight, spec, name)
    rows = max(1, ROW_SLICE_ELEMENTS // weight.shape[-1])
    w_hat = torch.empty(weight.shape, device=weight.device)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales, zeros = [], []
    for start in range(0, weight.shape[0], rows):
        part = weight[start: start + rows]
        scale, zero = compute_qparams(part, spec, name)
        q[start: start + rows] = quantize(part, scale, zero, spec)
        w_hat[start: start + rows] = dequantize(q[start: start + rows], scale, zero, spec)
        scales.append(scale)
        zeros.append(zero)
    zero = torch.cat(zeros) if zeros[0] is not None else None
    return w_hat, QuantParams(spec, q, torch.cat(scales), zero)


def bytes_per_weight(spec: QuantSpec, in_features: int) -> float:
    """Storage arithmetic of the packed format: codes + scales (+ zero points)."""
    group = spec.group_of(in_features)
    scale_bytes = torch.finfo(spec.scale_dtype).bits / 8
    zero_bytes = 0 if spec.symmetric else spec.bits / 8
    return spec.bits / 8 + (scale_bytes + zero_bytes) / group
