"""Types, checks and arithmetic helpers shared by every merge (`fedlora.methods`).

Conventions (every module of `fedlora.aggregation` and every merge follows them):
- one adapted layer has B (d x r) and A (r x k); `Factors` maps a module name to (B, A);
- factors are *delta-W scaled*: the LoRA scale is folded into B, so delta W = B @ A
  (see `fedlora.factors`, the one place that converts);
- client weights are p_i = w_i / sum_j w_j, with w_i the client's number of examples;
- merges compute in float64 and return float32 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedlora.factors import Dense, Factors


@dataclass(frozen=True)
class ClientUpdate:
    """One client's trained factors (delta-W scaled), its plain tensors (`dense`, as they are:
    the methods of `fedlora.adapters` that are not LoRA) and its weight (number of examples)."""

    factors: Factors
    weight: float
    dense: Dense = field(default_factory=dict)
    # lora-moe: the experts this client trained (None: all of them; `fedlora.methods.lora_moe`)
    experts: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"client weight must be > 0 (its number of examples), "
                             f"got {self.weight!r}")
        for module, (b, a) in factor_shapes(self.factors).items():
            if len(b) != 2 or len(a) != 2 or b[1] != a[0]:
                raise ValueError(f"module {module}: expected B (d x r) and A (r x k), got B "
                                 f"{tuple(b)} and A {tuple(a)}")

    @property
    def rank(self) -> int:
        """Rank of the update: columns of B of its first module (all modules share it)."""
        return next(iter(factor_shapes(self.factors).values()))[0][1] if self.factors else 0


def factor_shapes(factors: Factors) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """module -> (B's shape, A's shape). Factors kept on disk (`server.spill`) say theirs
    through a `shapes()` method, without reading a tensor."""
    shapes = getattr(factors, "shapes", None)
    if callable(shapes):
        return shapes()
    return {m: (tuple(b.shape), tuple(a.shape)) for m, (b, a) in factors.items()}


@dataclass
class MergeResult:
    """What one round's merge produced (all factors delta-W scaled, float32)."""

    global_factors: Factors  # the new global adapter; {} when there is none (flora)
    residual: Factors  # low-rank increment to fold into the frozen base this round ({} if none)
    applied: Factors  # product = the delta W the global model moved to (adapter + residual)
    info: dict[str, Any] = field(default_factory=dict)  # strategy-specific figures
    dense: Dense = field(default_factory=dict)  # the new global plain tensors ({} if none)


# ---------------------------------------------------------------- checks


def check_updates(updates: list[ClientUpdate], name: str) -> None:
    """At least one update, all with the same modules and the same layer shapes (d, k)."""
    if not updates:
        raise ValueError(f"{name} needs at least one client update, got none")
    check_dense(updates, name)
    first = factor_shapes(updates[0].factors)
    for i, update in enumerate(updates[1:], start=1):
        shapes = factor_shapes(update.factors)
        if shapes.keys() != first.keys():
            missing = sorted(first.keys() - shapes.keys())[:3]
            extra = sorted(shapes.keys() - first.keys())[:3]
            raise ValueError(f"client {i} sent other modules than client 0 "
                             f"(missing {missing}, extra {extra})")
        for module, (b, a) in shapes.items():
            b0, a0 = first[module]
            if (b[0], a[1]) != (b0[0], a0[1]):
                raise ValueError(f"module {module}: client {i} has a {b[0]} x {a[1]} "
                                 f"layer, client 0 a {b0[0]} x {a0[1]} one")


def check_dense(updates: list[ClientUpdate], name: str) -> None:
    """Every client sent the same plain tensors with the same shapes."""
    first = updates[0].dense
    for i, update in enumerate(updates[1:], start=1):
        if update.dense.keys() != first.keys():
            missing = sorted(first.keys() - update.dense.keys())[:3]
            extra = sorted(update.dense.keys() - first.keys())[:3]
            raise ValueError(f"{name}: client {i} sent other tensors than client 0 "
                             f"(missing {missing}, extra {extra})")
        for key, tensor in update.dense.items():
            if tensor.shape != first[key].shape:
                raise ValueError(f"{name}: {key} has shape {tuple(tensor.shape)} on client {i} "
                                 f"but {tuple(first[key].shape)} on client 0")


def check_previous(previous: Factors, updates: list[ClientUpdate], name: str) -> None:
    """The previous global adapter covers every module the clients sent."""
    missing = sorted(updates[0].factors.keys() - previous.keys())
    if missing:
        raise ValueError(f"{name} needs the previous global adapter of every module; "
                         f"missing {missing[:3]} ({len(missing)} in all)")


# ---------------------------------------------------------------- arithmetic helpers


def normalised_weights(updates: list[ClientUpdate]) -> list[float]:
    """p_i = w_i / sum_j w_j."""
    total = sum(u.weight for u in updates)
    return [u.weight / total for u in updates]


def raw_pairs(updates: list[ClientUpdate], module: str) -> list[tuple[Tensor, Tensor]]:
    """Every client's (B, A) of one module, as received (no copy)."""
    return [u.factors[module] for u in updates]


def pairs(updates: list[ClientUpdate], module: str) -> list[tuple[Tensor, Tensor]]:
    """Every client's (B, A) of one module, in float64."""
    return [(u.factors[module][0].double(), u.factors[module][1].double()) for u in updates]


def weighted_sum(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """sum_i w_i T_i."""
    return sum((w * t for w, t in zip(weights, tensors)), torch.zeros_like(tensors[0]))


def to32(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """A factor pair as float32."""
    return b.to(torch.float32), a.to(torch.float32)


def factors32(factors: Factors) -> Factors:
    """Every factor pair as float32."""
    return {m: to32(b, a) for m, (b, a) in factors.items()}


def average_dense(updates: list[ClientUpdate], p: list[float]) -> Dense:
    """Key by key: sum p_i T_i of the clients' plain tensors (float64 inside, float32 out)."""
    return {k: weighted_sum([u.dense[k].double() for u in updates], p).float()
            for k in updates[0].dense}


def dense_distance(dense: Dense, reference: Dense) -> float:
    """||T - T_ref||_2 over every plain tensor (float64 accumulation; a tensor missing from
    `reference` counts from zero)."""
    total = 0.0
    for key, tensor in dense.items():
        ref = reference.get(key)
        diff = tensor.double() - ref.double() if ref is not None else tensor.double()
        total += float(diff.square().sum())
    return math.sqrt(total)
