"""FedSA-LoRA: only A is shared and averaged; every client keeps its own B (personalised).

Guo et al. (ICLR 2025). A_global = sum_i p_i A_i; the global B is the previous one, untouched
(clients hold personal B's; the server's stays as initialised, zero). There is no global
delta W to compare with sum_i p_i B_i A_i, so `exactness_defined` is False; `applied` is just
the global adapter. Same rank on every client.

Client side: a client starts from the received A and its own B from its previous round (the
seeded B before its first), and keeps its trained B in its personal store before replying.
Nodes evaluate their own model (shared A, personal B); the server has no global model to score.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    MergeResult,
    RunningSum,
    check_previous,
    normalised_weights,
)
from fedlora.factors import shared_keys
from fedlora.methods.base import Method, PersonalStore, register

if TYPE_CHECKING:
    from fedlora.config import Settings


@register
class FedSALoRA(Method):
    """A_global = sum p_i A_i; B_global = previous B; B stays on each client."""

    name = "fedsa-lora"
    # on A itself, coordinate-wise (no global delta W: each client keeps its own B)
    robust_rules = frozenset({"krum", "median", "trimmed-mean"})
    summary = "FedSA-LoRA: share and average A only; each client keeps its own B"
    linear = True
    secagg_refusal = ""
    shares = "A"
    personal = True
    exactness_defined = False

    def running_sum(self, rank: int) -> RunningSum:
        """The A_i (B is the previous one: not summed)."""
        return RunningSum(shares="A")

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """Average A; keep the previous B."""
        return self.combine_sum(self.running_sum(export_rank).fold(updates), updates,
                                previous, export_rank=export_rank)

    def combine_sum(self, total: RunningSum, updates: list[ClientUpdate], previous: Factors,
                    *, export_rank: int) -> MergeResult:
        """The mean of the A_i with the previous B."""
        check_previous(previous, updates, self.name)
        means, _ = total.mean()
        merged: Factors = {}
        for module, (_, a_bar) in means.items():
            b_prev = previous[module][0]
            if b_prev.shape[1] != a_bar.shape[0]:
                raise ValueError(f"fedsa-lora: module {module} has client rank {a_bar.shape[0]} "
                                 f"but global rank {b_prev.shape[1]}; they must be equal")
            merged[module] = (b_prev.float(), a_bar)
        return MergeResult(global_factors=merged, residual={}, applied=merged,
                           info={"weights": normalised_weights(updates)})

    def client_start(self, state: dict[str, Tensor], store: PersonalStore
                     ) -> dict[str, Tensor]:
        """The received A with this client's own B (when it has one of the same shape)."""
        personal = store.load()
        if personal and all(k in state and personal[k].shape == state[k].shape
                            for k in personal):
            state = {**state, **personal}
        return state

    def client_finish(self, state: dict[str, Tensor], rank: int, settings: Settings,
                      store: PersonalStore) -> tuple[dict[str, Tensor], int]:
        """Keep the trained B on this client; only A is sent."""
        store.save(shared_keys(state, "B"))
        return state, rank
