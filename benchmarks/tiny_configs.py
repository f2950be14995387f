"""A tiny random config for any model type transformers ships, built from its own config class.

The shrinking is generic: every size field transformers' configs use (under any of their names) is
cut to a small value, per-layer lists are cut to the new depth, sub-configs (a wrapper's
text_config) are shrunk the same way, and token ids are kept inside the vocabulary. The depth is
the smallest of `DEPTHS` that still holds every kind of layer the full config lists (hybrid
models: attention beside linear attention or SSM layers). `OVERRIDES` holds the few per-type
fields the generic rule cannot guess.
"""

from __future__ import annotations

from typing import Any

# field name -> its tiny value (only fields holding an int larger than this are cut)
SIZES = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "model_dim", "dim", "embedding_dim"), 64),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "hidden_dim",
                     "decoder_ffn_dim", "encoder_ffn_dim", "inner_hidden_size", "dense_intermediate_size",
                     "dim_ff", "dff", "first_dense_intermediate_size", "mlp_only_intermediate_size",
                     "intermediate_size_mlp"), 128),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "moe_ffn_hidden_size", "shared_intermediate_size", "attention_hidden_size", "mamba_d_ssm",
                     "moe_shared_expert_intermediate_size"), 64),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
                     "encoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("head_dim", "d_head", "kv_channels", "attention_head_dim", "v_head_dim", "query_pre_attn_scalar"), 16),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                     "num_routed_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "moe_k", "top_k"), 2),
    **dict.fromkeys(("n_group", "topk_group", "n_shared_experts", "num_shared_experts"), 1),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), 1024),  # > 512-token windows plus offsets
    **dict.fromkeys(("sliding_window", "attention_window"), 64),
    # multi-head latent attention: the rotary part is the head_dim the rotary embedding is built with
    "kv_lora_rank": 64, "q_lora_rank": 64, "o_lora_rank": 64,  # multiples of the recipes' groups
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
    "qk_head_dim": 32, "rotary_dim": 8, "mamba_d_state": 16, "hidden_size_per_layer_input": 16,
    # Mamba-2 mixers: heads x head size = the inner width (expand x hidden, or mamba_d_ssm)
    "mamba_n_heads": 8, "n_mamba_heads": 8, "mamba_d_head": 16,
}
# size fields some config classes leave unset (None) although their model needs them
FILLED_WHEN_UNSET = ("head_dim", "num_key_value_heads", "intermediate_size", "moe_intermediate_size",
                     "n_routed_experts", "num_experts_per_tok", "n_shared_experts")
DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
                "num_blocks")
DEPTHS = (2, 4, 8)
VOCAB_FIELDS = ("vocab_size_per_layer_input", "unpadded_vocab_size")  # vocabularies beside vocab_size
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")
# what the generic rule cannot guess, by model type
OVERRIDES: dict[str, dict[str, Any]] = {
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=(32, 32), axial_pos_shape=(16, 32)),
    "bamba": dict(attn_layer_indices=[1]),  # the class's default has no attention layer at all
    "mamba2": dict(num_heads=8, n_groups=1),  # heads x head_dim = expand x hidden
    "zamba2": dict(mamba_headdim=16, n_mamba_heads=8, attention_head_dim=16, attention_hidden_size=128),  # 2 x hidden
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], num_hidden_layers=2),  # default: no attention
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "gemma3n_text": dict(num_kv_shared_layers=0),
    "xmod": dict(default_language="en_XX"),
    "cpmant": dict(init_std=0.02),
    # two hybrid layers (their shared transformer is tied across them); attention reads [hidden, embeddings]
    "zamba": dict(num_hidden_layers=4, layers_block_type=["linear_attention", "hybrid"] * 2,
                  attention_hidden_size=128),
    "xlstm": dict(qk_dim_factor=1.0),  # at 0.5 the class's own recurrent step fails on its state's shape
    # defaults the classes leave unset although their models read them
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=64,
                           indexer_compress_ratio=4),
    # clip_qkv: the class default (1.0) makes a random model's perplexity 1e15
    "dbrx": {"attn_config.rope_theta": 1e4, "attn_config.clip_qkv": 8.0},
    # layer counts the class checks against num_hidden_layers, or layers that read another's keys
    # head_dim = qk_nope_head_dim + qk_rope_head_dim, and its rotary part (x 0.25) the rope dims
    **dict.fromkeys(("dots3_note_text", "dots3_note"), dict(head_dim=64, qk_nope_head_dim=48)),
    "dory": dict(n_input_layers=2, n_recurrent_layers=4, n_output_layers=2),  # of 8 layers
    "hrm_text": dict(num_layers_per_stack=1, H_cycles=1, L_cycles=1, L_bp_cycles=[1], num_hidden_layers=2),
    "kolibri1_1": dict(num_hidden_layers=5, layer_types=["sliding_attention"] * 4 + ["indexed_attention"],
                       index_layers=[4], kv_source_layers=[0, 1, 2, 3, 4], mlp_only_layers=[0],
                       index_num_heads=2),  # at most the query heads of one key head
}


