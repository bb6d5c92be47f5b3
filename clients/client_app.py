"""Flower ClientApp: thin handlers from a message to local training or evaluation and back.

A message from the server carries, in `content`:
  - "config": server-round, the adapter `rank` to use, and `init-seed` for factors the server
    does not send (a fresh flora adapter, the frozen ffa-lora A, a fedsa-lora B before round 1);
  - "arrays": the global adapter at that rank in PEFT's scale (only B for ffa-lora, only A for
    fedsa-lora, nothing for flora's fresh adapter);
  - "residual" (flora, fedex-lora): the frozen low-rank update folded into the base.
The reply carries the factors the strategy shares plus `num-examples` and `lora-rank`.

In simulation a worker process serves many virtual clients: the module-level WORKSPACE keeps
one base model loaded and swaps adapter weights, and DATA keeps each client's tokenized split.
In deployment every message starts a fresh process, so both caches start empty. Personal state
(fedsa-lora's B) lives in `context.state`, which Flower keeps per node across rounds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from dataclasses import replace

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file, save_file

from fedlora.adapters import (Slot, Workspace, get_lora_state, join_factors, module_shapes,
                              set_lora_state, set_residual, shared_init, shared_keys,
                              split_factors)
from fedlora.aggregation import get_strategy
from fedlora.aggregation.hetlora import pruned_rank
from fedlora.aggregation.linalg import truncate_rank
from fedlora.aggregation.privacy import clip_to_received
from fedlora.aggregation.scaling import from_delta, lora_scale, to_delta
from fedlora.config import Settings
from fedlora.data import client_records, tokenize_records
from fedlora.models import resolve_device
from fedlora.outputs import write_atomic
from fedlora.records import from_array_record, to_array_record
from fedlora.train import evaluate, train_local
from fedlora.train.accuracy import exact_match, generation_batch

app = ClientApp()
WORKSPACE = Workspace()
DATA: OrderedDict[tuple, tuple[list[dict], list[dict], list[dict]]] = OrderedDict()
DATA_CACHE_SIZE = 16
PERSONAL = "personal-b"  # context.state key of fedsa-lora's local B
log = logging.getLogger("fedlora.client")


def partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config; a lone node is partition 0 of 1."""
    cfg = context.node_config
    return int(cfg.get("partition-id", 0)), int(cfg.get("num-partitions", 1))


def client_data(settings: Settings, slot: Slot, pid: int, n: int):
    """This client's tokenized (train, eval) examples and its held-out records (for
    generation-based accuracy), cached per process (small LRU)."""
    key = (slot.source.path, repr(settings.data), settings.train.max_length,
           settings.federation.seed, pid, n)
    if key not in DATA:
        train, held_out = client_records(settings.data, pid, n, settings.federation.seed)
        length, packing = settings.train.max_length, settings.data.packing
        # eval stays unpacked: its loss per example does not depend on the packing setting
        DATA[key] = (tokenize_records(train, slot.tokenizer, length, packing),
                     tokenize_records(held_out, slot.tokenizer, length), held_out)
        if len(DATA) > DATA_CACHE_SIZE:
            DATA.popitem(last=False)
    DATA.move_to_end(key)
    return DATA[key]


def starting_state(msg: Message, context: Context, slot: Slot, shares: str) -> dict:
    """The adapter this client starts from: seeded init, overlaid with what was received."""
    config = msg.content["config"]
    rank, seed = int(config["rank"]), int(config["init-seed"])
    shapes = module_shapes(get_lora_state(slot.model, slot.adapter))
    state = join_factors(shared_init(shapes, rank, seed))
    state.update(from_array_record(msg.content["arrays"]))
    personal = load_personal(context) if shares == "A" else None  # fedsa-lora: own B
    if personal and all(k in state and personal[k].shape == state[k].shape for k in personal):
        state.update(personal)
    return state


def personal_file(context: Context) -> Path | None:
    """This client's file of private factors when personal-dir is set, else None."""
    folder = context.node_config.get("personal-dir") or context.run_config.get("personal-dir")
    return Path(str(folder)) / f"client-{partition(context)[0]}.safetensors" if folder else None


def load_personal(context: Context) -> dict | None:
    """This client's private factors (fedsa-lora's B), or None before its first round."""
    path = personal_file(context)
    if path is None:
        return from_array_record(context.state[PERSONAL]) if PERSONAL in context.state else None
    return load_file(str(path)) if path.exists() else None


