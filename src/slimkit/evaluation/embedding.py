"""Encoder quality: cosine similarity of sentence embeddings against the uncompressed model.

Sentence embedding = mean of the last hidden states over non-padding tokens (as
sentence-transformers does for all-MiniLM-L6-v2), L2-normalised. Texts are the first
`n_texts` evaluation documents, truncated to `max_length` tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.data.corpus import TextSplit
from slimkit.devices import model_device, to_device
from slimkit.errors import ShapeError
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
    # Width-free: Pearson correlation of the pairwise cosine similarities (off-diagonal) of the
    # two embedding sets; it is what retrieval and clustering see.
    pairwise_agreement: float | None = None
    projected: bool = False  # the embeddings were mapped to the reference width first

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
        hidden = model(**to_device(dict(enc), model_device(model))).last_hidden_state.cpu()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def pairwise_agreement(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Correlation of the two sets' pairwise cosine similarities (any widths)."""
    n = len(reference)
    off = ~torch.eye(n, dtype=torch.bool)
    a = (F.normalize(reference, dim=-1) @ F.normalize(reference, dim=-1).T)[off]
    b = (F.normalize(embeddings, dim=-1) @ F.normalize(embeddings, dim=-1).T)[off]
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if n > 2 else float("nan")


def similarity(reference: torch.Tensor, embeddings: torch.Tensor, split_hash: str, seconds: float,
               projection: torch.Tensor | None = None) -> EmbeddingSimilarity:
    """Cosine of each text's embedding to the reference's. When the widths differ (a model whose
    hidden size was pruned), `projection` ([reference width, width]) maps them first."""
    mapped = embeddings
    if embeddings.shape[-1] != reference.shape[-1]:
        if projection is None:
            raise ShapeError(f"embeddings of width {embeddings.shape[-1]} cannot be compared with the reference's "
                             f"{reference.shape[-1]} without a projection")
        mapped = F.normalize(embeddings @ projection.T.to(embeddings.dtype), dim=-1)
    cos = (reference * mapped).sum(-1)
    return EmbeddingSimilarity(
        mean_cosine=float(cos.mean()),
        min_cosine=float(cos.min()),
        texts=cos.numel(),
        split_hash=split_hash,
        seconds=seconds,
        pairwise_agreement=pairwise_agreement(reference, embeddings),
        projected=mapped is not embeddings,
    )
