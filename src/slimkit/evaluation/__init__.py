"""Evaluation on fixed protocols: perplexity, embedding similarity, size accounting."""

from slimkit.evaluation.embedding import EmbeddingProtocol, EmbeddingSimilarity, sentence_embeddings, similarity
from slimkit.evaluation.perplexity import PerplexityProtocol, PerplexityResult, eval_windows, perplexity, window_nll
from slimkit.evaluation.size import bytes_by_kind, files_bytes

__all__ = [
    "EmbeddingProtocol",
    "EmbeddingSimilarity",
    "PerplexityProtocol",
    "PerplexityResult",
    "bytes_by_kind",
    "eval_windows",
    "files_bytes",
    "perplexity",
    "sentence_embeddings",
    "similarity",
    "window_nll",
]
