"""One round of secure aggregation (SecAgg+) as Message API exchanges of the round loop.

1. train (MessageType.TRAIN): the global adapter as always, plus the round's secure
   aggregation settings; a node trains, keeps its quantised weighted change
   (`fedlora.secagg.vector`) and replies two public keys and a commitment to its seed.
2. share-keys (QUERY): each node gets its neighbours' public keys (`protocol.neighbours`),
   with the signatures their nodes made of them (`fedlora.secagg.signing`; b"" where a node
   signs nothing), and the threshold; it replies its Shamir shares sealed for each neighbour.
3. collect-masked (QUERY): each node gets the sealed shares addressed to it and replies its
   masked vector; the server adds the vectors up mod 2^32.
   When every survivor signed its keys (`fedlora client --auth-key`), consistency (QUERY):
   each survivor signs the set of survivors, and unmask carries those signatures; a node
   with a peers list unmasks only for the set it signed, signed by the threshold of its
   holders.
4. unmask (QUERY): each node is told which of its neighbours survived (whose masked vector
   arrived) and which dropped after sharing; it replies the matching shares. The server
   rebuilds every survivor's seed (checked against its commitment) and every dropped
   node's mask key (checked against its public key), removes the masks and dequantises.

The result is one `ClientUpdate`: what the clients received plus the weighted mean change
(sum / sum of weights), with the sum of the weights as its weight, so the method's linear
merge of it is the merge of the individual updates (up to the quantisation error). A padded
method's sites (hetlora: ranks differ) send their whole factors zero-padded to the global
rank instead, in delta-W scale, so the sum is the numerator of the zero-padded weighted mean
and the update is that mean (at the global rank). A node
that fails a stage is recorded as failed with its reason; a round whose survivors are too
few, or whose secrets cannot be rebuilt, fails as a round with too few replies does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from clients.secagg import MASKED, blob, blobs, ints
from fedlora import wire
from fedlora.aggregation import ClientUpdate
from fedlora.factors import flatten, is_factor, unflatten
from fedlora.records import factor_bytes
from fedlora.secagg import protocol
from fedlora.secagg.vector import Layout, Quantizer, bits_for
from fedlora.wire import M
from server.record import Reply, RoundRecord

if TYPE_CHECKING:
    from server.rounds import RoundLoop


@dataclass(frozen=True)
class SecAggRules:
    """The run's secure-aggregation settings (secagg-*)."""

    dropout: int = 1
    neighbours: int = 0  # 0: every other site
    clip: float = 1.0
    max_weight: int = 1000
    equal_weights: bool = False
    noised: bool = False  # distributed DP: each site's noise is sized for >= sites - dropout


class SecAggFailed(RuntimeError):
    """The round's sum cannot be unmasked (too many sites dropped, a secret does not match)."""


def record_bytes(content: RecordDict) -> int:
    """Bytes of the arrays and of the byte strings a message carries."""
    total = sum(factor_bytes(a) for a in content.array_records.values())
    for config in content.config_records.values():
        for value in config.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in items if isinstance(v, bytes))
    return total


@dataclass
class Site:
    """What the server holds of one site this round."""

    node: int
    c_key: bytes
    s_key: bytes
    commitment: bytes
    row: dict[str, Any]
    signer: bytes = b""  # the public key that signed c_key and s_key (b"": unsigned)
    signature: bytes = b""
    sealed: dict[int, bytes] = field(default_factory=dict)  # holder -> share sealed for it
    masked: np.ndarray | None = None
    experts: frozenset[int] | None = None  # lora-moe: the experts it says it trained


def group_means(layout: Layout, total: np.ndarray, sites: int, slack: float
                ) -> tuple[dict[str, torch.Tensor], float]:
    """(each tensor's weighted mean over the sites that put their weight in its group, the
    weights' sum of the group every site is in) from the dequantised sum of `sites`
    vectors; a group nobody trained (lora-moe's expert) has a mean of 0. `slack`: the
    rounding of the weights. A weight sum outside [0, sites] means a site did not quantise
    as the protocol says: SecAggFailed."""
    change, weights = layout.split(total)
    for group, summed in weights.items():
        if not -slack <= summed <= sites + slack:
            raise SecAggFailed(f"the weights of {group} sum to {summed:g}, expected a number in "
                               f"[0, {sites}] (each site weighs at most 1): a site sent a "
                               f"vector it did not quantise as the protocol says")
    weight = max(weights.values())
    if not weight > slack:
        raise SecAggFailed(f"the weights sum to {weight:g}: no site put its weight in the sum")
    groups = layout.key_groups()
    mean = {}
    for key, value in change.items():
        summed = weights[groups[key]]
        mean[key] = torch.from_numpy(value / summed if summed > slack else value * 0).float()
    return mean, weight


