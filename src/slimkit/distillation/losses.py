"""Distillation losses: pure functions of student and teacher outputs.

- `soft_label_loss`: Hinton's alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T);
- `token_divergence`: per-token forward KL, reverse KL or skew JSD between two LMs' distributions;
- `hidden_loss`: MSE or cosine between hidden states, through a projection when widths differ.
Every reduction is a mean over the valid positions (`mask` True = counted).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row (last dim summed), from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Divergence = "forward_kl",
                     temperature: float = 1.0, beta: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean divergence per position between the teacher (p) and student (q) distributions.

    forward_kl = KL(p || q) (mode covering), reverse_kl = KL(q || p) (mode seeking), jsd with skew
    `beta` = beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q (beta = 0.5:
    the symmetric Jensen-Shannon divergence). Logits are divided by `temperature` first.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per = _kl_rows(log_p, log_q)
    elif kind == "reverse_kl":
        per = _kl_rows(log_q, log_p)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        per = beta * _kl_rows(log_p, log_m) + (1 - beta) * _kl_rows(log_q, log_m)
    else:
        raise ValueError(f"unknown divergence '{kind}'; known: forward_kl, reverse_kl, jsd")
    return _masked_mean(per, mask)


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                    temperature: float = 4.0, alpha: float = 0.5, ignore_index: int = -100,
                    kind: Divergence = "forward_kl") -> dict[str, torch.Tensor]:
    """The classic distillation loss; returns {'loss', 'ce', 'kd'} (kd already scaled by T^2).

    `alpha` weighs the hard-label cross-entropy; alpha = 1 is plain training without KD.
    Logits are [..., classes]; labels [...] (positions equal to `ignore_index` are skipped).
    """
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes)
    t = teacher_logits.reshape(-1, classes)
    mask = None
    zero = s.new_zeros(())
    ce = zero
    if labels is not None:
        flat = labels.reshape(-1)
        mask = flat != ignore_index
        ce = F.cross_entropy(s.float(), flat, ignore_index=ignore_index) if alpha > 0 else zero
    kd = token_divergence(s, t, kind, temperature, mask=mask) * temperature**2 if alpha < 1 else zero
    return {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce.detach(), "kd": kd.detach()}


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: Literal["mse", "cosine"] = "mse",
                projection: nn.Module | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE or (1 - cosine) between hidden states [..., width]; `projection` maps the student's
    width to the teacher's when they differ."""
    s = projection(student_hidden) if projection is not None else student_hidden
    if s.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(f"hidden widths differ ({s.shape[-1]} vs {teacher_hidden.shape[-1]}): give a projection")
    t = teacher_hidden.detach().to(s.dtype)
    if kind == "mse":
        per = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        per = 1 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"unknown hidden loss '{kind}'; known: mse, cosine")
    return _masked_mean(per, mask)


def make_projection(student_width: int, teacher_width: int, init: torch.Tensor | None = None) -> nn.Linear:
    """A linear map student -> teacher width. `init` ([teacher, student]) e.g. places kept channels
    back where structured pruning took them from; default: identity on the shared prefix."""
    proj = nn.Linear(student_width, teacher_width, bias=False)
    with torch.no_grad():
        if init is not None:
            proj.weight.copy_(init)
        else:
            proj.weight.zero_()
            n = min(student_width, teacher_width)
            proj.weight[:n, :n] = torch.eye(n)
    return proj
