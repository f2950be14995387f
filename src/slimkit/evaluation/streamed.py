"""Perplexity of a model that does not fit in RAM, on the same protocol as `perplexity.py`.

Every evaluation window goes through block 0, then block 1, ..., one block read from the files at
a time. The head is applied in slices of the vocabulary with a running log-sum-exp, so neither
the model nor the head is ever whole in memory. Same windows, same NLL; the sums differ from the
in-memory path only by float rounding.
"""

from __future__ import annotations

import math
import time

import torch

from slimkit.calibration.engine import ActivationStore, BlockAccess, capture_block_inputs, forward_block
from slimkit.data.corpus import TextSplit
from slimkit.evaluation.logit_rows import finish_logits
from slimkit.evaluation.perplexity import PerplexityProtocol, PerplexityResult, eval_windows
from slimkit.models.adapters import submodule_at
from slimkit.models.loading import require_tokenizer
from slimkit.models.streamed import CheckpointShards, StreamedModel
from slimkit.progress import NoProgress, Progress

HEAD_SLICE_BYTES = 1 << 26  # rows of the head read at once (as fp32)


class _EmbeddingsFrom(BlockAccess):
    def __init__(self, streamed: StreamedModel, weights: CheckpointShards):
        self.streamed, self.weights = streamed, weights

    def model_inputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"inputs_embeds": self.streamed.embed(batch, self.weights)}


def _head_name(streamed: StreamedModel, weights: CheckpointShards) -> str:
    head = streamed.adapter.lm_head
    return f"{head}.weight" if head and f"{head}.weight" in weights.files else streamed.embedding_name()


def _chunked_nll(streamed: StreamedModel, weights: CheckpointShards, hidden: list[torch.Tensor],
                 batches: list[torch.Tensor]) -> tuple[float, int]:
    """Summed NLL of the next tokens from the final hidden states, the head read in row slices."""
    name = _head_name(streamed, weights)
    vocab, width = weights.shapes[name]
    step = max(1024, HEAD_SLICE_BYTES // (width * 4))
    feats = [h[:, :-1].reshape(-1, width) for h in hidden]
    targets = [b[:, 1:].reshape(-1) for b in batches]
    lse = [torch.full((t.numel(),), -math.inf) for t in targets]
    picked = [torch.zeros(t.numel()) for t in targets]
    bias = name.removesuffix(".weight") + ".bias"
    for start in range(0, vocab, step):
        rows = weights.rows(name, start, min(vocab, start + step), streamed.compute_dtype)
        shift = weights.rows(bias, start, start + rows.shape[0], torch.float32) if bias in weights.files else 0.0
        for i, (x, t) in enumerate(zip(feats, targets)):
            logits = finish_logits((x @ rows.T).float() + shift, streamed.model.config)
            lse[i] = torch.logaddexp(lse[i], logits.logsumexp(-1))
            inside = (t >= start) & (t < start + rows.shape[0])
            picked[i][inside] = logits[inside, t[inside] - start]
    nll = sum(float((a - b).sum()) for a, b in zip(lse, picked))
    return nll, sum(t.numel() for t in targets)


@torch.inference_mode()
def streamed_perplexity(streamed: StreamedModel, weights: CheckpointShards, split: TextSplit,
                        protocol: PerplexityProtocol = PerplexityProtocol(), progress: Progress = NoProgress(),
                        description: str = "perplexity", device: torch.device | str = "cpu") -> PerplexityResult:
    """ppl of the causal LM whose tensors `weights` holds (the skeleton is `streamed`'s); each
    block runs on `device`, the activations, final norm and head on the CPU."""
    require_tokenizer(streamed, "perplexity")
    start = time.perf_counter()
    windows = eval_windows(streamed.tokenizer, split, protocol.seqlen)
    total = windows.shape[0]
    windows = windows[: protocol.max_windows] if protocol.max_windows is not None else windows
    batches = list(torch.split(windows, protocol.batch_size))
    store = ActivationStore()
    try:
        extra = capture_block_inputs(streamed.model, streamed.adapter, windows, protocol.batch_size, store,
                                     _EmbeddingsFrom(streamed, weights))
        for block in progress.track(list(streamed.adapter.get_blocks(streamed.model)), description):
            streamed.materialize(block, weights)
            forward_block(block.to(device), store, extra, torch.device(device))
            streamed.release(block)
        norm = submodule_at(streamed.model.base_model, streamed.adapter.final_norm)
        streamed.materialize(norm, weights)
        hidden = [norm(store[i]) for i in range(len(store))]
        streamed.release(norm)
        nll, count = _chunked_nll(streamed, weights, hidden, batches)
    finally:
        store.close()
    mean = nll / count
    return PerplexityResult(ppl=math.exp(mean), mean_nll=mean, tokens=count, windows=windows.shape[0],
                            total_windows=total, seqlen=protocol.seqlen, split_hash=split.split_hash,
                            seconds=time.perf_counter() - start)
