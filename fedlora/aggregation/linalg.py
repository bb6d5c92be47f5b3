"""Factored linear algebra on one layer's LoRA factors; a dense d x k matrix is never formed.

A pair (B, A) with B of shape (d, R) and A of shape (R, k) stands for the d x k matrix B @ A.
The SVD of such a product costs O((d + k) R^2): QR of B and of A^T, then an SVD of the small
R x R core. The QRs are CholeskyQR2 (two passes of Gram matrix, Cholesky and triangular solve:
matrix products, faster than LAPACK's Householder QR at LoRA shapes; docs/strategies.md) where the
first pass shows it holds, Householder QR otherwise, so the accuracy is the Householder QR's;
the orthonormal factors are applied to the kept singular vectors only, never formed. Norms use
R x R Gram matrices: ||B A||_F^2 = trace((B^T B)(A A^T)), which resolves a difference down to
about 1e-8 of the norms involved (the square root of float64's epsilon).
The functions keep the dtype they are given; strategies call them in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

PASS_TWO_TOL = 1e-3  # CholeskyQR2 is used when the first pass leaves |Q1^T Q1 - I| <= this


class Basis(NamedTuple):
    """x = Q r with orthonormal Q = q t^-1 (t upper triangular, None for the identity): Q is
    applied to thin matrices instead of being formed."""

    q: Tensor
    t: Tensor | None
    r: Tensor

    def times(self, c: Tensor) -> Tensor:
        """Q @ c."""
        return self.q @ (c if self.t is None else
                         torch.linalg.solve_triangular(self.t, c, upper=True))


def right_solve(x: Tensor, u: Tensor) -> Tensor:
    """x @ u^-1 for upper-triangular u, solved in the layout x is stored in (column-major
    storage is about 1.5x faster for LAPACK's triangular solve)."""
    if x.stride(0) == 1:
        return torch.linalg.solve_triangular(u, x, upper=True, left=False)
    return torch.linalg.solve_triangular(u.T, x.T, upper=False, left=True).T


def cholesky_qr2(x: Tensor) -> Basis | None:
    """CholeskyQR2 of a tall x, or None when x is too ill-conditioned for it.

    Pass one: x^T x = U1^T U1, Q1 = x U1^-1. Pass two repeats it on Q1 (Q1^T Q1 = U2^T U2), which
    leaves Q = Q1 U2^-1 orthonormal to rounding whenever Q1 is close to orthonormal already; so
    pass two runs only when |Q1^T Q1 - I| <= PASS_TWO_TOL (in float64 that holds up to about
    cond(x) = 1e6), and Q itself is never formed.
    """
    n, c = x.shape
    if n < c or c == 0:
        return None
    u1, info = torch.linalg.cholesky_ex(x.T @ x, upper=True)
    if int(info) != 0:
        return None
    q1 = right_solve(x, u1)
    g2 = q1.T @ q1
    gap = float((g2 - torch.eye(c, dtype=g2.dtype)).abs().max())
    if not gap <= PASS_TWO_TOL:  # also refuses NaN
        return None
    u2, info = torch.linalg.cholesky_ex(g2, upper=True)
    if int(info) != 0:
        return None
    return Basis(q1, u2, u2 @ u1)


def orthonormal_basis(x: Tensor) -> Basis:
    """x = Q r: CholeskyQR2 where it holds, LAPACK's Householder QR otherwise (both leave Q
    orthonormal to rounding and x - Q r at the rounding level of x)."""
    basis = cholesky_qr2(x)
    if basis is None:
        q, r = torch.linalg.qr(x)
        basis = Basis(q, None, r)
    return basis


def thin_qr(x: Tensor) -> tuple[Tensor, Tensor]:
    """x = Q R with Q (n, m) orthonormal and R (m, c), m = min(n, c); Q formed explicitly."""
    basis = orthonormal_basis(x)
    eye = torch.eye(basis.q.shape[1], dtype=x.dtype)
    return basis.times(eye), basis.r


def core_svd(b: Tensor, a: Tensor) -> tuple[Basis, Basis, Tensor, Tensor, Tensor]:
    """(Qb, Qa, Uc, S, Vhc): B = Qb Rb, A^T = Qa Ra and the SVD Rb Ra^T = Uc diag(S) Vhc of the
    small core, so that B @ A = (Qb Uc) diag(S) (Qa Vhc^T)^T."""
    qb, qa = orthonormal_basis(b), orthonormal_basis(a.T)
    uc, s, vhc = torch.linalg.svd(qb.r @ qa.r.T, full_matrices=False)
    return qb, qa, uc, s, vhc


def factored_svd(b: Tensor, a: Tensor, keep: int | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) with B @ A = U diag(S) Vh, S descending: every singular value, with the
    singular vectors of the first `keep` (all when None)."""
    qb, qa, uc, s, vhc = core_svd(b, a)
    m = s.numel() if keep is None else min(keep, s.numel())
    return qb.times(uc[:, :m]), s, qa.times(vhc[:m].T).T


def balanced_factors(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """First `rank` SVD components as (U sqrt(S), sqrt(S) Vh), zero-padded up to `rank`."""
    keep = min(rank, s.shape[0])
    root = s[:keep].clamp(min=0).sqrt()
    return pad_rank(u[:, :keep] * root, root[:, None] * vh[:keep], rank)


def balanced_svd(b: Tensor, a: Tensor, rank: int, dtype: torch.dtype | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(B_r, A_r, S): the best rank-`rank` approximation of B @ A as balanced factors
    B_r = U_r diag(sqrt S_r), A_r = diag(sqrt S_r) Vh_r (in `dtype`, B's when None), zero-padded
    to exactly `rank` when the product has fewer singular values, and every singular value.

    The same as balanced_factors(*factored_svd(b, a, keep=rank), rank), with sqrt(S) folded
    into the small core factors, so each d x rank / rank x k result is written once.
    """
    qb, qa, uc, s, vhc = core_svd(b, a)
    keep = min(rank, s.numel())
    root = s[:keep].clamp(min=0).sqrt()
    b_r = qb.times(uc[:, :keep] * root).to(dtype or b.dtype)
    a_r = qa.times(vhc[:keep].T * root).T.to(dtype or b.dtype)
    return (*pad_rank(b_r, a_r, rank), s)


def truncate_svd(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-`rank` approximation of B @ A as balanced factors, and the Frobenius norm dropped.

    B_r = U_r diag(sqrt S_r), A_r = diag(sqrt S_r) Vh_r, zero-padded to exactly `rank` when the
    product has fewer singular values; dropped = sqrt(sum of the dropped S^2).
    """
    b_r, a_r, s = balanced_svd(b, a, rank)
    return b_r, a_r, float(s[rank:].square().sum().sqrt())


def product_inner(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> Tensor:
    """<B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T)) from r x r blocks, as a 0-d tensor: the
    elementwise dot of B1^T B2 and A1 A2^T."""
    return ((b1.T @ b2) * (a1 @ a2.T)).sum()


def product_norm(b: Tensor, a: Tensor) -> float:
    """||B @ A||_F from the Gram matrices: sqrt(trace((B^T B)(A A^T)))."""
    squared = float(product_inner(b, a, b, a))
    return math.sqrt(max(squared, 0.0))  # rounding can leave a tiny negative


CANCELLATION = 64.0  # above this bound / value ratio, a float32 Gram norm is redone in float64


def gram_product_norm(b: Tensor, a: Tensor) -> float:
    """||B @ A||_F from Gram blocks in the factors' own dtype (B^T B and A A^T, r x r),
    combined in float64: the float32 blocks of a 7B layer cost a tenth of float64 copies.

    Each Gram entry is a dot product, so its rounding error is at most about gamma |b_j| |b_k|
    (gamma ~ d x unit roundoff, far less in practice); the sum's error is then bounded by
    gamma times E = sum_jk (|b_j| |b_k| |G_A,jk| + |G_B,jk| |a_j| |a_k|), which the blocks' own
    diagonals give. Where E is above `CANCELLATION` times ||B A||^2 (terms that cancel: factors
    much larger than their product, as a hostile reply may send) or where float32 overflows,
    the norm is computed again from float64 copies (`product_norm`)."""
    if b.dtype != torch.float32 or a.dtype != torch.float32:  # float64, or a narrower dtype
        return product_norm(b.double(), a.double())  # whose rounding the bound ignores
    gram_b, gram_a = (b.T @ b).double(), (a @ a.T).double()
    squared = float((gram_b * gram_a).sum())
    scale_b, scale_a = gram_b.diagonal().clamp(min=0).sqrt(), gram_a.diagonal().clamp(min=0).sqrt()
    bound = float((torch.outer(scale_b, scale_b) * gram_a.abs()).sum()
                  + (gram_b.abs() * torch.outer(scale_a, scale_a)).sum())
    if not (math.isfinite(squared) and math.isfinite(bound)) or bound > CANCELLATION * squared:
        return product_norm(b.double(), a.double())
    return math.sqrt(squared)


def difference_norm(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> float:
    """||B1 A1 - B2 A2||_F, the product norm of [B1, -B2] [A1; A2] from its Gram blocks:
    ||B1 A1||^2 - 2 <B1 A1, B2 A2> + ||B2 A2||^2, without the stacked copies and without the
    Gram's mirrored off-diagonal block."""
    squared = float(product_inner(b1, a1, b1, a1) + product_inner(b2, a2, b2, a2)
                    - 2 * product_inner(b1, a1, b2, a2))
    return math.sqrt(max(squared, 0.0))  # rounding can leave a tiny negative


