"""KL divergence from the base model and top-1 agreement (evaluation/divergence.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import CharTokenizer, tiny_llama
from slimkit.errors import SlimkitError
from slimkit.evaluation.divergence import (
    BaseDistribution,
    BaseLogprobs,
    DivergenceMeter,
    SummaryBuilder,
    token_divergence,
)
from slimkit.evaluation.logit_rows import ROWS_AT_ONCE
from slimkit.evaluation.perplexity import eval_windows


def token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """[seq, vocab] logits -> the log-probabilities of positions 0..seq-2 (each predicts the next)."""
    return F.log_softmax(logits[:-1].float(), dim=-1)


def summarise(logits: torch.Tensor, index: int, nll: float, tokens: int) -> BaseDistribution:
    """A window's cache entry from whole logits, a slice at a time as evaluation builds it."""
    builder = SummaryBuilder(index)
    for i in range(0, logits.shape[0] - 1, ROWS_AT_ONCE):
        builder.add(token_logprobs(logits[i : i + ROWS_AT_ONCE + 1]))
    return builder.finish(nll, tokens)


def _summary(logits: torch.Tensor, index: int = 0) -> BaseDistribution:
    return summarise(logits, index, 0.0, logits.shape[0] - 1)


def _exact_kld(base_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = F.log_softmax(base_logits[:-1].float(), -1), F.log_softmax(other_logits[:-1].float(), -1)
    # torch's kl_div(input=log q, target=log p, log_target) sums p (log p - log q)
    return F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)


def test_a_vocabulary_within_the_top_tokens_gives_the_textbook_kl_exactly():
    torch.manual_seed(0)
    base, other = torch.randn(7, 50), torch.randn(7, 50)  # 50 < TOP_K: nothing is left to sample
    kld, agree = token_divergence(_summary(base), token_logprobs(other))
    assert torch.allclose(kld, _exact_kld(base, other), atol=1e-6)
    assert torch.equal(agree, base[:-1].argmax(-1) == other[:-1].argmax(-1))
    same, agree_all = token_divergence(_summary(base), token_logprobs(base))
    assert torch.equal(same, torch.zeros_like(same)) and bool(agree_all.all())


def test_the_sampled_tail_estimates_the_kl_without_bias():
    """A 5,000-token vocabulary with a flat tail: top-64 + 64 draws per token against the exact KL."""
    torch.manual_seed(0)
    base = torch.randn(2049, 5000) * 2
    other = base + torch.randn(2049, 5000) * 0.5
    base_top = _summary(base)
    assert float(base_top.tail_mass.mean()) > 0.3  # most of the mass is in the sampled part
    kld, _ = token_divergence(base_top, token_logprobs(other))
    exact = _exact_kld(base, other)
    assert abs(float(kld.mean()) / float(exact.mean()) - 1) < 0.01
    head_only = (base_top.top_logprobs.exp() * (base_top.top_logprobs - token_logprobs(other).gather(
        -1, base_top.top_ids))).sum(-1)
    assert float(head_only.mean()) < 0.8 * float(exact.mean())  # the tail's share is real and estimated


def test_meter_mean_percentile_and_agreement():
    meter = DivergenceMeter()
    logits = torch.randn(101, 200)
    base = _summary(logits)
    for i in range(0, logits.shape[0] - 1, ROWS_AT_ONCE):
        meter.add_rows(base.rows(i, i + ROWS_AT_ONCE), token_logprobs(logits[i : i + ROWS_AT_ONCE + 1]))
    r = meter.result()
    assert (r.mean_kld, r.p99_kld, r.top1_agreement, r.tokens) == (0.0, 0.0, 1.0, 100)


def test_store_round_trip(tmp_path):
    store = BaseLogprobs(tmp_path / "s")
    summary = summarise(torch.randn(9, 300), 3, 12.5, 8)
    assert not store.has(3)
    store.write(3, summary)
    back = store.read(3)
    assert store.has(3) and store.window_nll(3) == (12.5, 8)
    for name in ("top_logprobs", "top_ids", "tail_logprobs", "tail_ids", "tail_mass"):
        assert torch.equal(getattr(back, name), getattr(summary, name)), name
    assert not list((tmp_path / "s").glob(".*tmp"))  # written atomically, no temp left
    (tmp_path / "s" / "window-00003.safetensors").write_bytes(b"\x00" * 20)  # damaged in the cache
    with pytest.raises(SlimkitError, match="damaged.*delete"):
        store.read(3)


@pytest.mark.slow
def test_a_262k_vocabulary_caches_16_windows_in_under_300_mb_within_1_percent(tmp_path):
    """A tiny LLaMA with tied embeddings and a 262,144-token vocabulary, 16 windows of 512 tokens:
    the cache stays small whatever the vocabulary, and the KLD of a perturbed copy is within 1%."""
    from slimkit.data import load_split
    from slimkit.evaluation.perplexity import LogprobsUse, PerplexityProtocol, perplexity

    vocab, seqlen = 262_144, 512
    base = tiny_llama(vocab_size=vocab, tie_word_embeddings=True, initializer_range=0.3, max_position_embeddings=seqlen)
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tokenizer = CharTokenizer()
    store = BaseLogprobs(tmp_path / "cache")
    protocol = PerplexityProtocol(seqlen, 16)
    split = load_split()
    first = perplexity(base, tokenizer, split, protocol, logprobs=LogprobsUse(record=store))
    assert store.size_bytes() < 300e6
    again = perplexity(base, tokenizer, split, protocol, logprobs=LogprobsUse(record=store))
    assert again.ppl == first.ppl  # read back from the cache
    measured = perplexity(other, tokenizer, split, protocol, logprobs=LogprobsUse(compare=store))
    windows = eval_windows(tokenizer, split, seqlen)[:16]
    with torch.inference_mode():
        exact = torch.cat([_exact_kld(base(input_ids=w[None]).logits[0], other(input_ids=w[None]).logits[0])
                           for w in windows])
    assert abs(measured.divergence["mean_kld"] / float(exact.mean()) - 1) < 0.01


@pytest.mark.slow  # 18 s; the default tier keeps KLD's exactness against the textbook on a tiny model
def test_kld_zero_unchanged_and_positive_after_rtn_int3(smollm2_first_load, tmp_path):
    """SmolLM2: the unchanged model is at KLD exactly 0; RTN int3 moves its distributions."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.protocol import EvalSettings
    from slimkit.recipes import parse_recipe

    identity = parse_recipe({"name": "nothing", "steps": [
        {"method": "rtn_quantize", "bits": 3, "group_size": 64, "ignore": ["*"]}]})
    int3 = parse_recipe({"name": "rtn-int3", "steps": [{"method": "rtn_quantize", "bits": 3, "group_size": 64}]})
    settings = EvalSettings(max_windows=2)
    unchanged, = compress_to_dir("smollm2-135m", [identity], tmp_path / "same", settings)
    assert unchanged.compressed.divergence.mean_kld == 0.0
    assert unchanged.compressed.divergence.top1_agreement == 1.0
    report, = compress_to_dir("smollm2-135m", [int3], tmp_path / "int3", settings)
    d = report.compressed.divergence
    assert d.tokens == 2 * 511
    assert d.mean_kld > 0.05 and d.p99_kld > d.mean_kld  # int3 RTN is far from lossless
    assert d.top1_agreement < 0.95
