"""Statistics of a linear's input, accumulated in fp32 over calibration tokens.

- Hessian H = (2/N) sum x x^T, kept as a running mean (SparseGPT / GPTQ / AWQ's output MSE);
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


class InputStats:
    def __init__(self, in_features: int, request: StatsRequest):
        self.tokens = 0
        self.request = request
        self.hessian = torch.zeros(in_features, in_features) if request.hessian else None
        self.col_sq = torch.zeros(in_features) if request.col_sq else None
        self.abs_sum = torch.zeros(in_features) if request.abs_mean else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        b = x.shape[0]
        total = self.tokens + b
        if self.hessian is not None:
            # running mean of 2 x x^T: H <- H * n/(n+b) + (2/(n+b)) X^T X
            torch.addmm(self.hessian, x.T, x, beta=self.tokens / total, alpha=2.0 / total, out=self.hessian)
        if self.col_sq is not None:
            self.col_sq += x.pow(2).sum(0)
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0)
        self.tokens = total

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def col_norm(self) -> torch.Tensor:
        return self.col_sq.sqrt()
