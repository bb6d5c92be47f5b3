"""What a federated method is: its merge, its client-side steps, its options, its checks.

A method lives in one file of `fedlora/methods/` as a `Method` subclass registered with
`@register` (plus one import line in `fedlora/methods/__init__.py`). It declares:

- properties (class attributes) that the round loop and the checks read: which factors it
  shares, whether clients may differ in rank, whether a residual is folded into the base ...;
- `Options`: a dataclass of its own run-config keys (`option(key, default, help)`), validated
  in `__post_init__` like every other setting;
- `check_settings`: combinations of settings it cannot run, refused before anything starts;
- `combine`: the pure merge over delta-W-scaled factors (`merge` checks the inputs once and
  calls it); `payload`: what a client of rank r receives;
- client steps: `client_start` (how a client starts from what it received) and
  `client_finish` (what it does before replying), on PEFT-scale state dicts;
- `reply_rank`: the rank a node's reply may carry.

Merges follow `fedlora.aggregation`'s conventions: factors delta-W scaled (delta W = B @ A),
client weights p_i = examples / total, float64 inside, float32 out.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import Tensor
from torch.nn import Module

from fedlora.adapters.base import PEFT_METHODS, peft_method
from fedlora.aggregation.base import (
    ClientUpdate,
    Dense,
    Factors,
    MergeResult,
    RunningSum,
    check_updates,
    factor_shapes,
    to32,
)
from fedlora.aggregation.exactness import compress
from fedlora.aggregation.linalg import pad_rank, truncate_rank
from fedlora.config import DefenceSettings, OptionGroup, SettingsError, require, setting
from fedlora.factors import shared_keys
from fedlora.train.hooks import LocalTraining

if TYPE_CHECKING:
    from fedlora.config import LoraSettings, Settings

option = setting  # a method option is declared like any other setting


@dataclass(frozen=True)
class MethodOptions(OptionGroup):
    """A federated method's own settings (none by default); subclasses add `option(...)`
    fields."""


@dataclass(frozen=True)
class ResidualOptions(MethodOptions):
    """Options of the methods that fold a residual into the frozen base (flora, fedex-lora)."""

    residual_rank: int = option(
        "residual-rank", 128,
        "flora/fedex-lora: rank budget of the frozen residual folded into the base; a larger "
        "residual is re-compressed by SVD and the dropped energy is logged.")

    def __post_init__(self) -> None:
        require(self.residual_rank >= 1, "residual-rank", "an integer >= 1", self.residual_rank)


class PersonalStore(Protocol):
    """Where a client keeps factors that never leave it (fedsa-lora's B)."""

    def load(self) -> dict[str, Tensor] | None:
        """The client's private tensors, or None before its first round."""

    def save(self, tensors: dict[str, Tensor]) -> None:
        """Keep the client's private tensors until its next round."""


class Method:
    """One federated method; subclasses set the properties and implement `combine`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --help and `fedlora settings`
    exact: ClassVar[bool] = False  # is the applied update exactly sum_i p_i B_i A_i?
    heterogeneous: ClassVar[bool] = False  # may clients use different ranks?
    shares: ClassVar[str] = "both"  # factors on the wire: "both", "B" or "A"
    personal: ClassVar[bool] = False  # clients keep private factors (evaluate their own model)
    fresh_adapter: ClassVar[bool] = False  # clients start a fresh adapter every round
    uses_residual: ClassVar[bool] = False  # the merge folds a residual into the frozen base
    exactness_defined: ClassVar[bool] = True  # False when there is no global delta W
    server_optimizer_ok: ClassVar[bool] = True  # do the global factors persist across rounds?
    linear: ClassVar[bool] = False  # is the merge a weighted mean of the shared factors? (DP)
    # why secure aggregation cannot run this method's merge ("" = it can: the merge is a
    # weighted mean of what the clients send, at one rank, so the sum is all it needs)
    secagg_refusal: ClassVar[str] = "its merge is not a weighted sum of what the clients send"
    # under secure aggregation each site sends its whole factors zero-padded to the global
    # rank (delta-W scale) instead of its change: sites of different ranks add up (hetlora)
    secagg_padded: ClassVar[bool] = False
    # robust merges (fedlora.aggregation.robust) that make sense with this method: krum picks
    # whom the method merges; median / trimmed-mean replace the merge by a re-factored delta W
    robust_rules: ClassVar[frozenset[str]] = frozenset({"krum"})
    # the PEFT methods (`peft`, fedlora.adapters) this strategy can federate; "*": every one
    peft_methods: ClassVar[frozenset[str]] = frozenset({"lora"})
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, options: MethodOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    @property
    def weighs_by_norm(self) -> bool:
        """Does the merge weigh each module of an update by its ||B A||_F (hetlora's norm
        weighting)? Then the server measures the norms as each reply arrives, from the blocks
        of its screen figures (`ClientUpdate.norms`), and the merge reads them."""
        return False

    # ---- settings -------------------------------------------------------------------------
    def check_settings(self, settings: Settings) -> None:
        """Raise a SettingsError for settings this method cannot run (subclasses extend)."""
        self.check_peft(settings)
        ranks = sorted(set(settings.lora.possible_ranks()))
        fed = settings.federation
        if not self.heterogeneous and len(ranks) > 1:
            raise SettingsError(
                f"setting 'client-ranks': strategy '{self.name}' needs every client at the same "
                f"rank, but client-ranks={settings.lora.client_ranks!r} gives ranks {ranks}; use "
                f"one of the rank-heterogeneous strategies ({names(lambda m: m.heterogeneous)})")
        if fed.export_rank and fed.export_rank < max(ranks):
            raise SettingsError(f"setting 'export-rank': expected >= the largest client rank "
                                f"{max(ranks)}, got {fed.export_rank}")
        if not self.heterogeneous and fed.export_rank not in (0, ranks[0]):
            raise SettingsError(f"setting 'export-rank': strategy '{self.name}' keeps the "
                                f"clients' rank {ranks[0]}, got {fed.export_rank}; leave it 0")
        if fed.clip_norm and self.fresh_adapter:
            raise SettingsError(f"setting 'clip-norm': strategy '{self.name}' starts a fresh "
                                f"adapter every round, so there is no received adapter to "
                                f"measure an update from; set clip-norm=0")
        if fed.clip_norm and fed.dp_clipping == "client" and fed.wire_dtype != "float32":
            raise SettingsError(
                f"setting 'dp-clipping': client clipping is checked by the server to 1e-4 of "
                f"clip-norm, and rounding the factors to {fed.wire_dtype} on the wire moves "
                f"them by more; use wire-dtype=float32 or dp-clipping=server")
        if fed.dp_noise_multiplier and not fed.clip_norm:
            raise SettingsError("setting 'dp-noise-multiplier': differential privacy needs a "
                                "bound on each update; set clip-norm > 0 too")
        if fed.dp_noise_multiplier and not self.linear:
            raise SettingsError(
                f"setting 'dp-noise-multiplier': strategy '{self.name}' does not merge by "
                f"averaging the factors, so the Gaussian mechanism's noise would not bound "
                f"what a client adds; use one of {names(lambda m: m.linear)}")
        self.check_defences(settings)
        if fed.secure_aggregation:
            self.check_secure_aggregation(settings)
        if fed.server_optimizer != "none" and not self.server_optimizer_ok:
            raise SettingsError(
                f"setting 'server-optimizer': {fed.server_optimizer} acts on the global factors "
                f"from round to round, which strategy '{self.name}' rebuilds every round (SVD "
                f"or stacking); use it with {names(lambda m: m.server_optimizer_ok)}")

    @classmethod
    def federates(cls, peft: str) -> bool:
        """Can this strategy federate PEFT method `peft`?"""
        return "*" in cls.peft_methods or peft in cls.peft_methods

    def check_peft(self, settings: Settings) -> None:
        """The PEFT method exists, this strategy can federate it, and its settings fit it."""
        peft = peft_method(settings.lora.peft)
        if not self.federates(peft.name):
            raise SettingsError(
                f"setting 'peft': strategy '{self.name}' merges LoRA factors and cannot "
                f"federate peft={peft.name}; use strategy "
                f"{names(lambda m: m.federates(peft.name))}, or peft=lora")
        peft.check_settings(settings)
        if settings.train.dp_sgd and not peft.dp_sgd:
            covered = ", ".join(m.name for m in PEFT_METHODS.values() if m.dp_sgd)
            raise SettingsError(
                f"setting 'dp-sgd': peft={peft.name} is not covered by record-level DP: "
                f"{peft.why_no_dp_sgd}; use peft {covered}, or dp-sgd=false")
        robust = settings.defence.robust
        if not peft.low_rank and robust in ("median", "trimmed-mean"):
            raise SettingsError(
                f"setting 'robust': {robust} re-factors a low-rank delta W, and "
                f"peft={peft.name} has no low-rank factors; use robust=krum or robust=none")

    def check_defences(self, settings: Settings) -> None:
        """The robust merge fits this method, DP and the number of replies a round needs."""
        defence, fed = settings.defence, settings.federation
        rule = defence.robust
        if rule == "none":
            return
        if rule not in self.robust_rules:
            fits = names(lambda m: rule in m.robust_rules)
            raise SettingsError(
                f"setting 'robust': {rule} does not fit strategy '{self.name}' (" + (
                    "its clients keep private factors, so there is no global delta W to "
                    "compare" if not self.robust_rules else "its global adapter is not a "
                    "re-factored delta W") + f"); use it with {fits or 'no strategy'}")
        if fed.dp_noise_multiplier:
            raise SettingsError(
                "setting 'robust': a robust merge picks clients by their data, which the DP "
                "accountant does not cover; with dp-noise-multiplier, clip-norm bounds every "
                "client: set robust=none")
        if rule != "krum" and fed.server_optimizer != "none":
            raise SettingsError(
                f"setting 'robust': {rule} re-factors the global adapter every round, so a "
                f"server optimiser ({fed.server_optimizer}) has no fixed factors to act on; "
                f"set server-optimizer=none or robust=krum")
        needed, have = defence.replies_needed(), fed.min_replies or fed.min_train_nodes
        if have < needed:
            raise SettingsError(
                f"setting 'robust-f': {rule} tolerating robust-f={defence.robust_f} hostile "
                f"clients needs at least {needed} replies per round, but a round may be merged "
                f"with {have} (min-replies, or min-train-nodes when it is 0); raise min-replies "
                f"(and min-train-nodes) to {needed} or lower robust-f")

    def check_secure_aggregation(self, settings: Settings) -> None:
        """secure-aggregation=true: the server sees only the sum, so the merge must be a
        weighted sum of what the clients send, and nothing may need one client's update."""
        fed, defence, default = settings.federation, settings.defence, DefenceSettings()
        ranks = sorted(set(settings.lora.possible_ranks()))
        why = [(bool(self.secagg_refusal), "strategy", f"strategy '{self.name}' cannot run "
                f"under it: {self.secagg_refusal}; use one of "
                f"{names(lambda m: not m.secagg_refusal)}"),
               (len(ranks) > 1 and not self.secagg_padded, "client-ranks", f"clients at "
                f"ranks {ranks} send vectors of different lengths; secure aggregation needs "
                f"one rank (set client-ranks ''), or a strategy whose sites pad their factors "
                f"to the global rank ({names(lambda m: m.secagg_padded)})"),
               *self.secagg_option_problems(settings),
               (defence.robust != "none", "robust", f"{defence.robust} compares the clients' "
                "updates with each other, and the server sees only their sum; set robust=none"),
               (fed.max_update_norm > 0, "max-update-norm", "the server cannot measure one "
                "update's norm, only the sum's; set max-update-norm=0 (secagg-clip bounds "
                "each site's contribution instead)"),
               (fed.clip_norm > 0 and fed.dp_clipping != "client", "dp-clipping", "the "
                "server never sees one update to clip; set dp-clipping=client (each site "
                "clips, and adds its share of the DP noise, before masking)"),
               (defence.client_weights == "examples" and defence.max_weight_ratio not in
                (0, default.max_weight_ratio), "max-weight-ratio", "the server never sees a "
                "site's num-examples to cap it; secagg-max-weight caps each weight instead: "
                "set max-weight-ratio=0"),
               (defence.max_update_ratio not in (0, default.max_update_ratio),
                "max-update-ratio", "the server cannot compare one update with the others; "
                "set max-update-ratio=0"),
               (defence.max_share not in (1, default.max_share), "max-share", "the server "
                "never sees one site's weight to cut its share (each weighs at most 1 under "
                "secagg-max-weight); set max-share=1")]
        for refused, key, reason in why:
            if refused:
                raise SettingsError(f"setting '{key}': secure-aggregation=true, but {reason}")

    secagg_grouped: ClassVar[bool] = False  # weight groups in the secure sum (`secagg_group`)

    def secagg_group(self, key: str) -> str:
        """The weight group of wire tensor `key` in the secure sum: tensors of a group are
        averaged over the sites that put their weight in it (one group unless the method
        averages some tensors over fewer sites: lora-moe's experts)."""
        return "all"

    def secagg_trained(self, experts: frozenset[int] | None) -> frozenset[str] | None:
        """The groups a site that trained `experts` contributes to (None: every group)."""
        return None

    def secagg_option_problems(self, settings: Settings) -> list[tuple[bool, str, str]]:
        """(refused, key, reason) of this method's own options under secure aggregation."""
        return []

    def proximal_mu(self, settings: Settings) -> float:
        """Weight of the FedProx proximal term in the clients' loss (proximal-mu)."""
        return settings.train.proximal_mu

    # ---- server: the merge --------------------------------------------------------------
    def check(self, updates: list[ClientUpdate]) -> None:
        """Raise ValueError unless this method can merge these updates."""
        check_updates(updates, self.name)
        if not self.heterogeneous:
            check_same_rank(updates, self.name)


    def merge(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
              ) -> MergeResult:
        """Check the updates once, then merge them; `previous` is the global adapter."""
        self.check(updates)
        return self.combine(updates, previous, export_rank=export_rank)

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """The merge itself, on checked updates (each method implements it)."""
        raise NotImplementedError

    def running_sum(self, rank: int) -> RunningSum | None:
        """A fold the server adds each reply into as it arrives when this method's merge is
        the mean of one (`combine_sum`), for a global adapter of `rank`; None: the merge
        needs the updates themselves."""
        return None

    def combine_sum(self, total: RunningSum, updates: list[ClientUpdate], previous: Factors,
                    *, export_rank: int) -> MergeResult:
        """The merge of `updates` from `total` (`running_sum`, the same updates folded in
        order with their weights): what `combine` returns, without reading the updates."""
        raise NotImplementedError

    def folds(self, rank: int) -> RunningSum | None:
        """`running_sum(rank)` where the class that defines `combine` also defines
        `combine_sum` (a subclass that overrides `combine` alone merges from its updates,
        never from its parent's sum); else None."""
        def owner(name: str) -> type:
            return next(c for c in type(self).__mro__ if name in c.__dict__)

        return self.running_sum(rank) if owner("combine") is owner("combine_sum") else None

    def payload(self, global_factors: Factors, rank: int) -> Factors:
        """What a client of `rank` receives: the global factors zero-padded or cut to `rank`."""
        return {m: to32(*truncate_rank(*pad_rank(b, a, rank), rank))
                for m, (b, a) in global_factors.items()}

    def keep_residual(self, residual: Factors) -> tuple[Factors, float]:
        """The residual kept for the next round, and the relative norm dropped to keep it."""
        return residual, 0.0

    def reply_rank(self, rank: int, declared: object) -> int:
        """The rank a reply of a node known at `rank` must carry (the same by default)."""
        return rank

    def shared(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The part of a PEFT state dict that crosses the wire."""
        return shared_keys(state, self.shares)

    # ---- server: what a method assigns to nodes (lora-moe's experts) ----------------------
    def trained_experts(self, partition_id: int, lora: LoraSettings,
                        metrics: Mapping[str, Any] | None = None) -> frozenset[int] | None:
        """The experts a client's update trained (lora-moe; None: all, or none to speak of),
        by its partition id or its reply's `metrics`; ValueError for a reply that does not
        say what the method needs."""
        return None

    def contributors(self, updates: list[ClientUpdate], key: str) -> int:
        """How many of the round's updates the merge averages into plain tensor `key` (all of
        them by default; lora-moe: the clients that trained that expert). DP's noise on the
        mean is z C / this."""
        return len(updates)

    def node_config(self, partition_id: int) -> dict[str, int]:
        """Entries of one node's message config beyond the round's (none by default)."""
        return {}

    def observe(self, server_round: int, updates: list[ClientUpdate], partitions: list[int],
                received: Dense) -> dict[str, Any]:
        """Look at a round's accepted updates (and their partition ids) before the merge,
        given the plain tensors the clients received; figures for metrics.jsonl ({})."""
        return {}

    def state(self) -> dict[str, Any]:
        """What the method learned during the run (JSON), for the checkpoint ({})."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what `state()` saved."""

    # ---- client steps ---------------------------------------------------------------------
    def local_training(self, model: Module, adapter: str, partition_id: int,
                       settings: Settings, config: Mapping[str, Any], examples: list[dict],
                       records: list[dict]) -> AbstractContextManager[LocalTraining]:
        """A context around a client's local training that readies the model and says how
        the training changes (`LocalTraining`; by default it does not); `config` is the
        message's config record, `examples` the client's tokenized training examples and
        `records` its training records (one per example, unless packing)."""
        return nullcontext(LocalTraining())

    def client_start(self, state: dict[str, Tensor], store: PersonalStore
                     ) -> dict[str, Tensor]:
        """The adapter a client trains from, given what it received (seeded init overlaid
        with the server's factors, PEFT scale): by default exactly that."""
        return state

    def client_finish(self, state: dict[str, Tensor], rank: int, settings: Settings,
                      store: PersonalStore) -> tuple[dict[str, Tensor], int]:
        """(state to reply with, its rank) after local training: by default unchanged."""
        return state, rank


class ResidualMethod(Method):
    """A method that folds part of each merge into the frozen base (`ResidualOptions`)."""

    uses_residual = True
    Options = ResidualOptions
    options: ResidualOptions

    def keep_residual(self, residual: Factors) -> tuple[Factors, float]:
        """The residual re-compressed by factored SVD to at most residual-rank."""
        return compress(residual, self.options.residual_rank)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` choosable as strategy `cls.name`."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    for key, (default, _) in cls.Options.keys().items():
        for other in METHODS.values():
            theirs = other.Options.keys().get(key)
            if theirs is not None and theirs[0] != default:
                raise ValueError(f"option {key!r} of {cls.name} has default {default!r}, but "
                                 f"{other.name} declares it with {theirs[0]!r}")
    METHODS[cls.name] = cls
    return cls


def names(condition: Any = None) -> str:
    """The registered method names (those meeting `condition`), comma-separated."""
    return ", ".join(n for n, m in sorted(METHODS.items()) if condition is None or condition(m))


def check_same_rank(updates: list[ClientUpdate], name: str) -> None:
    """Every client uses client 0's rank, in every module."""
    first = factor_shapes(updates[0].factors) if updates else {}
    for i, update in enumerate(updates):
        for module, (b, _) in factor_shapes(update.factors).items():
            r0 = first[module][0][1]
            if b[1] != r0:
                raise ValueError(
                    f"{name} needs equal ranks: module {module} has rank {b[1]} on "
                    f"client {i} but rank {r0} on client 0; use a rank-heterogeneous "
                    f"strategy instead ({names(lambda m: m.heterogeneous)})")
