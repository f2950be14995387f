"""The Optimal Brain Surgeon solver shared by SparseGPT and GPTQ (pure tensor functions).

Follows the SparseGPT / GPTQ reference algorithms (the papers' Algorithm 1, and their reference code):
- dead input columns (H[i,i] = 0) get H[i,i] = 1 and W[:, i] = 0;
- damping lambda = percdamp * mean(diag H); on a Cholesky failure it is retried 10x larger,
  logged, and after `max_tries` a SingularHessianError says what to do;
- U is the upper Cholesky factor of H^-1; inside a block of `blocksize` columns each column's
  error (w - q) / U[i,i] updates the rest of the block through U[i, i:], and the block's errors
  update the remaining columns lazily: W[:, i2:] -= Err1 @ U[i1:i2, i2:];
- SparseGPT's mask is chosen on the already-updated weights by saliency w^2 / U[i,i]^2: one
  threshold per block of columns over all rows (unstructured), or every M columns per row (N:M);
- quantization (GPTQ, or SparseGPT's joint mode) rounds each kept weight inside the same loop.

Speed on a CPU (the column loop is Python, so the number of loop steps is what costs):
- linears that read the same input share one Hessian and one factor, and their rows are
  independent in OBS, so they are solved as one stacked matrix (q/k/v, gate/up);
- problems with the same number of columns (q/k/v, o, gate/up in a LLaMA block) are solved in
  one batched loop, rows zero-padded to the longest;
- inside a `blocksize` block the in-block updates run on sub-blocks of <= 32 columns, with the
  lazy GEMM update after each: the same arithmetic, 4x less rank-1 work. Mask blocks, N:M
  groups and quantization groups always start on a sub-block boundary, so every choice sees
  exactly the weights the one-level algorithm would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from slimkit.errors import SlimkitError
from slimkit.numerics.magnitude import smallest_k_mask
from slimkit.numerics.rtn import QuantSpec, compute_qparams

log = logging.getLogger("slimkit.calibration")


class SingularHessianError(SlimkitError):
    pass


@dataclass(frozen=True)
class ObsSettings:
    """How a solve runs: columns per lazy-update block, damping as a fraction of mean(diag H),
    and act-order (columns by decreasing diag H)."""

    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False


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


def _invert_lower_in_place(L: torch.Tensor, block: int = 256) -> torch.Tensor:
    """L^-1 written over a lower-triangular L, by column blocks from the last: with L = [[A, 0], [B, C]],
    L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]], and C^-1 is already in place when A's block comes.
    No second n x n buffer (big models: n = 14336 is 0.8 GB), and the work is matrix products."""
    n = L.shape[0]
    for j in range(((n - 1) // block) * block, -1, -block):
        k = min(j + block, n)
        diagonal_inverse = torch.linalg.solve_triangular(L[j:k, j:k], torch.eye(k - j, dtype=L.dtype, device=L.device),
                                                             upper=False)
        if k < n:
            L[k:, j:k] = torch.matmul(L[k:, k:], L[k:, j:k] @ diagonal_inverse).neg_()
        L[j:k, j:k] = diagonal_inverse
    return L


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 8, name: str = "weight"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1, raising lambda 10x on each failure."""
    _check_finite(hessian, name)
    mean_diag = float(torch.diagonal(hessian).mean())
    return inverse_factor_of_reversed([torch.flip(hessian, (0, 1))], mean_diag, percdamp, max_tries, name)


def _check_finite(hessian: torch.Tensor, name: str) -> None:
    if not _all_finite(hessian):
        raise SingularHessianError(
            f"{name}: the Hessian holds NaN/Inf, so this layer's inputs were not finite (NaN/Inf weights or "
            "activations upstream); more calibration data will not help. Check the model with `slimkit eval`.")


def _all_finite(matrix: torch.Tensor) -> bool:
    """No NaN/Inf, without an n x n mask (min and max propagate NaN)."""
    return bool(torch.isfinite(torch.stack(torch.aminmax(matrix))).all())


