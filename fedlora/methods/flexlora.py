"""FlexLoRA: the exact average sum_i p_i B_i A_i, re-factored by SVD, cut to the global rank.

Bai et al. (NeurIPS 2024). The average is formed in factored form: FLoRA's stack (d x R and
R x k, R = sum of client ranks), QR of both sides and an SVD of the small R x R core,
O((d + k) R^2) per layer instead of the paper's dense d x k matrix and its SVD. The global
adapter is its best rank-`export_rank` approximation (Eckart-Young) as balanced factors
(U sqrt(S), sqrt(S) Vh) in SVD order, so the default payload (the first r components) is the
best rank-r approximation for a client of rank r. `exact` is False: the global adapter drops
what lies beyond `export_rank` (nothing when `export_rank` >= the sum of the client ranks);
`info["dropped"]` gives the relative norm dropped, `info["singular_values"]` the spectra.
"""

from __future__ import annotations

import math

import torch

from fedlora.aggregation.base import (
    ClientUpdate,
    Factors,
    MergeResult,
    normalised_weights,
    raw_pairs,
)
from fedlora.aggregation.linalg import balanced_svd, stack
from fedlora.methods.base import Method, register


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
        for module in updates[0].factors:
            b, a = stack(raw_pairs(updates, module), p, torch.float64)
            b_r, a_r, s = balanced_svd(b, a, rank, torch.float32)
            merged[module] = (b_r, a_r)
            spectra[module] = s.tolist()
            total += float(s.square().sum())
            dropped += float(s[rank:].square().sum())
        info = {"weights": p, "singular_values": spectra,
                "dropped": math.sqrt(dropped / total) if total > 0 else 0.0}
        return MergeResult(global_factors=merged, residual={}, applied=merged, info=info)
