"""Types, checks and the registry shared by every merging strategy.

Conventions (every module of `fedlora.aggregation` follows them):
- one adapted layer has B (d x r) and A (r x k); `Factors` maps a module name to (B, A);
- factors are *delta-W scaled*: the LoRA scale is folded into B, so delta W = B @ A
  (see `fedlora.aggregation.scaling`);
- client weights are p_i = w_i / sum_j w_j, with w_i the client's number of examples;
- merges compute in float64 and return float32 tensors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedlora.aggregation.linalg import pad_rank, truncate_rank

# module name -> (B of shape d x r, A of shape r x k), delta-W scaled: delta W = B @ A
Factors = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's trained factors (delta-W scaled) and its weight (number of examples)."""

    factors: Factors
    weight: float

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"client weight must be > 0 (its number of examples), "
                             f"got {self.weight!r}")
        for module, (b, a) in self.factors.items():
            if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(f"module {module}: expected B (d x r) and A (r x k), got B "
                                 f"{tuple(b.shape)} and A {tuple(a.shape)}")

    @property
    def rank(self) -> int:
        """Rank of the update: columns of B of its first module (all modules share it)."""
        return next(iter(self.factors.values()))[0].shape[1] if self.factors else 0


@dataclass
class MergeResult:
    """What one round's merge produced (all factors delta-W scaled, float32)."""

    global_factors: Factors  # the new global adapter; {} when there is none (flora)
    residual: Factors  # low-rank increment to fold into the frozen base this round ({} if none)
    applied: Factors  # product = the delta W the global model moved to (adapter + residual)
    info: dict[str, Any] = field(default_factory=dict)  # strategy-specific figures


class Strategy:
    """One merging method; subclasses set the class attributes and implement `merge`."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False  # is the applied update exactly sum_i p_i B_i A_i?
    heterogeneous: ClassVar[bool] = False  # may clients use different ranks?
    shares: ClassVar[str] = "both"  # factors on the wire: "both", "B" or "A"
    fresh_adapter: ClassVar[bool] = False  # clients start a fresh adapter every round
    uses_residual: ClassVar[bool] = False  # the merge folds a residual into the frozen base
    exactness_defined: ClassVar[bool] = True  # False when there is no global delta W (fedsa-lora)
    server_optimizer_ok: ClassVar[bool] = True  # do the global factors persist across rounds?
    linear: ClassVar[bool] = False  # is the merge a weighted mean of the shared factors? (DP)
    options: ClassVar[dict[str, tuple[str, ...]]] = {}  # option name -> allowed values

    def check(self, updates: list[ClientUpdate]) -> None:
        """Raise ValueError unless this strategy can merge these updates."""
        check_updates(updates, self.name)
        if not self.heterogeneous:
            check_same_rank(updates, self.name)

    def merge(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
              ) -> MergeResult:
        """Merge one round; `previous` is the global adapter before it (delta-W scaled)."""
        raise NotImplementedError

    def payload(self, global_factors: Factors, rank: int) -> Factors:
        """What a client of `rank` receives: the global factors zero-padded or cut to `rank`."""
        return {m: to32(*truncate_rank(*pad_rank(b, a, rank), rank))
                for m, (b, a) in global_factors.items()}

    def with_options(self, **options: str) -> "Strategy":
        """A copy with options set: get_strategy("hetlora").with_options(weighting="examples")."""
        for key, value in options.items():
            if key not in self.options:
                raise ValueError(f"strategy {self.name!r} has no option {key!r}; "
                                 f"options: {sorted(self.options) or 'none'}")
            if value not in self.options[key]:
                raise ValueError(f"strategy {self.name!r}: option {key} must be one of "
                                 f"{list(self.options[key])}, got {value!r}")
        clone = copy.copy(self)
        vars(clone).update(options)
        return clone

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options)
        return f"{type(self).__name__}({options})"


STRATEGIES: dict[str, Strategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: register an instance under `cls.name` (the name users type)."""
    if not cls.name or cls.name in STRATEGIES:
        raise ValueError(f"strategy name {cls.name!r} is empty or already registered")
    STRATEGIES[cls.name] = cls()
    return cls


def get_strategy(name: str) -> Strategy:
    """The registered strategy called `name`; a KeyError lists the known names on a miss."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}"
                       ) from None


# ---------------------------------------------------------------- checks


def check_updates(updates: list[ClientUpdate], name: str) -> None:
    """At least one update, all with the same modules and the same layer shapes (d, k)."""
    if not updates:
        raise ValueError(f"{name} needs at least one client update, got none")
    first = updates[0].factors
    for i, update in enumerate(updates[1:], start=1):
        if update.factors.keys() != first.keys():
            missing = sorted(first.keys() - update.factors.keys())[:3]
            extra = sorted(update.factors.keys() - first.keys())[:3]
            raise ValueError(f"client {i} sent other modules than client 0 "
                             f"(missing {missing}, extra {extra})")
        for module, (b, a) in update.factors.items():
            b0, a0 = first[module]
            if (b.shape[0], a.shape[1]) != (b0.shape[0], a0.shape[1]):
                raise ValueError(f"module {module}: client {i} has a {b.shape[0]} x {a.shape[1]} "
                                 f"layer, client 0 a {b0.shape[0]} x {a0.shape[1]} one")


def check_same_rank(updates: list[ClientUpdate], name: str) -> None:
    """Every client uses client 0's rank, in every module."""
    for i, update in enumerate(updates):
        for module, (b, _) in update.factors.items():
            r0 = updates[0].factors[module][0].shape[1]
            if b.shape[1] != r0:
                hetero = ", ".join(n for n, s in sorted(STRATEGIES.items()) if s.heterogeneous)
                raise ValueError(
                    f"{name} needs equal ranks: module {module} has rank {b.shape[1]} on "
                    f"client {i} but rank {r0} on client 0; use a rank-heterogeneous "
                    f"strategy instead ({hetero})")


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
