"""Shared fixtures: tiny random models for unit tests, the packaged models for real tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def slimkit_cache(tmp_path_factory):
    """A cold model cache for this test session (so the cache-miss path is exercised too)."""
    path = tmp_path_factory.mktemp("slimkit-cache")
    old = os.environ.get("SLIMKIT_CACHE")
    os.environ["SLIMKIT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SLIMKIT_CACHE", None)
    else:
        os.environ["SLIMKIT_CACHE"] = old


@pytest.fixture(scope="session")
def smollm2_first_load(slimkit_cache):
    """The first (cache-miss) load of the packaged SmolLM2 GGUF."""
    from slimkit.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture()
def smollm2(smollm2_first_load):
    """A fresh SmolLM2 from the cache, safe to modify."""
    from slimkit.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_first_load):
    return smollm2_first_load.tokenizer


@pytest.fixture(scope="session")
def split():
    from slimkit.data import load_split

    return load_split()


class OneLinear(torch.nn.Module):
    """The smallest block: one bias-free linear (named `proj` inside the block) set to `weight`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight.data.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def tiny_llama(vocab_size: int = 96, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random LLaMA saved as an HF dir with SmolLM2's real tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=len(smollm2_tokenizer)).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


class CharTokenizer:
    """A character tokenizer with BOS=1, enough for hand-checkable perplexity."""

    bos_token_id = 1
    name_or_path = "char-tokenizer"

    def __len__(self):
        return 96

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 94) for c in text]}


@pytest.fixture()
def char_tokenizer():
    return CharTokenizer()
