"""LoraStrategy: Flower's FedAvg round loop, routing messages to the pure merge in fedlora.

Flower runs the rounds and samples the nodes; this class only routes: it learns each node's
LoRA rank (one `query` message the first time a node is sampled), sends every node the global
adapter at that node's own rank (plus the frozen residual for flora/fedex-lora), counts the
bytes each way, drops replies that fail validation (with the reason), hands the rest to
`GlobalAdapter.update` (which calls the strategy's pure merge) and writes one metrics line per
round.
"""

from __future__ import annotations

import math
import random
import time
from logging import ERROR, INFO, WARNING
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.adapters import shared_keys
from fedlora.aggregation import ClientUpdate
from fedlora.aggregation.linalg import product_norm
from fedlora.aggregation.privacy import factor_distance
from fedlora.outputs import RunWriter
from fedlora.records import factor_bytes, from_array_record, to_array_record
from fedlora.train.accuracy import Accuracy
from fedlora.validation import expected_shapes, reply_problem
from server.checkpoint import Checkpoint, write_checkpoint
from server.global_adapter import GlobalAdapter
from server.privacy import PrivacyLedger


class RoundFailed(RuntimeError):
    """A round got too few valid replies, also after its retries."""


def update_norm(update: ClientUpdate) -> float:
    """||delta W||_F of a client's update over all modules (from the factors' Gram matrices)."""
    return math.sqrt(sum(product_norm(b, a) ** 2 for b, a in update.factors.values()))


def weighted_mean(values: list[float], weights: list[float]) -> float:
    """sum w_i v_i / sum w_i (nan when there is nothing to average)."""
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else math.nan