def squared_norm(t: Tensor) -> float:
    """||t||^2 of any tensor, in its own dtype by one dot product (no squared copy); inf
    where that overflows the dtype."""
    flat = t.reshape(-1)
    return float(torch.dot(flat, flat))


class ChangeFigures(NamedTuple):
    """What `change_figures` measures of one layer's reply against what it received."""

    change: float  # ||B A - B_ref A_ref||_F^2
    moved: float  # ||B - B_ref||_F^2 + ||A - A_ref||_F^2
    product: float | None  # ||B A||_F^2 where asked for, else None


class BlockFigures(NamedTuple):
    """`block_figures` of n layers: float64 tensors of shape (n,) and two masks."""

    change: Tensor
    moved: Tensor
    product: Tensor | None
    direct: Tensor  # True: A nearly cancels A_ref; measure this layer with `direct` blocks
    recheck: Tensor  # True: the product norm's terms cancel; `gram_product_norm` instead


def reference_grams(b_ref: Tensor, a_ref: Tensor) -> tuple[Tensor, Tensor]:
    """(B_ref^T B_ref, A_ref A_ref^T) in float64 (r x r, from the factors' own dtype): what
    `change_figures` needs of the reference, computed once per reference."""
    return (b_ref.T @ b_ref).double(), (a_ref @ a_ref.T).double()


