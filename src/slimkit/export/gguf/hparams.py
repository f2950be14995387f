"""The model's hyperparameters as llama.cpp reads them: widths, heads, norms, rotary base, experts,
scales, soft-caps, and the file type the tensors add up to."""

from __future__ import annotations

from slimkit.export.gguf.architectures import gguf_arch, kv_heads, rope_theta
from slimkit.export.gguf.types import TypePlan


def _feed_forward_width(config) -> int:
    return next((getattr(config, k) for k in ("intermediate_size", "ffn_hidden_size", "n_inner")
                 if getattr(config, k, None)), 4 * config.hidden_size)  # GPT-2's n_inner None: 4 x hidden


def _write_norm_eps(writer, config) -> None:
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        return
    eps = next(getattr(config, k) for k in ("layer_norm_epsilon", "layer_norm_eps", "norm_epsilon")
               if getattr(config, k, None) is not None)  # LayerNorm, under the name each config gives it
    writer.add_layer_norm_eps(eps)


def _write_rotary(writer, config, head_dim: int) -> None:
    theta = rope_theta(config)
    if theta is None:  # GPT-2 learns its positions instead
        return
    writer.add_rope_freq_base(float(theta))
    rotary = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor") \
        or getattr(config, "partial_rotary_factor", None) or 1.0
    writer.add_rope_dimension_count(int(head_dim * rotary))  # StableLM rotates a quarter of each head


def _write_scales(writer, config) -> None:
    """Granite's multipliers, Cohere's logit scale, GPT-NeoX's parallel residual: as llama.cpp names them."""
    for key, add in (("embedding_multiplier", writer.add_embedding_scale),
                     ("residual_multiplier", writer.add_residual_scale),
                     ("attention_multiplier", writer.add_attention_scale),
                     ("logits_scaling", writer.add_logit_scale), ("logit_scale", writer.add_logit_scale)):
        if isinstance(getattr(config, key, None), float):
            add(getattr(config, key))
    if config.model_type == "gpt_neox":
        writer.add_parallel_residual(bool(config.use_parallel_residual))
    if gguf_arch(config).gemma:
        for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                         ("final_logit_softcapping", writer.add_final_logit_softcapping),
                         ("sliding_window", writer.add_sliding_window)):
            if getattr(config, key, None) is not None:
                add(getattr(config, key))


def _write_expert_metadata(writer, config) -> None:
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not experts:
        return
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):  # Qwen-MoE: the experts' width differs from the dense one
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):  # Qwen2-MoE's shared expert
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def write_hparams(writer, config, packed: dict, plan: TypePlan) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(_feed_forward_width(config))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads(config))
    _write_norm_eps(writer, config)
    _write_rotary(writer, config, head_dim)
    writer.add_key_length(head_dim)  # llama.cpp would otherwise take hidden / heads (Qwen3 differs)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    _write_expert_metadata(writer, config)
    _write_scales(writer, config)
    writer.add_file_type(plan.file_type(packed))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
