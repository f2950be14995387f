"""How much each tensor's type matters to the model's output, for the budget allocator.

Two measurements, each cheap where the other is not:

- `proxy_errors`: for a linear and each candidate GGML type, tr(dW H dW^T), the error that
  round-to-nearest on the type's fitted grid (importance diag H, as the quantizer fits it) adds
  to the layer's output over the calibration tokens (H: the input Hessian). It ranks the types of
  one tensor, but layers at different depths do not weigh the same in the model's output;
- `KLDProbe`: the model's mean KL divergence from its own unchanged output on a few calibration
  windows, after one change: what a tensor's type really does to the output (one forward pass).

A linear's predicted KLD at type t is gain x proxy(t), the gain (KLD / proxy) measured at its
worst and its best type and interpolated between them (`GainCurve`: on SmolLM2 the gain at Q8_0 is
2-7x the gain at Q2_K or Q4_0, so one gain measured at the worst type under-predicts the cost of the
fine types); the head and the embedding, which no Hessian reaches, are measured at every type. The model's predicted KLD is the sum over tensors (errors assumed additive; the compress
report puts the measured KLD beside the prediction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slimkit.evaluation.divergence import DivergenceMeter
from slimkit.evaluation.logit_rows import PROBE_TOKENS, BatchLogits, head_applies_apart
from slimkit.evaluation.perplexity import LogprobsUse, score_window
from slimkit.numerics.ggml_grids import TYPES, fit_grid, grid_values, round_codes


def tiling_types(candidates: tuple[str, ...], cols: int) -> list[str]:
    """The candidate types whose blocks tile rows of `cols` weights."""
    return [t for t in candidates if cols % TYPES[t].row_multiple == 0]


def tensor_bytes(qtype: str, rows: int, cols: int) -> int:
    t = TYPES[qtype]
    return rows * cols // t.row_multiple * t.block_bytes


def rounded(weight: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """`weight` rounded to nearest on its fitted grid of `qtype` (fp32)."""
    w = weight.detach().float()
    grid = fit_grid(qtype, w, importance)
    return grid_values(round_codes(w, grid), grid)


@torch.no_grad()
def proxy_errors(weight: torch.Tensor, hessian: torch.Tensor, qtypes: list[str]) -> dict[str, float]:
    """tr(dW H dW^T) of round-to-nearest on each type's grid fitted with importance diag(H)."""
    w, h = weight.detach().float(), hessian.float()
    importance = torch.diagonal(h)
    errors = {}
    for qtype in qtypes:
        delta = rounded(w, qtype, importance) - w
        errors[qtype] = float(((delta @ h) * delta).sum())
    return errors


class _Memory:
    """BaseDistribution summaries kept in memory (the interface of evaluation.divergence.BaseLogprobs)."""

    def __init__(self):
        self.windows = {}

    def has(self, i: int) -> bool:
        return i in self.windows

    def read(self, i: int):
        return self.windows[i]

    def write(self, i: int, base) -> None:
        self.windows[i] = base


class KLDProbe:
    """The model's mean KLD from its output when the probe was made, on `windows` [n, seqlen]."""

    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.model, self.windows = model, windows
        self.apart = head_applies_apart(model, windows[:1, :PROBE_TOKENS])
        self.base = _Memory()
        self._pass(record=True)

    @torch.no_grad()
    def _pass(self, record: bool) -> float:
        use = LogprobsUse(record=self.base) if record else LogprobsUse(compare=self.base)
        meter = DivergenceMeter()
        for i, window in enumerate(self.windows):
            score_window(BatchLogits(self.model, window[None], self.apart), 0, window, i, use, meter)
        return 0.0 if record else meter.result().mean_kld

    def kld(self) -> float:
        return self._pass(record=False)

    @torch.no_grad()
    def kld_with(self, parameter: torch.Tensor, value: torch.Tensor) -> float:
        """The KLD with `parameter` set to `value`, then put back."""
        saved = parameter.detach().clone()
        parameter.data.copy_(value.to(parameter.dtype))
        try:
            return self.kld()
        finally:
            parameter.data.copy_(saved)


@dataclass(frozen=True)
class GainCurve:
    """KLD per unit of proxy error, measured at a few types of one tensor, interpolated linearly in
    log(proxy) between them and constant beyond."""

    points: tuple[tuple[float, float], ...]  # (proxy, gain), proxy increasing

    def kld(self, proxy: float) -> float:
        if proxy <= 0 or not self.points:
            return 0.0
        (x0, g0), (x1, g1) = self.points[0], self.points[-1]
        if proxy <= x0 or x1 <= x0:
            return g0 * proxy if proxy <= x0 else g1 * proxy
        if proxy >= x1:
            return g1 * proxy
        t = (math.log(proxy) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return (g0 + t * (g1 - g0)) * proxy


def measure_gain(probe: KLDProbe, weight: torch.Tensor, errors: dict[str, float],
                 importance: torch.Tensor | None) -> GainCurve:
    """The tensor's gain at its worst and best types (by proxy error; a type that leaves the weight
    unchanged is skipped), each from one KLD of the model with that tensor alone rounded to it."""
    measurable = sorted((e, t) for t, e in errors.items() if e > 0)
    ends = {t: e for e, t in (measurable[:1] + measurable[-1:])}
    points = []
    for qtype, error in sorted(ends.items(), key=lambda kv: kv[1]):
        points.append((error, probe.kld_with(weight, rounded(weight, qtype, importance)) / error))
    return GainCurve(tuple(points))
