"""Learned rounding by signed gradient descent (SignRound, the method of Intel's AutoRound).

Round-to-nearest puts each weight on its closest code. Learned rounding adds an offset v in
[-1/2, 1/2] to each weight before rounding, and gives each group's range factors f in
[MIN_RANGE, 1] (a learned clipping):

    symmetric:   s = max|w| f / half_range,                      q = clamp(round(w / s + v))
    full range:  s = signed extreme of (max(w) f_hi, min(w) f_lo) / 2^(b-1), q as symmetric
    asymmetric:  s = (max(w) f_hi - min(w) f_lo) / qmax,         q = clamp(round(w / s + v) + z),
                 z = round(-min(w) f_lo / s)

Offsets and factors are tuned so that a whole block, every linear quantized, reproduces the
dense block's output on the calibration inputs. round() passes gradients straight through; each
step moves every parameter by lr * sign(gradient), the learning rate decaying linearly to 0, so an
offset moves at most lr * iters / 2 in all (one rounding boundary with the default lr = 1 / iters).
With v = 0 and f = 1 the codes are RTN's, and they always stay on the integer grid: packing and
export are RTN's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from slimkit.calibration.block_data import BlockData, run_block
from slimkit.numerics.rtn import QuantParams, QuantSpec, compute_qparams, dequantize, signed_extreme

MIN_RANGE = 0.5  # a group's range is never clipped below half of its RTN range


@dataclass
class Rounding:
    """The tuned parameters of one weight: per-weight offsets and per-group range factors."""

    offset: torch.Tensor  # [rows, cols], in [-1/2, 1/2]
    high: torch.Tensor  # [rows, groups]: factor of max|w| (symmetric) or of max(w)
    low: torch.Tensor | None  # [rows, groups]: factor of min(w) (asymmetric and full-range only)

    @classmethod
    def start(cls, weight: torch.Tensor, spec: QuantSpec, tune_range: bool = True) -> "Rounding":
        """RTN's rounding: no offsets, whole ranges."""
        rows, cols = weight.shape
        groups = cols // spec.group_of(cols)
        ones = torch.ones(rows, groups, device=weight.device)
        offset = torch.zeros(rows, cols, device=weight.device).requires_grad_()
        return cls(offset, ones.clone().requires_grad_(tune_range),
                   ones.clone().requires_grad_(tune_range) if _two_sided(spec) else None)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors being tuned."""
        return [t for t in (self.offset, self.high, self.low) if t is not None and t.requires_grad]

    @torch.no_grad()
    def clamp_(self) -> None:
        self.offset.clamp_(-0.5, 0.5)
        self.high.clamp_(MIN_RANGE, 1.0)
        if self.low is not None:
            self.low.clamp_(MIN_RANGE, 1.0)


def _two_sided(spec: QuantSpec) -> bool:
    """Whether the grid has a factor for each end of the range."""
    return spec.full_range or not spec.symmetric


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(weight: torch.Tensor, r: Rounding, spec: QuantSpec) -> torch.Tensor:
    """The weight as its codes decode it (scales as stored), differentiable in `r`."""
    rows, cols = weight.shape
    group = spec.group_of(cols)
    g = weight.detach().float().reshape(rows, cols // group, group)
    v = r.offset.reshape(g.shape)
    if spec.full_range:
        scale = signed_extreme(g, r.high, r.low) / -spec.qmin
    elif spec.symmetric:
        scale = g.abs().amax(-1) * r.high / spec.half_range
    else:
        lo = g.amin(-1).clamp(max=0.0) * r.low
        scale = (g.amax(-1).clamp(min=0.0) * r.high - lo) / spec.qmax
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    scale = _as_stored(scale, weight, r, spec).unsqueeze(-1)
    if spec.symmetric:
        q = torch.clamp(_round_ste(g / scale + v), spec.qmin, spec.qmax)
        return (q * scale).reshape(rows, cols)
    zero = torch.clamp(_round_ste(-lo.unsqueeze(-1) / scale), spec.qmin, spec.qmax)
    q = torch.clamp(_round_ste(g / scale + v) + zero, spec.qmin, spec.qmax)
    return ((q - zero) * scale).reshape(rows, cols)


def _as_stored(scale: torch.Tensor, weight: torch.Tensor, r: Rounding, spec: QuantSpec) -> torch.Tensor:
    """The scales' values as `final_codes` stores them (fp16 by default, as AutoRound rounds them in
    its loop), with the fp32 scales' gradients: the tuned offsets are fitted to the codes kept."""
    with torch.no_grad():
        stored, _ = compute_qparams(weight.detach(), spec, clip=r.high.detach(),
                                    clip_low=None if r.low is None else r.low.detach())
    return scale + (stored.float() - scale).detach()


