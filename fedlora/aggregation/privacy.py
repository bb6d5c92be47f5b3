"""Update clipping and client-level differential privacy on the LoRA factors (pure torch).

A client's *update* is the change of its factors over the round, relative to the adapter it
received, in delta-W scale (LoRA scale folded into B): u_i = (B_i - B_ref, A_i - A_ref) for
every module; its norm is the L2 norm of all those entries together (Flower's `get_norm` on the
flattened update). Factors a strategy does not send (ffa-lora's A, fedsa-lora's B) are the
received ones, so they add nothing to the norm.

- Clipping (McMahan et al. 2018, "FlatClip"): u_i <- u_i * min(1, C / ||u_i||), i.e. the client
  is moved back towards the reference until its update has norm <= C.
- Client-level DP (DP-FedAvg, central model): clip every update to C, average the m updates
  with equal weights, then add Gaussian noise N(0, (z C / m)^2) to every entry of the shared
  factors of the mean (Flower's `compute_stdv`). This is a valid mechanism only when the merge
  is that mean (`Strategy.linear`: fedavg, fedprox, ffa-lora, fedsa-lora, lora-moe). With
  ffa-lora, A is frozen and shared, so delta W = B A is linear in B and the noise on B is the
  noise on delta W. A tensor averaged over only the m_t clients that trained it (lora-moe's
  experts with moe-assign=client) gets N(0, (z C / m_t)^2): the noisy sum of the clipped
  updates, N(0, (z C)^2) on every entry, divided by each tensor's own count of clients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import cast

import torch
from torch import Tensor

from fedlora.aggregation.base import Dense, Factors, dense_distance, factor_shapes
from fedlora.factors import dense_part, from_peft, to_peft


def factor_distance(factors: Factors, reference: Factors) -> float:
    """||(B - B_ref, A - A_ref)||_2 over all modules (float64 accumulation; a module missing
    from `reference`, a fresh adapter's, counts from zero)."""
    total = 0.0
    for module, (b, a) in factors.items():
        if module in reference:
            b_ref, a_ref = reference[module]
            total += float((b.double() - b_ref.double()).square().sum())
            total += float((a.double() - a_ref.double()).square().sum())
        else:
            total += float(b.double().square().sum()) + float(a.double().square().sum())
    return math.sqrt(total)


def moved_towards(pair: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor],
                  scale: float) -> tuple[Tensor, Tensor]:
    """(B_ref + scale (B - B_ref), A_ref + scale (A - A_ref))."""
    (b, a), (b_ref, a_ref) = pair, reference
    return b_ref + scale * (b - b_ref), a_ref + scale * (a - a_ref)


class ClippedFactors(Mapping[str, tuple[Tensor, Tensor]]):
    """Factors kept elsewhere (on disk: `server.spill`) clipped module by module as they are
    read, so that clipping a round of spilled replies holds no clipped copy of any of them."""

    def __init__(self, factors: Factors, reference: Factors, scale: float) -> None:
        self.factors, self.reference, self.scale = factors, reference, scale

    def __getitem__(self, module: str) -> tuple[Tensor, Tensor]:
        return moved_towards(self.factors[module], self.reference[module], self.scale)

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Each module's (B's shape, A's shape), without reading a tensor."""
        return factor_shapes(self.factors)


def clip_update(factors: Factors, reference: Factors, clip_norm: float
                ) -> tuple[Factors, float, float]:
    """(clipped factors, norm before, scale applied): reference + u * min(1, C / ||u||)."""
    clipped, _, norm, scale = clip_all(factors, {}, reference, {}, clip_norm)
    return clipped, norm, scale


