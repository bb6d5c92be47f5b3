"""LoRA + mixture of experts (`lora-moe`, with `peft = "lora-moe"`): E LoRA experts and a
router on every adapted layer (`fedlora/adapters/lora_moe.py`); the server averages each
expert over the clients that trained it and the router over all clients.

When each client holds one task family, plain FedAvg of one adapter dilutes every family's
update by the others'. A mixture keeps the experts apart, and the router, trained by every
client, learns per token which of them to use.

    expert e:  T_e = sum_{i trained e} p_i T_{i,e},  p_i = examples_i / sum over those clients
    router:    R   = sum_i p_i R_i
    an expert no client trained this round keeps its value exactly.

Which experts a client trains is the assignment (`moe-assign`):
- `learned`: every client trains every expert and the router; the router decides.
- `client`: client p owns expert p mod E (its partition id, so for experiments in simulation,
  or nodes started with --partition-id): it trains that expert and the router, the other
  experts stay frozen, and in its training forward passes every token uses its own expert (one
  of its top k), so that the expert learns that client's data and the router learns when to
  pick it. The server knows the assignment from the reply's partition id.
Not built yet: `cluster` (clients clustered by their updates after a first round, each cluster
owning an expert). The merge takes each update's `experts` (None: all), whatever assigns them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.nn import Module

from fedlora.adapters.lora_moe import expert_of, force_expert
from fedlora.aggregation.base import (
    ClientUpdate,
    Dense,
    Factors,
    MergeResult,
    normalised_weights,
    weighted_sum,
)
from fedlora.config import SettingsError, one_of
from fedlora.methods.base import Method, MethodOptions, option, register

if TYPE_CHECKING:
    from fedlora.config import LoraSettings, Settings

ASSIGNMENTS = ("learned", "client")


def parameter_expert(name: str, adapter: str) -> int | None:
    """The expert a model parameter belongs to (`...moe_A.<adapter>.2.weight` -> 2); None
    for a router."""
    return expert_of(name.replace(f".{adapter}.", "."))


def trained(update: ClientUpdate, key: str) -> bool:
    """Did this client train the tensor `key` (a router: always; an expert: when it is one
    of the update's experts, all when it names none)?"""
    expert = expert_of(key)
    return expert is None or update.experts is None or expert in update.experts


def average_experts(updates: list[ClientUpdate]) -> Dense:
    """Key by key, the example-weighted mean over the clients that trained it (float64
    inside, float32 out); a tensor nobody trained is left out (it keeps its value)."""
    out: Dense = {}
    for key in updates[0].dense:
        trainers = [u for u in updates if trained(u, key)]
        if trainers:
            p = normalised_weights(trainers)
            out[key] = weighted_sum([u.dense[key].double() for u in trainers], p).float()
    return out


@dataclass(frozen=True)
class MoeOptions(MethodOptions):
    """lora-moe's own settings."""

    assign: str = option(
        "moe-assign", "learned",
        "lora-moe: which experts a client trains: learned (every client every expert; the "
        "router decides) or client (client p owns expert p mod moe-experts, by partition id).")

    def __post_init__(self) -> None:
        one_of("moe-assign", self.assign, ASSIGNMENTS)


@register
class LoraMoe(Method):
    """Each expert averaged over its trainers, the router over all."""

    name = "lora-moe"
    summary = ("LoRA + mixture of experts (peft=lora-moe): each expert averaged over the "
               "clients that trained it, the router over all")
    linear = True  # a weighted mean of what the clients sent: DP's noise bounds each client
    exactness_defined = False  # no low-rank global delta W: the experts are plain tensors
    peft_methods = frozenset({"lora-moe"})
    Options = MoeOptions
    options: MoeOptions

    def check_settings(self, settings: Settings) -> None:
        """peft=lora-moe (the strategy needs its experts), then the common checks."""
        if settings.lora.peft != "lora-moe":
            raise SettingsError(
                f"setting 'peft': strategy lora-moe federates LoRA experts with a router, so "
                f"it needs peft=lora-moe, got peft={settings.lora.peft}; set peft=lora-moe (and "
                f"moe-experts, moe-top-k), or choose another strategy")
        super().check_settings(settings)

    def owned_expert(self, partition_id: int, lora: LoraSettings) -> int | None:
        """The expert client `partition_id` owns (`moe-assign=client`), else None."""
        if self.options.assign != "client":
            return None
        if partition_id < 0:
            raise ValueError("moe-assign=client needs each client's partition id (simulation, "
                             "or fedlora client --partition-id)")
        return partition_id % lora.moe_experts

    def trained_experts(self, partition_id: int, lora: LoraSettings) -> frozenset[int] | None:
        """client: the one expert the client owns; learned: all (None)."""
        expert = self.owned_expert(partition_id, lora)
        return None if expert is None else frozenset({expert})

    @contextmanager
    def local_training(self, model: Module, adapter: str, partition_id: int,
                       settings: Settings) -> Iterator[Callable[[str], bool] | None]:
        """client: the own expert used by every token while training, and only it and the
        router trained; learned: nothing changes."""
        expert = self.owned_expert(partition_id, settings.lora)
        if expert is None:
            yield None
            return
        force_expert(model, adapter, expert)
        try:
            yield lambda name: parameter_expert(name, adapter) in (None, expert)
        finally:
            force_expert(model, adapter, None)

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """The experts and routers of the round (see the module's formulas)."""
        return MergeResult(global_factors={}, residual={}, applied={},
                           info={"weights": normalised_weights(updates)},
                           dense=average_experts(updates))
