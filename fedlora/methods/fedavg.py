"""FedIT (`fedavg`): average B and A separately, weighted by p_i; FedAvg of any other PEFT
method's trainable tensors (`peft`, `fedlora.adapters`).

Zhang et al. (ICASSP 2024). Not exact: mean(B_i) @ mean(A_i) != mean(B_i @ A_i) when clients
differ (cross terms; the exactness figure shows by how much). Every client must use the same
rank and modules. Clients start from the received adapter and reply with both factors.
"""

from __future__ import annotations

import torch

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    MergeResult,
    RunningSum,
    normalised_weights,
)
from fedlora.methods.base import Method, register


def average_factors(updates: list[ClientUpdate], p: list[float]) -> Factors:
    """(sum p_i B_i, sum p_i A_i) of every module, in float64."""
    return RunningSum.of(updates, p).mean(torch.float64)[0]


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
        """Weighted average of B and of A (and of every plain tensor of a method without
        factors: FedAvg of IA3's vectors), folded update by update."""
        return self.combine_sum(self.running_sum(export_rank).fold(updates), updates, previous,
                                export_rank=export_rank)

    def running_sum(self, rank: int) -> RunningSum:
        """The merge is the mean of a running sum: the server folds replies as they arrive."""
        return RunningSum()

    def combine_sum(self, total: RunningSum, updates: list[ClientUpdate], previous: Factors,
                    *, export_rank: int) -> MergeResult:
        """The merge from `total`, the updates folded in order with their weights."""
        merged, dense = total.mean()
        return MergeResult(global_factors=merged, residual={}, applied=merged,
                           info={"weights": normalised_weights(updates)}, dense=dense)
