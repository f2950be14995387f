"""Statistics of a linear's input, accumulated in fp32 over calibration tokens.

- Hessian H = (2/N) sum x x^T, kept as a running mean (SparseGPT / GPTQ / AWQ's output MSE);
  only the blocks on and above the diagonal are accumulated (H is symmetric: ~30% fewer
  FLOPs than one full GEMM), the lower blocks are mirrored when H is read;
- squared column norms sum_t x_tj^2 (Wanda's ||X_j||_2^2);
- mean |x_j| (AWQ's activation scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StatsRequest:
    hessian: bool = False
    col_sq: bool = False
    abs_mean: bool = False
    dense_targets: bool = False  # also carry the dense model's activations (learned rounding's targets)


class InputStats:
    def __init__(self, in_features: int, request: StatsRequest, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.in_features = in_features
        self.request = request
        self.device = torch.device(device)  # where the statistics are accumulated (the block's device)
        self._hessian = torch.zeros(in_features, in_features, device=device) if request.hessian else None
        self._mirrored = True
        parts = 4 if in_features >= 256 else 1
        edges = [in_features * k // parts for k in range(parts + 1)]
        self._spans = list(zip(edges[:-1], edges[1:]))
        self.col_sq = torch.zeros(in_features, device=device) if request.col_sq else None
        self.abs_sum = torch.zeros(in_features, device=device) if request.abs_mean else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.device, torch.float32)
        b = x.shape[0]
        total = self.tokens + b
        if self._hessian is not None:
            # running mean of 2 x x^T: H <- H * n/(n+b) + (2/(n+b)) X^T X, upper blocks only
            for i, (a0, a1) in enumerate(self._spans):
                for b0, b1 in self._spans[i:]:
                    self._hessian[a0:a1, b0:b1].addmm_(x[:, a0:a1].T, x[:, b0:b1], beta=self.tokens / total,
                                                      alpha=2.0 / total)
            self._mirrored = False
        if self.col_sq is not None:
            self.col_sq += x.pow(2).sum(0)
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0)
        self.tokens = total

    def make_data_free(self) -> None:
        """Identity statistics, for an input seen on too few tokens (an MoE expert the router
        rarely picks): H = I, unit column norms, unit mean |x|."""
        n = self.in_features
        if self._hessian is not None:
            self._hessian = torch.eye(n, device=self.device)
            self._mirrored = True
        if self.col_sq is not None:
            self.col_sq = torch.ones(n, device=self.device)
        if self.abs_sum is not None:
            self.abs_sum = torch.ones(n, device=self.device) * max(self.tokens, 1)

    @property
    def hessian(self) -> torch.Tensor | None:
        if self._hessian is not None and not self._mirrored:
            for i, (a0, a1) in enumerate(self._spans):
                for b0, b1 in self._spans[i + 1 :]:
                    self._hessian[b0:b1, a0:a1] = self._hessian[a0:a1, b0:b1].T
            self._mirrored = True
        return self._hessian

    def take_hessian(self) -> torch.Tensor | None:
        """The Hessian, handed over: these statistics keep no reference (its memory goes with the
        caller's last one: a big model's 14336-wide Hessian is 0.8 GB)."""
        hessian = self.hessian
        self._hessian = None
        return hessian

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def col_norm(self) -> torch.Tensor:
        return self.col_sq.sqrt()