def change_blocks(b: Tensor, a: Tensor, b_ref: Tensor, a_ref: Tensor,
                  out: Tensor | None = None) -> Tensor:
    """(P, Q, D, Z) = (dB^T dB, dB^T B_ref, dA dA^T, A_ref dA^T) of one layer, with
    dB = B - B_ref and dA = A - A_ref: shape (4, r, r), in the factors' dtype (into `out`)."""
    r = b.shape[1]
    out = torch.empty(4, r, r, dtype=b.dtype) if out is None else out
    db, da = b - b_ref, a - a_ref
    torch.mm(db.T, db, out=out[0])
    torch.mm(db.T, b_ref, out=out[1])
    torch.mm(da, da.T, out=out[2])
    torch.mm(a_ref, da.T, out=out[3])
    return out


def own_blocks(b: Tensor, a: Tensor, out: Tensor | None = None) -> Tensor:
    """`change_blocks` against zero factors (a client that received none: flora's fresh
    adapters): (B^T B, 0, A A^T, 0), two products instead of four."""
    r = b.shape[1]
    out = torch.empty(4, r, r, dtype=b.dtype) if out is None else out
    torch.mm(b.T, b, out=out[0])
    torch.mm(a, a.T, out=out[2])
    out[1].zero_()
    out[3].zero_()
    return out


