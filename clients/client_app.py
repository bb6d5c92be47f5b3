"""Flower ClientApp: thin handlers from a message to local training or evaluation and back.

In simulation a worker process serves many virtual clients: the module-level WORKSPACE keeps
one base model loaded and swaps adapter weights, and DATA keeps each client's tokenized split.
In deployment every message starts a fresh process, so both caches start empty.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.adapters import Slot, Workspace, get_lora_state, set_lora_state
from fedlora.config import Settings
from fedlora.data import client_records, tokenize
from fedlora.models import resolve_device
from fedlora.records import from_array_record, to_array_record
from fedlora.train import evaluate, train_local

app = ClientApp()
WORKSPACE = Workspace()
DATA: OrderedDict[tuple, tuple[list[dict], list[dict]]] = OrderedDict()
DATA_CACHE_SIZE = 16
log = logging.getLogger("fedlora.client")


def partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config; a lone node is partition 0 of 1."""
    cfg = context.node_config
    return int(cfg.get("partition-id", 0)), int(cfg.get("num-partitions", 1))


def client_data(settings: Settings, slot: Slot, pid: int, n: int):
    """This client's tokenized (train, eval) examples, cached per process (small LRU)."""
    key = (slot.source.path, repr(settings.data), settings.train.max_length,
           settings.federation.seed, pid, n)
    if key not in DATA:
        train, held_out = client_records(settings.data, pid, n, settings.federation.seed)
        tok = lambda records: [tokenize(r, slot.tokenizer, settings.train.max_length)
                               for r in records]
        DATA[key] = (tok(train), tok(held_out))
        if len(DATA) > DATA_CACHE_SIZE:
            DATA.popitem(last=False)
    DATA.move_to_end(key)
    return DATA[key]


def prepare(msg: Message, context: Context) -> tuple[Settings, Slot, int, int]:
    """Settings from run+node config, the cached model with the global adapter loaded."""
    settings = Settings.from_config(context.run_config, context.node_config)
    resolve_device(settings.model.device)  # fail early and clearly on a missing GPU
    slot = WORKSPACE.get(settings.model, settings.lora, settings.train)
    set_lora_state(slot.model, from_array_record(msg.content["arrays"]), slot.adapter)
    pid, n = partition(context)
    return settings, slot, pid, n


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with factors and metrics."""
    settings, slot, pid, n = prepare(msg, context)
    train_set, _ = client_data(settings, slot, pid, n)
    server_round = int(msg.content["config"]["server-round"])
    result = train_local(
        slot.model, slot.adapter, train_set, slot.tokenizer.pad_token_id, settings.train,
        server_round=server_round, num_rounds=settings.federation.num_rounds,
        seed=settings.federation.seed + 1_000_003 * pid + server_round,
        desc=f"client {pid} round {server_round}")
    arrays = to_array_record(get_lora_state(slot.model, slot.adapter),
                             settings.federation.wire_dtype)
    metrics = MetricRecord({
        "num-examples": len(train_set), "partition-id": pid, "train-loss": result.loss,
        "train-loss-first": result.first_loss, "train-loss-last": result.last_loss,
        "train-steps": result.steps, "train-tokens": result.tokens,
        "train-seconds": result.seconds})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Held-out loss of the received global adapter on this client's eval split."""
    settings, slot, pid, n = prepare(msg, context)
    _, held_out = client_data(settings, slot, pid, n)
    if settings.train.eval_examples:
        held_out = held_out[: settings.train.eval_examples]
    result = evaluate(slot.model, held_out, slot.tokenizer.pad_token_id,
                      batch_size=settings.train.batch_size)
    metrics = MetricRecord({"num-examples": result.examples, "partition-id": pid,
                            "eval-loss": result.loss, "eval-tokens": result.tokens})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
