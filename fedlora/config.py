"""Settings: the only place where Flower `run_config` / `node_config` keys become typed fields.

Every key a user can type (in `[tool.flwr.app.config]`, `--run-config "k=v"`, or a node's
`--node-config`) is declared once here, with its help text, and validated in `__post_init__`
with a message that names the key, what it expected and what it got. A federated method's own
options (hetlora-prune, residual-rank, ...) are declared with its method in `fedlora.methods`,
and a PEFT method's (adapter-size, ...) with it in `fedlora.adapters`, the same way
(`OptionGroup`); `fedlora.methods.load` reads them all. This module imports neither torch nor
the methods, so validating a command line is instant.
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Self

from fedlora.devices import DeviceSpecError, check_spec
from fedlora.seeds import derive_seed


class SettingsError(ValueError):
    """A setting has the wrong type or value; the message names the key and the fix."""


def setting(key: str, default: Any, help: str) -> Any:
    """Declare a dataclass field bound to a run-config key, with help text."""
    return field(default=default, metadata={"key": key, "help": help})


def require(ok: bool, key: str, expected: str, got: Any) -> None:
    """Raise a SettingsError naming the key when a check fails."""
    if not ok:
        raise SettingsError(f"setting '{key}': expected {expected}, got {got!r}")


def one_of(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    """Raise a SettingsError unless `value` is one of `allowed`."""
    require(value in allowed, key, "one of " + ", ".join(allowed), value)


@dataclass(frozen=True)
class OptionGroup:
    """The options one registered piece declares (a federated method's, a PEFT method's):
    none by default; subclasses add `setting(...)` fields and check them in `__post_init__`."""

    @classmethod
    def keys(cls) -> dict[str, tuple[Any, str]]:
        """{run-config key: (default, help)} of these options."""
        return section_keys(cls)

    @staticmethod
    def collect(groups: Iterable[type[OptionGroup]]) -> dict[str, tuple[Any, str]]:
        """The keys of several option groups together (a registry's)."""
        return {k: v for group in groups for k, v in group.keys().items()}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Self:
        """The options whose keys appear in `values` (already typed), others at default."""
        return cls(**{f.name: values[f.metadata["key"]] for f in keyed(cls)
                      if f.metadata["key"] in values})


QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "linear", "cosine")
TRUNCATIONS = ("left", "right")
OPTIMIZERS = ("adamw", "paged-adamw-8bit")
WIRE_DTYPES = ("float32", "float16")
PARTITIONERS = ("iid", "dirichlet", "by-field", "quantity-skew")
# target-modules=all-linear: every linear layer of the model except its output head, resolved
# from the model itself as PEFT's own all-linear does (any architecture: Llama, OPT, GPT-2, ...)
ALL_LINEAR = "all-linear"
# Ranks that the named client-rank distributions draw from (FlexLoRA's rank settings).
RANK_POOL = (4, 8, 16, 32, 64)
RANK_DISTRIBUTIONS = ("uniform", "heavy-tail")
# The server optimisers of fedlora.aggregation.server_opt (a test keeps the two in step).
SERVER_OPTIMIZERS = ("fedadagrad", "fedadam", "fedavgm", "fedyogi", "none")
ROUND_FAILURES = ("retry", "stop")
EXACT_MATCH = ("auto", "all")  # which held-out records are answered (fedlora.train.accuracy)
DP_CLIPPING = ("server", "client")
# The robust merges of fedlora.aggregation.robust and the attacks of fedlora.attacks
ROBUST_RULES = ("none", "median", "trimmed-mean", "krum")
CLIENT_WEIGHTS = ("examples", "equal")
ATTACKS = ("none", "scale", "sign-flip", "noise", "constant", "inflate-examples")
# The experiment trackers of fedlora.tracking (`tracker`: any of them, comma-separated)
TRACKERS = ("tensorboard", "mlflow", "wandb")


def parse_client_ranks(spec: str) -> tuple[str, tuple[int, ...]]:
    """'4,8,16' -> ('cycle', (4, 8, 16)); 'uniform' / 'heavy-tail[:4,8]' -> (name, pool)."""
    name, _, numbers = spec.strip().partition(":")
    if name in RANK_DISTRIBUTIONS:
        pool = numbers or ",".join(map(str, RANK_POOL))
        kind = name
    else:
        kind, pool = "cycle", spec
    try:
        ranks = tuple(int(r) for r in pool.split(",") if r.strip())
    except ValueError:
        ranks = ()
    require(bool(ranks) and min(ranks) >= 1, "client-ranks",
             "a comma-separated list of ranks >= 1 such as 4,8,16, or uniform, heavy-tail, "
             "uniform:4,8,16", spec)
    return kind, ranks


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale of a rank-`rank` adapter: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


# Prefixes of a data source (`dataset`, `data-path`): a hub dataset, BIG-bench task files
HUB_PREFIX = "hf:"
BIGBENCH_PREFIX = "bigbench:"  # read by fedlora.data.bigbench

# Record fields a loader understands (see fedlora/data/loaders.py); field-map renames to these.
RECORD_FIELDS = ("instruction", "input", "output", "prompt", "completion", "messages",
                 "conversations", "text", "chosen", "rejected")  # chosen, rejected: objective=dpo
CHAT_ROLES = ("user", "assistant", "system")  # what roles-map renames ShareGPT roles to
TRAIN_ON = ("all-assistant", "last-assistant")  # which assistant turns a conversation trains


