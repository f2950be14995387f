"""Rotations that make weights incoherent before quantization (QuaRot, SpinQuant), as plain
functions over weights.

In a pre-norm transformer whose norms are RMSNorm, the residual stream x can be replaced by x Q
for any orthogonal Q without changing the function: RMSNorm(x Q) = RMSNorm(x) Q once the norm's
weight is folded into the linears that read it. Every linear reading the stream then holds W Q,
every linear writing it Q^T W, the embedding E Q and the head W Q. Inside attention, each head's
values can be rotated the same way (v_proj's rows of a head by H^T, o_proj's columns of it by H).
A rotated weight spreads each outlier over all its inputs, so a uniform grid fits it better.

The matrices are randomised Hadamard ones: a Sylvester Hadamard matrix of the largest power of two
dividing n, Kronecker with a random orthogonal matrix of the odd rest (576 = 64 x 9 for SmolLM2),
times random signs. All of it is fused into the weights offline: nothing runs at inference.
"""

from __future__ import annotations

import torch


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix of Sylvester's construction (n a power of two), scaled to be orthogonal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian matrix, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


def randomized_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """An n x n orthogonal matrix: diag(random signs) @ (Hadamard(2^k) kron random orthogonal(n / 2^k))."""
    if n < 1:
        raise ValueError(f"a rotation needs a positive size, got {n}")
    generator = torch.Generator().manual_seed(seed)
    power = n & -n  # the largest power of two dividing n
    rest = n // power
    matrix = sylvester_hadamard(power)
    if rest > 1:
        matrix = torch.kron(matrix, random_orthogonal(rest, generator))
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs.unsqueeze(1) * matrix


def fold_into_inputs(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W diag(scale): a norm's per-channel weight moved into a linear reading the norm's output."""
    return weight * scale.unsqueeze(0)


def rotate_inputs(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """W Q: the linear reads x Q and computes what it computed on x ([out, in] weights)."""
    return weight @ q


def rotate_outputs(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q^T W: the linear (an [out, in] weight, or a bias as [out, 1]) writes y Q instead of y."""
    return q.T @ weight


def rotate_head_outputs(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each head's block of rows (values, [heads * d, in], or a bias as [heads * d, 1]) by H^T."""
    d = h.shape[0]
    if weight.shape[0] % d:
        raise ValueError(f"{weight.shape[0]} rows do not split into heads of {d}")
    blocks = weight.reshape(-1, d, weight.shape[1])
    return (h.T @ blocks).reshape(weight.shape)


def rotate_head_inputs(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each head's block of columns ([out, heads * d]) by H: the linear reads heads rotated by H."""
    d = h.shape[0]
    if weight.shape[1] % d:
        raise ValueError(f"{weight.shape[1]} columns do not split into heads of {d}")
    blocks = weight.reshape(weight.shape[0], -1, d)
    return (blocks @ h).reshape(weight.shape)
