"""FedEx-LoRA: FedIT's averaged adapter plus the residual sum_i p_i B_i A_i - B̄ Ā.

Singhal et al. (ACL 2025). The residual is kept in factored form,
stack([B_1 .. B_N, -B̄], [p_1 A_1; ..; p_N A_N; Ā]) of rank (N + 1) r, and folded into the
frozen base; clients continue from (B̄, Ā). Then B̄ Ā + residual = sum_i p_i B_i A_i exactly.
Same rank on every client.
"""

from __future__ import annotations

import torch

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    MergeResult,
    factors32,
    normalised_weights,
    raw_pairs,
    to32,
)
from fedlora.aggregation.linalg import stack
from fedlora.methods.base import ResidualMethod, register
from fedlora.methods.fedavg import average_factors


@register
class FedExLoRA(ResidualMethod):
    """Global (B̄, Ā); residual sum p_i B_i A_i - B̄ Ā; applied = both stacked."""

    name = "fedex-lora"
    summary = "FedEx-LoRA: fedavg plus the exact residual folded into the base"
    exact = True
    server_optimizer_ok = False  # an optimiser step would break the residual's exactness
    secagg_refusal = ("its residual is the mean of the clients' products B_i A_i, which "
                      "needs each client's factors")

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """FedIT average, plus the factored residual that makes it exact."""
        p = normalised_weights(updates)
        average = average_factors(updates, p)
        residual: Factors = {}
        applied: Factors = {}
        for module, (b_bar, a_bar) in average.items():
            res = stack(raw_pairs(updates, module) + [(-b_bar, a_bar)], p + [1.0],
                        torch.float64)
            residual[module] = to32(*res)
            applied[module] = to32(*stack([(b_bar, a_bar), res], [1.0, 1.0]))
        return MergeResult(global_factors=factors32(average), residual=residual,
                           applied=applied, info={"weights": p})
