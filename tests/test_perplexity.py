import math

import torch

from conftest import tiny_llama
from slimkit.data import split_documents
from slimkit.data.corpus import Document
from slimkit.evaluation import PerplexityProtocol, eval_windows, perplexity


def _split(n=40):
    docs = [Document(f"t{i}", f"Sentence {i}: the quick brown fox jumps over the lazy dog.") for i in range(n)]
    return split_documents(docs, "test", eval_fraction=0.5)


def test_perplexity_matches_hand_computation(char_tokenizer):
    split = _split()
    model = tiny_llama()
    seqlen = 16
    result = perplexity(model, char_tokenizer, split, PerplexityProtocol(seqlen=seqlen, max_windows=3))

    # by hand: join with a blank line, tokenize, cut windows of seqlen-1, prepend BOS
    text = "\n\n".join(d.text for d in split.evaluation)
    ids = char_tokenizer(text)["input_ids"]
    body = seqlen - 1
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            window = [1] + ids[w * body:(w + 1) * body]
            logits = model(torch.tensor([window])).logits[0]
            for pos in range(1, len(window)):
                logp = logits[pos - 1].double().log_softmax(-1)
                nll -= float(logp[window[pos]])
                count += 1
    assert result.tokens == count == 3 * body
    assert result.windows == 3 and result.total_windows == len(ids) // body
    assert math.isclose(result.ppl, math.exp(nll / count), rel_tol=1e-4)


def test_windows_follow_protocol(char_tokenizer):
    split = _split()
    w = eval_windows(char_tokenizer, split, 10)
    assert w.shape[1] == 10 and (w[:, 0] == 1).all()
    assert (w[:, 1:] != 1).any()


def test_batching_does_not_change_ppl(char_tokenizer):
    split, model = _split(), tiny_llama()
    a = perplexity(model, char_tokenizer, split, PerplexityProtocol(16, 6, batch_size=1))
    b = perplexity(model, char_tokenizer, split, PerplexityProtocol(16, 6, batch_size=3))
    assert math.isclose(a.ppl, b.ppl, rel_tol=1e-5)
