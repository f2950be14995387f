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
from slimkit.evaluation.divergence import BaseLogprobs, DivergenceMeter, SummaryBuilder
from slimkit.evaluation.logit_rows import PROBE_TOKENS, ROWS_AT_ONCE, BatchLogits, head_applies_apart
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


def _cached_base(use: LogprobsUse | None, windows: int) -> list[tuple[float, int]] | None:
    """The base's (NLL, tokens) of every window when all are cached: its perplexity is read back,
    with no forward pass (the cache is keyed by the weight files, the split and the window length)."""
    if use is None or use.record is None or use.compare is not None:
        return None
    if not all(use.record.has(i) for i in range(windows)):
        return None
    return [use.record.window_nll(i) for i in range(windows)]


def score_window(logits: BatchLogits, j: int, window: torch.Tensor, index: int, use: LogprobsUse | None,
                  meter: DivergenceMeter) -> tuple[float, int]:
    """One window's summed NLL and predicted tokens, ROWS_AT_ONCE positions at a time; on the way
    the base's summary recorded (`use.record`) or the divergence from it measured (`use.compare`)."""
    predicted = window.shape[0] - 1
    builder = SummaryBuilder(index) if use is not None and use.record is not None and not use.record.has(index) \
        else None
    base = use.compare.read(index) if use is not None and use.compare is not None else None
    nll = 0.0
    for start in range(0, predicted, ROWS_AT_ONCE):
        stop = min(start + ROWS_AT_ONCE, predicted)
        logprobs = F.log_softmax(logits.rows(j, start, stop), dim=-1)
        nll -= float(logprobs.gather(-1, window[start + 1 : stop + 1, None]).sum())
        if builder is not None:
            builder.add(logprobs)
        if base is not None:
            meter.add_rows(base.rows(start, stop), logprobs)
    if builder is not None:
        use.record.write(index, builder.finish(nll, predicted))
    return nll, predicted


def _forward_windows(model: nn.Module, windows: torch.Tensor, protocol: PerplexityProtocol, progress: Progress,
                     description: str, logprobs: LogprobsUse | None, meter: DivergenceMeter) -> tuple[float, int]:
    """Summed NLL and predicted tokens over `windows`, a window's NLL summed alone (so that a cached
    base reads back the same sum); the distributions recorded or compared on the way."""
    nll, count, first = 0.0, 0, 0
    model.eval()
    device = model_device(model)
    apart = head_applies_apart(model, windows[:1, :PROBE_TOKENS].to(device))
    if not apart:
        progress.note(f"{description}: this model's head cannot be applied apart from it: logits computed whole")
    for batch in progress.track(list(torch.split(windows, protocol.batch_size)), description):
        logits = BatchLogits(model, batch.to(device), apart)
        for j in range(batch.shape[0]):
            window_nll_sum, window_count = score_window(logits, j, batch[j], first + j, logprobs, meter)
            nll, count = nll + window_nll_sum, count + window_count
        first += batch.shape[0]
    return nll, count


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
    cached = _cached_base(logprobs, windows.shape[0])
    meter = DivergenceMeter()
    if cached is not None:
        progress.note(f"{description}: the base's {len(cached)} windows read from the cache (no forward pass)")
    nll, count = _forward_windows(model, windows, protocol, progress, description, logprobs, meter) \
        if cached is None else (sum(n for n, _ in cached), sum(t for _, t in cached))
    if logprobs is not None and logprobs.record is not None and cached is None:
        progress.note(f"{description}: base distributions cached, {logprobs.record.size_bytes() / 1e6:.1f} MB "
                      f"in {logprobs.record.root}")
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