def save_personal(context: Context, factors: dict) -> None:
    """Keep this client's private factors: a file (written atomically) or the node context."""
    path = personal_file(context)
    if path is None:
        context.state[PERSONAL] = ArrayRecord(factors)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in factors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def prepare(msg: Message, context: Context) -> tuple[Settings, Slot, int, int]:
    """Settings from run+node config, the cached model with the received adapter loaded."""
    settings = Settings.from_config(context.run_config, context.node_config)
    resolve_device(settings.model.device)  # fail early and clearly on a missing GPU
    lora = replace(settings.lora, rank=int(msg.content["config"]["rank"]))
    slot = WORKSPACE.get(settings.model, lora, settings.train)
    residual = msg.content.array_records.get("residual")
    set_residual(slot, lora, split_factors(from_array_record(residual)) if residual else None)
    shares = get_strategy(settings.federation.strategy).shares
    state = starting_state(msg, context, slot, shares)
    set_lora_state(slot.model, {k: v.float() for k, v in state.items()}, slot.adapter)
    pid, n = partition(context)
    return settings, slot, pid, n


def self_prune(state: dict, rank: int, settings: Settings) -> tuple[dict, int]:
    """HetLoRA rank self-pruning (hetlora-prune > 0): the reply at a smaller rank, same delta W
    for the components kept; the server then keeps this node at the smaller rank."""
    gamma = settings.federation.hetlora_prune
    if gamma <= 0:
        return state, rank
    scale = lambda r: lora_scale(r, settings.lora.alpha, settings.lora.use_rslora)
    factors = to_delta(split_factors(state), scale(rank))
    keep = pruned_rank(factors, gamma)
    if keep == rank:
        return state, rank
    kept = {m: truncate_rank(b, a, keep) for m, (b, a) in factors.items()}
    log.info("hetlora self-pruning: rank %d -> %d", rank, keep)
    return join_factors(from_delta(kept, scale(keep))), keep


def clip_reply(state: dict, start: dict, rank: int, settings: Settings, shares: str) -> dict:
    """dp-clipping=client: the shared factors moved back towards what this node received
    until the update (delta-W scale, all modules) has norm <= clip-norm; the server checks it."""
    fed = settings.federation
    if not fed.clip_norm or fed.dp_clipping != "client":
        return state
    scale = lora_scale(rank, settings.lora.alpha, settings.lora.use_rslora)
    delta = lambda s: to_delta(split_factors({k: v.float() for k, v in s.items()}), scale)
    clipped, norm, factor = clip_to_received(delta(state), delta(start), shares, fed.clip_norm)
    if factor < 1:
        log.info("update norm %.4g clipped to clip-norm %g", norm, fed.clip_norm)
    return join_factors(from_delta(clipped, scale))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's LoRA rank (asked once, before the node's first round)."""
    settings = Settings.from_config(context.run_config, context.node_config)
    pid, _ = partition(context)
    rank = settings.lora.rank_for(pid, settings.federation.seed)
    return Message(RecordDict({"metrics": MetricRecord({"lora-rank": rank,
                                                        "partition-id": pid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with factors and metrics."""
    settings, slot, pid, n = prepare(msg, context)
    train_set, _, _ = client_data(settings, slot, pid, n)
    server_round = int(msg.content["config"]["server-round"])
    result = train_local(
        slot.model, slot.adapter, train_set, slot.tokenizer.pad_token_id, settings.train,
        server_round=server_round, num_rounds=settings.federation.num_rounds,
        seed=settings.federation.seed + 1_000_003 * pid + server_round,
        desc=f"client {pid} round {server_round}", proximal_mu=settings.proximal_mu)
    rank = int(msg.content["config"]["rank"])
    state, rank = self_prune(get_lora_state(slot.model, slot.adapter), rank, settings)
    shares = get_strategy(settings.federation.strategy).shares
    state = clip_reply(state, starting_state(msg, context, slot, shares), rank, settings, shares)
    if shares == "A":  # fedsa-lora: B stays on this node
        save_personal(context, shared_keys(state, "B"))
    arrays = to_array_record(shared_keys(state, shares), settings.federation.wire_dtype)
    metrics = MetricRecord({
        "num-examples": len(train_set), "partition-id": pid,
        "lora-rank": rank, "train-loss": result.loss,
        "train-loss-first": result.first_loss, "train-loss-last": result.last_loss,
        "train-steps": result.steps, "train-tokens": result.tokens,
        "train-seconds": result.seconds})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Held-out loss of the received global adapter on this client's eval split (a
    personalised strategy's node: its own model), and exact-match accuracy of greedy answers
    on eval-accuracy of those examples, counted per task family."""
    settings, slot, pid, n = prepare(msg, context)
    _, held_out, records = client_data(settings, slot, pid, n)
    if settings.train.eval_examples:
        held_out = held_out[: settings.train.eval_examples]
    result = evaluate(slot.model, held_out, slot.tokenizer.pad_token_id,
                      batch_size=settings.train.batch_size)
    metrics = MetricRecord({"num-examples": result.examples, "partition-id": pid,
                            "eval-loss": result.loss, "eval-tokens": result.tokens})
    if settings.train.eval_accuracy and records:
        accuracy, _ = exact_match(slot.model, slot.tokenizer,
                                  records[: settings.train.eval_accuracy], settings.data.dataset,
                                  settings.train.max_new_tokens, generation_batch(settings))
        metrics.update(accuracy.counts())
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
