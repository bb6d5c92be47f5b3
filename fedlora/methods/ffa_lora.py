"""FFA-LoRA: A is drawn from a shared seed and frozen; only B is trained, sent and averaged.

Sun et al. (ICLR 2024). Clients may use different ranks: client i trains B_i against the first
r_i rows of the global A. The server zero-pads each B_i to the global rank (the rank of
`previous`) and averages; with A shared, B_global @ A = sum_i p_i B_i A[:r_i], exactly. The A
in the updates is ignored (the caller fills it in from the previous global adapter).
"""

from __future__ import annotations

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    MergeResult,
    RunningSum,
    check_previous,
    normalised_weights,
)
from fedlora.methods.base import Method, register


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

    def running_sum(self, rank: int) -> RunningSum:
        """The B_i zero-padded to `rank` (A is the previous one: not summed)."""
        return RunningSum(rank, shares="B")

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """Average the zero-padded B_i; keep the previous A (`combine_sum` checks that it
        covers every module)."""
        rank = max((a.shape[0] for _, a in previous.values()), default=0)  # the global rank
        try:
            total = self.running_sum(rank).fold(updates)
        except ValueError as err:
            raise ValueError(f"ffa-lora: {err}") from None
        return self.combine_sum(total, updates, previous, export_rank=export_rank)

    def combine_sum(self, total: RunningSum, updates: list[ClientUpdate], previous: Factors,
                    *, export_rank: int) -> MergeResult:
        """The mean of the zero-padded B_i with the previous A."""
        check_previous(previous, updates, self.name)
        means, _ = total.mean()
        merged = {m: (b, previous[m][1].float()) for m, (b, _) in means.items()}
        return MergeResult(global_factors=merged, residual={}, applied=merged,
                           info={"weights": normalised_weights(updates)})