def block_figures(blocks: Tensor, gram_b: Tensor, gram_a: Tensor, product: bool = False,
                  direct: tuple[Tensor, Tensor] | None = None) -> BlockFigures:
    """`change_figures` of n layers at once from their `change_blocks` (n, 4, r, r) and their
    references' Gram blocks (n, r, r) each: the r x r arithmetic in float64, batched over the
    layers. `direct`: (A A^T, A dA^T) computed from A itself, for layers whose A nearly
    cancels A_ref (then no layer is marked `direct`)."""
    def diagonal(t: Tensor) -> Tensor:
        return t.diagonal(dim1=1, dim2=2)

    def outer(x: Tensor, y: Tensor) -> Tensor:
        return x[:, :, None] * y[:, None, :]

    p, q, d, z = blocks.double().unbind(1)
    if direct is None:
        a_at, a_da = gram_a + z + z.transpose(1, 2) + d, z + d
        rows_a = diagonal(gram_a).clamp(min=0).sqrt() + diagonal(d).clamp(min=0).sqrt()
        cancels = ~(rows_a.square() <= 4 * diagonal(a_at)).all(dim=1)  # also on NaN
    else:
        a_at, a_da = direct
        rows_a = diagonal(a_at).clamp(min=0).sqrt()
        cancels = torch.zeros(len(p), dtype=torch.bool)
    change = ((p * a_at).sum(dim=(1, 2)) + (gram_b * d).sum(dim=(1, 2))
              + 2 * (q * a_da).sum(dim=(1, 2)))
    change = torch.where(change < 0, 0.0, change)  # a tiny negative of the cross term
    moved = diagonal(p).sum(dim=1) + diagonal(d).sum(dim=1)
    if not product:
        return BlockFigures(change, moved, None, cancels, torch.zeros_like(cancels))
    b_bt = gram_b + q + q.transpose(1, 2) + p
    squared = (b_bt * a_at).sum(dim=(1, 2))
    rows_b = diagonal(gram_b).clamp(min=0).sqrt() + diagonal(p).clamp(min=0).sqrt()
    bound = ((outer(rows_b, rows_b) * a_at.abs()).sum(dim=(1, 2))
             + (b_bt.abs() * outer(rows_a, rows_a)).sum(dim=(1, 2)))
    recheck = ~(squared.isfinite() & bound.isfinite() & (bound <= CANCELLATION * squared))
    return BlockFigures(change, moved, squared, cancels, recheck)


def change_figures(b: Tensor, a: Tensor, b_ref: Tensor, a_ref: Tensor,
                   ref_grams: tuple[Tensor, Tensor] | None = None,
                   product: bool = False) -> ChangeFigures:
    """||B A - B_ref A_ref||_F^2, ||dB||^2 + ||dA||^2 and (with `product`) ||B A||_F^2 of one
    layer from four r x r blocks of the changes dB = B - B_ref and dA = A - A_ref, computed in
    the factors' dtype (`change_blocks`):

        P = dB^T dB,  Q = dB^T B_ref,  D = dA dA^T,  Z = A_ref dA^T

    and the reference's Gram blocks G_B, G_A (`reference_grams`), combined in float64
    (`block_figures`, which does it for many layers at once):

        A dA^T = Z + D,   A A^T = G_A + Z + Z^T + D,   B^T B = G_B + Q + Q^T + P
        ||B A - B_ref A_ref||^2 = <P, A A^T> + <G_B, D> + 2 <Q, A dA^T>
        ||B A||^2 = <B^T B, A A^T>

    (B A - B_ref A_ref = dB A + B_ref dA.) Every term of the change is of the size of the
    change, so float32 blocks are precise enough, and a reply that did not move gives exactly
    0. Four products of d x r or r x k by their transposes, where measuring the change and the
    product directly takes seven.

    Rounding: a derived block's entry (j, k) errs by about gamma s_j s_k (s_j the sum of the
    two terms' row norms, |a_ref_j| + |dA_j| for A) where the direct product errs by about
    gamma |a_j| |a_k|. Where a row of A is less than half its s_j (A nearly cancels A_ref, as a
    hostile reply may send), A A^T and A dA^T are computed directly instead. The product norm
    is checked as `gram_product_norm` checks its own (with the larger s_j) and computed there
    where its terms cancel. Non-finite results (float32 overflow) are returned as they are:
    the caller measures again in float64."""
    gram_b, gram_a = reference_grams(b_ref, a_ref) if ref_grams is None else ref_grams
    blocks = change_blocks(b, a, b_ref, a_ref)[None]
    figures = block_figures(blocks, gram_b[None], gram_a[None], product)
    if figures.direct[0]:
        figures = block_figures(blocks, gram_b[None], gram_a[None], product,
                                direct=direct_blocks(a, a_ref))
    squared = None
    if figures.product is not None:
        squared = (gram_product_norm(b, a) ** 2 if figures.recheck[0]
                   else float(figures.product[0]))
    return ChangeFigures(float(figures.change[0]), float(figures.moved[0]), squared)


