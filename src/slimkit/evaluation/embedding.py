"""Encoder quality: cosine similarity of sentence embeddings against the uncompressed model.

Sentence embedding = mean of the last hidden states over non-padding tokens (as
sentence-transformers does for all-MiniLM-L6-v2), L2-normalised. Texts are the first
`n_texts` evaluation documents, truncated to `max_length` tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.data.corpus import TextSplit
from slimkit.progress import NoProgress, Progress


@dataclass(frozen=True)
class EmbeddingProtocol:
    n_texts: int = 256
    max_length: int = 128
    batch_size: int = 32

    def describe(self) -> str:
        return f"first {self.n_texts} evaluation documents, <= {self.max_length} tokens, mean pooling"


@dataclass(frozen=True)
class EmbeddingSimilarity:
    mean_cosine: float
    min_cosine: float
    texts: int
    split_hash: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    split: TextSplit,
    protocol: EmbeddingProtocol = EmbeddingProtocol(),
    progress: Progress = NoProgress(),
) -> torch.Tensor:
    texts = [d.text for d in split.evaluation[: protocol.n_texts]]
    batches = [texts[i : i + protocol.batch_size] for i in range(0, len(texts), protocol.batch_size)]
    out = []
    model.eval()
    for batch in progress.track(batches, "embeddings"):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=protocol.max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def similarity(reference: torch.Tensor, embeddings: torch.Tensor, split_hash: str, seconds: float) -> EmbeddingSimilarity:
    cos = (reference * embeddings).sum(-1)
    return EmbeddingSimilarity(
        mean_cosine=float(cos.mean()),
        min_cosine=float(cos.min()),
        texts=cos.numel(),
        split_hash=split_hash,
        seconds=seconds,
    )
