"""HetLoRA: zero-pad every client's factors to the global rank, weight, average, truncate.

Cho et al. (EMNLP 2024). Client weights (option `hetlora-weighting`): "norm" (the paper's
sparsity weighting, the default) takes w_i proportional to ||B_i A_i||_F, per module, so each
module's weights follow the size of each client's update of that module; "examples" takes
p_i. A module whose client updates are all zero falls back to p_i.

The global rank is the largest client rank, or `export_rank` if larger; a client of rank r_j
receives the first r_j components (the default payload). Not exact: factor averaging, padding
and truncation.

Under secure aggregation (hetlora-weighting=examples, no pruning) each site sends its whole
factors zero-padded to the global rank, in delta-W scale (`secagg_padded`), so the secure sum
is the numerator of `padded_sum` and the weights' sum its denominator.

Client side (option `hetlora-prune` = gamma > 0): after training, a client drops trailing rank
components that contribute little (`pruned_rank`) and replies at the smaller rank, which the
server then keeps for that node (`reply_rank`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    MergeResult,
    RunningSum,
    add_padded,
    normalised_weights,
    raw_pairs,
)
from fedlora.aggregation.linalg import gram_product_norm, truncate_rank
from fedlora.config import SettingsError, one_of, require
from fedlora.factors import from_peft, to_peft
from fedlora.methods.base import Method, MethodOptions, PersonalStore, option, register

if TYPE_CHECKING:
    from fedlora.config import Settings

log = logging.getLogger("fedlora.client")


def padded_sum(factors: list[tuple[Tensor, Tensor]], weights: list[float], rank: int
               ) -> tuple[Tensor, Tensor]:
    """(sum_i w_i B_i, sum_i w_i A_i) with every pair zero-padded to `rank`: accumulated in
    float64 into the leading r_i columns / rows (no padded copies), returned as float32."""
    d, k = factors[0][0].shape[0], factors[0][1].shape[1]
    total = (torch.zeros(d, rank, dtype=torch.float64), torch.zeros(rank, k, dtype=torch.float64))
    for pair, w in zip(factors, weights):
        add_padded(total, pair, w)
    return total[0].float(), total[1].float()


def module_norm(update: ClientUpdate, module: str, b: Tensor, a: Tensor) -> float:
    """||B A||_F of one module: the paper's weight of a client's update of that module. The
    server's figure where it measured one as the reply arrived (`ClientUpdate.norms`), else
    from Gram blocks in the factors' dtype (float64 where their terms cancel:
    `gram_product_norm`)."""
    if update.norms is not None and module in update.norms:
        return update.norms[module]
    return gram_product_norm(b, a)


WEIGHTINGS = ("norm", "examples")


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


@dataclass(frozen=True)
class HetLoRAOptions(MethodOptions):
    """hetlora's client weighting and rank self-pruning."""

    weighting: str = option(
        "hetlora-weighting", "norm",
        "hetlora client weights: norm (||B_i A_i||_F, the paper's) or examples (num-examples).")
    prune: float = option(
        "hetlora-prune", 0.0,
        "hetlora rank self-pruning gamma (0 = off): after training, a client drops trailing "
        "rank components contributing < gamma x the mean of those before, and keeps the "
        "smaller rank for the rest of the run.")

    def __post_init__(self) -> None:
        one_of("hetlora-weighting", self.weighting, WEIGHTINGS)
        require(self.prune >= 0, "hetlora-prune", "a number >= 0", self.prune)


@register
class HetLoRA(Method):
    """Zero-pad to r_max, weighted average of B and of A; clients get the first r_j components."""

    name = "hetlora"
    robust_rules = frozenset({"krum", "median", "trimmed-mean"})
    summary = "HetLoRA: zero-pad to the largest rank, norm-weighted mean, optional rank pruning"
    heterogeneous = True
    Options = HetLoRAOptions
    secagg_refusal = ""
    secagg_padded = True  # each site's factors, zero-padded to the global rank, in the sum
    options: HetLoRAOptions

    def secagg_option_problems(self, settings: Settings) -> list[tuple[bool, str, str]]:
        """The norm weights are each update's own norm, which the server must not see (and
        which is not bounded, so it cannot be quantised); a pruned rank would tell the
        server about the update."""
        return [(self.options.weighting == "norm", "hetlora-weighting", "hetlora's norm "
                 "weights are each client's own ||B_i A_i||_F, which the server would have to "
                 "see; set hetlora-weighting=examples (each site then weighs as under "
                 "fedavg: min(num-examples / secagg-max-weight, 1))"),
                (self.options.prune > 0, "hetlora-prune", "a site that prunes its rank tells "
                 "the server the rank its update needs; set hetlora-prune=0")]

    def check_settings(self, settings: Settings) -> None:
        """A node that prunes changes its update after client-side clipping."""
        super().check_settings(settings)
        fed = settings.federation
        if self.options.prune and fed.clip_norm and fed.dp_clipping == "client":
            raise SettingsError("setting 'dp-clipping': a node that prunes its rank "
                                "(hetlora-prune) changes the update after clipping; use "
                                "dp-clipping=server or hetlora-prune=0")

    @property
    def weighs_by_norm(self) -> bool:
        """With norm weighting each module weighs ||B_i A_i||_F."""
        return self.options.weighting == "norm"

    def running_sum(self, rank: int) -> RunningSum:
        """Zero-padded to `rank`; with norm weighting each module weighs ||B_i A_i||_F."""
        return RunningSum(rank, module_norm if self.weighs_by_norm else None)

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """Average the zero-padded factors with the chosen weights, module by module."""
        rank = max(export_rank, max(u.rank for u in updates))
        return self.combine_sum(self.running_sum(rank).fold(updates), updates, previous,
                                export_rank=export_rank)

    def combine_sum(self, total: RunningSum, updates: list[ClientUpdate], previous: Factors,
                    *, export_rank: int) -> MergeResult:
        """The weighted mean of `total`; a module whose norm weights are all 0 (no client
        moved it) is averaged with the example weights instead, reading it from each update."""
        p = normalised_weights(updates)
        means, _ = total.mean()
        merged: Factors = {}
        used: dict[str, list[float]] = {}
        for module in total.factors:
            if module in means and self.options.weighting == "norm":
                summed = total.total(module)  # once per module, not once per client
                used[module] = [w / summed for w in total.per_module[module]]
                merged[module] = means[module]
            elif module in means:
                used[module], merged[module] = p, means[module]
            else:
                assert total.rank is not None
                used[module] = p
                merged[module] = padded_sum(raw_pairs(updates, module), p, total.rank)
        return MergeResult(global_factors=merged, residual={}, applied=merged,
                           info={"weights": used, "weighting": self.options.weighting})

    def reply_rank(self, rank: int, declared: object) -> int:
        """With pruning on, a node may reply at a smaller rank (never a larger one)."""
        if self.options.prune and isinstance(declared, int) and 1 <= declared < rank:
            return declared
        return rank

    def client_finish(self, state: dict[str, Tensor], rank: int, settings: Settings,
                      store: PersonalStore) -> tuple[dict[str, Tensor], int]:
        """Rank self-pruning: the reply at a smaller rank, the same delta W for the
        components kept."""
        if self.options.prune <= 0:
            return state, rank
        scale = settings.lora.scale
        factors = from_peft(state, scale(rank))
        keep = pruned_rank(factors, self.options.prune)
        if keep == rank:
            return state, rank
        kept = {m: truncate_rank(b, a, keep) for m, (b, a) in factors.items()}
        log.info("hetlora self-pruning: rank %d -> %d", rank, keep)
        return to_peft(kept, scale(keep)), keep
