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
  pick it. The server merges a reply by the partition id its node declared when first
  asked (a reply that claims another cannot reach another client's expert).
- `field` (for experiments in simulation): each value of the records' field `moe-field`
  (`task`) owns an expert, value i of the sorted values over the whole `dataset` expert i mod
  E; each training example uses its value's expert (one of its top k), and a client trains
  the experts of its records' values and the router, the others frozen. Its reply lists
  them (`moe-experts`), and the merge takes that list: which expert a record trains is its
  client's data, so a list it could make true by its data anyway gives it nothing new.
- `cluster` (as FedLEASE): up to round `moe-cluster-round` (1) every client trains every
  expert; after that round's replies the server clusters the clients by the cosine similarity
  of their updates (what each changed in all its tensors) into min(E, clients) groups, by
  average linkage, and group g owns expert g (groups numbered by their smallest partition id).
  From then on each node is told its expert in its messages (`moe-expert`) and trains it as in
  `client`; the clusters are in metrics.jsonl (`moe-clusters`) and in the checkpoint. A client
  first seen later trains every expert.
The merge takes each update's `experts` (None: all), whatever assigns them.

Differential privacy (clip-norm, dp-noise-multiplier): each client's update (its experts and
router together) is clipped to C; the merge is then a mean per tensor with equal weights, and
a tensor averaged over m_t clients gets N(0, (z C / m_t)^2) (the router and, with `learned`,
every expert: m_t = all clients; with `client`, an expert: its owners). `cluster` is refused
with DP, since the clustering reads the raw updates.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import Module

from fedlora.adapters.lora_moe import expert_of, force_expert, moe_options
from fedlora.aggregation.base import (
    ClientUpdate,
    Dense,
    Factors,
    MergeResult,
    normalised_weights,
    weighted_sum,
)
from fedlora.config import SettingsError, one_of, require
from fedlora.methods.base import LocalTraining, Method, MethodOptions, option, register

if TYPE_CHECKING:
    from fedlora.config import LoraSettings, Settings

ASSIGNMENTS = ("learned", "client", "cluster", "field")


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


def cosine_clusters(vectors: list[Tensor], k: int) -> list[int]:
    """Labels 0..k-1 of `vectors`: average-linkage agglomerative clustering by cosine distance,
    merging the two closest groups until k remain; groups are numbered in the order of their
    first member (deterministic)."""
    if not 1 <= k <= len(vectors):
        raise ValueError(f"expected 1 <= k <= {len(vectors)} (the vectors), got k={k}")
    unit = torch.stack([v.double().flatten() / v.double().norm().clamp_min(1e-30)
                        for v in vectors])
    distance = 1.0 - unit @ unit.T  # (n, n)
    groups = [[i] for i in range(len(vectors))]
    while len(groups) > k:
        pairs = ((float(distance[a][:, b].mean()), i, j) for i, a in enumerate(groups)
                 for j, b in enumerate(groups) if i < j)
        _, i, j = min(pairs)
        groups[i] = sorted(groups[i] + groups.pop(j))
    labels = [0] * len(vectors)
    for label, group in enumerate(sorted(groups)):
        for member in group:
            labels[member] = label
    return labels


EXPERT = "moe-expert"  # moe-assign=field: an example's expert, beside its tokens
# what lora-moe adds to the messages and to metrics.jsonl
NODE_EXPERT = "moe-expert"  # moe-assign=cluster: the expert a node trains (its message config)
REPLY_EXPERTS = "moe-experts"  # moe-assign=field: the experts a reply trained (its metrics)
CLUSTERS = "moe-clusters"  # moe-assign=cluster: partition id -> expert (metrics, checkpoint)
_FIELD_VALUES: dict[tuple, list[str]] = {}  # the last dataset's sorted values of a field


def field_values(settings: Settings, field: str) -> list[str]:
    """The sorted distinct values of `field` over the whole `dataset` (kept for the next
    call): value i owns expert i mod E, the same on every client."""
    from fedlora.data import load_records, source_version

    data, seed = settings.data, settings.federation.seed
    if data.data_path:
        raise ValueError(f"moe-assign=field gives each value of '{field}' over the run's whole "
                         f"dataset an expert, so every client must draw its records from "
                         f"`dataset`; this node reads its own data-path={data.data_path!r}: use "
                         f"moe-assign=client or cluster on nodes with their own data")
    key = (source_version(data.dataset), data.dataset_size, seed, repr(data.field_map),
           data.data_split, data.roles_map, field)
    if key not in _FIELD_VALUES:
        records = load_records(data.dataset, data.dataset_size, seed, data.field_mapping(),
                               data.data_split, data.roles_mapping())
        missing = next((r for r in records if field not in r), None)
        if missing is not None:
            raise ValueError(f"setting 'moe-field': moe-assign=field reads field {field!r}, but "
                             f"a record of {data.dataset} has only the fields {sorted(missing)}")
        _FIELD_VALUES.clear()
        _FIELD_VALUES[key] = sorted({str(r[field]) for r in records})
    return _FIELD_VALUES[key]


