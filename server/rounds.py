"""The server's round loop, top to bottom, over Flower's Grid.

One round: sample nodes, ask new nodes their LoRA rank, send each node the global adapter at
its rank, read and validate the replies, screen them (`server.defences`: update norm, weight
cap, Krum), merge the accepted ones (`GlobalAdapter.update`, which clips, calls the method's
pure merge and adds the DP noise), evaluate, record the metrics line, checkpoint. A round with
fewer than `min-replies` valid replies is retried (`round-failure=retry`, up to
`round-retries` times) or stops the run with `RoundFailed`. With secure-aggregation=true the
training phase is SecAgg+'s exchanges (`server.secagg`) and the merge gets only the unmasked
sum, so the screens and Krum, which need each update, do not run. Everything a round learns goes
into its `RoundRecord` (`server.record`, with the `Node` the loop keeps for each node), which
becomes the metrics.jsonl line.

Flower's own strategies are not used: their loop sends one RecordDict to every node, and
fedlora's nodes need one per rank, validation before the merge and a typed record per round.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedlora import wire
from fedlora.aggregation import ClientUpdate, Factors
from fedlora.aggregation.base import RunningSum, dense_distance
from fedlora.aggregation.exactness import EXACT_BUDGET, exact_cost, sketch_sides
from fedlora.aggregation.linalg import product_norm
from fedlora.checkpoint import Checkpoint, write_checkpoint
from fedlora.outputs import RunWriter
from fedlora.records import factor_bytes, from_array_record, to_array_record
from fedlora.runtime import pacing
from fedlora.seeds import derive_seed
from fedlora.tracking import Tracker, checked_steps
from fedlora.train.accuracy import Accuracy, first_per_family, samples_of
from fedlora.train.progress import Ticker, run_eta
from fedlora.validation import expected_shapes, reply_problem
from fedlora.wire import M
from server import defences
from server.global_adapter import GlobalAdapter
from server.privacy import PrivacyLedger
from server.record import Node, Reply, RoundRecord, named, nodes_meta, nodes_of, weighted_mean
from server.replies import per_message_pulls, pull_replies
from server.secagg import SecAggFailed, SecAggRules, SecureRound
from server.spill import RoundSpill

SERVER_NODE = 0  # the node id an evaluation failure of the server's own (server-eval) names
SPILL_DIR = ".spill"  # under output-dir: the replies of the round being read (server.spill)


class RoundFailed(RuntimeError):
    """A round got too few valid replies, also after its retries."""


@dataclass
class Rules:
    """How the loop samples, waits, accepts replies and handles failing rounds."""

    seed: int = 0
    timeout: float = 3600.0  # seconds to wait for the replies of one phase
    wire_dtype: str = "float32"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2  # the first round of a process waits for this many nodes
    min_replies: int = 0  # valid replies a round needs (0 = min_train_nodes)
    round_failure: str = "retry"  # or "stop"
    round_retries: int = 2
    max_examples: int = 10_000_000
    max_update_norm: float = 0.0  # 0 = no bound
    client_clipping: bool = False  # nodes clip; a reply above clip-norm is dropped
    max_update_ratio: float = 10.0  # drop updates above this x the round's lower median (0 off)
    max_weight_ratio: float = 10.0  # cap weights at this x the lower median weight (0 off)
    max_share: float = 1.0  # no reply's share of a merge above this (1 off)
    equal_weights: bool = False  # client-weights=equal: every accepted reply weighs 1
    initial_eval: bool = True  # evaluate the global model before round 1 (round 0)
    # a round's replies go to disk as they arrive when more than this many MiB are expected
    # (0: always; -1: never): the server's memory then does not grow with the sites
    spill_above_mb: float = 1024.0
    secagg: SecAggRules | None = None  # secure-aggregation=true: the server sees only sums

    @property
    def replies_needed(self) -> int:
        return self.min_replies or self.min_train_nodes

    @property
    def attempts(self) -> int:
        return 1 + (self.round_retries if self.round_failure == "retry" else 0)


def update_norm(update: ClientUpdate, received_dense: dict) -> float:
    """||delta W||_F of a client's update over all modules (from the factors' Gram matrices),
    and for plain tensors (a PEFT method without factors) their change from what the client
    received."""
    return math.sqrt(sum(product_norm(b, a) ** 2 for b, a in update.factors.values())
                     + dense_distance(update.dense, received_dense) ** 2)


def number(metrics: Any, key: str) -> float:
    """A reply's metric as a float; NaN when it is missing or not a single number."""
    value = metrics.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else math.nan


def said_fields(metrics: Any) -> dict[str, Any]:
    """What a node says of its own training, for its reply row with or without secure
    aggregation (one place, so neither path drops a figure): train loss, its throughput
    figures, steps (`step_fields`) and, under record-level DP, the epsilon it has spent so
    far in this run. Never used for the merge."""
    said = {M.TRAIN_LOSS: number(metrics, wire.TRAIN_LOSS),
            M.TRAIN_TOKENS: number(metrics, wire.TRAIN_TOKENS),
            M.TRAIN_SECONDS: number(metrics, wire.TRAIN_SECONDS), **step_fields(metrics)}
    if wire.DP_SGD_EPSILON in metrics:
        said[M.DP_SGD_EPSILON] = number(metrics, wire.DP_SGD_EPSILON)
    return said


