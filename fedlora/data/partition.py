"""Split a dataset over clients (simulation): deterministic by seed.

A partitioner takes the records' labels (one string per record, from `partition-field`),
the number of clients, a seed and the Dirichlet concentration, and returns each client's
record indices; every record goes to exactly one client and every client gets at least one.
"""

from __future__ import annotations

import random

import numpy as np


def check_split(num_items: int, num_partitions: int) -> None:
    """Raise a ValueError when the items cannot give every client at least one."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_items < num_partitions:
        raise ValueError(f"cannot split {num_items} examples over {num_partitions} clients; "
                         f"raise dataset-size or lower the number of clients")


def iid_partition(labels: list[str], num_partitions: int, seed: int,
                  alpha: float = 0.0) -> list[list[int]]:
    """Shuffle indices and deal them into `num_partitions` near-equal parts."""
    check_split(len(labels), num_partitions)
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::num_partitions]) for i in range(num_partitions)]


def dirichlet_partition(labels: list[str], num_partitions: int, seed: int,
                        alpha: float = 0.5) -> list[list[int]]:
    """Label skew: each label's records are shared out by proportions ~ Dirichlet(alpha).

    Small alpha (0.1) gives clients that hold nearly one label each; large alpha (100) is
    close to IID. Draws are repeated (seeded) until every client has at least one record.
    """
    check_split(len(labels), num_partitions)
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for label in sorted(by_label):
            idx = rng.permutation(by_label[label])
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_partitions))[:-1] * len(idx))
            for client, chunk in enumerate(np.split(idx, cuts.astype(int))):
                parts[client].extend(int(i) for i in chunk)
        if all(parts):
            return [sorted(p) for p in parts]
    raise ValueError(f"dirichlet-alpha={alpha} left a client without data in 100 draws; "
                     f"raise dirichlet-alpha or dataset-size, or use fewer clients")


PARTITIONERS = {"iid": iid_partition, "dirichlet": dirichlet_partition}
