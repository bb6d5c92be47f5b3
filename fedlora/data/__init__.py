"""Data: loaders, prompt formatting with response-only labels, partitioners, built-in tasks."""

from __future__ import annotations

import random

from fedlora.config import DataSettings
from fedlora.data.format import IGNORE, collate, pack, to_messages, tokenize, tokenize_records
from fedlora.data.loaders import load_jsonl, load_source
from fedlora.data.partition import PARTITIONERS, dirichlet_partition, iid_partition
from fedlora.data.tasks import TASKS, builtin_task

__all__ = ["IGNORE", "PARTITIONERS", "TASKS", "builtin_task", "client_records", "collate",
           "dirichlet_partition", "iid_partition", "load_jsonl", "load_records", "load_source",
           "pack", "record_labels", "to_messages", "tokenize", "tokenize_records",
           "train_eval_split"]


def load_records(dataset: str, size: int, seed: int, field_map: dict[str, str] | None = None,
                 split: str = "train") -> list[dict]:
    """All records of a dataset setting: `builtin:<task>`, or a file, folder or hf: id."""
    if dataset.startswith("builtin:"):
        return builtin_task(dataset.split(":", 1)[1], size, seed)
    return load_source(dataset, field_map, split)


def train_eval_split(records: list[dict], eval_fraction: float, seed: int):
    """Seeded shuffle, then the first eval_fraction (at least 1 when > 0) is held out."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(records))) if eval_fraction > 0 else 0
    n_eval = min(n_eval, len(records) - 1)
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def record_labels(records: list[dict], field: str, partitioner: str) -> list[str]:
    """Each record's label for label-skewed partitioners (IID needs none)."""
    if partitioner == "iid":
        return [""] * len(records)
    missing = next((r for r in records if field not in r), None)
    if missing is not None:
        raise ValueError(f"setting 'partition-field': partitioner {partitioner!r} splits by "
                         f"field {field!r}, but a record has only the fields {sorted(missing)}")
    return [str(r[field]) for r in records]


def client_records(settings: DataSettings, partition_id: int, num_partitions: int,
                   seed: int) -> tuple[list[dict], list[dict]]:
    """This client's (train, eval) records: its own data-path, or its share of `dataset`."""
    if settings.data_path:
        records = load_source(settings.data_path, settings.field_mapping(), settings.data_split)
    else:
        everything = load_records(settings.dataset, settings.dataset_size, seed,
                                  settings.field_mapping(), settings.data_split)
        labels = record_labels(everything, settings.partition_field, settings.partitioner)
        part = PARTITIONERS[settings.partitioner](labels, num_partitions, seed,
                                                  settings.dirichlet_alpha)
        records = [everything[i] for i in part[partition_id]]
    return train_eval_split(records, settings.eval_fraction, seed + partition_id)