class SecureRound:
    """One attempt at a round under secure aggregation, driven through `loop`'s exchanges."""

    def __init__(self, loop: RoundLoop, rules: SecAggRules, grid: Grid, server_round: int,
                 record: RoundRecord) -> None:
        self.loop, self.rules, self.grid = loop, rules, grid
        self.round, self.record = server_round, record
        self.up: dict[int, int] = {}  # node -> bytes received from it this round

    def run(self, nodes: list[int], ranks: dict[int, int]) -> ClientUpdate:
        """The round's aggregate update; the contributing sites become the record's replies,
        the rest its failures. SecAggFailed when the sum cannot be unmasked."""
        method = self.loop.method
        padded = method.secagg_padded  # hetlora: whole factors at the global rank
        rank = self.loop.state.rank if padded else ranks[nodes[0]] if nodes else 0
        shared = method.shared(self.loop.state.payload(rank))
        if padded:  # delta-W scale factors (every site pads to the global rank), dense changes
            shared = {**self.loop.state.dense, **flatten(self.loop.state.factors)}
        layout = Layout.of({k: tuple(v.shape) for k, v in shared.items()},
                           method.secagg_group if method.secagg_grouped else None)
        quantizer = Quantizer(self.rules.clip, bits_for(max(len(nodes), 1)), len(layout.groups))
        sites = self.train(nodes, ranks, rank if padded else None)
        graph = self.share_keys(sites)
        total = self.collect_masked(sites, graph, layout.size)
        survivors = [s for s in sites.values() if s.masked is not None]  # in the sum
        survived = sorted(s.node for s in survivors)
        signed = self.consistency(sites, survived)
        plain = self.unmask(sites, graph, total, survived, signed)
        if self.rules.noised and len(survivors) < len(nodes) - self.rules.dropout:
            raise SecAggFailed(f"{len(survivors)} of {len(nodes)} sampled sites are in the sum; "
                               f"each site's DP noise was sized for at least {len(nodes)} - "
                               f"secagg-dropout={self.rules.dropout}, so the sum carries less "
                               f"noise than dp-noise-multiplier promises")
        for site in survivors:
            site.row[M.BYTES_UP] = self.up.get(site.node, 0)
        self.warn_alone(survivors)
        mean, weight = group_means(layout, quantizer.dequantize(plain), len(survivors),
                                   len(survivors) / quantizer.levels)
        if padded:  # the weighted mean of the padded factors; the dense tensors' change
            dense = {k: v + mean[k].to(v.dtype) for k, v in self.loop.state.dense.items()}
            update = ClientUpdate(unflatten({k: v for k, v in mean.items() if is_factor(k)}),
                                  weight, dense)
        else:
            state = {k: v + mean[k].to(v.dtype) for k, v in shared.items()}
            update = self.loop.state.to_update(state, rank, weight)
        self.record.replies = [Reply(update, s.row) for s in survivors]
        log(INFO, "round %d: secure sum of %d sites (weights sum to %.4g)", self.round,
            len(survivors), weight)
        return update

    # ---- stages -------------------------------------------------------------------------------
    def exchange(self, messages: dict[int, RecordDict], stage: str) -> dict[int, Message]:
        """Send each node its content; the replies that are not errors (the others, and
        the silent nodes, are recorded as failures of `stage`)."""
        out = [Message(c, dst_node_id=n, message_type=MessageType.QUERY)
               for n, c in messages.items()]
        for node, content in messages.items():
            self.record.bytes_down[node] = self.record.bytes_down.get(node, 0) + \
                record_bytes(content)
        got: dict[int, Message] = {}
        answered = set()
        for node, reply in self.loop.exchange(self.grid, out):
            answered.add(node)
            if reply.has_error():
                self.loop.failed(self.record, node, f"secure aggregation, {stage}: "
                                                    f"{reply.error.reason}")
                continue
            self.up[node] = self.up.get(node, 0) + record_bytes(reply.content)
            got[node] = reply
        for node in sorted(set(messages) - answered):
            self.loop.failed(self.record, node, f"secure aggregation, {stage}: no reply "
                                                f"within round-timeout="
                                                f"{self.loop.rules.timeout:g} s")
        return got

    def config(self, stage: str, **values: Any) -> ConfigRecord:
        return ConfigRecord({wire.SECAGG_STAGE: stage, wire.SERVER_ROUND: self.round,
                             **values})

    def train(self, nodes: list[int], ranks: dict[int, int], padded_rank: int | None = None
              ) -> dict[int, Site]:
        """Stage 1: training; the sites whose reply carries two curve points and a commitment
        (with `padded_rank`, each site lays its whole factors out at that rank)."""
        padding = {} if padded_rank is None else {wire.SECAGG_RANK: padded_rank}
        extra = {wire.SECAGG: self.config(
            "train", **{wire.SECAGG_SITES: len(nodes), wire.SECAGG_CLIP: self.rules.clip,
                        wire.SECAGG_MAX_WEIGHT: self.rules.max_weight,
                        wire.SECAGG_EQUAL: self.rules.equal_weights,
                        wire.SECAGG_DROPOUT: self.rules.dropout, **padding})}
        replies, self.record.bytes_down = self.loop.send(self.grid, nodes, ranks, self.round,
                                                         MessageType.TRAIN, extra)
        sites: dict[int, Site] = {}
        for node, msg in replies:
            problem, site = self.read_train(node, msg)
            if problem is not None:
                self.loop.failed(self.record, node, problem, dropped=not msg.has_error())
                continue
            assert site is not None
            self.up[node] = record_bytes(msg.content)
            sites[node] = site
        for node in sorted(set(nodes) - {n for n, _ in replies}):
            self.loop.failed(self.record, node, f"no reply within round-timeout="
                                                f"{self.loop.rules.timeout:g} s")
        return sites

    def read_train(self, node: int, msg: Message) -> tuple[str | None, Site | None]:
        """(why the training reply is dropped, None) or (None, the site)."""
        if msg.has_error():
            return str(msg.error.reason), None
        keys = msg.content.config_records.get(wire.SECAGG)
        metrics: Any = next(iter(msg.content.metric_records.values()), None)
        if keys is None or metrics is None or msg.content.array_records:
            return ("secure aggregation: expected public keys and metrics, and no arrays (a "
                    "node sending its factors in the clear is dropped)"), None
        try:
            c_key, s_key = blob(keys, wire.SECAGG_C_KEY), blob(keys, wire.SECAGG_S_KEY)
            protocol.load_public(c_key), protocol.load_public(s_key)
            commitment = blob(keys, wire.SECAGG_COMMITMENT)
            signed = (blob(keys, wire.SECAGG_SIGNER), blob(keys, wire.SECAGG_SIGNATURE)) \
                if wire.SECAGG_SIGNER in keys else (b"", b"")
        except ValueError as err:
            return f"secure aggregation: unreadable public keys ({err})", None
        from server.rounds import said_fields  # (server.rounds imports this module)

        rank = self.loop.known(node).rank
        if metrics.get(wire.LORA_RANK) != rank:
            return f"declared rank {metrics.get(wire.LORA_RANK)!r}, but this node's rank is " \
                   f"{rank}", None
        row: dict[str, Any] = {
            M.NODE_ID: node, M.PARTITION_ID: int(metrics.get(wire.PARTITION_ID, -1)),
            M.LORA_RANK: rank,
            M.NUM_EXAMPLES: 1,  # hidden in the secure sum: train-loss is a plain mean
            **said_fields(metrics),
            wire.SECAGG_CLIPPED: int(metrics.get(wire.SECAGG_CLIPPED, 0))}
        if (name := self.loop.label(node)) is not None:
            row[M.NODE_NAME] = name
        experts = None
        if self.loop.method.secagg_grouped:  # by its assignment, or the list its reply gives
            try:
                experts = self.loop.method.trained_experts(
                    self.loop.partition(node, row[M.PARTITION_ID]), self.loop.state.lora,
                    metrics)
            except ValueError as err:
                return str(err), None
        return None, Site(node, c_key, s_key, commitment, row, *signed, experts=experts)

    def share_keys(self, sites: dict[int, Site]) -> dict[int, list[int]]:
        """Stage 2: the neighbour graph over the trained sites; each site's sealed shares."""
        self.enough(sites, "trained")
        graph = protocol.neighbours(list(sites), self.rules.neighbours)
        messages = {}
        for node, peers in graph.items():
            t = protocol.threshold(len(peers) + 1, self.rules.dropout)
            messages[node] = RecordDict({wire.SECAGG: self.config(
                "share-keys", **{wire.SECAGG_NODES: peers, wire.SECAGG_THRESHOLD: t,
                                 wire.SECAGG_C_KEY: [sites[p].c_key for p in peers],
                                 wire.SECAGG_S_KEY: [sites[p].s_key for p in peers],
                                 wire.SECAGG_SIGNER: [sites[p].signer for p in peers],
                                 wire.SECAGG_SIGNATURE: [sites[p].signature for p in peers]})})
        for node, reply in self.exchange(messages, "share-keys").items():
            answer = reply.content.config_records.get(wire.SECAGG) or ConfigRecord()
            try:
                targets = ints(answer, wire.SECAGG_NODES)
                sealed = blobs(answer, wire.SECAGG_SEALED)
            except ValueError:
                targets, sealed = [], []
            if sorted(targets) != graph[node] or len(sealed) != len(targets):
                self.loop.failed(self.record, node, "secure aggregation, share-keys: expected "
                                 f"one sealed share for each neighbour {graph[node]}",
                                 dropped=True)
                continue
            sites[node].sealed = dict(zip(targets, sealed))
        for node in [n for n, s in sites.items() if not s.sealed]:
            del sites[node]  # never shared: its neighbours leave it out of their masks
        return graph

    def collect_masked(self, sites: dict[int, Site], graph: dict[int, list[int]],
                       size: int) -> np.ndarray:
        """Stage 3: each site gets the shares sealed for it; the sum of the masked vectors."""
        self.enough(sites, "shared their keys")
        messages = {}
        for node in sites:
            senders = [p for p in graph[node] if p in sites]
            messages[node] = RecordDict({wire.SECAGG: self.config(
                "collect-masked", **{wire.SECAGG_NODES: senders,
                                     wire.SECAGG_SEALED: [sites[p].sealed[node]
                                                          for p in senders]})})
        total = np.zeros(size, dtype=np.uint32)
        for node, reply in self.exchange(messages, "collect-masked").items():
            record = reply.content.array_records.get(MASKED)
            y = record[MASKED].numpy() if record is not None and MASKED in record else None
            if y is None or y.dtype != np.uint32 or y.shape != (size,):
                self.loop.failed(self.record, node, "secure aggregation, collect-masked: "
                                 f"expected a uint32 vector of {size} entries", dropped=True)
                continue
            sites[node].masked = y
            total += y
        return total

    def consistency(self, sites: dict[int, Site], survived: list[int]
                    ) -> dict[int, bytes] | None:
        """Stage 3b, when every survivor (`survived`: the sites whose masked vector arrived,
        sorted) signed its keys: each survivor signs the set of survivors (one set for all:
        Bell et al.'s consistency check); their signatures (None: a site signs nothing, and
        the stage is skipped)."""
        if not survived or not all(sites[n].signer for n in survived):
            return None
        messages = {n: RecordDict({wire.SECAGG: self.config(
            "consistency", **{wire.SECAGG_SURVIVORS: survived})}) for n in survived}
        signatures = {}
        for node, reply in self.exchange(messages, "consistency").items():
            answer = reply.content.config_records.get(wire.SECAGG) or ConfigRecord()
            signature = answer.get(wire.SECAGG_SIGNATURE)
            if isinstance(signature, bytes):
                signatures[node] = signature
        return signatures

    def unmask(self, sites: dict[int, Site], graph: dict[int, list[int]], total: np.ndarray,
               survived: list[int], signed: dict[int, bytes] | None = None) -> np.ndarray:
        """Stage 4: the shares that rebuild the survivors' seeds (`survived`, sorted) and the
        dropped sites' mask keys (with `signed`, each site also gets the survivors'
        signatures of their set); the sum of the survivors' quantised vectors."""
        self.enough(survived, "sent their masked vectors")
        alive = set(survived)
        dropped = set(sites) - alive
        proof = {} if signed is None else {
            wire.SECAGG_SIGNED: survived,
            wire.SECAGG_SIGNATURE: [signed.get(n, b"") for n in survived]}
        messages = {n: RecordDict({wire.SECAGG: self.config("unmask", **{
            wire.SECAGG_SURVIVORS: [p for p in [*graph[n], n] if p in alive],
            wire.SECAGG_DROPPED: [p for p in graph[n] if p in dropped], **proof})})
            for n in survived}
        seeds: dict[int, list[bytes]] = {n: [] for n in survived}
        keys: dict[int, list[bytes]] = {n: [] for n in dropped}
        for node, reply in self.exchange(messages, "unmask").items():
            answer = reply.content.config_records.get(wire.SECAGG) or ConfigRecord()
            for kind, shares, into in (
                    (wire.SECAGG_SURVIVORS, wire.SECAGG_SEED_SHARES, seeds),
                    (wire.SECAGG_DROPPED, wire.SECAGG_KEY_SHARES, keys)):
                try:
                    pairs = list(zip(ints(answer, kind), blobs(answer, shares), strict=True))
                except ValueError as err:
                    self.loop.failed(self.record, node, f"secure aggregation, unmask: {err}",
                                     dropped=True)
                    break
                for about, share in dict(pairs).items():  # one share per node it holds
                    if about in into and about in [*graph[node], node]:
                        into[about].append(share)
        rebuilt = {n: self.rebuild(n, s, len(graph[n]) + 1, "seed") for n, s in seeds.items()}
        lost = {n: self.rebuild(n, k, len(graph[n]) + 1, "key") for n, k in keys.items()
                if any(p in alive for p in graph[n])}
        for node, secret in rebuilt.items():
            if protocol.commitment(secret) != sites[node].commitment:
                raise SecAggFailed(f"the seed rebuilt for node {node} does not match its "
                                   f"commitment: a share was forged")
        for node, secret in lost.items():
            try:
                public = protocol.public_bytes(protocol.load_private(secret))
            except ValueError:
                public = b""
            if public != sites[node].s_key:
                raise SecAggFailed(f"the mask key rebuilt for node {node} does not match its "
                                   f"public key: a share was forged")
        if lost:
            log(INFO, "round %d: secure aggregation recovered the masks of %d dropped "
                "site(s)", self.round, len(lost))
        return protocol.unmask(total, rebuilt, lost, {n: s.s_key for n, s in sites.items()},
                               {n: [p for p in graph[n] if p in sites] for n in lost})

    # ---- helpers ------------------------------------------------------------------------------
    def warn_alone(self, survivors: list[Site]) -> None:
        """lora-moe: an expert in the sum of one site is that site's update; say so."""
        trainers: dict[int, list[int]] = {}
        for site in survivors:
            for expert in site.experts or ():
                trainers.setdefault(expert, []).append(site.node)
        for expert, nodes in sorted(trainers.items()):
            if len(nodes) == 1:
                log(WARNING, "round %d: expert %d was trained by one site only (%s): its "
                    "secure sum is that site's update, which the server now reads", self.round,
                    expert, self.loop.who(nodes[0]))

    def rebuild(self, node: int, shares: list[bytes], holders: int, what: str) -> bytes:
        t = protocol.threshold(holders, self.rules.dropout)
        if len(shares) < t:
            raise SecAggFailed(f"{len(shares)} shares of node {node}'s {what} arrived, {t} "
                               f"are needed: more than secagg-dropout={self.rules.dropout} "
                               f"of its neighbours dropped")
        try:
            return protocol.rebuild(shares, t)
        except ValueError as err:
            raise SecAggFailed(f"node {node}'s {what} cannot be rebuilt: {err}") from None

    def enough(self, nodes: Any, what: str) -> None:
        needed = self.loop.rules.replies_needed
        if len(nodes) < needed:
            raise SecAggFailed(f"{len(nodes)} sites {what}, fewer than min-replies={needed}")

