"""FedIT (`fedavg`) and `fedprox`: average B and A separately, weighted by p_i.

Zhang et al. (ICASSP 2024). Not exact: mean(B_i) @ mean(A_i) != mean(B_i @ A_i) when clients
differ (cross terms; the exactness figure shows by how much). Every client must use the same
rank and modules. FedProx's proximal term (mu/2)||theta - theta_g||^2 lives in the client's
loss; on the server it is the same merge, registered under its own name.
"""

from __future__ import annotations

from fedlora.aggregation.base import (ClientUpdate, Factors, MergeResult, Strategy, factors32,
                                      normalised_weights, pairs, register, weighted_sum)


def average_factors(updates: list[ClientUpdate], p: list[float]) -> Factors:
    """Module by module: (sum p_i B_i, sum p_i A_i), in float64."""
    merged: Factors = {}
    for module in updates[0].factors:
        bs, as_ = zip(*pairs(updates, module))
        merged[module] = (weighted_sum(list(bs), p), weighted_sum(list(as_), p))
    return merged


@register
class FedAvg(Strategy):
    """FedIT: B = sum p_i B_i, A = sum p_i A_i."""

    name = "fedavg"
    linear = True

    def merge(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
              ) -> MergeResult:
        """Weighted average of B and of A, module by module."""
        self.check(updates)
        p = normalised_weights(updates)
        merged = factors32(average_factors(updates, p))
        return MergeResult(global_factors=merged, residual={}, applied=merged,
                           info={"weights": p})


@register
class FedProx(FedAvg):
    """FedProx: fedavg's merge; the proximal term (proximal-mu) acts on the clients."""

    name = "fedprox"