def field(config, key: str):
    """A config field, or None where the class does not hold it, or holds it per layer only
    (transformers' heterogeneous configs raise on the global read)."""
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError and the like
        return None


def full_depth(config) -> int | None:
    return next((v for k in DEPTH_FIELDS if isinstance(v := field(config, k), int)), None)


def depth_keeping_layer_kinds(config) -> int:
    """The fewest of DEPTHS layers whose per-layer lists still hold every kind the full lists hold."""
    depth = full_depth(config) or DEPTHS[0]
    need = DEPTHS[0]
    for value in vars(config).values():
        if isinstance(value, list) and len(value) == depth and all(isinstance(v, (str, int, bool)) for v in value):
            first = {v: value.index(v) for v in value}
            need = max(need, max(first.values()) + 1)
    return min((d for d in DEPTHS if d >= need), default=DEPTHS[-1])


def _shrink_sizes(config) -> None:
    for key, tiny in SIZES.items():
        value = field(config, key)
        if (isinstance(value, int) and not isinstance(value, bool) and value > tiny) or (
                value is None and key in FILLED_WHEN_UNSET and key in vars(config)):
            try:
                setattr(config, key, tiny)
            except (AttributeError, TypeError, ValueError):  # a derived, read-only property
                pass


def _cut_depth(config, depth: int) -> None:
    full = full_depth(config)
    for key in DEPTH_FIELDS:
        if isinstance(field(config, key), int) and field(config, key) > depth:
            setattr(config, key, depth)
    if full is None or full <= depth:
        return
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == full:
            setattr(config, key, cut_keeping_kinds(value, depth))
        elif isinstance(value, list) and value and all(isinstance(i, int) and 0 <= i < full for i in value) and (
                key.endswith(("indices", "idxs", "layers_idx", "layer_ids"))):  # indices of special layers
            setattr(config, key, sorted({i * depth // full for i in value}))


def _take_per_layer_overrides(config) -> dict[int, dict[str, Any]]:
    """A heterogeneous config's per-layer overrides (Gemma-4's wider full-attention heads), taken off
    so that the global size fields can be read and cut."""
    spec = config.__dict__.get("_heterogeneity_spec")
    if spec is None:
        return {}
    config.per_layer_config = None
    return spec.per_layer_overrides


def _shrunk_per_layer_overrides(overrides: dict[int, dict[str, Any]], depth: int) -> dict[int, dict[str, Any]]:
    """The overrides of the layers the cut keeps, their size fields cut like the global ones."""
    def tiny(key: str, value):
        return SIZES[key] if key in SIZES and isinstance(value, int) and value > SIZES[key] else value
    return {i: {k: tiny(k, v) for k, v in layer.items()} for i, layer in overrides.items() if i < depth}


def cut_keeping_kinds(values: list, depth: int) -> list:
    """A per-layer list cut to `depth` entries, its last ones replaced by any kind the cut lost."""
    kinds = list(dict.fromkeys(v for v in values if isinstance(v, (str, int, bool))))
    cut = values[:depth]
    missing = [k for k in kinds if k not in cut][: depth - 1]
    return cut[: depth - len(missing)] + missing if missing else cut


def _keep_token_ids(config, vocab_size: int) -> None:
    for key in TOKEN_IDS:
        value = field(config, key)
        if isinstance(value, int) and value >= vocab_size:
            setattr(config, key, 0)
        elif isinstance(value, list):
            setattr(config, key, [v if v < vocab_size else 0 for v in value])


def shrink(config, vocab_size: int, depth: int | None = None, _level: int = 0):
    """`config` (changed in place and returned) made tiny: see the module's docstring."""
    depth = depth or depth_keeping_layer_kinds(config)
    per_layer = _take_per_layer_overrides(config)
    _shrink_sizes(config)
    _cut_depth(config, depth)
    if per_layer:
        config.per_layer_config = _shrunk_per_layer_overrides(per_layer, depth)
    for key in VOCAB_FIELDS:
        if isinstance(field(config, key), int) and field(config, key) > vocab_size:
            setattr(config, key, vocab_size)
    if hasattr(config, "vocab_size"):
        config.vocab_size = vocab_size
    _keep_token_ids(config, vocab_size)
    if field(config, "kv_lora_rank") and field(config, "num_key_value_heads"):
        config.num_key_value_heads = config.num_attention_heads  # latent attention: a key and value per head
    for key, value in OVERRIDES.get(getattr(config, "model_type", ""), {}).items():
        owner, _, name = key.rpartition(".")  # "attn_config.rope_theta": a field of a sub-config
        setattr(getattr(config, owner) if owner else config, name, value)
    for value in list(vars(config).values()):
        if _level < 2 and hasattr(value, "to_dict") and hasattr(value, "model_type"):
            shrink(value, vocab_size, depth if full_depth(value) else None, _level + 1)
    return config


def tiny_config(model_type: str, vocab_size: int, depth: int | None = None, **overrides):
    """The tiny config of `model_type`; `overrides` are set last."""
    from transformers import AutoConfig

    config = shrink(AutoConfig.for_model(model_type), vocab_size, depth)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
