"""Export a model to GGUF (llama.cpp), with the `gguf` package's writer, name maps and quantizers.
Architectures: `GGUF_ARCHITECTURES` (LLaMA family, Qwen3, Phi, Mixtral, Qwen3-MoE, GPT-2, Gemma, ...); names from the
gguf package. MoE experts go out as one 3-D tensor per projection and block, routers in F32.

Types: a llama.cpp file type (Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q5_0) gives every tensor the
type llama.cpp's mix gives it (quantization/gguf_mix.py); blocks a `gguf_quantize` step chose
are written as they are ("codes kept"), other tensors are fitted here without calibration
(importance-weighted search, uniform importance). Q8_0, Q4_0 and F16/F32 are the simple types;
`auto` keeps what compression decided (gguf_quantize blocks, int4 codes as Q4_0/Q4_1, int8 as
Q8_0, the rest F16). Norms and biases are F32. For the llama architecture Q/K rows are permuted to
llama.cpp's rotary layout (transformers' GGUF loader undoes it); rows move whole, so packed blocks
move with them.
Tokenizer and model metadata: see `gguf_metadata.py`.

int4 codes (and 2- or 3-bit codes, which share the int4 container) are kept bit for bit when their
group is a multiple of 32 and their scales are fp16 values: a group of 64 becomes two Q4_0/Q4_1
blocks with its scale. Otherwise they are requantized (Q4_0 picks its own scale per 32, not
lossless), so the export is verified by perplexity, not bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimkit.errors import SlimkitError
from slimkit.export.gguf_metadata import copy_from_gguf, describe_from_hf, pre_tokenizer
from slimkit.formats import packed_layers
from slimkit.formats.ggml import GGMLBlocks, pack_blocks
from slimkit.models.adapters import adapter_for, submodule_at
from slimkit.models.experts import EXPERT_PROJECTIONS, expert_modules
from slimkit.quantization.ggml_grids import fit_grid, round_codes
from slimkit.quantization.gguf_mix import tensor_type

MIXES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q5_0")
QTYPES = ("auto", *MIXES, "q8_0", "q4_0", "f16", "f32")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def int4_blocks(mod) -> tuple[np.ndarray, object] | None:
    """slimkit int4 codes as Q4_0 (symmetric) or Q4_1 (asymmetric) blocks, bit for bit: a group
    of g = 32k columns becomes k blocks sharing its scale (fp16). None if g is not a multiple
    of 32, or the scales do not fit fp16."""
    import gguf

    if mod.group % 32:
        return None
    u = mod.nibbles().numpy().astype(np.uint8)  # [N, K] 0..15
    rows, cols = u.shape
    per = mod.group // 32
    scale = mod.scale.float().repeat_interleave(per, dim=1)  # [N, K/32]
    d = scale.numpy().astype(np.float16)
    if not np.array_equal(d.astype(np.float32), scale.numpy()):
        return None
    blocks = u.reshape(rows, cols // 32, 32)
    qs = blocks[..., :16] | (blocks[..., 16:] << 4)  # low nibbles: elements 0-15, high: 16-31
    parts = [d[..., None].view(np.uint8)]
    qtype = gguf.GGMLQuantizationType.Q4_0
    if mod.zero is not None:  # Q4_1: value = q * d + m with m = -zero * d
        m = (-(mod.zero.float() * mod.scale.float()).repeat_interleave(per, dim=1)).numpy().astype(np.float16)
        parts.append(m[..., None].view(np.uint8))
        qtype = gguf.GGMLQuantizationType.Q4_1
    else:  # Q4_0: value = (q - 8) * d, which is exactly slimkit's symmetric code + 8
        pass
    parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(rows, -1), qtype


@dataclass(frozen=True)
class _Plan:
    """How tensors are typed: the type asked for, and the llama.cpp file type whose mix applies."""

    requested: str  # one of QTYPES
    mix: str | None  # "Q4_K_M" ... or None (the simple types)
    n_layers: int
    tied: bool  # no output tensor: llama.cpp reuses token_embd as the head

    def keeps(self, mod) -> bool:
        """Are a packed layer's own codes written as they are?"""
        if mod.format == "ggml":
            return self.requested == "auto" or self.requested.upper() == mod.meta["ftype"]
        return mod.format == "int4" and self.requested in ("auto", "q4_0")

    def simple_type(self, fmt: str | None, module) -> str:
        if self.requested in ("q8_0", "q4_0", "f16", "f32"):
            return "F32" if self.requested == "f32" else "F16" if isinstance(module, torch.nn.Embedding) else \
                self.requested.upper()
        return "F16" if isinstance(module, torch.nn.Embedding) else \
            {"int4": "Q4_0", "int8": "Q8_0", "w8a8": "Q8_0"}.get(fmt, "F16")


