"""Architecture adapters: the hand-written ones (data), the registry, and discovery for the rest.

A registered adapter wins; a model type without one gets its adapter discovered from the model
itself (`discovery.py`: no per-architecture code, no torch.fx tracing).
"""

from __future__ import annotations

from torch import nn

from slimkit.errors import UnsupportedArchitectureError
from slimkit.models.structure import ArchitectureAdapter, HeadLayout, InputGroup, submodule_at

__all__ = ["ArchitectureAdapter", "HeadLayout", "InputGroup", "submodule_at", "adapter_for", "register_adapter",
           "supported_model_types", "LLAMA", "BERT"]


LLAMA = ArchitectureAdapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="layers",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.o_proj",
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
    mlp_output="mlp.down_proj",
    block_norms=("input_layernorm", "post_attention_layernorm"),
    embeddings=("embed_tokens",),
    final_norm="norm",
    lm_head="lm_head",
    groups=(
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        InputGroup(("self_attn.o_proj",), "self_attn.v_proj"),
        InputGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        InputGroup(("mlp.down_proj",), "mlp.up_proj"),
    ),
)

BERT = ArchitectureAdapter(
    name="bert",
    model_types=("bert",),
    blocks="encoder.layer",
    q_proj="attention.self.query",
    k_proj="attention.self.key",
    v_proj="attention.self.value",
    o_proj="attention.output.dense",
    mlp_inputs=("intermediate.dense",),
    mlp_output="output.dense",
    block_norms=("attention.output.LayerNorm", "output.LayerNorm"),
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    final_norm=None,
    lm_head=None,
    kv_heads_attr=None,
    groups=(
        InputGroup(("attention.self.query", "attention.self.key", "attention.self.value")),
        InputGroup(("attention.output.dense",), "attention.self.value"),
        # not attention.output.LayerNorm: its output also feeds the residual (fold_check.py)
        InputGroup(("intermediate.dense",)),
        InputGroup(("output.dense",)),
    ),
    hidden_norms=("embeddings.LayerNorm",),
    hidden_square_linears=("pooler.dense",),
    free_head_dim=False,
)

_REGISTRY: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> None:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter


for _adapter in (LLAMA, BERT):
    register_adapter(_adapter)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The registered adapter of the model's type, or one discovered from the model itself."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        if config is None or not hasattr(model, "base_model"):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} is not a transformers model (no config): slimkit needs a model_type "
                "and a base model to find the blocks in")
        from slimkit.models.discovery import discover_adapter

        adapter = discover_adapter(model)
    adapter.validate(model)
    return adapter

