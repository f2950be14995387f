"""llama.cpp's blocks (GGML types) as a packed format: codes on a grid -> the bytes llama.cpp reads
(block layouts of ggml-common.h), and a packed linear that holds those bytes.

The `gguf` package dequantizes every type but quantizes none of the K-quants, and its Q4_0..Q8_0
quantizers pick their own scales; slimkit's codes were chosen by a solver on a fitted grid, so
they are packed here, as they are. tests/test_ggml_grids.py checks every layout by dequantizing
with `gguf.quants.dequantize` and comparing with `grid_values` bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from slimkit.formats.base import PackedLinear, register_format
from slimkit.numerics.ggml_grids import QK_K, BlockGrid, GGMLCodes, ggml_type


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """[..., n] fp32 values that are exact in fp16 -> [..., n, 2] little-endian bytes."""
    return x.numpy().astype(np.float16)[..., None].view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] codes -> 16 bytes: low nibbles hold elements 0-15, high nibbles 16-31."""
    return (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)


def _high_bits32(q: np.ndarray) -> np.ndarray:
    """[..., 32] 5-bit codes -> 4 bytes: bit j of the little-endian uint32 is bit 4 of element j."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _legacy(q: np.ndarray, grid: BlockGrid) -> np.ndarray:
    rows = q.shape[0]
    blocks = q.reshape(rows, -1, 32)
    name = grid.qtype.name
    parts = [_f16_bytes(grid.parts["d"]).reshape(rows, -1, 2)]
    if name in ("Q4_1", "Q5_1"):
        parts.append(_f16_bytes(grid.parts["m"]).reshape(rows, -1, 2))
    if name == "Q8_0":
        parts.append((blocks.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if name in ("Q5_0", "Q5_1"):
            parts.append(_high_bits32(blocks))
        parts.append(_nibbles(blocks))
    return np.concatenate(parts, axis=-1)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins [..., 8] -> ggml's 12 packed bytes (get_scale_min_k4)."""
    low = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    mid = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    high = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return np.concatenate([low, mid, high], axis=-1)


def _k_affine(q: np.ndarray, grid: BlockGrid) -> np.ndarray:
    rows = q.shape[0]
    sub = q.reshape(rows, -1, 8, 32)  # super-blocks of 8 sub-blocks
    sc = grid.parts["sc"].numpy().astype(np.uint8).reshape(rows, -1, 8)
    mn = grid.parts["mn"].numpy().astype(np.uint8).reshape(rows, -1, 8)
    pairs = sub.reshape(rows, -1, 4, 2, 32)  # 32 bytes hold sub-blocks 2i (low) and 2i+1 (high)
    qs = ((pairs[:, :, :, 0] & 15) | ((pairs[:, :, :, 1] & 15) << 4)).reshape(rows, -1, 128)
    parts = [_f16_bytes(grid.parts["d"]), _f16_bytes(grid.parts["dmin"]), _k_scales(sc, mn)]
    if grid.qtype.name == "Q5_K":  # byte l, bit j: bit 4 of element l of sub-block j
        bits = ((sub >> 4) & 1).transpose(0, 1, 3, 2)  # [rows, nsb, 32, 8]
        parts.append(np.packbits(bits, axis=-1, bitorder="little").reshape(rows, -1, 32))
    parts.append(qs)
    return np.concatenate(parts, axis=-1)


def _q6_k(q: np.ndarray, grid: BlockGrid) -> np.ndarray:
    rows = q.shape[0]
    halves = q.reshape(rows, -1, 2, 128)  # each super-block: two halves of 128
    ql = ((halves[..., :64] & 15) | ((halves[..., 64:] & 15) << 4)).reshape(rows, -1, 128)
    quarters = (halves >> 4).reshape(rows, -1, 2, 4, 32) & 3  # element 32s + l of a half -> bits 2s of byte l
    qh = (quarters[:, :, :, 0] | (quarters[:, :, :, 1] << 2) | (quarters[:, :, :, 2] << 4)
          | (quarters[:, :, :, 3] << 6)).reshape(rows, -1, 64)
    scales = grid.parts["sc"].numpy().astype(np.int8).reshape(rows, -1, 16).view(np.uint8)
    return np.concatenate([ql, qh, scales, _f16_bytes(grid.parts["d"])], axis=-1)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """[rows, nsb, 256] codes -> 64 bytes a super-block of their low 2 bits: element 128h + 32j + l
    sits in byte 32h + l at bits 2j (Q2_K's and Q3_K's qs)."""
    rows = q.shape[0]
    quarters = (q.reshape(rows, -1, 2, 4, 32) & 3).astype(np.uint8)
    return (quarters[:, :, :, 0] | (quarters[:, :, :, 1] << 2) | (quarters[:, :, :, 2] << 4)
            | (quarters[:, :, :, 3] << 6)).reshape(rows, -1, 64)


def _q2_k(q: np.ndarray, grid: BlockGrid) -> np.ndarray:
    rows = q.shape[0]
    sc = grid.parts["sc"].numpy().astype(np.uint8).reshape(rows, -1, 16)
    mn = grid.parts["mn"].numpy().astype(np.uint8).reshape(rows, -1, 16)
    return np.concatenate([sc | (mn << 4), _crumbs(q.reshape(rows, -1, QK_K)), _f16_bytes(grid.parts["d"]),
                           _f16_bytes(grid.parts["dmin"])], axis=-1)


