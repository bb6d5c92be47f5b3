"""Data: loaders, prompt formatting with response-only labels, partitioners, built-in tasks."""

from __future__ import annotations

import random
from pathlib import Path

from fedlora.config import DataSettings
from fedlora.data.bigbench import load_bigbench
from fedlora.data.format import (
    IGNORE,
    check_answers,
    collate,
    pack,
    pack_with,
    to_messages,
    tokenize,
    tokenize_records,
)
from fedlora.data.loaders import BIGBENCH_PREFIX, HUB_PREFIX, load_jsonl, load_source
from fedlora.data.partition import (
    PARTITIONERS,
    USES_LABELS,
    by_field_partition,
    dirichlet_partition,
    iid_partition,
    partition_table,
    quantity_skew_partition,
)
from fedlora.data.tasks import SCORERS, TASKS, builtin_task, score_answer, split_suite

__all__ = ["BIGBENCH_PREFIX", "IGNORE", "PARTITIONERS", "SCORERS", "TASKS", "builtin_task",
           "by_field_partition", "check_answers", "client_records", "collate", "describe_partition",
           "dirichlet_partition", "iid_partition", "load_bigbench", "load_jsonl",
           "load_records", "load_source", "pack", "pack_with", "partition_dataset",
           "quantity_skew_partition", "record_labels", "score_answer", "split_suite",
           "to_messages", "tokenize", "tokenize_records", "train_eval_split"]


def load_records(dataset: str, size: int, seed: int, field_map: dict[str, str] | None = None,
                 split: str = "train", roles_map: dict[str, str] | None = None) -> list[dict]:
    """All records of a dataset setting: `builtin:<task>`, `bigbench:<file or folder>` (no
    field map or split: a BIG-bench task is one list of examples), or a file, folder or hf: id."""
    if dataset.startswith("builtin:"):
        return builtin_task(dataset.split(":", 1)[1], size, seed)
    if dataset.startswith(BIGBENCH_PREFIX):
        return load_bigbench(dataset[len(BIGBENCH_PREFIX):])
    return load_source(dataset, field_map, split, roles_map)


def train_eval_split(records: list[dict], eval_fraction: float, seed: int):
    """Seeded shuffle, then the first eval_fraction (at least 1 when > 0) is held out."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(records))) if eval_fraction > 0 else 0
    n_eval = min(n_eval, len(records) - 1)
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def record_labels(records: list[dict], field: str, partitioner: str) -> list[str]:
    """Each record's label for the partitioners that read one (iid, quantity-skew need none)."""
    if partitioner not in USES_LABELS:
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
        records = load_source(settings.data_path, settings.field_mapping(), settings.data_split,
                              settings.roles_mapping())
    else:
        everything, parts = partition_dataset(settings, num_partitions, seed)
        records = [everything[i] for i in parts[partition_id]]
    return train_eval_split(records, settings.eval_fraction, seed + partition_id)


def partition_dataset(settings: DataSettings, num_partitions: int,
                      seed: int) -> tuple[list[dict], list[list[int]]]:
    """All records of `dataset` and each client's record indices under `partitioner`.

    Kept for the next call (one entry per process): a simulation worker serves many virtual
    clients in turn and each needs only its own share, so without it every sampled client
    would re-read (or re-generate) and re-split the whole federation's data, and the time per
    client would grow with the number of clients. One entry holds one dataset, which each call
    materialised anyway. The returned lists are shared: read them, do not modify them.
    """
    key = (source_version(settings.dataset), settings.dataset_size, seed, settings.field_map,
           settings.roles_map, settings.data_split, settings.partitioner, settings.partition_field,
           settings.dirichlet_alpha, num_partitions)
    if _PARTITIONED.get("key") != key:
        _PARTITIONED.clear()  # drop the old dataset before loading the new one
        everything = load_records(settings.dataset, settings.dataset_size, seed,
                                  settings.field_mapping(), settings.data_split,
                                  settings.roles_mapping())
        labels = record_labels(everything, settings.partition_field, settings.partitioner)
        parts = PARTITIONERS[settings.partitioner](labels, num_partitions, seed,
                                                   settings.dirichlet_alpha)
        _PARTITIONED.update(key=key, value=(everything, parts))
    return _PARTITIONED["value"]


_PARTITIONED: dict = {}  # {"key": ..., "value": (records, parts)} of the last partition_dataset


def source_version(dataset: str) -> tuple:
    """`dataset` plus the size and modification time of its file (or of every file in its
    folder; bigbench: its .json files), so a file rewritten in place is read again; builtin:
    and hf: are the name alone."""
    bigbench = dataset.startswith(BIGBENCH_PREFIX)
    spec = dataset.removeprefix(BIGBENCH_PREFIX) if bigbench else dataset
    path = Path(spec).expanduser()
    if dataset.startswith(("builtin:", HUB_PREFIX)) or not spec.strip() or not path.exists():
        return (dataset,)
    files = sorted(path.rglob("*.json" if bigbench else "*")) if path.is_dir() else [path]
    kind = BIGBENCH_PREFIX if bigbench else ""  # the same file read as records is another source
    return (kind + str(path.resolve()),
            *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()))


def describe_partition(settings: DataSettings, num_clients: int, seed: int) -> str:
    """A table of each simulated client's records (before its eval split): size, and the mix
    of `partition-field` values when every record has that field."""
    if settings.data_path:
        return "fedlora: every client reads its own data-path; no partition to describe"
    records, parts = partition_dataset(settings, num_clients, seed)
    field = settings.partition_field
    labels = [str(r[field]) for r in records] if all(field in r for r in records) else None
    alpha = f" alpha={settings.dirichlet_alpha}" if settings.partitioner in (
        "dirichlet", "quantity-skew") else ""
    mix = f", mix of {field!r}" if labels else ""
    return (f"fedlora: {settings.dataset} over {num_clients} clients, partitioner "
            f"{settings.partitioner}{alpha}{mix}:\n" + partition_table(parts, labels))
