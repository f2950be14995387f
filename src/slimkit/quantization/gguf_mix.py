"""llama.cpp's per-tensor type mix for a GGUF file type (Q4_K_M, Q4_K_S, ...), as data and rules.

A file type names a default GGML type and the tensors that get more bits (llama-quant.cpp,
llama_tensor_get_type, for dense LLaMA-family models): the output head (and a tied token
embedding) goes to Q6_K; Q4_K_M / Q5_K_M give Q6_K to attn_v and ffn_down of the layers
`use_more_bits` picks (the first and last eighth, and every third between); Q4_K_S gives Q5_K to
the first four attn_v and the first eighth of ffn_down; Q2_K raises attn_v (Q4_K with 4+ query
heads per kv head, else Q3_K), ffn_down and attn_output to Q3_K; Q3_K_M raises attn_v (Q5_K for
the first two, then Q4_K), ffn_down (Q5_K for the first sixteenth, then Q4_K) and attn_output
(Q4_K); Q3_K_L gives Q5_K to all three. A type whose blocks do not tile a row falls back (Q2_K /
Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, then F16): SmolLM2's
576-wide rows are not a multiple of 256, so most of its "Q4_K_M" is Q5_0, as llama-quantize makes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slimkit.errors import SlimkitError
from slimkit.numerics.ggml_grids import TYPES

FILE_TYPES = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "IQ4_NL": "IQ4_NL",
              "IQ4_XS": "IQ4_XS", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K",
              "Q6_K": "Q6_K", "Q8_0": "Q8_0", "Q5_0": "Q5_0", "Q4_0": "Q4_0"}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "lm_head": "output",
         "embed_tokens": "token_embd"}


def file_type(name: str) -> str:
    key = name.upper()
    if key not in FILE_TYPES:
        raise SlimkitError(f"unknown GGUF file type {name}; known: {', '.join(FILE_TYPES)}")
    return key


def use_more_bits(layer: int, n_layers: int) -> bool:
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def role_and_layer(module_name: str) -> tuple[str, int | None]:
    """('attn_v', 3) for 'model.layers.3.self_attn.v_proj'; ('output', None) for 'lm_head'."""
    leaf = module_name.rsplit(".", 1)[-1]
    if leaf not in ROLES:
        raise SlimkitError(f"{module_name}: no llama.cpp tensor role for '{leaf}'")
    found = re.search(r"layers\.(\d+)\.", module_name)
    return ROLES[leaf], int(found.group(1)) if found else None


def _attn_v(ftype: str, layer: int, n_layers: int, gqa: int) -> str | None:
    if ftype == "Q2_K":
        return "Q4_K" if gqa >= 4 else "Q3_K"
    if ftype == "Q3_K_M":
        return "Q5_K" if layer < 2 else "Q4_K"
    if ftype == "Q3_K_L" or (ftype in ("IQ4_NL", "IQ4_XS") and gqa >= 4):
        return "Q5_K"
    if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
        return "Q6_K"
    return "Q5_K" if ftype == "Q4_K_S" and layer < 4 else None


def _ffn_down(ftype: str, layer: int, n_layers: int, imatrix: bool) -> str | None:
    if ftype == "Q2_K":
        return "Q3_K"
    if ftype == "Q3_K_M":
        return "Q5_K" if layer < n_layers // 16 else "Q4_K"
    if ftype == "Q3_K_L":
        return "Q5_K"
    if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
        return "Q6_K"
    early = layer < n_layers // 8
    if ftype in ("IQ4_NL", "IQ4_XS") and early and not imatrix:
        return "Q5_K"
    if ftype == "Q4_K_S" and early:
        return "Q5_K"
    if ftype in ("Q4_0", "Q5_0") and early and imatrix:  # llama.cpp's guard for the first ffn_down
        return "Q4_1" if ftype == "Q4_0" else "Q5_1"
    return None


@dataclass(frozen=True)
class MixModel:
    """What of the model llama.cpp's mix rules read."""

    n_layers: int
    tied: bool = False
    gqa: int = 1  # query heads per kv head
    imatrix: bool = False  # llama-quantize was given one


def _preferred(ftype: str, role: str, layer: int | None, cols: int, model: MixModel) -> str:
    base = FILE_TYPES[ftype]
    if role == "output" or (model.tied and role == "token_embd"):
        return "Q8_0" if cols % TYPES[base].row_multiple or base == "Q8_0" else "Q6_K"
    raised = None
    if role == "attn_v" and layer is not None:
        raised = _attn_v(ftype, layer, model.n_layers, model.gqa)
    elif role == "ffn_down" and layer is not None:
        raised = _ffn_down(ftype, layer, model.n_layers, model.imatrix)
    elif role == "attn_output":
        raised = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype)
    return raised or base


def tensor_type(ftype: str, module_name: str, n_layers: int, cols: int, tied: bool = False, *, gqa: int = 1,
                imatrix: bool = False) -> str:
    """The GGML type llama.cpp gives this tensor in a file of type `ftype` ("F16" when no
    quantized type tiles its rows); `gqa`: query heads per kv head; `imatrix`: llama-quantize was
    given one (slimkit's calibrated codes count as one)."""
    role, layer = role_and_layer(module_name)
    qtype = _preferred(file_type(ftype), role, layer, cols, MixModel(n_layers, tied, gqa, imatrix))
    while cols % TYPES[qtype].row_multiple:
        if qtype not in FALLBACK:
            return "F16"
        qtype = FALLBACK[qtype]
    return qtype


def query_groups(config) -> int:
    """Query heads per kv head (llama.cpp's n_gqa), from a transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or 1
    return max(1, heads // (getattr(text, "num_key_value_heads", None) or heads))
