"""A model's quality on the fixed protocol: perplexity (+ KL divergence from the base model's
distributions) for decoders, embedding cosine for encoders."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from slimkit.data.corpus import TextSplit
from slimkit.devices import placed
from slimkit.evaluation.divergence import BaseLogprobs
from slimkit.evaluation.embedding import EmbeddingProtocol, sentence_embeddings, similarity
from slimkit.evaluation.perplexity import LogprobsUse, PerplexityProtocol, perplexity
from slimkit.models.loading import LoadedModel, cache_root, require_tokenizer
from slimkit.progress import Progress
from slimkit.protocol import EvalSettings
from slimkit.results import Divergence, Quality


def protocol_text(settings: EvalSettings, kind: str) -> str:
    """The quality protocol in words, for reports."""
    if kind == "causal-lm":
        return PerplexityProtocol(settings.seqlen, settings.max_windows).describe()
    return EmbeddingProtocol(settings.n_texts).describe()


class QualityMeter:
    """Measures a model's quality on the fixed protocol, against the dense baseline."""

    def __init__(self, loaded: LoadedModel, split: TextSplit, settings: EvalSettings, progress: Progress,
                 device: str = "cpu"):
        self.loaded, self.split, self.settings, self.progress = loaded, split, settings, progress
        self.device = device  # where the model is evaluated (it goes back to the CPU afterwards)
        self.reference: torch.Tensor | None = None  # encoders: the base model's embeddings
        self.base_logprobs: BaseLogprobs | None = None  # decoders: the base model's distributions

    def measure(self, label: str, projection: torch.Tensor | None = None) -> Quality:
        """The first call measures the base model (and keeps its next-token distributions, on
        disk); later calls, or a meter given `base_logprobs`, also measure the divergence."""
        lm, s = self.loaded, self.settings
        if lm.kind == "causal-lm":
            require_tokenizer(lm, "perplexity")
            if self.base_logprobs is None:
                self.base_logprobs = BaseLogprobs.for_model(cache_root(), Path(lm.source), self.split.split_hash,
                                                            s.seqlen)
                use = LogprobsUse(record=self.base_logprobs)
            else:
                use = LogprobsUse(compare=self.base_logprobs)
            with placed(lm.model, self.device):
                r = perplexity(lm.model, lm.tokenizer, self.split, PerplexityProtocol(s.seqlen, s.max_windows),
                               self.progress, f"ppl ({label})", use)
            divergence = Divergence.from_dict(r.divergence) if r.divergence else None
            return Quality(metric="ppl", value=r.ppl, details=r.to_dict(), divergence=divergence)
        start = time.perf_counter()
        with placed(lm.model, self.device):
            emb = sentence_embeddings(lm.model, lm.tokenizer, self.split, EmbeddingProtocol(s.n_texts), self.progress)
        if self.reference is None:
            self.reference = emb
        r = similarity(self.reference, emb, self.split.split_hash, time.perf_counter() - start, projection)
        return Quality(metric="cosine", value=r.mean_cosine, details=r.to_dict())