def parse_field_map(spec: str) -> dict[str, str]:
    """'instruction=question,output=answer' -> {'instruction': 'question', 'output': 'answer'}."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        ours, _, theirs = (x.strip() for x in part.partition("="))
        require(ours in RECORD_FIELDS and bool(theirs) and ours not in mapping, "field-map",
                 "comma-separated <field>=<your column> pairs, each field once, with <field> "
                 "one of " + ", ".join(RECORD_FIELDS) + " (e.g. instruction=question,"
                 "output=answer)", spec)
        mapping[ours] = theirs
    return mapping


def parse_roles_map(spec: str) -> dict[str, str]:
    """'bot=assistant,person=user' -> {'bot': 'assistant', 'person': 'user'}: ShareGPT `from`
    names (yours) as chat roles (ours)."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        theirs, _, ours = (x.strip() for x in part.partition("="))
        require(ours in CHAT_ROLES and bool(theirs) and theirs not in mapping, "roles-map",
                 "comma-separated <your role>=<ours> pairs, each of yours once, with <ours> "
                 "one of " + ", ".join(CHAT_ROLES) + " (e.g. bot=assistant,person=user)", spec)
        mapping[theirs] = ours
    return mapping


@dataclass
class ModelSettings:
    """Which base model to load and how."""

    name: str = setting(
        "model", "smollm2-135m",
        "Base model: a built-in name (tiny-llama, smollm2-135m), a local model directory, "
        "a .gguf file, or a Hugging Face hub id (online only).")
    quantization: str = setting(
        "quantization", "none", "Base weights: none, 8bit or 4bit (NF4 + double quant, QLoRA).")
    compute_dtype: str = setting(
        "compute-dtype", "auto",
        "dtype of 4-bit matmuls: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, "
        "float16.")
    device: str = setting("device", "auto", "auto (CUDA if available), cpu, cuda or cuda:N.")
    devices: str = setting(
        "devices", "auto",
        "A fedlora client node's processes: auto (one per visible CUDA device when there are "
        "several, else one on `device`), a count N, a CUDA list (0,1) or cpu:N; several "
        "train data parallel (docs/deployment.md). In simulation: one process.")
    shard: bool = setting(
        "shard", False,
        "Split one copy of the base across the `devices` (device_map=balanced, one process) "
        "for a base larger than one device, instead of one copy per device.")

    def __post_init__(self) -> None:
        require(bool(self.name.strip()), "model", "a model name or path", self.name)
        one_of("quantization", self.quantization, QUANTIZATIONS)
        one_of("compute-dtype", self.compute_dtype, DTYPES)
        ok = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit())
        require(ok, "device", "auto, cpu, cuda or cuda:N", self.device)
        try:
            check_spec(self.devices)
        except DeviceSpecError as err:
            raise SettingsError(str(err)) from None
        require(not (self.shard and self.devices.strip().startswith("cpu:")), "shard",
                "false with devices=cpu:N (a model is split across CUDA devices only)", True)


@dataclass
class LoraSettings:
    """The adapter trained on each client: its PEFT method and, for LoRA, its factors."""

    peft: str = setting(
        "peft", "lora",
        "Parameter-efficient method trained on each client: lora (default; QLoRA with "
        "quantization=4bit) or another PEFT method of fedlora.adapters; `fedlora settings` "
        "lists them, their options and the strategies that federate each; see "
        "docs/peft-methods.md.")
    rank: int = setting("lora-rank", 8, "LoRA rank r (>= 1).")
    alpha: float = setting("lora-alpha", 16.0, "LoRA alpha; the update is scaled by alpha/r "
                            "(alpha/sqrt(r) with rsLoRA).")
    dropout: float = setting("lora-dropout", 0.05, "Dropout on the LoRA input, in [0, 1).")
    target_modules: str = setting(
        "target-modules", "all-linear",
        "Comma-separated module names to adapt, or all-linear (every linear layer of the model "
        "but its output head, on any architecture, as PEFT's all-linear).")
    use_rslora: bool = setting("use-rslora", False, "Scale by alpha/sqrt(r) instead of alpha/r.")
    client_ranks: str = setting(
        "client-ranks", "",
        "Per-client ranks in simulation: empty (all use lora-rank), a list cycled over clients "
        "(4,8,16,32), or a distribution over 4,8,16,32,64: uniform, heavy-tail (most clients "
        "small), optionally with its own pool (heavy-tail:4,8,16).")
    # the PEFT methods' own options ({key: typed value}, declared by each method of
    # `fedlora.adapters` in its `Options`); a method reads its own with `options_of`
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(bool(self.peft.strip()), "peft", "a PEFT method name such as lora", self.peft)
        require(self.rank >= 1, "lora-rank", "an integer >= 1", self.rank)
        if self.client_ranks:
            parse_client_ranks(self.client_ranks)
        require(self.alpha > 0, "lora-alpha", "a number > 0", self.alpha)
        require(0 <= self.dropout < 1, "lora-dropout", "a number in [0, 1)", self.dropout)
        require(bool(self.modules()), "target-modules", "at least one module name",
                 self.target_modules)

    @property
    def all_linear(self) -> bool:
        """Whether target-modules is all-linear (resolved from the model, not from a list)."""
        return self.target_modules.strip().lower() == ALL_LINEAR

    def modules(self) -> list[str]:
        """Target module names as given; all-linear stays the one name ALL_LINEAR, which
        `fedlora.adapters.target_names` resolves from the model."""
        if self.all_linear:
            return [ALL_LINEAR]
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def scale(self, rank: int) -> float:
        """LoRA scale of an adapter of `rank` trained with these settings (alpha/r, or
        alpha/sqrt(r) with rsLoRA)."""
        return lora_scale(rank, self.alpha, self.use_rslora)

    def possible_ranks(self) -> tuple[int, ...]:
        """Every rank a client of this run may train at."""
        return parse_client_ranks(self.client_ranks)[1] if self.client_ranks else (self.rank,)

    def rank_for(self, partition_id: int, seed: int) -> int:
        """The rank of simulated client `partition_id` (deterministic in the seed)."""
        if not self.client_ranks:
            return self.rank
        kind, ranks = parse_client_ranks(self.client_ranks)
        if kind == "cycle":
            return ranks[partition_id % len(ranks)]
        rng = random.Random(derive_seed(seed, partition_id))
        pool = sorted(ranks)
        # heavy-tail: P(rank i) ~ 2^-i, so most clients get the smallest ranks
        weights = [1.0] * len(pool) if kind == "uniform" else [2.0 ** -i for i in range(len(pool))]
        return rng.choices(pool, weights=weights)[0]


