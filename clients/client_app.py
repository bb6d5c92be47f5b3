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
A node with a record-level privacy budget (`fedlora client --dp-sgd-epsilon`) takes
dp-sgd-epsilon and dp-sgd-delta from its own config only, refuses a run without dp-sgd, and
refuses one that would spend more than its budget (`dp_sgd_plan`); the epsilon it has spent,
counted in its Flower state for this run, goes into each training reply (`spend_dp_sgd`).

In simulation a worker process serves many virtual clients, and in deployment a node's
resident worker (`clients.worker`) serves every message: the module-level WORKSPACE keeps one
base model loaded and swaps adapter weights, and DATA keeps each client's tokenized split.
With `fedlora client --isolation subprocess` every message starts a fresh process, so both
caches start empty. Private factors (fedsa-lora's B) live in the client's `clients.personal`
store.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
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
from fedlora.config import HUB_PREFIX, NODE_PATH_KEYS, Settings, SettingsError, all_keys
from fedlora.data import check_answers, client_records, pack_with
from fedlora.data.preference import for_objective, tokenize_for
from fedlora.methods import Method, PersonalStore, load
from fedlora.models import resolve_device
from fedlora.models.builtin import BUILTINS
from fedlora.models.source import ModelLoadError
from fedlora.node_rules import (
    NODE_DATA_KEYS,
    DataProblem,
    Refused,
    hub_refusal,
    limit_refusals,
    public_reason,
    source_refusal,
)
from fedlora.records import from_array_record, to_array_record
from fedlora.seeds import derive_seed
from fedlora.tracking import thin
from fedlora.train import evaluate, train_local
from fedlora.train.accuracy import (
    exact_match,
    generation_batch,
    samples_columns,
    scored_records,
)
from fedlora.train.choices import multiple_choice
from fedlora.train.distributed import node_devices, refusal, train_parallel
from fedlora.train.dp_sgd import DpSgdPlan, noise_warning, plan_dp_sgd
from fedlora.train.loop import RoundPlan
from fedlora.train.preference import dpo_training, evaluate_pairs, figures_metrics

app = ClientApp()
WORKSPACE = Workspace()
DATA: OrderedDict[tuple, tuple[list[dict], list[dict], list[dict], list[dict]]] = OrderedDict()
DATA_CACHE_SIZE = 16
log = logging.getLogger("fedlora.client")
# a node's record-level privacy budget (`fedlora client --dp-sgd-epsilon`) and the delta it
# is at: the node's own config only, never the run config's
DP_SGD_BUDGET = "dp-sgd-epsilon"
DP_SGD_NODE_KEYS = (DP_SGD_BUDGET, "dp-sgd-delta")
DP_SGD_STATE = "dp-sgd"  # the node's state: DP-SGD steps trained in this run


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
    guarded: bool = False  # a deployment node: its failures reach the server only generically
    devices: tuple[str, ...] = ("cpu",)  # of its training processes (data parallel: several)
    residual: dict | None = None  # the frozen residual adapter's factors, when one is sent

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


def node_settings(context: Context, task: str = MessageType.TRAIN) -> tuple[Settings, Method]:
    """This node's settings and method for a `task` message: the run config under its node
    config; on a deployment node, paths on the node and how it reads its own data come from
    the node alone, and the run config stays within the node's ceilings (`fedlora.node_rules`)."""
    run = dict(context.run_config)
    node = context.node_config
    if is_deployment_node(context):
        defaults = all_keys()
        owned = (*NODE_PATH_KEYS, *(NODE_DATA_KEYS if "data-path" in node else ()))
        for key in owned:
            if key in run and run[key] != defaults[key][0]:
                log.warning("ignored %s=%r from the run config: this node's files and how it "
                            "reads them are named by its own config only (fedlora client "
                            "--node-config \"%s=...\")", key, run[key], key)
            run.pop(key, None)
        dataset = str(run.get("dataset", ""))
        local = not dataset.startswith(("builtin:", HUB_PREFIX))
        if local and dataset and "data-path" not in node:
            raise Refused(
                f"setting 'dataset': the run config names a file on this node ({dataset!r}); "
                f"a node's data is its own: start it with fedlora client --data-path FILE")
        for key, value in (("dataset", "" if {"data-path", "dataset"} & set(node) else dataset),
                           ("model", "" if "model" in node else str(run.get("model", "")))):
            problem = value and source_refusal(key, value, tuple(BUILTINS))
            if problem:
                raise Refused(problem)
    server_peft = str(run.get("peft", all_keys()["peft"][0]))
    node_peft = node.get("peft", server_peft)
    if node_peft != server_peft:
        raise Refused(
            f"setting 'peft': this node is configured for peft={node_peft}, but the run trains "
            f"peft={server_peft}; every node of a run trains the server's PEFT method, since "
            f"the server merges only tensors of that method: remove peft from this node's "
            f"config or join a run of peft={node_peft}")
    if DP_SGD_BUDGET in node:  # the node's privacy budget is its own
        defaults = all_keys()
        for key in DP_SGD_NODE_KEYS:
            if key in run and key not in node and run[key] != defaults[key][0]:
                log.warning("ignored %s=%r from the run config: this node has its own "
                            "dp-sgd budget, at its own %s", key, run[key], key)
                run.pop(key)
    settings, method = load(run, node)
    if DP_SGD_BUDGET in node and not settings.train.dp_sgd:
        raise Refused(
            f"setting 'dp-sgd': this node has a record-level privacy budget "
            f"({DP_SGD_BUDGET}={node[DP_SGD_BUDGET]}), but the run trains "
            f"without dp-sgd; it trains only runs with dp-sgd=true")
    if is_deployment_node(context):
        problems = limit_refusals(settings, node, evaluating=task == MessageType.EVALUATE)
        hub = hub_refusal(settings, run, node, tuple(BUILTINS))
        if problems or hub:
            raise Refused("; ".join([*problems, *([hub] if hub else [])]))
    if node.get(wire.REQUIRE_SECURE_AGGREGATION) and not settings.federation.secure_aggregation:
        raise Refused(
            "setting 'secure-aggregation': this node requires secure aggregation (fedlora "
            "client --require-secure-aggregation), and the run does not use it, so the server "
            "would read this node's update; start the run with secure-aggregation=true")
    if settings.attack.on and is_deployment_node(context):
        raise Refused(
            f"setting 'attack': the run asks this node to act as a simulated hostile client "
            f"(attack={settings.attack.attack}); attacks exist for fedlora simulate only, and "
            f"a deployment node refuses them")
    return settings, method


def dp_sgd_plan(settings: Settings, examples: list[dict], entries: int,
                server_round: int) -> DpSgdPlan | None:
    """This node's DP-SGD plan for the run (None without dp-sgd), logged, with a warning in
    round 1 when its noise swamps what a step of `entries` trained entries learns; raises
    Refused (a SettingsError the server is told as it is) naming the epsilon the run would
    spend and the budget when it would spend more."""
    train = settings.train
    if not train.dp_sgd:
        return None
    try:
        plan = plan_dp_sgd(train, settings.federation.num_rounds, len(examples))
    except SettingsError as err:  # the run's numbers against the node's budget: said as is
        raise Refused(str(err)) from None
    log.info("dp-sgd: noise multiplier %.4g, clip %g, sample rate %.4g, %d steps planned: "
             "epsilon %.4g of the budget %g at delta %g", plan.noise_multiplier, plan.clip,
             plan.sample_rate, plan.steps, plan.planned_epsilon, plan.target_epsilon,
             plan.delta)
    warning = noise_warning(plan, entries) if server_round == 1 else None
    if warning:
        log.warning("%s", warning)
    return plan


def spend_dp_sgd(context: Context, plan: DpSgdPlan, server_round: int, steps: int) -> float:
    """Count this round's `steps` in the node's state (its accountant for the run) and
    return the epsilon spent so far. A node with no count yet (its first round, or a run
    resumed) counts every earlier round as trained: the bound never undercounts."""
    record = context.state.config_records.get(DP_SGD_STATE)
    before = (int(record["steps"]) if record is not None  # type: ignore[arg-type]
              else (server_round - 1) * steps)
    total = before + steps
    context.state.config_records[DP_SGD_STATE] = ConfigRecord({"steps": total})
    spent = plan.epsilon(total)
    log.info("dp-sgd: epsilon %.4g spent after %d steps (round %d), of the budget %g at "
             "delta %g", spent, total, server_round, plan.target_epsilon, plan.delta)
    return spent


def node_rank(settings: Settings, context: Context, partition_id: int) -> int:
    """The rank this node trains at: its own `lora-rank` when its config sets one, else its
    place in `client-ranks` (a simulation setting), else the run's `lora-rank`."""
    if wire.LORA_RANK in context.node_config:
        return settings.lora.rank
    return settings.lora.rank_for(partition_id, settings.federation.seed)


def client_data(settings: Settings, slot: Slot, pid: int, n: int, guarded: bool = False
                ) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Client `pid` of `n`'s tokenized (train, eval) examples, its held-out records (for
    generation-based accuracy) and its training records, cached per process (small LRU).
    `guarded` (a deployment node): a failure to read them is a DataProblem, and a run's
    `hf:` id that is also a path on the node fails the same way."""
    length, cut = settings.train.max_length, settings.train.truncation
    key = (slot.source.path, repr(settings.data), length, cut, settings.federation.seed, pid, n)
    if key not in DATA:
        try:
            train, held_out, examples = read_split(settings, slot, pid, n, guarded)
        except Exception as exc:
            if not guarded:
                raise
            raise DataProblem(f"client {pid} could not read its data: {exc}") from exc
        if settings.data.packing:
            examples = pack_with(slot.tokenizer, examples, length)
        # eval stays unpacked: its loss per example does not depend on the packing setting
        held = tokenize_for(held_out, slot.tokenizer, settings.train.objective, length, cut,
                            settings.data.train_on)
        DATA[key] = (examples, held, held_out, train)
        if len(DATA) > DATA_CACHE_SIZE:
            DATA.popitem(last=False)
    DATA.move_to_end(key)
    return DATA[key]


def read_split(settings: Settings, slot: Slot, pid: int, n: int, guarded: bool
               ) -> tuple[list[dict], list[dict], list[dict]]:
    """Client `pid` of `n`'s (train, eval) records and its tokenized training examples."""
    data = settings.data
    if guarded and not data.data_path and data.dataset.startswith(HUB_PREFIX):
        name = data.dataset[len(HUB_PREFIX):].partition(":")[0]
        if Path(name).expanduser().exists():  # the hub's answer for a missing id looks alike
            raise ValueError(f"the run's dataset {data.dataset!r} is also a path on this node; "
                             f"a run config may not name paths on a node")
    length, cut = settings.train.max_length, settings.train.truncation
    train, held_out = client_records(data, pid, n, settings.federation.seed)
    # objective=dpo: preference pairs (BIG-bench multiple choice made into pairs)
    objective, source = settings.train.objective, data.data_path or data.dataset
    seed = settings.federation.seed + pid
    train, held_out = (for_objective(train, objective, seed, source),
                       for_objective(held_out, objective, seed, source))
    examples = tokenize_for(train, slot.tokenizer, objective, length, cut, data.train_on)
    warning = check_answers(examples, f"client {pid}", length, cut)  # raises when none
    if warning:
        log.warning(warning)
    return train, held_out, examples


