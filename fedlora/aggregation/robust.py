"""Defences against hostile clients, on the composed update delta W = B A (pure torch).

Every rule here acts on delta W, never on the raw factors: B A = (B G)(G^-1 A) for any
invertible G, so a rule on B and A alone could be steered by a client's choice of gauge. The
functions read each client's delta-W-scaled factors (`fedlora.aggregation` conventions).

- **Screens** (on by default, `fedlora.config.DefenceSettings`):
  - `outliers`: replies whose update norm is above `ratio` x the round's lower median;
  - `cap_weights`: no client weighs more than `ratio` x the round's lower median weight.
  The lower median (of an even count, the smaller middle value) keeps one of two clients from
  setting the scale.
- **Krum / multi-Krum** (Blanchard et al. 2017): score each client by the summed squared
  distances of its delta W to its n - f - 2 nearest others; keep the n - f best. Distances come
  from Gram matrices of the stacked factors, O((d + k) R^2) per layer with R the sum of the
  client ranks; no d x k matrix is formed.
- **Coordinate-wise median and trimmed mean** (Yin et al. 2018) of the clients' delta W,
  unweighted, re-factored to the global rank by SVD. They need every client's d x k delta W,
  built a block of rows at a time (memory: one block of n x rows x k, `BLOCK_ENTRIES`); time
  O(n d k (R + log n)) per layer plus the re-factoring: a randomised SVD
  (`torch.svd_lowrank`, `EXTRA_COLUMNS` beyond the rank, 4 power steps; O(d k (r + 10))), or
  an exact SVD when the layer is not much larger than the rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.base import ClientUpdate, Factors, MergeResult, to32
from fedlora.aggregation.linalg import balanced_factors, difference_norm, product_norm
from fedlora.config import ROBUST_RULES
from fedlora.seeds import derive_seed

__all__ = ["ROBUST_RULES", "cap_shares", "cap_weights", "change_norm", "krum_scores", "krum_select",
           "lower_median", "outliers", "refactor", "robust_merge", "robust_shared_a",
           "squared_distances"]

BLOCK_ENTRIES = 1 << 24  # entries of float64 per block of the median (128 MiB)
EXTRA_COLUMNS = 10  # oversampling of the randomised re-factoring SVD


# ---------------------------------------------------------------- screens


def lower_median(values: Sequence[float]) -> float:
    """The middle value; of an even count, the smaller of the two middle ones."""
    if not values:
        raise ValueError("lower_median of no values")
    return sorted(values)[(len(values) - 1) // 2]


def change_norm(factors: Factors, reference: Factors) -> float:
    """||B A - B_ref A_ref||_F over all modules: how far a client moved from what it received
    (a module missing from `reference`, e.g. a fresh adapter, counts as zero there)."""
    total = 0.0
    for module, (b, a) in factors.items():
        b, a = b.double(), a.double()
        if module in reference:
            b_ref, a_ref = reference[module]
            total += difference_norm(b, a, b_ref.double(), a_ref.double()) ** 2
        else:
            total += product_norm(b, a) ** 2
    return math.sqrt(total)


def outliers(norms: Sequence[float], ratio: float, still: float = 0.0
             ) -> tuple[float, list[int]]:
    """(bound, indices of the norms above it or not finite) with bound = ratio x the lower
    median of the finite norms above `still`.

    A norm at or below `still` is a reply that returned (to rounding) what it received: it is
    kept, but does not set the scale. A NaN or infinite norm is never within bound, also when
    there is no bound: inf when ratio is 0 (off) or no finite norm is above `still` (no client
    moved, so there is no scale to compare with).
    """
    moved = [n for n in norms if math.isfinite(n) and n > still]
    broken = [i for i, n in enumerate(norms) if not math.isfinite(n)]
    if not ratio or not moved:
        return math.inf, broken
    bound = ratio * lower_median(moved)
    return bound, [i for i, n in enumerate(norms) if not n <= bound]


def cap_weights(weights: Sequence[float], ratio: float) -> tuple[list[float], float]:
    """(each weight cut to ratio x the lower median weight, that cap); unchanged when ratio is 0."""
    if not ratio or not weights:
        return list(weights), math.inf
    cap = ratio * lower_median(weights)
    return [min(w, cap) for w in weights], cap


def cap_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """The weights with no client's share of their sum above max(max_share, 1/n): each share
    above it is cut to it and the excess goes to the others in proportion to their weights
    (water-filling), the sum unchanged. A liar among honest clients then weighs at most
    max_share whatever it claims (1 = off)."""
    total, n = float(sum(weights)), len(weights)
    if not n or total <= 0 or max_share >= 1:
        return list(weights)
    cap = max(max_share, 1.0 / n)
    shares = [w / total for w in weights]
    capped: set[int] = set()
    while True:
        over = {i for i, p in enumerate(shares) if p > cap and i not in capped}
        if not over:
            break
        capped |= over
        rest = sum(w for i, w in enumerate(weights) if i not in capped)
        free = 1.0 - cap * len(capped)
        shares = [cap if i in capped else (w / rest * free if rest > 0 else free / (n - len(
            capped))) for i, w in enumerate(weights)]
    return [p * total for p in shares]


# ---------------------------------------------------------------- Krum


def squared_distances(updates: Sequence[Factors]) -> Tensor:
    """n x n matrix of ||delta W_i - delta W_j||_F^2 summed over modules, from Gram matrices.

    Per module, with B = [B_1 .. B_n] and A = [A_1; ..; A_n]: <B_i A_i, B_j A_j>_F is the sum of
    the (i, j) block of (B^T B) * (A A^T) (elementwise), so all inner products cost one pair of
    R x R Gram matrices.
    """
    n = len(updates)
    inner = torch.zeros(n, n, dtype=torch.float64)
    for module in updates[0]:
        bs = [u[module][0].double() for u in updates]
        as_ = [u[module][1].double() for u in updates]
        owner = torch.cat([torch.full((b.shape[1],), i) for i, b in enumerate(bs)])
        onehot = torch.nn.functional.one_hot(owner, n).double()  # R x n
        b, a = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        inner += onehot.T @ ((b.T @ b) * (a @ a.T)) @ onehot
    norms = inner.diagonal()
    return (norms[:, None] + norms[None, :] - 2 * inner).clamp(min=0)


def dense_squared_distances(updates: Sequence[dict[str, Tensor]]) -> Tensor:
    """n x n matrix of ||T_i - T_j||^2 summed over the plain tensors of each update."""
    n = len(updates)
    if not n or not updates[0]:
        return torch.zeros(n, n, dtype=torch.float64)
    flat = torch.stack([torch.cat([u[k].double().flatten() for k in sorted(u)])
                        for u in updates])
    return torch.cdist(flat, flat).square()


def krum_scores(distances: Tensor, f: int) -> list[float]:
    """Each client's summed squared distance to its n - f - 2 nearest others (at least 1)."""
    n = distances.shape[0]
    neighbours = max(n - f - 2, 1)
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1:]])
        scores.append(float(others.sort().values[:neighbours].sum()) if n > 1 else 0.0)
    return scores


