"""Server optimisers on the pseudo-gradient of the global factors (FedAvgM, FedAdam, ...).

Each round, `step(previous, merged)` takes the pseudo-gradient delta = merged - previous of
every global tensor (B and A separately, elementwise) and returns previous + update:

- fedavgm (Hsu et al. 2019): v = momentum v + delta; update = lr v (Flower's FedAvgM);
- fedadam, fedyogi, fedadagrad (Reddi et al., ICLR 2021, Algorithm 2):
  m = beta1 m + (1 - beta1) delta (beta1 is `momentum`), update = lr m / (sqrt(v) + tau), with
  v = beta2 v + (1 - beta2) delta^2 (adam), v = v - (1 - beta2) delta^2 sign(v - delta^2)
  (yogi), v = v + delta^2 (adagrad); m and v start at 0 and, as in the paper and in Flower's
  FedYogi and FedAdagrad, there is no bias correction (Flower's FedAdam adds one).
- none: returns the merge unchanged.

Defaults are Flower's: fedavgm lr 1.0 (momentum 0.9 here; Flower's is 0.0), fedadam lr 0.1,
fedyogi lr 0.01, fedadagrad lr 0.1 and momentum 0.0, beta2 0.99, tau 1e-3. Every optimiser
takes the same keywords (lr, momentum, beta2, tau) and ignores those it has no use for.

What this acts on: the global *factors*, not delta W = B @ A. That is exact on delta W only
when A is shared and fixed (ffa-lora), since delta W is then linear in B; otherwise it inherits
the factor-wise approximation of the merge. State (m, v) is float64 tensors named
"m/<module>/B" etc.; `state_dict` / `load_state_dict` round-trip it (safetensors-friendly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fedlora.aggregation.base import Factors

SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {}


def register_optimizer(cls: type[ServerOptimizer]) -> type[ServerOptimizer]:
    """Class decorator: register a server optimiser under `cls.name`."""
    SERVER_OPTIMIZERS[cls.name] = cls
    return cls


@dataclass
class ServerOptimizer:
    """Base: pseudo-gradient per tensor, subclass computes the update from it and its state."""

    name: ClassVar[str] = ""
    lr: float = 0.1  # server learning rate eta
    momentum: float = 0.9  # fedavgm momentum; beta1 of the adaptive ones
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity (keeps the denominator away from 0)
    state: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def step(self, previous: Factors, merged: Factors) -> Factors:
        """previous + update(merged - previous), tensor by tensor; float32 out."""
        out: Factors = {}
        for module, (b, a) in merged.items():
            if module not in previous:
                raise ValueError(f"server optimiser: module {module} has no previous factors")
            b_prev, a_prev = previous[module]
            out[module] = (self.moved(f"{module}/B", b_prev, b),
                           self.moved(f"{module}/A", a_prev, a))
        return out

    def step_dense(self, previous: dict[str, Tensor], merged: dict[str, Tensor]
                   ) -> dict[str, Tensor]:
        """The same step on plain tensors (a PEFT method without factors), key by key."""
        missing = sorted(merged.keys() - previous.keys())
        if missing:
            raise ValueError(f"server optimiser: {missing[:3]} have no previous value")
        return {k: self.moved(f"dense/{k}", previous[k], t) for k, t in merged.items()}

    def moved(self, key: str, old: Tensor, new: Tensor) -> Tensor:
        """One tensor after the step."""
        if old.shape != new.shape:
            raise ValueError(f"server optimiser: {key} changed shape from {tuple(old.shape)} to "
                             f"{tuple(new.shape)}; the global rank must stay fixed")
        old = old.double()
        return (old + self.update(key, new.double() - old)).float()

    def update(self, key: str, delta: Tensor) -> Tensor:
        """The step for one tensor, given its pseudo-gradient."""
        raise NotImplementedError

    def slot(self, kind: str, key: str, like: Tensor) -> Tensor:
        """The state tensor `kind` ("m" or "v") of a tensor, zeros at first."""
        return self.state.get(f"{kind}/{key}", torch.zeros_like(like))

    def first_moment(self, key: str, delta: Tensor) -> Tensor:
        """m = beta1 m + (1 - beta1) delta, stored."""
        m = self.momentum * self.slot("m", key, delta) + (1 - self.momentum) * delta
        self.state[f"m/{key}"] = m
        return m

    def state_dict(self) -> dict[str, Tensor]:
        """The optimiser state as named tensors (a copy)."""
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a state saved by `state_dict`."""
        self.state = {k: v.to(torch.float64).clone() for k, v in state.items()}


@register_optimizer
@dataclass
class NoServerOptimizer(ServerOptimizer):
    """The merge as it is."""

    name: ClassVar[str] = "none"

    def update(self, key: str, delta: Tensor) -> Tensor:
        """No change to the merge: the full pseudo-gradient."""
        return delta


@register_optimizer
@dataclass
class FedAvgM(ServerOptimizer):
    """Server momentum: v = momentum v + delta; previous + lr v."""

    name: ClassVar[str] = "fedavgm"
    lr: float = 1.0

    def update(self, key: str, delta: Tensor) -> Tensor:
        """lr times the momentum buffer."""
        v = self.momentum * self.slot("m", key, delta) + delta
        self.state[f"m/{key}"] = v
        return self.lr * v


@register_optimizer
@dataclass
class FedAdam(ServerOptimizer):
    """Adam on the pseudo-gradient: v = beta2 v + (1 - beta2) delta^2."""

    name: ClassVar[str] = "fedadam"

    def update(self, key: str, delta: Tensor) -> Tensor:
        """lr m / (sqrt(v) + tau)."""
        m = self.first_moment(key, delta)
        v = self.beta2 * self.slot("v", key, delta) + (1 - self.beta2) * delta.square()
        self.state[f"v/{key}"] = v
        return self.lr * m / (v.sqrt() + self.tau)


@register_optimizer
@dataclass
class FedYogi(ServerOptimizer):
    """Yogi on the pseudo-gradient: v = v - (1 - beta2) delta^2 sign(v - delta^2)."""

    name: ClassVar[str] = "fedyogi"
    lr: float = 1e-2

    def update(self, key: str, delta: Tensor) -> Tensor:
        """lr m / (sqrt(v) + tau)."""
        m = self.first_moment(key, delta)
        v = self.slot("v", key, delta)
        v = v - (1 - self.beta2) * delta.square() * torch.sign(v - delta.square())
        self.state[f"v/{key}"] = v
        return self.lr * m / (v.sqrt() + self.tau)


@register_optimizer
@dataclass
class FedAdagrad(ServerOptimizer):
    """Adagrad on the pseudo-gradient: v = v + delta^2."""

    name: ClassVar[str] = "fedadagrad"
    momentum: float = 0.0

    def update(self, key: str, delta: Tensor) -> Tensor:
        """lr m / (sqrt(v) + tau)."""
        m = self.first_moment(key, delta)
        v = self.slot("v", key, delta) + delta.square()
        self.state[f"v/{key}"] = v
        return self.lr * m / (v.sqrt() + self.tau)
