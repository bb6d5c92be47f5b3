"""HetLoRA: zero-pad every client's factors to the global rank, weight, average, truncate.

Cho et al. (EMNLP 2024). Client weights (option `weighting`): "norm" (the paper's sparsity
weighting, the default) takes w_i proportional to ||B_i A_i||_F, per module, so each module's
weights follow the size of each client's update of that module; "examples" takes p_i. A module
whose client updates are all zero falls back to p_i. Choose with
`get_strategy("hetlora").with_options(weighting="examples")`.

The global rank is the largest client rank, or `export_rank` if larger; a client of rank r_j
receives the first r_j components (the default payload). Not exact: factor averaging, padding
and truncation.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from fedlora.aggregation.base import (ClientUpdate, Factors, MergeResult, Strategy,
                                      normalised_weights, register, weighted_sum)
from fedlora.aggregation.linalg import pad_rank, product_norm

Weighting = Callable[[list[tuple[Tensor, Tensor]], list[float]], list[float]]


def norm_weights(factors: list[tuple[Tensor, Tensor]], p: list[float]) -> list[float]:
    """w_i = ||B_i A_i||_F / sum_j ||B_j A_j||_F; p_i when every norm is 0."""
    norms = [product_norm(b, a) for b, a in factors]
    total = sum(norms)
    return [n / total for n in norms] if total > 0 else list(p)


def example_weights(factors: list[tuple[Tensor, Tensor]], p: list[float]) -> list[float]:
    """w_i = p_i (number of examples)."""
    return list(p)


WEIGHTINGS: dict[str, Weighting] = {"norm": norm_weights, "examples": example_weights}


@register
class HetLoRA(Strategy):
    """Zero-pad to r_max, weighted average of B and of A; clients get the first r_j components."""

    name = "hetlora"
    heterogeneous = True
    options = {"weighting": tuple(WEIGHTINGS)}
    weighting: str = "norm"

    def merge(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
              ) -> MergeResult:
        """Average the zero-padded factors with the chosen weights, module by module."""
        self.check(updates)
        p = normalised_weights(updates)
        rank = max(export_rank, max(u.rank for u in updates))
        merged: Factors = {}
        used: dict[str, list[float]] = {}
        for module in updates[0].factors:
            padded = [pad_rank(b.double(), a.double(), rank)
                      for b, a in (u.factors[module] for u in updates)]
            used[module] = w = WEIGHTINGS[self.weighting](padded, p)
            merged[module] = (weighted_sum([b for b, _ in padded], w).float(),
                              weighted_sum([a for _, a in padded], w).float())
        return MergeResult(global_factors=merged, residual={}, applied=merged,
                           info={"weights": used, "weighting": self.weighting})


def pruned_rank(factors: Factors, gamma: float) -> int:
    """HetLoRA's rank self-pruning: how many leading components a client keeps.

    Component k contributes c_k = sum over modules of ||B[:, k]|| * ||A[k, :]|| (delta-W
    scale). Trailing components are dropped while the last kept one contributes less than
    `gamma` times the mean of the components before it; at least one is kept. gamma = 0 keeps
    everything.
    """
    rank = next(iter(factors.values()))[0].shape[1]
    contrib = sum(b.double().norm(dim=0) * a.double().norm(dim=1) for b, a in factors.values())
    keep = rank
    while gamma > 0 and keep > 1 and contrib[keep - 1] < gamma * contrib[: keep - 1].mean():
        keep -= 1
    return keep
