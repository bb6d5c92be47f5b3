"""FedIT (`fedavg`): average B and A separately, weighted by p_i; FedAvg of any other PEFT
method's trainable tensors (`peft`, `fedlora.adapters`).

Zhang et al. (ICASSP 2024). Not exact: mean(B_i) @ mean(A_i) != mean(B_i @ A_i) when clients
differ (cross terms; the exactness figure shows by how much). Every client must use the same
rank and modules. Clients start from the received adapter and reply with both factors.
"""

from __future__ import annotations

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    MergeResult,
    average_dense,
    factors32,
    normalised_weights,
    pairs,
    weighted_sum,
)
from fedlora.methods.base import Method, register


def average_factors(updates: list[ClientUpdate], p: list[float]) -> Factors:
    """Module by module: (sum p_i B_i, sum p_i A_i), in float64."""
    merged: Factors = {}
    for module in updates[0].factors:
        bs, as_ = zip(*pairs(updates, module))
        merged[module] = (weighted_sum(list(bs), p), weighted_sum(list(as_), p))
    return merged


@register
class FedAvg(Method):
    """FedIT: B = sum p_i B_i, A = sum p_i A_i."""

    name = "fedavg"
    robust_rules = frozenset({"krum", "median", "trimmed-mean"})
    summary = "FedIT: weighted mean of B and of A (same rank everywhere)"
    linear = True
    secagg_refusal = ""
    peft_methods = frozenset({"*"})

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """Weighted average of B and of A, module by module (and of every plain tensor of a
        method without factors: FedAvg of IA3's vectors)."""
        p = normalised_weights(updates)
        merged = factors32(average_factors(updates, p))
        return MergeResult(global_factors=merged, residual={}, applied=merged,
                           info={"weights": p}, dense=average_dense(updates, p))