def is_dpo(settings: Settings) -> bool:
    """Does this run train on preference pairs (objective=dpo)?"""
    return settings.train.objective == "dpo"


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
    settings, method = node_settings(context, msg.metadata.message_type)
    resolve_device(settings.model.device)  # fail early and clearly on a missing GPU
    guarded = is_deployment_node(context)
    try:
        devices = node_devices(settings.model, guarded)
    except ValueError as err:  # the node's devices against its settings: said as is
        raise Refused(str(err)) from None
    if len(devices) > 1:  # data parallel: this process is rank 0, on the first device
        settings = replace(settings, model=replace(settings.model, device=devices[0]))
    name = settings.model.name
    if guarded and "model" not in context.node_config and name not in BUILTINS and \
            Path(name).expanduser().exists():  # fails as a hub id that is not there does
        raise ModelLoadError(f"the run's model {name!r} is also a path on this node; a run "
                             f"config may not name paths on a node")
    rank = config_int(msg, wire.RANK)
    lora = replace(settings.lora, rank=rank)
    slot = WORKSPACE.get(settings.model, lora, settings.train)
    residual = msg.content.array_records.get(wire.RESIDUAL)
    factors = unflatten(from_array_record(residual)) if residual else None
    set_residual(slot, lora, factors)
    pid, n = partition(context)
    server_round = config_int(msg, wire.SERVER_ROUND)
    store = personal_store(settings.federation.personal_dir, context, pid, server_round,
                           evaluating=msg.metadata.message_type == MessageType.EVALUATE)
    start = method.client_start(received_state(msg, slot, rank), store)
    slot.peft.set_state(slot.model, slot.adapter, {k: v.float() for k, v in start.items()})
    return Job(settings, method, slot, pid, n, rank, server_round, start, store, guarded,
               tuple(devices), factors)


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


