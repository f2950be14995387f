"""Synthetic big checkpoints: random bf16 weights at the shape of a real model, for measuring
memory and time at scale on a machine that cannot download (or hold) the real one.

`synthetic_checkpoint("llama-3.1-8b")` writes a sharded HF directory (one shard per block, plus
the embedding and the head) under the cache, tensor by tensor: the process never holds more than
one tensor. The tokenizer is SmolLM2's (its ids fit any of these vocabularies). Quality measured on
these models is meaningless; memory and time are not.

    python -m benchmarks.synthetic llama-3.1-8b      # prints the directory
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch

from slimkit.io.outputs import output_directory
from slimkit.io.tensors import save_tensors_atomic
from slimkit.models.loading import cache_root

SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, num_hidden_layers=3, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=49152, tie_word_embeddings=False),
}
STD = 0.02  # the initializer range of these models


def _config(shape: str):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise KeyError(f"unknown synthetic shape {shape}; known: {', '.join(SHAPES)}")
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2, architectures=["LlamaForCausalLM"], dtype=torch.bfloat16)


def _tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 1:  # norms: around 1
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (STD * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def _groups(config) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """(shard name, its tensors) in order: the embedding, each block, then norm and head."""
    from slimkit.models.checks import meta_model

    skeleton = meta_model(config, "causal-lm")
    names = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]  # tied: the head appears once
    blocks = [[(n, s) for n, s in names if n.startswith(f"model.layers.{i}.")] for i in range(config.num_hidden_layers)]
    outer = [(n, s) for n, s in names if not n.startswith("model.layers.")]
    head = [(n, s) for n, s in outer if not n.startswith("model.embed_tokens")]
    first = [(n, s) for n, s in outer if n.startswith("model.embed_tokens")]
    return [("embed", first), *((f"block{i}", b) for i, b in enumerate(blocks)), ("head", head)]


def _tokenizer_source() -> Path:
    from slimkit.models.loading import gguf_cache_dir, load_model, resolve

    path, _ = resolve("smollm2-135m")
    cache = gguf_cache_dir(path)
    if not (cache / "tokenizer.json").is_file():
        load_model("smollm2-135m")
    return cache


def synthetic_checkpoint(shape: str, seed: int = 0, root: Path | None = None) -> Path:
    """The directory of the synthetic checkpoint `shape` (written once, atomically)."""
    config = _config(shape)
    final = (root or cache_root() / "synthetic") / f"{shape}-bf16-seed{seed}"
    if (final / "model.safetensors.index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    groups = _groups(config)
    with output_directory(final, overwrite=False, command="synthetic checkpoint") as tmp:
        weight_map, total = {}, 0
        for i, (_, tensors) in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            data = {n: _tensor(n, s, seed * 100003 + i * 1009 + j) for j, (n, s) in enumerate(tensors)}
            save_tensors_atomic(data, tmp / file)
            weight_map.update({n: file for n in data})
            total += sum(math.prod(s) * 2 for _, s in tensors)
            del data
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.save_pretrained(tmp)
        source = _tokenizer_source()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
    return final


if __name__ == "__main__":
    print(synthetic_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "llama-3.1-8b"))
