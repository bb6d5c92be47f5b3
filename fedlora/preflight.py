"""Checks run before any process starts or any step trains: fail in seconds, not rounds."""

from __future__ import annotations

from fedlora.adapters import check_target_modules
from fedlora.config import Settings, SettingsError
from fedlora.data import load_records
from fedlora.models import ModelSource, model_skeleton, resolve_device, resolve_source


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
                           data.field_mapping(), data.data_split)
    if len(records) < num_clients:
        raise SettingsError(f"setting 'dataset': {len(records)} examples cannot be split over "
                            f"{num_clients} clients; add data or use fewer clients")
    return len(records)


def preflight(settings: Settings, num_clients: int) -> ModelSource:
    """All checks for a simulation; raises with a message that says what to change."""
    check_training(settings)
    check_data(settings, num_clients)
    return check_model(settings)
