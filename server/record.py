"""What the round loop keeps: one record per node it has heard from, and per round attempt
the accepted replies and everything else the round learnt (`RoundRecord.line()`: its
metrics.jsonl line). No Flower here."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fedlora.aggregation import ClientUpdate
from fedlora.wire import M


@dataclass
class Node:
    """What the server knows of one node: its id, LoRA rank, name and declared partition."""

    node_id: int
    rank: int | None = None  # None until it declares a valid rank
    name: str | None = None  # what a `fedlora client` node calls itself
    partition: int | None = None  # the partition id it declared when first asked


@dataclass
class Reply:
    """One accepted training reply: the update for the merge and its per-client row, and
    the figures the screens and the exactness estimate need, computed once, as it arrived
    (its factors may be on disk after that: `server.spill`)."""

    update: ClientUpdate
    row: dict[str, Any]
    moved: float = math.nan  # GlobalAdapter.moved: its change of delta W (or A)
    distance: float = math.nan  # GlobalAdapter.distance: its change of the factors
    groups: dict[str, float] = field(default_factory=dict)  # lora-moe: per expert
    sketch: tuple[Tensor, Tensor] | None = None  # exactness.sketch_sides of its factors


@dataclass
class RoundRecord:
    """What one attempt at a round learnt; `line()` is its metrics.jsonl line."""

    round: int
    started: float = field(default_factory=time.perf_counter)
    sampled: int = 0
    failures: list[dict] = field(default_factory=list)  # {node-id, reason}
    train_failures: int = 0  # failures of the training phase (evaluation may add more)
    bytes_down: dict[int, int] = field(default_factory=dict)  # node -> factor bytes sent
    replies: list[Reply] = field(default_factory=list)
    merge: dict[str, Any] = field(default_factory=dict)  # the merge's figures (exactness, ...)
    screen: dict[str, Any] = field(default_factory=dict)  # update-norm-median, weight-cap, ...
    down_weighted: list[dict] = field(default_factory=list)  # {node-id, node-name, reason}
    privacy: dict[str, Any] = field(default_factory=dict)  # dp-epsilon, ...
    failed_attempts: list[dict] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval-loss, accuracy, ...
    eval_failures: list[dict] = field(default_factory=list)  # {node-id, node-name, reason}
    server_eval: dict[str, Any] = field(default_factory=dict)

    def fail(self, node: int, reason: str, name: str | None = None) -> None:
        self.failures.append(named(node, reason, name))

    def eval_fail(self, node: int, reason: str, name: str | None = None) -> None:
        self.eval_failures.append(named(node, reason, name))

    def attempt_summary(self, attempt: int) -> dict:
        return {"attempt": attempt, "replied": len(self.replies), M.FAILURES: self.failures}

    def initial_line(self, bytes_before: int) -> dict[str, Any]:
        """The metrics.jsonl line of round 0: evaluation only (no training, nothing merged)."""
        return nulls({M.ROUND: self.round, M.FAILURES: self.failures, **self.evaluation,
                      **self.server_eval, M.EVAL_FAILURES: self.eval_failures,
                      M.SECONDS: time.perf_counter() - self.started,
                      M.BYTES_TOTAL: bytes_before})

    def line(self, bytes_before: int) -> dict[str, Any]:
        """The metrics.jsonl line (NaN written as null)."""
        rows = [r.row for r in self.replies]
        for row in rows:
            row[M.BYTES_DOWN] = self.bytes_down.get(row[M.NODE_ID], 0)
        down, up = sum(self.bytes_down.values()), sum(r[M.BYTES_UP] for r in rows)
        entry: dict[str, Any] = {
            M.ROUND: self.round, M.CLIENTS_SAMPLED: self.sampled, M.FAILURES: self.failures,
            M.CLIENTS_REPLIED: len(rows), M.CLIENTS_FAILED: self.train_failures, M.CLIENTS: rows,
            M.BYTES_DOWN: down, M.BYTES_UP: up,
            M.BYTES_DOWN_PER_CLIENT: round(down / max(len(self.bytes_down), 1)),
            M.TRAIN_LOSS: weighted_mean([r[M.TRAIN_LOSS] for r in rows],
                                        [r[M.NUM_EXAMPLES] for r in rows]),
            **self.screen, M.DOWN_WEIGHTED: self.down_weighted,
            **self.merge, **self.privacy, M.FAILED_ATTEMPTS: self.failed_attempts,
            **self.evaluation, **self.server_eval, M.EVAL_FAILURES: self.eval_failures,
            M.SECONDS: time.perf_counter() - self.started,
            M.BYTES_TOTAL: bytes_before + down + up}
        return nulls(entry)


def nulls(entry: dict[str, Any]) -> dict[str, Any]:
    """A metrics line with NaN written as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in entry.items()}


def named(node: int, reason: str, name: str | None) -> dict[str, Any]:
    """A failures / down-weighted entry: the node, its name when it gave one, the reason."""
    entry: dict[str, Any] = {M.NODE_ID: node, "reason": reason}
    if name is not None:
        entry[M.NODE_NAME] = name
    return entry


def weighted_mean(values: list[float], weights: list[float]) -> float:
    """sum w_i v_i / sum w_i (nan when there is nothing to average)."""
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else math.nan


def nodes_meta(nodes: dict[int, Node]) -> dict[str, dict[str, Any]]:
    """The nodes as a checkpoint keeps them: node-ranks, node-names and node-partitions."""
    return {"node-ranks": {str(n): v.rank for n, v in nodes.items() if v.rank is not None},
            "node-names": {str(n): v.name for n, v in nodes.items() if v.name is not None},
            "node-partitions": {str(n): v.partition for n, v in nodes.items()
                                if v.partition is not None}}


def nodes_of(meta: dict[str, Any]) -> dict[int, Node]:
    """The nodes `nodes_meta` saved (a checkpoint older than names and partitions has none)."""
    nodes: dict[int, Node] = {}
    for n, rank in meta["node-ranks"].items():
        nodes.setdefault(int(n), Node(int(n))).rank = int(rank)
    for n, name in meta.get("node-names", {}).items():
        nodes.setdefault(int(n), Node(int(n))).name = str(name)
    for n, pid in meta.get("node-partitions", {}).items():
        nodes.setdefault(int(n), Node(int(n))).partition = int(pid)
    return nodes
