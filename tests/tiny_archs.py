"""Tiny random models of many architectures, built through transformers' own config classes (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, vocab_size=256, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
# what a model type names differently, or needs to stay tiny
OVERRIDES = {
    "falcon": dict(ffn_hidden_size=128, new_decoder_architecture=False, multi_query=True),
    "gptj": dict(rotary_dim=8, n_inner=128),
    "gpt2": dict(n_inner=128),
    "gpt_neox": dict(rotary_pct=0.25),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16),
    "qwen3": dict(head_dim=16),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "modernbert": dict(global_attn_every_n_layers=2, local_attention=16),
    "distilbert": dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64),
}
ENCODERS = ("bert", "roberta", "distilbert", "modernbert")
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt_neox",
            "gptj", "opt", "falcon", "olmo2", "granite", "stablelm", "starcoder2", "cohere")
MOE = ("mixtral", "qwen3_moe", "qwen2_moe")  # Qwen2-MoE: a shared expert and its one-row gate
CONV1D = ("gpt2",)


def tiny_config(model_type: str, **overrides):
    config = AutoConfig.for_model(model_type)
    for key, value in COMMON.items():
        if hasattr(config, key):
            setattr(config, key, value)
    for key, value in {**OVERRIDES.get(model_type, {}), **overrides}.items():
        setattr(config, key, value)
    settable = not isinstance(getattr(type(config), "layer_types", None), property)  # Mamba derives it
    if settable and isinstance(getattr(config, "layer_types", None), list):  # one entry per layer (Gemma-2/3, ModernBERT)
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    return config


def tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    auto = AutoModel if model_type in ENCODERS else AutoModelForCausalLM
    return auto.from_config(config).eval()
