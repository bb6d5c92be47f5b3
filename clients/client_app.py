"""Flower ClientApp: thin handlers from a message to local training or evaluation and back.

What a message carries is described in `fedlora.wire`. The method (`fedlora.methods`) decides
how a client starts from what it received (`client_start`) and what it does before replying
(`client_finish`); this module only moves data between Flower, the model and the method.

A node's own settings win: its node config overrides the run config key by key (except
`peft`: a node whose PEFT method differs from the run's is refused), its
`lora-rank` is the rank it trains at, and a node started by `fedlora client` (its node config
has a `node-name`) takes every key that names one of its files or folders (`data-path`,
`personal-dir`) from its node config only; such a key in the run config is ignored with a
warning, and a run-config `dataset` that is a local path is refused (`node_settings`).

In simulation a worker process serves many virtual clients, and in deployment a node's
resident worker (`clients.worker`) serves every message: the module-level WORKSPACE keeps one
base model loaded and swaps adapter weights, and DATA keeps each client's tokenized split.
With `fedlora client --isolation subprocess` every message starts a fresh process, so both
caches start empty. Private factors (fedsa-lora's B) live in the client's `clients.personal`
store.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, replace

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from clients import secagg
from clients.personal import personal_store
from fedlora import wire
from fedlora.adapters import (
    Slot,
    Workspace,
    flatten,
    module_shapes,
    set_residual,
    shared_init,
    unflatten,
)
from fedlora.aggregation.privacy import clip_state
from fedlora.attacks import attack_state, claimed
from fedlora.config import NODE_PATH_KEYS, Settings, SettingsError, all_keys
from fedlora.data import check_answers, client_records, pack_with, tokenize_records
from fedlora.methods import Method, PersonalStore, load
from fedlora.models import resolve_device
from fedlora.records import from_array_record, to_array_record
from fedlora.seeds import derive_seed
from fedlora.train import evaluate, train_local
from fedlora.train.accuracy import exact_match, generation_batch
from fedlora.train.choices import multiple_choice
from fedlora.train.loop import RoundPlan

app = ClientApp()
WORKSPACE = Workspace()
DATA: OrderedDict[tuple, tuple[list[dict], list[dict], list[dict], list[dict]]] = OrderedDict()
DATA_CACHE_SIZE = 16
log = logging.getLogger("fedlora.client")


@dataclass
class Job:
    """One message's work: settings, method, the model with its adapter, where the data is."""

    settings: Settings
    method: Method
    slot: Slot
    partition_id: int
    num_partitions: int
    rank: int
    server_round: int
    start: dict[str, Tensor]  # the adapter the client starts from (PEFT scale)
    store: PersonalStore  # where the client keeps factors that never leave it

    @property
    def seed(self) -> int:
        """The seed of this client's draws this round (its data order, dropout, an attack):
        the run's seed offset by one of its own per partition and round."""
        return self.settings.federation.seed + derive_seed(self.partition_id, self.server_round)


def partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config; a lone node is partition 0 of 1."""
    cfg = context.node_config
    return int(cfg.get(wire.PARTITION_ID, 0)), int(cfg.get(wire.NUM_PARTITIONS, 1))


def is_deployment_node(context: Context) -> bool:
    """A node started by `fedlora client` (it names itself in its node config)."""
    return wire.NODE_NAME in context.node_config


def node_settings(context: Context) -> tuple[Settings, Method]:
    """This node's settings and method: the run config under its node config; on a
    deployment node, paths on the node come from the node alone."""
    run = dict(context.run_config)
    if is_deployment_node(context):
        defaults = all_keys()
        for key in NODE_PATH_KEYS:
            if key in run and run[key] != defaults[key][0]:
                log.warning("ignored %s=%r from the run config: this node's files are named by "
                            "its own config only (fedlora client --node-config \"%s=...\")",
                            key, run[key], key)
            run.pop(key, None)
        dataset = str(run.get("dataset", ""))
        local = not dataset.startswith(("builtin:", "hf:"))
        if local and dataset and "data-path" not in context.node_config:
            raise SettingsError(
                f"setting 'dataset': the run config names a file on this node ({dataset!r}); "
                f"a node's data is its own: start it with fedlora client --data-path FILE")
    server_peft = str(run.get("peft", all_keys()["peft"][0]))
    node_peft = context.node_config.get("peft", server_peft)
    if node_peft != server_peft:
        raise SettingsError(
            f"setting 'peft': this node is configured for peft={node_peft}, but the run trains "
            f"peft={server_peft}; every node of a run trains the server's PEFT method, since "
            f"the server merges only tensors of that method: remove peft from this node's "
            f"config or join a run of peft={node_peft}")
    settings, method = load(run, context.node_config)
    if context.node_config.get(wire.REQUIRE_SECURE_AGGREGATION) and \
            not settings.federation.secure_aggregation:
        raise SettingsError(
            "setting 'secure-aggregation': this node requires secure aggregation (fedlora "
            "client --require-secure-aggregation), and the run does not use it, so the server "
            "would read this node's update; start the run with secure-aggregation=true")
    if settings.attack.on and is_deployment_node(context):
        raise SettingsError(
            f"setting 'attack': the run asks this node to act as a simulated hostile client "
            f"(attack={settings.attack.attack}); attacks exist for fedlora simulate only, and "
            f"a deployment node refuses them")
    return settings, method


def node_rank(settings: Settings, context: Context, partition_id: int) -> int:
    """The rank this node trains at: its own `lora-rank` when its config sets one, else its
    place in `client-ranks` (a simulation setting), else the run's `lora-rank`."""
    if wire.LORA_RANK in context.node_config:
        return settings.lora.rank
    return settings.lora.rank_for(partition_id, settings.federation.seed)


