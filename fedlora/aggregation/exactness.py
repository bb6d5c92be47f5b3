"""How far an aggregation is from the ideal update, and what truncation costs; all factored.

The ideal update of a layer is sum_i p_i B_i A_i (delta-W-scaled factors, p_i from the
clients' weights). Each figure is a relative Frobenius norm computed from small Gram matrices
of stacked factors (`linalg.product_norm`), never from a dense d x k matrix. Over several
modules the figure is sqrt(sum of squared numerators) / sqrt(sum of squared denominators). A
zero denominator gives 0.0 when the numerator is ~0 too (0/0), else infinity.

The exact figure costs O((d + k) R^2) per layer with R the sum of the clients' ranks: it grows
as N^2 with the number of clients (about 30 s a round for 32 clients of a 7B-shaped adapter on
2 cores). Above `EXACT_BUDGET` the server estimates it instead (`estimated_exactness`) from a
CountSketch of each layer (Clarkson-Woodruff): S(M) = Psi^T M Omega, s x s, with Psi (d x s)
and Omega (k x s) sparse sign-hash maps fixed per layer. S is linear, so S(B A) =
(Psi^T B)(A Omega) costs O((d + k) r) per client, is computed once per reply as it arrives
(`sketch_sides`), and the estimate ||S(X) - sum_i p_i S(B_i A_i)||_F / ||sum_i p_i S(B_i A_i)||_F
costs O(N s^2 r) for the whole round: linear in N. E||S(M)||_F^2 = ||M||_F^2; the relative
error of the overall figure is a few percent at s = 64 (measured in tests/test_exactness.py),
that of one layer's figure up to about 25% when its difference is of rank one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import cast

import torch
from torch import Tensor

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    LazyFactors,
    normalised_weights,
    raw_pairs,
    to32,
)
from fedlora.aggregation.linalg import (
    balanced_factors,
    difference_norm,
    product_inner,
    product_norm,
    randomized_svd,
    stack,
    truncate_svd,
)
from fedlora.seeds import derive_seed

ZERO = 1e-12  # a numerator at most this large over a zero denominator counts as 0/0
EXACT_BUDGET = 2e9  # (d + k) R^2 summed over the layers above which the figure is estimated
SKETCH = 64  # rows and columns of a layer's CountSketch
SKETCH_SEED = 0x5EED  # the sketch maps are the same in every run and on every machine
COMPRESS_SEED = 0xC0DE  # the randomised compression's test matrices, the same in every run
RANDOMIZED_LAYER = 2e8  # (d + k) R^2 of one layer above which `compress` may go randomised
RANDOMIZED_OVERSAMPLE = 10  # components the randomised compression computes beyond the budget


def ratio(num: float, den: float) -> float:
    """num / den, with 0/0 -> 0.0 and x/0 -> inf."""
    if den > 0:
        return num / den
    return 0.0 if num <= ZERO else math.inf


def exactness(applied: Factors, updates: list[ClientUpdate]) -> tuple[float, dict[str, float]]:
    """(overall, per module) ||applied product - sum_i p_i B_i A_i||_F / ||sum_i p_i B_i A_i||_F."""
    p = normalised_weights(updates)
    per_module: dict[str, float] = {}
    nums = dens = 0.0
    for module in updates[0].factors:
        ideal_b, ideal_a = stack(raw_pairs(updates, module), p, torch.float64)
        b, a = applied.get(module, (ideal_b[:, :0], ideal_a[:0]))  # absent: nothing applied
        num = difference_norm(b.double(), a.double(), ideal_b, ideal_a)
        den = product_norm(ideal_b, ideal_a)
        per_module[module] = ratio(num, den)
        nums, dens = nums + num**2, dens + den**2
    return ratio(math.sqrt(nums), math.sqrt(dens)), per_module


def truncation_loss(global_factors: Factors, payload: Factors) -> float:
    """Relative Frobenius norm lost when a client receives `payload` instead of the global
    factors (the payload at its rank, cut from them)."""
    return truncation_losses(global_factors, {0: payload})[0]


def truncation_losses(global_factors: Factors, payloads: dict[int, Factors]
                      ) -> dict[int, float]:
    """`truncation_loss` of each payload (rank -> what a client of that rank receives), with
    the global factors' float64 copies and Gram matrices made once per module for all ranks:
    ||B A - P_B P_A||^2 = ||B A||^2 - 2 <B A, P_B P_A> + ||P_B P_A||^2, each from r x r Gram
    blocks (`product_inner`, as `difference_norm` sums them). A payload that is the global's
    first r components (views of its factors, as hetlora and flexlora send) takes all three
    from the global's own Grams G_B = B^T B, G_A = A A^T: <G_B, G_A>, the sum of their first r
    columns' products, and of their leading r x r blocks'."""
    nums = dict.fromkeys(payloads, 0.0)
    dens = 0.0
    for module, (b, a) in global_factors.items():
        b64, a64 = b.double(), a.double()
        gram_b, gram_a = b64.T @ b64, a64 @ a64.T
        products = gram_b * gram_a
        own = products.sum()
        for rank, payload in payloads.items():
            pb, pa = payload[module]
            if leading(pb, pa, b, a):
                r = pb.shape[1]
                squared = float(own - 2 * products[:, :r].sum() + products[:r, :r].sum())
            else:
                pb, pa = pb.double(), pa.double()
                squared = float(own + product_inner(pb, pa, pb, pa)
                                - 2 * product_inner(b64, a64, pb, pa))
            nums[rank] += max(squared, 0.0)
        dens += max(float(own), 0.0)
    return {rank: ratio(math.sqrt(num), math.sqrt(dens)) for rank, num in nums.items()}


def leading(pb: Tensor, pa: Tensor, b: Tensor, a: Tensor) -> bool:
    """Whether (pb, pa) are views of the first columns of b and the first rows of a."""
    return (pb.data_ptr() == b.data_ptr() and pa.data_ptr() == a.data_ptr()
            and pb.dtype == b.dtype and pa.dtype == a.dtype
            and pb.stride() == b.stride() and pa.stride() == a.stride()
            and pb.shape[0] == b.shape[0] and pa.shape[1] == a.shape[1]
            and pb.shape[1] == pa.shape[0] <= b.shape[1])


def compress(factors: Factors, budget: int) -> tuple[Factors, float]:
    """Cut every module to rank <= `budget` by factored SVD; (factors, relative norm dropped).

    A module already within the budget is returned as it is. A module whose stack is large
    (`randomized_compress`) is cut by the randomised SVD instead, linear in its rank; there the
    norm dropped counts only the `RANDOMIZED_OVERSAMPLE` components computed beyond the
    budget (a lower bound, as flexlora's). Modules are read one at a time (`factors` may make
    each when read: `LazyFactors`), so only one module's stack is held.
    """
    out: Factors = {}
    dropped = total = 0.0
    for module, (b, a) in factors.items():
        if b.shape[1] <= budget:
            out[module] = (b, a)
            total += product_norm(b.double(), a.double()) ** 2
        elif randomized_compress(b.shape[0], a.shape[1], b.shape[1], budget):
            u, s, vh, _ = randomized_svd(b.float(), a.float(), budget,
                                         derive_seed(COMPRESS_SEED, module),
                                         oversample=RANDOMIZED_OVERSAMPLE)
            out[module] = to32(*balanced_factors(u, s, vh, budget))
            total += float(s.square().sum())
            dropped += float(s[budget:].square().sum())
        else:
            b64, a64 = b.double(), a.double()
            total += product_norm(b64, a64) ** 2
            b_r, a_r, lost = truncate_svd(b64, a64, budget)
            out[module] = to32(b_r, a_r)
            dropped += lost**2
    return out, ratio(math.sqrt(dropped), math.sqrt(total))


def randomized_compress(d: int, k: int, stacked: int, budget: int) -> bool:
    """Whether `compress` cuts a d x k layer stacked to rank `stacked` by the randomised SVD:
    its factored SVD (O((d + k) stacked^2), quadratic in the sites of a residual method's
    round: 0.7 s a layer of the 7B shape at 32 sites) would cost more than `RANDOMIZED_LAYER`,
    and the stack is at least twice the components the randomised one computes (below that
    its four passes cost as much)."""
    components = budget + RANDOMIZED_OVERSAMPLE
    return (d + k) * stacked**2 > RANDOMIZED_LAYER and stacked >= 2 * components


# ---------------------------------------------------------------- the estimate, for large rounds


def exact_cost(shapes: dict[str, tuple[int, int]], ranks: list[int], applied_rank: int) -> float:
    """(d + k) R^2 summed over the layers: what `exactness` costs (R = stacked rank)."""
    stacked = sum(ranks) + applied_rank
    return float(sum((d + k) * stacked**2 for d, k in shapes.values()))


@lru_cache(maxsize=4096)
def _hash(module: str, side: str, size: int, width: int) -> tuple[Tensor, Tensor]:
    """The bucket (0..width-1) and sign of each of `size` rows of one side of a layer."""
    gen = torch.Generator().manual_seed(derive_seed(SKETCH_SEED, module, side))
    buckets = torch.randint(0, width, (size,), generator=gen)
    signs = torch.randint(0, 2, (size,), generator=gen).to(torch.float32) * 2 - 1
    return buckets, signs


def sketch_sides(factors: Factors, width: int = SKETCH) -> tuple[Tensor, Tensor]:
    """(Psi^T B of every layer, A Omega of every layer): float32 tensors of shape
    (layers, width, r) and (layers, r, width), layers in `factors`' order, so that
    S(B A) = (Psi^T B)(A Omega) per layer; O((d + k) r) per layer."""
    left, right = [], []
    for module, (b, a) in factors.items():
        rows, row_signs = _hash(module, "d", b.shape[0], width)
        cols, col_signs = _hash(module, "k", a.shape[1], width)
        b, a = b.float(), a.float()  # float32 sums: the estimate is not finer than that
        left.append(torch.zeros(width, b.shape[1]).index_add_(0, rows, b * row_signs[:, None]))
        right.append(torch.zeros(a.shape[0], width).index_add_(1, cols, a * col_signs[None, :]))
    return torch.stack(left), torch.stack(right)


def sketch_product(module: str, b: Tensor, a: Tensor, width: int = SKETCH) -> Tensor:
    """S(B A) = (Psi^T B)(A Omega) of one layer's factors (float64, width x width): its part
    of `estimated_exactness`'s sketch of a merge, from factors made for something else (the
    server sketches a residual method's stack while it compresses it, `GlobalAdapter.update`)."""
    left, right = sketch_sides({module: (b, a)}, width)
    return left[0].double() @ right[0].double()


