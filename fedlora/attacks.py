"""Simulated hostile clients, for experiments and the robustness benchmark (pure torch).

A hostile client trains like the others, then changes its reply (`attack_state`, on the PEFT
state dict it sends; the update is its change from the adapter it started from):

- `scale`: start + s (trained - start), the update blown up s times (s = attack-scale);
- `sign-flip`: start - s (trained - start), pushing the model away from the data;
- `noise`: start + Gaussian noise whose std is s times the RMS of the honest update;
- `constant`: every entry of every factor it sends is s (1e30 is finite in float32);
- `inflate-examples`: the honest update, claiming max-num-examples examples (`claimed`).

The hostile clients are partitions 0 .. attack-clients-1 (`AttackSettings.hostile`). Only a
simulated client attacks: a node started by `fedlora client` refuses a run that asks it to,
and `fedlora server` rejects the settings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedlora.config import ATTACKS, AttackSettings

__all__ = ["ATTACKS", "attack_state", "claimed", "reference"]


def attack_state(state: dict[str, Tensor], start: dict[str, Tensor], attack: AttackSettings,
                 seed: int) -> dict[str, Tensor]:
    """The reply a hostile client sends instead of `state` (both PEFT scale, the same keys;
    `start` is what it started from and may hold more keys)."""
    s, kind = attack.attack_scale, attack.attack
    if kind in ("none", "inflate-examples"):
        return state
    if kind == "constant":
        return {k: torch.full_like(v, s) for k, v in state.items()}
    base = {k: reference(v, start.get(k)) for k, v in state.items()}
    change = {k: v.double() - base[k] for k, v in state.items()}
    if kind == "scale":
        moved = {k: s * c for k, c in change.items()}
    elif kind == "sign-flip":
        moved = {k: -s * c for k, c in change.items()}
    elif kind == "noise":
        entries = sum(c.numel() for c in change.values())
        rms = math.sqrt(sum(float(c.square().sum()) for c in change.values()) / max(entries, 1))
        generator = torch.Generator().manual_seed(seed)
        moved = {k: s * rms * torch.randn(c.shape, generator=generator, dtype=torch.float64)
                 for k, c in sorted(change.items())}
    else:
        raise ValueError(f"attack: expected one of {', '.join(ATTACKS)}, got {kind!r}")
    return {k: (base[k] + moved[k]).to(v.dtype) for k, v in state.items()}


def reference(tensor: Tensor, start: Tensor | None) -> Tensor:
    """What `tensor` started from, in float64 (zeros when its shape changed, e.g. after
    hetlora's pruning, or it was not there)."""
    if start is None or start.shape != tensor.shape:
        return torch.zeros_like(tensor, dtype=torch.float64)
    return start.double()


def claimed(num_examples: int, attack: AttackSettings, max_num_examples: int) -> int:
    """The num-examples a hostile client claims (inflate-examples: the server's cap)."""
    return max_num_examples if attack.attack == "inflate-examples" else num_examples
