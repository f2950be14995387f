"""Distillation tasks for transformers: a causal LM (token distributions) and an encoder (embeddings).

Both follow the `TrainTask` protocol of `slimkit.training.trainer`: the teacher runs without
gradients, the student (and an optional width projection for hidden-state losses) is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from slimkit.distillation.losses import hidden_loss, make_projection, token_divergence
from slimkit.evaluation.perplexity import window_nll
from slimkit.training.trainer import EpochSampler, identity


class LMLossConfig(BaseModel):
    """alpha * next-token CE + (1 - alpha) * T^2 * divergence + hidden_weight * hidden loss."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the hard-label (next-token) cross-entropy")
    beta: float = Field(0.5, gt=0, lt=1, description="JSD skew")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the hidden-state loss (0: off)")
    hidden_kind: Literal["mse", "cosine"] = "mse"


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student block i -> teacher block, spread evenly, last to last (hidden_states index = block + 1)."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def _hidden_width(model: nn.Module) -> int:
    return model.config.hidden_size


class _HiddenMatch:
    """Hidden-state matching over a layer map, through one projection when widths differ."""

    def __init__(self, student: nn.Module, teacher: nn.Module, projection_init: torch.Tensor | None):
        ws, wt = _hidden_width(student), _hidden_width(teacher)
        self.projection = make_projection(ws, wt, projection_init) if (ws != wt or projection_init is not None) else None
        self.map = layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)

    def loss(self, s_hidden, t_hidden, kind: str, mask) -> torch.Tensor:
        terms = [hidden_loss(s_hidden[i + 1], t_hidden[j + 1], kind, self.projection, mask)
                 for i, j in enumerate(self.map)]
        return torch.stack(terms).mean()


@dataclass(frozen=True)
class DistillPair:
    """The student, its teacher, and the hidden projection structured pruning left (None: fresh)."""

    student: nn.Module
    teacher: nn.Module
    projection_init: torch.Tensor | None = None


def _frozen(teacher: nn.Module) -> None:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


class CausalLMDistillTask:
    """Student LM learns the teacher's next-token distributions on token windows."""

    loss_terms = ("loss", "ce", "kd", "hidden")
    eval_terms = ("ppl",)

    def __init__(self, pair: DistillPair, windows: torch.Tensor, eval_windows: torch.Tensor, loss: LMLossConfig,
                 seed: int = 0, batch_size: int = 8, data: str = "corpus"):
        self.student, self.teacher, self.windows, self.cfg = pair.student, pair.teacher, windows, loss
        self.eval_windows, self.seed, self.data = eval_windows, seed, data
        self.sampler = EpochSampler(len(windows), seed)
        self.accum_batch = batch_size
        _frozen(pair.teacher)
        self.hidden = _HiddenMatch(pair.student, pair.teacher, pair.projection_init) if loss.hidden_weight > 0 else None

    def trainable(self) -> dict[str, nn.Module]:
        mods = {"student": self.student}
        if self.hidden is not None and self.hidden.projection is not None:
            mods["projection"] = self.hidden.projection
        return mods

    def batch(self, step: int, micro: int, size: int, rank: int, world: int) -> torch.Tensor:
        return self.windows[self.sampler.for_step(step, micro, size, self.accum_batch, rank, world)]

    def losses(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        want_hidden = self.hidden is not None
        with torch.no_grad():
            t = self.teacher(input_ids=ids, output_hidden_states=want_hidden)
        s = self.student(input_ids=ids, output_hidden_states=want_hidden)
        c = self.cfg
        s_logits, t_logits = s.logits[:, :-1], t.logits[:, :-1]
        zero = s_logits.new_zeros(())
        ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]).float(), ids[:, 1:].reshape(-1)) if c.alpha > 0 else zero
        kd = token_divergence(s_logits, t_logits, c.divergence, c.temperature, c.beta) * c.temperature**2 if c.alpha < 1 else zero
        hid = self.hidden.loss(s.hidden_states, t.hidden_states, c.hidden_kind, None) if want_hidden else zero
        loss = c.alpha * ce + (1 - c.alpha) * kd + c.hidden_weight * hid
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "hidden": hid.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        nll, tokens = 0.0, 0
        for i in range(0, len(self.eval_windows), 4):
            n, t = window_nll(self.student, self.eval_windows[i : i + 4])
            nll, tokens = nll + n, tokens + t
        return {"ppl": float(torch.tensor(nll / tokens).exp())}

    def describe(self) -> dict:
        return {"task": "causal-lm", "loss": identity(self.cfg), "windows": list(self.windows.shape),
                "windows_hash": _tensor_hash(self.windows), "eval_windows": list(self.eval_windows.shape),
                "student_config": self.student.config.to_diff_dict(), "seed": self.seed, "data": self.data}