def estimated_exactness(applied: Factors, modules: list[str],
                        sides: list[tuple[Tensor, Tensor]], weights: list[float],
                        made: Mapping[str, Tensor] | None = None
                        ) -> tuple[float, dict[str, float]]:
    """`exactness` estimated from the clients' sketches (`sketch_sides` of each update's
    factors, in `modules`' order) and their weights (normalised here). `made`: the applied
    update's sketch S(B A) of modules already sketched (`sketch_product`); the others are
    read from `applied`."""
    total = sum(weights)
    ideal = sum((w / total) * torch.bmm(left.double(), right.double())
                for w, (left, right) in zip(weights, sides))
    assert isinstance(ideal, Tensor)
    width = ideal.shape[1]
    # read module by module: `applied` may make each when read (`LazyFactors`)
    made = made or {}
    present = cast(Factors, LazyFactors([m for m in modules if m in applied and m not in made],
                                        applied.__getitem__))
    got = torch.zeros_like(ideal)
    if present:
        left, right = sketch_sides(present, width)
        index = [i for i, m in enumerate(modules) if m in present]
        got[index] = torch.bmm(left.double(), right.double())
    for i, module in enumerate(modules):
        if module in made:
            got[i] = made[module]
    nums = (got - ideal).square().sum(dim=(1, 2))
    dens = ideal.square().sum(dim=(1, 2))
    per_module = {m: ratio(math.sqrt(float(n)), math.sqrt(float(d)))
                  for m, n, d in zip(modules, nums, dens)}
    return ratio(math.sqrt(float(nums.sum())), math.sqrt(float(dens.sum()))), per_module