def client_data(settings: Settings, slot: Slot, pid: int, n: int
                ) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Client `pid` of `n`'s tokenized (train, eval) examples, its held-out records (for
    generation-based accuracy) and its training records, cached per process (small LRU)."""
    length, cut = settings.train.max_length, settings.train.truncation
    key = (slot.source.path, repr(settings.data), length, cut, settings.federation.seed, pid, n)
    if key not in DATA:
        train, held_out = client_records(settings.data, pid, n, settings.federation.seed)
        examples = tokenize_records(train, slot.tokenizer, length, truncation=cut)
        warning = check_answers(examples, f"client {pid}", length, cut)  # raises when none
        if warning:
            log.warning(warning)
        if settings.data.packing:
            examples = pack_with(slot.tokenizer, examples, length)
        # eval stays unpacked: its loss per example does not depend on the packing setting
        DATA[key] = (examples, tokenize_records(held_out, slot.tokenizer, length,
                                                truncation=cut), held_out, train)
        if len(DATA) > DATA_CACHE_SIZE:
            DATA.popitem(last=False)
    DATA.move_to_end(key)
    return DATA[key]


def config_int(msg: Message, key: str) -> int:
    """An integer of the server's config record."""
    value = msg.content.config_records[wire.CONFIG][key]
    if not isinstance(value, int):
        raise ValueError(f"server config {key!r}: expected an integer, got {value!r}")
    return value


def received_state(msg: Message, slot: Slot, rank: int) -> dict[str, Tensor]:
    """Seeded initial factors (what the server does not send), overlaid with what it sent."""
    shapes = module_shapes(slot.peft.get_state(slot.model, slot.adapter))
    state = flatten(shared_init(shapes, rank, config_int(msg, wire.INIT_SEED)))
    state.update(from_array_record(msg.content.array_records[wire.ARRAYS]))
    return state


def prepare(msg: Message, context: Context) -> Job:
    """Settings from run+node config, the cached model with the starting adapter loaded."""
    settings, method = node_settings(context)
    resolve_device(settings.model.device)  # fail early and clearly on a missing GPU
    rank = config_int(msg, wire.RANK)
    lora = replace(settings.lora, rank=rank)
    slot = WORKSPACE.get(settings.model, lora, settings.train)
    residual = msg.content.array_records.get(wire.RESIDUAL)
    set_residual(slot, lora, unflatten(from_array_record(residual)) if residual else None)
    pid, n = partition(context)
    server_round = config_int(msg, wire.SERVER_ROUND)
    store = personal_store(settings.federation.personal_dir, context, pid, server_round,
                           evaluating=msg.metadata.message_type == MessageType.EVALUATE)
    start = method.client_start(received_state(msg, slot, rank), store)
    slot.peft.set_state(slot.model, slot.adapter, {k: v.float() for k, v in start.items()})
    return Job(settings, method, slot, pid, n, rank, server_round, start, store)


