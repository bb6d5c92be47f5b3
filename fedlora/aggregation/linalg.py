"""Factored linear algebra on one layer's LoRA factors; a dense d x k matrix is never formed.

A pair (B, A) with B of shape (d, R) and A of shape (R, k) stands for the d x k matrix B @ A.
The SVD of such a product costs O((d + k) R^2): Gram matrices of B and of A, then an SVD of
the small R x R core. Norms use R x R Gram matrices: ||B A||_F^2 = trace((B^T B)(A A^T)),
which resolves a difference down to about 1e-8 of the norms involved (the square root of
float64's epsilon).
The functions keep the dtype they are given; strategies call them in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def factored_svd(b: Tensor, a: Tensor, keep: int | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) with B @ A = U diag(S) Vh, S descending: every singular value, and the
    singular vectors of the first `keep` (all when None; with `keep`, U diag(S) Vh is the
    best rank-`keep` approximation).

    From the R x R Gram matrices: B^T B = Vb Lb Vb^T and A A^T = Va La Va^T give square roots
    Rb = Lb^1/2 Vb^T and Ra = La^1/2 Va^T (B = Qb Rb and A^T = Qa Ra for orthonormal Qb, Qa
    that are never formed), so the singular values of B A are those of the small core
    Rb Ra^T = Uc S Vc^T. The vectors follow without inverting anything: u_j = B Ra^T vc_j / s_j
    and vh_j = uc_j^T Rb A / s_j (a component with s_j = 0 gets zero vectors; it adds nothing
    to the product). Two Grams, two small eigendecompositions, one small SVD and two thin
    products: matrix products where two Householder QRs were (about 2x faster at LoRA shapes).
    Accuracy: about 1e-8 of ||B|| ||A|| in float64, as the norms here (a Gram matrix squares
    the condition number); tests and benchmarks/merge_speed.py compare with a dense SVD.
    """
    lb, vb = torch.linalg.eigh(b.T @ b)
    la, va = torch.linalg.eigh(a @ a.T)
    rb = lb.clamp(min=0).sqrt()[:, None] * vb.T  # (R, R): B^T B = rb^T rb
    ra = la.clamp(min=0).sqrt()[:, None] * va.T
    uc, s, vhc = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    s = s[:min(b.shape[0], a.shape[1], s.numel())]  # the product has at most min(d, k, R)
    m = s.numel() if keep is None else min(keep, s.numel())
    floor = float(s.max()) * torch.finfo(s.dtype).eps * s.numel() if s.numel() else 0.0
    inv = torch.where(s[:m] > floor, 1 / s[:m], torch.zeros_like(s[:m]))
    u = b @ (ra.T @ (vhc[:m].T * inv))  # (d, m)
    vh = ((uc[:, :m].T * inv[:, None]) @ rb) @ a  # (m, k)
    return u, s, vh


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
    u, s, vh = factored_svd(b, a, keep=rank)
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
