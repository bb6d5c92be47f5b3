"""LoRA + mixture of experts (`peft = "lora-moe"`): E LoRA experts on each adapted layer and a
router per layer that weighs them per token, top-k.

    y = W0 x + sum_e g_e(x) s_e B_e A_e dropout(x) + sum_j s_j B'_j A'_j dropout(x),
    g(x) = top-k of softmax(R x), renormalised

R (E x k) is a small linear gate on the layer's own input, one per adapted layer: a layer's
input is what its experts see, so it is what a choice between them can rest on, and a
per-layer gate costs E x k values (4 x 576 on SmolLM2's projections), less than one rank-8
expert. A gate shared per block would save little and route q, k, v, o and the FFN alike.
Each expert e has its own rank r_e (`moe-expert-ranks`, default `lora-rank` for all) and
scale s_e = lora-alpha / r_e. `moe-shared` adds shared experts (B'_j A'_j, rank `lora-rank`,
after DeepSeekMoE): not routed, every token uses them at full weight, and every client trains
them whatever the assignment, so they carry what all clients have in common (FedAvg's share)
while the routed experts keep what sets a client's data apart. Every expert's B starts at
zero, so the adapted model starts as the base model; the router starts at small seeded values
so that tokens spread over experts.

Training adds `moe-balance` times a load-balancing term (Shazeer et al. 2017): the squared
coefficient of variation of the experts' importance (the sum over the batch's tokens of each
expert's router probability), averaged over the adapted layers. It is 0 when every expert has
the same importance and positive otherwise. Where the expert of each example is known in
training (`moe-assign` client, field or cluster: the forced expert), it also adds `moe-route` times
the router's cross-entropy against that expert, averaged over tokens and layers: the router
learns which expert a client's data belongs to, so that at inference, where nothing is
forced, it sends each family's tokens to the expert trained on it.

PEFT has X-LoRA, but it trains only the gating classifier over experts loaded frozen from
pretrained adapters; fedlora trains experts and router together, on every client, so this file
builds a small PEFT method of its own (config, layer, tuner, registered as PEFT type
`LORA_MOE`): `get_peft_model`, PEFT's state dicts, `save_pretrained` and
`PeftModel.from_pretrained` work on it once `fedlora.adapters` is imported, and so does
`fedlora generate --adapter`. Token-level routing cannot be folded into one weight matrix, so
`merge` (and `fedlora export`) refuse it with the reason.

What crosses the wire: for each adapted layer, `moe_A.<e>.weight` (r_e, k) and
`moe_B.<e>.weight` (d, r_e) of every routed expert, `moe_shared_A.<j>.weight` and
`moe_shared_B.<j>.weight` of every shared one, and `moe_router.weight` (E, k); the strategy
`lora-moe` (`fedlora/methods/lora_moe.py`) averages each routed expert over the clients that
trained it, and the shared experts and the router over all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora.adapters.base import (
    LayerTuner,
    PeftMethod,
    PeftOptions,
    add_peft_type,
    options_of,
    register_peft,
    register_tuner,
)
from fedlora.adapters.lora import check_target_modules
from fedlora.config import ALL_LINEAR, LoraSettings, require, setting
from fedlora.seeds import INIT_MIX, derive_seed

PREFIX = "moe_"  # PEFT's prefix of the method: parameters moe_A, moe_B, moe_router
EXPERT_LISTS = ("moe_A", "moe_B", "moe_shared_A", "moe_shared_B")  # indexed by expert
ROUTER_STD = 0.02  # the router's initial weights: small, seeded, so tokens spread over experts
LORA_MOE = add_peft_type("LORA_MOE")


# ---- the math: routing and the balance term ---------------------------------------------------

Forced = int | torch.Tensor | None  # an expert for every token, or one per example (batch,)


def route(logits: torch.Tensor, top_k: int, forced: Forced = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates, probabilities) of router logits (..., E): softmax, then the top-k probabilities
    renormalised to sum to 1, scattered back to (..., E) (zero outside the top k). With
    `forced`, that expert is always one of the k (a client training its own expert); a tensor
    of expert ids (batch,) forces each example's own expert on all its tokens. The
    renormalised top k are the softmax of their own logits: the same numbers, and finite where
    a forced expert's probability underflows to 0 (top-1 would divide 0 by 0)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    rank = probs
    if forced is not None:
        rank = probs.detach().clone().scatter_(-1, forced_index(probs, forced), 2.0)  # above any
    index = rank.topk(top_k, dim=-1).indices
    top = torch.softmax(logits.gather(-1, index), dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, index, top)
    return gates, probs


def route_loss(probs: torch.Tensor, forced: int | torch.Tensor) -> torch.Tensor:
    """The mean over tokens of -log p(forced expert) for router probabilities (..., E):
    `forced` is one expert for every token, or one per example (batch,)."""
    return -probs.gather(-1, forced_index(probs, forced)).clamp_min(1e-12).log().mean()


def forced_index(probs: torch.Tensor, forced: int | torch.Tensor) -> torch.Tensor:
    """The forced expert of every token of `probs` (..., E) as an index (..., 1)."""
    ids = torch.as_tensor(forced, device=probs.device, dtype=torch.long)
    ids = ids.reshape(-1, *[1] * (probs.dim() - 1)) if ids.dim() else ids.reshape(1)
    return ids.expand(*probs.shape[:-1], 1)


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """CV^2 of the experts' importance (the sum of each expert's probability over all
    tokens of `probs` (..., E)): 0 when the importance is equal, positive otherwise."""
    importance = probs.reshape(-1, probs.shape[-1]).sum(dim=0)  # (E,)
    return importance.var(unbiased=False) / importance.mean().clamp_min(1e-12) ** 2


# ---- PEFT's half: config, layer, tuner -------------------------------------------------------

@dataclass
class LoraMoeConfig(PeftConfig):
    """Configuration of LoRA experts with a per-layer top-k router."""

    expert_ranks: list[int] = field(default_factory=lambda: [8, 8, 8, 8], metadata={
        "help": "One LoRA rank per expert; their number is the number of experts."})
    shared_ranks: list[int] = field(default_factory=list, metadata={
        "help": "One LoRA rank per shared expert (not routed: every token uses them)."})
    top_k: int = field(default=2, metadata={
        "help": "Experts each token is routed to (1 <= top_k <= number of experts)."})
    lora_alpha: float = field(default=16.0, metadata={
        "help": "Each expert's update is scaled by lora_alpha / its rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input."})
    target_modules: set[str] | list[str] | str | None = field(default=None, metadata={
        "help": "Names (or a regex) of the linear modules that get experts."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LORA_MOE
        ranks = self.expert_ranks
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1
                            for r in ranks):
            raise ValueError(f"LoraMoeConfig.expert_ranks: expected one integer >= 1 per "
                             f"expert, got {ranks!r}")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1
               for r in self.shared_ranks):
            raise ValueError(f"LoraMoeConfig.shared_ranks: expected one integer >= 1 per "
                             f"shared expert, got {self.shared_ranks!r}")
        if not 1 <= self.top_k <= len(ranks):
            raise ValueError(f"LoraMoeConfig.top_k: expected 1..{len(ranks)} (the number of "
                             f"experts), got {self.top_k!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if not self.target_modules:
            raise ValueError("LoraMoeConfig.target_modules: expected module names or a regex")


class LoraMoeLinear(nn.Module, BaseTunerLayer):
    """A linear layer with LoRA experts and a router on its input.

    The name ends in "Linear" on purpose: PEFT's `all-linear` finds a linear layer that an
    earlier adapter already wraps by its class name, so a second adapter on the same model
    (a resident node's next run) reaches every layer the first one wrapped."""

    adapter_layer_names = ("moe_A", "moe_B", "moe_router", "moe_shared_A", "moe_shared_B")
    other_param_names = ("moe_scaling", "moe_shared_scaling", "moe_top_k")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraMoeConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.moe_A, self.moe_B = nn.ModuleDict({}), nn.ModuleDict({})
        self.moe_router, self.moe_dropout = nn.ModuleDict({}), nn.ModuleDict({})
        self.moe_shared_A, self.moe_shared_B = nn.ModuleDict({}), nn.ModuleDict({})
        self.moe_scaling: dict[str, list[float]] = {}
        self.moe_shared_scaling: dict[str, list[float]] = {}
        self.moe_top_k: dict[str, int] = {}
        self.balance: dict[str, torch.Tensor] = {}  # the last training forward's balance term
        self.route_nll: dict[str, torch.Tensor] = {}  # ... and its routing loss (when forced)
        # adapter -> the expert every token uses in training, or one per example (batch,)
        self.forced: dict[str, int | torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        base = self.get_base_layer()
        k, d = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if isinstance(base, Conv1D):  # GPT-2's linear layer (its weight stored (k, d))
            k, d = base.nx, base.nf
        if not isinstance(k, int) or not isinstance(d, int):
            raise TypeError(f"LoRA experts wrap a linear layer, got {type(base).__name__}; "
                            f"choose linear target_modules")
        self.in_features: int = k
        self.out_features: int = d
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: LoraMoeConfig) -> None:
        """Add adapter `adapter_name`: float32, on the base weight's device (meta included)."""
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        device = weight.device if weight is not None else next(base.parameters()).device
        k, d = self.in_features, self.out_features
        make = lambda i, o: nn.Linear(i, o, bias=False, device=device, dtype=torch.float32)
        a_s = [make(k, r) for r in config.expert_ranks]  # (r_e, k) each
        b_s = [make(r, d) for r in config.expert_ranks]  # (d, r_e) each
        router = make(k, len(config.expert_ranks))  # (E, k)
        shared_a = [make(k, r) for r in config.shared_ranks]
        shared_b = [make(r, d) for r in config.shared_ranks]
        with torch.no_grad():  # A keeps Linear's init; B zero: the base model at the start
            for b in b_s + shared_b:
                b.weight.zero_()
            router.weight.normal_(0.0, ROUTER_STD)
        self.moe_A[adapter_name], self.moe_B[adapter_name] = nn.ModuleList(a_s), nn.ModuleList(b_s)
        self.moe_shared_A[adapter_name] = nn.ModuleList(shared_a)
        self.moe_shared_B[adapter_name] = nn.ModuleList(shared_b)
        self.moe_router[adapter_name] = router
        self.moe_dropout[adapter_name] = (nn.Dropout(config.lora_dropout)
                                          if config.lora_dropout > 0 else nn.Identity())
        self.moe_scaling[adapter_name] = [config.lora_alpha / r for r in config.expert_ranks]
        self.moe_shared_scaling[adapter_name] = [config.lora_alpha / r
                                                 for r in config.shared_ranks]
        self.moe_top_k[adapter_name] = config.top_k
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output plus each active adapter's routed experts."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.moe_A:
                continue
            h = self._cast_input_dtype(x, torch.float32)  # (..., k)
            forced = self.forced.get(name) if self.training else None
            gates, probs = route(self.moe_router[name](h), self.moe_top_k[name], forced)
            if self.training:
                self.balance[name] = balance_loss(probs)
                if forced is not None:
                    self.route_nll[name] = route_loss(probs, forced)
                else:
                    self.route_nll.pop(name, None)
            h = self.moe_dropout[name](h)
            update = torch.zeros(*x.shape[:-1], self.out_features, device=x.device)
            experts = zip(cast(nn.ModuleList, self.moe_A[name]),
                          cast(nn.ModuleList, self.moe_B[name]))
            for e, (a, b) in enumerate(experts):
                # (..., 1) * (..., d): expert e's update on the tokens routed to it
                update = update + gates[..., e:e + 1] * (self.moe_scaling[name][e] * b(a(h)))
            shared = zip(cast(nn.ModuleList, self.moe_shared_A[name]),
                         cast(nn.ModuleList, self.moe_shared_B[name]),
                         self.moe_shared_scaling[name])
            for a, b, scale in shared:  # every token, at full weight
                update = update + scale * b(a(h))
            result = result + update.to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused: token-level routing cannot be folded into one weight matrix."""
        raise ValueError("a LoRA mixture of experts routes each token to its own experts, so "
                         "no single weight matrix can hold it and it cannot be merged; use it "
                         "as an adapter (PeftModel.from_pretrained, fedlora generate --adapter)")

    def unmerge(self) -> None:
        """Nothing to undo: never merged."""

    def __repr__(self) -> str:
        return "lora_moe." + super().__repr__()


class LoraMoeModel(LayerTuner):
    """PEFT's tuner of LoRA experts: wraps each target module in a LoraMoeLinear."""

    prefix: str = PREFIX
    tuner_layer_cls = LoraMoeLinear
    config_cls = LoraMoeConfig
    target_module_mapping: dict[str, list[str]] = {}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """`...moe_A.<adapter>.2.weight` -> `...moe_A.2.weight` (an expert's index follows the
        adapter name, where PEFT expects the parameter's name); the router as PEFT does."""
        head, sep, tail = key.partition(f".{adapter_name}.")
        if sep and tail.split(".")[0].isdigit() and head.rsplit(".", 1)[-1] in EXPERT_LISTS:
            return f"{head}.{tail}"
        return super()._remove_adapter_name_from_key(key, adapter_name)


register_tuner("lora_moe", LoraMoeConfig, LoraMoeModel, PREFIX)


def force_expert(model: nn.Module, adapter: str, expert: Forced) -> None:
    """Make every token of `adapter`'s training forward passes use `expert` (one of its top k;
    a tensor (batch,): each example's own; None: plain top-k routing again)."""
    for module in model.modules():
        if isinstance(module, LoraMoeLinear):
            if expert is None:
                module.forced.pop(adapter, None)
            else:
                module.forced[adapter] = expert


def model_balance(model: nn.Module, adapter: str) -> torch.Tensor | None:
    """The balance term of the last training forward pass, averaged over the adapted layers
    (None when the model has no LoRA experts of `adapter`)."""
    return _layer_mean(model, adapter, "balance")


def model_route_loss(model: nn.Module, adapter: str) -> torch.Tensor | None:
    """The routing loss of the last training forward pass, averaged over the adapted layers
    (None when no expert was forced)."""
    return _layer_mean(model, adapter, "route_nll")


def _layer_mean(model: nn.Module, adapter: str, term: str) -> torch.Tensor | None:
    terms = [getattr(m, term)[adapter] for m in model.modules()
             if isinstance(m, LoraMoeLinear) and adapter in getattr(m, term)]
    return torch.stack(terms).mean() if terms else None


# ---- fedlora's half: peft = "lora-moe" -------------------------------------------------------

@dataclass(frozen=True)
class LoraMoeOptions(PeftOptions):
    """lora-moe's own settings (the strategy lora-moe has its moe-assign options)."""

    experts: int = setting("moe-experts", 4, "lora-moe: LoRA experts on each adapted layer (>= 2).")
    top_k: int = setting("moe-top-k", 2,
                         "lora-moe: experts each token is routed to (1..moe-experts).")
    expert_ranks: str = setting(
        "moe-expert-ranks", "",
        "lora-moe: one rank per expert, comma-separated (4,8,8,16); empty: lora-rank for all.")
    shared: int = setting(
        "moe-shared", 0,
        "lora-moe: shared experts of rank lora-rank on each adapted layer, besides the routed "
        "ones: every token uses them at full weight and every client trains them, whatever "
        "moe-assign (>= 0; 0 = none).")
    balance: float = setting(
        "moe-balance", 0.01,
        "lora-moe: weight of the load-balancing term (the squared coefficient of variation of "
        "the experts' importance) added to the training loss (>= 0; 0 = off).")
    route: float = setting(
        "moe-route", 0.0,
        "lora-moe with moe-assign client, field or cluster: weight of the routing loss (the "
        "router's cross-entropy against the expert each example trains) added to the training "
        "loss, so that the router learns to send a client's kind of data to its expert (>= 0; "
        "0 = off).")
    router_lr: float = setting(
        "moe-router-lr", 1.0,
        "lora-moe: the routers' learning rate as a multiple of lr (> 0; a router starts near "
        "uniform and has few steps to learn in).")

    def __post_init__(self) -> None:
        require(self.experts >= 2, "moe-experts", "an integer >= 2", self.experts)
        require(1 <= self.top_k <= self.experts, "moe-top-k",
                f"an integer in 1..moe-experts={self.experts}", self.top_k)
        require(self.shared >= 0, "moe-shared", "an integer >= 0", self.shared)
        require(self.balance >= 0, "moe-balance", "a number >= 0", self.balance)
        require(self.route >= 0, "moe-route", "a number >= 0", self.route)
        require(self.router_lr > 0, "moe-router-lr", "a number > 0 (a multiple of lr)",
                self.router_lr)
        self.ranks(8)  # checks moe-expert-ranks

    def ranks(self, rank: int) -> list[int]:
        """The rank of each expert: moe-expert-ranks, else `rank` (lora-rank) for all."""
        if not self.expert_ranks.strip():
            return [rank] * self.experts
        parts = [p.strip() for p in self.expert_ranks.split(",") if p.strip()]
        ranks = [int(p) for p in parts if p.isdigit()]
        require(len(ranks) == len(parts) == self.experts and all(r >= 1 for r in ranks),
                "moe-expert-ranks", f"{self.experts} integers >= 1 (one per expert, "
                f"moe-experts={self.experts}), comma-separated", self.expert_ranks)
        return ranks


def moe_options(lora: LoraSettings) -> LoraMoeOptions:
    """lora-moe's options of these settings."""
    return options_of(lora, LoraMoeOptions)


@register_peft
class LoraMoe(PeftMethod):
    """LoRA experts with a per-layer top-k router (federated by strategy lora-moe)."""

    name = "lora-moe"
    why_no_dp_sgd = ("its load-balance loss is a statistic of the whole micro-batch, so "
                     "one example's gradient depends on the others' routing")
    summary = ("LoRA + mixture of experts: moe-experts LoRA experts per layer, a top-k "
               "router per layer (strategy lora-moe)")
    unused = ("client-ranks", "use-rslora")
    why_unused = "it trains LoRA experts of fixed ranks and a router"
    Options = LoraMoeOptions
    b_parts = ("moe_B", "moe_shared_B")  # every expert's B, routed and shared

    def config(self, lora: LoraSettings, base_id: str | None = None) -> LoraMoeConfig:
        moe = moe_options(lora)
        return LoraMoeConfig(expert_ranks=moe.ranks(lora.rank),
                             shared_ranks=[lora.rank] * moe.shared, top_k=moe.top_k,
                             lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=ALL_LINEAR if lora.all_linear else lora.modules(),
                             task_type="CAUSAL_LM",
                             base_model_name_or_path=base_id)

    def add(self, model: torch.nn.Module, lora: LoraSettings, adapter: str) -> PeftModel:
        check_target_modules(model, lora.modules())
        return super().add(model, lora, adapter)

    def auxiliary_loss(self, model: torch.nn.Module, adapter: str, lora: LoraSettings
                       ) -> torch.Tensor | None:
        """moe-balance times the balance term of the last forward pass, plus moe-route times
        its routing loss where experts were forced."""
        moe = moe_options(lora)
        terms = [weight * term for weight, term in (
            (moe.balance, model_balance(model, adapter)),
            (moe.route, model_route_loss(model, adapter))) if weight and term is not None]
        return torch.stack(terms).sum() if terms else None

    def lr_scale(self, name: str, lora: LoraSettings) -> float:
        """moe-router-lr for the routers, 1 for the experts."""
        return moe_options(lora).router_lr if ".moe_router." in name else 1.0

    def initial_dense(self, shapes: dict[str, tuple[int, ...]], seed: int
                      ) -> dict[str, torch.Tensor]:
        """A as PEFT's LoRA draws it, U(-1/sqrt(k), 1/sqrt(k)); B zero (routed and shared
        experts alike); the router N(0, ROUTER_STD^2); each from a generator seeded by (seed,
        key)."""
        out = {}
        for key, shape in shapes.items():
            gen = torch.Generator().manual_seed(derive_seed(seed, key, mix=INIT_MIX))
            if ".moe_B." in key or ".moe_shared_B." in key:
                out[key] = torch.zeros(shape)
            elif ".moe_A." in key or ".moe_shared_A." in key:
                bound = 1.0 / math.sqrt(shape[1])
                out[key] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
            elif key.endswith(".moe_router.weight"):
                out[key] = torch.randn(shape, generator=gen) * ROUTER_STD
            else:
                raise ValueError(f"{key}: expected an expert's moe_A / moe_B, a shared "
                                 f"expert's moe_shared_A / moe_shared_B or a moe_router weight")
        return out


def expert_of(key: str) -> int | None:
    """The routed expert a wire key belongs to (`...moe_A.2.weight` -> 2); None for a router
    or a shared expert (every client trains those)."""
    for part in (".moe_A.", ".moe_B."):
        if part in key:
            return int(key.split(part, 1)[1].split(".", 1)[0])
    return None