def inverse_factor_of_reversed(held: list[torch.Tensor], mean_diag: float, percdamp: float = 0.01,
                               max_tries: int = 8, name: str = "weight") -> tuple[torch.Tensor, float]:
    """`inverse_hessian_factor` given `[J H J]` (J the reversal), which it damps in place and takes out
    of the list: then at most two n x n buffers are alive at once (big models: n = 14336 is 0.8 GB)."""
    reversed_h = held.pop()
    diagonal = reversed_h.diagonal().clone()
    damp = percdamp
    for attempt in range(max_tries):
        # U = J L^-1 J with L = chol(J (H + lambda I) J): the upper factor of H^-1 from one
        # Cholesky and one triangular solve (instead of chol, cholesky_inverse, chol)
        reversed_h.diagonal().copy_(diagonal).add_(damp * mean_diag)
        factor, info = torch.linalg.cholesky_ex(reversed_h)
        if int(info) == 0:
            del reversed_h  # the factor is the only n x n buffer from here on
            upper = _invert_lower_in_place(factor)
            _reverse_in_place(upper)
            if _all_finite(upper) and bool((torch.diagonal(upper) > 0).all()):
                if attempt:
                    log.warning("%s: Hessian needed damping %.3g x mean(diag) (asked %.3g)", name, damp, percdamp)
                return upper, damp
            raise SingularHessianError(f"{name}: the inverse Hessian factor is not finite at damping {damp:.3g}; "
                                       "use more calibration windows or a larger percdamp")
        log.warning("%s: Cholesky failed at damping %.3g x mean(diag); retrying with %.3g", name, damp, damp * 10)
        damp *= 10
    raise SingularHessianError(
        f"{name}: the Hessian is not positive definite even with damping {damp / 10:.3g} x mean(diag). "
        "Too few calibration tokens for this layer's width, or degenerate inputs: use more calibration "
        "windows (--calibration-windows) or a larger percdamp."
    )


@dataclass
class ObsProblem:
    """One Hessian and the linears that read its input (their rows are stacked)."""

    hessian: torch.Tensor | None
    weights: list[torch.Tensor]
    names: list[str]
    keep_masks: list[torch.Tensor | None] | None = None
    release_hessian: bool = False  # drop `hessian` once the solver has its factor (big models: memory)

    @property
    def rows(self) -> int:
        return sum(w.shape[0] for w in self.weights)


def _sub_block(blocksize: int, m: int | None, group: int | None) -> int:
    """Largest sub-block <= 32 dividing blocksize on which N:M and quant groups stay aligned."""
    for ub in range(min(32, blocksize), 0, -1):
        if blocksize % ub or (m and ub % m):
            continue
        if group and not (group % ub == 0 or ub % group == 0):
            continue
        return ub
    return blocksize


