"""Which GGML type each tensor is written in, and the blocks: the packed layer's own codes where
they can go out as they are, else fitted here without calibration.

A llama.cpp file type (Q2_K, Q3_K_S/M/L, IQ4_NL, IQ4_XS, Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K,
Q5_0) gives every tensor the type llama.cpp's mix gives it (`quantization/gguf_mix.py`); Q8_0, Q4_0 and F16/F32 are the simple types;
`auto` keeps what compression decided (gguf_quantize blocks, int4 codes as Q4_0/Q4_1, int8 as
Q8_0, other linears F16) and writes the token embedding and an unpacked head, which compression
left alone, in Q8_0 (near lossless) beside a quantized body. The explicit Q4_0/Q8_0 give them the
types llama-quantize gives them in such a file (the head, and an embedding tied to it, Q6_K or
Q8_0; an untied embedding the body type).

int4 codes (and 2- or 3-bit codes, which share the int4 container; and a 2:4 layer's int4 values,
a pruned weight's code being 0) are kept bit for bit when their group is a multiple of 32 and their
scales are fp16 values: a group of 64 becomes two Q4_0/Q4_1 blocks with its scale (GGUF has no
sparse type: a 2:4 layer is written dense). Otherwise they are requantized (Q4_0 picks its own scale per 32, not
lossless), so the export is verified by perplexity, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimkit.errors import SlimkitError
from slimkit.formats.ggml import pack_blocks
from slimkit.numerics.ggml_grids import ALLOCATED_FTYPE, NOT_A_MIX, fit_grid, round_codes
from slimkit.quantization.gguf_mix import query_groups

MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "iq4_nl", "iq4_xs", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k",
         "q5_0")
QTYPES = ("auto", *MIXES, "q8_0", "q4_0", "f16", "f32")
SIMPLE = ("q8_0", "q4_0", "f16", "f32")


@dataclass(frozen=True)
class TypePlan:
    """How tensors are typed: the type asked for, the llama.cpp file type whose mix applies, and
    the file's body type (what the embedding and an unpacked head are judged against)."""

    requested: str  # one of QTYPES
    mix: str | None  # "Q4_K_M" ... or None (the simple types)
    n_layers: int
    tied: bool  # no output tensor: llama.cpp reuses token_embd as the head
    body: str | None = None
    gqa: int = 1  # query heads per kv head (the Q2_K / IQ4 mixes raise attn_v with 4 or more)  # "Q4_0" / "Q8_0" for a quantized file of simple types; None: F16/F32, or dense

    def keeps(self, mod) -> bool:
        """Are a packed layer's own codes written as they are?"""
        if mod.format == "ggml":
            return self.requested == "auto" or self.requested.upper() == mod.meta["ftype"]
        return code_format(mod) == "int4" and self.requested in ("auto", "q4_0")

    def outer_type(self, cols: int) -> str:
        """llama-quantize's type for the output head (and a token embedding tied to it): Q6_K, or Q8_0
        in a Q8_0 file or where Q6_K's 256-wide blocks do not tile the row."""
        return "Q8_0" if cols % 256 or self.body == "Q8_0" else "Q6_K"

    def simple_type(self, fmt: str | None, role: str | None, cols: int) -> str:
        """The type of a tensor outside the mixes. `auto`: what its packed format holds; the token
        embedding and an unpacked head, which compression left alone, Q8_0 (near lossless, so the
        file computes what was measured); other dense tensors F16. Q4_0/Q8_0: the body type, and the
        embedding and head as llama-quantize types them (the head and a tied embedding Q6_K/Q8_0,
        an untied embedding the body type)."""
        if self.requested in ("f16", "f32"):
            return self.requested.upper()
        if self.requested == "auto":
            if fmt is not None:
                return {"int4": "Q4_0", "int8": "Q8_0", "w8a8": "Q8_0"}.get(fmt, "F16")
            outer = role in ("lm_head", "token_embedding") and self.body is not None and cols % 32 == 0
            return "Q8_0" if outer else "F16"
        if role == "lm_head" or (role == "token_embedding" and self.tied):
            return self.outer_type(cols)
        return self.body if cols % 32 == 0 else "F16"

    def file_type(self, packed: dict):
        """What `general.file_type` says: the mix, the simple type, or what `auto` mostly kept."""
        import gguf

        if self.mix is not None:
            return gguf.LlamaFileType[f"MOSTLY_{self.mix}"]
        if any(m.format == "ggml" and m.meta["ftype"] == ALLOCATED_FTYPE for m in packed.values()):
            return gguf.LlamaFileType.GUESSED  # types chosen tensor by tensor: no llama.cpp file type names it
        if self.requested in ("f16", "f32"):
            return gguf.LlamaFileType.MOSTLY_F16 if self.requested == "f16" else gguf.LlamaFileType.ALL_F32
        int4 = any(code_format(m) == "int4" for m in packed.values())
        return gguf.LlamaFileType.MOSTLY_Q4_0 if self.requested == "q4_0" or (self.requested == "auto" and int4) \
            else gguf.LlamaFileType.MOSTLY_Q8_0