def direct_blocks(a: Tensor, a_ref: Tensor) -> tuple[Tensor, Tensor]:
    """(A A^T, A dA^T) of one layer from A itself, float64, shape (1, r, r) each: what
    `block_figures` uses where A nearly cancels A_ref."""
    return (a @ a.T).double()[None], (a @ (a - a_ref).T).double()[None]


def stack(factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float],
          dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking: [B_1 .. B_N], [w_1 A_1; ..; w_N A_N], whose product is sum w_i B_i A_i.

    The weights are used as given (pass normalised p_i for an average). The result has `dtype`
    (the first B's when None); each factor is copied into it once, converted on the way.
    """
    if len(factors) != len(weights):
        raise ValueError(f"stack: {len(factors)} factor pairs but {len(weights)} weights")
    dtype = dtype or factors[0][0].dtype
    d, k = factors[0][0].shape[0], factors[0][1].shape[1]
    total = sum(bi.shape[1] for bi, _ in factors)
    b = torch.empty(d, total, dtype=dtype)
    a = torch.empty(total, k, dtype=dtype)
    start = 0
    for (bi, ai), w in zip(factors, weights):
        end = start + bi.shape[1]
        b[:, start:end].copy_(bi)
        a[start:end].copy_(ai).mul_(w)
        start = end
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


def randomized_svd(b: Tensor, a: Tensor, rank: int, seed: int, oversample: int = 10,
                   power: int = 1) -> tuple[Tensor, Tensor, Tensor, float]:
    """The top `rank` singular triplets of B @ A (d x R, R x k, any R) by a randomised range
    finder with `power` subspace iterations (Halko, Martinsson and Tropp 2011, algorithms 4.4
    and 5.1), never forming the d x k matrix: (U (d x m), S (m,), Vh (m x k), an estimate of
    ||B A||_F^2), m = min(rank + oversample, d, k, R) components, the first `rank` of which
    are the ones to keep.

    Every pass multiplies the stacked factors by a thin d x m or k x m block: O((d + k) R m)
    per pass, 2 + 2 x power passes, where the factored SVD (`balanced_svd`) costs
    O((d + k) R^2): linear instead of quadratic in R. The test matrix is drawn from `seed`
    (a layer gets the same one in every run). The passes run in B's dtype, the small final
    SVD in float64: of the m x m triangle of the core's QR (Q^T B A = R^T Q_c^T), three times
    faster than LAPACK's SVD of the m x k core itself, and as stable. U is returned in B's dtype
    (the passes' precision), S and Vh in float64. ||B A||_F^2 is estimated from the first pass
    (E||B A G||_F^2 = m ||B A||_F^2 for a Gaussian G): what the truncation drops is reported
    from it.
    """
    d, k = b.shape[0], a.shape[1]
    m = max(1, min(rank + oversample, d, k, b.shape[1]))
    gen = torch.Generator().manual_seed(seed)
    test = torch.randn(k, m, generator=gen, dtype=b.dtype)
    z = b @ (a @ test)  # (B A) G
    energy = float(z.double().square().sum()) / m
    q = torch.linalg.qr(z).Q
    for _ in range(power):  # subspace iteration, re-orthonormalised each half step
        w = torch.linalg.qr(a.T @ (b.T @ q)).Q
        q = torch.linalg.qr(b @ (a @ w)).Q
    q_c, r_c = torch.linalg.qr((a.T @ (b.T @ q)).double())  # (Q^T B A)^T = Q_c R_c: k x m
    u_c, s, vh_c = torch.linalg.svd(r_c.T)  # Q^T B A = R_c^T Q_c^T = u_c diag(s) (vh_c Q_c^T)
    return q @ u_c.to(q.dtype), s, vh_c @ q_c.T, energy
