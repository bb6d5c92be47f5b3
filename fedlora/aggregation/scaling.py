"""LoRA scale: PEFT's per-rank factor, folded into B so that merges work on delta W = B @ A.

PEFT applies `delta W = s(r) * B @ A` with `s(r) = alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
Every function in `fedlora.aggregation` works on *delta-W-scaled* factors: `s` already folded
into B (`to_delta`), so `delta W = B @ A` whatever the rank. `from_delta` divides it out again
for an adapter of another rank, which is how an update moves from rank r to r' without
changing delta W.
"""

from __future__ import annotations

import math

from fedlora.aggregation.base import Factors


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale of a rank-`rank` adapter: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def to_delta(factors: Factors, scale: float) -> Factors:
    """PEFT-scale factors -> delta-W scale (B * s, A unchanged)."""
    return {m: (b * scale, a) for m, (b, a) in factors.items()}


def from_delta(factors: Factors, scale: float) -> Factors:
    """Delta-W-scale factors -> PEFT scale of an adapter whose scale is `scale` (B / s)."""
    if scale == 0:
        raise ValueError("cannot divide out a LoRA scale of 0 (lora-alpha = 0?)")
    return {m: (b / scale, a) for m, (b, a) in factors.items()}
