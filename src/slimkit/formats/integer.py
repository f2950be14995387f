"""Integer formats: int8 weight-only, int8 W8A8 (dynamic per-token activations), grouped int4.

Kernels (CPU; docs/design.md, "Files on disk", has the layouts): int8 and int4 run slimkit's own
`q8_matmul` / `q4_matmul` (kernels/int_matmul.cpp: activations quantized to int8 per 32 columns,
integer dot products, llama.cpp's Q8_0 / Q4_0 x Q8_0 scheme) where they are built (AVX2 and a
compiler), else torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` (bf16 activations);
up to the row count measured per shape (kernel_rows.py), dequantize + GEMM above it, on other
devices than the CPU, and for layouts no kernel takes. W8A8 runs fbgemm's `quantized::linear_dynamic`, which
quantizes each activation row on the fly.
"""

from __future__ import annotations

import functools
import warnings

import torch

from slimkit.formats.base import (
    PackedLinear,
    group_expand,
    pack_bits,
    pack_nibbles,
    register_format,
    unpack_bits,
    unpack_nibbles,
)

INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# "torch" keeps int8/int4 layers on torch's kernels where slimkit's are built (to compare the two)
INT_KERNELS_ENV = "SLIMKIT_INT_KERNELS"


def slimkit_kernel_takes(in_features: int, multiple: int) -> bool:
    """Whether slimkit's integer kernels are built, not turned off ($SLIMKIT_INT_KERNELS=torch),
    and take rows of this length."""
    import os

    from slimkit.kernels import int_kernels

    if os.environ.get(INT_KERNELS_ENV, "slimkit") == "torch":
        return False
    return in_features % multiple == 0 and int_kernels() is not None


def q4_layout(nibbles: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, K] -> q4_matmul's bytes [N, K/2]: of each 64 columns, byte j holds column j
    (low nibble) and column 32 + j (high nibble)."""
    n, k = nibbles.shape
    halves = nibbles.to(torch.uint8).view(n, k // 64, 2, 32)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def q4_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """q4_layout's inverse."""
    n = codes.shape[0]
    blocks = codes.view(n, -1, 1, 32)
    return torch.cat([blocks & 0x0F, blocks >> 4], 2).view(n, -1)


ROW_SLICE_ELEMENTS = 1 << 22  # rows are independent: coded a slice at a time, temporaries stay a few MB


