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
from collections.abc import Callable, Iterator, Mapping
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
    # ||B A||_F of each module as the server measured it when the reply arrived (hetlora's
    # norm weights read it; `GlobalAdapter.figures`), or None. It describes these factors:
    # whatever changes their values (clipping) must drop it (`replace(..., norms=None)`).
    norms: Mapping[str, float] | None = None

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


class LazyFactors(Mapping[str, tuple[Tensor, Tensor]]):
    """Factors made module by module when read, and not kept: a merge's stacked factors (flora's
    and fedex-lora's residual, of rank sum_i r_i), which a large round could not hold for every
    module at once (32 sites of a 7B shape: 5 GB in float32). Each read makes the module again;
    read each module once where it is dear. Pass it where `Factors` is expected
    (`cast(Factors, ...)`): every reader of a merge's factors reads them by module."""

    def __init__(self, modules: list[str], make: Callable[[str], tuple[Tensor, Tensor]],
                 rank: int | None = None) -> None:
        self._modules, self._make = dict.fromkeys(modules), make  # ordered, O(1) lookups
        self.rank = rank  # every module's rank, when known without making one

    def __getitem__(self, module: str) -> tuple[Tensor, Tensor]:
        if module not in self._modules:
            raise KeyError(module)
        return self._make(module)

    def __contains__(self, module: object) -> bool:  # without making the module
        return module in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


class Watched(Mapping[str, tuple[Tensor, Tensor]]):
    """`factors` that call `seen(module, pair)` with each module read from them: where one
    reader makes each module of a `LazyFactors` (the residual's compression), another figure
    of the same modules (the exactness sketch) is taken from it instead of making them again."""

    def __init__(self, factors: Factors, seen: Callable[[str, tuple[Tensor, Tensor]], None]
                 ) -> None:
        self._factors, self._seen = factors, seen

    def __getitem__(self, module: str) -> tuple[Tensor, Tensor]:
        pair = self._factors[module]
        self._seen(module, pair)
        return pair

    def __contains__(self, module: object) -> bool:
        return module in self._factors

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)


@dataclass
class MergeResult:
    """What one round's merge produced (all factors delta-W scaled, float32)."""

    global_factors: Factors  # the new global adapter; {} when there is none (flora)
    residual: Factors  # low-rank increment to fold into the frozen base this round ({} if none)
    applied: Factors  # product = the delta W the global model moved to (adapter + residual)
    info: dict[str, Any] = field(default_factory=dict)  # strategy-specific figures
    dense: Dense = field(default_factory=dict)  # the new global plain tensors ({} if none)
    # applied is the stack of global_factors and residual, in that order (flora, fedex-lora):
    # the sketch of its product is the sum of theirs
    applied_is_stack: bool = False


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


