"""A config's sizes checked by arithmetic before any model is built from it.

Building even the meta-device skeleton creates one Python object per layer: a config.json with
`num_hidden_layers: 1000000000` would take minutes and gigabytes before any later check ran. So
every count and width a config states is bounded here (by far more than any real model needs),
and the layers it states are weighed against the bytes the weight files actually hold.
"""

from __future__ import annotations

from typing import Iterator

from slimkit.errors import WeightsError

LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "encoder_layers",
              "decoder_layers", "num_encoder_layers")
WIDTH_KEYS = ("hidden_size", "d_model", "n_embd")
BOUNDS = {
    **{key: 10_000 for key in LAYER_KEYS},
    **{key: 2**20 for key in (*WIDTH_KEYS, "intermediate_size", "moe_intermediate_size", "ffn_dim", "d_ff",
                              "n_inner", "head_dim", "d_kv")},
    "vocab_size": 2**24,
    **{key: 2**16 for key in ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "num_experts",
                              "num_local_experts", "n_routed_experts", "num_experts_per_tok")},
}
# No layer of a transformer-like block holds fewer weights than this share of width^2 (its attention
# or mixer projections alone are width x width or more in every family transformers builds)
LAYER_WEIGHTS_PER_WIDTH_SQUARED = 1 / 8
SAFETENSORS_BITS_FLOOR = 4  # a safetensors dir stores floats (>= 8 bits) or slimkit's int4 container
GGUF_BITS_FLOOR = 1  # llama.cpp's smallest type (IQ1_S) is 1.56 bits per weight


def _sections(raw: dict, where: str = "config.json") -> Iterator[tuple[str, dict]]:
    """The config and every sub-config in it (text_config, vision_config, ...)."""
    yield where, raw
    for key, value in raw.items():
        if isinstance(value, dict):
            yield from _sections(value, f"{where}:{key}")


def _stated(section: dict, key: str) -> int | None:
    value = section.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_config_bounds(raw: dict, weight_bytes: int | None = None, bits_floor: int = SAFETENSORS_BITS_FLOOR) -> None:
    """Refuse a config whose sizes no real model has, or whose layers outweigh its files (`weight_bytes`,
    whose weights take at least `bits_floor` bits each)."""
    least_weights = 0
    for where, section in _sections(raw):
        for key, bound in BOUNDS.items():
            value = _stated(section, key)
            if value is not None and not 0 <= value <= bound:
                raise WeightsError(f"{where}: {key} {value:,} is beyond any real model (at most {bound:,}); "
                                   "the config is wrong or damaged")
        width = max([_stated(section, k) or 1 for k in WIDTH_KEYS])
        per_layer = int(width * width * LAYER_WEIGHTS_PER_WIDTH_SQUARED)
        least_weights += sum((_stated(section, k) or 0) * per_layer for k in LAYER_KEYS)
    if weight_bytes is not None and least_weights > weight_bytes * 8 // bits_floor:
        raise WeightsError(f"config.json describes at least {least_weights:,} weights (its layers x width^2/8) "
                           f"but the weight files hold only {weight_bytes:,} bytes: config and weights disagree")
