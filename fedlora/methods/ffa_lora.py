"""FFA-LoRA: A is drawn from a shared seed and frozen; only B is trained, sent and averaged.

Sun et al. (ICLR 2024). Clients may use different ranks: client i trains B_i against the first
r_i rows of the global A. The server zero-pads each B_i to the global rank (the rank of
`previous`) and averages; with A shared, B_global @ A = sum_i p_i B_i A[:r_i], exactly. The A
in the updates is ignored (the caller fills it in from the previous global adapter).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    MergeResult,
    check_previous,
    normalised_weights,
    weighted_sum,
)
from fedlora.methods.base import Method, register


def padded_b(update: ClientUpdate, module: str, rank: int) -> Tensor:
    """A client's B in float64, zero-padded to the global rank."""
    b = update.factors[module][0].double()
    if b.shape[1] > rank:
        raise ValueError(f"ffa-lora: module {module} has client rank {b.shape[1]} above the "
                         f"global rank {rank}; raise export-rank")
    return torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)


@register
class FFALoRA(Method):
    """B_global = sum p_i pad(B_i, r_global); A_global = the previous (frozen) A."""

    name = "ffa-lora"
    summary = "FFA-LoRA: A frozen from a shared seed, only B trained and averaged (exact)"
    linear = True
    secagg_refusal = ""
    exact = True
    heterogeneous = True
    shares = "B"

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """Average the zero-padded B_i; keep the previous A."""
        check_previous(previous, updates, self.name)
        p = normalised_weights(updates)
        merged: Factors = {}
        for module in updates[0].factors:
            a_prev = previous[module][1]
            bs = [padded_b(u, module, a_prev.shape[0]) for u in updates]
            merged[module] = (weighted_sum(bs, p).float(), a_prev.float())
        return MergeResult(global_factors=merged, residual={}, applied=merged,
                           info={"weights": p})
