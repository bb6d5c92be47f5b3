"""FlexLoRA: the exact average sum_i p_i B_i A_i, re-factored by SVD, cut to the global rank.

Bai et al. (NeurIPS 2024). The average is formed in factored form: FLoRA's stack (d x R and
R x k, R = sum of client ranks), QR of both sides and an SVD of the small R x R core,
O((d + k) R^2) per layer instead of the paper's dense d x k matrix and its SVD. The global
adapter is its best rank-`export_rank` approximation (Eckart-Young) as balanced factors
(U sqrt(S), sqrt(S) Vh) in SVD order, so the default payload (the first r components) is the
best rank-r approximation for a client of rank r. `exact` is False: the global adapter drops
what lies beyond `export_rank` (nothing when `export_rank` >= the sum of the client ranks);
`info["dropped"]` gives the relative norm dropped, `info["singular_values"]` the spectra.

The factored SVD costs O((d + k) R^2) per layer, quadratic in the number of clients (43 s a
round for 32 clients of a 7B-shaped adapter on 2 cores). Above `EXACT_BUDGET` the top
`export_rank` components come from a randomised range finder with one subspace iteration
instead (`linalg.randomized_svd`, O((d + k) R (export_rank + 10)) per pass: linear in the
clients); `info["svd"]` says which, and its accuracy against the exact SVD is measured in
tests/test_server_scale.py and docs/benchmarks.md. There `info["dropped"]` counts only the
OVERSAMPLE components computed beyond the global rank: a lower bound.
"""

from __future__ import annotations

import math

import torch

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    MergeResult,
    factor_shapes,
    normalised_weights,
    raw_pairs,
    to32,
)
from fedlora.aggregation.exactness import EXACT_BUDGET, exact_cost
from fedlora.aggregation.linalg import balanced_factors, balanced_svd, randomized_svd, stack
from fedlora.methods.base import Method, register
from fedlora.seeds import derive_seed

RANDOMIZED_SEED = 0xF1E  # the randomised SVD's test matrices: the same in every run
OVERSAMPLE = 10  # columns the randomised range finder draws beyond the global rank


@register
class FlexLoRA(Method):
    """SVD of the exact average, truncated to `export_rank` (the largest client rank if 0)."""

    name = "flexlora"
    robust_rules = frozenset({"krum", "median", "trimmed-mean"})
    summary = "FlexLoRA: exact average of B_i A_i, re-factored by SVD at the global rank"
    heterogeneous = True
    server_optimizer_ok = False  # the global factors change basis every round
    secagg_refusal = ("its merge is the SVD of the mean of the clients' products B_i A_i, "
                      "which needs each client's factors")

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """Stack, factored SVD, keep the top `export_rank` components of every module."""
        p = normalised_weights(updates)
        rank = export_rank or max(u.rank for u in updates)
        merged: Factors = {}
        spectra: dict[str, list[float]] = {}
        total = dropped = 0.0
        layers = {m: (b[0], a[1]) for m, (b, a) in factor_shapes(updates[0].factors).items()}
        randomized = exact_cost(layers, [u.rank for u in updates], 0) > EXACT_BUDGET
        for module in updates[0].factors:
            if randomized:  # linear in the stacked rank (the clients), not quadratic
                b, a = stack(raw_pairs(updates, module), p, torch.float32)
                u, s, vh, _ = randomized_svd(b, a, rank, derive_seed(RANDOMIZED_SEED, module))
                b_r, a_r = balanced_factors(u, s, vh, rank)
                merged[module] = to32(b_r, a_r)
                # of the components computed: a lower bound of what the truncation drops
                total += float(s.square().sum())
                dropped += float(s[rank:].square().sum())
            else:
                b, a = stack(raw_pairs(updates, module), p, torch.float64)
                b_r, a_r, s = balanced_svd(b, a, rank, torch.float32)
                merged[module] = (b_r, a_r)
                total += float(s.square().sum())
                dropped += float(s[rank:].square().sum())
            spectra[module] = s.tolist()
        info = {"weights": p, "singular_values": spectra,
                "dropped": math.sqrt(dropped / total) if total > 0 else 0.0,
                "svd": f"randomized-{rank + OVERSAMPLE}" if randomized else "exact"}
        return MergeResult(global_factors=merged, residual={}, applied=merged, info=info)
