"""Factored linear algebra on one layer's LoRA factors; a dense d x k matrix is never formed.

A pair (B, A) with B of shape (d, R) and A of shape (R, k) stands for the d x k matrix B @ A.
The SVD of such a product costs O((d + k) R^2): QR of B and of A^T, then an SVD of the small
R x R core. Norms use R x R Gram matrices: ||B A||_F^2 = trace((B^T B)(A A^T)), which resolves a
difference down to about 1e-8 of the norms involved (the square root of float64's epsilon).
The functions keep the dtype they are given; strategies call them in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def factored_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) with B @ A = U diag(S) Vh, S descending; nothing is dropped."""
    qb, rb = torch.linalg.qr(b)  # (d, m), (m, R) with m = min(d, R)
    qa, ra = torch.linalg.qr(a.T)  # (k, n), (n, R) with n = min(k, R)
    uc, s, vhc = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # the small m x n core
    return qb @ uc, s, vhc @ qa.T


def balanced_factors(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """First `rank` SVD components as (U sqrt(S), sqrt(S) Vh), zero-padded up to `rank`."""
    keep = min(rank, s.shape[0])
    root = s[:keep].clamp(min=0).sqrt()
    return pad_rank(u[:, :keep] * root, root[:, None] * vh[:keep], rank)


def truncate_svd(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-`rank` approximation of B @ A as balanced factors, and the Frobenius norm dropped.

    B_r = U_r diag(sqrt S_r), A_r = diag(sqrt S_r) Vh_r, zero-padded to exactly `rank` when the
    product has fewer singular values; dropped = sqrt(sum of the dropped S^2).
    """
    u, s, vh = factored_svd(b, a)
    b_r, a_r = balanced_factors(u, s, vh, rank)
    return b_r, a_r, float(s[rank:].square().sum().sqrt())


def product_norm(b: Tensor, a: Tensor) -> float:
    """||B @ A||_F from the Gram matrices: sqrt(trace((B^T B)(A A^T)))."""
    # Both Gram matrices are symmetric, so the trace of their product is their elementwise dot.
    squared = float(((b.T @ b) * (a @ a.T)).sum())
    return math.sqrt(max(squared, 0.0))  # rounding can leave a tiny negative


def difference_norm(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> float:
    """||B1 A1 - B2 A2||_F, as the product norm of [B1, -B2] [A1; A2]."""
    return product_norm(torch.cat([b1, -b2], dim=1), torch.cat([a1, a2], dim=0))


def stack(factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float]
          ) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking: [B_1 .. B_N], [w_1 A_1; ..; w_N A_N], whose product is sum w_i B_i A_i.

    The weights are used as given (pass normalised p_i for an average).
    """
    if len(factors) != len(weights):
        raise ValueError(f"stack: {len(factors)} factor pairs but {len(weights)} weights")
    b = torch.cat([bi for bi, _ in factors], dim=1)
    a = torch.cat([w * ai for (_, ai), w in zip(factors, weights)], dim=0)
    return b, a


def pad_rank(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad B's columns and A's rows up to `rank` (unchanged when already that large)."""
    extra = rank - b.shape[1]
    if extra <= 0:
        return b, a
    return (torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
            torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0))


def truncate_rank(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The first `rank` components: B's first columns and A's first rows."""
    return b[:, :rank], a[:rank]
