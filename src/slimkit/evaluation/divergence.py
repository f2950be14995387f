"""KL divergence from the base model and top-1 agreement: the quality yardstick next to ppl.

Perplexity averages log-probabilities of the reference text, so a compressed model can keep
its ppl while changing many of its predictions. The field (llama-perplexity --kl-divergence)
compares the whole next-token distribution with the base model's instead:

- KLD of a token = KL(P_base || P_compressed) = sum_v p_base(v) (log p_base(v) - log p(v));
- mean KLD over every predicted token of the protocol, its 99th percentile;
- top-1 agreement = the fraction of tokens where both models rank the same token first.

The base log-probabilities are kept in float16 (one file per window, vocab x tokens x 2 bytes:
about 50 MB per 512-token window of a 49k vocabulary), in the slimkit cache under a key of the
base model's weight files, the split and the window length; computed once, read by every later
comparison. The compressed model's log-probabilities are rounded to float16 the same way, so an
unchanged model gives exactly 0.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimkit.errors import SlimkitError

STORED_DTYPE = torch.float16


def token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """[batch, seq, vocab] logits -> the log-probabilities of positions 0..seq-2 (each predicts
    the next token), in the stored precision."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1).to(STORED_DTYPE)


def token_divergence(base: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: KL(base || other) and whether the top-1 tokens agree (both [batch, seq])."""
    lp, lq = base.float(), other.float()
    kld = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)  # >= 0 up to rounding
    agree = lp.argmax(-1) == lq.argmax(-1)
    return kld, agree


@dataclass(frozen=True)
class DivergenceResult:
    mean_kld: float
    p99_kld: float
    top1_agreement: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


class DivergenceMeter:
    """Collects per-token KLD and agreement over the windows of one evaluation."""

    def __init__(self) -> None:
        self.kld: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []

    def add(self, base: torch.Tensor, other: torch.Tensor) -> None:
        kld, agree = token_divergence(base, other)
        self.kld.append(kld.reshape(-1))
        self.agree.append(agree.reshape(-1))

    def result(self) -> DivergenceResult:
        kld = torch.cat(self.kld).double()
        agree = torch.cat(self.agree)
        return DivergenceResult(float(kld.mean()), float(torch.quantile(kld.float(), 0.99)),
                                float(agree.float().mean()), int(kld.numel()))


def weights_key(source: Path) -> str:
    """Names, sizes and modification times of a model's files: changes when its weights do."""
    digest = hashlib.sha256(str(source.resolve()).encode())
    files = sorted(source.iterdir()) if source.is_dir() else [source]
    for f in files:
        if f.is_file() and f.suffix in (".safetensors", ".gguf", ".json"):
            st = f.stat()
            digest.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class BaseLogprobs:
    """The base model's log-probabilities per evaluation window, on disk (written atomically)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_model(cls, cache: Path, source: Path, split_hash: str, seqlen: int) -> "BaseLogprobs":
        return cls(cache / "logprobs" / f"{weights_key(source)}-{split_hash[:12]}-{seqlen}")

    def _file(self, window: int) -> Path:
        return self.root / f"window-{window:05d}.safetensors"

    def has(self, window: int) -> bool:
        return self._file(window).is_file()

    def read(self, window: int) -> torch.Tensor:
        try:
            return load_file(str(self._file(window)))["logprobs"]
        except (SafetensorError, OSError, KeyError) as exc:
            raise SlimkitError(f"the cached base distributions {self._file(window)} are damaged ({exc}); "
                               f"delete {self.root} and run again") from None

    def write(self, window: int, logprobs: torch.Tensor) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self._file(window)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            save_file({"logprobs": logprobs.contiguous()}, str(tmp))
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial file in the cache
            raise