def _fake_quant_(out: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> None:
    torch.div(w, s, out=out)
    out.round_()
    if z is not None:
        out.add_(z).clamp_(spec.qmin, spec.qmax).sub_(z)
    else:
        out.clamp_(spec.qmin, spec.qmax)
    out.mul_(s)


def _qparams_rows(span: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row parameters of a [G, columns, R] span (one group): scale/zero of shape [G, R]."""
    G, cols, R = span.shape
    s, z = compute_qparams(span.transpose(1, 2).reshape(G * R, cols), replace(spec, group_size=None))
    return s.view(G, R), (z.view(G, R) if z is not None else None)


@dataclass
class _Batch:
    """Problems of one input width stacked: weights transposed ([G, cols, R], column i of every
    weight is the contiguous WT[g, i]), H^-1 factors, masks and quantization parameters."""

    WT: torch.Tensor
    U: torch.Tensor
    keepT: torch.Tensor | None
    perms: torch.Tensor | None
    scale_all: torch.Tensor | None
    zero_all: torch.Tensor | None
    damps: list[float]
    prunedT: torch.Tensor  # True = pruned, [G, cols, R]
    group: int  # quantization group (cols when none)
    dynamic_groups: bool  # group parameters from the updated weights as the loop reaches them
    d: torch.Tensor | None = None  # diag(U), [G, cols]: set once the factors exist
    dinv: torch.Tensor | None = None  # 1 / d


def _check_batch(problems: list[ObsProblem], prune: PruneTarget | None, quant: QuantSpec | None, blocksize: int,
                 act_order: bool) -> tuple[int, int, bool]:
    """(columns, quantization group, dynamic groups?), or a ValueError naming what does not tile."""
    cols = problems[0].hessian.shape[0]
    if any(p.hessian.shape[0] != cols for p in problems):
        raise ValueError("obs_solve_batch: every problem needs the same number of input columns")
    if prune is not None and prune.m is not None and blocksize % prune.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={prune.m}")
    group = quant.group_of(cols) if quant else cols
    dynamic_groups = quant is not None and not (act_order or quant.group_size is None)
    if dynamic_groups and blocksize % group:
        raise ValueError(f"blocksize {blocksize} must be a multiple of group_size {group}")
    return cols, group, dynamic_groups


def _stack(problems: list[ObsProblem], quant: QuantSpec | None, percdamp: float, act_order: bool, cols: int,
           group: int, dynamic_groups: bool) -> _Batch:
    """Dead columns zeroed, static group parameters, act-order permutation, one factor each."""
    G, R = len(problems), max(p.rows for p in problems)
    on = {"device": problems[0].weights[0].device}  # the solve runs where the weights are
    has_keep = any(m is not None for p in problems for m in (p.keep_masks or []))
    batch = _Batch(WT=torch.zeros(G, cols, R, **on), U=torch.empty(0, **on),
                   keepT=torch.ones(G, cols, R, dtype=torch.bool, **on) if has_keep else None,
                   perms=torch.empty(G, cols, dtype=torch.long, **on) if act_order else None,
                   scale_all=None, zero_all=None, damps=[], prunedT=torch.zeros(G, cols, R, dtype=torch.bool, **on),
                   group=group, dynamic_groups=dynamic_groups)
    if quant is not None:
        batch.scale_all = torch.ones(G, R, cols // group, dtype=quant.scale_dtype, **on)
        batch.zero_all = None if quant.symmetric else torch.zeros(G, R, cols // group, dtype=torch.int32, **on)
    uppers = []
    for g, p in enumerate(problems):
        W = torch.cat([w.detach().float() for w in p.weights])
        H = p.hessian.detach().to(on["device"], torch.float32)
        if p.release_hessian:
            p.hessian = None
        keep = None
        if has_keep:
            keep = torch.cat([m.to(on["device"]) if m is not None else torch.ones(w.shape, dtype=torch.bool, **on)
                              for w, m in zip(p.weights, p.keep_masks or [None] * len(p.weights))])
        dead = torch.diagonal(H) == 0
        if dead.any():  # the caller's Hessian is left as it is
            H = H.clone()
            H[dead, dead] = 1.0
        W[:, dead] = 0.0
        if quant is not None and not dynamic_groups:
            # static groups: parameters from the original contiguous groups (kept weights), so
            # inference needs no group index even when columns are processed in another order
            s, z = compute_qparams(W if keep is None else W * keep, quant)
            batch.scale_all[g, : p.rows] = s
            if batch.zero_all is not None:
                batch.zero_all[g, : p.rows] = z
        order = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
        if act_order:
            batch.perms[g] = order
            W = W[:, order]
            keep = keep[:, order] if keep is not None else None
        held = [H]
        del H  # the only other reference is the problem's, unless released
        mean_diag = _reverse_permute(held, order if act_order else None)
        upper, damp = inverse_factor_of_reversed(held, mean_diag, percdamp,
                                                 name="+".join(p.names))
        uppers.append(upper)
        batch.damps.append(damp)
        batch.WT[g, :, : p.rows] = W.T
        if keep is not None:
            batch.keepT[g, :, : p.rows] = keep.T
    batch.U = uppers[0].unsqueeze(0) if G == 1 else torch.stack(uppers)  # one problem: no copy
    return batch


def _reverse_permute(held: list[torch.Tensor], order: torch.Tensor | None) -> float:
    """Replaces `held`'s H with J P H P^T J and returns the mean of H's diagonal. The copy is permuted
    a slice of rows at a time and reversed in place, so at most two n x n buffers exist at once."""
    hessian = held.pop()
    _check_finite(hessian, "hessian")
    mean_diag = float(torch.diagonal(hessian).mean())
    if order is None:
        held.append(torch.flip(hessian, (0, 1)))
        return mean_diag
    permuted = torch.empty_like(hessian)
    for a in range(0, len(order), rows := max(1, (1 << 22) // len(order))):  # ~16 MB of rows at a time
        torch.index_select(hessian.index_select(0, order[a: a + rows]), 1, order, out=permuted[a: a + rows])
    del hessian
    _reverse_in_place(permuted)
    held.append(permuted)
    return mean_diag


def _reverse_in_place(matrix: torch.Tensor, step: int = 1 << 20) -> None:
    """flip(matrix, (0, 1)) in place: a dense matrix (row- or column-major, as LAPACK returns it)
    read backwards, swapped in slices."""
    flat = (matrix if matrix.is_contiguous() else matrix.mT).view(-1)
    n = flat.numel()
    for a in range(0, n // 2, step):
        b = min(a + step, n // 2)
        front = flat[a:b].clone()
        flat[a:b] = flat[n - b: n - a].flip(0)
        flat[n - b: n - a] = front.flip(0)


def _static_columns(batch: _Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each column's static scale (and zero) row, laid out like WT: [G, cols, R]."""
    G, cols, R = batch.WT.shape
    colgroup = (batch.perms if batch.perms is not None else torch.arange(cols, device=batch.WT.device).expand(G, cols)) // batch.group
    index = colgroup.unsqueeze(1).expand(G, R, cols)
    static_s = batch.scale_all.float().gather(2, index).transpose(1, 2).contiguous()
    static_z = None
    if batch.zero_all is not None:
        static_z = batch.zero_all.float().gather(2, index).transpose(1, 2).contiguous()
    return static_s, static_z


def _block_mask(batch: _Batch, problems: list[ObsProblem], prune: PruneTarget | None, b1: int, b2: int) -> None:
    """The mask of columns b1:b2: the kept masks given, or SparseGPT's adaptive mask, one
    threshold per linear over this block, on the already-updated weights."""
    if batch.keepT is not None:
        batch.prunedT[:, b1:b2] = ~batch.keepT[:, b1:b2]
        return
    if prune is None or prune.sparsity is None:
        return
    saliency = batch.WT[:, b1:b2] ** 2 / batch.d[:, b1:b2, None] ** 2
    for g, p in enumerate(problems):
        r0 = 0
        for w in p.weights:
            r1 = r0 + w.shape[0]
            sal = saliency[g, :, r0:r1].reshape(-1)
            k = int(sal.numel() * prune.sparsity)
            if k:
                batch.prunedT[g, b1:b2, r0:r1] = smallest_k_mask(sal, k).view(b2 - b1, r1 - r0)
            r0 = r1


@dataclass
class _Quantizer:
    """The current column's quantization parameters: static per column, or dynamic per group."""

    spec: QuantSpec | None
    static_s: torch.Tensor | None
    static_z: torch.Tensor | None
    s_cur: torch.Tensor | None = None
    z_cur: torch.Tensor | None = None


def _solve_columns(batch: _Batch, q: _Quantizer, prune: PruneTarget | None, Err1: torch.Tensor, i1: int,
                   i2: int) -> None:
    """Columns i1:i2 one at a time: mask, quantize, and spread each error over the later columns
    of the sub-block through U (the lazy update past i2 is the caller's)."""
    WT, U, prunedT, group, quant = batch.WT, batch.U, batch.prunedT, batch.group, q.spec
    d, dinv, masked = batch.d, batch.dinv, prune is not None or batch.keepT is not None
    count = i2 - i1
    W1, M1 = WT[:, i1:i2], prunedT[:, i1:i2]
    # per-column views made once per sub-block ([G, 1, R] rows; the loop below is the hot path:
    # every tensor op in it costs microseconds of dispatch)
    w_cols = W1.unsqueeze(2).unbind(1)
    m_cols = M1.unsqueeze(2).unbind(1)
    e_cols = Err1[:, :count].unsqueeze(2).unbind(1)
    dinv_cols = dinv[:, i1:i2, None, None].unbind(1)
    u_rows = U[:, i1:i2, i1:i2].unsqueeze(3).unbind(1)  # each [G, count, 1]
    s_cols = q.static_s[:, i1:i2].unsqueeze(2).unbind(1) if q.static_s is not None else None
    z_cols = q.static_z[:, i1:i2].unsqueeze(2).unbind(1) if q.static_z is not None else None
    for i in range(count):
        col = i1 + i
        if prune is not None and prune.m is not None and col % prune.m == 0:
            sal = W1[:, i : i + prune.m] ** 2 / d[:, col : col + prune.m, None] ** 2
            idx = torch.topk(sal, prune.m - prune.n, dim=1, largest=False).indices
            M1.scatter_(1, i + idx, True)
        w, ev = w_cols[i], e_cols[i]
        ev.copy_(w)
        if quant is not None:
            if s_cols is not None:
                q.s_cur = s_cols[i]
                q.z_cur = z_cols[i] if z_cols is not None else None
            elif col % group == 0:  # dynamic: from the already-updated weights of this group
                span = WT[:, col : col + group].masked_fill(prunedT[:, col : col + group], 0.0)
                s_new, z_new = _qparams_rows(span, quant)
                batch.scale_all[:, :, col // group] = s_new
                q.s_cur = s_new.float().unsqueeze(1)
                if batch.zero_all is not None:
                    batch.zero_all[:, :, col // group] = z_new
                    q.z_cur = z_new.float().unsqueeze(1)
            _fake_quant_(w, w, q.s_cur, q.z_cur, quant)  # the column becomes its quantized value
        if masked:
            w.masked_fill_(m_cols[i], 0.0)
        ev.sub_(w).mul_(dinv_cols[i])  # (w - q) / U[i, i]
        if i + 1 < count:
            W1[:, i + 1 :].baddbmm_(u_rows[i][:, i + 1 :], ev, alpha=-1.0)


def _unstack(batch: _Batch, problems: list[ObsProblem], prune: PruneTarget | None) -> list[list[ObsResult]]:
    """Back to one result per linear, in the original column order."""
    has_keep = batch.keepT is not None
    results = []
    for g, p in enumerate(problems):
        Wg, Pg = batch.WT[g, :, : p.rows], batch.prunedT[g, :, : p.rows]
        if batch.perms is not None:
            inv = torch.argsort(batch.perms[g])
            Wg, Pg = Wg[inv], Pg[inv]
        out, r0 = [], 0
        for j, w in enumerate(p.weights):
            r1 = r0 + w.shape[0]
            own_mask = prune is not None or (p.keep_masks is not None and p.keep_masks[j] is not None)
            out.append(ObsResult(
                Wg[:, r0:r1].T.contiguous(),
                (~Pg[:, r0:r1].T).contiguous() if (prune is not None or has_keep) and own_mask else None,
                batch.scale_all[g, r0:r1].clone() if batch.scale_all is not None else None,
                batch.zero_all[g, r0:r1].clone() if batch.zero_all is not None else None,
                batch.damps[g],
            ))
            r0 = r1
        results.append(out)
    return results


@torch.no_grad()
def obs_solve_batch(problems: list[ObsProblem], prune: PruneTarget | None = None, quant: QuantSpec | None = None,
                    settings: ObsSettings = ObsSettings()) -> list[list[ObsResult]]:
    """Solve problems with the same number of input columns together; one ObsResult per linear."""
    blocksize = settings.blocksize
    cols, group, dynamic_groups = _check_batch(problems, prune, quant, blocksize, settings.act_order)
    batch = _stack(problems, quant, settings.percdamp, settings.act_order, cols, group, dynamic_groups)
    batch.d = torch.diagonal(batch.U, dim1=1, dim2=2)
    batch.dinv = 1.0 / batch.d
    static = _static_columns(batch) if quant is not None and not dynamic_groups else (None, None)
    q = _Quantizer(quant, *static)
    ub = _sub_block(blocksize, prune.m if prune else None, group if dynamic_groups else None)
    Err1 = torch.empty(batch.WT.shape[0], ub, batch.WT.shape[2], device=batch.WT.device)
    for b1 in range(0, cols, blocksize):
        b2 = min(b1 + blocksize, cols)
        _block_mask(batch, problems, prune, b1, b2)
        for i1 in range(b1, b2, ub):
            i2 = min(i1 + ub, b2)
            _solve_columns(batch, q, prune, Err1, i1, i2)
            if i2 < cols:  # the lazy update of every later column
                batch.WT[:, i2:].baddbmm_(batch.U[:, i1:i2, i2:].transpose(1, 2), Err1[:, : i2 - i1], alpha=-1.0)
    return _unstack(batch, problems, prune)


def obs_solve(weight: torch.Tensor, hessian: torch.Tensor, prune: PruneTarget | None = None,
              keep_mask: torch.Tensor | None = None, quant: QuantSpec | None = None,
              settings: ObsSettings = ObsSettings(), name: str = "weight") -> ObsResult:
    """Prune (unstructured or N:M, or keep a given mask) and/or quantize one weight matrix."""
    problem = ObsProblem(hessian, [weight], [name], [keep_mask])
    return obs_solve_batch([problem], prune, quant, settings)[0][0]