def weighted_sum(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """sum_i w_i T_i."""
    return sum((w * t for w, t in zip(weights, tensors)), torch.zeros_like(tensors[0]))


PARTS = {"both": (0, 1), "B": (0,), "A": (1,)}  # what a method shares -> the factors summed


def add_padded(total: tuple[Tensor, Tensor], pair: tuple[Tensor, Tensor], weight: float,
               parts: tuple[int, ...] = (0, 1)) -> None:
    """total += weight * pair, the pair (rank r) into total's leading r columns of B and
    rows of A (zero-padding without a padded copy), computed in total's dtype; only the
    factors in `parts` (0: B, 1: A). ValueError when r is above total's rank."""
    r, rank = pair[0].shape[1], total[0].shape[1] if 0 in parts else total[1].shape[0]
    if r > rank:
        raise ValueError(f"client rank {r} above the global rank {rank}; raise export-rank")
    if 0 in parts:
        total[0][:, :r].add_(pair[0], alpha=weight)
    if 1 in parts:
        total[1][:r].add_(pair[1], alpha=weight)


class RunningSum:
    """A weighted mean folded one update at a time: sum_i w_i B_i and sum_i w_i A_i of every
    module (each pair zero-padded to `rank` when one is given) and sum_i w_i T_i of every
    plain tensor, in float64, and the weights' sums; `mean()` divides. `shares`: which
    factors are summed ("both", "B" or "A", as the method shares them); a factor not summed
    is an empty tensor.

    `module_weight` (hetlora's norm weighting): each update's weight of each module, from that
    update and module's (B, A), instead of its one weight. The server folds each reply into
    one as it arrives (`server.rounds`), so a round whose decisions keep every reply with the
    weight it was folded with needs no second pass over the replies (on disk when the round
    spilled); the merge over a list folds the list in the same order, so both give the same
    bits. Memory:
    one float64 copy of one update."""

    def __init__(self, rank: int | None = None,
                 module_weight: Callable[[ClientUpdate, str, Tensor, Tensor], float] | None
                 = None,
                 shares: str = "both") -> None:
        self.rank = rank
        self.module_weight = module_weight
        self.shares = shares
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.dense: dict[str, Tensor] = {}
        self.weight = 0.0
        self.weights: list[float] = []  # each update's weight, as folded, in order
        self.per_module: dict[str, list[float]] = {}  # with `module_weight`: module -> w_i

    def empty(self) -> RunningSum:
        """A running sum of the same kind with nothing folded in."""
        return RunningSum(self.rank, self.module_weight, self.shares)

    def fold(self, updates: list[ClientUpdate], weights: list[float] | None = None
             ) -> RunningSum:
        """The updates folded into `empty()`, in order, each with its weight (`weights`, or
        their own)."""
        total = self.empty()
        for i, update in enumerate(updates):
            total.add(update, update.weight if weights is None else weights[i])
        return total

    @classmethod
    def of(cls, updates: list[ClientUpdate], weights: list[float] | None = None
           ) -> RunningSum:
        """`RunningSum().fold(updates, weights)`."""
        return cls().fold(updates, weights)

    def add(self, update: ClientUpdate, weight: float) -> None:
        """Fold one update in with `weight` (its factors read module by module)."""
        parts = PARTS[self.shares]
        for module, (b, a) in update.factors.items():
            if module not in self.factors:
                r = b.shape[1] if self.rank is None else self.rank
                shapes = ((b.shape[0], r), (r, a.shape[1]))
                self.factors[module] = tuple(  # type: ignore[assignment]
                    torch.zeros(shapes[i] if i in parts else (0,), dtype=torch.float64)
                    for i in (0, 1))
            w = weight if self.module_weight is None else self.module_weight(update, module, b, a)
            try:
                add_padded(self.factors[module], (b, a), w, parts)
            except ValueError as err:
                raise ValueError(f"module {module}: {err}") from None
            if self.module_weight is not None:
                self.per_module.setdefault(module, []).append(w)
        for key, tensor in update.dense.items():
            if key not in self.dense:
                self.dense[key] = torch.zeros(tensor.shape, dtype=torch.float64)
            self.dense[key].add_(tensor, alpha=weight)
        self.weight += weight
        self.weights.append(weight)

    def total(self, module: str) -> float:
        """The sum of the weights `module` was folded with."""
        return sum(self.per_module[module]) if self.module_weight else self.weight

    def mean(self, dtype: torch.dtype = torch.float32) -> tuple[Factors, Dense]:
        """(sum w_i B_i / sum w_i, the same of A) per module and the mean of every plain
        tensor, as `dtype`. A module whose weights sum to 0 is left out."""
        factors = {}
        for module, (b, a) in self.factors.items():
            if (w := self.total(module)) > 0:
                factors[module] = ((b / w).to(dtype), (a / w).to(dtype))
        return factors, {k: (t / self.weight).to(dtype) for k, t in self.dense.items()}


def to32(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """A factor pair as float32."""
    return b.to(torch.float32), a.to(torch.float32)


def factors32(factors: Factors) -> Factors:
    """Every factor pair as float32."""
    return {m: to32(b, a) for m, (b, a) in factors.items()}


def dense_distance(dense: Dense, reference: Dense) -> float:
    """||T - T_ref||_2 over every plain tensor (float64 accumulation; a tensor missing from
    `reference` counts from zero)."""
    total = 0.0
    for key, tensor in dense.items():
        ref = reference.get(key)
        diff = tensor.double() - ref.double() if ref is not None else tensor.double()
        total += float(diff.square().sum())
    return math.sqrt(total)
