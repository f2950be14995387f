"""Evaluation logits a slice of positions at a time: the same ppl and KLD as whole logits, the head
never sees more than ROWS_AT_ONCE positions, and models whose head cannot be applied apart (the
check, not an assumption) fall back to whole logits."""

import importlib
import math

import pytest
import torch

from conftest import CharTokenizer, tiny_llama
from slimkit.evaluation.divergence import BaseLogprobs
from slimkit.evaluation.logit_rows import PROBE_TOKENS, ROWS_AT_ONCE, head_applies_apart
from slimkit.evaluation.perplexity import LogprobsUse, PerplexityProtocol, perplexity
from tiny_archs import tiny_model

perplexity_module = importlib.import_module("slimkit.evaluation.perplexity")  # the package exports the function
SEQLEN = 300  # three slices of the head: 128 + 128 + 43 predicted positions


@pytest.fixture(scope="module")
def text_split():
    from slimkit.data import load_split

    return load_split()


def _head_rows(model) -> list[int]:
    seen: list[int] = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-2]))
    return seen


def test_sliced_logits_give_the_whole_logits_ppl_and_kld(text_split, tmp_path, monkeypatch):
    model, tokenizer = tiny_llama(vocab_size=300, max_position_embeddings=SEQLEN), CharTokenizer()
    protocol = PerplexityProtocol(SEQLEN, 3, batch_size=2)
    seen = _head_rows(model)
    store = BaseLogprobs(tmp_path / "apart")
    apart = perplexity(model, tokenizer, text_split, protocol, logprobs=LogprobsUse(record=store))
    assert seen[0] == PROBE_TOKENS and max(seen[1:]) == ROWS_AT_ONCE and len(seen) > 2
    monkeypatch.setattr(perplexity_module, "head_applies_apart", lambda *a: False)
    whole = perplexity(model, tokenizer, text_split, protocol, logprobs=LogprobsUse(compare=store))
    assert math.isclose(apart.ppl, whole.ppl, rel_tol=1e-6)
    assert whole.divergence["mean_kld"] < 1e-6 and whole.divergence["top1_agreement"] == 1.0
    assert whole.divergence["tokens"] == 3 * (SEQLEN - 1)


def test_the_split_is_checked_soft_capping_included_and_refused_when_the_model_does_more():
    probe = torch.randint(3, 200, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    gemma2 = tiny_model("gemma2", final_logit_softcapping=2.0)  # small cap: every logit is capped
    assert head_applies_apart(gemma2, probe)
    llama = tiny_llama(vocab_size=300)
    forward = llama.forward

    def doubled(*args, **kwargs):  # a post-processing finish_logits does not know
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    llama.forward = doubled
    assert not head_applies_apart(llama, probe)
