"""Types and the registry shared by every merging strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# module name -> (B of shape d x r, A of shape r x k); delta W = scale * B @ A
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
Merge = Callable[[list["ClientUpdate"]], Factors]

STRATEGIES: dict[str, Merge] = {}


@dataclass(frozen=True)
class ClientUpdate:
    """One client's trained factors and its aggregation weight (e.g. num-examples)."""

    factors: Factors
    weight: float

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"client weight must be > 0, got {self.weight!r}")


def register(name: str) -> Callable[[Merge], Merge]:
    """Register a merge function under the name users type (`--strategy NAME`)."""

    def wrap(fn: Merge) -> Merge:
        STRATEGIES[name] = fn
        return fn

    return wrap


def get_strategy(name: str) -> Merge:
    """Look up a merge function by name, with the list of known names on a miss."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None


def normalised_weights(updates: list[ClientUpdate]) -> list[float]:
    """p_i = w_i / sum_j w_j."""
    total = sum(u.weight for u in updates)
    return [u.weight / total for u in updates]
