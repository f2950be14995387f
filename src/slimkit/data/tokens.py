"""Token streams and deterministic calibration windows."""

from __future__ import annotations

from typing import Any

import torch

from slimkit.data.corpus import Document, TextSplit
from slimkit.errors import DataError

DOCUMENT_SEPARATOR = "\n\n"
_STREAMS: dict[tuple, torch.Tensor] = {}


def token_stream(tokenizer: Any, docs: tuple[Document, ...], key: tuple | None = None) -> torch.Tensor:
    """Documents joined with a blank line, tokenized without special tokens (1-D int64)."""
    cache_key = (key, getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer)) if key else None
    if cache_key and cache_key in _STREAMS:
        return _STREAMS[cache_key]
    # Tokenize per chunk of documents: one huge string trips length warnings and is slower.
    ids: list[int] = []
    chunk = 256
    for start in range(0, len(docs), chunk):
        piece = DOCUMENT_SEPARATOR.join(d.text for d in docs[start : start + chunk])
        if start:
            piece = DOCUMENT_SEPARATOR + piece
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    stream = torch.tensor(ids, dtype=torch.long)
    if cache_key:
        _STREAMS[cache_key] = stream
    return stream


def bos_id(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def calibration_windows(
    tokenizer: Any, split: TextSplit, n: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """`n` windows of `seqlen` tokens drawn from the calibration documents, deterministically.

    Each window starts with BOS when the tokenizer has one, like the evaluation windows.
    """
    if n < 1 or seqlen < 2:
        raise DataError(f"need n >= 1 and seqlen >= 2, got n={n}, seqlen={seqlen}")
    stream = token_stream(tokenizer, split.calibration, key=("cal", split.split_hash))
    bos = bos_id(tokenizer)
    body = seqlen - 1 if bos is not None else seqlen
    if stream.numel() <= body:
        raise DataError(f"calibration text has {stream.numel()} tokens; a window needs {body + 1}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - body, (n,), generator=gen)
    windows = torch.stack([stream[s : s + body] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows
