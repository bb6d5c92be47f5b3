"""How far an aggregation is from the ideal update, and what truncation costs; all factored.

The ideal update of a layer is sum_i p_i B_i A_i (delta-W-scaled factors, p_i from the
clients' weights). Each figure is a relative Frobenius norm computed from small Gram matrices
of stacked factors (`linalg.product_norm`), never from a dense d x k matrix. Over several
modules the figure is sqrt(sum of squared numerators) / sqrt(sum of squared denominators). A
zero denominator gives 0.0 when the numerator is ~0 too (0/0), else infinity.
"""

from __future__ import annotations

import math

import torch

from fedlora.aggregation.base import ClientUpdate, Factors, normalised_weights, raw_pairs, to32
from fedlora.aggregation.linalg import difference_norm, product_norm, stack, truncate_svd

ZERO = 1e-12  # a numerator at most this large over a zero denominator counts as 0/0


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
    nums = dens = 0.0
    for module, (b, a) in global_factors.items():
        b, a = b.double(), a.double()
        pb, pa = payload[module]
        nums += difference_norm(b, a, pb.double(), pa.double()) ** 2
        dens += product_norm(b, a) ** 2
    return ratio(math.sqrt(nums), math.sqrt(dens))


def compress(factors: Factors, budget: int) -> tuple[Factors, float]:
    """Cut every module to rank <= `budget` by factored SVD; (factors, relative norm dropped).

    A module already within the budget is returned as it is.
    """
    out: Factors = {}
    dropped = total = 0.0
    for module, (b, a) in factors.items():
        b64, a64 = b.double(), a.double()
        total += product_norm(b64, a64) ** 2
        if b.shape[1] <= budget:
            out[module] = (b, a)
            continue
        b_r, a_r, lost = truncate_svd(b64, a64, budget)
        out[module] = to32(b_r, a_r)
        dropped += lost**2
    return out, ratio(math.sqrt(dropped), math.sqrt(total))