class LoraStrategy(FedAvg):
    """Round loop of FedAvg; payloads, validation, merge and accounting are fedlora's."""

    def __init__(self, state: GlobalAdapter, shapes: dict[str, tuple[int, int]],
                 wire_dtype: str, writer: RunWriter, seed: int, timeout: float,
                 rank_pruning: bool = False, max_examples: int = 10_000_000,
                 max_update_norm: float = 0.0, min_replies: int = 0,
                 round_failure: str = "retry", round_retries: int = 2,
                 client_clipping: bool = False, ledger: PrivacyLedger | None = None,
                 evaluator=None, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.evaluator = evaluator  # server-side evaluation (server.server_eval), or None
        self.min_replies = min_replies or self.min_train_nodes
        self.round_failure = round_failure  # "retry" or "stop"
        self.round_retries = round_retries
        self.client_clipping = client_clipping  # nodes clip; replies above clip-norm dropped
        self.ledger = ledger  # client-level DP accounting, or None
        self.waited_for_all = False  # the first round of a process waits for every node
        self.max_examples = max_examples
        self.max_update_norm = max_update_norm  # 0 = no bound
        self.rank_pruning = rank_pruning  # hetlora: nodes may reply at a smaller rank
        self.state = state
        self.shapes = shapes  # module -> (d, k) of every adapted layer
        self.wire_dtype = wire_dtype
        self.writer = writer
        self.seed = seed
        self.timeout = timeout
        self.node_ranks: dict[int, int] = {}
        self.round_log: dict = {}
        self.total_bytes = 0

    # ---- ranks and payloads ------------------------------------------------------------------
    def learn_ranks(self, node_ids: list[int], grid: Grid) -> list[dict]:
        """Ask nodes not seen before for their LoRA rank; returns failures (node, reason)."""
        unknown = [n for n in node_ids if n not in self.node_ranks]
        if not unknown:
            return []
        asks = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in unknown]
        failures = []
        for reply in grid.send_and_receive(asks, timeout=self.timeout):
            node, rank = reply.metadata.src_node_id, None
            if not reply.has_error():
                rank = next(iter(reply.content.metric_records.values())).get("lora-rank")
            if isinstance(rank, int) and 1 <= rank <= self.state.rank:
                self.node_ranks[node] = rank
            else:
                reason = reply.error.reason if reply.has_error() else (
                    f"declared LoRA rank {rank!r}, expected an integer in 1..{self.state.rank} "
                    f"(the global rank; raise export-rank to allow more)")
                failures.append({"node-id": node, "reason": reason})
        answered = set(self.node_ranks)
        failures += [{"node-id": n, "reason": "no answer to the rank query"}
                     for n in unknown if n not in answered and
                     n not in {f["node-id"] for f in failures}]
        return failures

    def content_for(self, rank: int, server_round: int, config: ConfigRecord) -> RecordDict:
        """The RecordDict a node of `rank` receives: adapter, residual and config."""
        fresh = self.state.strategy.fresh_adapter
        cfg = ConfigRecord({**dict(config), "server-round": server_round, "rank": rank,
                            "init-seed": self.seed + (server_round if fresh else 0)})
        payload = shared_keys(self.state.payload(rank), self.state.strategy.shares)
        content = {"arrays": to_array_record(payload, self.wire_dtype), "config": cfg}
        if self.state.residual:
            content["residual"] = to_array_record(self.state.residual_state(), "float32")
        return RecordDict(content)

    def messages(self, node_ids: list[int], ranks: dict[int, int], server_round: int,
                 config: ConfigRecord, message_type: str) -> tuple[list[Message], dict[int, int]]:
        """One message per node with the payload for its rank (built once per rank, shared
        like FedAvg shares its RecordDict), and the bytes of factors each node receives."""
        contents = {r: self.content_for(r, server_round, config)
                    for r in {ranks[n] for n in node_ids}}
        size = {r: sum(factor_bytes(a) for a in c.array_records.values())
                for r, c in contents.items()}
        out = [Message(contents[ranks[n]], dst_node_id=n, message_type=message_type)
               for n in node_ids]
        return out, {n: size[ranks[n]] for n in node_ids}

    # ---- sampling ----------------------------------------------------------------------------
    def sample(self, grid: Grid, server_round: int, fraction: float, minimum: int) -> list[int]:
        """Nodes for one phase, drawn with a seeded RNG (the same round draws the same nodes
        from the same node set, also after a resume). The first round this server runs waits
        until min-available-nodes are connected; later rounds only for `minimum`, so a node
        that died does not stall the run, and one that reconnects is drawn again."""
        wait_for = max(minimum, self.min_available_nodes if not self.waited_for_all else 0)
        while len(nodes := sorted(grid.get_node_ids())) < wait_for:
            log(INFO, "round %d: waiting for nodes to connect: %d of %d", server_round,
                len(nodes), wait_for)
            time.sleep(1)
        self.waited_for_all = True
        size = min(len(nodes), max(minimum, int(len(nodes) * fraction)))
        rng = random.Random(self.seed * 1_000_003 + server_round)
        return sorted(rng.sample(nodes, size))

    # ---- training ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes, learn new nodes' ranks, send each its own payload."""
        started = time.perf_counter()
        sampled = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        failures = self.learn_ranks(sampled, grid)
        ready = [n for n in sampled if n in self.node_ranks]
        messages, down = self.messages(ready, self.node_ranks, server_round, config,
                                       MessageType.TRAIN)
        self.round_log = {"round": server_round, "started": started, "down": down,
                          "clients-sampled": len(sampled), "failures": failures}
        log(INFO, "round %d: sent training to %d nodes (ranks %s)", server_round, len(ready),
            ",".join(str(self.node_ranks[n]) for n in ready))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, merge the accepted ones with the strategy's pure merge."""
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        failures = self.round_log["failures"]
        failures += [{"node-id": m.metadata.src_node_id, "reason": m.error.reason}
                     for m in errors]
        updates, clients = [], []
        for msg in valid:
            problem, update, info = self.read_reply(msg)
            if problem:
                log(WARNING, "round %d: dropped reply from node %d: %s", server_round,
                    msg.metadata.src_node_id, problem)
                failures.append({"node-id": msg.metadata.src_node_id, "reason": problem})
                continue
            updates.append(update)
            clients.append(info)
        down = self.round_log.pop("down", {})
        self.round_log.update({
            "clients-replied": len(clients), "clients-failed": len(failures), "clients": clients,
            "bytes-down": sum(down.values()), "bytes-up": sum(c["bytes-up"] for c in clients),
            "bytes-down-per-client": round(sum(down.values()) / max(len(down), 1)),
            "train-loss": weighted_mean([c["train-loss"] for c in clients],
                                        [c["num-examples"] for c in clients])})
        for info in clients:
            info["bytes-down"] = down.get(info["node-id"], 0)
        if len(updates) < self.min_replies:
            log(WARNING, "round %d: %d valid replies, fewer than min-replies=%d; the round is "
                "not merged", server_round, len(updates), self.min_replies)
            return None, None
        self.round_log.update(self.state.update(updates, server_round))
        if self.ledger is not None:
            self.ledger.record()
            self.round_log.update({"dp-epsilon": self.ledger.epsilon(),
                                   "dp-delta": self.ledger.delta,
                                   "dp-noise-multiplier": self.ledger.noise_multiplier})
        state, _ = self.state.export()
        metrics = MetricRecord({"train-loss": self.round_log["train-loss"],
                                "clients-replied": len(clients)})
        return to_array_record(state, "float32"), metrics

    def read_reply(self, msg: Message) -> tuple[str | None, ClientUpdate | None, dict]:
        """(problem, update, per-client info) for one reply."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "expected one ArrayRecord and one MetricRecord", None, {}
        record = next(iter(content.array_records.values()))
        metrics = next(iter(content.metric_records.values()))
        try:
            state = from_array_record(record)
        except Exception as err:  # malformed arrays: drop, never crash the round
            return f"unreadable arrays ({err})", None, {}
        node = msg.metadata.src_node_id
        rank, declared = self.node_ranks.get(node), metrics.get("lora-rank")
        if rank is None:
            return f"node {node} was never asked for its rank (not sampled this round)", None, {}
        if self.rank_pruning and isinstance(declared, int) and 1 <= declared < rank:
            rank = declared  # HetLoRA self-pruning: a node may only shrink its rank
        expected = expected_shapes(self.shapes, rank, self.state.strategy.shares)
        problem = reply_problem(state, expected, metrics.get("num-examples"), self.max_examples)
        if problem is None and declared != rank:
            problem = f"declared rank {declared!r}, but this node's rank is {rank}"
        if problem:
            return problem, None, {}
        num_examples = int(metrics["num-examples"])
        update = self.state.to_update(state, rank, float(num_examples))
        norm = update_norm(update)
        if self.max_update_norm and norm > self.max_update_norm:
            return (f"update norm ||delta W||_F = {norm:.4g} is above max-update-norm="
                    f"{self.max_update_norm:g}"), None, {}
        if self.client_clipping:
            moved = factor_distance(update.factors, self.state.received(rank))
            if moved > self.state.clip_norm * (1 + 1e-4):
                return (f"dp-clipping=client, but the update's norm {moved:.6g} is above "
                        f"clip-norm={self.state.clip_norm:g}: the node did not clip"), None, {}
        self.node_ranks[node] = rank
        info = {"node-id": node, "partition-id": int(metrics.get("partition-id", -1)),
                "lora-rank": rank, "num-examples": num_examples,
                "bytes-up": factor_bytes(record),
                "train-loss": float(metrics.get("train-loss", math.nan))}
        return None, update, info

    # ---- evaluation --------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The global adapter (at the global rank) to each sampled node; fedsa-lora nodes get
        the shared A at their own rank and evaluate it with their personal B."""
        if self.fraction_evaluate == 0:
            return []
        sampled = self.sample(grid, server_round, self.fraction_evaluate,
                              self.min_evaluate_nodes)
        if self.state.strategy.shares == "A":
            self.round_log.setdefault("failures", []).extend(self.learn_ranks(sampled, grid))
            ranks = self.node_ranks
        else:
            ranks = {n: self.state.rank for n in sampled}
        ready = [n for n in sampled if n in ranks]
        messages, down = self.messages(ready, ranks, server_round, config, MessageType.EVALUATE)
        self.round_log["bytes-down-eval"] = sum(down.values())
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Token-weighted mean eval loss over the clients that evaluated; exact-match
        accuracy pooled over their answers (overall, per family, and per client)."""
        valid, errors = self._check_and_log_replies(replies, is_train=False, validate=False)
        rows = [next(iter(m.content.metric_records.values())) for m in valid]
        rows = [r for r in rows if r.get("eval-tokens", 0) > 0]
        loss = weighted_mean([float(r["eval-loss"]) for r in rows],
                             [float(r["eval-tokens"]) for r in rows])
        self.round_log.update({"eval-loss": loss,
                               "eval-perplexity": math.exp(min(loss, 50.0)) if rows else math.nan,
                               "eval-clients": len(rows), "eval-failed": len(errors)})
        pooled, per_client = Accuracy(), {}
        for row in rows:
            counts = Accuracy.from_counts(dict(row))
            if counts.total:
                pooled = pooled.merge(counts)
                per_client[str(int(row.get("partition-id", -1)))] = counts.overall
        if pooled.total:
            self.round_log.update(pooled.metrics())
            self.round_log["client-accuracy"] = per_client
        return MetricRecord({"eval-loss": loss}) if rows else None

    # ---- the round loop ----------------------------------------------------------------------
    def run(self, grid: Grid, first_round: int, num_rounds: int) -> None:
        """Rounds first_round..num_rounds: train and merge (a round with fewer than
        min-replies valid replies is retried or stops the run), evaluate, write the round."""
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %d/%d]", server_round, num_rounds)
            failed_attempts = []
            for attempt in range(1 + (self.round_retries if self.round_failure == "retry" else 0)):
                messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
                replies = grid.send_and_receive(messages, timeout=self.timeout)
                merged, _ = self.aggregate_train(server_round, replies)
                if merged is not None:
                    break
                failed_attempts.append({"attempt": attempt + 1,
                                        "replied": self.round_log["clients-replied"],
                                        "failures": self.round_log["failures"]})
            else:
                self.fail(server_round, failed_attempts)
            self.round_log["failed-attempts"] = failed_attempts
            messages = self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)
            if messages:
                self.aggregate_evaluate(server_round,
                                        grid.send_and_receive(messages, timeout=self.timeout))
            if self.evaluator is not None:
                self.round_log.update(self.evaluator(*self.state.export()))
            self.end_of_round(server_round)

    def fail(self, server_round: int, attempts: list[dict]) -> None:
        """Log why the run stops and raise RoundFailed."""
        last = attempts[-1]
        reasons = "; ".join(f"node {f['node-id']}: {f['reason']}" for f in last["failures"][:5])
        message = (f"round {server_round}: {last['replied']} valid replies, fewer than "
                   f"min-replies={self.min_replies}, in {len(attempts)} attempt(s) "
                   f"(round-failure={self.round_failure}); stopping. Failures: "
                   f"{reasons or 'none reported'}. Rounds up to {server_round - 1} are saved; "
                   f"continue with --resume once enough nodes are back")
        log(ERROR, "%s", message)
        raise RoundFailed(message)

    # ---- checkpoint and resume ---------------------------------------------------------------
    def checkpoint(self, server_round: int) -> Checkpoint:
        """Everything the server needs to continue after `server_round`."""
        meta = {"node-ranks": {str(n): r for n, r in self.node_ranks.items()},
                "bytes-total": self.total_bytes,
                "dp-releases": self.ledger.releases if self.ledger else 0}
        return Checkpoint(round=server_round, tensors=self.state.tensors(), meta=meta)

    def resume(self, checkpoint: Checkpoint) -> None:
        """Restore the state `checkpoint()` saved."""
        self.state.restore(checkpoint.tensors)
        self.node_ranks = {int(n): int(r) for n, r in checkpoint.meta["node-ranks"].items()}
        self.total_bytes = int(checkpoint.meta["bytes-total"])
        if self.ledger is not None:
            self.ledger.record(int(checkpoint.meta.get("dp-releases", 0)))

    # ---- end of round ------------------------------------------------------------------------
    def end_of_round(self, server_round: int) -> None:
        """Write rounds/<n>/, the metrics line, then the round's checkpoint."""
        entry = {k: v for k, v in self.round_log.items() if k != "started"}
        entry["seconds"] = time.perf_counter() - self.round_log["started"]
        self.total_bytes += entry.get("bytes-down", 0) + entry.get("bytes-up", 0)
        entry["bytes-total"] = self.total_bytes
        entry = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in entry.items()}
        state, rank = self.state.export()
        self.writer.write_round(server_round, state, entry, rank)
        write_checkpoint(self.writer.out_dir, self.checkpoint(server_round))
        log(INFO, "round %d: train-loss %s eval-loss %s exactness %s, %d replied, %d failed, "
            "%.2f MB up, %.2f MB down, %.1f s", server_round, _fmt(entry.get("train-loss")),
            _fmt(entry.get("eval-loss")), _fmt(entry.get("exactness")),
            entry.get("clients-replied", 0), entry.get("clients-failed", 0),
            entry.get("bytes-up", 0) / 1e6, entry.get("bytes-down", 0) / 1e6, entry["seconds"])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