def clip_all(factors: Factors, dense: Dense, reference: Factors, dense_reference: Dense,
             clip_norm: float) -> tuple[Factors, Dense, float, float]:
    """`clip_update` of an update with plain tensors too (a PEFT method without factors):
    one norm over the factors' and the tensors' change, one scale for both. Returns (clipped
    factors, clipped tensors, norm before, scale applied)."""
    if clip_norm <= 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    norm = math.hypot(factor_distance(factors, reference),
                      dense_distance(dense, dense_reference))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    if scale == 1.0:
        return factors, dense, norm, 1.0
    clipped: Factors
    if isinstance(factors, dict):
        clipped = {m: moved_towards(pair, reference[m], scale) for m, pair in factors.items()}
    else:  # factors read from disk (server.spill): clipped as each module is read
        clipped = cast(Factors, ClippedFactors(factors, reference, scale))
    tensors = {k: dense_reference[k] + scale * (t - dense_reference[k]) for k, t in dense.items()}
    return clipped, tensors, norm, scale


def align_shared(trained: Factors, received: Factors, shares: str) -> Factors:
    """The trained factors a strategy shares ("both", "B" or "A"); the others as received
    (they are not sent, so they count as unchanged)."""
    return {m: (b if shares in ("both", "B") else received[m][0],
                a if shares in ("both", "A") else received[m][1])
            for m, (b, a) in trained.items()}


def clip_to_received(trained: Factors, received: Factors, shares: str, clip_norm: float
                     ) -> tuple[Factors, float, float]:
    """Client-side clipping (dp-clipping=client): the factors a strategy shares clipped to
    `clip_norm` around what the client received. Returns what `clip_update` returns."""
    return clip_update(align_shared(trained, received, shares), received, clip_norm)


def noise_std(noise_multiplier: float, clip_norm: float, num_updates: int) -> float:
    """Standard deviation of the Gaussian noise on the mean of `num_updates` clipped updates."""
    if num_updates < 1:
        raise ValueError("noise needs at least one update")
    return noise_multiplier * clip_norm / num_updates


def add_noise(factors: Factors, std: float, shares: str, generator: torch.Generator
              ) -> Factors:
    """Factors with N(0, std^2) added to every entry of the factors a strategy shares
    ("both", "B" or "A"); the others (frozen or private) are left as they are."""
    out = {}
    for module in sorted(factors):  # fixed order: the same seed gives the same noise
        b, a = factors[module]
        if shares in ("both", "B"):
            b = b + std * torch.randn(b.shape, generator=generator, dtype=torch.float64).to(b.dtype)
        if shares in ("both", "A"):
            a = a + std * torch.randn(a.shape, generator=generator, dtype=torch.float64).to(a.dtype)
        out[module] = (b, a)
    return out


def add_dense_noise(dense: Dense, std: float | Mapping[str, float], generator: torch.Generator
                    ) -> Dense:
    """Plain tensors with N(0, std^2) added to every entry (keys in sorted order); `std` may
    differ by tensor ({key: std}: a mean over fewer clients has a larger sensitivity)."""
    stds = std if isinstance(std, Mapping) else dict.fromkeys(dense, std)
    return {k: dense[k] + stds[k] * torch.randn(dense[k].shape, generator=generator,
                                                dtype=torch.float64).to(dense[k].dtype)
            for k in sorted(dense)}


def clip_state(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], scale: float,
               shares: str, clip_norm: float) -> tuple[dict[str, torch.Tensor], float, float]:
    """Client-side clipping of a PEFT-scale state dict (LoRA scale `scale`) around the state it
    started from: (clipped state, norm before, factor applied), through the one edge
    between PEFT state and delta-W factors; plain tensors (IA3's vectors) count as they are."""
    reference = from_peft(start, scale)
    aligned = align_shared(from_peft(state, scale), reference, shares)
    dense = {k: v.float() for k, v in dense_part(state).items()}
    clipped, tensors, norm, factor = clip_all(aligned, dense, reference,
                                              {k: v.float() for k, v in dense_part(start).items()},
                                              clip_norm)
    return {**to_peft(clipped, scale), **tensors}, norm, factor
