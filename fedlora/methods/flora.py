"""FLoRA: stack the clients' factors, [B_1 .. B_N] [p_1 A_1; ..; p_N A_N] = sum_i p_i B_i A_i.

Wang et al. (NeurIPS 2024). Exact for any mix of ranks. The stacked update is folded into the
frozen base (returned as the round's `residual`) and every client starts a fresh adapter next
round, so there is no global adapter: `global_factors` is {} and the payload is empty.
The stack (rank sum_i r_i) is made module by module when read (`LazyFactors`): the server
compresses each module into its residual before making the next. It is made in float32, what
it was rounded to when it was made in float64 (p_i A_i rounded once; about 3x faster).
"""

from __future__ import annotations

from typing import cast

import torch

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    LazyFactors,
    MergeResult,
    normalised_weights,
    raw_pairs,
    to32,
)
from fedlora.aggregation.linalg import stack
from fedlora.methods.base import ResidualMethod, register


@register
class FLoRA(ResidualMethod):
    """Stacking; the whole update goes to the residual, adapters restart each round."""

    name = "flora"
    summary = "FLoRA: stack the clients' factors (exact), fold into the base, fresh adapters"
    exact = True
    heterogeneous = True
    fresh_adapter = True
    server_optimizer_ok = False  # there is no global adapter to move
    secagg_refusal = "it stacks each client's factors side by side, so it needs each one"

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """The stack of every module is both the residual and the applied update."""
        p = normalised_weights(updates)
        stacked = cast(Factors, LazyFactors(
            list(updates[0].factors),
            lambda m: to32(*stack(raw_pairs(updates, m), p, torch.float32)),
            rank=sum(u.rank for u in updates)))
        return MergeResult(global_factors={}, residual=stacked, applied=stacked,
                           info={"weights": p}, applied_is_stack=True)
