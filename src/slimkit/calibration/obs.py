"""The Optimal Brain Surgeon solver shared by SparseGPT and GPTQ (pure tensor functions).

Follows the SparseGPT / GPTQ reference algorithms (design.md section 3):
- dead input columns (H[i,i] = 0) get H[i,i] = 1 and W[:, i] = 0;
- damping lambda = percdamp * mean(diag H); on a Cholesky failure it is retried 10x larger,
  logged, and after `max_tries` a SingularHessianError says what to do;
- U is the upper Cholesky factor of H^-1; inside a block of `blocksize` columns each column's
  error (w - q) / U[i,i] updates the rest of the block through U[i, i:], and the block's errors
  update the remaining columns lazily: W[:, i2:] -= Err1 @ U[i1:i2, i2:];
- SparseGPT's mask is chosen on the already-updated weights by saliency w^2 / U[i,i]^2: one
  threshold per block of columns over all rows (unstructured), or every M columns per row (N:M);
- quantization (GPTQ, or SparseGPT's joint mode) rounds each kept weight inside the same loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from slimkit.errors import SlimkitError
from slimkit.quantization.rtn import QuantSpec, compute_qparams

log = logging.getLogger("slimkit.calibration")


class SingularHessianError(SlimkitError):
    pass


@dataclass(frozen=True)
class PruneTarget:
    sparsity: float | None = None  # unstructured
    n: int | None = None  # N:M -- N kept in every M
    m: int | None = None


@dataclass
class ObsResult:
    weight: torch.Tensor  # fp32, pruned and/or fake-quantized
    keep: torch.Tensor | None  # bool mask, True = kept (None when nothing was pruned)
    scale: torch.Tensor | None  # [out, in/group] (quantized only)
    zero: torch.Tensor | None
    damping: float  # relative damping actually used


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 8, name: str = "weight"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1, raising lambda 10x on each failure."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    mean_diag = float(torch.diagonal(hessian).mean())
    damp = percdamp
    for attempt in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                if attempt:
                    log.warning("%s: Hessian needed damping %.3g x mean(diag) (asked %.3g)", name, damp, percdamp)
                return upper, damp
        log.warning("%s: Cholesky failed at damping %.3g x mean(diag); retrying with %.3g", name, damp, damp * 10)
        damp *= 10
    raise SingularHessianError(
        f"{name}: the Hessian is not positive definite even with damping {damp / 10:.3g} x mean(diag). "
        "Too few calibration tokens for this layer's width, or degenerate inputs: use more calibration "
        "windows (--calibration-windows) or a larger percdamp."
    )


def _group_params(w: torch.Tensor, spec: QuantSpec):
    return compute_qparams(w, QuantSpec(spec.bits, spec.symmetric, None, spec.scale_dtype))


def _fake_quant(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    s = scale.float()
    q = torch.round(col / s)
    if zero is not None:
        q = (q + zero).clamp(spec.qmin, spec.qmax) - zero
    else:
        q = q.clamp(spec.qmin, spec.qmax)
    return q * s


@torch.no_grad()
def obs_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    prune: PruneTarget | None = None,
    keep_mask: torch.Tensor | None = None,
    quant: QuantSpec | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    name: str = "weight",
) -> ObsResult:
    """Prune (unstructured or N:M, or keep a given mask) and/or quantize one weight matrix."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    if prune is not None and prune.m is not None and blocksize % prune.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={prune.m}")
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    group = quant.group_of(cols) if quant else cols
    scale_all = zero_all = None
    if quant is not None:
        ngroups = cols // group
        scale_all = torch.empty(rows, ngroups, dtype=quant.scale_dtype)
        zero_all = None if quant.symmetric else torch.empty(rows, ngroups, dtype=torch.int32)
        if act_order or quant.group_size is None:
            # static groups: parameters from the original contiguous groups, so inference
            # needs no group index even when columns are processed in another order
            for g in range(ngroups):
                s, z = _group_params(W[:, g * group : (g + 1) * group], quant)
                scale_all[:, g : g + 1] = s
                if zero_all is not None:
                    zero_all[:, g : g + 1] = z
    dynamic_groups = quant is not None and not (act_order or quant.group_size is None)
    if dynamic_groups and blocksize % group:
        raise ValueError(f"blocksize {blocksize} must be a multiple of group_size {group}")

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        keep_mask = keep_mask[:, perm] if keep_mask is not None else None
    U, damp = inverse_hessian_factor(H, percdamp, name=name)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        if keep_mask is not None:
            mask1 = ~keep_mask[:, i1:i2]
        elif prune is not None and prune.sparsity is not None:
            saliency = (W1**2 / d.unsqueeze(0) ** 2).flatten()
            k = int(saliency.numel() * prune.sparsity)
            mask1 = torch.zeros(saliency.numel(), dtype=torch.bool)
            if k:
                mask1[torch.topk(saliency, k, largest=False).indices] = True
            mask1 = mask1.view(rows, count)
        else:
            mask1 = torch.zeros(rows, count, dtype=torch.bool)

        for i in range(count):
            col = i1 + i
            if prune is not None and prune.m is not None and i % prune.m == 0:
                sal = W1[:, i : i + prune.m] ** 2 / d[i : i + prune.m].unsqueeze(0) ** 2
                idx = torch.topk(sal, prune.m - prune.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            if quant is not None:
                if dynamic_groups and col % group == 0:
                    # parameters from the already-updated weights of this group (kept ones)
                    span = W1[:, i : i + group].masked_fill(mask1[:, i : i + group], 0.0)
                    s, z = _group_params(span, quant)
                    scale_all[:, col // group : col // group + 1] = s
                    if zero_all is not None:
                        zero_all[:, col // group : col // group + 1] = z
                g = (perm[col] if perm is not None else col) // group
                z = zero_all[:, g].float() if zero_all is not None else None
                q = _fake_quant(q, scale_all[:, g], z, quant).masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        W, pruned = W[:, inv], pruned[:, inv]
    has_mask = prune is not None or keep_mask is not None
    return ObsResult(W, ~pruned if has_mask else None, scale_all, zero_all, damp)