def _six_bit_scales(ints: np.ndarray) -> np.ndarray:
    """16 signed scales [..., 16] in [-32, 31] -> Q3_K's 12 bytes: low nibbles of s = level + 32 in
    bytes 0-7 (scale i low, i + 8 high), their top 2 bits in bytes 8-11 (scale 4k + b: byte b, bits 2k)."""
    u = (ints.astype(np.int16) + 32).astype(np.uint8)
    low = (u[..., :8] & 15) | ((u[..., 8:] & 15) << 4)
    top = (u >> 4).reshape(*u.shape[:-1], 4, 4)  # [k, b]
    high = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
    return np.concatenate([low, high], axis=-1)


def _q3_k(q: np.ndarray, grid: BlockGrid) -> np.ndarray:
    rows = q.shape[0]
    sub = q.reshape(rows, -1, 8, 32)  # element 32j + l: its bit 2 is bit j of hmask byte l
    hmask = np.packbits(((sub >> 2) & 1).transpose(0, 1, 3, 2), axis=-1, bitorder="little").reshape(rows, -1, 32)
    scales = _six_bit_scales(grid.parts["sc"].numpy().reshape(rows, -1, 16))
    return np.concatenate([hmask, _crumbs(q.reshape(rows, -1, QK_K)), scales, _f16_bytes(grid.parts["d"])], axis=-1)


def _iq4(q: np.ndarray, grid: BlockGrid) -> np.ndarray:
    rows = q.shape[0]
    if grid.qtype.name == "IQ4_NL":
        return np.concatenate([_f16_bytes(grid.parts["d"]).reshape(rows, -1, 2), _nibbles(q.reshape(rows, -1, 32))],
                              axis=-1)
    u = (grid.parts["sc"].numpy().astype(np.int16) + 32).astype(np.uint16).reshape(rows, -1, 8)
    high = sum(((u[..., i] >> 4) & 3) << (2 * i) for i in range(8)).astype(np.uint16)  # 2 bits a sub-block
    low = ((u[..., 0::2] & 15) | ((u[..., 1::2] & 15) << 4)).astype(np.uint8)
    qs = _nibbles(q.reshape(rows, -1, 8, 32)).reshape(rows, -1, 128)
    return np.concatenate([_f16_bytes(grid.parts["d"]), high[..., None].view(np.uint8), low, qs], axis=-1)


PACKERS = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _k_affine, "Q5_K": _k_affine, "Q6_K": _q6_k, "IQ4_NL": _iq4,
           "IQ4_XS": _iq4}


def pack_blocks(q: torch.Tensor, grid: BlockGrid) -> np.ndarray:
    """Codes [rows, cols] on `grid` -> uint8 [rows, cols / row_multiple * block_bytes]."""
    codes = q.numpy().astype(np.uint8)
    packed = PACKERS.get(grid.qtype.name, _legacy)(codes, grid)
    return np.ascontiguousarray(packed.reshape(q.shape[0], -1).astype(np.uint8))


def unpack_values(blocks: np.ndarray, name: str) -> torch.Tensor:
    """The fp32 weights of packed blocks, by the gguf package's dequantizer."""
    import gguf

    values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


@register_format
class GGMLBlocks(PackedLinear):
    """A linear stored as llama.cpp blocks of one GGML type (Q4_K, Q6_K, Q5_0, ...), exactly the
    bytes the GGUF export writes. No CPU kernel here: it computes as "dequantize + fp32 matmul";
    llama.cpp (`bench model --runtime llamacpp`) is where this format runs fast."""

    format = "ggml"

    def __init__(self, blocks: torch.Tensor, in_features: int, bias=None, meta=None):
        super().__init__(in_features, blocks.shape[0], bias, meta or {})
        self.register_buffer("blocks", blocks.contiguous())

    @classmethod
    def from_codes(cls, codes: GGMLCodes, in_features: int, bias=None) -> "GGMLBlocks":
        return cls(codes.blocks, in_features, bias, {"ggml_type": codes.qtype, "ftype": codes.ftype,
                                                     "in_features": in_features})

    @classmethod
    def from_dense(cls, weight, bias=None, **_):
        from slimkit.errors import SlimkitError

        raise SlimkitError("the ggml format holds codes a `gguf_quantize` step chose; use the gguf_quantize "
                           "recipe step, or `slimkit export --to gguf --gguf-type q4_k_m` on a dense model")

    def stored(self):
        return {"blocks": self.blocks}

    @classmethod
    def from_stored(cls, t, meta, bias):
        qtype = ggml_type(meta["ggml_type"])
        expected = int(meta["in_features"]) // qtype.row_multiple * qtype.block_bytes
        if t["blocks"].dtype != torch.uint8 or t["blocks"].dim() != 2 or t["blocks"].shape[1] != expected:
            from slimkit.errors import WeightsError

            raise WeightsError(f"ggml blocks of type {qtype.name} are damaged: {tuple(t['blocks'].shape)} "
                               f"{t['blocks'].dtype}, expected [rows, {expected}] uint8")
        return cls(t["blocks"], int(meta["in_features"]), bias, meta)

    def dequantize(self):
        return unpack_values(self.blocks.numpy(), self.meta["ggml_type"])

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        return unpack_values(self.blocks[start:stop].numpy(), self.meta["ggml_type"])

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return self.dequantized_matmul(x2d)  # a tile of rows at a time: a 262k-row head never exists in fp32

    gathers_rows = True

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return unpack_values(self.blocks.index_select(0, ids).numpy(), self.meta["ggml_type"])

    def path_for(self, m):
        return f"dequantize ({self.meta['ggml_type']}, by tiles of rows) + fp32 matmul; llama.cpp runs it natively"
