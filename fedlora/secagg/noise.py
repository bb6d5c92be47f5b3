"""Distributed DP under secure aggregation: each site adds its share of the Gaussian noise to
its clipped change before masking, so that no party ever sees an update without noise.

The central mechanism (`fedlora.aggregation.privacy`) adds N(0, (z C / m)^2) to the mean of
m updates clipped to C, i.e. N(0, (z C)^2) to their sum. Here each of the m sampled sites
adds N(0, (z C)^2 / (m - d)), d = secagg-dropout, to its change (delta-W scale: a B factor's
noise is divided by the LoRA scale, as PEFT keeps B). The sum over the m' >= m - d sites that
survive carries noise of variance m' (z C)^2 / (m - d) >= (z C)^2: at least the central
mechanism's, so the accountant's epsilon for the central mechanism holds. A round where
fewer than m - d sites survive would carry less, and fails (server/secagg.py).
"""

from __future__ import annotations

import math

import torch

from fedlora.factors import B_SUFFIX


def site_noise_std(noise_multiplier: float, clip_norm: float, sites: int, dropout: int
                   ) -> float:
    """Std (delta-W scale) of the noise one of `sites` sampled sites adds: z C / sqrt(m - d)."""
    return noise_multiplier * clip_norm / math.sqrt(max(sites - dropout, 1))


def noised_change(change: dict[str, torch.Tensor], std: float, scale: float,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A site's change (PEFT scale, wire keys) plus N(0, std^2) in delta-W scale: std / scale
    on a LoRA B factor (delta W = scale B A), std on A and on a plain tensor; keys in sorted
    order."""
    out = {}
    for key in sorted(change):
        value = change[key]
        sigma = std / scale if key.endswith(B_SUFFIX) else std
        out[key] = value + sigma * torch.randn(value.shape, generator=generator,
                                               dtype=torch.float64).to(value.dtype)
    return out