def plan_types(model: torch.nn.Module, packed: dict, requested: str) -> _Plan:
    if requested not in QTYPES:
        raise SlimkitError(f"unknown GGUF type {requested}; choose one of {', '.join(QTYPES)}")
    mix = requested.upper() if requested in MIXES else None
    if requested == "auto":
        mixes = sorted({m.meta["ftype"] for m in packed.values() if m.format == "ggml"})
        if len(mixes) > 1:
            raise SlimkitError(f"this model mixes llama.cpp file types {mixes}; pass --gguf-type")
        mix = mixes[0] if mixes else None
    tied = getattr(model.config, "tie_word_embeddings", False) and "lm_head" not in packed
    return _Plan(requested, mix, model.config.num_hidden_layers, tied)


def _tokenizer_from_hf(writer, tokenizer) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise SlimkitError(f"GGUF export builds byte-level BPE tokenizers only; this one is {model.get('type')}")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


@dataclass(frozen=True)
class GGUFArch:
    """How a transformers model_type goes to one of llama.cpp's architectures."""

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


def _row_order(module_name: str, config, rows: int) -> np.ndarray | None:
    """llama.cpp's rotary row order for q/k (None for other tensors, or where the architecture keeps HF's),
    or its order of a grouped fused qkv (Falcon-40B, GPT-NeoX)."""
    if module_name.endswith("query_key_value"):
        return _grouped_qkv_order(config, rows)
    if not GGUF_ARCHITECTURES[config.model_type].rotary_rows or not module_name.endswith(("q_proj", "k_proj")):
        return None
    heads = config.num_attention_heads if module_name.endswith("q_proj") else config.num_key_value_heads
    return _permute(np.arange(rows)[:, None], heads)[:, 0]


def _kept_blocks(mod) -> tuple[np.ndarray, object] | None:
    """A packed layer's own codes as GGUF blocks: gguf_quantize blocks, or int4 as Q4_0/Q4_1."""
    import gguf

    if mod.format == "ggml":
        return mod.blocks.numpy(), gguf.GGMLQuantizationType[mod.meta["ggml_type"]]
    return int4_blocks(mod)


def _file_type(packed: dict, plan: _Plan):
    import gguf

    if plan.mix is not None:
        return gguf.LlamaFileType[f"MOSTLY_{plan.mix}"]
    if plan.requested in ("f16", "f32"):
        return gguf.LlamaFileType.MOSTLY_F16 if plan.requested == "f16" else gguf.LlamaFileType.ALL_F32
    int4 = any(m.format == "int4" for m in packed.values())
    return gguf.LlamaFileType.MOSTLY_Q4_0 if plan.requested == "q4_0" or (plan.requested == "auto" and int4) \
        else gguf.LlamaFileType.MOSTLY_Q8_0


