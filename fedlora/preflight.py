"""Checks run before any process starts or any step trains: fail in seconds, not rounds."""

from __future__ import annotations

import logging

from fedlora.adapters import check_target_modules
from fedlora.config import Settings, SettingsError
from fedlora.data import (
    check_answers,
    client_records,
    load_records,
    load_source,
)
from fedlora.data.preference import for_objective, is_pair, tokenize_for
from fedlora.models import (
    ModelSource,
    load_tokenizer,
    model_skeleton,
    resolve_device,
    resolve_source,
)

log = logging.getLogger("fedlora.preflight")


def check_model(settings: Settings) -> ModelSource:
    """Resolve the model (converting a built-in once) and check the LoRA targets exist."""
    source = resolve_source(settings.model.name)
    check_target_modules(model_skeleton(source), settings.lora.modules())
    return source


def check_training(settings: Settings) -> None:
    """Options that depend on the device."""
    device = resolve_device(settings.model.device)
    if settings.train.optimizer == "paged-adamw-8bit" and not device.startswith("cuda"):
        raise SettingsError(f"setting 'optimizer': paged-adamw-8bit needs CUDA, but the device "
                            f"is {device!r}; use optimizer=adamw")


def check_data(settings: Settings, num_clients: int) -> int:
    """Load the dataset once and check it can be split over the clients; returns its size."""
    data = settings.data
    records = load_records(data.dataset, data.dataset_size, settings.federation.seed,
                           data.field_mapping(), data.data_split, data.roles_mapping())
    if len(records) < num_clients:
        raise SettingsError(f"setting 'dataset': {len(records)} examples cannot be split over "
                            f"{num_clients} clients; add data or use fewer clients")
    return len(records)


def check_answers_fit(settings: Settings, source: ModelSource, num_clients: int) -> None:
    """Every client keeps answer tokens after truncation to max-length (else a SettingsError:
    it would train on nothing); a warning for a client that loses more than 10 % of them."""
    tokenizer, train = load_tokenizer(source), settings.train
    for pid in range(num_clients):
        records, _ = client_records(settings.data, pid, num_clients, settings.federation.seed)
        try:  # objective=dpo: pairs; sft: no pairs
            records = for_objective(records, train.objective, settings.federation.seed + pid,
                                    settings.data.dataset)
        except ValueError as err:
            raise SettingsError(f"setting 'objective': {err}") from None
        examples = tokenize_for(records, tokenizer, train.objective, train.max_length,
                                train.truncation, settings.data.train_on)
        try:
            warning = check_answers(examples, f"client {pid}", train.max_length,
                                    train.truncation)
        except ValueError as err:
            raise SettingsError(f"setting 'max-length': {err}") from None
        if warning:
            log.warning(warning)


def check_node_data(settings: Settings, model_named: bool) -> str | None:
    """A node's own data (data-path), checked when `fedlora client` starts: its records load
    in a known form with the fields it needs (else a ValueError naming file:line), and, when
    the node names its model (`model_named`: the run's model is not known yet), some answer
    tokens survive truncation to max-length (else a SettingsError). Returns a warning or None."""
    data, train = settings.data, settings.train
    try:
        records = load_source(data.data_path, data.field_mapping(), data.data_split,
                              data.roles_mapping())
        # the run's objective is not known yet: preference pairs are DPO's, others SFT's
        objective = "dpo" if any(is_pair(r) for r in records) else "sft"
        records = for_objective(records, objective, settings.federation.seed, data.data_path)
    except ValueError as err:  # file:line and what was expected, from the loader
        raise ValueError(f"--data-path: {err}") from None
    if not model_named:
        return None
    tokenizer = load_tokenizer(resolve_source(settings.model.name))  # no weights
    examples = tokenize_for(records, tokenizer, objective, train.max_length, train.truncation,
                            data.train_on)
    try:
        return check_answers(examples, f"--data-path {data.data_path}", train.max_length,
                             train.truncation)
    except ValueError as err:
        raise SettingsError(f"setting 'max-length': {err} (this node's own: --node-config "
                            f"\"max-length=N\")") from None


def preflight(settings: Settings, num_clients: int) -> ModelSource:
    """All checks for a simulation; raises with a message that says what to change."""
    check_training(settings)
    check_data(settings, num_clients)
    source = check_model(settings)
    check_answers_fit(settings, source, num_clients)
    return source
