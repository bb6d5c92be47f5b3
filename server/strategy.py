"""LoraStrategy: Flower's FedAvg round loop, with the merge delegated to fedlora.aggregation.

Flower runs the rounds; this class only routes messages: it counts the bytes of factors each
way, drops replies that fail validation (with the reason), converts the rest to
`ClientUpdate`s for the pure merge function, and writes one metrics line per round.
"""

from __future__ import annotations


import math
import time
from logging import INFO, WARNING
from typing import Iterable

import torch
from flwr.common import log
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.adapters import join_factors, split_factors
from fedlora.aggregation import ClientUpdate, Merge
from fedlora.outputs import RunWriter
from fedlora.records import factor_bytes, from_array_record, to_array_record
from fedlora.validation import reply_problem




def weighted_mean(values: list[float], weights: list[float]) -> float:
    """sum w_i v_i / sum w_i (nan when there is nothing to average)."""
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else math.nan


class LoraStrategy(FedAvg):
    """Round loop of FedAvg; merge, validation and accounting are fedlora's."""

    def __init__(self, merge: Merge, expected: dict[str, tuple[int, ...]], wire_dtype: str,
                 writer: RunWriter, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.merge = merge
        self.expected = expected  # wire key -> shape of every acceptable reply
        self.wire_dtype = wire_dtype
        self.writer = writer
        self.round_log: dict = {}
        self.total_bytes = 0

    # ---- training --------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample clients (FedAvg) and note what is sent to each."""
        started = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.round_log = {"round": server_round, "started": started,
                          "bytes-down-per-client": factor_bytes(arrays),
                          "clients-sampled": len(messages)}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, merge the accepted ones with the pure merge function."""
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        failures = [{"node-id": m.metadata.src_node_id, "reason": m.error.reason} for m in errors]
        updates, clients = [], []
        for msg in valid:
            problem, update, info = self._read_reply(msg)
            if problem:
                log(WARNING, "round %d: dropped reply from node %d: %s", server_round,
                            msg.metadata.src_node_id, problem)
                failures.append({"node-id": msg.metadata.src_node_id, "reason": problem})
                continue
            updates.append(update)
            clients.append(info)
        down = self.round_log["bytes-down-per-client"]
        for info in clients:
            info["bytes-down"] = down
        self.round_log.update({
            "clients-replied": len(clients), "clients-failed": len(failures),
            "failures": failures, "clients": clients,
            "bytes-down": down * self.round_log["clients-sampled"],
            "bytes-up": sum(c["bytes-up"] for c in clients),
            "train-loss": weighted_mean([c["train-loss"] for c in clients],
                                        [c["num-examples"] for c in clients])})
        if not updates:
            log(WARNING, "round %d: no valid reply; the global adapter is unchanged", server_round)
            return None, None
        merged = join_factors(self.merge(updates))
        metrics = MetricRecord({"train-loss": self.round_log["train-loss"],
                                "clients-replied": len(clients)})
        return to_array_record(merged, self.wire_dtype), metrics

    def _read_reply(self, msg: Message) -> tuple[str | None, ClientUpdate | None, dict]:
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
        num_examples = metrics.get("num-examples")
        problem = reply_problem(state, self.expected, num_examples)
        if problem:
            return problem, None, {}
        info = {"node-id": msg.metadata.src_node_id,
                "partition-id": int(metrics.get("partition-id", -1)),
                "num-examples": num_examples, "bytes-up": factor_bytes(record),
                "train-loss": float(metrics.get("train-loss", math.nan))}
        factors = split_factors({k: v.to(torch.float32) for k, v in state.items()})
        return None, ClientUpdate(factors, float(num_examples)), info

    # ---- evaluation ------------------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Token-weighted mean eval loss over the clients that evaluated."""
        valid, errors = self._check_and_log_replies(replies, is_train=False, validate=False)
        rows = [next(iter(m.content.metric_records.values())) for m in valid]
        rows = [r for r in rows if r.get("eval-tokens", 0) > 0]
        loss = weighted_mean([float(r["eval-loss"]) for r in rows],
                             [float(r["eval-tokens"]) for r in rows])
        self.round_log.update({"eval-loss": loss,
                               "eval-perplexity": math.exp(min(loss, 50.0)) if rows else math.nan,
                               "eval-clients": len(rows), "eval-failed": len(errors)})
        return MetricRecord({"eval-loss": loss}) if rows else None

    # ---- end of round (passed to strategy.start as evaluate_fn) ----------------------------
    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Write rounds/<n>/ and the metrics line; round 0 (before training) writes nothing."""
        if server_round == 0:
            return None
        entry = {k: v for k, v in self.round_log.items() if k != "started"}
        entry["seconds"] = time.perf_counter() - self.round_log["started"]
        self.total_bytes += entry.get("bytes-down", 0) + entry.get("bytes-up", 0)
        entry["bytes-total"] = self.total_bytes
        entry = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in entry.items()}
        state = {k: v.to(torch.float32) for k, v in from_array_record(arrays).items()}
        self.writer.write_round(server_round, state, entry)
        log(INFO, "round %d: train-loss %s eval-loss %s, %d replied, %d failed, %.1f MB up, "
                 "%.1f MB down, %.1f s", server_round, _fmt(entry.get("train-loss")),
                 _fmt(entry.get("eval-loss")), entry.get("clients-replied", 0),
                 entry.get("clients-failed", 0), entry.get("bytes-up", 0) / 1e6,
                 entry.get("bytes-down", 0) / 1e6, entry["seconds"])
        return None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
