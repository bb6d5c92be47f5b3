"""The one edge between PEFT state dicts and the merge's representation.

PEFT keeps an adapter as a state dict of wire keys (`...q_proj.lora_A.weight`, `.lora_B.weight`)
and applies `delta W = s(r) * B @ A` with `s(r) = alpha / r` (or `alpha / sqrt(r)` with
rsLoRA). Merges work on `Factors`, {module: (B, A)} with the scale folded into B, so that
`delta W = B @ A` whatever the rank. Every conversion between the two goes through this module:
`from_peft` (state dict -> delta-W factors) and `to_peft` (back, at an adapter's own rank), so
moving an update between ranks never changes delta W. `flatten` / `unflatten` convert without
scaling (residuals and checkpoints are stored in delta-W scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

# module name -> (B of shape d x r, A of shape r x k), delta-W scaled: delta W = B @ A
Factors = dict[str, tuple[Tensor, Tensor]]
# wire key -> a plain tensor of a PEFT method that has no low-rank factors (an IA3 vector)
Dense = dict[str, Tensor]

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
# A method's `shares` -> the wire-key suffixes of the factors that cross the wire
SHARED_SUFFIXES = {"both": (A_SUFFIX, B_SUFFIX), "B": (B_SUFFIX,), "A": (A_SUFFIX,)}


def to_delta(factors: Factors, scale: float) -> Factors:
    """PEFT-scale factors -> delta-W scale (B * s, A unchanged)."""
    return {m: (b * scale, a) for m, (b, a) in factors.items()}


def from_delta(factors: Factors, scale: float) -> Factors:
    """Delta-W-scale factors -> PEFT scale of an adapter whose scale is `scale` (B / s)."""
    if scale == 0:
        raise ValueError("cannot divide out a LoRA scale of 0 (lora-alpha = 0?)")
    return {m: (b / scale, a) for m, (b, a) in factors.items()}


def unflatten(state: dict[str, torch.Tensor]) -> Factors:
    """Wire state -> {module: (B, A)}, no scaling."""
    modules = sorted(k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX))
    return {m: (state[m + B_SUFFIX], state[m + A_SUFFIX]) for m in modules}


def flatten(factors: Factors) -> dict[str, torch.Tensor]:
    """{module: (B, A)} -> wire state, no scaling."""
    state = {}
    for module, (b, a) in factors.items():
        state[module + A_SUFFIX] = a
        state[module + B_SUFFIX] = b
    return state


def from_peft(state: dict[str, torch.Tensor], scale: float,
              fill: dict[str, torch.Tensor] | None = None) -> Factors:
    """A PEFT-scale state dict as float32 delta-W factors. A state that carries only some
    factors (a method that shares only B or only A) is completed from `fill` (PEFT scale)."""
    raw = dict(fill or {})
    raw.update({k: v.to(torch.float32) for k, v in state.items()})
    return to_delta(unflatten(raw), scale)


def to_peft(factors: Factors, scale: float) -> dict[str, torch.Tensor]:
    """Delta-W factors as the state dict of an adapter whose LoRA scale is `scale`."""
    return flatten(from_delta(factors, scale))


def is_factor(key: str) -> bool:
    """Is this wire key a LoRA factor (else a plain tensor of another PEFT method)?"""
    return key.endswith((A_SUFFIX, B_SUFFIX))


def dense_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain tensors of a state dict (an IA3 vector, ...): everything but LoRA factors.
    They are federated as they are: no scale, no rank."""
    return {k: v for k, v in state.items() if not is_factor(k)}


def shared_keys(state: dict[str, torch.Tensor], shares: str) -> dict[str, torch.Tensor]:
    """Only what a method sends over the wire: the factors in `shares` ("both", "B" or "A")
    and every plain tensor."""
    return {k: v for k, v in state.items()
            if k.endswith(SHARED_SUFFIXES[shares]) or not is_factor(k)}


def module_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """{module: (d, k)} of the adapted layers, read off a wire state (B is d x r, A is r x k)."""
    return {m: (b.shape[0], a.shape[1]) for m, (b, a) in unflatten(state).items()}
