"""Export a LLaMA-family model to GGUF (llama.cpp), with the `gguf` package's writer and quantizers.

Linears go out as Q8_0 or Q4_0 (blocks of 32, one fp16 scale each) or F16; norms as F32, the
embedding as F16. Q/K rows are permuted to llama.cpp's rotary layout (transformers' GGUF
loader undoes it). Tokenizer and model metadata: see `gguf_metadata.py`.

Requantizing int4 codes of groups of 64 into Q4_0 blocks of 32 is not lossless (Q4_0 picks its
own scale per 32), so the export is verified by perplexity, not bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slimkit.errors import SlimkitError
from slimkit.export.gguf_metadata import copy_from_gguf, describe_from_hf, pre_tokenizer
from slimkit.formats import packed_layers

QTYPES = ("auto", "q8_0", "q4_0", "f16", "f32")


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


def _qtype_for(name: str, fmt: str | None, requested: str):
    import gguf

    t = gguf.GGMLQuantizationType
    table = {"q8_0": t.Q8_0, "q4_0": t.Q4_0, "f16": t.F16, "f32": t.F32}
    if requested != "auto":
        return table[requested]
    return {"int4": t.Q4_0, "int8": t.Q8_0, "w8a8": t.Q8_0}.get(fmt, t.F16)


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


def _permuted_int4_blocks(mod, module_name: str, config):
    """q/k rows are permuted for llama.cpp; rows move whole, so the codes and scales move with them."""
    heads = config.num_attention_heads if module_name.endswith("q_proj") else config.num_key_value_heads
    idx = _permute(np.arange(mod.out_features)[:, None], heads)[:, 0]
    blocks = int4_blocks(mod)
    return None if blocks is None else (blocks[0][idx], blocks[1])


def _write_metadata(writer, config, packed: dict, qtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if qtype in ("auto", "q4_0") and any(
        m.format == "int4" for m in packed.values()) else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _weights(model: torch.nn.Module, packed: dict):
    """(module name, module, fp32 weight, packed format or None) for every tensor GGUF stores."""
    tied = getattr(model.config, "tie_word_embeddings", False) and "lm_head" not in packed
    for module_name, module in model.named_modules():
        if module_name in packed:
            yield module_name, module, packed[module_name].dequantize(), packed[module_name].format
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or type(module).__name__.endswith("RMSNorm"):
            if module_name == "lm_head" and tied:
                continue  # llama.cpp reuses token_embd when there is no output tensor
            yield module_name, module, module.weight.detach().float(), None


def _add_tensor(writer, gname: str, module_name: str, module, weight: torch.Tensor, fmt: str | None,
                packed: dict, qtype: str, config) -> str:
    """Write one tensor; returns the GGUF type it was stored as (int4 codes are kept as they are)."""
    import gguf

    if fmt == "int4" and qtype in ("auto", "q4_0"):
        direct = (_permuted_int4_blocks(packed[module_name], module_name, config)
                  if module_name.endswith(("q_proj", "k_proj")) else int4_blocks(packed[module_name]))
        if direct is not None:
            writer.add_tensor(gname + ".weight", direct[0], raw_dtype=direct[1])
            return direct[1].name + " (codes kept)"
    data = weight.numpy().astype(np.float32)
    if module_name.endswith("q_proj"):
        data = _permute(data, config.num_attention_heads)
    elif module_name.endswith("k_proj"):
        data = _permute(data, config.num_key_value_heads)
    if data.ndim == 1:
        t = gguf.GGMLQuantizationType.F32
    elif isinstance(module, torch.nn.Embedding):
        t = gguf.GGMLQuantizationType.F16
    else:
        t = _qtype_for(module_name, fmt, qtype)
    if t == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(gname + ".weight", data.astype(np.float16))
    elif t == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(gname + ".weight", data)
    else:
        writer.add_tensor(gname + ".weight", gguf.quants.quantize(data, t), raw_dtype=t)
    return t.name


def check_gguf_export(model: torch.nn.Module, tokenizer, source_gguf: Path | None) -> None:
    """What would make the export fail, checked before any heavy work: the architecture, and a
    tokenizer llama.cpp can name (unless it is copied from the source GGUF)."""
    config = model.config
    if getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2") or not hasattr(model, "lm_head"):
        raise SlimkitError(f"GGUF export covers LLaMA-family decoders; this model is {config.model_type}. "
                           "Use `--to hf` or `--to compressed-tensors`.")
    if source_gguf is None:
        if tokenizer is None:
            raise SlimkitError("GGUF export needs the tokenizer: this model directory has none")
        pre_tokenizer(tokenizer)


def export_gguf(model: torch.nn.Module, tokenizer, path: Path, qtype: str = "auto",
                source_gguf: Path | None = None, source_dir: Path | None = None) -> dict:
    """`model` as a GGUF at `path`. Tokenizer and model description come from `source_gguf` when
    the model came from one (copied exactly), else from `tokenizer` and the HF dir `source_dir`."""
    import gguf

    check_gguf_export(model, tokenizer, source_gguf)
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    packed = packed_layers(model)
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer, config, packed, qtype)
    if source_gguf is not None:
        copy_from_gguf(writer, source_gguf)
    else:
        _tokenizer_from_hf(writer, tokenizer)
        describe_from_hf(writer, source_dir, sum(p.numel() for p in model.parameters()))
    counts: dict[str, int] = {}
    for module_name, module, weight, fmt in _weights(model, packed):
        gname = names.get_name(module_name)
        if gname is None:
            raise SlimkitError(f"GGUF export: no llama.cpp name for {module_name}")
        stored = _add_tensor(writer, gname, module_name, module, weight, fmt, packed, qtype, config)
        counts[stored] = counts.get(stored, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors_by_type": counts, "bytes": path.stat().st_size}
