"""Settings: the only place where Flower `run_config` / `node_config` keys become typed fields.

Every key a user can type (in `[tool.flwr.app.config]`, `--run-config "k=v"`, or a node's
`--node-config`) is declared once here, with its help text, and validated in `__post_init__`
with a message that names the key, what it expected and what it got.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping

from fedlora.aggregation import STRATEGIES


class SettingsError(ValueError):
    """A setting has the wrong type or value; the message names the key and the fix."""


def _setting(key: str, default: Any, help: str) -> Any:
    """Declare a dataclass field bound to a run-config key, with help text."""
    return field(default=default, metadata={"key": key, "help": help})


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
    """Raise a SettingsError naming the key when a check fails."""
    if not ok:
        raise SettingsError(f"setting '{key}': expected {expected}, got {got!r}")


def _one_of(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    _require(value in allowed, key, "one of " + ", ".join(allowed), value)


QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "paged-adamw-8bit")
WIRE_DTYPES = ("float32", "float16")
PARTITIONERS = ("iid",)
# "all-linear" expands to every linear projection of the attention and MLP blocks of a
# Llama-style decoder (the architecture of both built-in models and of most open LLMs).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelSettings:
    """Which base model to load and how."""

    name: str = _setting(
        "model", "smollm2-135m",
        "Base model: a built-in name (tiny-llama, smollm2-135m), a local model directory, "
        "a .gguf file, or a Hugging Face hub id (online only).")
    quantization: str = _setting(
        "quantization", "none", "Base weights: none, 8bit or 4bit (NF4 + double quant, QLoRA).")
    compute_dtype: str = _setting(
        "compute-dtype", "auto",
        "dtype of 4-bit matmuls: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.")
    device: str = _setting("device", "auto", "auto (CUDA if available), cpu, cuda or cuda:N.")

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model", "a model name or path", self.name)
        _one_of("quantization", self.quantization, QUANTIZATIONS)
        _one_of("compute-dtype", self.compute_dtype, DTYPES)
        ok = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit())
        _require(ok, "device", "auto, cpu, cuda or cuda:N", self.device)


@dataclass
class LoraSettings:
    """The LoRA adapter trained on each client."""

    rank: int = _setting("lora-rank", 8, "LoRA rank r (>= 1).")
    alpha: float = _setting("lora-alpha", 16.0, "LoRA alpha; the update is scaled by alpha/r "
                            "(alpha/sqrt(r) with rsLoRA).")
    dropout: float = _setting("lora-dropout", 0.05, "Dropout on the LoRA input, in [0, 1).")
    target_modules: str = _setting(
        "target-modules", "all-linear",
        "Comma-separated module names to adapt, or all-linear (" + ",".join(ALL_LINEAR) + ").")
    use_rslora: bool = _setting("use-rslora", False, "Scale by alpha/sqrt(r) instead of alpha/r.")

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "lora-rank", "an integer >= 1", self.rank)
        _require(self.alpha > 0, "lora-alpha", "a number > 0", self.alpha)
        _require(0 <= self.dropout < 1, "lora-dropout", "a number in [0, 1)", self.dropout)
        _require(bool(self.modules()), "target-modules", "at least one module name",
                 self.target_modules)

    def modules(self) -> list[str]:
        """Target module names, with all-linear expanded."""
        if self.target_modules.strip() == "all-linear":
            return list(ALL_LINEAR)
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass
class TrainSettings:
    """Local training on a client."""

    local_steps: int = _setting("local-steps", 10, "Optimizer steps per round on each client.")
    batch_size: int = _setting("batch-size", 4, "Examples per micro-batch.")
    grad_accum: int = _setting("grad-accum", 1, "Micro-batches accumulated per optimizer step.")
    lr: float = _setting("lr", 3e-4, "Peak learning rate.")
    lr_schedule: str = _setting(
        "lr-schedule", "cosine",
        "constant, linear or cosine; continues across rounds (step = (round-1)*local-steps + i).")
    warmup_steps: int = _setting("warmup-steps", 0, "Linear warm-up steps at the start of the run.")
    weight_decay: float = _setting("weight-decay", 0.0, "AdamW weight decay.")
    max_grad_norm: float = _setting("max-grad-norm", 1.0, "Gradient clipping norm (0 = off).")
    optimizer: str = _setting("optimizer", "adamw",
                              "adamw, or paged-adamw-8bit (bitsandbytes, CUDA only).")
    max_length: int = _setting("max-length", 256, "Max tokens per example (longer ones are cut).")
    bf16: bool = _setting("bf16", False, "bf16 autocast for the forward pass (use on GPUs).")
    gradient_checkpointing: bool = _setting(
        "gradient-checkpointing", False, "Recompute activations to save memory (slower).")
    eval_examples: int = _setting("eval-examples", 32,
                                  "Held-out examples per client evaluation (0 = all).")

    def __post_init__(self) -> None:
        for key, value in (("local-steps", self.local_steps), ("batch-size", self.batch_size),
                           ("grad-accum", self.grad_accum)):
            _require(value >= 1, key, "an integer >= 1", value)
        _require(self.lr > 0, "lr", "a number > 0", self.lr)
        _one_of("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _require(self.warmup_steps >= 0, "warmup-steps", "an integer >= 0", self.warmup_steps)
        _require(self.weight_decay >= 0, "weight-decay", "a number >= 0", self.weight_decay)
        _require(self.max_grad_norm >= 0, "max-grad-norm", "a number >= 0", self.max_grad_norm)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _require(self.max_length >= 8, "max-length", "an integer >= 8", self.max_length)
        _require(self.eval_examples >= 0, "eval-examples", "an integer >= 0", self.eval_examples)


@dataclass
class DataSettings:
    """Where each client's examples come from."""

    dataset: str = _setting(
        "dataset", "builtin:arithmetic",
        "builtin:<task> (generated by code, no download) or a path to a .jsonl file.")
    dataset_size: int = _setting("dataset-size", 2000,
                                 "Examples generated for a builtin task (all clients together).")
    eval_fraction: float = _setting("eval-fraction", 0.1,
                                    "Share of each client's examples held out for evaluation.")
    partitioner: str = _setting("partitioner", "iid", "How a dataset is split over clients: iid.")
    data_path: str = _setting("data-path", "",
                              "A node's own data file (deployment); overrides 'dataset' there.")

    def __post_init__(self) -> None:
        _require(bool(self.dataset.strip()), "dataset", "builtin:<task> or a file path",
                 self.dataset)
        _require(self.dataset_size >= 1, "dataset-size", "an integer >= 1", self.dataset_size)
        _require(0 <= self.eval_fraction < 1, "eval-fraction", "a number in [0, 1)",
                 self.eval_fraction)
        _one_of("partitioner", self.partitioner, PARTITIONERS)