def krum_select(scores: Sequence[float], f: int) -> list[int]:
    """Multi-Krum: indices of the n - f lowest scores (ties by index), in index order."""
    keep = max(len(scores) - f, 1)
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:keep])


# ---------------------------------------------------------------- median and trimmed mean


def trimmed_mean_rows(stacked: Tensor, trim: int) -> Tensor:
    """Coordinate-wise mean after dropping the `trim` largest and smallest values (dim 0)."""
    n = stacked.shape[0]
    if 2 * trim >= n:
        raise ValueError(f"cannot trim {trim} from each end of {n} values")
    ordered = stacked.sort(dim=0).values
    return ordered[trim:n - trim].mean(dim=0)


def median_trim(n: int) -> int:
    """The trim that turns the trimmed mean into the median (the mean of the two middle
    values for an even n)."""
    return (n - 1) // 2


def robust_delta_w(pairs: Sequence[tuple[Tensor, Tensor]], trim: int) -> Tensor:
    """The d x k coordinate-wise trimmed mean of the B_i A_i, built a block of rows at a time."""
    d, k, n = pairs[0][0].shape[0], pairs[0][1].shape[1], len(pairs)
    rows = max(1, BLOCK_ENTRIES // max(n * k, 1))
    out = torch.empty(d, k, dtype=torch.float64)
    for start in range(0, d, rows):
        block = torch.stack([b[start:start + rows].double() @ a.double() for b, a in pairs])
        out[start:start + rows] = trimmed_mean_rows(block, trim)
    return out


def refactor(dense: Tensor, rank: int, seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """Balanced rank-`rank` factors of a dense matrix and the relative norm dropped: randomised
    SVD with EXTRA_COLUMNS beyond the rank and 4 power steps, its random start drawn from
    `seed` (the same factors on every run and on resume), or an exact SVD when that many
    columns are the whole matrix. Its top components match the exact SVD's to rounding when
    the spectrum falls off past the rank (tests/test_robust.py)."""
    total = float(dense.square().sum())
    columns = rank + EXTRA_COLUMNS
    if columns >= min(dense.shape):
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(dense, q=columns, niter=4)
        vh = v.T
    kept = float(s[:rank].square().sum())
    b, a = balanced_factors(u, s, vh, rank)
    return b, a, math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0


def robust_shared_a(updates: Sequence[ClientUpdate], rule: str, f: int, previous: Factors
                    ) -> MergeResult:
    """The median or trimmed mean of the clients' A itself, coordinate-wise, B kept as it was:
    the robust merge of a method that shares only A (fedsa-lora, whose clients keep their own
    B, so A must stay in the basis they trained it in: no re-factoring)."""
    trim = median_trim(len(updates)) if rule == "median" else f
    merged = {module: (previous[module][0].float(), trimmed_mean_rows(torch.stack(
        [u.factors[module][1].double() for u in updates]), trim).float())
        for module in updates[0].factors}
    return MergeResult(global_factors=merged, residual={}, applied=merged,
                       info={"robust": rule, "trimmed": trim})


def robust_merge(updates: Sequence[ClientUpdate], rule: str, f: int, rank: int, seed: int = 0
                 ) -> MergeResult:
    """The global adapter as the median or the trimmed mean (dropping f from each end) of the
    clients' delta W, re-factored to `rank` (each module's randomised SVD seeded from `seed`
    and the module's name), and of their plain tensors (DoRA's magnitude offsets) by the same
    rule; client weights do not enter."""
    n = len(updates)
    trim = median_trim(n) if rule == "median" else f
    merged: Factors = {}
    dropped = 0.0
    for module in updates[0].factors:
        pairs = [u.factors[module] for u in updates]
        b, a, lost = refactor(robust_delta_w(pairs, trim), rank, derive_seed(seed, module))
        merged[module] = to32(b, a)
        dropped = max(dropped, lost)
    # plain tensors (DoRA's magnitude offsets) by the same coordinate-wise rule
    dense = {key: trimmed_mean_rows(torch.stack([u.dense[key].double() for u in updates]),
                                    trim).float() for key in updates[0].dense}
    return MergeResult(global_factors=merged, residual={}, applied=merged, dense=dense,
                       info={"robust": rule, "trimmed": trim, "dropped": dropped})
