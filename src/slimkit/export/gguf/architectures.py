"""How a transformers `model_type` goes to one of llama.cpp's architectures: the table, what
llama.cpp would compute differently (refused before any work), and the row orders it expects."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slimkit.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class GGUFArch:
    name: str  # gguf.MODEL_ARCH member
    rotary_rows: bool = False  # q/k rows to llama.cpp's interleaved rotary order (LLaMA); else HF's (NEOX)
    norm_offset: float = 0.0  # Gemma computes x * (1 + w); llama.cpp multiplies by the stored weight
    gemma: bool = False  # logit soft-caps and sliding window in the metadata; q scaled by 1/sqrt(head_dim)
    topk_renormalised: bool | None = None  # MoE: whether llama.cpp renormalises the chosen experts' weights


# LLaMA-family types share the llama architecture (its optional q/k/v biases cover Qwen2, its expert
# tensors Mixtral); Qwen3 needs its own for the q/k norms.
GGUF_ARCHITECTURES = {
    "llama": GGUFArch("LLAMA", rotary_rows=True), "mistral": GGUFArch("LLAMA", rotary_rows=True),
    "qwen2": GGUFArch("LLAMA", rotary_rows=True), "mixtral": GGUFArch("LLAMA", rotary_rows=True),
    "qwen3": GGUFArch("QWEN3"), "qwen3_moe": GGUFArch("QWEN3MOE", topk_renormalised=True),
    "qwen2_moe": GGUFArch("QWEN2MOE", topk_renormalised=False), "phi3": GGUFArch("PHI3"), "gpt2": GGUFArch("GPT2"),
    "stablelm": GGUFArch("STABLELM"), "starcoder2": GGUFArch("STARCODER2"), "falcon": GGUFArch("FALCON"),
    "granite": GGUFArch("GRANITE", rotary_rows=True), "phi": GGUFArch("PHI2"), "gpt_neox": GGUFArch("GPTNEOX"),
    "olmo2": GGUFArch("OLMO2"), "cohere": GGUFArch("COMMAND_R"),
    "gemma": GGUFArch("GEMMA", norm_offset=1.0), "gemma2": GGUFArch("GEMMA2", norm_offset=1.0, gemma=True),
    "gemma3_text": GGUFArch("GEMMA3", norm_offset=1.0, gemma=True),
}
OTHER_TARGETS = "Use `--to compressed-tensors` or `--to hf`."


def gguf_arch(config) -> GGUFArch:
    return GGUF_ARCHITECTURES[config.model_type]


def kv_heads(config) -> int:
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1  # Falcon-7B: one key/value head (its num_kv_heads is then unused)
    return getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) \
        or config.num_attention_heads


def rope_theta(config) -> float | None:
    """The rotary base (of the full-attention layers where sliding ones differ: Gemma-3)."""
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get("full_attention", params)
    return getattr(config, "rope_theta", None) or params.get("rope_theta")


def _gemma_problems(config) -> list[str]:
    """What llama.cpp's Gemma-2/3 would compute differently from this config."""
    head_dim = config.head_dim
    problems = []
    if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} is not head_dim {head_dim} "
                        "(llama.cpp scales queries by 1/sqrt(head_dim) below 27B)")
    params = getattr(config, "rope_parameters", None) or {}
    for kind, expected in (("full_attention", None), ("sliding_attention", 10000.0)):
        rope = params.get(kind, params)
        if rope.get("rope_type", "default") != "default":
            problems.append(f"{kind} layers use {rope['rope_type']} rope scaling")
        if expected is not None and kind in params and rope.get("rope_theta") != expected:
            problems.append(f"sliding layers use rope base {rope.get('rope_theta')} (llama.cpp: {expected:g})")
    return problems


def check_architecture(model) -> None:
    """A model llama.cpp can run as this very function, or a clear error naming what differs."""
    config = model.config
    if getattr(config, "model_type", None) not in GGUF_ARCHITECTURES or not hasattr(model, "lm_head"):
        raise UnsupportedArchitectureError(f"GGUF export covers {', '.join(GGUF_ARCHITECTURES)}; this model is "
                           f"{config.model_type}. {OTHER_TARGETS}")
    problems = _gemma_problems(config) if gguf_arch(config).gemma else []
    if config.model_type == "falcon" and (getattr(config, "alibi", False) or not getattr(config, "parallel_attn", True)):
        problems.append("llama.cpp's falcon has rotary positions and parallel attention only")
    if problems:
        raise UnsupportedArchitectureError(f"GGUF export: llama.cpp would compute another function for this {config.model_type}: "
                           f"{'; '.join(problems)}. {OTHER_TARGETS}")
    expected = gguf_arch(config).topk_renormalised
    if expected is not None and bool(getattr(config, "norm_topk_prob", expected)) != expected:
        raise UnsupportedArchitectureError(f"GGUF export: llama.cpp's {config.model_type} {'renormalises' if expected else 'keeps'} "
                           f"the chosen experts' routing weights and this model {'does not' if expected else 'does'} "
                           f"(norm_topk_prob), so llama.cpp would compute another function. {OTHER_TARGETS}")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _grouped_qkv_order(config, rows: int) -> np.ndarray | None:
    """A fused qkv whose rows are grouped [q.. k v] per key/value head (Falcon-40B; GPT-NeoX, one query
    head per group), as llama.cpp's [q.., k.., v..]; None for a fused qkv already in that order."""
    heads = config.num_attention_heads
    if config.model_type == "gpt_neox":
        groups = heads
    elif config.model_type == "falcon" and getattr(config, "new_decoder_architecture", False):
        groups = config.num_kv_heads
    else:
        return None
    per, head_dim = heads // groups, config.hidden_size // heads
    index = np.arange(rows).reshape(groups, per + 2, head_dim)
    return np.concatenate([index[:, :per].reshape(-1), index[:, per].reshape(-1), index[:, per + 1].reshape(-1)])


def row_order(role: str | None, config, rows: int) -> np.ndarray | None:
    """The order llama.cpp wants a tensor's rows in, by the tensor's role in the adapter: its rotary
    order for q and k (where the architecture differs from HF's), its [q.., k.., v..] order for a
    grouped fused qkv; None where the rows stay as they are."""
    if role == "qkv":
        return _grouped_qkv_order(config, rows)
    if role not in ("q", "k") or not gguf_arch(config).rotary_rows:
        return None
    heads = config.num_attention_heads if role == "q" else config.num_key_value_heads
    return _permute(np.arange(rows)[:, None], heads)[:, 0]
