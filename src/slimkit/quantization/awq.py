"""AWQ: activation-aware per-input-channel scales, and a per-group clip search (pure functions).

Output error of a weight change D on the calibration inputs is tr(D H D^T) with H = 2/N X^T X,
so both searches score candidates on the exact calibration MSE without re-running the model.
- scales: s = mean|x|^alpha (normalised), alpha over a grid of 20 points in [0, 1), the one
  minimising the summed output MSE of the linears sharing the input with W*s quantized;
- clip: per (row, group), the shrink of the quantization range minimising that group's error.
"""

from __future__ import annotations

import torch

from slimkit.numerics.rtn import QuantSpec, compute_qparams, dequantize, quantize


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    return ((delta @ hessian) * delta).sum()


def fake_quant(weight: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None) -> torch.Tensor:
    scale, zero = compute_qparams(weight, spec, clip=clip)
    return dequantize(quantize(weight, scale, zero, spec), scale, zero, spec)


@torch.no_grad()
def search_scales(
    weights: list[torch.Tensor], hessian: torch.Tensor, abs_mean: torch.Tensor, spec: QuantSpec, grid: int = 20
) -> tuple[torch.Tensor, float, float]:
    """Best per-channel scales s (W -> W*s, inputs -> x/s), its alpha, and the error ratio vs s=1."""
    x_mean = abs_mean.float().clamp(min=1e-5)
    best = (None, 0.0, float("inf"))
    base = None
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in weights:
            w = w.float()
            w_hat = fake_quant(w * s, spec) / s
            err += float(output_error(w_hat - w, hessian))
        if i == 0:
            base = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2] / base if base else 1.0


@torch.no_grad()
def search_clip(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """Per (row, group) clip ratio in [1 - max_shrink, 1] minimising that group's output error."""
    w = weight.float()
    rows, cols = w.shape
    group = spec.group_of(cols)
    ngroups = cols // group
    blocks = [hessian[g * group : (g + 1) * group, g * group : (g + 1) * group] for g in range(ngroups)]
    best_err = torch.full((rows, ngroups), float("inf"), device=w.device)
    best_ratio = torch.ones(rows, ngroups, device=w.device)
    for i in range(grid):
        ratio = 1.0 - max_shrink * i / grid
        clip = torch.full((rows, ngroups), ratio, device=w.device)
        delta = (fake_quant(w, spec, clip) - w).view(rows, ngroups, group)
        err = torch.stack([((delta[:, g] @ blocks[g]) * delta[:, g]).sum(-1) for g in range(ngroups)], dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, clip, best_ratio)
    return best_ratio