@torch.no_grad()
def final_codes(weight: torch.Tensor, r: Rounding, spec: QuantSpec) -> tuple[torch.Tensor, QuantParams]:
    """The integer codes of the tuned rounding with scales as stored (`spec.scale_dtype`), and the
    weight they decode to."""
    rows, cols = weight.shape
    group = spec.group_of(cols)
    scale, zero = compute_qparams(weight, spec, clip=r.high, clip_low=r.low)
    g = weight.float().reshape(rows, cols // group, group)
    q = torch.round(g / scale.float().unsqueeze(-1) + r.offset.reshape(g.shape))
    if zero is not None:
        q = q + zero.unsqueeze(-1)
    q = q.clamp(spec.qmin, spec.qmax).to(torch.int8).reshape(rows, cols)
    return dequantize(q, scale, zero, spec), QuantParams(spec, q, scale, zero)


@dataclass(frozen=True)
class TuneSettings:
    iters: int = 200
    lr: float | None = None  # None: 1 / iters
    batch: int = 8  # calibration windows per step
    tune_range: bool = True
    seed: int = 0


@dataclass
class TuneResult:
    rounding: dict[str, Rounding]  # each linear's tuned rounding (RTN's where tuning did not pay)
    error_rtn: float  # the block's output MSE on the first calibration batch, RTN codes
    error_tuned: float  # the same with the tuned codes
    kept: bool  # False: the tuned codes did worse than RTN's on that batch, and RTN's are returned


def _masked(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return weight if mask is None else weight * mask


@torch.no_grad()
def _check_error(block, linears, rounding, masks, spec, data: BlockData) -> float:
    """The block's output MSE on the first batch with the codes as they would be stored."""
    weights = {f"{n}.weight": _masked(final_codes(m.weight, rounding[n], spec)[0], masks.get(n)).to(m.weight.dtype)
               for n, m in linears.items()}
    hidden, args, kwargs = data.inputs(0)
    return float(torch.nn.functional.mse_loss(run_block(block, weights, hidden, args, kwargs),
                                              data.outputs[0].to(hidden.device).float()))


def block_loss(block: nn.Module, linears: dict[str, nn.Linear], rounding: dict[str, Rounding],
               masks: dict[str, torch.Tensor | None], spec: QuantSpec, batch) -> torch.Tensor:
    """MSE between the block run with fake-quantized `linears` and the target (batch's last item)."""
    hidden, args, kwargs, target = batch
    weights = {f"{n}.weight": _masked(fake_quantize(m.weight, rounding[n], spec), masks.get(n)).to(m.weight.dtype)
               for n, m in linears.items()}
    return torch.nn.functional.mse_loss(run_block(block, weights, hidden, args, kwargs), target.float())


@torch.no_grad()
def signed_step(rounding: dict[str, Rounding], loss: torch.Tensor, lr: float) -> None:
    """Move every tuned tensor by lr against the sign of its gradient, then back into its bounds."""
    tensors = [t for r in rounding.values() for t in r.tensors()]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)  # an expert no token reached: None
    for t, g in zip(tensors, grads):
        if g is not None:
            t.sub_(lr * g.sign())
    for r in rounding.values():
        r.clamp_()


def _copy(rounding: dict[str, Rounding]) -> dict[str, Rounding]:
    return {n: Rounding(*(t.detach().clone() if t is not None else None for t in (r.offset, r.high, r.low)))
            for n, r in rounding.items()}


def tune_block(block: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec, masks: dict[str, torch.Tensor | None],
               data: BlockData, settings: TuneSettings, steps: Iterable[int] | None = None) -> TuneResult:
    """Tune the rounding of `linears` (names relative to `block`) so that the quantized block's
    output matches `data.outputs`. The block's own weights are not changed; pruned weights
    (`masks`, True = kept) stay zero. The tuned codes are kept only if they beat RTN's on the
    first batch. `steps` (default range(settings.iters)) may be wrapped by a progress bar."""
    rounding = {n: Rounding.start(m.weight, spec, settings.tune_range) for n, m in linears.items()}
    lr0 = settings.lr if settings.lr is not None else 1.0 / settings.iters
    generator = torch.Generator().manual_seed(settings.seed)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        before = _check_error(block, linears, rounding, masks, spec, data)
        best, best_loss = _copy(rounding), float("inf")
        for step in range(settings.iters) if steps is None else steps:
            loss = block_loss(block, linears, rounding, masks, spec, data.sample(generator, settings.batch))
            value = float(loss.detach())
            if value < best_loss:  # as AutoRound: the rounding with the lowest step loss is returned
                best, best_loss = _copy(rounding), value
            signed_step(rounding, loss, lr0 * (1 - step / settings.iters))
        rounding = best
        after = _check_error(block, linears, rounding, masks, spec, data)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if after > before:
        rounding = {n: Rounding.start(m.weight, spec, False) for n, m in linears.items()}
    return TuneResult(rounding, before, after, after <= before)