def code_format(mod) -> str:
    """The format of a packed layer's codes: a 2:4 layer with int4 values holds int4 codes."""
    if mod.format == "2:4" and mod.meta.get("values") == "int4":
        return "int4"
    return mod.format


def _body_type(requested: str, packed: dict) -> str | None:
    if requested in ("q8_0", "q4_0"):
        return requested.upper()
    if requested != "auto":
        return None
    formats = {code_format(m) for m in packed.values()}
    return "Q4_0" if "int4" in formats else "Q8_0" if formats & {"int8", "w8a8"} else None


def plan_types(model: torch.nn.Module, packed: dict, requested: str) -> TypePlan:
    if requested not in QTYPES:
        raise SlimkitError(f"unknown GGUF type {requested}; choose one of {', '.join(QTYPES)}")
    mix = requested.upper() if requested in MIXES else None
    if requested == "auto":
        mixes = sorted({m.meta["ftype"] for m in packed.values()
                        if m.format == "ggml" and m.meta["ftype"] not in NOT_A_MIX})  # the head's own type, an allocation
        if len(mixes) > 1:
            raise SlimkitError(f"this model mixes llama.cpp file types {mixes}; pass --gguf-type")
        mix = mixes[0] if mixes else None
    head = packed.get("lm_head")  # a head packed apart from the embedding it was tied to is still tied
    tied = getattr(model.config, "tie_word_embeddings", False) and (head is None or bool(head.meta.get("tied_to")))
    return TypePlan(requested, mix, model.config.num_hidden_layers, tied, _body_type(requested, packed),
                    query_groups(model.config))


def int4_blocks(mod) -> tuple[np.ndarray, object] | None:
    """slimkit int4 codes (an int4 layer's, or a 2:4 layer's int4 values) as Q4_0 (symmetric) or
    Q4_1 (asymmetric) blocks, bit for bit: a group of g = 32k columns becomes k blocks sharing its
    scale (fp16). None if g is not a multiple of 32, or the scales do not fit fp16."""
    import gguf

    group = mod.in_features // mod.scale.shape[1]
    if group % 32:
        return None
    u = (mod.dense_nibbles() if mod.format == "2:4" else mod.nibbles()).numpy().astype(np.uint8)  # [N, K] 0..15
    rows, cols = u.shape
    per = group // 32
    scale = mod.scale.float().repeat_interleave(per, dim=1)  # [N, K/32]
    d = scale.numpy().astype(np.float16)
    if not np.array_equal(d.astype(np.float32), scale.numpy()):
        return None
    blocks = u.reshape(rows, cols // 32, 32)
    qs = blocks[..., :16] | (blocks[..., 16:] << 4)  # low nibbles: elements 0-15, high: 16-31
    parts = [d[..., None].view(np.uint8)]
    qtype = gguf.GGMLQuantizationType.Q4_0  # value = (q - 8) * d: slimkit's symmetric code + 8
    if getattr(mod, "zero", None) is not None:  # Q4_1: value = q * d + m with m = -zero * d
        m = (-(mod.zero.float() * mod.scale.float()).repeat_interleave(per, dim=1)).numpy().astype(np.float16)
        parts.append(m[..., None].view(np.uint8))
        qtype = gguf.GGMLQuantizationType.Q4_1
    parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(rows, -1), qtype


def kept_blocks(mod) -> tuple[np.ndarray, object] | None:
    """A packed layer's own codes as GGUF blocks: gguf_quantize blocks, or int4 as Q4_0/Q4_1."""
    import gguf

    if mod.format == "ggml":
        return mod.blocks.numpy(), gguf.GGMLQuantizationType[mod.meta["ggml_type"]]
    return int4_blocks(mod)


def fitted_blocks(data: np.ndarray, qtype: str) -> np.ndarray:
    """Blocks of `qtype` fitted here, without calibration (uniform importance, round to nearest)."""
    w = torch.from_numpy(data)
    grid = fit_grid(qtype, w)
    return pack_blocks(round_codes(w, grid), grid)