@dataclass
class FederationSettings:
    """Rounds, sampling, merging and what crosses the wire."""

    num_rounds: int = _setting("num-server-rounds", 3, "Federated rounds.")
    strategy: str = _setting("strategy", "fedavg",
                             "Merging strategy: " + ", ".join(sorted(STRATEGIES)) + ".")
    fraction_train: float = _setting("fraction-train", 1.0,
                                     "Share of connected clients sampled to train each round.")
    fraction_evaluate: float = _setting("fraction-evaluate", 1.0,
                                        "Share sampled to evaluate the merged adapter (0 = off).")
    min_train_nodes: int = _setting("min-train-nodes", 2, "Fewest clients that train in a round.")
    min_evaluate_nodes: int = _setting("min-evaluate-nodes", 2, "Fewest clients that evaluate.")
    min_available_nodes: int = _setting("min-available-nodes", 2,
                                        "Clients that must be connected before a round starts.")
    round_timeout: float = _setting("round-timeout", 3600.0,
                                    "Seconds to wait for client replies in each phase.")
    wire_dtype: str = _setting("wire-dtype", "float32",
                               "dtype of the LoRA factors sent both ways: float32 or float16.")
    seed: int = _setting("seed", 0, "Seed for the initial adapter, data splits and training.")
    output_dir: str = _setting("output-dir", "fedlora-output",
                               "Where the server writes metrics.jsonl and adapters.")

    def __post_init__(self) -> None:
        _require(self.num_rounds >= 1, "num-server-rounds", "an integer >= 1", self.num_rounds)
        _one_of("strategy", self.strategy, sorted(STRATEGIES))
        _require(0 < self.fraction_train <= 1, "fraction-train", "a number in (0, 1]",
                 self.fraction_train)
        _require(0 <= self.fraction_evaluate <= 1, "fraction-evaluate", "a number in [0, 1]",
                 self.fraction_evaluate)
        for key, value in (("min-train-nodes", self.min_train_nodes),
                           ("min-evaluate-nodes", self.min_evaluate_nodes),
                           ("min-available-nodes", self.min_available_nodes)):
            _require(value >= 1, key, "an integer >= 1", value)
        _require(self.round_timeout > 0, "round-timeout", "seconds > 0", self.round_timeout)
        _one_of("wire-dtype", self.wire_dtype, WIRE_DTYPES)


SECTIONS = {"model": ModelSettings, "lora": LoraSettings, "train": TrainSettings,
            "data": DataSettings, "federation": FederationSettings}
# Keys Flower itself puts into node_config (simulation) that are not settings.
NODE_KEYS = ("partition-id", "num-partitions")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a run-config value to the type of the field's default, or raise."""
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        _require(isinstance(value, bool), key, "true or false", value)
        return value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        _require(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if isinstance(default, float):
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 "a number", value)
        return float(value)
    _require(isinstance(value, str), key, "a string", value)
    return value


@dataclass
class Settings:
    """All settings of a run, grouped by concern."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)

    def __post_init__(self) -> None:
        if self.federation.fraction_evaluate > 0 and self.data.eval_fraction == 0:
            raise SettingsError("setting 'eval-fraction': expected > 0 when fraction-evaluate > 0 "
                                "(clients need held-out data), got 0; or set fraction-evaluate=0")

    @classmethod
    def from_config(cls, run_config: Mapping[str, Any],
                    node_config: Mapping[str, Any] | None = None) -> "Settings":
        """Build settings from a Flower run_config, with node_config keys taking precedence."""
        merged = {**run_config, **{k: v for k, v in (node_config or {}).items()
                                   if k not in NODE_KEYS}}
        known = all_keys()
        unknown = [k for k in merged if k not in known]
        if unknown:
            hints = [f"'{k}'" + (f" (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(
                k, known, n=1)) else "") for k in unknown]
            raise SettingsError("unknown setting " + ", ".join(hints) +
                                "; run `fedlora settings` to list the known keys")
        sections = {}
        for name, section in SECTIONS.items():
            kwargs = {}
            for f in fields(section):
                key = f.metadata["key"]
                if key in merged:
                    kwargs[f.name] = _coerce(key, merged[key], f.default)
            sections[name] = section(**kwargs)
        return cls(**sections)

    def to_config(self) -> dict[str, Any]:
        """The flat run_config that reproduces these settings."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            for f in fields(section):
                out[f.metadata["key"]] = getattr(section, f.name)
        return out


def all_keys() -> dict[str, tuple[Any, str]]:
    """Every known key with its default and help text."""
    out = {}
    for section in SECTIONS.values():
        for f in fields(section):
            assert f.default is not MISSING
            out[f.metadata["key"]] = (f.default, f.metadata["help"])
    return out