def _tensor_hash(t: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:12]


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@dataclass(frozen=True)
class EncoderTexts:
    train: list[str]
    held_out: list[str]
    max_length: int = 128  # tokens a text is cut to


class EncoderDistillTask:
    """Student encoder matches the teacher's sentence embeddings (cosine of mean-pooled outputs)
    and, optionally, its per-layer hidden states; a projection maps widths when they differ."""

    loss_terms = ("loss", "embedding", "hidden")
    eval_terms = ("cosine",)

    def __init__(self, pair: DistillPair, tokenizer: Any, texts: EncoderTexts, hidden_weight: float = 1.0,
                 seed: int = 0, batch_size: int = 16):
        self.student, self.teacher, self.tok = pair.student, pair.teacher, tokenizer
        self.texts, self.eval_texts, self.max_length = texts.train, texts.held_out, texts.max_length
        self.hidden_weight, self.seed = hidden_weight, seed
        self.sampler = EpochSampler(len(self.texts), seed)
        self.accum_batch = batch_size
        _frozen(pair.teacher)
        self.match = _HiddenMatch(pair.student, pair.teacher, pair.projection_init)

    def trainable(self) -> dict[str, nn.Module]:
        mods = {"student": self.student}
        if self.match.projection is not None:
            mods["projection"] = self.match.projection
        return mods

    def batch(self, step: int, micro: int, size: int, rank: int, world: int) -> dict:
        idx = self.sampler.for_step(step, micro, size, self.accum_batch, rank, world)
        return self.tok([self.texts[i] for i in idx.tolist()], padding=True, truncation=True,
                        max_length=self.max_length, return_tensors="pt")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.match.projection(x) if self.match.projection is not None else x

    def losses(self, enc: dict) -> dict[str, torch.Tensor]:
        want_hidden = self.hidden_weight > 0
        with torch.no_grad():
            t = self.teacher(**enc, output_hidden_states=want_hidden)
        s = self.student(**enc, output_hidden_states=want_hidden)
        mask = enc["attention_mask"]
        emb = (1 - F.cosine_similarity(self.project(_pool(s.last_hidden_state, mask)),
                                       _pool(t.last_hidden_state, mask), dim=-1)).mean()
        hid = self.match.loss(s.hidden_states, t.hidden_states, "mse", mask.bool()) if want_hidden else emb.new_zeros(())
        return {"loss": emb + self.hidden_weight * hid, "embedding": emb.detach(), "hidden": hid.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        cos = []
        for i in range(0, len(self.eval_texts), 32):
            enc = self.tok(self.eval_texts[i : i + 32], padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt")
            s = self.project(_pool(self.student(**enc).last_hidden_state, enc["attention_mask"]))
            t = _pool(self.teacher(**enc).last_hidden_state, enc["attention_mask"])
            cos.append(F.cosine_similarity(s, t, dim=-1))
        return {"cosine": float(torch.cat(cos).mean())}

    def describe(self) -> dict:
        return {"task": "encoder", "texts": len(self.texts), "hidden_weight": self.hidden_weight,
                "student_config": self.student.config.to_diff_dict(), "seed": self.seed}
