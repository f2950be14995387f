"""KL divergence from the base model and top-1 agreement: the quality yardstick next to ppl.

Perplexity averages log-probabilities of the reference text, so a compressed model can keep
its ppl while changing many of its predictions. The field (llama-perplexity --kl-divergence)
compares the whole next-token distribution with the base model's instead:

- KLD of a token = KL(P_base || P_compressed) = sum_v p_base(v) (log p_base(v) - log p(v));
- mean KLD over every predicted token of the protocol, its 99th percentile;
- top-1 agreement = the fraction of tokens where both models rank the same token first.

The base's distributions are not kept whole (a 262k vocabulary would take 268 MB a window): per
predicted token the cache keeps the base's TOP_K most likely tokens exactly, and TAIL_SAMPLES
tokens drawn from the rest in proportion to their base probability, with the rest's mass r. The
KLD is then the exact sum over the top tokens plus r times the mean of log p - log q over the
drawn ones, an unbiased estimate of the rest's share; an unchanged model is at exactly 0. On
SmolLM2 RTN int4 (4 windows) it is within 0.02% of the exact mean KLD and 0.1% of its p99
(tests/test_divergence.py checks 1% against the exact value on a 200k-token vocabulary). A window
takes about 1 KB a token whatever the vocabulary (16 windows of 512 tokens: 8.4 MB), in the
slimkit cache under a key of the base model's weight files, the split and the window length,
with the window's summed NLL, so the base's perplexity is read back rather than computed again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slimkit.errors import SlimkitError

TOP_K = 64  # the base's most likely tokens, kept exactly
TAIL_SAMPLES = 64  # tokens drawn from the rest of the base distribution
CACHE_FORMAT = f"top{TOP_K}-tail{TAIL_SAMPLES}"


@dataclass(frozen=True)
class BaseDistribution:
    """One window's base next-token distributions, summarised per predicted token: the top
    log-probs and their ids, tokens drawn from the rest with their log-probs, the rest's mass;
    and the window's summed NLL and predicted tokens (its share of the base's perplexity)."""

    top_logprobs: torch.Tensor  # [T, TOP_K] float32, most likely first
    top_ids: torch.Tensor  # [T, TOP_K] int64
    tail_logprobs: torch.Tensor  # [T, TAIL_SAMPLES] float32
    tail_ids: torch.Tensor  # [T, TAIL_SAMPLES] int64
    tail_mass: torch.Tensor  # [T] float32: 1 - the top tokens' probability
    nll: float
    tokens: int

    def rows(self, start: int, stop: int) -> "BaseDistribution":
        return BaseDistribution(self.top_logprobs[start:stop], self.top_ids[start:stop],
                                self.tail_logprobs[start:stop], self.tail_ids[start:stop],
                                self.tail_mass[start:stop], self.nll, self.tokens)


def _summarise_rows(lp: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    k = min(TOP_K, lp.shape[-1])
    top, ids = lp.topk(k, dim=-1)
    rest = lp.exp().scatter(-1, ids, 0.0)
    mass = rest.sum(-1)
    drawn = torch.multinomial(rest + (mass[:, None] <= 0), TAIL_SAMPLES, replacement=True, generator=generator)
    return top, ids, lp.gather(-1, drawn), drawn, mass


class SummaryBuilder:
    """One window's cache entry, built from its log-probabilities a slice of positions at a time
    (in order); the tail draws are seeded by the window's index (reproducible)."""

    def __init__(self, index: int) -> None:
        self.generator = torch.Generator().manual_seed(index)
        self.parts: list[tuple[torch.Tensor, ...]] = []

    def add(self, logprobs: torch.Tensor) -> None:
        self.parts.append(_summarise_rows(logprobs, self.generator))

    def finish(self, nll: float, tokens: int) -> BaseDistribution:
        top, ids, tail, drawn, mass = (torch.cat(column) for column in zip(*self.parts))
        return BaseDistribution(top, ids, tail, drawn, mass, nll, tokens)


def token_divergence(base: BaseDistribution, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: KL(base || other) and whether the top-1 tokens agree; `other` is the compared
    model's log-probabilities [T, vocab]."""
    head = (base.top_logprobs.exp() * (base.top_logprobs - other.gather(-1, base.top_ids))).sum(-1)
    tail = base.tail_mass * (base.tail_logprobs - other.gather(-1, base.tail_ids)).mean(-1)
    return (head + tail).clamp_min(0.0), base.top_ids[:, 0] == other.argmax(-1)


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

    def add_rows(self, base: BaseDistribution, logprobs: torch.Tensor) -> None:
        """Some predicted positions of a window: the base's summary of them and the compared
        model's log-probabilities there [T, vocab]."""
        kld, agree = token_divergence(base, logprobs)
        self.kld.append(kld)
        self.agree.append(agree)

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
    """The base model's distributions per evaluation window (`BaseDistribution`), on disk,
    written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_model(cls, cache: Path, source: Path, split_hash: str, seqlen: int) -> "BaseLogprobs":
        return cls(cache / "base-distributions" / f"{weights_key(source)}-{split_hash[:12]}-{seqlen}-{CACHE_FORMAT}")

    def _file(self, window: int) -> Path:
        return self.root / f"window-{window:05d}.safetensors"

    def has(self, window: int) -> bool:
        return self._file(window).is_file()

    def _damaged(self, window: int, exc: Exception) -> SlimkitError:
        return SlimkitError(f"the cached base distributions {self._file(window)} are damaged ({exc}); "
                            f"delete {self.root} and run again")

    def read(self, window: int) -> BaseDistribution:
        try:  # tensors and header in one opening of the file
            with safe_open(str(self._file(window)), "pt") as f:
                t, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
            return BaseDistribution(t["top_logprobs"], t["top_ids"].long(), t["tail_logprobs"], t["tail_ids"].long(),
                                    t["tail_mass"], float(meta["nll"]), int(meta["tokens"]))
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise self._damaged(window, exc) from None

    def window_nll(self, window: int) -> tuple[float, int]:
        """The window's summed NLL and predicted tokens, from the file's header alone."""
        try:
            with safe_open(str(self._file(window)), "pt") as f:
                meta = f.metadata() or {}
            return float(meta["nll"]), int(meta["tokens"])
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise self._damaged(window, exc) from None

    def write(self, window: int, base: BaseDistribution) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self._file(window)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tensors = {"top_logprobs": base.top_logprobs, "top_ids": base.top_ids.int(), "tail_logprobs": base.tail_logprobs,
                   "tail_ids": base.tail_ids.int(), "tail_mass": base.tail_mass}
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"nll": repr(base.nll), "tokens": str(base.tokens)})
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial file in the cache
            raise

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.glob("window-*.safetensors")) if self.root.is_dir() else 0