def _write_metadata(writer, config, packed: dict, plan: _Plan) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    width = next((getattr(config, k) for k in ("intermediate_size", "ffn_hidden_size", "n_inner")
                  if getattr(config, k, None)), 4 * config.hidden_size)  # GPT-2's n_inner None: 4 x hidden
    writer.add_feed_forward_length(width)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads(config))
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    else:  # LayerNorm, under the name each config gives its epsilon
        eps = next(getattr(config, k) for k in ("layer_norm_epsilon", "layer_norm_eps", "norm_epsilon")
                   if getattr(config, k, None) is not None)
        writer.add_layer_norm_eps(eps)
    theta = rope_theta(config)
    if theta is not None:  # GPT-2 learns its positions instead
        writer.add_rope_freq_base(float(theta))
        rotary = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor") \
            or getattr(config, "partial_rotary_factor", None) or 1.0
        writer.add_rope_dimension_count(int(head_dim * rotary))  # StableLM rotates a quarter of each head
    writer.add_key_length(head_dim)  # llama.cpp would otherwise take hidden / heads (Qwen3 differs)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    _write_expert_metadata(writer, config)
    _write_scales(writer, config)
    if GGUF_ARCHITECTURES[config.model_type].gemma:
        for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                         ("final_logit_softcapping", writer.add_final_logit_softcapping),
                         ("sliding_window", writer.add_sliding_window)):
            if getattr(config, key, None) is not None:
                add(getattr(config, key))
    writer.add_file_type(_file_type(packed, plan))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def routers(model: torch.nn.Module) -> set[str]:
    """The MoE routers the adapter names (`gate`, Qwen2-MoE's `shared_expert_gate`), by full module
    name: llama.cpp's ffn_gate_inp(_shexp), kept F32."""
    adapter = adapter_for(model)
    if not adapter.routers:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(submodule_at(block, r))] for block in adapter.get_blocks(model) for r in adapter.routers}


def _expert_weight(module, mod) -> tuple[torch.Tensor, object]:
    return (mod.dequantize(), mod) if mod is not None else (module.weight.detach().float(), None)


def _expert_projections(model: torch.nn.Module) -> dict[str, list[str]]:
    """`<block>.<moe>.experts.<projection>` (the name llama.cpp's map knows) -> each expert's module name."""
    stacked: dict[str, list[str]] = {}
    for path, experts in expert_modules(model).items():
        for e in range(len(experts)):
            for proj in EXPERT_PROJECTIONS:
                stacked.setdefault(f"{path}.{proj}", []).append(f"{path}.{e}.{proj}")
    return stacked


def kv_heads(config) -> int:
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1  # Falcon-7B: one key/value head (its num_kv_heads is then unused)
    return getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) \
        or config.num_attention_heads


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


def _weights(model: torch.nn.Module, packed: dict, plan: _Plan, gates: set[str]):
    """(module name, module, fp32 weight, packed layer or None) for every tensor GGUF stores, experts
    apart (`_expert_projections`), the routers `gates` included."""
    inside_experts = {n for names in _expert_projections(model).values() for n in names}
    for module_name, module in model.named_modules():
        if module_name in inside_experts:
            continue
        if module_name in packed:
            yield module_name, module, packed[module_name].dequantize(), packed[module_name]
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)) \
                or type(module).__name__.endswith(("RMSNorm", "LayerNorm")) or module_name in gates:
            if module_name == "lm_head" and plan.tied:
                continue  # llama.cpp reuses token_embd when there is no output tensor
            yield module_name, module, module.weight.detach().float(), None


def _fitted_blocks(data: np.ndarray, qtype: str) -> np.ndarray:
    """Blocks of `qtype` fitted here, without calibration (uniform importance, round to nearest)."""
    w = torch.from_numpy(data)
    grid = fit_grid(qtype, w)
    return pack_blocks(round_codes(w, grid), grid)


@dataclass
class _Stored:
    """One tensor as GGUF stores it: data (blocks for quantized types), raw type, and what to report."""

    data: np.ndarray
    raw_dtype: object | None
    label: str


