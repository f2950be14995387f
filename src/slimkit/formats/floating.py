"""Float-coded formats without a CPU kernel: NF4 (QLoRA's 4-bit NormalFloat) and FP8 E4M3.

Both compute as "dequantize + fp32 matmul" on a CPU, and say so: NF4 has no CPU kernel in
torch, and this CPU has no FP8 arithmetic, so FP8 here is *simulated* (stored as real
float8_e4m3fn bytes, computed in fp32).
"""

from __future__ import annotations

import functools

import torch

from slimkit.formats.base import PackedLinear, pack_nibbles, register_format, unpack_nibbles


@functools.lru_cache(maxsize=1)
def nf4_levels() -> torch.Tensor:
    """16 levels from the quantiles of N(0, 1), asymmetric so that 0 is exact, scaled to [-1, 1]."""
    offset = 0.9677083  # QLoRA's choice: the outermost quantile kept finite
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


@register_format
class NF4(PackedLinear):
    """NF4 codes two per byte, one absmax per block of 64 along each row.

    Double quantization stores the block absmaxes as int8 around their mean, with one fp32
    scale per 256 of them: 0.5 + (1 + 4/256)/64 ~ 0.516 bytes per weight (0.5625 without).
    """

    format = "nf4"

    def __init__(self, packed, absmax=None, dq_codes=None, dq_scale=None, dq_offset=None, bias=None, meta=None):
        super().__init__(packed.shape[1] * 2, packed.shape[0], bias, meta or {})
        self.block = int(self.meta.get("block", 64))
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("absmax", absmax)
        self.register_buffer("dq_codes", dq_codes)
        self.register_buffer("dq_scale", dq_scale)
        self.register_buffer("dq_offset", dq_offset)

    @classmethod
    def from_dense(cls, weight, bias=None, block=64, double_quant=True, **_):
        w = weight.detach().float()
        rows, cols = w.shape
        if cols % block:
            from slimkit.errors import ShapeError

            raise ShapeError(f"NF4: input dimension {cols} is not divisible by the block size {block}")
        blocks = w.reshape(rows, cols // block, block)
        absmax = blocks.abs().amax(-1).clamp(min=1e-12)
        normed = (blocks / absmax.unsqueeze(-1)).reshape(rows, cols)
        codes = (normed.unsqueeze(-1) - nf4_levels()).abs().argmin(-1)
        meta = {"block": block, "double_quant": double_quant}
        if not double_quant:
            return cls(pack_nibbles(codes), absmax, bias=bias, meta=meta)
        flat = absmax.reshape(-1)
        offset = flat.mean().reshape(1)
        centered = flat - offset
        pad = (-flat.numel()) % 256
        chunks = torch.nn.functional.pad(centered, (0, pad)).reshape(-1, 256)
        dq_scale = (chunks.abs().amax(1) / 127).clamp(min=1e-12)
        dq_codes = torch.round(chunks / dq_scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[: flat.numel()]
        return cls(pack_nibbles(codes), None, dq_codes.contiguous(), dq_scale, offset, bias, meta)

    def block_absmax(self) -> torch.Tensor:
        if self.absmax is not None:
            return self.absmax
        n = self.dq_codes.numel()
        scale = self.dq_scale.repeat_interleave(256)[:n]
        return (self.dq_codes.float() * scale + self.dq_offset).reshape(self.out_features, -1)

    def stored(self):
        names = ("packed", "absmax", "dq_codes", "dq_scale", "dq_offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @classmethod
    def from_stored(cls, t, meta, bias):
        return cls(t["packed"], t.get("absmax"), t.get("dq_codes"), t.get("dq_scale"), t.get("dq_offset"), bias, meta)

    def dequantize(self):
        values = nf4_levels()[unpack_nibbles(self.packed).long()]
        scale = self.block_absmax().repeat_interleave(self.block, dim=1)
        return values * scale

    def path_for(self, m):
        return "dequantize + fp32 matmul (no NF4 kernel on CPU)"


@register_format
class FP8E4M3(PackedLinear):
    """float8_e4m3fn weights (max 448) with an fp32 scale per tensor or per output channel."""

    format = "fp8"
    MAX = 448.0

    def __init__(self, w8, scale, bias=None, meta=None):
        super().__init__(w8.shape[1], w8.shape[0], bias, meta or {})
        self.register_buffer("w8", w8.contiguous())
        self.register_buffer("scale", scale.float().contiguous())

    @classmethod
    def from_dense(cls, weight, bias=None, per_channel=True, **_):
        w = weight.detach().float()
        amax = w.abs().amax(1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)
        scale = (amax / cls.MAX).clamp(min=1e-12)
        w8 = (w / scale).clamp(-cls.MAX, cls.MAX).to(torch.float8_e4m3fn)
        return cls(w8, scale, bias, {"per_channel": per_channel})

    def stored(self):
        return {"w8": self.w8, "scale": self.scale}

    @classmethod
    def from_stored(cls, t, meta, bias):
        return cls(t["w8"], t["scale"], bias, meta)

    def dequantize(self):
        return self.w8.float() * self.scale

    def path_for(self, m):
        return "simulated: dequantize + fp32 matmul (no FP8 arithmetic on this CPU)"