def step_fields(metrics: Any) -> dict[str, Any]:
    """A reply row's train-steps and per-step loss (`fedlora.tracking.checked_steps`): what a
    node reported, or nothing where it reported none or something malformed (the figures are
    for the trackers and the report; the merge never reads them)."""
    steps = metrics.get(wire.TRAIN_STEPS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        return {}
    checked = checked_steps(metrics.get(wire.TRAIN_LOSS_AT), metrics.get(wire.TRAIN_LOSS_STEPS),
                            steps)
    if checked is None:
        return {M.TRAIN_STEPS: steps}
    return {M.TRAIN_STEPS: steps, M.TRAIN_LOSS_AT: checked[0], M.TRAIN_LOSS_STEPS: checked[1]}


def metrics_of(msg: Message) -> Any:
    """The one MetricRecord of a reply (KeyError-free: None when there is none)."""
    return next(iter(msg.content.metric_records.values()), None)


class RoundLoop:
    """The federation as the server runs it: state, node ranks, the rules, the output."""

    def __init__(self, state: GlobalAdapter, shapes: dict[str, tuple[int, int]],
                 rules: Rules, writer: RunWriter, ledger: PrivacyLedger | None = None,
                 evaluator: Callable[[dict, int], dict] | None = None) -> None:
        self.state = state
        self.method = state.method
        self.shapes = shapes  # module -> (d, k) of every adapted layer
        self.rules = rules
        self.writer = writer
        self.ledger = ledger  # client-level DP accounting, or None
        self.evaluator = evaluator  # server-side evaluation (server.server_eval), or None
        self.nodes: dict[int, Node] = {}  # every node heard from: rank, name, partition
        self.keys: dict[int, str] = {}  # node ID -> the name of the key it registered with
        self.total_bytes = 0
        self.waited_for_all = False  # the first round of a process waits for every node
        self.spill: RoundSpill | None = None  # where this attempt's replies go (or None)
        self.sketching = False  # this attempt sketches each reply for the exactness estimate
        # this attempt's replies folded as they arrive (the method's `running_sum`), or None
        self.fold: RunningSum | None = None
        self.folded: list[Reply] = []  # the replies in `fold`, in the order folded
        self.tracker = Tracker()  # the experiment trackers each metrics line goes to (none)

    # ==== the loop ============================================================================
    def run(self, grid: Grid, first_round: int, num_rounds: int) -> None:
        """Rounds first_round..num_rounds: train and merge (retried or stopped when too few
        valid replies arrive), evaluate, write the round and its checkpoint. A run that starts
        at round 1 first evaluates the global model before training (round 0)."""
        started, durations = time.perf_counter(), []
        if first_round == 1 and self.rules.initial_eval:
            self.evaluate_initial(grid)
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %d/%d]", server_round, num_rounds)
            began = time.perf_counter()
            record = self.train_round(grid, server_round)
            self.evaluate_global(grid, server_round, record)
            self.finish(server_round, record)
            durations.append(time.perf_counter() - began)
            log(INFO, "%s", run_eta(server_round, num_rounds, time.perf_counter() - started,
                                    durations))

    def evaluate_global(self, grid: Grid, server_round: int, record: RoundRecord) -> None:
        """The global model on the nodes (fraction-evaluate) and on the server (server-eval)."""
        if self.rules.fraction_evaluate > 0:
            self.evaluate(grid, server_round, record)
        if self.evaluator is not None:
            try:
                record.server_eval = self.evaluator(*self.state.export())
            except Exception as err:  # a named failure of the round, never the end of the run
                log(WARNING, "round %d: the server's evaluation (server-eval) failed: %s: %s",
                    server_round, type(err).__name__, err)
                record.eval_fail(SERVER_NODE, f"{type(err).__name__}: {err}", "server")

    def evaluate_initial(self, grid: Grid) -> None:
        """Round 0: the global model before any training (the base model: B is zero) evaluated
        as every later round is; its metrics line is what the federated rounds compare with."""
        if self.rules.fraction_evaluate <= 0 and self.evaluator is None:
            return
        log(INFO, "")
        log(INFO, "[ROUND 0] the global model before training")
        record = RoundRecord(0)
        self.evaluate_global(grid, 0, record)
        entry = record.initial_line(self.total_bytes)
        self.writer.write_metrics(entry)
        self.tracker.log_line(entry)
        log(INFO, "round 0 (before training): eval-loss %s accuracy %s, %d evaluated, %.1f s",
            _fmt(entry.get(M.EVAL_LOSS)), _fmt(entry.get(M.ACCURACY)),
            entry.get(M.EVAL_CLIENTS, 0), entry[M.SECONDS])
        log_preference(0, entry)

    def train_round(self, grid: Grid, server_round: int) -> RoundRecord:
        """One training phase and its merge, attempted until enough valid replies arrive."""
        failed: list[dict] = []
        for attempt in range(1, self.rules.attempts + 1):
            record = self.attempt(grid, server_round, attempt, failed)
            if record is not None:
                return record
        raise self.stop(server_round, failed)

    def attempt(self, grid: Grid, server_round: int, attempt: int, failed: list[dict]
                ) -> RoundRecord | None:
        """One attempt at a round: train, read each reply as it arrives, screen, merge. The
        merged round's record, or None after adding why it failed to `failed`. Replies
        spilled to disk this attempt are removed at its end, whatever happens."""
        record = RoundRecord(server_round)
        nodes = self.sample(grid, server_round, self.rules.fraction_train,
                            self.rules.min_train_nodes)
        record.sampled = len(nodes)
        self.learn_ranks(grid, nodes, record)
        ranks = self.ranks()
        ready = [n for n in nodes if n in ranks]
        log(INFO, "round %d: sent training to %d nodes (ranks %s)", server_round, len(ready),
            ",".join(str(ranks[n]) for n in ready))
        secure: ClientUpdate | None = None  # the unmasked sum (secure aggregation)
        try:
            if self.rules.secagg is not None:
                try:
                    secure = SecureRound(self, self.rules.secagg, grid, server_round,
                                         record).run(ready, ranks)
                except SecAggFailed as err:  # as a round with too few replies: retried
                    log(WARNING, "round %d: secure aggregation failed: %s", server_round, err)
                    failed.append({**record.attempt_summary(attempt), "secagg-error": str(err)})
                    return None
                screening = time.perf_counter()
            else:
                replies, record.bytes_down = self.send_streaming(grid, ready, ranks,
                                                                 server_round, MessageType.TRAIN)
                self.prepare(record, {n: ranks[n] for n in ready})
                replied = set()
                for node, msg in replies:  # each read (and maybe spilled) before the next
                    replied.add(node)
                    self.read_train_reply(node, msg, record)
                    del msg
                for node in sorted(set(ready) - replied):
                    self.failed(record, node, f"no reply within round-timeout="
                                              f"{self.rules.timeout:g} s")
                screening = time.perf_counter()
                self.screen(record)
            record.train_failures = len(record.failures)
            if len(record.replies) < self.rules.replies_needed:
                log(WARNING, "round %d: %d valid replies, fewer than min-replies=%d; the round "
                    "is not merged", server_round, len(record.replies),
                    self.rules.replies_needed)
                failed.append(record.attempt_summary(attempt))
                return None
            updates = [secure] if secure is not None else [r.update for r in record.replies]
            seen = self.method.observe(  # before the merge: against what was received
                server_round, updates,
                [int(r.row[M.PARTITION_ID]) for r in record.replies], self.state.dense)
            try:
                self.merge(server_round, record, secure)
            except (defences.MergeFailed, torch.linalg.LinAlgError) as err:
                # the global adapter is unchanged: the attempt fails, it never ends the run
                log(WARNING, "round %d: the merge failed, nothing was merged: %s",
                    server_round, err)
                failed.append({**record.attempt_summary(attempt), "merge-error": str(err)})
                return None
            log(INFO, "round %d: merged %d updates in %.1f s (screens and merge)",
                server_round, len(updates), time.perf_counter() - screening)
            record.merge.update(seen)
            for key, value in seen.items():  # e.g. lora-moe's clusters: partition -> expert
                log(INFO, "round %d: %s %s", server_round, key, value)
            record.merge[M.MERGE_SECONDS] = time.perf_counter() - screening
            record.failed_attempts = failed
            return record
        finally:
            self.release()

    # ---- a round's replies as they arrive -----------------------------------------------------
    def prepare(self, record: RoundRecord, ranks: dict[int, int]) -> None:
        """Before a round's replies are read (`ranks`: each node's): whether the exactness
        figure will be estimated (then each reply is sketched as it arrives), whether each
        reply is folded into the method's running sum as it arrives (a merge that is its
        mean, with no clipping or robust rule in between), and whether replies go to disk
        (the replies expected exceed spill-above-mb: each the size of what was sent to its
        node, or of a float32 adapter at its rank where nothing was, as flora's fresh
        adapters)."""
        self.sketching = (self.method.exactness_defined and bool(self.shapes) and
                          exact_cost(self.shapes, list(ranks.values()), self.state.rank)
                          > EXACT_BUDGET)
        robust = self.state.robust
        if not (self.state.clip_norm or robust.krum or robust.replaces_merge):
            self.fold, self.folded = self.method.folds(self.state.rank), []
        per_rank = 4 * sum(d + k for d, k in self.shapes.values())  # float32 bytes a rank
        expected = sum(record.bytes_down.get(n) or per_rank * r for n, r in ranks.items())
        if self.rules.spill_above_mb >= 0 and expected > self.rules.spill_above_mb * 2**20:
            parent = None if self.writer is None else Path(self.writer.out_dir) / SPILL_DIR
            self.spill = RoundSpill(parent, record.round)
            log(INFO, "round %d: replies of about %.0f MB expected, above spill-above-mb=%g: "
                "each goes to %s as it arrives", record.round, expected / 1e6,
                self.rules.spill_above_mb, self.spill.dir)

    def keep(self, reply: Reply) -> None:
        """An accepted reply's screen figures (and sketch), computed once as it arrives, and
        the reply folded into the round's running sum with the weight it claims (the merge
        uses the sum when the screens keep every folded reply at that weight; otherwise it
        reads the kept replies again); then its factors go to disk when this round spills
        (`server.spill`)."""
        reply.moved, reply.distance, norms = self.state.figures(reply.update)
        if norms is not None:  # hetlora's norm weights, measured with the figures
            reply.update = replace(reply.update, norms=norms)
        update = reply.update
        reply.groups = self.state.group_changes(update)
        if self.sketching:
            reply.sketch = sketch_sides(update.factors)
        if self.fold is not None:
            self.fold.add(update, 1.0 if self.rules.equal_weights else update.weight)
            self.folded.append(reply)
        if self.spill is not None and update.factors:
            # a read-only Mapping, not a dict: the merges only read factors module by module
            reply.update = replace(update, factors=cast(Factors, self.spill.keep(update.factors)))

    def release(self) -> None:
        """Forget this attempt's spill folder (removing it), sketching decision and fold."""
        if self.spill is not None:
            self.spill.close()
            parent = self.spill.dir.parent
            if parent.name == SPILL_DIR and not any(parent.iterdir()):
                parent.rmdir()
        self.spill, self.sketching, self.fold, self.folded = None, False, None, []

    def screen(self, record: RoundRecord) -> None:
        """The round's default defences (`server.defences`): drop a reply whose update is far
        larger than the others' (max-update-ratio), then cut a weight far above the others'
        (max-weight-ratio). Both compare with the lower median of the round's accepted replies."""
        norms = [r.moved for r in record.replies]
        factor_norms = [r.distance for r in record.replies]
        for reply, norm in zip(record.replies, norms):
            reply.row[M.UPDATE_NORM] = norm
        if not record.replies:
            return
        product_still, factor_still = (defences.NOOP_RTOL * n
                                       for n in self.state.reference_norms())
        groups = [r.groups for r in record.replies]
        screened = defences.screen_updates(norms, factor_norms, self.rules.max_update_ratio,
                                           product_still, factor_still, groups)
        for i, reason in reversed(screened.dropped):
            reply = record.replies.pop(i)
            self.failed(record, reply.row[M.NODE_ID], reason, dropped=True)
            record.failures[-1].update({M.UPDATE_NORM: norms[i],  # for the report's plot
                                        M.PARTITION_ID: reply.row[M.PARTITION_ID]})
        self.weigh(record, screened.figures)

    def weigh(self, record: RoundRecord, figures: dict[str, Any]) -> None:
        """Set each screened reply's merge weight (client-weights, max-weight-ratio), recording
        a cut claim as down-weighted, and the round's screen figures."""
        weighed = defences.weigh([r.update.weight for r in record.replies],
                                 self.rules.max_weight_ratio, self.rules.equal_weights,
                                 self.rules.max_share)
        record.screen = {**figures, **weighed.figures}
        cut: dict[int, list[str]] = {}
        for i, reason in weighed.cut:
            cut.setdefault(i, []).append(reason)
        for i, (reply, weight) in enumerate(zip(record.replies, weighed.weights)):
            reply.row[M.WEIGHT] = weight
            if i in cut:
                self.down_weighted(record, reply, "; ".join(cut[i]))
            if weight != reply.update.weight:
                reply.update = replace(reply.update, weight=weight)

    def down_weighted(self, record: RoundRecord, reply: Reply, reason: str) -> None:
        """Record and log that a reply counts for less than it claimed (or not at all)."""
        node = reply.row[M.NODE_ID]
        log(WARNING, "round %d: %s down-weighted: %s", record.round, self.who(node), reason)
        record.down_weighted.append(named(node, reason, self.label(node)))

    def krum(self, record: RoundRecord) -> list[Reply]:
        """Multi-Krum over the round's replies (`server.defences.krum`): the n - robust-f whose
        delta W is nearest the others'; the rest are recorded as not merged, with their scores."""
        screened = defences.krum([replace(r.update, factors=self.state.merged_part(
            r.update.factors)) for r in record.replies], self.state.robust.f)
        for i, (reply, score) in enumerate(zip(record.replies, screened.scores)):
            reply.row[M.KRUM_SCORE], reply.row[M.MERGED] = score, i in screened.kept
        for i, reason in screened.dropped:
            self.down_weighted(record, record.replies[i], reason)
        return [record.replies[i] for i in screened.kept]

    def merge(self, server_round: int, record: RoundRecord,
              secure: ClientUpdate | None = None) -> None:
        """The accepted updates into the global adapter (after Krum's choice when it is on;
        the one `secure` sum under secure aggregation); DP accounting when on."""
        chosen = self.krum(record) if self.state.robust.krum else record.replies
        updates = [secure] if secure is not None else [r.update for r in chosen]
        sketches = [r.sketch for r in chosen if r.sketch is not None]
        # the running sum holds exactly the chosen replies (none dropped, in order)?
        whole = self.fold is not None and secure is None and \
            list(map(id, chosen)) == list(map(id, self.folded))
        record.merge = self.state.update(updates, server_round,
                                         sketches if secure is None else None,
                                         self.fold if whole else None)
        record.merge[M.ROBUST] = self.state.robust.rule
        if self.ledger is not None:
            self.ledger.record()
            record.privacy = {M.DP_EPSILON: self.ledger.epsilon(), M.DP_DELTA: self.ledger.delta,
                              M.DP_NOISE_MULTIPLIER: self.ledger.noise_multiplier}

    def evaluate(self, grid: Grid, server_round: int, record: RoundRecord) -> None:
        """The global adapter (at the global rank) to each sampled node; a personalised
        method's nodes get the shared factors at their own rank and evaluate their own model."""
        nodes = self.sample(grid, server_round, self.rules.fraction_evaluate,
                            self.rules.min_evaluate_nodes)
        if self.method.personal:
            self.learn_ranks(grid, nodes, record)
            ranks = self.ranks()
        else:
            ranks = {n: self.state.rank for n in nodes}
        ready = [n for n in nodes if n in ranks]
        log(INFO, "round %d: sent evaluation to %d nodes (each answers its held-out "
            "questions; the nodes print their progress)", server_round, len(ready))
        began = time.perf_counter()
        replies, sent = self.send(grid, ready, ranks, server_round, MessageType.EVALUATE)
        log(INFO, "round %d: %d evaluation replies in %.1f s", server_round, len(replies),
            time.perf_counter() - began)
        for node, msg in replies:
            if problem := evaluate_problem(msg):
                self.eval_failed(record, node, problem)
        for node in sorted(set(ready) - {n for n, _ in replies}):
            self.eval_failed(record, node, f"no evaluation reply within round-timeout="
                                           f"{self.rules.timeout:g} s")
        record.evaluation = {M.BYTES_DOWN_EVAL: sum(sent.values()),
                             **self.read_evaluate_replies([r for _, r in replies]),
                             M.EVAL_FAILED: len(record.eval_failures)}

    def eval_failed(self, record: RoundRecord, node: int, reason: str) -> None:
        """Record and log that `node` failed to evaluate this round, naming it as `failed`
        names a node that failed to train (metrics.jsonl: eval-failures)."""
        log(WARNING, "round %d: %s failed to evaluate: %s", record.round, self.who(node), reason)
        record.eval_fail(node, reason, self.label(node))

    def finish(self, server_round: int, record: RoundRecord) -> None:
        """Write rounds/<n>/, the metrics line, then the round's checkpoint."""
        entry = record.line(self.total_bytes)
        self.total_bytes = entry[M.BYTES_TOTAL]
        state, rank = self.state.export()
        self.writer.write_round(server_round, state, entry, rank)
        write_checkpoint(self.writer.out_dir, self.checkpoint(server_round))
        self.tracker.log_line(entry)
        log(INFO, "round %d: train-loss %s eval-loss %s exactness %s, %d replied, %d failed, "
            "%.2f MB up, %.2f MB down, %.1f s", server_round, _fmt(entry.get(M.TRAIN_LOSS)),
            _fmt(entry.get(M.EVAL_LOSS)), _fmt(entry.get(M.EXACTNESS)),
            entry[M.CLIENTS_REPLIED], entry[M.CLIENTS_FAILED], entry[M.BYTES_UP] / 1e6,
            entry[M.BYTES_DOWN] / 1e6, entry[M.SECONDS])
        log_preference(server_round, entry)

    def stop(self, server_round: int, attempts: list[dict]) -> RoundFailed:
        """Log why the run stops; the RoundFailed to raise."""
        last = attempts[-1]
        reasons = "; ".join(f"node {f[M.NODE_ID]}: {f['reason']}" for f in last[M.FAILURES][:5])
        why = (f"the merge failed ({last['merge-error']})" if "merge-error" in last else
               f"secure aggregation failed ({last['secagg-error']})" if "secagg-error" in last
               else f"{last['replied']} valid replies, fewer than "
               f"min-replies={self.rules.replies_needed}")
        message = (f"round {server_round}: {why}, in {len(attempts)} attempt(s) "
                   f"(round-failure={self.rules.round_failure}); stopping. Failures: "
                   f"{reasons or 'none reported'}. Rounds up to {server_round - 1} are saved; "
                   f"continue with --resume once enough nodes are back")
        log(ERROR, "%s", message)
        return RoundFailed(message)

    # ==== nodes: sampling, ranks, messages ====================================================
    def sample(self, grid: Grid, server_round: int, fraction: float, minimum: int) -> list[int]:
        """Nodes for one phase, drawn with a seeded RNG (the same round draws the same nodes
        from the same node set, also after a resume). The first round this server runs waits
        until min-available-nodes are connected; later rounds only for `minimum`, so a node
        that died does not stall the run, and one that reconnects is drawn again."""
        wait_for = max(minimum, self.rules.min_available_nodes if not self.waited_for_all else 0)
        said = (-1, 0.0)  # (nodes, when) of the last "waiting" line: one per change or minute
        while len(nodes := sorted(grid.get_node_ids())) < wait_for:
            if len(nodes) != said[0] or time.monotonic() - said[1] >= 60:
                log(INFO, "round %d: waiting for nodes to connect: %d of %d", server_round,
                    len(nodes), wait_for)
                said = (len(nodes), time.monotonic())
            time.sleep(1)
        self.waited_for_all = True
        size = min(len(nodes), max(minimum, int(len(nodes) * fraction)))
        rng = random.Random(derive_seed(self.rules.seed, server_round))
        return sorted(rng.sample(nodes, size))

    def learn_ranks(self, grid: Grid, nodes: list[int], record: RoundRecord) -> None:
        """Ask nodes not seen before for their LoRA rank; a bad or missing answer is a failure."""
        unknown = [n for n in nodes if self.known(n).rank is None]
        if not unknown:
            return
        asks = [Message(RecordDict({wire.CONFIG: ConfigRecord({})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in unknown]
        failed: set[int] = set()
        for node, reply in self.exchange(grid, asks):
            rank = None
            if not reply.has_error() and (metrics := metrics_of(reply)) is not None:
                rank = metrics.get(wire.LORA_RANK)
                self.learn_name(node, reply)
                if isinstance(pid := metrics.get(wire.PARTITION_ID), int):
                    self.heard(node).partition = pid
            if isinstance(rank, int) and 1 <= rank <= self.state.rank:
                self.heard(node).rank = rank
                continue
            reason = reply.error.reason if reply.has_error() else (
                f"declared LoRA rank {rank!r}, expected an integer in 1..{self.state.rank} "
                f"(the global rank; raise export-rank to allow more)")
            self.failed(record, node, str(reason))
            failed.add(node)
        for node in unknown:
            if self.known(node).rank is None and node not in failed:
                self.failed(record, node, "no answer to the rank query within round-timeout="
                                          f"{self.rules.timeout:g} s")

    def failed(self, record: RoundRecord, node: int, reason: str, dropped: bool = False) -> None:
        """Record and log that `node` failed this round (or that its reply was dropped),
        naming it as it named itself."""
        who = self.who(node)
        log(WARNING, "round %d: %s: %s", record.round,
            f"dropped the reply of {who}" if dropped else f"{who} failed", reason)
        record.fail(node, reason, self.label(node))

    def who(self, node: int) -> str:
        """'node 12', 'node 12 (site-a)' by its key (or, without one, the name it gave), and
        'node 12 (site-a, calls itself site-b)' when the two differ."""
        label, said = self.label(node), self.known(node).name
        if label is None:
            return f"node {node}"
        return f"node {node} ({label}" + (f", calls itself {said})" if said and said != label
                                          else ")")

    def label(self, node: int) -> str | None:
        """What the server names a node by: the key it registered with (what the server can
        vouch for), else the name it gave itself (a `fedlora client --name`), else None."""
        return self.keys.get(node) or self.known(node).name

    def learn_name(self, node: int, reply: Message) -> None:
        """Remember the name a `fedlora client` node sent with its rank; say so when it is
        not the name of the key the node registered with."""
        info = reply.content.config_records.get(wire.NODE)
        if info is not None and isinstance(name := info.get(wire.NODE_NAME), str):
            self.heard(node).name = name[:200]
            key = self.keys.get(node)
            if key is not None and name != key:
                log(WARNING, "node %d registered with key %r but calls itself %r; it is named "
                    "by its key", node, key, name[:200])

    def known(self, node: int) -> Node:
        """What the server knows of `node` (an empty record, not kept, when nothing)."""
        return self.nodes.get(node) or Node(node)

    def heard(self, node: int) -> Node:
        """The record of `node`, kept from now on (to fill in what it said)."""
        return self.nodes.setdefault(node, Node(node))

    def ranks(self) -> dict[int, int]:
        """The LoRA rank of every node that declared a valid one."""
        return {n: v.rank for n, v in self.nodes.items() if v.rank is not None}

    def partition(self, node: int, default: int) -> int:
        """The partition id `node` declared when first asked (`default` when none)."""
        declared = self.known(node).partition
        return default if declared is None else declared

    def exchange(self, grid: Grid, messages: list[Message]) -> list[tuple[int, Message]]:
        """Send and wait for the replies (up to the round timeout); each reply with the node
        its message was sent to (a reply Flower makes for a node that died carries the
        SuperLink's id as its sender, not the node's)."""
        return list(self.stream(grid, messages))

    def stream(self, grid: Grid, messages: list[Message], desc: str | None = None
               ) -> Iterator[tuple[int, Message]]:
        """`exchange`, each (node, reply) handed on as it arrives; with `desc`, a line
        '<desc>: 3/8 replies, 30 s' in the log every 30 s while they come."""
        if not messages:
            return
        sent_to: dict[str, int] = {}  # message id -> node, read once the grid gave the ids
        progress = None if desc is None else Ticker(desc, len(messages), "replies", every=30.0,
                                                    say=lambda line: log(INFO, "%s", line)).update
        for reply in stream_replies(grid, messages, self.rules.timeout, progress=progress):
            answered = reply.metadata.reply_to_message_id
            if answered not in sent_to:
                sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
            yield sent_to.get(answered, reply.metadata.src_node_id), reply
            del reply  # not held while the next one is pulled

    def content(self, rank: int, server_round: int, extra: tuple = (),
                records: dict[str, ConfigRecord] | None = None) -> RecordDict:
        """What a node of `rank` receives: the method's shared factors, residual and config
        (plus the method's `extra` entries for that node: lora-moe's expert, and `records`:
        secure aggregation's settings)."""
        fresh = self.method.fresh_adapter
        config = ConfigRecord({wire.SERVER_ROUND: server_round, wire.RANK: rank,
                               wire.INIT_SEED: self.rules.seed + (server_round if fresh else 0),
                               **dict(extra)})
        payload = self.method.shared(self.state.payload(rank))
        content: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            wire.ARRAYS: to_array_record(payload, self.rules.wire_dtype), wire.CONFIG: config}
        if self.state.residual:
            content[wire.RESIDUAL] = to_array_record(self.state.residual_state(), "float32")
        content.update(records or {})
        return RecordDict(content)

    def send(self, grid: Grid, nodes: list[int], ranks: dict[int, int], server_round: int,
             message_type: str, records: dict[str, ConfigRecord] | None = None
             ) -> tuple[list[tuple[int, Message]], dict[int, int]]:
        """`send_streaming`, the replies as a list."""
        replies, sent = self.send_streaming(grid, nodes, ranks, server_round, message_type,
                                            records)
        return list(replies), sent

    def send_streaming(self, grid: Grid, nodes: list[int], ranks: dict[int, int],
                       server_round: int, message_type: str,
                       records: dict[str, ConfigRecord] | None = None
                       ) -> tuple[Iterator[tuple[int, Message]], dict[int, int]]:
        """One message per node with the content for its rank (built once per rank and shared,
        as Flower's FedAvg shares its RecordDict), with `records` added to every one;
        ((node, reply) pairs, bytes sent per node)."""
        kind = {n: (ranks[n], tuple(sorted(self.method.node_config(
            self.partition(n, -1)).items()))) for n in nodes}
        contents = {k: self.content(k[0], server_round, k[1], records)
                    for k in set(kind.values())}
        size = {k: sum(factor_bytes(a) for a in c.array_records.values())
                for k, c in contents.items()}
        messages = [Message(contents[kind[n]], dst_node_id=n, message_type=message_type)
                    for n in nodes]
        desc = f"round {server_round}: waiting for {message_type} replies"
        return self.stream(grid, messages, desc), {n: size[kind[n]] for n in nodes}

    # ==== replies =============================================================================
    def read_train_reply(self, node: int, msg: Message, record: RoundRecord) -> None:
        """Accept node's training reply into `record`, or record why it was dropped."""
        if msg.has_error():
            self.failed(record, node, str(msg.error.reason))
            return
        problem, reply = self.check_reply(node, msg)
        if problem is not None:
            self.failed(record, node, problem, dropped=True)
            return
        assert reply is not None
        self.heard(node).rank = reply.row[M.LORA_RANK]
        self.keep(reply)
        record.replies.append(reply)

    def check_reply(self, node: int, msg: Message) -> tuple[str | None, Reply | None]:
        """(why the reply must be dropped, None) or (None, the accepted reply)."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "expected one ArrayRecord and one MetricRecord", None
        record = next(iter(content.array_records.values()))
        metrics = metrics_of(msg)
        try:
            state = from_array_record(record, shared=True)  # views: never written
        except Exception as err:  # malformed arrays: drop, never crash the round
            return f"unreadable arrays ({err})", None
        known, declared = self.known(node).rank, metrics.get(wire.LORA_RANK)
        if known is None:
            return f"node {node} was never asked for its rank (not sampled this round)", None
        rank = self.method.reply_rank(known, declared)
        expected = {**expected_shapes(self.shapes, rank, self.method.shares),
                    **{k: tuple(v.shape) for k, v in self.state.dense.items()}}
        problem = reply_problem(state, expected, metrics.get(wire.NUM_EXAMPLES),
                                self.rules.max_examples)
        if problem is None and declared != rank:
            problem = f"declared rank {declared!r}, but this node's rank is {rank}"
        if problem:
            return problem, None
        num_examples = int(metrics[wire.NUM_EXAMPLES])
        update = self.state.to_update(state, rank, float(num_examples))
        if problem := defences.not_finite(update):  # at the scale the merge works in
            return problem, None
        partition_id = int(metrics.get(wire.PARTITION_ID, -1))
        # the experts by the partition id the node gave when first asked (what its messages
        # were built for), not by what this reply says
        try:
            experts = self.method.trained_experts(self.partition(node, partition_id),
                                                  self.state.lora, metrics)
        except ValueError as err:
            return str(err), None
        if experts is not None:  # lora-moe: the experts this client trains, by its assignment
            update = replace(update, experts=experts)
        problem = self.update_problem(update, rank)
        if problem:
            return problem, None
        row: dict[str, Any] = {
            M.NODE_ID: node, M.PARTITION_ID: partition_id,
            M.LORA_RANK: rank, M.NUM_EXAMPLES: num_examples, M.BYTES_UP: factor_bytes(record),
            **said_fields(metrics)}
        if (name := self.label(node)) is not None:
            row[M.NODE_NAME] = name
        if (said := self.known(node).name) is not None and said != name:
            row[M.NODE_DECLARED_NAME] = said
        return None, Reply(update, row)

    def update_problem(self, update: ClientUpdate, rank: int) -> str | None:
        """Why a well-formed update is still refused (its size), or None."""
        if self.rules.max_update_norm and (norm := update_norm(update, self.state.dense)) > \
                self.rules.max_update_norm:  # computed only when bounded: it is not cheap
            return (f"update norm ||delta W||_F = {norm:.4g} is above max-update-norm="
                    f"{self.rules.max_update_norm:g}")
        if self.rules.client_clipping:
            moved = self.state.distance(update)
            if moved > self.state.clip_norm * (1 + 1e-4):
                return (f"dp-clipping=client, but the update's norm {moved:.6g} is above "
                        f"clip-norm={self.state.clip_norm:g}: the node did not clip")
        return None

    def read_evaluate_replies(self, replies: list[Message]) -> dict[str, Any]:
        """Token-weighted mean eval loss over the nodes that evaluated; exact-match accuracy
        pooled over their answers (overall, per family, and per client), and the same for the
        most likely choice of multiple-choice records (choice-accuracy)."""
        usable = [m for m in replies if not evaluate_problem(m)]
        rows = [metrics_of(m) for m in usable]
        loss = weighted_mean([float(r[wire.EVAL_LOSS]) for r in rows],
                             [float(r[wire.EVAL_TOKENS]) for r in rows])
        out: dict[str, Any] = {
            M.EVAL_LOSS: loss,
            M.EVAL_PERPLEXITY: math.exp(min(loss, 50.0)) if rows else math.nan,
            M.EVAL_CLIENTS: len(rows), M.EVAL_FAILED: len(replies) - len(usable)}
        for kind in ("", "choice"):  # generated exact match; most likely choice
            pooled, per_client = Accuracy(kind=kind), {}
            for row in rows:
                counts = Accuracy.from_counts(dict(row), kind)
                if counts.total:
                    pooled = pooled.merge(counts)
                    per_client[str(int(row.get(wire.PARTITION_ID, -1)))] = counts.overall
            if pooled.total:
                out.update(pooled.metrics())
                out[f"client-{pooled.name}"] = per_client  # client-accuracy, ...
        pairs = [r for r in rows if r.get(wire.PREF_PAIRS, 0) > 0]  # objective=dpo
        if pairs:
            weights = [float(r[wire.PREF_PAIRS]) for r in pairs]
            out[M.PREF_PAIRS] = int(sum(weights))
            out.update({key: weighted_mean([float(r[key]) for r in pairs], weights)
                        for key in wire.PREFERENCE})
        if samples := pooled_samples(usable):
            out[M.SAMPLES] = samples
        return out

    # ==== checkpoint and resume ===============================================================
    def checkpoint(self, server_round: int) -> Checkpoint:
        """Everything the server needs to continue after `server_round`."""
        meta = {**nodes_meta(self.nodes),
                "method": self.method.state(),
                "bytes-total": self.total_bytes,
                "dp-releases": self.ledger.releases if self.ledger else 0}
        return Checkpoint(round=server_round, tensors=self.state.tensors(), meta=meta)

    def resume(self, checkpoint: Checkpoint) -> None:
        """Restore the state `checkpoint()` saved."""
        self.state.restore(checkpoint.tensors)
        self.nodes = nodes_of(checkpoint.meta)
        self.method.restore(checkpoint.meta.get("method", {}))
        self.total_bytes = int(checkpoint.meta["bytes-total"])
        if self.ledger is not None:
            self.ledger.record(int(checkpoint.meta.get("dp-releases", 0)))


def log_preference(server_round: int, entry: dict) -> None:
    """objective=dpo: the round's held-out preference figures, when the nodes sent them."""
    if M.PREF_PAIRS in entry:
        log(INFO, "round %d: preference accuracy %s margin %s (log-prob chosen %s, rejected "
            "%s; %d held-out pairs)", server_round, _fmt(entry.get(M.PREF_ACCURACY)),
            _fmt(entry.get(M.PREF_MARGIN)), _fmt(entry.get(M.CHOSEN_LOGP)),
            _fmt(entry.get(M.REJECTED_LOGP)), entry[M.PREF_PAIRS])


def pooled_samples(usable: list[Message]) -> list[dict]:
    """The first SAMPLES_PER_FAMILY answers of each family over the usable evaluation
    replies (`evaluate_problem` found none), in partition order (simulated clients send
    some: `wire.SAMPLES`)."""
    entries = []
    for msg in usable:
        if (columns := msg.content.config_records.get(wire.SAMPLES)) is not None:
            pid = number(metrics_of(msg), wire.PARTITION_ID)
            entries += samples_of(columns, int(pid) if math.isfinite(pid) else -1)
    return first_per_family(sorted(entries, key=lambda s: s["partition-id"]))


def evaluate_problem(msg: Message) -> str | None:
    """Why an evaluation reply counts for nothing (its error, or no loss over any token), or
    None when it is a usable one (a loss of inf or NaN is one: a model that diverged)."""
    if msg.has_error():
        return str(msg.error.reason)
    metrics = metrics_of(msg)
    if metrics is None:
        return "the evaluation reply has no MetricRecord"
    loss = metrics.get(wire.EVAL_LOSS)
    numeric = isinstance(loss, (int, float)) and not isinstance(loss, bool)
    if not number(metrics, wire.EVAL_TOKENS) > 0 or not numeric:
        return (f"the evaluation reply has no loss over any held-out token (eval-tokens "
                f"{metrics.get(wire.EVAL_TOKENS)!r}, eval-loss {metrics.get(wire.EVAL_LOSS)!r})")
    return None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def send_and_receive(grid: Grid, messages: list[Message], timeout: float,
                     poll_s: float = pacing.REPLY_POLL_S) -> list[Message]:
    """Every reply of `stream_replies`, as a list."""
    return list(stream_replies(grid, messages, timeout, poll_s))


def stream_replies(grid: Grid, messages: list[Message], timeout: float,
                   poll_s: float = pacing.REPLY_POLL_S,
                   progress: Callable[[int], object] | None = None) -> Iterator[Message]:
    """Push `messages`, then pull their replies every `poll_s` seconds until all have come
    or `timeout` seconds passed, handing each on as it comes (the server reads a reply before
    it pulls the next, so it never holds more than one undecoded): Grid.send_and_receive,
    which over a SuperLink waits 3 s between pulls (on average 1.5 s of every exchange), with
    fedlora's interval (fedlora.runtime.pacing; the pulls go to the SuperLink beside the
    ServerApp, not over the network). Over flwr 1.41's SuperLink grid each reply's arrays are
    pulled within what is left of `timeout` (`server.replies`): a node that pushed its reply
    message but not its arrays gets an error reply saying so, and never holds up the others.
    Any other grid (Flower's in-memory one pulls every 0.1 s; the tests' own) answers through
    its own. Over a SuperLink `progress` is told how many replies came after each pull."""
    if not pacing.over_superlink(grid):
        yield from grid.send_and_receive(messages, timeout=timeout)
        return
    waiting = set(grid.push_messages(messages))
    if per_message_pulls(grid):
        yield from pull_replies(grid, waiting, timeout, poll_s, progress)
        return
    deadline, pushed = time.monotonic() + timeout, len(waiting)
    while waiting:
        got = list(grid.pull_messages(waiting))
        waiting -= {r.metadata.reply_to_message_id for r in got}
        yield from got
        del got
        if progress is not None:
            progress(pushed - len(waiting))
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