def _stored(module_name: str, module, weight: torch.Tensor, mod, plan: _Plan, config, f32: bool = False) -> _Stored:
    """One weight in its GGUF type; the label says "... (codes kept)" when the packed layer's own
    blocks go out as they are."""
    import gguf

    order = _row_order(module_name, config, weight.shape[0])
    kept = _kept_blocks(mod) if mod is not None and plan.keeps(mod) else None
    if kept is not None:
        return _Stored(kept[0] if order is None else kept[0][order], kept[1], kept[1].name + " (codes kept)")
    data = weight.numpy().astype(np.float32)
    data = data if order is None else data[order]
    if data.ndim == 1:  # a norm's weight
        data = data + np.float32(GGUF_ARCHITECTURES[config.model_type].norm_offset)
    if f32 and data.shape[0] == 1:
        data = data[0]  # a one-row gate (Qwen2-MoE's shared expert): llama.cpp declares a vector
    if data.ndim == 1 or f32:
        t = "F32"  # norms, and routers (small, and llama.cpp's converter keeps them F32)
    elif plan.mix is not None:
        t = tensor_type(plan.mix, module_name, plan.n_layers, data.shape[1], plan.tied)
    else:
        t = plan.simple_type(mod.format if mod is not None else None, module)
    if t in ("F16", "F32"):
        return _Stored(data.astype(np.float16 if t == "F16" else np.float32), None, t)
    qtype = gguf.GGMLQuantizationType[t]
    if t in ("Q8_0", "Q4_0") and plan.mix is None:
        return _Stored(gguf.quants.quantize(data, qtype), qtype, t)
    return _Stored(_fitted_blocks(data, t), qtype, t)


def _add_tensor(writer, gname: str, module_name: str, module, weight: torch.Tensor, mod, plan: _Plan,
                config, f32: bool = False) -> str:
    """Write one tensor; returns the GGUF type it was stored as."""
    stored = _stored(module_name, module, weight, mod, plan, config, f32)
    writer.add_tensor(gname + ".weight", stored.data, raw_dtype=stored.raw_dtype)
    return stored.label


def _add_experts(writer, gname: str, experts: list[tuple[str, object, torch.Tensor, object]], plan: _Plan,
                 config) -> str:
    """One projection of every expert of a block as one 3-D tensor [experts, rows, columns]."""
    stored = [_stored(name, module, weight, mod, plan, config) for name, module, weight, mod in experts]
    if len({(s.label, s.data.shape) for s in stored}) != 1:
        raise SlimkitError(f"GGUF export: the experts of {gname} were compressed differently "
                           f"({sorted({s.label for s in stored})}); llama.cpp stores them as one tensor of one type")
    writer.add_tensor(gname + ".weight", np.stack([s.data for s in stored]), raw_dtype=stored[0].raw_dtype)
    return stored[0].label


def _add_bias(writer, gname: str, module_name: str, module, config) -> None:
    """A linear's or a LayerNorm's bias in F32 (Qwen2's q/k/v, GPT-2), in the same row order as its weight."""
    bias = getattr(module, "bias", None)
    if not isinstance(module, torch.nn.Embedding) and isinstance(bias, torch.Tensor):
        data = bias.detach().float().numpy()
        order = _row_order(module_name, config, data.shape[0])
        writer.add_tensor(gname + ".bias", data if order is None else data[order])


