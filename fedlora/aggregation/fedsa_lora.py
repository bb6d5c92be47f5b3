"""FedSA-LoRA: only A is shared and averaged; every client keeps its own B (personalised).

Guo et al. (ICLR 2025). A_global = sum_i p_i A_i; the global B is the previous one, untouched
(clients hold personal B's; the server's stays as initialised, zero). There is no global
delta W to compare with sum_i p_i B_i A_i, so `exactness_defined` is False and the caller skips
the exactness figure; `applied` is just the global adapter. Same rank on every client.
"""

from __future__ import annotations

from fedlora.aggregation.base import (ClientUpdate, Factors, MergeResult, Strategy,
                                      check_previous, normalised_weights, pairs, register,
                                      weighted_sum)


@register
class FedSALoRA(Strategy):
    """A_global = sum p_i A_i; B_global = previous B."""

    name = "fedsa-lora"
    linear = True
    shares = "A"
    exactness_defined = False

    def merge(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
              ) -> MergeResult:
        """Average A; keep the previous B."""
        self.check(updates)
        check_previous(previous, updates, self.name)
        p = normalised_weights(updates)
        merged: Factors = {}
        for module in updates[0].factors:
            b_prev = previous[module][0]
            a_bar = weighted_sum([a for _, a in pairs(updates, module)], p)
            if b_prev.shape[1] != a_bar.shape[0]:
                raise ValueError(f"fedsa-lora: module {module} has client rank {a_bar.shape[0]} "
                                 f"but global rank {b_prev.shape[1]}; they must be equal")
            merged[module] = (b_prev.float(), a_bar.float())
        return MergeResult(global_factors=merged, residual={}, applied=merged,
                           info={"weights": p})
