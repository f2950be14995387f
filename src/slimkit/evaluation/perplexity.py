"""Perplexity on the fixed protocol (printed with every result, never changed silently).

Protocol: the evaluation documents, joined with a blank line, are tokenized without special
tokens and cut into non-overlapping windows. Each window is `seqlen` tokens of model input: BOS
followed by `seqlen - 1` text tokens when the tokenizer has a BOS token, else `seqlen` text
tokens. The trailing partial window is dropped. ppl = exp(mean NLL over every predicted token).
`max_windows` evaluates only the first windows (quick runs); None is the full protocol.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.data.corpus import TextSplit
from slimkit.data.tokens import bos_id, token_stream
from slimkit.devices import model_device
from slimkit.errors import DataError
from slimkit.evaluation.divergence import BaseLogprobs, DivergenceMeter, token_logprobs
from slimkit.progress import NoProgress, Progress


@dataclass(frozen=True)
class PerplexityProtocol:
    seqlen: int = 512
    max_windows: int | None = None  # None: every window (the full protocol)
    batch_size: int = 1

    def describe(self) -> str:
        scope = "all windows" if self.max_windows is None else f"first {self.max_windows} windows"
        return f"seqlen {self.seqlen}, non-overlapping, BOS-prefixed, {scope}"


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float
    tokens: int  # predicted tokens
    windows: int
    total_windows: int
    seqlen: int
    split_hash: str
    seconds: float
    divergence: dict | None = None  # KLD from the base model and top-1 agreement (DivergenceResult)

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(tokenizer: Any, split: TextSplit, seqlen: int) -> torch.Tensor:
    """All evaluation windows [n, seqlen] of the fixed protocol."""
    stream = token_stream(tokenizer, split.evaluation, key=("eval", split.split_hash))
    bos = bos_id(tokenizer)
    body = seqlen - 1 if bos is not None else seqlen
    n = stream.numel() // body
    if n == 0:
        raise DataError(f"evaluation text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    windows = stream[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def _nll(logits: torch.Tensor, windows: torch.Tensor) -> tuple[float, int]:
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum"
    )
    return float(loss), windows[:, 1:].numel()


@torch.inference_mode()
def window_nll(model: nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of tokens 1..L-1 given their prefixes, and how many tokens were predicted."""
    return _nll(model(input_ids=windows).logits.float(), windows)


@dataclass
class LogprobsUse:
    """What an evaluation does with full distributions: keep this model's as the base (`record`),
    and/or measure the divergence from a stored base (`compare`)."""

    record: BaseLogprobs | None = None
    compare: BaseLogprobs | None = None


def _use_logprobs(use: LogprobsUse, logits: torch.Tensor, first: int, meter: DivergenceMeter) -> None:
    lp = token_logprobs(logits)
    for j in range(lp.shape[0]):
        if use.record is not None and not use.record.has(first + j):
            use.record.write(first + j, lp[j])
        if use.compare is not None:
            meter.add(use.compare.read(first + j), lp[j])


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    split: TextSplit,
    protocol: PerplexityProtocol = PerplexityProtocol(),
    progress: Progress = NoProgress(),
    description: str = "perplexity",
    logprobs: LogprobsUse | None = None,
) -> PerplexityResult:
    """ppl on the protocol; with `logprobs`, also records the base distributions or measures the
    KL divergence from them (in the same forward passes)."""
    if tokenizer is None:
        raise DataError("perplexity needs a tokenizer, and none was loaded for this model (the warning above says why)")
    start = time.perf_counter()
    windows = eval_windows(tokenizer, split, protocol.seqlen)
    total = windows.shape[0]
    if protocol.max_windows is not None:
        windows = windows[: protocol.max_windows]
    batches = list(torch.split(windows, protocol.batch_size))
    nll, count, first = 0.0, 0, 0
    meter = DivergenceMeter()
    model.eval()
    device = model_device(model)
    for batch in progress.track(batches, description):
        with torch.inference_mode():
            logits = model(input_ids=batch.to(device)).logits.float().cpu()
        batch_nll, batch_count = _nll(logits, batch)
        if logprobs is not None:
            _use_logprobs(logprobs, logits, first, meter)
        nll, count, first = nll + batch_nll, count + batch_count, first + batch.shape[0]
    mean = nll / count
    return PerplexityResult(
        ppl=math.exp(mean),
        mean_nll=mean,
        tokens=count,
        windows=windows.shape[0],
        total_windows=total,
        seqlen=protocol.seqlen,
        split_hash=split.split_hash,
        seconds=time.perf_counter() - start,
        divergence=meter.result().to_dict() if meter.kld else None,
    )