def guarded(handler: Callable[[Message, Context], Message]
            ) -> Callable[[Message, Context], Message]:
    """`handler` whose failure on a deployment node becomes an error reply that carries no
    text of the node's (`fedlora.node_rules.public_reason`): the exception, which may quote a
    record or name a file, is logged on the node under the error id the reply names. In
    simulation (no node-name) the exception propagates, and Flower's reply carries it."""
    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        if not is_deployment_node(context):
            return handler(msg, context)
        try:
            return handler(msg, context)
        except Exception as exc:  # the server gets the generic reason, the log the details
            error_id = secrets.token_hex(4)
            task = msg.metadata.message_type
            log.error("error id %s: the %s task failed", error_id, task, exc_info=exc)
            reason = public_reason(str(context.node_config[wire.NODE_NAME]), task, exc,
                                   error_id, run_config_problem(context))
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                           reply_to=msg)
    return run


def run_config_problem(context: Context) -> str | None:
    """What is wrong with the run config by itself (checked without the node's config or
    files, so its words are the run config's own), or None."""
    run = {k: v for k, v in context.run_config.items() if k not in NODE_PATH_KEYS}
    try:
        load(run, {})
    except SettingsError as exc:
        return str(exc)
    return None


@app.query()
@guarded
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's LoRA rank (asked once, before the node's first round),
    or answer a stage of secure aggregation (`clients.secagg`)."""
    if secagg.settings_of(msg) is not None:
        return secagg.stage(msg, context)
    settings, _ = node_settings(context, msg.metadata.message_type)
    pid, _ = partition(context)
    rank = node_rank(settings, context, pid)
    content: dict = {wire.METRICS: MetricRecord({wire.LORA_RANK: rank, wire.PARTITION_ID: pid})}
    if is_deployment_node(context):  # the server names this node in its log and metrics
        name = str(context.node_config[wire.NODE_NAME])
        content[wire.NODE] = ConfigRecord({wire.NODE_NAME: name})
    return Message(RecordDict(content), reply_to=msg)


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with factors and metrics."""
    if (secure := secagg.settings_of(msg)) is not None and \
            (problem := secagg.size_refusal(secure, context.node_config)):
        raise Refused(problem)  # before any work: the sum would be too small for this node
    job = prepare(msg, context)
    settings, slot, pid = job.settings, job.slot, job.partition_id
    train_set, _, _, records = client_data(settings, slot, pid, job.num_partitions,
                                           job.guarded)
    config = dict(msg.content.config_records[wire.CONFIG])
    with job.method.local_training(slot.model, slot.adapter, pid, settings, config, train_set,
                                   records) as local:
        hooks = slot.peft.training_hooks(  # what the federated and the PEFT method change
            slot.model, slot.adapter, settings.lora,
            replace(local, proximal_mu=job.method.proximal_mu(settings)))
        plan = RoundPlan(job.server_round, settings.federation.num_rounds, job.seed)
        if is_dpo(settings):  # the reference: the adapter this round starts from
            hooks = dpo_training(slot.model, hooks, train_set, slot.tokenizer.pad_token_id,
                                 settings.train, plan.seed)
        entries = sum(p.numel() for p in slot.model.parameters() if p.requires_grad)
        private = dp_sgd_plan(settings, hooks.examples or train_set,  # refused over budget
                              entries, job.server_round)
        desc = f"client {pid} round {job.server_round}"
        if len(job.devices) > 1:  # one process per device (fedlora.train.distributed)
            problem = refusal(settings, hooks, len(job.devices))
            if problem:
                raise Refused(problem)
            result = train_parallel(list(job.devices), slot, settings,
                                    hooks.examples or train_set, plan, hooks, job.residual,
                                    desc)
        else:
            result = train_local(slot.model, slot.adapter, train_set,
                                 slot.tokenizer.pad_token_id, settings.train, plan, hooks,
                                 desc=desc)
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
        raise Refused("this node requires secure aggregation (fedlora client "
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
        if (global_rank := secagg.padded_rank(secure)) is not None:  # hetlora's whole factors
            change = secagg.padded(job.start, change, settings.lora.scale(rank), global_rank)
        grouped = job.method.secagg_grouped  # lora-moe: each expert over its trainers
        experts = job.method.trained_experts(pid, settings.lora, hooks.metrics) if grouped \
            else None
        content[wire.SECAGG], clipped = secagg.train_reply(
            context, secure, job.server_round, change, num_examples,
            job.method.secagg_group if grouped else None, job.method.secagg_trained(experts))
    at, step_losses = thin(result.step_losses, wire.MAX_STEP_LOSSES)  # the trackers' curve
    losses = {wire.TRAIN_LOSS: result.loss, wire.TRAIN_LOSS_FIRST: result.first_loss,
              wire.TRAIN_LOSS_LAST: result.last_loss, wire.TRAIN_LOSS_STEPS: step_losses,
              wire.TRAIN_LOSS_AT: at}
    if private is not None:  # the losses are not privatised: they stay in the node's log
        log.info("client %d round %d: train loss %.4f (dp-sgd: not sent)", pid,
                 job.server_round, result.loss)
        losses = {wire.DP_SGD_EPSILON: spend_dp_sgd(context, private, job.server_round,
                                                    result.steps)}
    metrics = MetricRecord({
        wire.PARTITION_ID: pid, wire.LORA_RANK: rank,
        **losses, wire.TRAIN_STEPS: result.steps,
        wire.TRAIN_TOKENS: result.tokens, wire.TRAIN_SECONDS: result.seconds,
        **hooks.metrics})
    if secure is None:
        metrics[wire.NUM_EXAMPLES] = num_examples
    else:  # the weight is in the secure sum only
        metrics[wire.SECAGG_CLIPPED] = clipped
    return Message(RecordDict({**content, wire.METRICS: metrics}), reply_to=msg)


@app.evaluate()
@guarded
def evaluate_global(msg: Message, context: Context) -> Message:
    """Held-out loss of the received global adapter on this client's eval split (a
    personalised method's node: its own model), and exact-match accuracy of greedy answers
    on eval-accuracy of those examples that name their scorer (exact-match=auto; all: every
    one), counted per task family; a simulated client also sends its first answers of each
    family (`fedlora.train.accuracy.sample_answers`) for the report."""
    job = prepare(msg, context)
    settings, slot = job.settings, job.slot
    _, held_out, records, _ = client_data(settings, slot, job.partition_id,
                                          job.num_partitions, job.guarded)
    if settings.train.eval_examples:
        held_out = held_out[: settings.train.eval_examples]
    desc = f"client {job.partition_id} round {job.server_round}: evaluating"
    result = evaluate(slot.model, held_out, slot.tokenizer.pad_token_id,
                      batch_size=settings.train.batch_size, desc=desc)
    metrics = MetricRecord({wire.NUM_EXAMPLES: result.examples, wire.PARTITION_ID: job.partition_id,
                            wire.EVAL_LOSS: result.loss, wire.EVAL_TOKENS: result.tokens})
    content: dict = {}
    if is_dpo(settings):  # eval-loss: of the chosen responses; and the preference figures
        figures = evaluate_pairs(slot.model, held_out, slot.tokenizer.pad_token_id,
                                 settings.train.dpo_beta, settings.train.batch_size)
        metrics.update(figures_metrics(figures, len(held_out)))
    elif scored := scored_records(records, settings.data.dataset, settings.train.exact_match,
                                  settings.train.eval_accuracy):
        accuracy, _ = exact_match(slot.model, slot.tokenizer, scored, settings.data.dataset,
                                  settings.train.max_new_tokens, generation_batch(settings),
                                  desc)
        metrics.update(accuracy.counts())
        if not job.guarded and accuracy.samples:  # a deployment node keeps its questions
            content[wire.SAMPLES] = ConfigRecord(samples_columns(accuracy.samples))
        # multiple-choice records (BIG-bench) also by their most likely choice
        metrics.update(multiple_choice(slot.model, slot.tokenizer, scored,
                                       generation_batch(settings)).counts())
    return Message(RecordDict({wire.METRICS: metrics, **content}), reply_to=msg)