def int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8: codes in [-128, 127], scale = absmax / 127.5 (rows in slices,
    so a 128k-row head costs its codes, not several float32 copies)."""
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], device=w.device)
    step = max(1, ROW_SLICE_ELEMENTS // max(w.shape[1], 1))
    for a in range(0, w.shape[0], step):
        part = w[a: a + step].float()
        s = (part.abs().amax(1) / 127.5).clamp(min=1e-12)
        q[a: a + step] = torch.round(part / s[:, None]).clamp(-128, 127)
        scale[a: a + step] = s
    return q, scale


@register_format
class Int8WeightOnly(PackedLinear):
    """int8 codes [N, K] + fp32 per-channel scales: 1 + 4/K bytes per weight."""

    format = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias=None, meta=None):
        super().__init__(q.shape[1], q.shape[0], bias, meta or {})
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.slimkit_kernel = slimkit_kernel_takes(self.in_features, 32)  # else torch's, with bf16 scales
        self.register_buffer("scale_bf16", None if self.slimkit_kernel else self.scale.to(torch.bfloat16),
                             persistent=False)

    gathers_rows = True

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q.index_select(0, ids).float() * self.scale.index_select(0, ids)[:, None]

    @classmethod
    def from_dense(cls, weight, bias=None, **_):
        q, scale = int8_codes(weight)
        return cls(q, scale, bias)

    @classmethod
    def from_quant(cls, q, scale, bias=None):
        return cls(q, scale.float().reshape(-1), bias)

    def stored(self):
        return {"q": self.q, "scale": self.scale}

    @classmethod
    def from_stored(cls, t, meta, bias):
        return cls(t["q"], t["scale"], bias, meta)

    def ram_tensors(self):
        return [self.q, self.scale] + ([] if self.scale_bf16 is None else [self.scale_bf16])

    def dequantize(self):
        return self.q.float() * self.scale[:, None]

    def dequantize_rows(self, start, stop):
        return self.q[start:stop].float() * self.scale[start:stop, None]

    def has_row_choice(self):
        return True

    def shape_tag(self):
        from slimkit.kernels import int_kernels_version

        return f" q8 kernel {int_kernels_version()}" if self.slimkit_kernel else ""

    def path_for(self, m):
        if m > self.kernel_rows():
            return self.dequantized_path()
        if self.slimkit_kernel:
            return "slimkit int8 x int8 kernel (activations int8 per 32)"
        return "int8 weight-only kernel (bf16 activations)"

    def kernel_matmul(self, x2d):
        if self.slimkit_kernel and x2d.is_cpu:
            return torch.ops.slimkit.q8_matmul(x2d.float().contiguous(), self.q, self.scale)
        scale = self.scale_bf16 if self.scale_bf16 is not None else self.scale.to(torch.bfloat16)  # a GPU
        return torch.ops.aten._weight_int8pack_mm(x2d.to(torch.bfloat16), self.q, scale).float()

    def matmul(self, x2d):
        return self.chosen_matmul(x2d)


@register_format
class Int8Dynamic(PackedLinear):
    """W8A8: int8 weights per channel, activations quantized per row at run time (fbgemm).

    RAM holds fbgemm's prepacked weight only (about the int8 codes plus a column-offset row);
    the codes are unpacked from it when saving.
    """

    format = "w8a8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias=None, meta=None):
        super().__init__(q.shape[1], q.shape[0], bias, meta or {})
        self.register_buffer("scale", scale.float().contiguous())
        with warnings.catch_warnings():  # quantized tensors are deprecated, fbgemm's kernel is not yet replaced
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q.to(torch.int8).contiguous(), self.scale.double(),
                                                          torch.zeros(self.out_features, dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)

    @property
    def q(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    @classmethod
    def from_dense(cls, weight, bias=None, **_):
        q, scale = int8_codes(weight)
        return cls(q, scale, bias)

    def stored(self):
        return {"q": self.q, "scale": self.scale}

    @classmethod
    def from_stored(cls, t, meta, bias):
        return cls(t["q"], t["scale"], bias, meta)

    def ram_bytes(self) -> int:
        # fbgemm's packed layout: the int8 codes plus one int32 column offset per output row
        return self.out_features * self.in_features + 4 * self.out_features + 4 * self.out_features + self._bias_bytes()

    def dequantize(self):
        return self.q.float() * self.scale[:, None]

    def path_for(self, m):
        return "quantized::linear_dynamic (fbgemm, int8 activations per row)"

    def forward(self, x):
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(), self._packed, True)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


@functools.lru_cache(maxsize=16)
def _kernel_nibble_order(rows: int, cols: int) -> torch.Tensor:
    """Where each nibble of `_convert_weight_to_int4pack_for_cpu`'s output comes from, found by
    converting probe matrices whose nibbles spell each element's index in base 16."""
    ids = torch.arange(rows * cols, dtype=torch.int64).view(rows, cols)
    order = torch.zeros(rows * cols, dtype=torch.int64)
    for digit in range(((rows * cols).bit_length() + 3) // 4):
        probe = ((ids >> (4 * digit)) & 15).to(torch.int32)
        k = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        order |= torch.stack([k & 15, k >> 4], -1).reshape(-1).long() << (4 * digit)
    return order


@functools.lru_cache(maxsize=16)
def _tile_layout_is_k_major(cols: int) -> bool:
    """Whether this torch's int4 CPU layout is [64-row tiles, K, 32 bytes] with row r in the low
    nibble and row r + 32 in the high one (then unpacking is a view and two shifts), checked
    against the probed permutation rather than assumed."""
    r, k = torch.meshgrid(torch.arange(64), torch.arange(cols), indexing="ij")
    expected = torch.stack([r[:32].T * cols + k[:32].T, r[32:].T * cols + k[32:].T], -1)  # [K, 32, 2]
    return torch.equal(_kernel_nibble_order(64, cols), expected.reshape(-1))


def narrow_codes(u: torch.Tensor, bits: int, symmetric: bool, widen: bool = False) -> torch.Tensor:
    """Stored 4-bit values of `bits`-bit codes -> values 0..2^bits-1 (symmetric: q + 8 becomes
    q + 2^(bits-1); asymmetric codes are already in range); `widen` goes back."""
    shift = 0 if not symmetric else 8 - (1 << (bits - 1))
    out = u.to(torch.int16) + (shift if widen else -shift)
    if not widen and out.numel() and (out.min() < 0 or out.max() >= 1 << bits):
        raise ValueError(f"codes outside {bits} bits ({int(out.min())}..{int(out.max())} after the offset): "
                         "they were quantized wider than meta['bits'] says")
    return out.to(torch.uint8)


@register_format
class Int4Grouped(PackedLinear):
    """int4 codes two per byte [N, K/2], scales [N, K/g] (+ int8 zero points if asymmetric).

    Symmetric codes are stored as q + 8 (0..15), the way compressed-tensors offsets them.
    Codes of 2 or 3 bits (meta "bits") are held in RAM in the same container, for the int4
    kernel, and written at their own width (meta "stored_bits"): 8 codes in `bits` bytes
    (`narrow_codes`; symmetric codes offset by 2^(bits-1)), where the rows are a multiple of 8 long.
    """

    format = "int4"

    def __init__(self, packed, scale, zero=None, bias=None, meta=None):
        super().__init__(packed.shape[1] * 2, packed.shape[0], bias, meta or {})
        if scale.dim() != 2 or scale.shape[1] == 0 or self.in_features % scale.shape[1]:
            raise ValueError(f"scale of shape {list(scale.shape)} does not divide {self.in_features} input "
                             "columns into groups")
        self.group = self.in_features // scale.shape[1]
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("zero", zero.to(torch.int8).contiguous() if zero is not None else None)
        self.packed, self._kernel, self._q4 = packed.contiguous(), None, None
        if self._q4_fits():
            # RAM holds q4_matmul's layout (0.5 B/weight + a float16 scale and an int8 zero per group)
            u = unpack_nibbles(self.packed)
            zero = torch.full_like(self.scale, 8, dtype=torch.int8) if self.zero is None else self.zero
            self._q4 = (q4_layout(u), self.scale.to(torch.float16).contiguous(), zero.contiguous())
            self.packed = None
        elif self.group in INT4_KERNEL_GROUPS and self.out_features % 16 == 0:
            # RAM holds the kernel's layout only (0.5 B/weight + bf16 scale and zero per group);
            # the stored nibbles are recovered from it when saving
            u = unpack_nibbles(self.packed).to(torch.int32)
            self._kernel = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
            # the kernel computes (u - 8) * s + z: symmetric z = 0; asymmetric z = (8 - zero) * s
            s = self.scale.float()
            z = torch.zeros_like(s) if self.zero is None else (8 - self.zero.float()) * s
            self._scales_zeros = torch.stack([s.T, z.T], -1).to(torch.bfloat16).contiguous()
            self.packed = None

    def _q4_fits(self) -> bool:
        """Whether slimkit's q4 kernel takes this layer (64-column multiples, a power-of-two
        group of at least 32, scales a float16 holds)."""
        group_ok = self.group >= 32 and self.group & (self.group - 1) == 0
        return (group_ok and slimkit_kernel_takes(self.in_features, 64)
                and bool(torch.isfinite(self.scale.to(torch.float16)).all()))

    def nibbles(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The stored 4-bit values, 0..15, of rows [start, stop) x in (recovered from the kernel
        layout when needed; row bounds on the layout's 64-row tiles when it is tiled)."""
        stop = self.out_features if stop is None else stop
        if self.packed is not None:
            return unpack_nibbles(self.packed[start:stop])
        if self._q4 is not None:
            return q4_nibbles(self._q4[0][start:stop])
        rows, cols = self.out_features, self.in_features
        tile = 64 if rows % 64 == 0 else rows
        if start % tile or stop % tile:
            raise ValueError(f"rows {start}:{stop} do not fall on the kernel layout's {tile}-row tiles")
        kernel = self._kernel.view(rows // tile, -1)[start // tile: stop // tile]
        if tile == 64 and _tile_layout_is_k_major(cols):  # [tiles, K, 32]: row r low nibble, r + 32 high
            k = kernel.view(-1, cols, 32)
            return torch.cat([k & 0x0F, k >> 4], 2).transpose(1, 2).reshape(stop - start, cols)
        # any other layout: a fixed permutation of the nibbles per tile, found by probing
        slots = torch.stack([kernel & 0x0F, kernel >> 4], -1).reshape(-1, tile * cols)
        out = torch.empty_like(slots)
        out[:, _kernel_nibble_order(tile, cols)] = slots
        return out.view(stop - start, cols)

    @classmethod
    def from_quant(cls, q, scale, zero, bias=None, bits=4):
        """q: int8 codes (symmetric: -8..7; asymmetric: 0..15 with zero points)."""
        u = q.to(torch.int16) + (8 if zero is None else 0)
        stored_bits = bits if bits < 4 and q.shape[1] % 8 == 0 else 4  # 8 codes in `bits` bytes
        return cls(pack_nibbles(u), scale, zero, bias, {"bits": bits, "symmetric": zero is None,
                                                        "stored_bits": stored_bits})

    @classmethod
    def from_dense(cls, weight, bias=None, group_size=64, **_):
        from slimkit.numerics.rtn import QuantSpec, compute_qparams, quantize

        spec = QuantSpec(4, True, group_size, torch.bfloat16)
        scale, zero = compute_qparams(weight, spec)
        return cls.from_quant(quantize(weight, scale, zero, spec), scale, zero, bias)

    def stored_bits(self) -> int:
        """The width the codes are written at (meta "stored_bits"; files from before it: 4)."""
        return int(self.meta.get("stored_bits", 4))

    def stored(self):
        bits = self.stored_bits()
        if bits < 4:
            t = {"codes": pack_bits(narrow_codes(self.nibbles(), bits, self.zero is None), bits)}
        else:
            t = {"packed": self.packed if self.packed is not None else pack_nibbles(self.nibbles())}
        t["scale"] = self.scale
        if self.zero is not None:
            t["zero"] = self.zero
        return t

    @classmethod
    def from_stored(cls, t, meta, bias):
        if "codes" in t:  # 2 or 3 bits a code on disk
            bits = int(meta["stored_bits"])
            u = narrow_codes(unpack_bits(t["codes"], bits), bits, "zero" not in t, widen=True)
            return cls(pack_nibbles(u), t["scale"], t.get("zero"), bias, meta)
        return cls(t["packed"], t["scale"], t.get("zero"), bias, meta)

    def ram_tensors(self):
        if self._q4 is not None:
            return list(self._q4)
        if self._kernel is None:
            return [t for t in (self.packed, self.scale, self.zero) if t is not None]
        return [self._kernel, self._scales_zeros]

    def codes(self) -> torch.Tensor:
        u = self.nibbles().float()
        return u - (8.0 if self.zero is None else group_expand(self.zero.float(), self.in_features))

    def dequantize(self):
        return self.dequantize_rows(0, self.out_features)

    def dequantize_rows(self, start, stop):
        u = self.nibbles(start, stop).float().view(stop - start, -1, self.group)
        zero = 8.0 if self.zero is None else self.zero[start:stop].float()[:, :, None]
        return ((u - zero) * self.scale[start:stop].float()[:, :, None]).view(stop - start, self.in_features)

    def has_row_choice(self):
        return self._kernel is not None or self._q4 is not None

    def shape_tag(self):
        from slimkit.kernels import int_kernels_version

        return f" q4 kernel {int_kernels_version()}" if self._q4 is not None else ""

    def path_for(self, m):
        if self._q4 is not None and m <= self.kernel_rows():
            return "slimkit int4 x int8 kernel (activations int8 per 32)"
        if self._kernel is not None and m <= self.kernel_rows():
            return "int4 weight-only kernel (bf16 activations)"
        return self.dequantized_path()

    def _apply(self, fn, recurse=True):  # .to(device) moves the q4 layout too (no buffers: a tuple)
        if self._q4 is not None:
            self._q4 = tuple(fn(t).to(t.dtype) for t in self._q4)
        return super()._apply(fn, recurse)

    def kernel_matmul(self, x2d):
        if self._q4 is not None:
            if not x2d.is_cpu:  # the kernel is the CPU's; elsewhere the layout dequantizes
                return self.dequantized_matmul(x2d)
            return torch.ops.slimkit.q4_matmul(x2d.float().contiguous(), *self._q4, self.group)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2d.to(torch.bfloat16), self._kernel, self.group, self._scales_zeros).float()

    def matmul(self, x2d):
        if not self.has_row_choice():
            return self.dequantized_matmul(x2d)
        return self.chosen_matmul(x2d)