class _TensorQueue:
    """Tensors collected, then added in llama-quantize's order: the global ones by name, then each
    block's by name (a block's weights lie together in the file, as llama.cpp writes them)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, np.ndarray, object]] = []

    def add_tensor(self, name: str, data: np.ndarray, raw_dtype=None) -> None:
        self.items.append((name, data, raw_dtype))

    @staticmethod
    def _key(name: str) -> tuple[int, str]:
        parts = name.split(".")
        return (int(parts[1]) + 1, name) if parts[0] == "blk" else (0, name)

    def write_to(self, writer) -> None:
        for name, data, raw_dtype in sorted(self.items, key=lambda item: self._key(item[0])):
            writer.add_tensor(name, data, raw_dtype=raw_dtype)


def check_gguf_export(model: torch.nn.Module, tokenizer, source_gguf: Path | None) -> None:
    """What would make the export fail, checked before any heavy work: the architecture, and a
    tokenizer llama.cpp can name (unless it is copied from the source GGUF)."""
    config = model.config
    if getattr(config, "model_type", None) not in GGUF_ARCHITECTURES or not hasattr(model, "lm_head"):
        raise SlimkitError(f"GGUF export covers {', '.join(GGUF_ARCHITECTURES)}; this model is "
                           f"{config.model_type}. Use `--to hf` or `--to compressed-tensors`.")
    problems = _gemma_problems(config) if GGUF_ARCHITECTURES[config.model_type].gemma else []
    if config.model_type == "falcon" and (getattr(config, "alibi", False) or not getattr(config, "parallel_attn", True)):
        problems.append("llama.cpp's falcon has rotary positions and parallel attention only")
    if problems:
        raise SlimkitError(f"GGUF export: llama.cpp would compute another function for this {config.model_type}: "
                           f"{'; '.join(problems)}. Use `--to compressed-tensors` or `--to hf`.")
    expected = GGUF_ARCHITECTURES[config.model_type].topk_renormalised
    if expected is not None and bool(getattr(config, "norm_topk_prob", expected)) != expected:
        raise SlimkitError(f"GGUF export: llama.cpp's {config.model_type} {'renormalises' if expected else 'keeps'} "
                           f"the chosen experts' routing weights and this model {'does not' if expected else 'does'} "
                           f"(norm_topk_prob), so llama.cpp would compute another function. "
                           "Use `--to compressed-tensors` or `--to hf`.")
    if source_gguf is None:
        if tokenizer is None:
            raise SlimkitError("GGUF export needs the tokenizer: this model directory has none")
        pre_tokenizer(tokenizer)


def export_gguf(model: torch.nn.Module, tokenizer, path: Path, qtype: str = "auto",
                source_gguf: Path | None = None, source_dir: Path | None = None, dense_blocks: dict | None = None
                ) -> dict:
    """`model` as a GGUF at `path`. Tokenizer and model description come from `source_gguf` when
    the model came from one (copied exactly), else from `tokenizer` and the HF dir `source_dir`.
    `dense_blocks`: llama.cpp blocks a gguf_quantize step recorded for tensors that are not packed
    linears (the embedding), written as they are like the packed ones."""
    import gguf

    check_gguf_export(model, tokenizer, source_gguf)
    config = model.config
    arch = gguf.MODEL_ARCH[GGUF_ARCHITECTURES[config.model_type].name]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    packed = packed_layers(model)
    plan = plan_types(model, packed, qtype)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _write_metadata(writer, config, packed, plan)
    if source_gguf is not None:
        copy_from_gguf(writer, source_gguf)
    else:
        _tokenizer_from_hf(writer, tokenizer)
        describe_from_hf(writer, source_dir, sum(p.numel() for p in model.parameters()))
    counts: dict[str, int] = {}
    gates = routers(model)
    tensors = _TensorQueue()
    for module_name, module, weight, mod in _weights(model, packed, plan, gates):
        if mod is None and module_name in (dense_blocks or {}):
            mod = GGMLBlocks.from_codes(dense_blocks[module_name], weight.shape[1])  # as a packed layer
        gname = names.get_name(module_name)
        if gname is None:
            raise SlimkitError(f"GGUF export: no llama.cpp name for {module_name}")
        stored = _add_tensor(tensors, gname, module_name, module, weight, mod, plan, config, module_name in gates)
        counts[stored] = counts.get(stored, 0) + 1
        _add_bias(tensors, gname, module_name, module, config)
    for stacked_name, experts in _expert_projections(model).items():
        gname = names.get_name(stacked_name)
        if gname is None:
            raise SlimkitError(f"GGUF export: no llama.cpp name for {stacked_name}")
        entries = [(n, model.get_submodule(n), *_expert_weight(model.get_submodule(n), packed.get(n))) for n in experts]
        stored = _add_experts(tensors, gname, entries, plan, config)
        counts[stored] = counts.get(stored, 0) + len(experts)
    tensors.write_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors_by_type": counts, "bytes": path.stat().st_size}