OBJECTIVES = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class TrainSettings:
    """Local training on a client."""

    local_steps: int = setting("local-steps", 10, "Optimizer steps per round on each client.")
    batch_size: int = setting("batch-size", 4, "Examples per micro-batch.")
    grad_accum: int = setting("grad-accum", 1, "Micro-batches accumulated per optimizer step.")
    lr: float = setting("lr", 1e-3, "Peak learning rate.")
    lora_plus_ratio: float = setting(
        "lora-plus-ratio", 1.0,
        "LoRA+ (Hayou et al. 2024): B's learning rate is this times A's (lr); the paper uses "
        "about 16. 1 = plain LoRA.")
    lr_schedule: str = setting(
        "lr-schedule", "cosine",
        "constant, linear or cosine; continues across rounds (step = (round-1)*local-steps + i).")
    warmup_steps: int = setting("warmup-steps", 0, "Linear warm-up steps at the start of the run.")
    weight_decay: float = setting("weight-decay", 0.0, "AdamW weight decay.")
    max_grad_norm: float = setting("max-grad-norm", 1.0, "Gradient clipping norm (0 = off).")
    optimizer: str = setting("optimizer", "adamw",
                              "adamw, or paged-adamw-8bit (bitsandbytes, CUDA only).")
    max_length: int = setting(
        "max-length", 256,
        "Max tokens per example (prompt + answer); longer ones are cut as truncation says. A "
        "client none of whose examples keeps an answer token is refused before it trains.")
    truncation: str = setting(
        "truncation", "left",
        "Where a too long example is cut: left (the prompt's start goes first, keeping at "
        "least half of max-length of it, so that the answer stays) or right (the end goes "
        "first: the answer, then the prompt's end).")
    bf16: bool = setting("bf16", False, "bf16 autocast for the forward pass (use on GPUs).")
    gradient_checkpointing: bool = setting(
        "gradient-checkpointing", False, "Recompute activations to save memory (slower).")
    eval_examples: int = setting("eval-examples", 32,
                                  "Held-out examples per client evaluation (0 = all).")
    eval_accuracy: int = setting(
        "eval-accuracy", 32,
        "Held-out examples per client answered by greedy generation and scored by exact match "
        "each evaluation (accuracy, and accuracy/<family> for built-in tasks; 0 = off); "
        "which examples: exact-match.")
    exact_match: str = setting(
        "exact-match", "auto",
        "Which held-out examples eval-accuracy answers: auto (only those that name their "
        "scorer: built-in tasks, BIG-bench targets, records with a scorer field; other data "
        "gets eval loss and perplexity only) or all (every example; exact trimmed equality "
        "where no scorer is named).")
    max_new_tokens: int = setting("max-new-tokens", 24,
                                   "Tokens generated per answer when scoring accuracy.")
    server_eval: int = setting(
        "server-eval", 0,
        "Examples the server scores with the global adapter after every round (eval loss and "
        "accuracy on a held-out set: the union of the simulated clients' held-out splits, or "
        "server-eval-data; 0 = off). Loads the base model in the ServerApp.")
    server_eval_data: str = setting(
        "server-eval-data", "",
        "The server's held-out set when it is not the clients' (any source 'dataset' accepts).")
    proximal_mu: float = setting(
        "proximal-mu", 0.0,
        "FedProx: weight mu of the proximal term (mu/2)||theta - theta_global||^2 on the LoRA "
        "parameters (0 = off; strategy fedprox uses 0.01 when this is 0).")
    dp_sgd: bool = setting(
        "dp-sgd", False,
        "Record-level differential privacy at every site (DP-SGD): each step a Poisson sample "
        "of the node's examples, each example's gradient clipped to dp-sgd-clip, Gaussian "
        "noise added; the node's own accountant keeps the whole run within dp-sgd-epsilon. "
        "Not with packing or gradient-checkpointing; docs/dp-sgd.md lists the PEFT methods.")
    dp_sgd_clip: float = setting("dp-sgd-clip", 1.0,
                                 "dp-sgd: L2 norm each example's gradient is clipped to.")
    dp_sgd_noise_multiplier: float = setting(
        "dp-sgd-noise-multiplier", 0.0,
        "dp-sgd: noise std as a multiple of dp-sgd-clip (0 = the smallest that keeps the "
        "whole run within dp-sgd-epsilon); a run that would spend more is refused.")
    dp_sgd_epsilon: float = setting(
        "dp-sgd-epsilon", 8.0,
        "dp-sgd: each site's epsilon over the whole run, at dp-sgd-delta. A node's own "
        "(fedlora client --dp-sgd-epsilon) is its budget, which the run config cannot change.")
    dp_sgd_delta: float = setting("dp-sgd-delta", 1e-5,
                                  "dp-sgd: delta of each site's (epsilon, delta).")
    objective: str = setting(
        "objective", "sft",
        "What local training optimises: sft (next-token loss on the answers) or dpo "
        "(preference pairs {prompt, chosen, rejected}: DPO against the adapter each round "
        "starts from; docs/alignment.md).")
    dpo_beta: float = setting("dpo-beta", 0.1,
                              "dpo: beta, how far the policy may move from the reference.")
    dpo_loss: str = setting("dpo-loss", "sigmoid",
                            "dpo: sigmoid (DPO, Rafailov et al. 2023) or ipo (Azar et al. 2023).")

    def __post_init__(self) -> None:
        for key, value in (("local-steps", self.local_steps), ("batch-size", self.batch_size),
                           ("grad-accum", self.grad_accum)):
            require(value >= 1, key, "an integer >= 1", value)
        require(self.lr > 0, "lr", "a number > 0", self.lr)
        require(self.lora_plus_ratio > 0, "lora-plus-ratio", "a number > 0 (1 = off)",
                self.lora_plus_ratio)
        one_of("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        require(self.warmup_steps >= 0, "warmup-steps", "an integer >= 0", self.warmup_steps)
        require(self.weight_decay >= 0, "weight-decay", "a number >= 0", self.weight_decay)
        require(self.max_grad_norm >= 0, "max-grad-norm", "a number >= 0", self.max_grad_norm)
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("truncation", self.truncation, TRUNCATIONS)
        require(self.max_length >= 8, "max-length", "an integer >= 8", self.max_length)
        require(self.eval_examples >= 0, "eval-examples", "an integer >= 0", self.eval_examples)
        require(self.proximal_mu >= 0, "proximal-mu", "a number >= 0", self.proximal_mu)
        require(self.eval_accuracy >= 0, "eval-accuracy", "an integer >= 0", self.eval_accuracy)
        one_of("exact-match", self.exact_match, EXACT_MATCH)
        require(self.max_new_tokens >= 1, "max-new-tokens", "an integer >= 1",
                 self.max_new_tokens)
        require(self.server_eval >= 0, "server-eval", "an integer >= 0", self.server_eval)
        require(self.dp_sgd_clip > 0, "dp-sgd-clip", "a number > 0", self.dp_sgd_clip)
        require(self.dp_sgd_noise_multiplier >= 0, "dp-sgd-noise-multiplier",
                "a number >= 0 (0 = derived from dp-sgd-epsilon)", self.dp_sgd_noise_multiplier)
        require(self.dp_sgd_epsilon > 0, "dp-sgd-epsilon", "a number > 0",
                self.dp_sgd_epsilon)
        require(0 < self.dp_sgd_delta < 1, "dp-sgd-delta", "a number in (0, 1)",
                self.dp_sgd_delta)
        one_of("objective", self.objective, OBJECTIVES)
        require(self.dpo_beta > 0, "dpo-beta", "a number > 0", self.dpo_beta)
        one_of("dpo-loss", self.dpo_loss, DPO_LOSSES)
        if self.dp_sgd and self.gradient_checkpointing:
            raise SettingsError(
                "setting 'gradient-checkpointing': dp-sgd's per-example gradient hooks see "
                "each forward pass once, and checkpointing runs it again; set "
                "gradient-checkpointing=false with dp-sgd")


@dataclass
class DataSettings:
    """Where each client's examples come from."""

    dataset: str = setting(
        "dataset", "builtin:units",
        "builtin:<task> (generated by code, no download: arithmetic, dates, facts, json, "
        "strings, units, suite = all of them, or a list like builtin:units,dates); a data file "
        "(.jsonl, .json, .csv, .tsv, .parquet); a folder written by datasets' save_to_disk; "
        "hf:<owner/name>[:<config>] for a Hugging Face hub dataset (online only); or "
        "bigbench:<task.json or folder> for BIG-bench JSON tasks (task = the task's name).")
    dataset_size: int = setting("dataset-size", 2000,
                                 "Examples generated for a builtin task (all clients together).")
    eval_fraction: float = setting("eval-fraction", 0.1,
                                    "Share of each client's examples held out for evaluation.")
    partitioner: str = setting(
        "partitioner", "iid",
        "How a dataset is split over clients: iid; dirichlet (label skew over "
        "partition-field with concentration dirichlet-alpha); by-field (one value of "
        "partition-field per client, shared round-robin when clients outnumber values); "
        "quantity-skew (client sizes ~ Dirichlet(dirichlet-alpha), labels ignored).")
    partition_field: str = setting(
        "partition-field", "task",
        "Record field that labels records for the dirichlet and by-field partitioners "
        "(builtin tasks: task = the family in builtin:suite, kind = the question type).")
    dirichlet_alpha: float = setting(
        "dirichlet-alpha", 0.5,
        "Dirichlet concentration of dirichlet (0.1 ~ one label per client, 100 ~ IID) and "
        "quantity-skew (0.1 ~ a few clients hold most records, 100 ~ equal sizes).")
    data_path: str = setting(
        "data-path", "",
        "A node's own data (deployment): any file, folder or hf: id that 'dataset' accepts "
        "except builtin; overrides 'dataset' there.")
    field_map: str = setting(
        "field-map", "",
        "Rename your record fields to ours: comma-separated <ours>=<yours>, e.g. "
        "instruction=question,output=answer (ours: " + ", ".join(RECORD_FIELDS) + ").")
    roles_map: str = setting(
        "roles-map", "",
        "Name ShareGPT roles: comma-separated <yours>=<ours>, e.g. bot=assistant,person=user "
        "(ours: " + ", ".join(CHAT_ROLES) + "), merged over the built-in human/gpt/system.")
    data_split: str = setting(
        "data-split", "train",
        "Split to read from a save_to_disk DatasetDict folder or an hf: hub dataset.")
    train_on: str = setting(
        "train-on", "all-assistant",
        "Which assistant turns of a conversation are targets: all-assistant (as TRL) or "
        "last-assistant (earlier turns are context); a turn with \"weight\": 0 is context "
        "either way. Evaluation scores the same tokens.")
    packing: bool = setting(
        "packing", False,
        "Concatenate tokenized training examples (an EOS between them) into sequences of "
        "max-length tokens; prompt tokens stay out of the loss, and position ids restart at "
        "every example so that none attends to another. Eval examples stay unpacked.")

    def __post_init__(self) -> None:
        require(bool(self.dataset.strip()), "dataset", "builtin:<task> or a file path",
                 self.dataset)
        require(self.dataset_size >= 1, "dataset-size", "an integer >= 1", self.dataset_size)
        require(0 <= self.eval_fraction < 1, "eval-fraction", "a number in [0, 1)",
                 self.eval_fraction)
        one_of("partitioner", self.partitioner, PARTITIONERS)
        require(self.dirichlet_alpha > 0, "dirichlet-alpha", "a number > 0",
                 self.dirichlet_alpha)
        parse_field_map(self.field_map)
        parse_roles_map(self.roles_map)
        require(bool(self.data_split.strip()), "data-split", "a split name such as train",
                 self.data_split)
        one_of("train-on", self.train_on, TRAIN_ON)

    def field_mapping(self) -> dict[str, str]:
        """field-map as {our field: your field}."""
        return parse_field_map(self.field_map)

    def roles_mapping(self) -> dict[str, str]:
        """roles-map as {your ShareGPT role: our chat role}."""
        return parse_roles_map(self.roles_map)


@dataclass
class FederationSettings:
    """Rounds, sampling, merging and what crosses the wire."""

    num_rounds: int = setting("num-server-rounds", 3, "Federated rounds.")
    strategy: str = setting("strategy", "fedavg",
                             "The federated method (fedlora.methods): fedavg by default; "
                             "`fedlora settings` lists every registered one with the PEFT "
                             "methods, robust rules, DP and server optimisers it works with.")
    fraction_train: float = setting("fraction-train", 1.0,
                                     "Share of connected clients sampled to train each round.")
    fraction_evaluate: float = setting("fraction-evaluate", 1.0,
                                        "Share sampled to evaluate the merged adapter (0 = off).")
    initial_eval: bool = setting(
        "initial-eval", True,
        "Evaluate the global model before round 1 (round 0 in metrics.jsonl: the base model's "
        "score, to compare the federated adapter with).")
    min_train_nodes: int = setting("min-train-nodes", 2, "Fewest clients that train in a round.")
    min_evaluate_nodes: int = setting("min-evaluate-nodes", 2, "Fewest clients that evaluate.")
    min_available_nodes: int = setting("min-available-nodes", 2,
                                        "Clients that must be connected before a round starts.")
    max_num_examples: int = setting(
        "max-num-examples", 10_000_000,
        "A reply claiming more examples than this is dropped (it would dominate the weights).")
    max_update_norm: float = setting(
        "max-update-norm", 0.0,
        "Drop a reply whose update ||delta W||_F (all modules) exceeds this (0 = no bound).")
    round_timeout: float = setting("round-timeout", 3600.0,
                                    "Seconds to wait for client replies in each phase.")
    spill_above_mb: float = setting(
        "spill-above-mb", 1024.0,
        "When a round's replies are expected to exceed this many MB, the server writes each "
        "to <output-dir>/.spill as it arrives and merges from there, so its memory does not "
        "grow with the number of sites (0 = always, -1 = never; docs/scaling.md).")
    min_replies: int = setting(
        "min-replies", 0,
        "Valid training replies a round needs to be merged (0 = min-train-nodes); nodes that "
        "crash, time out or send a rejected reply are counted and skipped.")
    round_failure: str = setting(
        "round-failure", "retry",
        "When a round gets fewer than min-replies: retry it (up to round-retries times, then "
        "stop) or stop at once; the last complete round stays on disk for --resume.")
    round_retries: int = setting("round-retries", 2, "Retries of a failed round (retry mode).")
    clip_norm: float = setting(
        "clip-norm", 0.0,
        "Clip each client's update (change of the factors it sends, delta-W scale, L2 over all "
        "modules) to this norm before merging (0 = off). Required by dp-noise-multiplier.")
    dp_noise_multiplier: float = setting(
        "dp-noise-multiplier", 0.0,
        "Client-level differential privacy (0 = off): equal client weights and Gaussian noise "
        "of std multiplier x clip-norm / clients on the merged factors; epsilon is reported "
        "each round. Only strategies whose merge is a mean of the factors (`fedlora settings`).")
    dp_delta: float = setting("dp-delta", 1e-5, "delta of the (epsilon, delta) reported.")
    dp_clipping: str = setting(
        "dp-clipping", "server",
        "Where updates are clipped to clip-norm: server (the server sees raw updates) or "
        "client (nodes clip before sending; the server rejects a reply above clip-norm).")
    secure_aggregation: bool = setting(
        "secure-aggregation", False,
        "SecAgg+: the server learns only the sum of the sites' (weighted, quantised) updates "
        "and of their weights, never one site's reply (docs/privacy-secagg.md). Strategies "
        "whose merge is a weighted sum only; screens that need each update are off.")
    secagg_dropout: int = setting(
        "secagg-dropout", 1,
        "Sites that may drop out during one round of secure aggregation and the round still "
        "merges (Shamir threshold = neighbourhood - this, always more than half of it).")
    secagg_neighbours: int = setting(
        "secagg-neighbours", 0,
        "SecAgg+ neighbours per site (an even number: a ring of this degree); 0 = every other "
        "sampled site (SecAgg). Fewer neighbours: less work per site, a weaker collusion bound.")
    secagg_clip: float = setting(
        "secagg-clip", 1.0,
        "Quantisation range of secure aggregation: each entry of a site's weighted change of "
        "the factors is clipped to [-this, this]; the sum's error is at most sites x this / "
        "2^(bits-1) per entry (bits = 32 - log2 sites: 28 for 10 sites).")
    secagg_max_weight: int = setting(
        "secagg-max-weight", 1000,
        "With secure aggregation a site weighs min(num-examples / this, 1): the server never "
        "sees num-examples, so it cannot cap a weight; this is the cap.")
    wire_dtype: str = setting("wire-dtype", "float32",
                               "dtype of the LoRA factors sent both ways: float32 or float16.")
    export_rank: int = setting(
        "export-rank", 0,
        "Rank of the global adapter the server keeps and exports (0 = the largest client "
        "rank); flexlora truncates the exact average to it. Clients train at ranks <= it.")
    server_optimizer: str = setting(
        "server-optimizer", "none",
        "Server optimiser on the pseudo-gradient of the global factors: "
        + ", ".join(SERVER_OPTIMIZERS) + " (not with strategies that rebuild the global "
        "adapter every round; `fedlora settings`).")
    server_lr: float = setting("server-lr", 0.0,
                                "Server learning rate (0 = the optimiser's default).")
    server_momentum: float = setting("server-momentum", 0.9,
                                      "fedavgm momentum / beta1 of fedadam, fedyogi.")
    server_beta2: float = setting("server-beta2", 0.99, "beta2 of fedadam and fedyogi.")
    server_tau: float = setting("server-tau", 1e-3,
                                 "Adaptivity tau of fedadam, fedyogi, fedadagrad.")
    seed: int = setting("seed", 0, "Seed for the initial adapter, data splits and training.")
    output_dir: str = setting("output-dir", "fedlora-output",
                               "Where the server writes metrics.jsonl and adapters.")
    personal_dir: str = setting(
        "personal-dir", "",
        "Where a personalised strategy (fedsa-lora) keeps each client's private factors: "
        "'' = in the node's Flower context (memory, one run); a folder = one safetensors file "
        "per partition-id, read only when that client is sampled (fedlora simulate uses "
        "<output-dir>/personal, so memory does not grow with the number of clients).")
    init_adapter: str = setting(
        "init-adapter", "",
        "Start from a trained LoRA adapter instead of a fresh one: a PEFT adapter folder of the "
        "same model and target modules (a previous run's final/), e.g. SFT rounds, then DPO "
        "rounds. peft=lora only; '' = a fresh adapter.")
    resume: bool = setting(
        "resume", False,
        "Continue the run in output-dir from its last complete round (state/latest.json); "
        "`fedlora server --resume DIR` and `fedlora simulate --resume DIR` set it.")
    tracker: str = setting(
        "tracker", "",
        "Experiment trackers the server logs each round and the clients' per-step loss to: "
        "tensorboard, mlflow, wandb, several comma-separated ('' = none); files under "
        "output-dir (tensorboard/, mlruns/, wandb/ offline). pip install 'fedlora[tracking]'.")

    def __post_init__(self) -> None:
        from fedlora.tracking import names

        names(self.tracker)  # a SettingsError naming the trackers when one is unknown
        require(self.num_rounds >= 1, "num-server-rounds", "an integer >= 1", self.num_rounds)
        require(bool(self.strategy.strip()), "strategy", "a method name (fedlora settings "
                "lists them)", self.strategy)
        require(0 < self.fraction_train <= 1, "fraction-train", "a number in (0, 1]",
                 self.fraction_train)
        require(0 <= self.fraction_evaluate <= 1, "fraction-evaluate", "a number in [0, 1]",
                 self.fraction_evaluate)
        for key, value in (("min-train-nodes", self.min_train_nodes),
                           ("min-evaluate-nodes", self.min_evaluate_nodes),
                           ("min-available-nodes", self.min_available_nodes)):
            require(value >= 1, key, "an integer >= 1", value)
        require(self.round_timeout > 0, "round-timeout", "seconds > 0", self.round_timeout)
        require(self.spill_above_mb >= 0 or self.spill_above_mb == -1, "spill-above-mb",
                "MB >= 0, or -1 (never spill)", self.spill_above_mb)
        require(self.max_num_examples >= 1, "max-num-examples", "an integer >= 1",
                 self.max_num_examples)
        require(self.max_update_norm >= 0, "max-update-norm", "a number >= 0",
                 self.max_update_norm)
        one_of("wire-dtype", self.wire_dtype, WIRE_DTYPES)
        require(self.export_rank >= 0, "export-rank", "an integer >= 0", self.export_rank)
        one_of("server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        require(self.server_lr >= 0, "server-lr", "a number >= 0", self.server_lr)
        require(0 <= self.server_momentum < 1, "server-momentum", "a number in [0, 1)",
                 self.server_momentum)
        require(0 <= self.server_beta2 < 1, "server-beta2", "a number in [0, 1)",
                 self.server_beta2)
        require(self.server_tau > 0, "server-tau", "a number > 0", self.server_tau)
        require(self.min_replies >= 0, "min-replies", "an integer >= 0", self.min_replies)
        one_of("round-failure", self.round_failure, ROUND_FAILURES)
        require(self.round_retries >= 0, "round-retries", "an integer >= 0", self.round_retries)
        require(self.clip_norm >= 0, "clip-norm", "a number >= 0", self.clip_norm)
        require(self.dp_noise_multiplier >= 0, "dp-noise-multiplier", "a number >= 0",
                 self.dp_noise_multiplier)
        require(0 < self.dp_delta < 1, "dp-delta", "a number in (0, 1)", self.dp_delta)
        one_of("dp-clipping", self.dp_clipping, DP_CLIPPING)
        require(self.secagg_dropout >= 0, "secagg-dropout", "an integer >= 0",
                self.secagg_dropout)
        require(self.secagg_neighbours >= 0 and self.secagg_neighbours % 2 == 0,
                "secagg-neighbours", "an even integer >= 0 (0 = all)", self.secagg_neighbours)
        require(self.secagg_clip > 0, "secagg-clip", "a number > 0", self.secagg_clip)
        require(self.secagg_max_weight >= 1, "secagg-max-weight", "an integer >= 1",
                self.secagg_max_weight)


@dataclass
class DefenceSettings:
    """What a hostile reply meets on the server (`fedlora.aggregation.robust`); see
    docs/robustness.md for what each defence holds."""

    max_update_ratio: float = setting(
        "max-update-ratio", 10.0,
        "Drop a reply whose update ||B A - received||_F is above this many times the round's "
        "lower median update norm (0 = off; off with dp-noise-multiplier, whose clipping "
        "bounds every update).")
    max_weight_ratio: float = setting(
        "max-weight-ratio", 10.0,
        "No client weighs more than this many times the round's lower median num-examples; "
        "a larger claim is cut to it (0 = off: weights are the examples claimed).")
    max_share: float = setting(
        "max-share", 0.5,
        "No client's share of a merge is above this (or 1/clients when that is larger): a "
        "larger share is cut to it and the excess goes to the others by their weights. With "
        "the default, one liar among honest clients carries at most half of any merge, "
        "whatever it claims (1 = off: shares follow the weights).")
    client_weights: str = setting(
        "client-weights", "examples",
        "How the merge weighs clients: examples (the num-examples each claims, capped by "
        "max-weight-ratio) or equal (every accepted reply the same; nothing to inflate).")
    robust: str = setting(
        "robust", "none",
        "Robust merge on the clients' delta W: none (the strategy's own merge), median or "
        "trimmed-mean (coordinate-wise, re-factored to the global rank), krum (multi-Krum: the "
        "strategy merges the n - robust-f clients nearest the others); `fedlora settings` "
        "lists the strategies each rule fits.")
    robust_f: int = setting(
        "robust-f", 1,
        "Hostile clients the robust merge tolerates: trimmed-mean drops this many from each "
        "end, krum keeps n - f; needs min-replies >= 2f+1 (median, trimmed-mean) or f+3 (krum).")

    def __post_init__(self) -> None:
        require(self.max_update_ratio == 0 or self.max_update_ratio >= 1, "max-update-ratio",
                "0 (off) or a number >= 1", self.max_update_ratio)
        require(self.max_weight_ratio == 0 or self.max_weight_ratio >= 1, "max-weight-ratio",
                "0 (off) or a number >= 1", self.max_weight_ratio)
        require(0 < self.max_share <= 1, "max-share", "a number in (0, 1] (1 = off)",
                self.max_share)
        one_of("client-weights", self.client_weights, CLIENT_WEIGHTS)
        one_of("robust", self.robust, ROBUST_RULES)
        require(self.robust_f >= 0, "robust-f", "an integer >= 0", self.robust_f)

    def replies_needed(self) -> int:
        """The fewest replies the robust merge needs to tolerate robust-f hostile ones."""
        f = self.robust_f
        return {"none": 1, "median": 2 * f + 1, "trimmed-mean": 2 * f + 1,
                "krum": f + 3}[self.robust]


@dataclass
class AttackSettings:
    """Simulated hostile clients, for experiments (`fedlora.attacks`); `fedlora simulate`
    only: a deployment node refuses them and `fedlora server` rejects them."""

    attack: str = setting(
        "attack", "none",
        "What the hostile clients send: none, scale (update x attack-scale), sign-flip "
        "(update x -attack-scale), noise (Gaussian of attack-scale x the update's RMS), "
        "constant (every factor entry = attack-scale), inflate-examples (an honest update "
        "claiming max-num-examples examples).")
    attack_clients: int = setting("attack-clients", 1,
                                  "How many clients are hostile: partitions 0 .. N-1.")
    attack_scale: float = setting("attack-scale", 100.0,
                                  "Strength of the attack (see attack).")

    def __post_init__(self) -> None:
        one_of("attack", self.attack, ATTACKS)
        require(self.attack_clients >= 0, "attack-clients", "an integer >= 0",
                self.attack_clients)
        require(math.isfinite(self.attack_scale), "attack-scale", "a finite number",
                self.attack_scale)

    @property
    def on(self) -> bool:
        return self.attack != "none" and self.attack_clients > 0

    def hostile(self, partition_id: int) -> bool:
        """Is this simulated client one of the hostile ones?"""
        return self.on and partition_id < self.attack_clients


SECTIONS = {"model": ModelSettings, "lora": LoraSettings, "train": TrainSettings,
            "data": DataSettings, "federation": FederationSettings,
            "defence": DefenceSettings, "attack": AttackSettings}
# A deployment node's ceilings (node-config keys, not settings) -> the `fedlora client` flag
# that sets each: a run config above one is refused by the node (fedlora.node_rules).
NODE_LIMIT_KEYS = {"limit-local-steps": "--max-local-steps", "limit-max-length": "--max-length",
                   "limit-examples": "--max-examples", "allow-hub-downloads": "--no-hub-downloads"}
# Keys of a node_config that are not settings: Flower's own (simulation), the name that
# `fedlora client` gives its node (which also marks a deployment node), whether it requires secure
# aggregation, the key it signs its secure-aggregation keys with, the peers' keys it accepts
# (fedlora.secagg.signing) and the fewest sites of a secure sum it joins, and its ceilings.
NODE_KEYS = ("partition-id", "num-partitions", "node-name", "require-secure-aggregation",
             "secagg-signing-key", "secagg-peers", "secagg-min-sites", *NODE_LIMIT_KEYS)
# Settings that name a file or folder on a node: a deployment node takes them from its own
# node config only, never from the run config (the server does not choose a node's files).
NODE_PATH_KEYS = ("data-path", "personal-dir")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a run-config value to the type of the field's default, or raise."""
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        require(isinstance(value, bool), key, "true or false", value)
        return value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        require(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if isinstance(default, float):
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 "a number", value)
        return float(value)
    require(isinstance(value, str), key, "a string", value)
    return value


@dataclass
class Settings:
    """All settings of a run, grouped by concern."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    defence: DefenceSettings = field(default_factory=DefenceSettings)
    attack: AttackSettings = field(default_factory=AttackSettings)

    options: dict[str, Any] = field(default_factory=dict)  # method options, by key

    def __post_init__(self) -> None:
        if self.federation.fraction_evaluate > 0 and self.data.eval_fraction == 0:
            raise SettingsError("setting 'eval-fraction': expected > 0 when fraction-evaluate > 0 "
                                "(clients need held-out data), got 0; or set fraction-evaluate=0")
        if self.federation.init_adapter and self.lora.peft != "lora":
            raise SettingsError(
                f"setting 'init-adapter': a LoRA adapter starts runs of peft=lora only, got "
                f"peft={self.lora.peft}; set init-adapter='' or peft=lora")
        if self.train.objective == "dpo" and self.data.packing:
            raise SettingsError("setting 'packing': a DPO example is a pair of sequences that "
                                "share a prompt; set packing=false with objective=dpo")
        if self.train.dp_sgd and self.data.packing:
            raise SettingsError(
                "setting 'packing': dp-sgd bounds what one training example adds, and a packed "
                "sequence holds several; set packing=false with dp-sgd")

    @property
    def global_rank(self) -> int:
        """Rank of the server's global adapter: export-rank, or the largest client rank."""
        return self.federation.export_rank or max(self.lora.rank, *self.lora.possible_ranks())

    @classmethod
    def from_config(cls, run_config: Mapping[str, Any],
                    node_config: Mapping[str, Any] | None = None,
                    options: Mapping[str, tuple[Any, str]] | None = None,
                    peft_options: Mapping[str, tuple[Any, str]] | None = None) -> Settings:
        """Build settings from a Flower run_config, with node_config keys taking precedence.

        `options` and `peft_options` ({key: (default, help)}, from `fedlora.methods.option_keys`
        and `fedlora.adapters.option_keys`) are the federated and the PEFT methods' options to
        accept; their values (typed, defaults filled in) go to `Settings.options` and
        `LoraSettings.options`.
        """
        merged = {**run_config, **{k: v for k, v in (node_config or {}).items()
                                   if k not in NODE_KEYS}}
        options, peft_options = options or {}, peft_options or {}
        known = {**all_keys(), **options, **peft_options}
        unknown = [k for k in merged if k not in known]
        if unknown:
            hints = [f"'{k}'" + (f" (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(
                k, known, n=1)) else "") for k in unknown]
            raise SettingsError("unknown setting " + ", ".join(hints) +
                                "; run `fedlora settings` to list the known keys")
        typed = lambda keys: {k: _coerce(k, merged[k], d) if k in merged else d
                              for k, (d, _) in keys.items()}
        sections = {}
        for name, section in SECTIONS.items():
            kwargs = {f.name: _coerce(f.metadata["key"], merged[f.metadata["key"]], f.default)
                      for f in keyed(section) if f.metadata["key"] in merged}
            if section is LoraSettings:
                kwargs["options"] = typed(peft_options)
            sections[name] = section(**kwargs)
        return cls(**sections, options=typed(options))

    def to_config(self) -> dict[str, Any]:
        """The flat run_config that reproduces these settings."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            for f in keyed(section):
                out[f.metadata["key"]] = getattr(section, f.name)
        out.update(self.lora.options)
        out.update(self.options)
        return out


def keyed(section: type) -> list[Field]:
    """The fields of a settings dataclass that are run-config keys."""
    return [f for f in fields(section) if "key" in f.metadata]


def section_keys(section: type) -> dict[str, tuple[Any, str]]:
    """The keys of one settings dataclass with their defaults and help texts."""
    out = {}
    for f in keyed(section):
        assert f.default is not MISSING
        out[f.metadata["key"]] = (f.default, f.metadata["help"])
    return out


def all_keys() -> dict[str, tuple[Any, str]]:
    """Every shared key (the methods' options are in `fedlora.methods.option_keys`) with its
    default and help text."""
    return {k: v for section in SECTIONS.values() for k, v in section_keys(section).items()}