def clip_reply(job: Job, state: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    """dp-clipping=client: the shared factors moved back towards what this node started from
    until the update (delta-W scale, all modules) has norm <= clip-norm; the server checks it."""
    fed, lora = job.settings.federation, job.settings.lora
    if not fed.clip_norm or fed.dp_clipping != "client":
        return state
    scale = lora.scale(rank)
    clipped, norm, factor = clip_state(state, job.start, scale, job.method.shares, fed.clip_norm)
    if factor < 1:
        log.info("update norm %.4g clipped to clip-norm %g", norm, fed.clip_norm)
    return clipped


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's LoRA rank (asked once, before the node's first round),
    or answer a stage of secure aggregation (`clients.secagg`)."""
    if secagg.settings_of(msg) is not None:
        return secagg.stage(msg, context)
    settings, _ = node_settings(context)
    pid, _ = partition(context)
    rank = node_rank(settings, context, pid)
    content: dict = {wire.METRICS: MetricRecord({wire.LORA_RANK: rank, wire.PARTITION_ID: pid})}
    if is_deployment_node(context):  # the server names this node in its log and metrics
        name = str(context.node_config[wire.NODE_NAME])
        content[wire.NODE] = ConfigRecord({wire.NODE_NAME: name})
    return Message(RecordDict(content), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with factors and metrics."""
    job = prepare(msg, context)
    settings, slot, pid = job.settings, job.slot, job.partition_id
    train_set, _, _, records = client_data(settings, slot, pid, job.num_partitions)
    config = dict(msg.content.config_records[wire.CONFIG])
    with job.method.local_training(slot.model, slot.adapter, pid, settings, config, train_set,
                                   records) as local:
        hooks = slot.peft.training_hooks(  # what the federated and the PEFT method change
            slot.model, slot.adapter, settings.lora,
            replace(local, proximal_mu=job.method.proximal_mu(settings)))
        plan = RoundPlan(job.server_round, settings.federation.num_rounds, job.seed)
        result = train_local(slot.model, slot.adapter, train_set, slot.tokenizer.pad_token_id,
                             settings.train, plan, hooks,
                             desc=f"client {pid} round {job.server_round}")
    state, rank = job.method.client_finish(slot.peft.get_state(slot.model, slot.adapter), job.rank,
                                           settings, job.store)
    state = clip_reply(job, state, rank)
    num_examples = len(train_set)
    if settings.attack.hostile(pid):  # a simulated hostile client (never on a deployment node)
        state = attack_state(state, job.start, settings.attack,
                             seed=job.seed)
        num_examples = claimed(num_examples, settings.attack,
                               settings.federation.max_num_examples)
    secure = secagg.settings_of(msg)
    if secure is None and context.node_config.get(wire.REQUIRE_SECURE_AGGREGATION):
        raise SettingsError("this node requires secure aggregation (fedlora client "
                            "--require-secure-aggregation), and the server asked for its "
                            "update in the clear: refused")
    shared = job.method.shared(state)
    content: dict = {}
    if secure is None:
        content[wire.ARRAYS] = to_array_record(shared, settings.federation.wire_dtype)
    else:  # the server gets keys now and only ever the masked vector (clients.secagg)
        change = {k: v.float() - job.start[k].float() for k, v in shared.items()}
        if settings.federation.dp_noise_multiplier:  # distributed DP: before masking
            change = secagg.with_noise(change, settings, rank, secure)
        content[wire.SECAGG], clipped = secagg.train_reply(context, secure, job.server_round,
                                                           change, num_examples)
    metrics = MetricRecord({
        wire.PARTITION_ID: pid, wire.LORA_RANK: rank,
        wire.TRAIN_LOSS: result.loss, wire.TRAIN_LOSS_FIRST: result.first_loss,
        wire.TRAIN_LOSS_LAST: result.last_loss, wire.TRAIN_STEPS: result.steps,
        wire.TRAIN_TOKENS: result.tokens, wire.TRAIN_SECONDS: result.seconds,
        **hooks.metrics})
    if secure is None:
        metrics[wire.NUM_EXAMPLES] = num_examples
    else:  # the weight is in the secure sum only
        metrics[wire.SECAGG_CLIPPED] = clipped
    return Message(RecordDict({**content, wire.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Held-out loss of the received global adapter on this client's eval split (a
    personalised method's node: its own model), and exact-match accuracy of greedy answers
    on eval-accuracy of those examples, counted per task family."""
    job = prepare(msg, context)
    settings, slot = job.settings, job.slot
    _, held_out, records, _ = client_data(settings, slot, job.partition_id,
                                          job.num_partitions)
    if settings.train.eval_examples:
        held_out = held_out[: settings.train.eval_examples]
    result = evaluate(slot.model, held_out, slot.tokenizer.pad_token_id,
                      batch_size=settings.train.batch_size)
    metrics = MetricRecord({wire.NUM_EXAMPLES: result.examples, wire.PARTITION_ID: job.partition_id,
                            wire.EVAL_LOSS: result.loss, wire.EVAL_TOKENS: result.tokens})
    if settings.train.eval_accuracy and records:
        scored = records[: settings.train.eval_accuracy]
        accuracy, _ = exact_match(slot.model, slot.tokenizer, scored, settings.data.dataset,
                                  settings.train.max_new_tokens, generation_batch(settings))
        metrics.update(accuracy.counts())
        # multiple-choice records (BIG-bench) also by their most likely choice
        metrics.update(multiple_choice(slot.model, slot.tokenizer, scored,
                                       generation_batch(settings)).counts())
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)