def record_experts(records: list[dict], field: str, settings: Settings) -> list[int]:
    """Each record's expert: the index of its `field` value among the dataset's sorted
    values, modulo moe-experts."""
    index = {v: i % moe_options(settings.lora).experts for i, v in enumerate(field_values(settings,
                                                                                 field))}
    return [index[str(r[field])] for r in records]


@dataclass(frozen=True)
class MoeOptions(MethodOptions):
    """lora-moe's own settings."""

    assign: str = option(
        "moe-assign", "learned",
        "lora-moe: which experts a client trains: learned (every client every expert; the "
        "router decides), client (client p owns expert p mod moe-experts, by partition id) "
        "cluster (clients clustered by their updates after moe-cluster-round; each cluster "
        "owns an expert) or field (each value of the records' moe-field owns an expert; "
        "simulation).")
    field: str = option(
        "moe-field", "task",
        "lora-moe with moe-assign=field: the record field whose values own the experts.")
    cluster_round: int = option(
        "moe-cluster-round", 1,
        "lora-moe with moe-assign=cluster: the round whose updates the clients are clustered "
        "by (every client trains every expert until then).")

    def __post_init__(self) -> None:
        one_of("moe-assign", self.assign, ASSIGNMENTS)
        require(self.cluster_round >= 1, "moe-cluster-round", "an integer >= 1",
                self.cluster_round)
        require(bool(self.field.strip()), "moe-field", "a record field name", self.field)


