"""FedEx-LoRA: FedIT's averaged adapter plus the residual sum_i p_i B_i A_i - B̄ Ā.

Singhal et al. (ACL 2025). The residual is kept in factored form,
stack([B_1 .. B_N, -B̄], [p_1 A_1; ..; p_N A_N; Ā]) of rank (N + 1) r, and folded into the
frozen base; clients continue from (B̄, Ā). Then B̄ Ā + residual = sum_i p_i B_i A_i exactly.
Same rank on every client. The residual and the applied stack are made module by module when
read (`LazyFactors`): at 32 sites of a 7B shape all modules at once would be 11 GB.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    LazyFactors,
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

        def residual(module: str) -> tuple[Tensor, Tensor]:
            b_bar, a_bar = average[module]
            return to32(*stack(raw_pairs(updates, module) + [(-b_bar, a_bar)], p + [1.0],
                               torch.float32))

        def applied(module: str) -> tuple[Tensor, Tensor]:
            return to32(*stack([average[module], residual(module)], [1.0, 1.0], torch.float32))

        modules, rank = list(average), updates[0].rank
        stacked = sum(u.rank for u in updates) + rank  # [B_1 .. B_N, -B̄]
        return MergeResult(global_factors=factors32(average),
                           residual=cast(Factors, LazyFactors(modules, residual, stacked)),
                           applied=cast(Factors, LazyFactors(modules, applied, stacked + rank)),
                           info={"weights": p}, applied_is_stack=True)