@register
class LoraMoe(Method):
    """Each expert averaged over its trainers, the router over all."""

    name = "lora-moe"
    summary = ("LoRA + mixture of experts (peft=lora-moe): each expert averaged over the "
               "clients that trained it, the router over all")
    linear = True  # a weighted mean of what the clients sent: DP's noise bounds each client
    exactness_defined = False  # no low-rank global delta W: the experts are plain tensors
    secagg_refusal = ""
    secagg_grouped = True  # each expert over its trainers: a weight group per expert
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
        if self.options.assign == "field" and settings.data.packing:
            raise SettingsError(
                "setting 'packing': moe-assign=field routes each example to the expert of its "
                "record's field value, and packing puts several records in one example; set "
                "packing=false")
        route = moe_options(settings.lora).route
        if self.options.assign == "learned" and route:
            raise SettingsError(
                f"setting 'moe-route': the routing loss teaches the router the expert each "
                f"example belongs to, and with moe-assign=learned no example belongs to one, "
                f"got moe-route={route}; set moe-assign=client, field or cluster, or "
                f"moe-route=0")
        if self.options.assign == "cluster" and settings.federation.dp_noise_multiplier:
            raise SettingsError(
                "setting 'moe-assign': cluster groups the clients by their raw updates, a use "
                "of their data that the DP accountant does not cover (and that decides which "
                "expert each one trains); with dp-noise-multiplier use moe-assign=learned or "
                "client")
        super().check_settings(settings)

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.clusters: dict[int, int] = {}  # cluster: partition id -> the expert it owns

    def secagg_group(self, key: str) -> str:
        """Under secure aggregation each expert is a weight group (its trainers' weights sum
        in it), the routers and shared experts another (every site)."""
        expert = expert_of(key)
        return "shared" if expert is None else f"expert-{expert}"

    def secagg_trained(self, experts: frozenset[int] | None) -> frozenset[str] | None:
        return None if experts is None else frozenset(
            {"shared", *(f"expert-{e}" for e in experts)})

    def secagg_option_problems(self, settings: Settings) -> list[tuple[bool, str, str]]:
        """cluster reads each site's update; per-expert DP noise would need each expert's
        trainer count before masking."""
        return [(self.options.assign == "cluster", "moe-assign", "moe-assign=cluster groups "
                 "the sites by their own updates, which the server never sees; use "
                 "moe-assign=learned, client or field"),
                (settings.federation.dp_noise_multiplier > 0, "dp-noise-multiplier",
                 "lora-moe's DP noise is sized by each expert's trainers, which a site would "
                 "have to know before masking; not supported yet: set dp-noise-multiplier=0")]

    def owned_expert(self, partition_id: int, lora: LoraSettings,
                     config: Mapping[str, Any] | None = None) -> int | None:
        """The expert a client owns: by its partition id (client), as the server assigned it
        (cluster: its clusters on the server, the message's `moe-expert` on a node); None
        when it trains every expert."""
        if self.options.assign == "cluster":
            if config is not None:
                expert = config.get(NODE_EXPERT)
                return expert if isinstance(expert, int) else None
            return self.clusters.get(partition_id)
        if self.options.assign != "client":
            return None
        if partition_id < 0:
            raise ValueError("moe-assign=client needs each client's partition id (simulation, "
                             "or fedlora client --partition-id)")
        return partition_id % moe_options(lora).experts

    def trained_experts(self, partition_id: int, lora: LoraSettings,
                        metrics: Mapping[str, Any] | None = None) -> frozenset[int] | None:
        """The one expert the client owns; field: the experts its reply lists; None (all)
        when it owns none."""
        if self.options.assign == "field":
            listed, experts = (metrics or {}).get(REPLY_EXPERTS), moe_options(lora).experts
            if not (isinstance(listed, list) and listed and all(
                    isinstance(e, int) and 0 <= e < experts for e in listed)):
                raise ValueError(f"moe-assign=field: expected '{REPLY_EXPERTS}', the experts "
                                 f"the reply trained (integers in 0..{experts - 1}), "
                                 f"got {listed!r}")
            return frozenset(listed)
        expert = self.owned_expert(partition_id, lora)
        return None if expert is None else frozenset({expert})

    def contributors(self, updates: list[ClientUpdate], key: str) -> int:
        """The clients that trained `key` (its expert, or the router: all)."""
        return sum(trained(u, key) for u in updates)

    def node_config(self, partition_id: int) -> dict[str, int]:
        """cluster: the node's expert, once the clients are clustered."""
        expert = self.clusters.get(partition_id)
        return {} if expert is None else {NODE_EXPERT: expert}

    def observe(self, server_round: int, updates: list[ClientUpdate], partitions: list[int],
                received: Dense) -> dict[str, Any]:
        """cluster: at moe-cluster-round, the clients clustered by their updates (what each
        changed: its tensors minus the received ones, all flattened into one vector)."""
        if self.options.assign != "cluster" or server_round != self.options.cluster_round:
            return {}
        experts = len({expert_of(k) for k in received} - {None})
        moved = [torch.cat([(u.dense[k].double() - received[k].double()).flatten()
                            for k in sorted(received)]) for u in updates]
        labels = cosine_clusters(moved, min(experts, len(moved)))
        self.clusters = dict(zip(partitions, labels))
        return {CLUSTERS: {str(p): e for p, e in sorted(self.clusters.items())}}

    def state(self) -> dict[str, Any]:
        return {CLUSTERS: {str(p): e for p, e in self.clusters.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.clusters = {int(p): int(e) for p, e in state.get(CLUSTERS, {}).items()}

    @contextmanager
    def local_training(self, model: Module, adapter: str, partition_id: int,
                       settings: Settings, config: Mapping[str, Any], examples: list[dict],
                       records: list[dict]) -> Iterator[LocalTraining]:
        """A client that owns an expert: every token uses it while training, and only it and
        the router train; field: each example its value's expert, the experts of the
        client's values and the router train; otherwise nothing changes."""
        if self.options.assign == "field":
            experts = record_experts(records, self.options.field, settings)
            owned = frozenset(experts)
            tagged = [{**x, EXPERT: e} for x, e in zip(examples, experts, strict=True)]
            try:
                yield LocalTraining(
                    keep=lambda name: parameter_expert(name, adapter) in (None, *owned),
                    examples=tagged, metrics={REPLY_EXPERTS: sorted(owned)},
                    on_batch=lambda batch: force_expert(
                        model, adapter, torch.tensor([x[EXPERT] for x in batch])))
            finally:
                force_expert(model, adapter, None)
            return
        expert = self.owned_expert(partition_id, settings.lora, config)
        if expert is None:
            yield LocalTraining()
            return
        force_expert(model, adapter, expert)
        try:
            yield LocalTraining(keep=lambda name: parameter_expert(name, adapter) in (None, expert))
        finally:
            force_expert(model, adapter, None)

    def combine(self, updates: list[ClientUpdate], previous: Factors, *, export_rank: int
                ) -> MergeResult:
        """The experts and routers of the round (see the module's formulas)."""
        return MergeResult(global_factors={}, residual={}, applied={},
                           info={"weights": normalised_weights(updates)},
                           dense=average_experts(updates))
